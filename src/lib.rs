//! credgate: the exchange point of a provincial public credit information
//! system. Departments push records over mutual TLS; each record is
//! validated against the credit information collection catalog and stored
//! durably before it is acknowledged.
//!
//! The pipeline, one module per step:
//! `tls` (identity) → `participants` → `ratelimit` → `ingest`
//! (`catalog` + `codes`) → `store`; `redact` is the one way record data
//! leaves; `http` is a thin shell; `server` starts and stops it all.

pub mod active;
pub mod agencies;
pub mod audit;
pub mod catalog;
pub mod codes;
pub mod compat;
pub mod config;
pub mod control;
pub mod cursor;
pub mod delivery;
pub mod error;
pub mod grades;
pub mod grading;
pub mod http;
pub mod import;
pub mod ingest;
pub mod metrics;
pub mod notice;
pub mod participants;
pub mod pki;
pub mod publicity;
pub mod ratelimit;
pub mod redact;
pub mod review;
pub mod routing;
pub mod sealed;
pub mod server;
pub mod signing;
pub mod store;
pub mod subjects;
pub mod synth;
pub mod tls;
pub mod tls_io;

pub use server::{run, Gateway, Listeners, StartupErrors};

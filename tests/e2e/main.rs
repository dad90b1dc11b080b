//! End-to-end tests: the real gateway over real mTLS, real SQLite files,
//! certificates generated at test time. One binary, modules by concern;
//! `tests/e2e_postgres.rs` runs the same modules on PostgreSQL.

/// The store every test of this binary runs on.
pub const BACKEND: credgate::config::StoreBackend = credgate::config::StoreBackend::Sqlite;

mod admin;
mod browser;
mod chaos;
mod console;
mod contract;
mod grades;
mod hardening;
mod import;
mod lifecycle;
mod notices;
mod powerloss;
mod process;
mod public;
mod receiver;
mod records;
mod reviews;
mod support;
mod tls_identity;
mod volatile;

//! End-to-end tests: the real gateway over real mTLS, real SQLite files,
//! certificates generated at test time. One binary, modules by concern.

mod admin;
mod hardening;
mod notices;
mod process;
mod receiver;
mod records;
mod support;
mod tls_identity;

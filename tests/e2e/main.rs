//! End-to-end tests: the real gateway over real mTLS, real SQLite files,
//! certificates generated at test time. One binary, modules by concern.

mod process;
mod records;
mod support;
mod tls_identity;

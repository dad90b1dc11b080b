//! The end-to-end tests again, each on a fresh PostgreSQL database
//! (created and dropped by the test on the server `POSTGRES_TEST_URL`
//! names, default `postgres://postgres@127.0.0.1:5432/test`).

/// The store every test of this binary runs on.
pub const BACKEND: credgate::config::StoreBackend = credgate::config::StoreBackend::Postgres;

#[path = "e2e/admin.rs"]
mod admin;
#[path = "e2e/browser.rs"]
mod browser;
#[path = "e2e/chaos.rs"]
mod chaos;
#[path = "e2e/cluster.rs"]
mod cluster;
#[path = "e2e/console.rs"]
mod console;
#[path = "e2e/contract.rs"]
mod contract;
#[path = "e2e/grades.rs"]
mod grades;
#[path = "e2e/hardening.rs"]
mod hardening;
#[path = "e2e/import.rs"]
mod import;
#[path = "e2e/lifecycle.rs"]
mod lifecycle;
#[path = "e2e/migrate.rs"]
mod migrate;
#[path = "e2e/notices.rs"]
mod notices;
#[path = "e2e/pg_outage.rs"]
mod pg_outage;
#[path = "e2e/process.rs"]
mod process;
#[path = "e2e/public.rs"]
mod public;
#[path = "e2e/receiver.rs"]
mod receiver;
#[path = "e2e/records.rs"]
mod records;
#[path = "e2e/reviews.rs"]
mod reviews;
#[path = "e2e/support.rs"]
mod support;
#[path = "e2e/tls_identity.rs"]
mod tls_identity;
#[path = "e2e/volatile.rs"]
mod volatile;

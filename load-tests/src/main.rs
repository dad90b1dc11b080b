//! credgate load generator: drives the real gateway over real mTLS with
//! realistic synthetic records and reports throughput, latency percentiles
//! (HDR histogram), errors by kind, and the gateway's CPU seconds and peak
//! RSS read from /proc — as a human summary on stderr and JSON on stdout.
//!
//! By default each run prepares its own gateway (folder, certificates,
//! participants, subscriptions) and starts the `credgate` binary next to
//! this one; `--target` points `ingest` at a gateway already running.

mod bench;
mod client;
mod drive;
mod harness;
mod oha;
mod pool;
mod receiver;
mod report;
mod scenarios;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Load generator for credgate.
#[derive(Parser, Debug, Clone)]
#[command(name = "credgate-load", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print only the JSON report.
    #[arg(long, global = true)]
    quiet: bool,
    /// Run credgate on a fresh database of this PostgreSQL server (the
    /// URL of any existing database there, e.g.
    /// postgres://postgres@127.0.0.1:5432/test) instead of SQLite.
    #[arg(long, global = true)]
    postgres: Option<String>,
    /// Gateway instances on the one database (needs --postgres); the
    /// load generator spreads its connections over them round robin.
    #[arg(long, global = true, default_value_t = 1)]
    instances: usize,
}

/// Options shared by the request-driving scenarios.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Load {
    /// Use a gateway already running at this address (with `--certs`)
    /// instead of starting one.
    #[arg(long)]
    pub target: Option<SocketAddr>,
    /// Certificates of the external gateway (ca.pem, <participant>.pem/.key).
    #[arg(long, default_value = "certs/dev")]
    pub certs: PathBuf,
    /// Concurrent connections.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Concurrent streams per connection (HTTP/2 only).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Speak HTTP/2.
    #[arg(long)]
    pub h2: bool,
    /// Records per request.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Catalog item submitted.
    #[arg(long, default_value = "administrative_penalty")]
    pub item: String,
    /// Share of deliberately invalid records (0.0-1.0).
    #[arg(long, default_value_t = 0.0)]
    pub invalid: f64,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seed of the record generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The client that drives the requests: the built-in driver, or oha
    /// (installed separately: `cargo install oha --locked`).
    #[arg(long, value_enum, default_value = "builtin")]
    pub client: bench::Client,
}

#[derive(Subcommand, Debug, Clone)]
enum Scenario {
    /// `POST /v1/records` over keep-alive connections; `--batch 100` is the
    /// batch scenario, `--h2 --connections 8 --streams 8` the HTTP/2 one.
    Ingest {
        #[command(flatten)]
        load: Load,
        /// Serve with credgate or the nginx reference.
        #[arg(long, value_enum, default_value = "credgate")]
        against: bench::Against,
    },
    /// `GET /v1/credit-reviews/keys` over keep-alive connections, answered
    /// from memory: what `ingest` costs without validation and storage.
    Floor {
        #[command(flatten)]
        load: Load,
        /// Serve with credgate or the nginx reference.
        #[arg(long, value_enum, default_value = "credgate")]
        against: bench::Against,
    },
    /// A full mTLS handshake (no resumption) for every request.
    Handshake {
        #[command(flatten)]
        load: Load,
        /// Serve with credgate or the nginx reference.
        #[arg(long, value_enum, default_value = "credgate")]
        against: bench::Against,
    },
    /// Many idle mTLS connections held open while ingest runs; compared
    /// with ingest alone in the same run.
    Idle {
        #[command(flatten)]
        load: Load,
        /// Serve with credgate or the nginx reference.
        #[arg(long, value_enum, default_value = "credgate")]
        against: bench::Against,
        /// Idle connections.
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
    },
    /// Dishonesty records routed to N subscriptions, half pull and half
    /// push to in-process mTLS receivers; measures acknowledged → received.
    Fanout {
        /// Subscriptions (half push, half pull).
        #[arg(long, default_value_t = 20)]
        subscriptions: usize,
        /// Submitting connections.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Records per second in total; 0 = as fast as the gateway takes them.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Seconds of submitting.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Notices per push request (the push subscriptions' `batch_max`;
        /// 1 = one notice per request, as by default).
        #[arg(long, default_value_t = 1)]
        batch_max: usize,
    },
    /// One department floods at N× its quota while two submit steadily.
    Fairness {
        /// Seconds per phase (without, then with the flood).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Every department's quota, requests per second.
        #[arg(long, default_value_t = 500)]
        quota: u32,
        /// The flooder's rate as a multiple of the quota.
        #[arg(long, default_value_t = 10)]
        factor: u32,
        /// Requests per second of the steady departments together.
        #[arg(long, default_value_t = 200.0)]
        steady_rate: f64,
    },
    /// Every comparable scenario against credgate and nginx, alternating,
    /// several runs; medians and ratios.
    Compare {
        /// Runs per target and scenario.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per run.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Idle connections in the idle scenario.
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
        /// Only these scenarios (ingest, floor, h2, handshake, batch, idle).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// The clients to drive them with: builtin, oha, or both (each
        /// scenario's rows for both clients side by side; idle stays
        /// built-in).
        #[arg(long, value_delimiter = ',', default_value = "builtin")]
        client: Vec<bench::Client>,
    },
    /// `credgate import` of a generated JSON Lines file, with a dry run of
    /// the same file as the baseline and a resuming re-run.
    Import {
        /// Rows in the file.
        #[arg(long, default_value_t = 200_000)]
        rows: u64,
        /// Records per transaction (`credgate import --batch`).
        #[arg(long, default_value_t = 5000)]
        batch: usize,
    },
    /// Credit review reports about one warm subject, then about every one
    /// of `subjects` in turn; nginx driven alike is the reference.
    Review {
        #[command(flatten)]
        load: Load,
        /// Distinct subjects seeded (each with a serious penalty).
        #[arg(long, default_value_t = 100_000)]
        subjects: u64,
    },
    /// A few seconds of every scenario with small numbers; exit code 1 on
    /// any error (run in CI).
    Smoke,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let _ = harness::DEPLOYMENT.set(harness::Deployment {
        postgres: cli.postgres.clone(),
        instances: cli.instances.max(1),
    });
    let report = |r: Result<bench::Report, String>| r.map(|r| (r.summary, r.json));
    let result = match cli.scenario.clone() {
        Scenario::Ingest { load, against } => {
            report(bench::requests("ingest", &load, against, false).await)
        }
        Scenario::Floor { load, against } => {
            report(bench::requests("floor", &load, against, false).await)
        }
        Scenario::Handshake { load, against } => {
            report(bench::requests("handshake", &load, against, true).await)
        }
        Scenario::Idle {
            load,
            against,
            idle,
        } => report(bench::idle(&load, against, idle).await),
        Scenario::Fanout {
            subscriptions,
            connections,
            rate,
            duration,
            batch_max,
        } => scenarios::fanout(subscriptions, connections, rate, duration, batch_max).await,
        Scenario::Import { rows, batch } => scenarios::import(rows, batch).await,
        Scenario::Review { load, subjects } => report(bench::review(&load, subjects).await),
        Scenario::Fairness {
            duration,
            quota,
            factor,
            steady_rate,
        } => report(bench::fairness(duration, quota, factor, steady_rate).await),
        Scenario::Compare {
            runs,
            duration,
            idle,
            only,
            client,
        } => bench::compare(runs, duration, idle, &only, &client).await,
        Scenario::Smoke => bench::smoke().await,
    };
    match result {
        Ok((summary, json)) => {
            if !cli.quiet {
                eprintln!("{summary}");
            }
            println!("{json}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("credgate-load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! credgate load generator: drives the real gateway over real mTLS with
//! realistic synthetic records and reports throughput, latency percentiles
//! (HDR histogram), errors by kind, and the gateway's CPU seconds and peak
//! RSS read from /proc — as a human summary on stderr and JSON on stdout.
//!
//! By default each run prepares its own gateway (folder, certificates,
//! participants, subscriptions) and starts the `credgate` binary next to
//! this one; `--target` points `ingest` at a gateway already running.

mod client;
mod harness;
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
}

/// Options shared by the request-driving scenarios.
#[derive(clap::Args, Debug, Clone)]
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
}

#[derive(Subcommand, Debug, Clone)]
enum Scenario {
    /// One or N records per request over keep-alive connections.
    Ingest(Load),
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
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.scenario.clone() {
        Scenario::Ingest(load) => scenarios::ingest(load).await,
        Scenario::Fanout {
            subscriptions,
            connections,
            rate,
            duration,
        } => scenarios::fanout(subscriptions, connections, rate, duration).await,
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

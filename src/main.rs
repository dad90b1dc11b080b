//! The `credgate` command: parses the command line and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use credgate::catalog::Catalog;
use credgate::config::Config;
use credgate::participants::{Kind, Registry};

/// credgate: mTLS gateway of the provincial public credit information system.
///
/// Departments submit records against the credit information collection
/// catalog; credgate validates them and stores them durably. Start with
/// `credgate serve`: on the default config it generates development
/// certificates under certs/dev and listens on https://127.0.0.1:8443.
#[derive(Parser, Debug)]
#[command(name = "credgate", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT (SIGHUP reloads TLS files and participants).
    Serve {
        /// Configuration file; CREDGATE_SECTION__KEY environment variables override it.
        #[arg(long, short, default_value = "config/credgate.toml")]
        config: PathBuf,
    },
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Collection catalog tools.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create what is missing of the dev PKI: CA, server certificate for
    /// localhost/127.0.0.1, one client certificate per participant.
    /// Existing files are kept. For development only.
    Init {
        /// Target folder.
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        /// Participants registry whose participants get a client certificate.
        #[arg(long, default_value = "config/participants.toml")]
        participants: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CatalogCommand {
    /// Validate a catalog folder and print every problem (exit code 1 if any).
    Check {
        /// Folder with one JSON file per item.
        #[arg(default_value = "catalogs/credit")]
        dir: PathBuf,
        /// Participants registry used to check providers; skipped if the file is missing.
        #[arg(long, default_value = "config/participants.toml")]
        participants: PathBuf,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("CREDGATE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    credgate::tls::install_default_provider();
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Certs {
            command: CertsCommand::Init { dir, participants },
        } => certs_init(&dir, &participants),
        Command::Catalog {
            command: CatalogCommand::Check { dir, participants },
        } => catalog_check(&dir, &participants),
    }
}

fn serve(path: PathBuf) -> ExitCode {
    let env = std::env::vars()
        .filter(|(k, _)| k.starts_with(credgate::config::ENV_PREFIX) && k != "CREDGATE_LOG_FORMAT");
    let config = match Config::load(&path, false, env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let gateway = match credgate::Gateway::build(config.clone()).await {
            Ok(g) => std::sync::Arc::new(g),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
        let listeners = match credgate::Listeners::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone(), gateway.clone()));
        match gateway.serve(listeners, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn watch_signals(shutdown: CancellationToken, gateway: std::sync::Arc<credgate::Gateway>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match gateway.reload() {
                Ok(()) => tracing::info!("reloaded TLS material and participants"),
                Err(e) => tracing::error!(problems = ?e, "reload failed; the previous configuration stays in force"),
            },
        }
    }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}

fn certs_init(dir: &std::path::Path, participants: &std::path::Path) -> ExitCode {
    let ids = match Registry::load(participants) {
        Ok(r) => r.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
        Err(e) => {
            eprintln!("{}", e.join("\n"));
            return ExitCode::from(2);
        }
    };
    match credgate::pki::init_dir(dir, &ids) {
        Ok(written) if written.is_empty() => {
            println!(
                "nothing to do: every certificate already exists in {}",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Ok(written) => {
            for f in written {
                println!("wrote {}", f.display());
            }
            println!(
                "These certificates are for DEVELOPMENT only; see certs/README.md for production."
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn catalog_check(dir: &std::path::Path, participants: &std::path::Path) -> ExitCode {
    let registry = if participants.is_file() {
        match Registry::load(participants) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("{}", e.join("\n"));
                return ExitCode::from(2);
            }
        }
    } else {
        eprintln!(
            "note: {} not found; providers are not checked",
            participants.display()
        );
        None
    };
    let providers = |id: &str| {
        registry
            .as_ref()
            .is_none_or(|r| r.get(id).is_some_and(|p| p.kind == Kind::Department))
    };
    match Catalog::load_dir(dir, &providers) {
        Ok(catalog) => {
            for item in catalog.items() {
                println!(
                    "ok  {} v{}  {} / {}",
                    item.def.id, item.def.version, item.def.name, item.def.name_zh
                );
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{} problem(s) in {}:", errors.len(), dir.display());
            for e in errors {
                eprintln!("  - {e}");
            }
            ExitCode::FAILURE
        }
    }
}

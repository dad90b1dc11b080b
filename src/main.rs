//! The `credgate` command: parses the command line and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use credgate::catalog::{Catalog, ItemDefinition};
use credgate::config::{Config, StoreBackend};
use credgate::participants::{Kind, Registry};

/// mimalloc: the request path allocates many small, short-lived objects
/// on several threads at once, where glibc's allocator contends on its
/// arena locks (about a fifth of the request CPU in profiles).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// credgate: mTLS gateway of the provincial public credit information system.
///
/// Departments submit records against the credit information collection
/// catalog; credgate validates them, stores them durably, and routes
/// dishonesty notices to subscribed agencies (pull or signed push), each
/// redacted for its clearance. The credit office administers the catalog,
/// participants and subscriptions at run time (/admin/v1/...). Start with
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
    /// Run the gateway until SIGTERM or SIGINT (SIGHUP reloads certificates, CA bundle and CRLs).
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
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Credit review report tools.
    Review {
        #[command(subcommand)]
        command: ReviewCommand,
    },
    /// Print the OpenAPI 3.1 document (the one served at
    /// `/v1/openapi.json`) with the record schemas of the active catalog
    /// versions: the store's when it exists, else the catalog folder's.
    Openapi {
        /// Configuration of the gateway to describe.
        #[arg(long, short, default_value = "config/credgate.toml")]
        config: PathBuf,
    },
    /// Store tools.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Load historical records of one catalog item from a JSON Lines, CSV
    /// or XLSX file (双公示 column layout: Chinese or key headers). Records
    /// whose effect ended before the import are stored as ended, without
    /// notices; records still in effect notify once, marked historical.
    /// Rejected rows are listed in a report. Re-running skips what is
    /// stored, so an interrupted import completes by running it again.
    /// Exit code 0: every row stored or already there; 1: some rows
    /// rejected (see the report); 2: the import could not run.
    Import {
        /// The file: .jsonl, .csv or .xlsx.
        file: PathBuf,
        /// Catalog item of the records.
        #[arg(long)]
        item: String,
        /// The department the records are submitted as (a listed provider
        /// of the item).
        #[arg(long = "as", value_name = "DEPARTMENT")]
        department: String,
        /// Validate and report; store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rejection report (CSV); default FILE.rejected.csv.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Records per transaction.
        #[arg(long, default_value_t = 5000)]
        batch: usize,
        /// Configuration of the gateway whose store receives the records.
        #[arg(long, short, default_value = "config/credgate.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Copy an SQLite database into an empty PostgreSQL database (records,
    /// notices, deliveries, agencies' cursors, feedback, catalog versions,
    /// participants, subscriptions, endpoint health, the audit chain and
    /// its checkpoints), then verify the audit chain there. Stop the
    /// gateway first.
    Migrate {
        /// Source: `sqlite:PATH` of the database file.
        #[arg(long)]
        from: String,
        /// Target: a `postgres://` URL of an empty database.
        #[arg(long)]
        to: String,
        /// Configuration whose `privacy.secret_file` keys the audit checkpoints.
        #[arg(long, short, default_value = "config/credgate.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ReviewCommand {
    /// Verify a signed credit review report offline: exit code 0 and the
    /// report's id, subject and verdict if the signature holds; 1 if it
    /// does not (changed after signing, or another key); 2 if it cannot be
    /// checked.
    Verify {
        /// The report as the gateway answered it (JSON).
        report: PathBuf,
        /// The key set (the answer of GET /v1/credit-reviews/keys). Without
        /// it, the key of the gateway configured by --config.
        #[arg(long)]
        keys: Option<PathBuf>,
        /// Configuration whose `review.signing_key_file` holds the key.
        #[arg(long, short, default_value = "config/credgate.toml")]
        config: PathBuf,
    },
    /// Write a new report signing key (Ed25519, PKCS#8) to FILE, for
    /// `review.signing_key_file` in production. Never overwrites.
    Keygen {
        /// Target file (readable by the owner only).
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check the whole hash chain and every signed checkpoint offline;
    /// report the first broken link (exit code 1) or that all is intact.
    Verify {
        /// Configuration of the gateway whose database to check.
        #[arg(long, short, default_value = "config/credgate.toml")]
        config: PathBuf,
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
    /// Classify the changes from OLD to NEW (item files or catalog folders):
    /// exit code 0 = compatible, 1 = breaking, 2 = cannot compare.
    Diff {
        /// The current item file or catalog folder.
        old: PathBuf,
        /// The proposed item file or catalog folder.
        new: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the active catalog versions from the database into a folder,
    /// one file per item (the format `catalog check` and the seed read).
    Export {
        /// Target folder.
        dir: PathBuf,
        /// Configuration of the gateway whose database to read.
        #[arg(long, short, default_value = "config/credgate.toml")]
        config: PathBuf,
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
        Command::Catalog {
            command: CatalogCommand::Diff { old, new, json },
        } => catalog_diff(&old, &new, json),
        Command::Catalog {
            command: CatalogCommand::Export { dir, config },
        } => catalog_export(&dir, &config),
        Command::Audit {
            command: AuditCommand::Verify { config },
        } => audit_verify(&config),
        Command::Openapi { config } => openapi(&config),
        Command::Import {
            file,
            item,
            department,
            dry_run,
            report,
            batch,
            config,
        } => import(
            &config,
            credgate::import::Options {
                file,
                item,
                department,
                dry_run,
                report,
                batch,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            },
        ),
        Command::Review {
            command:
                ReviewCommand::Verify {
                    report,
                    keys,
                    config,
                },
        } => review_verify(&report, keys.as_deref(), &config),
        Command::Review {
            command: ReviewCommand::Keygen { file },
        } => match credgate::review::Signer::generate(&file) {
            Ok(()) => {
                println!("wrote a credit review signing key to {}", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Store {
            command: StoreCommand::Migrate { from, to, config },
        } => store_migrate(&from, &to, &config),
    }
}

fn store_migrate(from: &str, to: &str, config: &std::path::Path) -> ExitCode {
    let Some(path) = from.strip_prefix("sqlite:") else {
        eprintln!("--from: expected sqlite:PATH (the SQLite database file)");
        return ExitCode::from(2);
    };
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        eprintln!("--to: expected a postgres:// URL");
        return ExitCode::from(2);
    }
    let mut config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let key = match audit_key(&config) {
        Ok(k) => k,
        Err(code) => return code,
    };
    config.store.backend = credgate::config::StoreBackend::Postgres;
    config.store.url = Some(to.to_owned());
    let opts = match credgate::store::postgres::PgOptions::from_config(&config) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let migrated = runtime.block_on(credgate::store::migrate::sqlite_to_postgres(
        std::path::Path::new(path),
        opts,
        key,
    ));
    match migrated {
        Ok(m) => {
            for (table, rows) in &m.tables {
                println!("{table}: {rows} row(s)");
            }
            match &m.audit.problem {
                None => {
                    println!(
                        "audit log intact on the target: {} entries, {} checkpoint(s) verified",
                        m.audit.entries, m.audit.checkpoints
                    );
                    ExitCode::SUCCESS
                }
                Some(p) => {
                    println!("audit log BROKEN on the target: {p}");
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            eprintln!("migration failed, nothing committed: {e}");
            ExitCode::from(2)
        }
    }
}

/// Turns transparent huge pages off for this process, unless the operator
/// asked for them with mimalloc's own `MIMALLOC_ALLOW_THP=1`.
///
/// mimalloc advises the kernel to back its arenas with 2 MiB pages, so a
/// few live objects keep whole 2 MiB pages resident: 12 MB more at start
/// and about 35 MB more after a load (measured in the README's `idle`
/// scenario). The kernel checks this flag at each page fault, so it also
/// covers the arena mimalloc mapped before `main`.
fn disable_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some_and(|v| v != "0") {
        return;
    }
    #[cfg(target_os = "linux")]
    if let Err(error) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(%error, "cannot turn transparent huge pages off");
    }
}

fn serve(path: PathBuf) -> ExitCode {
    disable_transparent_huge_pages();
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
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
                Ok(()) => tracing::info!("reloaded TLS material"),
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

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    let env = std::env::vars()
        .filter(|(k, _)| k.starts_with(credgate::config::ENV_PREFIX) && k != "CREDGATE_LOG_FORMAT");
    Config::load(path, false, env).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// Reads an item file or every item of a folder, by id.
fn read_items(
    path: &std::path::Path,
) -> Result<std::collections::BTreeMap<String, ItemDefinition>, String> {
    if path.is_dir() {
        credgate::catalog::read_dir(path)
            .map(|defs| defs.into_iter().map(|(_, d)| (d.id.clone(), d)).collect())
            .map_err(|e| e.join("\n"))
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let def: ItemDefinition =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(std::collections::BTreeMap::from([(def.id.clone(), def)]))
    }
}

fn catalog_diff(old: &std::path::Path, new: &std::path::Path, json: bool) -> ExitCode {
    let (old, new) = match (read_items(old), read_items(new)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut report = serde_json::Map::new();
    let mut breaking = false;
    for (id, n) in &new {
        let diff = match old.get(id) {
            Some(o) => credgate::compat::diff(o, n),
            None => {
                let mut d = credgate::compat::Diff::default();
                d.changes.push(credgate::compat::Change {
                    field: "*".into(),
                    change: "added_item",
                    breaking: false,
                    detail: "new catalog item".into(),
                });
                d
            }
        };
        breaking |= diff.breaking;
        report.insert(id.clone(), serde_json::to_value(&diff).unwrap_or_default());
    }
    for id in old.keys().filter(|id| !new.contains_key(*id)) {
        breaking = true;
        report.insert(
            id.clone(),
            serde_json::json!({"breaking": true, "changes": [{"field": "*", "change": "removed_item", "breaking": true, "detail": "catalog item removed"}]}),
        );
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"breaking": breaking, "items": report})
        );
    } else {
        for (id, d) in &report {
            let changes = d["changes"].as_array().cloned().unwrap_or_default();
            if changes.is_empty() {
                println!("{id}: no changes");
                continue;
            }
            println!("{id}:");
            for c in changes {
                println!(
                    "  {} {:<28} {:<24} {}",
                    if c["breaking"] == true {
                        "BREAKING  "
                    } else {
                        "compatible"
                    },
                    c["change"].as_str().unwrap_or(""),
                    c["field"].as_str().unwrap_or(""),
                    c["detail"].as_str().unwrap_or("")
                );
            }
        }
        println!(
            "{}",
            if breaking {
                "result: BREAKING (activation needs \"force\": true and a reason)"
            } else {
                "result: compatible"
            }
        );
    }
    if breaking {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn catalog_export(dir: &std::path::Path, config: &std::path::Path) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let items = match credgate::store::active_items_of(&config) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("{}: {e}", dir.display());
        return ExitCode::from(2);
    }
    for item in items {
        let id = item["id"].as_str().unwrap_or("item").to_owned();
        let path = dir.join(format!("{id}.json"));
        let text = serde_json::to_string_pretty(&item).unwrap_or_default() + "\n";
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(2);
        }
        println!("wrote {} (v{})", path.display(), item["version"]);
    }
    ExitCode::SUCCESS
}

fn openapi(config: &std::path::Path) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let all = |_: &str| true;
    let stored = match config.store.backend {
        StoreBackend::Sqlite if !config.database_path().exists() => None,
        _ => credgate::store::active_items_of(&config)
            .map_err(|e| eprintln!("note: the active catalog could not be read ({e}); describing the catalog folder"))
            .ok()
            .filter(|items| !items.is_empty()),
    };
    let catalog = match stored {
        Some(items) => {
            let defs: Result<Vec<_>, String> = items
                .into_iter()
                .map(|v| {
                    let origin = format!("store item {}", v["id"]);
                    serde_json::from_value(v)
                        .map(|d| (origin.clone(), d))
                        .map_err(|e| format!("{origin}: {e}"))
                })
                .collect();
            defs.map_err(|e| vec![e])
                .and_then(|defs| Catalog::compile_all(defs, &all))
        }
        None => Catalog::load_dir(&config.catalog.dir, &all),
    };
    match catalog {
        Ok(catalog) => {
            let doc = credgate::http::openapi::document(&catalog, &config.limits);
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", e.join("\n"));
            ExitCode::from(2)
        }
    }
}

fn import(config: &std::path::Path, opts: credgate::import::Options) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let started = std::time::Instant::now();
    match credgate::import::run(&config, &opts) {
        Ok(s) => {
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{}{} rows in {secs:.1} s ({:.0} rows/s): {} stored ({} already ended, {} with a notice), {} already stored, {} rejected",
                if opts.dry_run { "dry run, nothing stored: " } else { "" },
                s.rows,
                s.rows as f64 / secs.max(1e-9),
                s.stored,
                s.ended,
                s.notified,
                s.duplicates,
                s.rejected
            );
            if s.rejected > 0 {
                println!("rejected rows are listed in {}", s.report.display());
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("import failed: {e}");
            ExitCode::from(2)
        }
    }
}

/// The audit checkpoint key, from the configured gateway secret.
fn audit_key(config: &Config) -> Result<Vec<u8>, ExitCode> {
    match std::fs::read_to_string(&config.privacy.secret_file) {
        Ok(s) => Ok(credgate::audit::checkpoint_key(s.trim().as_bytes())),
        Err(e) => {
            eprintln!(
                "privacy.secret_file: {}: {e}",
                config.privacy.secret_file.display()
            );
            Err(ExitCode::from(2))
        }
    }
}

fn review_verify(
    report: &std::path::Path,
    keys: Option<&std::path::Path>,
    config: &std::path::Path,
) -> ExitCode {
    use credgate::review::{KeySet, Signer, VerifyError};
    let keys: KeySet = match keys {
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(k) => k,
            Err(e) => {
                eprintln!("--keys: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match Signer::load(&config.review.signing_key_file) {
                Ok(s) => KeySet {
                    keys: vec![s.public_key()],
                },
                Err(e) => {
                    eprintln!("review.signing_key_file: {e} (or give --keys)");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let document = match std::fs::read(report) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{}: {e}", report.display());
            return ExitCode::from(2);
        }
    };
    match credgate::review::verify(&document, &keys) {
        Ok(r) => {
            println!(
                "signature valid: report {} issued {} to {} ({}), restricted: {}",
                r["report_id"].as_str().unwrap_or("?"),
                r["issued_at"].as_str().unwrap_or("?"),
                r["requested_by"]["id"].as_str().unwrap_or("?"),
                r["purpose"].as_str().unwrap_or("?"),
                r["restricted"],
            );
            ExitCode::SUCCESS
        }
        Err(e @ (VerifyError::BadSignature | VerifyError::UnknownKey(_))) => {
            println!("signature INVALID: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn audit_verify(config: &std::path::Path) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let key = match audit_key(&config) {
        Ok(k) => k,
        Err(code) => return code,
    };
    match credgate::store::verify_audit_of(&config, &key) {
        Ok(report) => match &report.problem {
            None => {
                println!(
                    "audit log intact: {} entries, {} checkpoint(s) verified",
                    report.entries, report.checkpoints
                );
                ExitCode::SUCCESS
            }
            Some(problem) => {
                println!(
                    "audit log BROKEN after checking {} entries: {problem}",
                    report.entries
                );
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

//! `credgate import`: loads historical records of one catalog item from a
//! JSON Lines, CSV or XLSX file through the submission use case, in the
//! historical mode of [`Ingest::prepare_historical`].
//!
//! - CSV and XLSX use the national 双公示 column layout: a header row of the
//!   items' official Chinese field names (`x-zh`) or their keys; enumerated
//!   values may be written as their Chinese labels; dates as `YYYY-MM-DD`
//!   or `YYYY/MM/DD` (spreadsheet dates too).
//! - Rows are validated, deduplicated and stored in batches, each batch one
//!   transaction. A re-run skips what is stored (by natural key): an
//!   interrupted import is completed by running it again.
//! - Rejected rows go to a report (CSV: row, pointer, code, message; never
//!   a field value).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::catalog::{CatalogItem, Finding};
use crate::config::Config;
use crate::ingest::Ingest;
use crate::participants::{Kind, Participant};

/// What to import and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The file (`.jsonl`/`.ndjson`, `.csv`, `.xlsx`).
    pub file: PathBuf,
    /// Catalog item of every row.
    pub item: String,
    /// The department the records are submitted as.
    pub department: String,
    /// Validate and report only; store nothing.
    pub dry_run: bool,
    /// Rejection report; default `FILE.rejected.csv`.
    pub report: Option<PathBuf>,
    /// Rows per batch (one transaction each).
    pub batch: usize,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Data rows read.
    pub rows: u64,
    /// Newly stored records.
    pub stored: u64,
    /// Of those, stored as already ended (no notice).
    pub ended: u64,
    /// Of those, with a notice (marked historical).
    pub notified: u64,
    /// Rows already stored (an earlier run, or twice in the file).
    pub duplicates: u64,
    /// Rows refused (listed in the report).
    pub rejected: u64,
    /// Where the rejections are listed.
    pub report: PathBuf,
}

/// One data row: its number in the file (1 = first data row) and the
/// record, or why it could not be read.
type Row = (u64, Result<Map<String, Value>, Finding>);

/// How file columns and cells become record fields.
struct Columns {
    /// Field key by header (key or official Chinese name).
    by_header: HashMap<String, String>,
    /// Per field: its schema (for types, formats and labels).
    schemas: HashMap<String, Value>,
}

impl Columns {
    fn of(item: &CatalogItem) -> Columns {
        let props = item.def.schema["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut by_header = HashMap::new();
        for (key, p) in &props {
            by_header.insert(key.clone(), key.clone());
            if let Some(zh) = p.get("x-zh").and_then(Value::as_str) {
                by_header.insert(zh.to_owned(), key.clone());
            }
        }
        if let Some(r) = &item.def.removal {
            for (key, p) in r.schema["properties"].as_object().into_iter().flatten() {
                by_header.insert(key.clone(), key.clone());
                if let Some(zh) = p.get("x-zh").and_then(Value::as_str) {
                    by_header.insert(zh.to_owned(), key.clone());
                }
            }
        }
        let mut schemas: HashMap<String, Value> = props.into_iter().collect();
        if let Some(r) = &item.def.removal {
            for (k, v) in r.schema["properties"].as_object().into_iter().flatten() {
                schemas.insert(k.clone(), v.clone());
            }
        }
        Columns { by_header, schemas }
    }

    /// The field of each header (`None`: not a field of the item).
    fn map_headers(&self, headers: &[String]) -> Vec<Option<String>> {
        headers
            .iter()
            .map(|h| {
                self.by_header
                    .get(h.trim().trim_start_matches('\u{feff}'))
                    .cloned()
            })
            .collect()
    }

    /// A cell's text as the field's JSON value; `Err` names the fault.
    fn value(&self, field: &str, text: &str) -> Result<Value, (&'static str, &'static str)> {
        let schema = self.schemas.get(field);
        let ty = schema.and_then(|s| s.get("type")).and_then(Value::as_str);
        let label = |t: &str| -> String {
            schema
                .and_then(|s| s.get("x-enum-zh"))
                .and_then(Value::as_object)
                .and_then(|labels| {
                    labels
                        .iter()
                        .find(|(_, zh)| zh.as_str() == Some(t))
                        .map(|(k, _)| k.clone())
                })
                .unwrap_or_else(|| t.to_owned())
        };
        match ty {
            Some("number") | Some("integer") => text
                .replace(',', "")
                .parse::<f64>()
                .ok()
                .and_then(|n| serde_json::Number::from_f64(n).map(Value::Number))
                .ok_or(("invalid_number", "must be a number")),
            Some("array") => Ok(Value::Array(
                text.split(['、', ',', '，', ';', '；'])
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| Value::String(label(t)))
                    .collect(),
            )),
            _ if schema.and_then(|s| s.get("format")).and_then(Value::as_str) == Some("date") => {
                Ok(Value::String(iso_date(text)))
            }
            _ => Ok(Value::String(label(text))),
        }
    }

    /// A row of cells as a record.
    fn record(
        &self,
        fields: &[Option<String>],
        cells: &[String],
    ) -> Result<Map<String, Value>, Finding> {
        let mut record = Map::new();
        for (field, cell) in fields.iter().zip(cells) {
            let (Some(field), text) = (field, cell.trim()) else {
                continue;
            };
            if text.is_empty() {
                continue;
            }
            let value = self.value(field, text).map_err(|(code, message)| Finding {
                pointer: format!("/{}", crate::catalog::escape_pointer(field)),
                code: code.into(),
                message: message.into(),
            })?;
            record.insert(field.clone(), value);
        }
        Ok(record)
    }

    /// Dates of a JSON record in the exchange files' `YYYY/MM/DD`.
    fn normalise_dates(&self, record: &mut Map<String, Value>) {
        for (field, value) in record.iter_mut() {
            let is_date = self
                .schemas
                .get(field)
                .and_then(|s| s.get("format"))
                .and_then(Value::as_str)
                == Some("date");
            if let (true, Value::String(s)) = (is_date, &*value) {
                *value = Value::String(iso_date(s));
            }
        }
    }
}

/// `YYYY/MM/DD`, `YYYY-M-D` or `YYYY.MM.DD` as `YYYY-MM-DD`; anything
/// else unchanged (validation then explains it).
fn iso_date(text: &str) -> String {
    let parts: Vec<&str> = text.trim().split(['/', '-', '.']).collect();
    match parts.as_slice() {
        [y, m, d]
            if y.len() == 4
                && (1..=2).contains(&m.len())
                && (1..=2).contains(&d.len())
                && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())) =>
        {
            format!("{y}-{m:0>2}-{d:0>2}")
        }
        _ => text.trim().to_owned(),
    }
}

/// A spreadsheet cell as text (dates as `YYYY-MM-DD`).
fn cell_text(cell: &calamine::Data) -> String {
    use calamine::Data;
    match cell {
        Data::Empty | Data::Error(_) => String::new(),
        Data::String(s) | Data::DateTimeIso(s) | Data::DurationIso(s) => s.clone(),
        Data::Int(i) => i.to_string(),
        Data::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", *f as i64),
        Data::Float(f) => f.to_string(),
        Data::Bool(b) => b.to_string(),
        Data::DateTime(d) => {
            // Days since 1899-12-30 (the spreadsheet epoch).
            let epoch = time::macros::date!(1899 - 12 - 30);
            (epoch + time::Duration::days(d.as_f64().floor() as i64)).to_string()
        }
    }
}

/// The rows of a file, by its extension, read as they are consumed
/// (a spreadsheet is read whole), and the headers that are no field.
type Rows = Box<dyn Iterator<Item = Row> + Send>;

fn read_rows(path: &Path, columns: Arc<Columns>) -> Result<(Rows, Vec<String>), String> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let open = || std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()));
    let shown = path.display().to_string();
    match ext.as_str() {
        "jsonl" | "ndjson" | "json" => {
            let lines = BufReader::new(open()?).lines().enumerate();
            let rows = lines.filter_map(move |(i, line)| {
                let row = match line {
                    Ok(l) if l.trim().is_empty() => return None,
                    Ok(l) => match serde_json::from_str::<Value>(&l) {
                        Ok(Value::Object(mut record)) => {
                            columns.normalise_dates(&mut record);
                            Ok(record)
                        }
                        _ => Err(unreadable("invalid_json", "the line is not a JSON object")),
                    },
                    Err(_) => Err(unreadable("invalid_text", "the line is not UTF-8 text")),
                };
                Some((i as u64 + 1, row))
            });
            Ok((Box::new(rows), Vec::new()))
        }
        "csv" => {
            let mut reader = csv::ReaderBuilder::new()
                .flexible(true)
                .from_reader(open()?);
            let headers: Vec<String> = reader
                .headers()
                .map_err(|e| format!("{shown}: {e}"))?
                .iter()
                .map(str::to_owned)
                .collect();
            let fields = columns.map_headers(&headers);
            let ignored = unmapped(&headers, &fields);
            let rows = reader.into_records().enumerate().map(move |(i, rec)| {
                let row = match rec {
                    Ok(r) => {
                        let cells: Vec<String> = r.iter().map(str::to_owned).collect();
                        columns.record(&fields, &cells)
                    }
                    Err(_) => Err(unreadable("invalid_csv", "the row cannot be read as CSV")),
                };
                (i as u64 + 1, row)
            });
            Ok((Box::new(rows), ignored))
        }
        "xlsx" | "xlsm" | "xls" | "ods" => {
            use calamine::Reader;
            let mut book =
                calamine::open_workbook_auto(path).map_err(|e| format!("{shown}: {e}"))?;
            let range = book
                .worksheet_range_at(0)
                .ok_or_else(|| format!("{shown}: the workbook has no sheet"))?
                .map_err(|e| format!("{shown}: {e}"))?;
            let mut sheet = range.rows();
            let headers: Vec<String> = sheet
                .next()
                .unwrap_or_default()
                .iter()
                .map(cell_text)
                .collect();
            let fields = columns.map_headers(&headers);
            let ignored = unmapped(&headers, &fields);
            let rows: Vec<Row> = sheet
                .enumerate()
                .filter(|(_, cells)| cells.iter().any(|c| !matches!(c, calamine::Data::Empty)))
                .map(|(i, cells)| {
                    let cells: Vec<String> = cells.iter().map(cell_text).collect();
                    (i as u64 + 1, columns.record(&fields, &cells))
                })
                .collect();
            Ok((Box::new(rows.into_iter()), ignored))
        }
        _ => Err(format!(
            "{shown}: unknown file type; use .jsonl (JSON Lines), .csv or .xlsx"
        )),
    }
}

fn unreadable(code: &str, message: &str) -> Finding {
    Finding {
        pointer: String::new(),
        code: code.into(),
        message: message.into(),
    }
}

/// Data rows of a text file (lines less the header), for the progress bar.
fn count_rows(path: &Path, header: bool) -> u64 {
    let Ok(file) = std::fs::File::open(path) else {
        return 0;
    };
    let lines = BufReader::new(file)
        .split(b'\n')
        .filter(|l| {
            l.as_ref()
                .is_ok_and(|l| !l.iter().all(u8::is_ascii_whitespace))
        })
        .count() as u64;
    lines.saturating_sub(u64::from(header))
}

fn unmapped(headers: &[String], fields: &[Option<String>]) -> Vec<String> {
    headers
        .iter()
        .zip(fields)
        .filter(|(h, f)| f.is_none() && !h.trim().is_empty())
        .map(|(h, _)| h.trim().to_owned())
        .collect()
}

/// The answer of one batch, as the submission use case writes it.
#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<ResultRow>,
}

#[derive(Deserialize)]
struct ResultRow {
    index: usize,
    status: String,
    #[serde(default)]
    notice_id: Option<String>,
    #[serde(default)]
    ended: Option<String>,
    #[serde(default)]
    errors: Vec<Finding>,
}

/// The record's own pointer: `/records/7/uscc` → `/uscc`.
fn own_pointer(p: &str) -> String {
    let rest = p.strip_prefix("/records/").unwrap_or(p);
    match rest.find('/') {
        Some(i) => rest[i..].to_owned(),
        None if p.starts_with("/records/") => String::new(),
        None => rest.to_owned(),
    }
}

/// Runs an import against the configured store.
pub fn run(config: &Config, opts: &Options) -> Result<Summary, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(run_async(config, opts))
}

async fn run_async(config: &Config, opts: &Options) -> Result<Summary, String> {
    let secret = crate::server::load_secret(&config.privacy.secret_file)?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let store = crate::store::open(
        config,
        crate::audit::checkpoint_key(&secret),
        metrics.clone(),
    )
    .await?;
    // Nothing is seeded: the store's own control plane is authoritative.
    let state = store
        .seed_control(Vec::new(), Vec::new(), Vec::new())
        .await
        .map_err(|e| format!("store: {e}"))?;
    if state.items.is_empty() {
        return Err("the store holds no catalog yet: start the gateway once (credgate serve) so it stores the catalog, participants and subscriptions".into());
    }
    let control = crate::control::Control::from_state(
        store.clone(),
        Arc::new(crate::sealed::Sealer::new(&secret)),
        state.items,
        state.participants,
        state.subscriptions,
    )
    .map_err(|e| e.join("; "))?;
    let who: Participant = match control.registry.load().get(&opts.department) {
        Some(p) if p.kind == Kind::Department && p.enabled => p.as_ref().clone(),
        Some(_) => {
            return Err(format!(
                "--as: {} is not an enabled department",
                opts.department
            ))
        }
        None => return Err(format!("--as: no participant {}", opts.department)),
    };
    let item = control
        .catalog
        .load()
        .get(&opts.item)
        .cloned()
        .ok_or_else(|| {
            format!(
                "--item: no catalog item {} (GET /v1/catalog lists them)",
                opts.item
            )
        })?;
    let columns = Arc::new(Columns::of(&item));
    let (rows, ignored) = read_rows(&opts.file, columns)?;
    let csv = opts
        .file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let total = count_rows(&opts.file, csv);
    if !ignored.is_empty() {
        eprintln!(
            "columns that are no field of {} are ignored: {}",
            opts.item,
            ignored.join(", ")
        );
    }
    let limits = crate::config::LimitsConfig {
        max_batch_records: opts.batch.max(1),
        ..config.limits.clone()
    };
    let ingest = Arc::new(Ingest::new(
        &control.active(),
        store.clone(),
        Arc::new(crate::redact::Redactor::new(
            config.privacy.redaction.clone(),
            secret,
        )),
        limits,
        metrics,
        Arc::new(crate::subjects::SubjectCache::disabled()),
        config.public.rule_set.clone(),
    ));
    let report_path = opts.report.clone().unwrap_or_else(|| {
        let mut p = opts.file.clone().into_os_string();
        p.push(".rejected.csv");
        PathBuf::from(p)
    });
    let mut report = csv::Writer::from_path(&report_path)
        .map_err(|e| format!("{}: {e}", report_path.display()))?;
    report
        .write_record(["row", "pointer", "code", "message"])
        .map_err(|e| e.to_string())?;
    let bar = if opts.progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} rows · {per_sec} · ETA {eta}",
        )
        .map_err(|e| e.to_string())?,
    );
    let today = crate::codes::today_cst();
    let mut summary = Summary {
        report: report_path.clone(),
        ..Summary::default()
    };
    // Batches are prepared (CPU) and committed a few at a time; their
    // results are reported in file order.
    let mut batches = rows.into_iter().peekable();
    let mut inflight = std::collections::VecDeque::new();
    let width = std::thread::available_parallelism().map_or(2, |n| n.get()) + 2;
    loop {
        while inflight.len() < width && batches.peek().is_some() {
            let chunk: Vec<Row> = batches.by_ref().take(opts.batch.max(1)).collect();
            let (ingest, who, item_id, dry_run) =
                (ingest.clone(), who.clone(), opts.item.clone(), opts.dry_run);
            inflight.push_back(tokio::spawn(async move {
                import_batch(&ingest, &who, &item_id, chunk, today, dry_run).await
            }));
        }
        let Some(next) = inflight.pop_front() else {
            break;
        };
        let outcome = next.await.map_err(|e| e.to_string())??;
        for (row, finding) in &outcome.rejections {
            report
                .write_record([
                    row.to_string(),
                    finding.pointer.clone(),
                    finding.code.clone(),
                    finding.message.clone(),
                ])
                .map_err(|e| e.to_string())?;
        }
        summary.stored += outcome.stored;
        summary.ended += outcome.ended;
        summary.notified += outcome.notified;
        summary.duplicates += outcome.duplicates;
        summary.rejected += outcome.rejected;
        summary.rows += outcome.rows;
        bar.inc(outcome.rows);
    }
    report.flush().map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    store.close().await;
    Ok(summary)
}

/// What one batch did.
#[derive(Default)]
struct BatchOutcome {
    rows: u64,
    stored: u64,
    ended: u64,
    notified: u64,
    duplicates: u64,
    rejected: u64,
    rejections: Vec<(u64, Finding)>,
}

async fn import_batch(
    ingest: &Ingest,
    who: &Participant,
    item: &str,
    rows: Vec<Row>,
    today: time::Date,
    dry_run: bool,
) -> Result<BatchOutcome, String> {
    let mut out = BatchOutcome {
        rows: rows.len() as u64,
        ..BatchOutcome::default()
    };
    let mut numbers = Vec::with_capacity(rows.len());
    let mut records = Vec::with_capacity(rows.len());
    for (n, row) in rows {
        match row {
            Ok(r) => {
                numbers.push(n);
                records.push(Value::Object(r));
            }
            Err(f) => {
                out.rejected += 1;
                out.rejections.push((n, f));
            }
        }
    }
    if records.is_empty() {
        return Ok(out);
    }
    // Built in place: `json!` would copy every record through `to_value`.
    let doc = Value::Object(Map::from_iter([
        ("item".to_owned(), Value::String(item.to_owned())),
        ("records".to_owned(), Value::Array(records)),
    ]));
    let prepared = ingest
        .prepare_historical(who, doc, today)
        .map_err(|p| format!("{}: {}", p.code, p.detail))?;
    let answer = if dry_run {
        ingest.check(prepared).await
    } else {
        ingest.commit(prepared).await.map(|a| a.body)
    }
    .map_err(|p| format!("{}: {}", p.code, p.detail))?;
    let answer: BatchAnswer = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
    for r in answer.results {
        let row = numbers.get(r.index).copied().unwrap_or_default();
        match r.status.as_str() {
            "accepted" => {
                out.stored += 1;
                out.ended += u64::from(r.ended.is_some());
                out.notified += u64::from(r.notice_id.is_some());
            }
            "duplicate" => out.duplicates += 1,
            _ => {
                out.rejected += 1;
                for f in r.errors {
                    out.rejections.push((
                        row,
                        Finding {
                            pointer: own_pointer(&f.pointer),
                            ..f
                        },
                    ));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_dates_and_pointers_are_normalised() {
        assert_eq!(iso_date("2026/3/7"), "2026-03-07");
        assert_eq!(iso_date("2026-10-15"), "2026-10-15");
        assert_eq!(iso_date("2026.10.15"), "2026-10-15");
        assert_eq!(iso_date("15/10/2026"), "15/10/2026");
        assert_eq!(own_pointer("/records/12/uscc"), "/uscc");
        assert_eq!(own_pointer("/records/12"), "");
    }
}

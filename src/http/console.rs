//! The administration console at `/console/`: server-rendered pages for
//! the credit office, in Chinese first (English with `?lang=en`, kept in a
//! cookie). The pages read what the admin API reads; every change is made
//! by the page's script calling the admin API itself (same origin, the same
//! client certificate), so the console can do nothing the API cannot and
//! shows the API's problem details next to the field at fault. Only
//! administrators reach these routes (checked centrally, as for `/admin/`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use minijinja::context;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::AppState;
use crate::error::Problem;
use crate::store::DeliveryState;

/// The console's texts, `[zh]` and `[en]` (same keys; a test checks).
static TEXT: LazyLock<BTreeMap<String, BTreeMap<String, String>>> = LazyLock::new(|| {
    toml::from_str(include_str!("../../templates/console/text.toml")).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the console texts do not parse");
        BTreeMap::new()
    })
});

/// Languages the console speaks; the first is the default.
const LANGS: [&str; 2] = ["zh", "en"];
const LANG_COOKIE: &str = "credgate_console_lang";

/// Query every console page takes.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LangQuery {
    /// `zh` (default) or `en`; remembered in a cookie.
    #[param(pattern = "^(zh|en)$")]
    lang: Option<String>,
}

/// The page language: `?lang=`, else the cookie, else Chinese.
fn language(query: Option<&str>, headers: &HeaderMap) -> &'static str {
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == LANG_COOKIE)
        .map(|(_, v)| v);
    query
        .into_iter()
        .chain(cookie)
        .find_map(|l| LANGS.iter().find(|x| **x == l).copied())
        .unwrap_or(LANGS[0])
}

/// A rendered console page, remembering the language asked for.
fn page(
    template: &str,
    lang: &'static str,
    remember: bool,
    nav: &str,
    ctx: minijinja::Value,
) -> Result<Response, Problem> {
    let t = TEXT.get(lang).cloned().unwrap_or_default();
    let html = super::pages::render(
        template,
        context! { t => t, lang => lang, nav => nav, ..ctx },
    )?;
    let mut resp = super::pages::html_response(StatusCode::OK, html);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    if remember {
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{LANG_COOKIE}={lang}; Path=/console/; Secure; HttpOnly; SameSite=Strict; Max-Age=31536000"
        )) {
            h.insert(header::SET_COOKIE, v);
        }
    }
    Ok(resp)
}

/// Pages load their script and style from `/console/assets/` only; the
/// script talks to this origin only; no frame may hold them.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The page language and whether `?lang=` asked for it (to remember);
/// a language the console does not speak is a bad query.
fn lang_of(lang: Option<&str>, headers: &HeaderMap) -> Result<(&'static str, bool), Problem> {
    match lang {
        Some(l) if !LANGS.contains(&l) => Err(bad_query("lang is zh or en")),
        _ => Ok((language(lang, headers), lang.is_some())),
    }
}

// === exchange at a glance ===

/// Query of the overview.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OverviewQuery {
    /// `zh` (default) or `en`.
    #[param(pattern = "^(zh|en)$")]
    lang: Option<String>,
    /// Days back from now (1-366, default 30).
    #[param(minimum = 1, maximum = 366)]
    days: Option<u16>,
}

/// Acceptance and timeliness targets the departments are scored on.
const ACCEPTANCE_TARGET: f64 = 0.95;
const TIMELINESS_TARGET: f64 = 0.95;

/// One department's row group on the overview.
#[derive(Debug, Serialize)]
struct DepartmentView {
    id: String,
    name: String,
    items: Vec<Value>,
    missed: bool,
}

/// `GET /console/`: records per department and item per day, acceptance
/// and timeliness against their targets, notices, deliveries, feedback and
/// credit reviews per agency, and the audit chain's state.
#[utoipa::path(get, path = "/console/", tag = "console", params(OverviewQuery),
    responses(
        (status = 200, description = "The overview page", content_type = "text/html"),
        (status = 400, description = "`invalid_query`: a parameter is not valid", content_type = "text/html"),
    ))]
pub async fn overview(
    State(state): State<Arc<AppState>>,
    query: Result<Query<OverviewQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|_| bad_query("allowed parameters: lang=zh|en, days=1-366"))?;
    let (lang, remember) = lang_of(q.lang.as_deref(), &headers)?;
    let days = q.days.unwrap_or(30);
    if !(1..=366).contains(&days) {
        return Err(bad_query("days is 1-366"));
    }
    let figures = state.console_figures.get(&state.ingest.store, days).await?;
    let to = figures.at;
    let departments = figures.departments.clone();
    let agencies = figures.agencies.clone();
    let registry = state.registry.load();
    let name = |id: &str| {
        registry.get(id).map_or_else(
            || id.to_owned(),
            |p| {
                if lang == "zh" {
                    p.name_zh.clone()
                } else {
                    p.name.clone()
                }
            },
        )
    };
    let catalog = state.control.catalog.load();
    let item_name = |id: &str| {
        catalog.get(id).map_or_else(
            || id.to_owned(),
            |i| {
                if lang == "zh" {
                    i.def.name_zh.clone()
                } else {
                    i.def.name.clone()
                }
            },
        )
    };
    // Day columns of the chart, oldest first (China Standard Time).
    let cst = time::UtcOffset::from_hms(8, 0, 0).unwrap_or(time::UtcOffset::UTC);
    let last = to.to_offset(cst).date();
    let day_list: Vec<String> = (0..i64::from(days))
        .rev()
        .map(|back| (last - time::Duration::days(back)).to_string())
        .collect();
    let mut by_dept: BTreeMap<String, DepartmentView> = BTreeMap::new();
    for s in departments {
        let counts: HashMap<&str, (u64, u64)> = s
            .daily
            .iter()
            .map(|d| (d.date.as_str(), (d.accepted, d.rejected)))
            .collect();
        let series: Vec<(u64, u64)> = day_list
            .iter()
            .map(|d| counts.get(d.as_str()).copied().unwrap_or_default())
            .collect();
        let acceptance_missed = s.submitted > 0 && s.acceptance_rate < ACCEPTANCE_TARGET;
        let timeliness_missed = s
            .within_7_working_days
            .is_some_and(|w| w < TIMELINESS_TARGET);
        let view = by_dept
            .entry(s.department.clone())
            .or_insert_with(|| DepartmentView {
                id: s.department.clone(),
                name: name(&s.department),
                items: Vec::new(),
                missed: false,
            });
        view.missed |= acceptance_missed || timeliness_missed;
        view.items.push(json!({
            "id": s.item,
            "name": item_name(&s.item),
            "submitted": s.submitted,
            "accepted": s.accepted,
            "rejected": s.rejected,
            "acceptance": percent(s.acceptance_rate),
            "acceptance_missed": acceptance_missed,
            "within_7": s.within_7_working_days.map(percent),
            "timeliness_missed": timeliness_missed,
            "median_days": s.timeliness_median_days,
            "rejected_by_code": s.rejected_by_code,
            "chart": bars(&series),
        }));
    }
    let agencies: Vec<Value> = agencies
        .into_iter()
        .map(|a| {
            let state_count = |k: &str| a.deliveries.get(k).copied().unwrap_or(0);
            json!({
                "id": a.agency,
                "name": name(&a.agency),
                "notices": a.notices,
                "delivered": state_count("delivered"),
                "waiting": state_count("pending") + state_count("inflight"),
                "dead": state_count("dead"),
                "feedback": percent(a.feedback_rate),
                "with_feedback": a.with_feedback,
                "reviews": a.reviews,
            })
        })
        .collect();
    page(
        "console/overview.html",
        lang,
        remember,
        "overview",
        context! {
            days => days,
            first_day => day_list.first(),
            last_day => day_list.last(),
            departments => by_dept.into_values().collect::<Vec<_>>(),
            agencies => agencies,
            audit => state.audit_check.latest(),
            figures_at => figures.at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            acceptance_target => percent(ACCEPTANCE_TARGET),
            timeliness_target => percent(TIMELINESS_TARGET),
        },
    )
}

/// The overview's figures of one period, as computed at `at`.
pub struct Snapshot {
    /// When they were computed.
    pub at: OffsetDateTime,
    /// How long computing them took.
    pub took: std::time::Duration,
    /// Records the figures count.
    records: u64,
    departments: Vec<crate::store::DepartmentStats>,
    agencies: Vec<crate::store::AgencyFeedbackStats>,
}

/// The overview's figures per period. While a period holds fewer than
/// [`LARGE`] records they are computed for every page (tens of
/// milliseconds at most); beyond, the page shows the last snapshot (its
/// time on the page) and a snapshot older than [`MAX_AGE`] is recomputed
/// in the background, so the page stays fast however many records there
/// are. Decided by the records counted, not by time taken, so a busy
/// machine does not make a small store's page stale.
pub struct Figures {
    snapshots: moka::sync::Cache<u16, Arc<Snapshot>>,
    refreshing: std::sync::Mutex<std::collections::HashSet<u16>>,
}

/// Periods with fewer records than this are computed for every page.
const LARGE: u64 = 10_000;
/// A snapshot older than this is recomputed in the background.
const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for Figures {
    fn default() -> Self {
        Figures {
            snapshots: moka::sync::Cache::new(16),
            refreshing: std::sync::Mutex::new(Default::default()),
        }
    }
}

impl Figures {
    /// The figures of the last `days` days.
    pub async fn get(
        self: &Arc<Self>,
        store: &Arc<dyn crate::store::Store>,
        days: u16,
    ) -> Result<Arc<Snapshot>, Problem> {
        if let Some(s) = self.snapshots.get(&days) {
            if s.records >= LARGE {
                let age = OffsetDateTime::now_utc() - s.at;
                if age > MAX_AGE && self.start_refresh(days) {
                    let (this, store) = (self.clone(), store.clone());
                    tokio::spawn(async move {
                        if let Err(e) = this.compute(&store, days).await {
                            tracing::warn!(error = %e.detail, "console figures not refreshed");
                        }
                        this.end_refresh(days);
                    });
                }
                return Ok(s);
            }
        }
        self.compute(store, days).await
    }

    /// Computes the figures of the last `days` days now and keeps them.
    pub async fn compute(
        &self,
        store: &Arc<dyn crate::store::Store>,
        days: u16,
    ) -> Result<Arc<Snapshot>, Problem> {
        let started = std::time::Instant::now();
        let to = OffsetDateTime::now_utc();
        let from = to - time::Duration::days(i64::from(days));
        let (departments, agencies) = tokio::try_join!(
            store.department_stats(from, to),
            store.feedback_stats(from, to)
        )?;
        let snapshot = Arc::new(Snapshot {
            at: to,
            took: started.elapsed(),
            records: departments.iter().map(|d| d.submitted).sum(),
            departments,
            agencies,
        });
        self.snapshots.insert(days, snapshot.clone());
        Ok(snapshot)
    }

    fn start_refresh(&self, days: u16) -> bool {
        self.refreshing.lock().is_ok_and(|mut r| r.insert(days))
    }

    fn end_refresh(&self, days: u16) {
        if let Ok(mut r) = self.refreshing.lock() {
            r.remove(&days);
        }
    }
}

fn percent(share: f64) -> String {
    format!("{:.1} %", share * 100.0)
}

/// A bar chart of `(accepted, rejected)` per day as SVG rectangles
/// (x, heights), drawn by the template with presentation attributes only
/// (the page's policy allows no inline style).
fn bars(series: &[(u64, u64)]) -> Value {
    const HEIGHT: f64 = 40.0;
    let max = series.iter().map(|(a, r)| a + r).max().unwrap_or(0).max(1) as f64;
    let width = 6;
    let rects: Vec<Value> = series
        .iter()
        .enumerate()
        .filter(|(_, (a, r))| a + r > 0)
        .map(|(i, (a, r))| {
            let ha = (*a as f64 / max * HEIGHT).round();
            let hr = (*r as f64 / max * HEIGHT)
                .round()
                .max(if *r > 0 { 1.0 } else { 0.0 });
            json!({"x": i * width, "accepted": ha, "rejected": hr,
                   "y_accepted": HEIGHT - ha, "y_rejected": HEIGHT - ha - hr,
                   "total": a + r})
        })
        .collect();
    json!({"width": series.len() * width, "height": HEIGHT, "bars": rects})
}

// === catalog ===

/// `GET /console/catalog`: the items and their versions.
#[utoipa::path(get, path = "/console/catalog", tag = "console", params(LangQuery),
    responses(
        (status = 200, description = "The catalog page", content_type = "text/html"),
        (status = 400, description = "`invalid_query`: a parameter is not valid", content_type = "text/html"),
    ))]
pub async fn catalog(
    State(state): State<Arc<AppState>>,
    query: Result<Query<LangQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|_| bad_query("the only parameter is lang=zh|en"))?;
    let (lang, remember) = lang_of(q.lang.as_deref(), &headers)?;
    let catalog = state.control.catalog.load_full();
    let mut items = Vec::new();
    for item in catalog.items() {
        let versions = state.ingest.store.item_versions(&item.def.id).await?;
        items.push(json!({
            "id": item.def.id, "name": item.def.name, "name_zh": item.def.name_zh,
            "active_version": item.def.version, "versions": versions.len(),
            "fields": item.def.schema.get("properties").and_then(Value::as_object).map_or(0, |p| p.len()),
            "providers": item.def.providers,
        }));
    }
    page(
        "console/catalog.html",
        lang,
        remember,
        "catalog",
        context! { items => items },
    )
}

/// The field table of a definition: name, Chinese name, type, class,
/// required, in schema order.
fn fields(def: &Value) -> Vec<Value> {
    let required: Vec<&str> = def["schema"]["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    def["schema"]["properties"]
        .as_object()
        .map(|props| {
            props
                .iter()
                .map(|(name, f)| {
                    let kind = f.get("type").cloned().unwrap_or_else(|| {
                        if f.get("enum").is_some() {
                            json!("enum")
                        } else {
                            Value::Null
                        }
                    });
                    json!({
                        "name": name,
                        "zh": f.get("x-zh"),
                        "type": kind,
                        "format": f.get("format"),
                        "class": f.get("x-class"),
                        "class_by_subject_type": f.get("x-class-by-subject-type"),
                        "max_length": f.get("maxLength"),
                        "required": required.contains(&name.as_str()),
                        "description": f.get("description"),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `GET /console/catalog/{item_id}`: an item's fields, versions, the form
/// to add or change a field, and rollback.
#[utoipa::path(get, path = "/console/catalog/{item_id}", tag = "console",
    params(("item_id" = String, Path, description = "Catalog item id"), LangQuery),
    responses(
        (status = 200, description = "The item page", content_type = "text/html"),
        (status = 400, description = "`invalid_query`: a parameter is not valid", content_type = "text/html"),
        (status = 404, description = "`unknown_item`: no such catalog item", content_type = "text/html"),
    ))]
pub async fn item(
    State(state): State<Arc<AppState>>,
    Path(item_id): Path<String>,
    query: Result<Query<LangQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|_| bad_query("the only parameter is lang=zh|en"))?;
    let (lang, remember) = lang_of(q.lang.as_deref(), &headers)?;
    let catalog = state.control.catalog.load_full();
    let Some(item) = catalog.get(&item_id) else {
        return Err(unknown_item());
    };
    let def = serde_json::to_value(&item.def).map_err(|e| Problem::gateway(&e))?;
    let versions = state.ingest.store.item_versions(&item_id).await?;
    let required = def["schema"]["required"].clone();
    page(
        "console/item.html",
        lang,
        remember,
        "catalog",
        context! {
            item => json!({"id": item.def.id, "name": item.def.name, "name_zh": item.def.name_zh,
                           "version": item.def.version, "description": item.def.description,
                           "providers": item.def.providers, "subject_types": item.def.subject_types}),
            fields => fields(&def),
            required_json => serde_json::to_string(&required).unwrap_or_default(),
            versions => versions,
            classes => ["public", "shared", "restricted", "secret"],
            types => ["string", "integer", "number", "boolean"],
        },
    )
}

/// Query of the diff page.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiffQuery {
    /// `zh` (default) or `en`.
    #[param(pattern = "^(zh|en)$")]
    lang: Option<String>,
    /// The older version (default: the one before `to`).
    #[param(minimum = 1)]
    from: Option<u32>,
    /// The newer version (default: the active one).
    #[param(minimum = 1)]
    to: Option<u32>,
}

/// `GET /console/catalog/{item_id}/diff?from=&to=`: two versions side by
/// side, line by line, with the compatibility classification of going
/// from one to the other.
#[utoipa::path(get, path = "/console/catalog/{item_id}/diff", tag = "console",
    params(("item_id" = String, Path, description = "Catalog item id"), DiffQuery),
    responses(
        (status = 200, description = "The diff page", content_type = "text/html"),
        (status = 400, description = "`invalid_query`: a parameter is not valid", content_type = "text/html"),
        (status = 404, description = "`unknown_item`, `unknown_version`: no such item or version", content_type = "text/html"),
    ))]
pub async fn diff(
    State(state): State<Arc<AppState>>,
    Path(item_id): Path<String>,
    query: Result<Query<DiffQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Query(q) = query
        .map_err(|_| bad_query("allowed parameters: lang=zh|en, from and to (version numbers)"))?;
    let (lang, remember) = lang_of(q.lang.as_deref(), &headers)?;
    let store = &state.ingest.store;
    let versions = store.item_versions(&item_id).await?;
    let Some(active) = versions.iter().find(|v| v.active).or(versions.last()) else {
        return Err(unknown_item());
    };
    let to = q.to.unwrap_or(active.version);
    let from = q.from.unwrap_or(to.saturating_sub(1).max(1));
    let id = item_id.as_str();
    let load = |n: u32| async move {
        store.item_version(id, n).await?.ok_or_else(|| {
            Problem::caller(
                StatusCode::NOT_FOUND,
                "unknown_version",
                "this item has no such version",
            )
        })
    };
    let (old, new) = (load(from).await?, load(to).await?);
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let (old_text, new_text) = (pretty(&old), pretty(&new));
    let rows = side_by_side(&old_text, &new_text);
    let classification = match (
        serde_json::from_value::<crate::catalog::ItemDefinition>(old),
        serde_json::from_value::<crate::catalog::ItemDefinition>(new),
    ) {
        (Ok(a), Ok(b)) => Some(crate::compat::diff(&a, &b)),
        _ => None,
    };
    page(
        "console/diff.html",
        lang,
        remember,
        "catalog",
        context! {
            item_id => item_id, from => from, to => to, rows => rows,
            versions => versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            classification => classification,
        },
    )
}

/// Rows of a side-by-side line diff: `{left, right, tag}` with `tag` one
/// of `same`, `changed`, `removed`, `added`.
fn side_by_side(old: &str, new: &str) -> Vec<Value> {
    use similar::{ChangeTag, TextDiff};
    let diff = TextDiff::from_lines(old, new);
    let mut rows = Vec::new();
    for op in diff.ops() {
        let mut removed = Vec::new();
        let mut added = Vec::new();
        for change in diff.iter_changes(op) {
            let line = change.value().trim_end_matches('\n').to_owned();
            match change.tag() {
                ChangeTag::Equal => rows.push(json!({"left": line, "right": line, "tag": "same"})),
                ChangeTag::Delete => removed.push(line),
                ChangeTag::Insert => added.push(line),
            }
        }
        let n = removed.len().max(added.len());
        for i in 0..n {
            let (l, r) = (removed.get(i), added.get(i));
            let tag = match (l, r) {
                (Some(_), Some(_)) => "changed",
                (Some(_), None) => "removed",
                _ => "added",
            };
            rows.push(json!({"left": l, "right": r, "tag": tag}));
        }
    }
    rows
}

// === participants and subscriptions ===

/// `GET /console/participants`: participants, their state and pins, and
/// the form to add or replace one.
#[utoipa::path(get, path = "/console/participants", tag = "console", params(LangQuery),
    responses(
        (status = 200, description = "The participants page", content_type = "text/html"),
        (status = 400, description = "`invalid_query`: a parameter is not valid", content_type = "text/html"),
    ))]
pub async fn participants(
    State(state): State<Arc<AppState>>,
    query: Result<Query<LangQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|_| bad_query("the only parameter is lang=zh|en"))?;
    let (lang, remember) = lang_of(q.lang.as_deref(), &headers)?;
    let list: Vec<Value> = state
        .control
        .registry
        .load()
        .to_vec()
        .into_iter()
        .map(|p| {
            let doc = serde_json::to_string(&p).unwrap_or_default();
            let mut v = serde_json::to_value(&p).unwrap_or_default();
            v["document"] = Value::String(doc);
            v
        })
        .collect();
    page(
        "console/participants.html",
        lang,
        remember,
        "participants",
        context! {
            participants => list,
            kinds => ["department", "agency", "admin"],
            classes => ["public", "shared", "restricted", "secret"],
        },
    )
}

/// `GET /console/subscriptions`: subscriptions with their push endpoints'
/// state, and dead deliveries with retry.
#[utoipa::path(get, path = "/console/subscriptions", tag = "console", params(LangQuery),
    responses(
        (status = 200, description = "The subscriptions page", content_type = "text/html"),
        (status = 400, description = "`invalid_query`: a parameter is not valid", content_type = "text/html"),
    ))]
pub async fn subscriptions(
    State(state): State<Arc<AppState>>,
    query: Result<Query<LangQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|_| bad_query("the only parameter is lang=zh|en"))?;
    let (lang, remember) = lang_of(q.lang.as_deref(), &headers)?;
    let store = &state.ingest.store;
    let (health, dead) = tokio::try_join!(
        store.endpoint_health(),
        store.deliveries(DeliveryState::Dead, 200)
    )?;
    let health: HashMap<String, crate::store::EndpointHealth> = health.into_iter().collect();
    let paused = state.dispatcher.paused();
    let now_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let mut dead_by_sub: HashMap<&str, u64> = HashMap::new();
    for d in &dead {
        *dead_by_sub.entry(d.subscription.as_str()).or_default() += 1;
    }
    let list: Vec<Value> = state
        .control
        .subscriptions
        .load()
        .specs()
        .iter()
        .map(|s| {
            let h = health.get(&s.id);
            let is_push = s.endpoint.is_some();
            let paused_now =
                paused.contains(&s.id) || h.is_some_and(|h| h.paused_until_ms > now_ms);
            let state = if !s.enabled {
                "disabled"
            } else if is_push && paused_now {
                "paused"
            } else {
                "active"
            };
            json!({
                "id": s.id, "agency": s.agency, "mode": s.mode, "items": s.items,
                "endpoint": s.endpoint, "enabled": s.enabled, "state": state,
                "failures": h.map_or(0, |h| h.failures),
                "dead": dead_by_sub.get(s.id.as_str()).copied().unwrap_or(0),
            })
        })
        .collect();
    page(
        "console/subscriptions.html",
        lang,
        remember,
        "subscriptions",
        context! {
            subscriptions => list,
            dead => dead,
            agencies => state.registry.load().iter()
                .filter(|p| p.kind == crate::participants::Kind::Agency)
                .map(|p| json!({"id": p.id, "name_zh": p.name_zh}))
                .collect::<Vec<_>>(),
            items => state.control.catalog.load().items()
                .map(|i| json!({"id": i.def.id, "name_zh": i.def.name_zh}))
                .collect::<Vec<_>>(),
        },
    )
}

// === audit ===

/// Query of the audit page.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditPageQuery {
    /// `zh` (default) or `en`.
    #[param(pattern = "^(zh|en)$")]
    lang: Option<String>,
    /// Entries before this chain position (newest first; default: the
    /// newest).
    #[param(minimum = 1)]
    before: Option<i64>,
    /// Only this actor.
    #[param(max_length = 100)]
    actor: Option<String>,
    /// Only this action or kind of action (`catalog`).
    #[param(max_length = 100)]
    kind: Option<String>,
}

const AUDIT_PAGE: usize = 50;

/// `GET /console/audit`: the audit log, newest first, 50 a page,
/// filterable by actor and kind, each entry with its chain position.
#[utoipa::path(get, path = "/console/audit", tag = "console", params(AuditPageQuery),
    responses(
        (status = 200, description = "The audit page", content_type = "text/html"),
        (status = 400, description = "`invalid_query`: a parameter is not valid", content_type = "text/html"),
    ))]
pub async fn audit(
    State(state): State<Arc<AppState>>,
    query: Result<Query<AuditPageQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let bad = || bad_query("before is a chain position; actor and kind at most 100 characters");
    let Query(q) = query.map_err(|_| bad())?;
    let (lang, remember) = lang_of(q.lang.as_deref(), &headers)?;
    let filter = super::admin_control::AuditQuery {
        after: None,
        before: Some(q.before.unwrap_or(i64::MAX)),
        actor: q.actor,
        kind: q.kind,
        limit: Some(AUDIT_PAGE),
    }
    .filter()
    .ok_or_else(bad)?;
    let (actor, kind) = (filter.actor.clone(), filter.kind.clone());
    let entries = state.ingest.store.audit_page(filter).await?;
    let older = (entries.len() == AUDIT_PAGE)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let details = e.details.get();
            let short: String = details.chars().take(300).collect();
            json!({
                "seq": e.seq, "at": e.at, "actor": e.actor, "action": e.action,
                "subject": e.subject, "details": short,
                "details_cut": short.len() < details.len(),
                "hash": e.hash.chars().take(16).collect::<String>(),
            })
        })
        .collect();
    page(
        "console/audit.html",
        lang,
        remember,
        "audit",
        context! { entries => entries, older => older, actor => actor, kind => kind },
    )
}

// === assets ===

/// `GET /console/assets/console.js`: the console's script.
#[utoipa::path(get, path = "/console/assets/console.js", tag = "console",
    responses((status = 200, description = "The script", content_type = "text/javascript")))]
pub async fn script() -> Response {
    asset(
        include_str!("../../templates/console/console.js"),
        "text/javascript; charset=utf-8",
    )
}

/// `GET /console/assets/console.css`: the console's style sheet.
#[utoipa::path(get, path = "/console/assets/console.css", tag = "console",
    responses((status = 200, description = "The style sheet", content_type = "text/css")))]
pub async fn style() -> Response {
    asset(
        include_str!("../../templates/console/console.css"),
        "text/css; charset=utf-8",
    )
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

// === problems as pages ===

fn bad_query(detail: &'static str) -> Problem {
    Problem::caller(StatusCode::BAD_REQUEST, "invalid_query", detail)
}

fn unknown_item() -> Problem {
    Problem::caller(
        StatusCode::NOT_FOUND,
        "unknown_item",
        "no catalog item has this id",
    )
}

/// Middleware of `/console/` paths: a problem answer (the API's refusal,
/// e.g. `403 admins_only` for a department's certificate) is shown as a
/// page, with the same status, code and explanation.
pub async fn problem_pages(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path();
    if !(path == "/console" || path.starts_with("/console/")) {
        return next.run(req).await;
    }
    let lang = language(None, req.headers());
    let resp = next.run(req).await;
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !is_problem {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return (parts.status, "").into_response();
    };
    let problem: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let t = TEXT.get(lang).cloned().unwrap_or_default();
    let html = super::pages::render(
        "console/problem.html",
        context! { t => t, lang => lang, nav => "", problem => problem },
    )
    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
    let mut out = super::pages::html_response(parts.status, html);
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    for name in [header::RETRY_AFTER, header::ALLOW] {
        if let Some(v) = parts.headers.get(&name) {
            h.insert(name, v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_languages_have_every_text() {
        let zh = TEXT.get("zh").expect("zh texts");
        let en = TEXT.get("en").expect("en texts");
        let missing: Vec<_> = zh.keys().filter(|k| !en.contains_key(*k)).collect();
        let extra: Vec<_> = en.keys().filter(|k| !zh.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "en lacks {missing:?}; zh lacks {extra:?}"
        );
        assert!(zh.len() > 40, "{} texts", zh.len());
    }

    #[test]
    fn every_text_a_template_uses_exists() {
        let zh = TEXT.get("zh").expect("zh texts");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/console");
        for entry in std::fs::read_dir(&dir).expect("templates") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "html") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("template");
            for (at, _) in text.match_indices("t.") {
                // `t.key`, not the end of another name (`chart.width`).
                let before = text[..at].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
                    continue;
                }
                let key: String = text[at + 2..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !key.is_empty() {
                    assert!(
                        zh.contains_key(&key),
                        "{} uses t.{key}, which text.toml lacks",
                        path.display()
                    );
                }
            }
        }
    }

    #[test]
    fn the_language_comes_from_the_query_then_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(language(None, &h), "zh");
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; credgate_console_lang=en"),
        );
        assert_eq!(language(None, &h), "en");
        assert_eq!(language(Some("zh"), &h), "zh");
        assert_eq!(language(Some("fr"), &h), "en");
    }

    #[test]
    fn the_diff_pairs_changed_lines() {
        let rows = side_by_side("a\nb\nc\n", "a\nB\nc\nd\n");
        let tags: Vec<&str> = rows
            .iter()
            .map(|r| r["tag"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(tags, ["same", "changed", "same", "added"]);
        assert_eq!(rows[1]["left"], "b");
        assert_eq!(rows[1]["right"], "B");
    }

    #[test]
    fn bars_scale_to_the_busiest_day() {
        let chart = bars(&[(0, 0), (10, 0), (15, 5)]);
        let bars = chart["bars"].as_array().expect("bars");
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[1]["accepted"], 30.0);
        assert_eq!(bars[1]["rejected"], 10.0);
        assert_eq!(bars[0]["accepted"], 20.0);
    }
}

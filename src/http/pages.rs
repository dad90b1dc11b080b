//! Server-rendered pages: the printable credit review report. Templates
//! live in `templates/` and are compiled into the binary; HTML escaping is
//! on for every value.

use std::sync::LazyLock;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use minijinja::{context, Environment};
use serde_json::{json, Value};

use crate::error::Problem;

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    // A template that does not parse is a build defect, caught by the
    // tests that render it.
    for (name, source) in [
        ("report.html", include_str!("../../templates/report.html")),
        ("public.html", include_str!("../../templates/public.html")),
        (
            "console/base.html",
            include_str!("../../templates/console/base.html"),
        ),
        (
            "console/problem.html",
            include_str!("../../templates/console/problem.html"),
        ),
        (
            "console/overview.html",
            include_str!("../../templates/console/overview.html"),
        ),
        (
            "console/catalog.html",
            include_str!("../../templates/console/catalog.html"),
        ),
        (
            "console/item.html",
            include_str!("../../templates/console/item.html"),
        ),
        (
            "console/diff.html",
            include_str!("../../templates/console/diff.html"),
        ),
        (
            "console/participants.html",
            include_str!("../../templates/console/participants.html"),
        ),
        (
            "console/subscriptions.html",
            include_str!("../../templates/console/subscriptions.html"),
        ),
        (
            "console/audit.html",
            include_str!("../../templates/console/audit.html"),
        ),
    ] {
        if let Err(e) = env.add_template(name, source) {
            tracing::error!(template = name, error = %e, "a page template does not parse");
        }
    }
    env
});

/// Renders page template `name` (auto-escaped).
pub fn render(name: &str, ctx: minijinja::Value) -> Result<String, Problem> {
    TEMPLATES
        .get_template(name)
        .and_then(|t| t.render(ctx))
        .map_err(|e| Problem::gateway(&e))
}

/// Whether the request asks for HTML (a browser's `Accept`), rather than
/// the JSON every API client gets.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            accept.split(',').any(|part| {
                let mut it = part.split(';');
                let kind = it.next().unwrap_or_default().trim();
                let refused =
                    it.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
                kind.eq_ignore_ascii_case("text/html") && !refused
            })
        })
}

/// A page answer: `text/html`, never cached (reports name subjects), and
/// varying by `Accept` (the same URL answers JSON).
pub fn html_response(status: StatusCode, html: String) -> Response {
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VARY, HeaderValue::from_static("accept"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    resp
}

/// The printable Chinese report (信用审查报告) of a signed report document
/// `{"report", "signature"}`.
pub fn report_html(document: &[u8]) -> Result<String, Problem> {
    let doc: Value = serde_json::from_slice(document).map_err(|e| Problem::gateway(&e))?;
    render(
        "report.html",
        context! {
            r => doc["report"],
            signature => doc["signature"],
            levels => json!({"general": "一般", "major": "较重", "serious": "严重"}),
            types => json!({"punishment": "惩戒", "incentive": "激励"}),
            subject_types => json!({
                "legal_entity": "法人和非法人组织",
                "natural_person": "自然人",
                "individual_business": "个体工商户",
            }),
            end_reasons => json!({
                "repaired": "信用修复",
                "revoked": "撤销",
                "corrected": "更正",
                "expired": "期满",
                "removed": "移出名单",
            }),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_decides() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, HeaderValue::from_str(v).expect("value"));
            m
        };
        assert!(wants_html(&h(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        )));
        assert!(!wants_html(&h("application/json")));
        assert!(!wants_html(&h("*/*")));
        assert!(!wants_html(&h("text/html;q=0, application/json")));
        assert!(!wants_html(&HeaderMap::new()));
    }

    #[test]
    fn the_report_renders_escaped() {
        let doc = json!({
            "report": {
                "report_id": "r1", "issuer": {"name_zh": "江苏省公共信用信息中心"},
                "requested_by": {"id": "a", "name_zh": "<b>采购中心</b>"},
                "purpose_zh": "参加政府采购", "subject": {"subject_name": "某公司", "uscc": "X"},
                "grade": {"code": "D", "name_zh": "严重失信", "rule": "x", "rules_version": 1},
                "restricted": true,
                "restrictions": [{"description_zh": "限制参加政府采购活动", "legal_basis": "政府采购法", "records": ["rec"]}],
                "records_in_effect": [], "ended_records": [], "incentives": [],
                "look_back": {"years": 5, "from": "2021-11-28"}, "as_of": "2026-11-28",
            },
            "signature": {"alg": "Ed25519", "key_id": "k", "value": "v"},
        });
        let html = report_html(&serde_json::to_vec(&doc).expect("json")).expect("renders");
        for want in [
            "信用审查报告",
            "审查结论：受限",
            "限制参加政府采购活动",
            "D 严重失信",
            "&lt;b&gt;采购中心",
        ] {
            assert!(html.contains(want), "{want} missing");
        }
    }
}

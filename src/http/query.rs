//! Query parameters shared by the admin routes: page limits and
//! statistics periods.

use axum::http::StatusCode;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::Problem;

/// A `limit` query parameter: 1-1000, default 100.
pub fn page_limit(limit: Option<usize>) -> Option<usize> {
    Some(limit.unwrap_or(100)).filter(|l| (1..=1000).contains(l))
}

/// Query of a statistics period.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PeriodQuery {
    /// Start, inclusive: `YYYY-MM-DD` or an RFC 3339 time (default: the beginning).
    #[param(schema_with = crate::http::openapi::date_or_time)]
    from: Option<String>,
    /// End, exclusive: `YYYY-MM-DD` or an RFC 3339 time (default: tomorrow).
    #[param(schema_with = crate::http::openapi::date_or_time)]
    to: Option<String>,
}

/// The `[from, to)` period of a statistics query (default: everything
/// up to tomorrow).
pub fn period(q: PeriodQuery) -> Result<(OffsetDateTime, OffsetDateTime), Problem> {
    let parse = |s: &str| {
        crate::codes::parse_iso_date(s)
            .map(|d| d.midnight().assume_utc())
            .or_else(|| OffsetDateTime::parse(s, &Rfc3339).ok())
            .ok_or_else(|| {
                Problem::caller(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "from and to must be YYYY-MM-DD or RFC 3339 times",
                )
            })
    };
    let from = q
        .from
        .as_deref()
        .map(parse)
        .transpose()?
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let to =
        q.to.as_deref()
            .map(parse)
            .transpose()?
            .unwrap_or_else(|| OffsetDateTime::now_utc() + time::Duration::days(1));
    Ok((from, to))
}

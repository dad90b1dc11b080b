//! The gateway's one error type for requests: an RFC 9457 problem with a
//! stable machine `code`, the side at fault, and JSON pointers to the fault.
//!
//! Caller faults become 4xx with a precise explanation; gateway faults
//! become 5xx with no internals (the cause goes to the log). A problem never
//! carries a submitted field value.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::catalog::Finding;
use crate::store::StoreError;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something wrong or is not allowed.
    Caller,
    /// The gateway (or its storage) failed.
    Gateway,
}

/// An error response.
#[derive(Debug, Clone)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine code (snake_case).
    pub code: &'static str,
    /// Human explanation, without submitted values.
    pub detail: String,
    /// Field-level findings with JSON pointers into the submitted document.
    pub errors: Vec<Finding>,
    /// Seconds after which a retry may succeed (sets `Retry-After`).
    pub retry_after: Option<u64>,
    /// Extra response headers (rate-limit information).
    pub headers: Vec<(&'static str, String)>,
    /// Who is at fault.
    pub side: Side,
    /// Extension members (RFC 9457 §3.2), e.g. the changes of a refused
    /// catalog version.
    pub extensions: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    errors: &'a [Finding],
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    extensions: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

impl Problem {
    /// A caller fault.
    pub fn caller(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            code,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
            headers: Vec::new(),
            side: Side::Caller,
            extensions: None,
        }
    }

    /// A gateway fault; `cause` is logged, never sent.
    #[track_caller]
    pub fn gateway(cause: &dyn std::fmt::Display) -> Problem {
        let at = std::panic::Location::caller();
        tracing::error!(%cause, location = %at, "request failed on the gateway side");
        Problem {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "gateway_unavailable",
            detail: "the gateway could not complete the request; nothing was stored; retry later"
                .into(),
            errors: Vec::new(),
            retry_after: Some(5),
            headers: Vec::new(),
            side: Side::Gateway,
            extensions: None,
        }
    }

    /// A change of a record whose effect has ended (`status`).
    pub fn already_ended(status: &str) -> Problem {
        Problem::caller(
            StatusCode::CONFLICT,
            "already_ended",
            format!("the record is already {status}; its lift notices were sent then"),
        )
    }

    /// Adds field-level findings.
    pub fn with_errors(mut self, errors: Vec<Finding>) -> Problem {
        self.errors = errors;
        self
    }

    /// Adds an extension member.
    pub fn with(mut self, key: &str, value: impl serde::Serialize) -> Problem {
        self.extensions.get_or_insert_with(Default::default).insert(
            key.to_owned(),
            serde_json::to_value(value).unwrap_or_default(),
        );
        self
    }

    /// One finding at `pointer`.
    pub fn at(self, pointer: impl Into<String>, message: impl Into<String>) -> Problem {
        let code = self.code.to_owned();
        self.with_errors(vec![Finding {
            pointer: pointer.into(),
            code,
            message: message.into(),
        }])
    }

    /// The serialized problem document.
    pub fn body(&self) -> Vec<u8> {
        let title = self.status.canonical_reason().unwrap_or("Error");
        serde_json::to_vec(&Body {
            kind: format!("urn:credgate:problem:{}", self.code),
            title,
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
            errors: &self.errors,
            extensions: self.extensions.as_deref(),
        })
        .unwrap_or_default()
    }
}

impl From<StoreError> for Problem {
    #[track_caller]
    fn from(e: StoreError) -> Problem {
        Problem::gateway(&e)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut resp = (self.status, self.body()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        for (name, value) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(*name, v);
            }
        }
        resp
    }
}

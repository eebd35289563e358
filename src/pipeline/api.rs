//! The API port: what the core asks of the Convirza API, and the vocabulary of its
//! answers. The HTTP client in `convirza/` implements it; fakes in tests do too.
//!
//! Invariants:
//! - every way a call can end is one [`ApiError`] variant, decided by the adapter; the core
//!   never sees status codes or bodies, only this classification;
//! - a call that may have reached the API but whose answer was lost is
//!   [`ApiError::UnknownOutcome`], never "failed": the group may exist.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::CreateGroup;
use crate::traceparent::Traceparent;

pub trait GroupApi: Send + Sync {
    /// `POST /v3/groups`: one try; retrying is the core's policy.
    fn create_group(
        &self,
        command: &CreateGroup,
        trace: Option<&Traceparent>,
    ) -> impl Future<Output = Result<Created, ApiError>> + Send;

    /// Every direct child of `parent` whose name [`names_match`] `name`, all pages.
    fn find_children_named(
        &self,
        parent: i64,
        name: &str,
        trace: Option<&Traceparent>,
    ) -> impl Future<Output = Result<Vec<GroupSummary>, ApiError>> + Send;

    /// The direct child of `parent` carrying `ext_id`, looked for among *all* its children
    /// (every page, whatever their names): what finds a group whose name changed upstream
    /// when nothing else remembers where it went. Costs one List call per page.
    fn find_child_with_ext_id(
        &self,
        parent: i64,
        ext_id: &str,
        trace: Option<&Traceparent>,
    ) -> impl Future<Output = Result<Option<GroupSummary>, ApiError>> + Send;

    /// A read-only authenticated call that creates nothing: the circuit's probe.
    fn probe(&self) -> impl Future<Output = Result<(), ApiError>> + Send;
}

/// A successful Create Group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub org_unit_id: i64,
    pub request_id: Option<String>,
    pub http_status: u16,
}

/// A child group as List Child Groups reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub org_unit_id: i64,
    pub org_unit_ext_id: Option<String>,
    pub org_unit_name: String,
    pub org_unit_parent_id: Option<i64>,
    pub org_unit_status: Option<String>,
}

/// The name rule of reconciliation: equal ignoring case and surrounding spaces.
pub fn names_match(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim(), b.trim());
    a == b || a.to_lowercase() == b.to_lowercase()
}

/// Every way a Convirza call can end other than success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A 4xx the API will repeat for this request (validation, bad parent, …).
    #[error("API rejected the request (HTTP {status}): {message}")]
    Rejected {
        status: u16,
        message: String,
        request_id: Option<String>,
    },
    /// A 400 whose message says a sibling with this name exists.
    #[error("API rejected the request (HTTP 400): name already taken: {message}")]
    DuplicateName {
        message: String,
        request_id: Option<String>,
    },
    /// 401/403: our credentials, not the message.
    #[error("API refused the credentials (HTTP {status}): {message}")]
    Unauthorized { status: u16, message: String },
    /// 404 on the endpoint itself: misconfigured base URL or a removed API.
    #[error("API endpoint not found (HTTP 404) at {path}")]
    EndpointNotFound { path: String },
    /// 429: the account is over its rate limit.
    #[error("API rate limit hit (HTTP 429){}", retry_after_suffix(*.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    /// Known not to have done anything, or safe to retry: connect errors (status `None`),
    /// 408, 5xx. A 5xx may still have committed, which the caller handles by reconciling.
    #[error("API call failed transiently{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Transient {
        status: Option<u16>,
        message: String,
        retry_after: Option<Duration>,
        request_id: Option<String>,
    },
    /// The request may have reached the API and the answer was lost (timeout, connection
    /// dropped, unreadable success body): the group may or may not exist.
    #[error("API call outcome unknown: {message}")]
    UnknownOutcome { message: String },
    /// Obtaining a token failed (login mode).
    #[error("API authentication failed: {message}")]
    Auth { message: String, transient: bool },
}

fn retry_after_suffix(d: Option<Duration>) -> String {
    d.map(|d| format!(", retry after {}ms", d.as_millis()))
        .unwrap_or_default()
}

impl ApiError {
    pub fn http_status(&self) -> Option<u16> {
        match self {
            ApiError::Rejected { status, .. } | ApiError::Unauthorized { status, .. } => {
                Some(*status)
            }
            ApiError::DuplicateName { .. } => Some(400),
            ApiError::EndpointNotFound { .. } => Some(404),
            ApiError::RateLimited { .. } => Some(429),
            ApiError::Transient { status, .. } => *status,
            ApiError::UnknownOutcome { .. } | ApiError::Auth { .. } => None,
        }
    }

    pub fn request_id(&self) -> Option<&str> {
        match self {
            ApiError::Rejected { request_id, .. }
            | ApiError::DuplicateName { request_id, .. }
            | ApiError::Transient { request_id, .. } => request_id.as_deref(),
            _ => None,
        }
    }

    /// The server's own wait hint, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after } | ApiError::Transient { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// Whether retrying the same call may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::RateLimited { .. }
            | ApiError::Transient { .. }
            | ApiError::UnknownOutcome { .. } => true,
            ApiError::Auth { transient, .. } => *transient,
            _ => false,
        }
    }

    /// Whether a create POST that ended this way may have created the group.
    pub fn may_have_created(&self) -> bool {
        match self {
            ApiError::UnknownOutcome { .. } => true,
            ApiError::Transient { status, .. } => status.is_some_and(|s| s >= 500),
            _ => false,
        }
    }

    /// The API's own message, for events and dead-letter headers.
    pub fn message(&self) -> String {
        match self {
            ApiError::Rejected { message, .. }
            | ApiError::DuplicateName { message, .. }
            | ApiError::Unauthorized { message, .. }
            | ApiError::Transient { message, .. }
            | ApiError::UnknownOutcome { message }
            | ApiError::Auth { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_matching() {
        assert!(names_match("Sales", " sales "));
        assert!(names_match("ÜBER", "über"));
        assert!(!names_match("Sales", "Sales 2"));
    }
}

//! The one place that turns an API error into what happens to the message: retry, dead-letter
//! or pause.

use std::time::Duration;

use super::api::ApiError;

use super::decision::SystemFault;
use super::failure::{Failure, FailureKind};

/// What a failed try means for the message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Disposition {
    /// Transient: try again (in process, then the next delay tier).
    #[error("{0}")]
    Retry(ApiError),
    /// Permanent: the message is at fault; dead-letter it with this failure.
    #[error("{}: {}", .0.kind, .0.message)]
    DeadLetter(Failure),
    /// The system is at fault: park the message without charging it.
    #[error("{0}")]
    Pause(SystemFault),
}

impl Disposition {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Disposition::Retry(e) => e.retry_after(),
            _ => None,
        }
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            Disposition::Retry(e) => e.http_status(),
            Disposition::DeadLetter(f) => f.http_status,
            Disposition::Pause(_) => None,
        }
    }
}

/// Transient errors retry; 401/403 (after the client's one refresh) and a
/// 404 on the endpoint are the system's fault; any other 4xx is the message's.
pub fn disposition(error: ApiError) -> Disposition {
    match error {
        ApiError::Unauthorized { .. } => {
            Disposition::Pause(SystemFault::Unauthorized(error.to_string()))
        }
        ApiError::EndpointNotFound { .. } => {
            Disposition::Pause(SystemFault::EndpointNotFound(error.to_string()))
        }
        ApiError::Auth {
            transient: false, ..
        } => Disposition::Pause(SystemFault::Unauthorized(error.to_string())),
        ApiError::Rejected { .. } | ApiError::DuplicateName { .. } => {
            Disposition::DeadLetter(Failure {
                kind: FailureKind::Rejected,
                message: error.message(),
                http_status: error.http_status(),
                api_request_id: error.request_id().map(str::to_owned),
            })
        }
        ApiError::RateLimited { .. }
        | ApiError::Transient { .. }
        | ApiError::UnknownOutcome { .. }
        | ApiError::Auth {
            transient: true, ..
        } => Disposition::Retry(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_error_has_a_disposition() {
        let pause = |e| matches!(disposition(e), Disposition::Pause(_));
        let retry = |e| matches!(disposition(e), Disposition::Retry(_));
        assert!(pause(ApiError::Unauthorized {
            status: 401,
            message: String::new()
        }));
        assert!(pause(ApiError::Unauthorized {
            status: 403,
            message: String::new()
        }));
        assert!(pause(ApiError::EndpointNotFound {
            path: "POST /groups".into()
        }));
        assert!(pause(ApiError::Auth {
            message: "bad password".into(),
            transient: false
        }));
        assert!(retry(ApiError::Auth {
            message: "login down".into(),
            transient: true
        }));
        assert!(retry(ApiError::RateLimited { retry_after: None }));
        assert!(retry(ApiError::UnknownOutcome {
            message: String::new()
        }));
        assert!(retry(ApiError::Transient {
            status: Some(503),
            message: String::new(),
            retry_after: None,
            request_id: None
        }));
        match disposition(ApiError::Rejected {
            status: 422,
            message: "bad zip".into(),
            request_id: Some("r".into()),
        }) {
            Disposition::DeadLetter(f) => {
                assert_eq!(f.kind, FailureKind::Rejected);
                assert_eq!(f.http_status, Some(422));
                assert_eq!(f.api_request_id.as_deref(), Some("r"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_flows_through() {
        let d = disposition(ApiError::RateLimited {
            retry_after: Some(Duration::from_secs(3)),
        });
        assert_eq!(d.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(d.http_status(), Some(429));
    }
}

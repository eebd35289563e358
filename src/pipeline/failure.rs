//! Why a command failed for good ([`Failure`]) and its kind, the closed set that events,
//! dead letters, logs and metrics name ([`FailureKind`]).

use std::fmt;

closed_set! {
    /// `error.kind` of a failure event and `x-error-kind` of a dead letter.
    pub enum FailureKind {
        InvalidCommand = "invalid_command",
        Rejected = "rejected",
        NameConflict = "name_conflict",
        RetriesExhausted = "retries_exhausted",
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a command failed for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    pub http_status: Option<u16>,
    pub api_request_id: Option<String>,
}

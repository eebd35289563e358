//! The vocabulary of the core's answer: what happens to a delivery ([`Decision`]), which
//! faults are the system's ([`SystemFault`]), and the closed label sets that logs and
//! metrics use ([`Outcome`], [`DeferReason`]). Why a command failed is `failure.rs`.

use super::events::{CreatedEvent, FailedEvent};
use super::failure::Failure;

/// A fault of the system, not of the message: the message is parked and retried later
/// without spending its attempts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SystemFault {
    /// 401/403 after a token refresh.
    #[error("API credentials refused: {0}")]
    Unauthorized(String),
    /// 404 on `POST /v3/groups` itself.
    #[error("API endpoint not found: {0}")]
    EndpointNotFound(String),
    /// Redis unreachable or failing.
    #[error("dedup store unavailable: {0}")]
    Store(String),
    /// The lease on the ext id was lost while working (stalled past `dedup.lease`).
    #[error("lease on the ext id lost while working")]
    LeaseLost,
    /// Publishing the outcome failed (unroutable event, broker refusal).
    #[error("publishing failed: {0}")]
    Publish(String),
    /// Too many consecutive transient API failures: the API is down, not the message.
    #[error("API failing repeatedly: {0}")]
    ApiDown(String),
    /// The circuit is open (for one of the faults above): park without trying.
    #[error("circuit open")]
    CircuitOpen,
}

impl SystemFault {
    /// A short stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SystemFault::Unauthorized(_) => "unauthorized",
            SystemFault::EndpointNotFound(_) => "endpoint_not_found",
            SystemFault::Store(_) => "redis",
            SystemFault::LeaseLost => "lease_lost",
            SystemFault::Publish(_) => "publish",
            SystemFault::ApiDown(_) => "api_down",
            SystemFault::CircuitOpen => "circuit_open",
        }
    }

    /// Whether this fault opens the circuit (it is about the system, and will hit every
    /// other delivery too).
    pub fn opens_circuit(&self) -> bool {
        !matches!(self, SystemFault::LeaseLost | SystemFault::CircuitOpen)
    }
}

/// Why a message goes to a delay queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DelayReason {
    /// Transient failures outlasted the in-process tries: next tier, `x-retries` + 1.
    Retry {
        last_error: String,
        http_status: Option<u16>,
    },
    /// Another live worker holds the claim: first tier, `x-deferrals` + 1.
    Claimed,
    /// A system fault: first tier, `x-deferrals` + 1.
    Parked(SystemFault),
}

/// What the AMQP side must do with the delivery. Every variant ends with an ack that comes
/// only after its publishes are confirmed.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Publish `group.created` (and to `reply_to`), then ack.
    Created { event: CreatedEvent },
    /// Publish a copy to the DLQ with reason headers, then `group.create.failed`, then ack.
    DeadLetter {
        failure: Failure,
        event: FailedEvent,
        attempts: u32,
    },
    /// Publish a copy to delay tier `tier` with the new counters, then ack.
    Delay {
        tier: usize,
        attempts: u32,
        retries: u32,
        deferrals: u32,
        reason: DelayReason,
    },
}

impl Decision {
    pub fn outcome(&self) -> Outcome {
        match self {
            Decision::Created { event } if event.duplicate => Outcome::Duplicate,
            Decision::Created { .. } => Outcome::Created,
            Decision::DeadLetter { .. } => Outcome::DeadLettered,
            Decision::Delay { .. } => Outcome::Deferred,
        }
    }
}

closed_set! {
    /// The `outcome` field of the one log line per delivery.
    pub enum Outcome {
        /// This delivery created the group (or its own lost POST was recovered by List).
        Created = "created",
        /// The group existed before this delivery posted anything.
        Duplicate = "duplicate",
        /// Moved to a delay queue (transient retry, claim held elsewhere, or parked).
        Deferred = "deferred",
        /// Dead-lettered by the worker, with a failure event.
        DeadLettered = "dead_lettered",
        /// Returned to the work queue (publishing failed, or shutdown).
        Requeued = "requeued",
        /// Could not be settled at all (channel lost); the broker redelivers it.
        Failed = "failed",
    }
}

closed_set! {
    /// Why a message went to a delay queue (the `reason` label of deferrals).
    pub enum DeferReason {
        Transient = "transient",
        Claimed = "claimed",
        Parked = "parked",
    }
}

impl DelayReason {
    /// The metrics label of this reason.
    pub fn defer_reason(&self) -> DeferReason {
        match self {
            DelayReason::Retry { .. } => DeferReason::Transient,
            DelayReason::Claimed => DeferReason::Claimed,
            DelayReason::Parked(_) => DeferReason::Parked,
        }
    }

    /// The `reason` field of the outcome log line.
    pub fn log_label(&self) -> &'static str {
        match self {
            DelayReason::Retry { .. } => "transient",
            DelayReason::Claimed => "claimed_elsewhere",
            DelayReason::Parked(fault) => fault.label(),
        }
    }
}

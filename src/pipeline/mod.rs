//! The core: what to do with one delivery. It knows nothing of lapin, redis or HTTP; it
//! sees an [`Inbound`] message, talks to a [`DedupStore`] and a [`GroupApi`] through the
//! ports, reports through a [`Recorder`], and returns a [`Decision`] that the AMQP side
//! carries out (publish, then ack).
//!
//! Where things are:
//! - `processor.rs` — parse, claim, settle (the decision for one delivery);
//! - `provision.rs` — the retry loop: List first when needed, attempt marker, POST,
//!   reconciliation of rejections; `lease.rs` keeps the claim alive meanwhile;
//! - `disposition.rs` — **the** mapping from an API error to retry / dead-letter / pause;
//! - `circuit.rs` — the circuit and the account-wide rate-limit pause;
//! - `api.rs`, `store.rs`, `recorder.rs` — the ports; `events.rs`, `decision.rs`,
//!   `fingerprint.rs`, `reconcile.rs`, `last_outcome.rs` — the values they produce.
//!
//! Invariants:
//! - no POST without a claim on the ext id, and no POST while another owner holds it;
//! - before every POST an attempt marker is written; whenever an earlier attempt may have
//!   reached the API, the parent's children are listed first and a group with our ext id
//!   is success (no POST);
//! - every 4xx rejection is reconciled the same way before it is called a failure;
//! - faults of the system (credentials, endpoint, Redis) are never charged to the
//!   message: they become [`Decision::Delay`] with a deferral, never a dead letter.

mod api;
mod circuit;
mod decision;
mod disposition;
mod events;
mod fingerprint;
mod inbound;
mod last_outcome;
mod lease;
mod processor;
mod provision;
mod reconcile;
mod recorder;
mod store;

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod tests;

pub use api::{ApiError, Created, GroupApi, GroupSummary, names_match};
pub use circuit::{Circuit, CircuitState};
pub use decision::{
    Decision, DeferReason, DelayReason, Failure, FailureKind, Outcome, SystemFault,
};
pub use disposition::{Disposition, disposition};
pub use events::{
    CREATED as CREATED_EVENT, CreatedEvent, ErrorInfo, FAILED as FAILED_EVENT, FailedEvent,
    truncate,
};
pub use fingerprint::differing_fields;
pub use inbound::Inbound;
pub use last_outcome::{LastOutcome, Place, TierPlace};
pub use processor::{Processor, ProcessorConfig, Verdict};
pub use reconcile::{Reconciled, reconcile};
pub use recorder::{InFlight, NoRecorder, Recorder};
pub use store::{
    AttemptMarker, Claim, ClaimRequest, CreatedRecord, DedupStore, OutcomeKey, Posting,
    RecordResult, StoreError, Unreadable,
};

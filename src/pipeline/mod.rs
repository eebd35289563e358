//! The core: what to do with one delivery. It knows nothing of lapin, redis or HTTP; it
//! sees an [`Inbound`] message, talks to a [`DedupStore`] and a [`GroupApi`] through the
//! ports, reports through a [`Recorder`], and returns a [`Decision`] that the AMQP side
//! carries out (publish, then ack).
//!
//! Glossary — one word per idea:
//! - **delivery**: one AMQP delivery of a command; [`Inbound`] is what the core reads of it;
//! - **decision** ([`Decision`]): what the core decides to do with a delivery — publish
//!   `group.created`, delay it to a tier, or dead-letter it;
//! - **processed** ([`Processed`]): a decision with what identifies its delivery in the log
//!   (ext id, correlation id, trace, last HTTP status): what [`Processor::process`] returns;
//! - **disposition** ([`Disposition`]): how one API error is handled — retry, pause (a
//!   fault of the system), or dead-letter; [`disposition`] is the one function that decides;
//! - **failure** ([`Failure`], [`FailureKind`]): why a command failed for good;
//! - **outcome** ([`Outcome`]): how a delivery ended once the worker carried the decision
//!   out (created, duplicate, deferred, dead_lettered, requeued, failed): the log's
//!   `outcome` and the metric's label;
//! - **last outcome** ([`LastOutcome`]): the record of a delivery's outcome kept for
//!   `status`, with where the message is now ([`Place`]).
//!
//! Where things are (no file imports another that imports it back: tests/it/layout.rs):
//! - `processor.rs` — parse, claim, settle (the decision for one delivery);
//! - `provision.rs` — the retry loop: List first when needed, attempt marker, POST,
//!   reconciliation of rejections; `tries.rs` what the loop keeps track of; `lease.rs`
//!   keeps the claim alive meanwhile;
//! - `disposition.rs` — **the** mapping from an API error to retry / dead-letter / pause;
//! - `circuit.rs` — the circuit and the account-wide rate-limit pause;
//! - `api.rs`, `store.rs`, `recorder.rs` — the ports; `events.rs`, `decision.rs`,
//!   `failure.rs`, `fingerprint.rs`, `reconcile.rs`, `last_outcome.rs` — the values they
//!   produce; `settle.rs` — the last outcome a settled delivery leaves.
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
mod failure;
mod fingerprint;
mod inbound;
mod last_outcome;
mod lease;
mod processor;
mod provision;
mod reconcile;
mod recorder;
mod settle;
mod store;
mod tries;

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod tests;

pub use crate::text::truncate;
pub use api::{ApiError, Created, GroupApi, GroupSummary, names_match};
pub use circuit::{Circuit, CircuitState};
pub use decision::{Decision, DeferReason, DelayReason, Outcome, SystemFault};
pub use disposition::{Disposition, disposition};
pub use events::{
    CREATED as CREATED_EVENT, CreatedEvent, ErrorInfo, FAILED as FAILED_EVENT, FailedEvent,
};
pub use failure::{Failure, FailureKind};
pub use fingerprint::differing_fields;
pub use inbound::Inbound;
pub use last_outcome::{LastOutcome, Place, TierPlace};
pub use processor::{Processed, Processor, ProcessorConfig};
pub use reconcile::{Reconciled, reconcile};
pub use recorder::{InFlight, NoRecorder, Recorder};
pub use store::{
    AttemptMarker, Claim, ClaimRequest, CreatedRecord, DedupStore, OutcomeKey, Posting,
    RecordResult, StoreError, Unreadable,
};

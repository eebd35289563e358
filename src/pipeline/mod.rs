//! The core: what to do with one delivery. It knows nothing of lapin or redis; it sees an
//! [`Inbound`] message, talks to a [`DedupStore`] and a [`GroupApi`] through traits, and
//! returns a [`Decision`] that the AMQP side carries out (publish, then ack).
//!
//! Invariants (SPEC §5):
//! - no POST without a claim on the ext id, and no POST while another owner holds it;
//! - before every POST an attempt marker is written; whenever an earlier attempt may have
//!   reached the API, the parent's children are listed first and a group with our ext id
//!   is success (no POST);
//! - every 4xx rejection is reconciled the same way before it is called a failure;
//! - faults of the system (credentials, endpoint, Redis) are never charged to the
//!   message: they become [`Decision::Delay`] with a deferral, never a dead letter.

mod circuit;
mod decision;
mod disposition;
mod events;
mod inbound;
mod ports;
mod processor;
mod reconcile;

pub use circuit::{Circuit, CircuitState};
pub use decision::{Decision, DelayReason, Failure, FailureKind, Outcome, SystemFault};
pub use disposition::{Disposition, disposition};
pub use events::{
    CREATED as CREATED_EVENT, CreatedEvent, ErrorInfo, FAILED as FAILED_EVENT, FailedEvent,
};
pub use inbound::Inbound;
pub use ports::{Claim, CreatedRecord, DedupStore, GroupApi, RecordResult, StoreError};
pub use processor::{Processor, ProcessorConfig, Verdict, differing_fields, truncate};
pub use reconcile::{Reconciled, reconcile};

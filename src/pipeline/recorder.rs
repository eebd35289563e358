//! What the core reports for monitoring, as a trait: the pipeline counts through
//! [`Recorder`] and never sees the metrics registry (`metrics.rs` implements it).

use super::decision::{DeferReason, Outcome};
use super::failure::FailureKind;

pub trait Recorder: Send + Sync {
    /// One delivery settled with `outcome`.
    fn command(&self, outcome: Outcome);
    /// One message dead-lettered by the worker.
    fn dead_letter(&self, kind: FailureKind);
    /// One message moved to a delay queue.
    fn deferral(&self, reason: DeferReason);
    /// One in-process retry of an API call.
    fn retry(&self);
    /// One command answered from the created record, without an API call.
    fn dedup_hit(&self);
    /// Deliveries being processed now went up (+1) or down (-1).
    fn in_flight(&self, delta: i64);
    /// A group was created for an ext id that already had another one recorded.
    fn orphan(&self);
}

/// Records nothing (a processor built without a recorder).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRecorder;

impl Recorder for NoRecorder {
    fn command(&self, _: Outcome) {}
    fn dead_letter(&self, _: FailureKind) {}
    fn deferral(&self, _: DeferReason) {}
    fn retry(&self) {}
    fn dedup_hit(&self) {}
    fn in_flight(&self, _: i64) {}
    fn orphan(&self) {}
}

/// Counts a delivery in flight until dropped.
pub struct InFlight<'a>(&'a dyn Recorder);

impl<'a> InFlight<'a> {
    pub fn start(recorder: &'a dyn Recorder) -> InFlight<'a> {
        recorder.in_flight(1);
        InFlight(recorder)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight(-1);
    }
}

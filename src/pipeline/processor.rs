//! [`Processor::process`]: one delivery in, one [`Processed`] out. Parse, claim, provision
//! (in `provision.rs`, with the lease kept by `lease.rs`), then settle: record the created
//! group, or release the claim and choose the delay tier, the dead letter or the parking.
//!
//! Invariants:
//! - no POST without a claim on the ext id, and no POST while another owner holds it;
//! - a claim is released whenever this delivery ends without a created record, so the next
//!   delivery can go ahead at once;
//! - a created record never overwrites a newer owner's claim or record (fencing);
//! - faults of the system become [`Decision::Delay`] with a deferral (and may open the
//!   circuit), never a dead letter, and never cost the message an attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::command::{CreateGroup, ExtId};
use crate::retry::RetryPolicy;
use crate::traceparent::Traceparent;

use super::api::{ApiError, GroupApi};
use super::circuit::{Circuit, CircuitState};
use super::decision::{Decision, DelayReason, Outcome, SystemFault};
use super::disposition::Disposition;
use super::events::{CreatedEvent, FailedEvent};
use super::failure::{Failure, FailureKind};
use super::fingerprint::{fingerprint, warn_if_different};
use super::inbound::Inbound;
use super::last_outcome::{LastOutcome, TierPlace};
use super::recorder::{NoRecorder, Recorder};
use super::store::{
    AttemptMarker, Claim, ClaimRequest, CreatedRecord, DedupStore, OutcomeKey, Posting,
    RecordResult, Unreadable,
};
use super::tries::{Provisioned, Tries};

#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    pub policy: RetryPolicy,
    /// Number of delay tiers (`retry.delays`).
    pub tiers: usize,
    pub lease: Duration,
    pub ttl: Duration,
    /// Prefix of claim owner tokens, e.g. `host:pid`.
    pub worker_id: String,
    /// Consecutive transient API failures that open the circuit.
    pub failure_threshold: u32,
    /// `api.timeout`: how long a POST may take before the client gives up on it.
    pub api_timeout: Duration,
    /// Added to `api_timeout` before a POST of a delivery that never settled is taken to
    /// have ended (the API may commit a little after the client gave up).
    pub takeover_margin: Duration,
    /// `dedup.verify_unknown`: before the first POST of an ext id the store knows nothing
    /// of, look for it among all of the parent's children.
    pub verify_unknown: bool,
}

/// The result of processing one delivery: the decision plus what the outcome log line
/// and the publishes need.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    pub decision: Decision,
    pub ext_id: Option<String>,
    pub correlation_id: Option<String>,
    /// The worker's span in the command's trace, sent to the API and on events.
    pub traceparent: Traceparent,
    /// The last HTTP status the API answered for this delivery.
    pub http_status: Option<u16>,
}

pub struct Processor<S, A> {
    pub(super) store: S,
    pub(super) api: A,
    pub(super) config: ProcessorConfig,
    pub(super) circuit: Arc<Circuit>,
    pub(super) recorder: Arc<dyn Recorder>,
    /// Claims held by deliveries in progress (owner → ext id), so a shutdown that cuts
    /// them off can hand them back.
    held: Mutex<HashMap<String, ExtId>>,
}

impl<S: DedupStore, A: GroupApi> Processor<S, A> {
    pub fn new(store: S, api: A, config: ProcessorConfig) -> Self {
        let circuit = Arc::new(Circuit::new(config.failure_threshold));
        Processor {
            store,
            api,
            config,
            circuit,
            recorder: Arc::new(NoRecorder),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Hand back the claims of every delivery still in progress (shutdown cut them off),
    /// so the next delivery of each ext id need not wait out the lease. Their attempt
    /// markers stay open: a POST that may be in the air is still waited out and looked up.
    pub async fn release_held(&self) -> usize {
        let held: Vec<(String, ExtId)> = crate::lock(&self.held).drain().collect();
        for (owner, ext_id) in &held {
            if let Err(e) = self.store.release(ext_id, owner, false).await {
                tracing::warn!(error = %e, ext_id = %ext_id, "could not hand back a claim; it expires with its lease");
            }
        }
        held.len()
    }

    fn hold(&self, owner: &str, ext_id: &ExtId) {
        crate::lock(&self.held).insert(owner.to_owned(), ext_id.clone());
    }

    fn unhold(&self, owner: &str) {
        crate::lock(&self.held).remove(owner);
    }

    /// Report to `recorder` (the worker's metrics).
    pub fn with_recorder(mut self, recorder: Arc<dyn Recorder>) -> Self {
        self.recorder = recorder;
        self
    }

    pub fn recorder(&self) -> &dyn Recorder {
        self.recorder.as_ref()
    }

    pub fn circuit(&self) -> &Arc<Circuit> {
        &self.circuit
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn api(&self) -> &A {
        &self.api
    }

    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }

    /// Keep the last outcome of a settled delivery for `status`: under its ext id, or for
    /// an invalid command without a valid one, under its message id. Best effort and after the ack: a
    /// failure is logged and costs nothing else. Skipped when Redis itself is the fault
    /// (the write would only wait for it), and when the store already has it (created,
    /// duplicate).
    pub async fn report(
        &self,
        msg: &Inbound,
        processed: &Processed,
        outcome: Outcome,
        tiers: &[TierPlace],
        dead_letter_queue: &str,
    ) {
        let redis_at_fault = |fault: &SystemFault| matches!(fault, SystemFault::Store(_));
        let store_down = match &processed.decision {
            Decision::Delay {
                reason: DelayReason::Parked(SystemFault::CircuitOpen),
                ..
            } => {
                matches!(self.circuit.state(), CircuitState::Open { fault } if redis_at_fault(&fault))
            }
            Decision::Delay {
                reason: DelayReason::Parked(fault),
                ..
            } => redis_at_fault(fault),
            _ => false,
        };
        if store_down {
            return;
        }
        let Some(record) = LastOutcome::settled(
            &processed.decision,
            outcome,
            msg,
            processed.ext_id.as_deref(),
            processed.http_status,
            tiers,
            dead_letter_queue,
        ) else {
            return;
        };
        let ext_id = processed
            .ext_id
            .as_deref()
            .and_then(|e| ExtId::parse(e).ok());
        if let Some(ext_id) = &ext_id {
            self.keep_outcome(OutcomeKey::ExtId(ext_id), &record).await;
        }
        // Only a command without a valid ext id needs a second name: a flood of invalid
        // commands then costs one small key each, never two.
        let invalid = matches!(
            &processed.decision,
            Decision::DeadLetter { failure, .. } if failure.kind == FailureKind::InvalidCommand
        );
        if let (true, None, Some(id)) = (invalid, &ext_id, msg.message_id.as_deref()) {
            self.keep_outcome(OutcomeKey::MessageId(id), &record).await;
        }
    }

    async fn keep_outcome(&self, key: OutcomeKey<'_>, record: &LastOutcome) {
        if let Err(e) = self
            .store
            .record_outcome(key, record, self.config.ttl)
            .await
        {
            tracing::warn!(error = %e, "could not keep the last outcome for status");
        }
    }

    /// Decide what to do with one delivery. Never fails: every error is a decision.
    pub async fn process(&self, msg: &Inbound) -> Processed {
        let traceparent = msg
            .traceparent
            .as_deref()
            .and_then(Traceparent::parse)
            .map(|t| t.child())
            .unwrap_or_else(Traceparent::new_root);
        let parsed = CreateGroup::from_delivery(
            msg.content_type.as_deref(),
            msg.content_encoding.as_deref(),
            &msg.body,
        );
        let command = match parsed {
            Ok(c) => c,
            Err(invalid) => {
                let ext_id = invalid.ext_id.as_ref().map(ExtId::to_string);
                record_span_ext_id(ext_id.as_deref());
                let failure = Failure {
                    kind: FailureKind::InvalidCommand,
                    message: invalid.to_string(),
                    http_status: None,
                    api_request_id: None,
                };
                tracing::warn!(error = %crate::text::printable(&failure.message, 1024), "invalid command");
                return Processed {
                    decision: dead_letter(msg, ext_id.as_deref(), failure, msg.attempts),
                    correlation_id: msg.correlation_id_or(ext_id.as_deref()),
                    ext_id,
                    traceparent,
                    http_status: None,
                };
            }
        };
        record_span_ext_id(Some(command.ext_id.as_str()));
        let tries = Tries::default();
        let decision = self.decide(msg, &command, &traceparent, &tries).await;
        Processed {
            decision,
            ext_id: Some(command.ext_id.to_string()),
            correlation_id: msg.correlation_id_or(Some(command.ext_id.as_str())),
            traceparent,
            http_status: tries.last_status(),
        }
    }

    async fn decide(
        &self,
        msg: &Inbound,
        command: &CreateGroup,
        trace: &Traceparent,
        tries: &Tries,
    ) -> Decision {
        let owner = format!(
            "{}/{}",
            self.config.worker_id,
            crate::id::random_uuid().simple()
        );
        let duplicate = LastOutcome::duplicate(msg, command.ext_id.as_str());
        // A fresh command with nothing known of it goes straight to its POST: the claim
        // writes its attempt marker too. Anything else (a redelivery, verify_unknown, an
        // open circuit) may look the group up or wait first, so it marks right before
        // posting instead.
        let premark = !msg.may_have_been_attempted()
            && !self.config.verify_unknown
            && !self.circuit.is_open();
        let request = ClaimRequest {
            owner: &owner,
            lease: self.config.lease,
            ttl: self.config.ttl,
            duplicate: &duplicate,
            mark: premark.then_some(Posting {
                parent: command.parent_id,
                name: &command.name,
            }),
        };
        // The mark's age counts from before the claim was sent: its reply may be slow.
        let claim_sent = tokio::time::Instant::now();
        match self.store.claim(&command.ext_id, &request).await {
            Err(e) => self.park(msg, 0, SystemFault::Store(e.to_string())),
            Ok(Claim::Created(record)) => {
                self.recorder.dedup_hit();
                warn_if_different(command, &record);
                Decision::Created {
                    event: CreatedEvent::new(msg, command, &record, true, msg.attempts),
                }
            }
            Ok(Claim::HeldByOther { owner }) => {
                tracing::info!(holder = %owner, "ext id claimed by another worker; deferring");
                claimed_elsewhere(msg)
            }
            Ok(Claim::Acquired { marker, marked }) => {
                if marked {
                    tries.premarked(claim_sent);
                }
                self.work(msg, command, trace, tries, &owner, Some(marker))
                    .await
            }
            Ok(Claim::Unreadable(found)) => {
                self.take_over_unreadable(msg, command, trace, tries, &owner, &found)
                    .await
            }
        }
    }

    /// Holding the claim: provision while keeping the lease, then settle. `marker` is the
    /// attempt marker when the claim read it already (`None`: read it now).
    async fn work(
        &self,
        msg: &Inbound,
        command: &CreateGroup,
        trace: &Traceparent,
        tries: &Tries,
        owner: &str,
        marker: Option<Option<AttemptMarker>>,
    ) -> Decision {
        self.hold(owner, &command.ext_id);
        let result = tokio::select! {
            r = self.provision(msg, command, trace, tries, owner, marker) => r,
            never = self.keep_lease(&command.ext_id, owner, tries) => match never {},
        };
        let decision = self.settle(msg, command, owner, tries, result).await;
        self.unhold(owner);
        decision
    }

    async fn settle(
        &self,
        msg: &Inbound,
        command: &CreateGroup,
        owner: &str,
        tries: &Tries,
        result: Result<Provisioned, Disposition>,
    ) -> Decision {
        let attempts = msg.attempts.saturating_add(tries.posts());
        let provisioned = match result {
            Ok(p) => p,
            Err(d) => {
                if let Err(e) = self.store.release(&command.ext_id, owner, true).await {
                    tracing::warn!(error = %e, "could not release the claim; it expires with its lease");
                }
                return match d {
                    Disposition::DeadLetter(failure) => {
                        dead_letter(msg, Some(command.ext_id.as_str()), failure, attempts)
                    }
                    Disposition::Pause(fault) => self.park(msg, tries.posts(), fault),
                    Disposition::Retry(e) => self.next_tier(msg, command, attempts, &e),
                };
            }
        };
        let (record, outcome) = self.record_for(msg, command, &provisioned, attempts).await;
        let (reported, orphaned) = self.keep_record(command, owner, &record, &outcome).await;
        let duplicate = provisioned.duplicate || orphaned;
        let mut event = CreatedEvent::new(msg, command, &reported, duplicate, attempts);
        if reported.org_unit_id == record.org_unit_id {
            event.api_request_id = provisioned.api_request_id;
        }
        Decision::Created { event }
    }

    /// The created record and last outcome for a group known to exist after the tries.
    async fn record_for(
        &self,
        msg: &Inbound,
        command: &CreateGroup,
        provisioned: &Provisioned,
        attempts: u32,
    ) -> (CreatedRecord, LastOutcome) {
        // A group found by List may carry another name or parent than the command (it was
        // created under what an earlier POST sent): the event and record say what exists.
        let (name, parent) = match &provisioned.found {
            Some(g) => (
                g.org_unit_name.clone(),
                g.org_unit_parent_id.unwrap_or(command.parent_id),
            ),
            None => (command.name.clone(), command.parent_id),
        };
        let now = crate::clock::now_rfc3339();
        let mut record = CreatedRecord {
            org_unit_id: provisioned.org_unit_id,
            created_at: now.clone(),
            api_request_id: provisioned.api_request_id.clone(),
            org_unit_name: name,
            org_unit_parent_id: parent,
            fingerprint: fingerprint(command),
            message_id: msg.message_id.clone(),
            found_at: None,
        };
        let ext_id = command.ext_id.as_str();
        let id = provisioned.org_unit_id;
        if !provisioned.duplicate {
            return (record, LastOutcome::created(msg, ext_id, attempts, id));
        }
        // It existed before this delivery (its record was lost): keep when it was created,
        // if an earlier outcome still says so, instead of "created now".
        record.created_at = self
            .original_creation(&command.ext_id, id)
            .await
            .unwrap_or_else(|| now.clone());
        record.found_at = Some(now);
        (record, LastOutcome::found(msg, ext_id, attempts, id))
    }

    /// Keep `record` (only while this owner holds the claim): the record that stands, and
    /// whether ours became an orphan.
    async fn keep_record(
        &self,
        command: &CreateGroup,
        owner: &str,
        record: &CreatedRecord,
        outcome: &LastOutcome,
    ) -> (CreatedRecord, bool) {
        let kept = self
            .store
            .record_created(&command.ext_id, owner, record, outcome, self.config.ttl)
            .await;
        match kept {
            Ok(RecordResult::Fenced(Some(existing)))
                if existing.org_unit_id != record.org_unit_id =>
            {
                // Our POST landed after the claim was taken over and another group was
                // recorded: two groups exist for one ext id. The recorded one stands (every
                // other delivery reports it); ours is an orphan that someone must remove.
                self.recorder.orphan();
                tracing::error!(
                    orphan_org_unit_id = record.org_unit_id,
                    recorded_org_unit_id = existing.org_unit_id,
                    "orphaned group: created after the claim was lost, while another group is recorded for this ext id"
                );
                return (existing, true);
            }
            Ok(RecordResult::Written) => {}
            Ok(RecordResult::Fenced(_)) => {
                tracing::warn!("lease was taken over; the newer owner's record stands");
            }
            // The group exists and the event says so; a later duplicate finds it by List.
            Err(e) => tracing::warn!(error = %e, "could not record the created group in Redis"),
        }
        (record.clone(), false)
    }

    /// A record written by another version, or damaged: it concerns this ext id only. Take
    /// it over (compare-and-set) and treat the group as possibly created.
    async fn take_over_unreadable(
        &self,
        msg: &Inbound,
        command: &CreateGroup,
        trace: &Traceparent,
        tries: &Tries,
        owner: &str,
        found: &Unreadable,
    ) -> Decision {
        tracing::error!(
            found = %found.describe(),
            "unreadable dedup record; replacing it with a claim and reconciling through List"
        );
        match self
            .store
            .replace_unreadable(&command.ext_id, found, owner, self.config.lease)
            .await
        {
            Ok(true) => {
                tries.assume_attempted();
                self.work(msg, command, trace, tries, owner, None).await
            }
            Ok(false) => claimed_elsewhere(msg),
            Err(e) => self.park(msg, 0, SystemFault::Store(e.to_string())),
        }
    }

    /// When `org_unit_id` was created, if the last outcome kept for `ext_id` still says it.
    async fn original_creation(&self, ext_id: &ExtId, org_unit_id: i64) -> Option<String> {
        match self.store.outcome(ext_id).await {
            Ok(Some(last))
                if last.outcome == "created" && last.org_unit_id == Some(org_unit_id) =>
            {
                Some(last.at)
            }
            _ => None,
        }
    }

    fn next_tier(
        &self,
        msg: &Inbound,
        command: &CreateGroup,
        attempts: u32,
        last: &ApiError,
    ) -> Decision {
        let tier = msg.retries as usize;
        if tier < self.config.tiers {
            return Decision::Delay {
                tier,
                attempts,
                retries: msg.retries.saturating_add(1),
                deferrals: msg.deferrals,
                reason: DelayReason::Retry {
                    last_error: last.to_string(),
                    http_status: last.http_status(),
                },
            };
        }
        dead_letter(
            msg,
            Some(command.ext_id.as_str()),
            Failure {
                kind: FailureKind::RetriesExhausted,
                message: format!("transient failures outlasted every delay tier; last: {last}"),
                http_status: last.http_status(),
                api_request_id: last.request_id().map(str::to_owned),
            },
            attempts,
        )
    }

    fn park(&self, msg: &Inbound, posts: u32, fault: SystemFault) -> Decision {
        if fault.opens_circuit() {
            self.circuit.trip(fault.clone());
        }
        tracing::info!(fault = fault.label(), error = %fault, "system fault; parking the message");
        Decision::Delay {
            tier: 0,
            attempts: msg.attempts.saturating_add(posts),
            retries: msg.retries,
            deferrals: msg.deferrals.saturating_add(1),
            reason: DelayReason::Parked(fault),
        }
    }
}

fn record_span_ext_id(ext_id: Option<&str>) {
    if let Some(e) = ext_id {
        tracing::Span::current().record("ext_id", e);
    }
}

fn dead_letter(msg: &Inbound, ext_id: Option<&str>, failure: Failure, attempts: u32) -> Decision {
    let event = FailedEvent::new(msg, ext_id, &failure, attempts);
    Decision::DeadLetter {
        failure,
        event,
        attempts,
    }
}

/// Another worker holds the claim (or took the record over first): wait in the first tier,
/// not charged as an attempt.
fn claimed_elsewhere(msg: &Inbound) -> Decision {
    Decision::Delay {
        tier: 0,
        attempts: msg.attempts,
        retries: msg.retries,
        deferrals: msg.deferrals.saturating_add(1),
        reason: DelayReason::Claimed,
    }
}

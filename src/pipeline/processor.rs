use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use backon::Retryable;

use crate::command::{CreateGroup, ExtId};
use crate::convirza::{ApiError, GroupSummary};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::traceparent::Traceparent;

use super::circuit::Circuit;
use super::decision::{Decision, DelayReason, Failure, FailureKind, SystemFault};
use super::disposition::{Disposition, disposition};
use super::events::{CREATED, CreatedEvent, ErrorInfo, FAILED, FailedEvent, SCHEMA_VERSION};
use super::inbound::Inbound;
use super::ports::{Claim, CreatedRecord, DedupStore, GroupApi, RecordResult};
use super::reconcile::{Reconciled, reconcile};

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
}

/// The result of processing one delivery: the decision plus what the outcome log line
/// and the publishes need.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    pub ext_id: Option<String>,
    pub correlation_id: Option<String>,
    /// The worker's span in the command's trace, sent to the API and on events.
    pub traceparent: Traceparent,
    /// The last HTTP status the API answered for this delivery.
    pub http_status: Option<u16>,
}

pub struct Processor<S, A> {
    store: S,
    api: A,
    config: ProcessorConfig,
    circuit: Arc<Circuit>,
    metrics: Arc<Metrics>,
}

/// Per-delivery bookkeeping shared by the tries of one retry loop.
#[derive(Default)]
struct Tries {
    /// POSTs sent by this delivery.
    posts: AtomicU32,
    /// POSTs of this delivery that may have created the group (success, 5xx, lost answer).
    maybe_committed: AtomicU32,
    /// Whether some earlier POST (any delivery) may have reached the API.
    may_have_reached: AtomicBool,
    lease_lost: AtomicBool,
    last_status: AtomicU32,
}

impl Tries {
    fn posts(&self) -> u32 {
        self.posts.load(Ordering::SeqCst)
    }

    fn note_status(&self, status: Option<u16>) {
        if let Some(s) = status {
            self.last_status.store(u32::from(s), Ordering::SeqCst);
        }
    }

    fn last_status(&self) -> Option<u16> {
        u16::try_from(self.last_status.load(Ordering::SeqCst))
            .ok()
            .filter(|s| *s != 0)
    }

    /// A group found by List counts as pre-existing unless a POST of this delivery may
    /// have created it (SPEC §4, `duplicate`).
    fn found_is_duplicate(&self) -> bool {
        self.maybe_committed.load(Ordering::SeqCst) == 0
    }
}

/// A group known to exist after the retry loop.
struct Provisioned {
    org_unit_id: i64,
    api_request_id: Option<String>,
    duplicate: bool,
}

impl<S: DedupStore, A: GroupApi> Processor<S, A> {
    pub fn new(store: S, api: A, config: ProcessorConfig) -> Self {
        let circuit = Arc::new(Circuit::new(config.failure_threshold));
        Processor {
            store,
            api,
            config,
            circuit,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// Count into `metrics` (shared with the API client and the HTTP endpoint).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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

    /// Decide what to do with one delivery. Never fails: every error is a decision.
    pub async fn process(&self, msg: &Inbound) -> Verdict {
        let traceparent = msg
            .traceparent
            .as_deref()
            .and_then(Traceparent::parse)
            .map(|t| t.child())
            .unwrap_or_else(Traceparent::new_root);
        let command = match CreateGroup::from_delivery(msg.content_type.as_deref(), &msg.body) {
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
                tracing::warn!(error = %failure.message, "invalid command");
                return Verdict {
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
        Verdict {
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
            uuid::Uuid::new_v4().simple()
        );
        match self
            .store
            .claim(&command.ext_id, &owner, self.config.lease)
            .await
        {
            Err(e) => self.park(msg, 0, SystemFault::Store(e.0)),
            Ok(Claim::Created(record)) => {
                self.metrics.dedup_hit();
                warn_if_different(command, &record);
                Decision::Created {
                    event: created_event(msg, command, &record, true, msg.attempts),
                }
            }
            Ok(Claim::HeldByOther { owner }) => {
                tracing::info!(holder = %owner, "ext id claimed by another worker; deferring");
                Decision::Delay {
                    tier: 0,
                    attempts: msg.attempts,
                    retries: msg.retries,
                    deferrals: msg.deferrals.saturating_add(1),
                    reason: DelayReason::Claimed,
                }
            }
            Ok(Claim::Acquired) => {
                let result = tokio::select! {
                    r = self.provision(msg, command, trace, tries) => r,
                    never = self.keep_lease(&command.ext_id, &owner, tries) => match never {},
                };
                self.settle(msg, command, &owner, tries, result).await
            }
        }
    }

    /// Renew the lease every third of its length while the work runs. Never returns; on
    /// loss it flags `lease_lost` so no further POST is sent.
    async fn keep_lease(
        &self,
        ext_id: &ExtId,
        owner: &str,
        tries: &Tries,
    ) -> std::convert::Infallible {
        let every = self.config.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.store.renew(ext_id, owner, self.config.lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("lease lost while working; no further POST for this delivery");
                    tries.lease_lost.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                // Redis trouble: keep trying; the lease itself still runs until it expires.
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
        }
    }

    /// The in-process retry loop (SPEC §5.5) around one "try": optional List, marker,
    /// POST, and reconciliation of a rejection.
    async fn provision(
        &self,
        msg: &Inbound,
        command: &CreateGroup,
        trace: &Traceparent,
        tries: &Tries,
    ) -> Result<Provisioned, Disposition> {
        let earlier = msg.may_have_been_attempted()
            || self
                .store
                .has_attempt(&command.ext_id)
                .await
                .map_err(|e| Disposition::Pause(SystemFault::Store(e.0)))?;
        tries.may_have_reached.store(earlier, Ordering::SeqCst);
        let policy = self.config.policy;
        (|| self.try_once(command, trace, tries))
            .retry(policy)
            .sleep(tokio::time::sleep)
            .when(|d: &Disposition| matches!(d, Disposition::Retry(_)))
            .adjust(move |d: &Disposition, scheduled| {
                policy.clamp_retry_after(d.retry_after(), scheduled)
            })
            .notify(|d: &Disposition, wait: Duration| {
                self.metrics.retry();
                tracing::warn!(
                    error = %d,
                    http_status = d.http_status(),
                    retry_in_ms = wait.as_millis() as u64,
                    "transient failure; retrying"
                );
            })
            .await
    }

    async fn try_once(
        &self,
        command: &CreateGroup,
        trace: &Traceparent,
        tries: &Tries,
    ) -> Result<Provisioned, Disposition> {
        self.gate().await?;
        if tries.may_have_reached.load(Ordering::SeqCst) {
            let children = self.list_children(command, trace, tries).await?;
            match reconcile(command, children) {
                Reconciled::Found(group) => {
                    tracing::info!(
                        org_unit_id = group.org_unit_id,
                        "group found by List; no POST needed"
                    );
                    return Ok(Provisioned {
                        org_unit_id: group.org_unit_id,
                        api_request_id: None,
                        duplicate: tries.found_is_duplicate(),
                    });
                }
                Reconciled::NameTaken(other) => {
                    return Err(name_conflict(command, &other, None, None));
                }
                Reconciled::NotFound => {}
            }
        }
        if tries.lease_lost.load(Ordering::SeqCst) {
            return Err(Disposition::Pause(SystemFault::LeaseLost));
        }
        self.gate().await?;
        self.store
            .mark_attempt(&command.ext_id, self.config.ttl)
            .await
            .map_err(|e| Disposition::Pause(SystemFault::Store(e.0)))?;
        tries.may_have_reached.store(true, Ordering::SeqCst);
        tries.posts.fetch_add(1, Ordering::SeqCst);
        let result = self.api.create_group(command, Some(trace)).await;
        match result {
            Ok(created) => {
                self.circuit.record_success();
                tries.note_status(Some(created.http_status));
                tries.maybe_committed.fetch_add(1, Ordering::SeqCst);
                Ok(Provisioned {
                    org_unit_id: created.org_unit_id,
                    api_request_id: created.request_id,
                    duplicate: false,
                })
            }
            Err(e) => {
                tries.note_status(e.http_status());
                if e.may_have_created() {
                    tries.maybe_committed.fetch_add(1, Ordering::SeqCst);
                }
                match e {
                    ApiError::Rejected { .. } | ApiError::DuplicateName { .. } => {
                        self.circuit.record_success();
                        self.reconcile_rejection(command, trace, tries, e).await
                    }
                    other => Err(self.api_failure(other)),
                }
            }
        }
    }

    /// Every 4xx rejection is checked against the API's own listing: the messages are
    /// prose, the listing is data.
    async fn reconcile_rejection(
        &self,
        command: &CreateGroup,
        trace: &Traceparent,
        tries: &Tries,
        rejection: ApiError,
    ) -> Result<Provisioned, Disposition> {
        let children = self.list_children(command, trace, tries).await?;
        match reconcile(command, children) {
            Reconciled::Found(group) => {
                tracing::info!(
                    org_unit_id = group.org_unit_id,
                    "rejected POST, but the group exists with our ext id"
                );
                Ok(Provisioned {
                    org_unit_id: group.org_unit_id,
                    api_request_id: None,
                    duplicate: tries.found_is_duplicate(),
                })
            }
            Reconciled::NameTaken(other) => Err(name_conflict(
                command,
                &other,
                rejection.http_status(),
                rejection.request_id().map(str::to_owned),
            )),
            Reconciled::NotFound => Err(Disposition::DeadLetter(Failure {
                kind: FailureKind::Rejected,
                message: rejection.message(),
                http_status: rejection.http_status(),
                api_request_id: rejection.request_id().map(str::to_owned),
            })),
        }
    }

    /// List the parent's children by name. A 4xx from List (e.g. the parent does not
    /// exist) means nothing can be found there.
    async fn list_children(
        &self,
        command: &CreateGroup,
        trace: &Traceparent,
        tries: &Tries,
    ) -> Result<Vec<GroupSummary>, Disposition> {
        match self
            .api
            .find_children_named(command.parent_id, &command.name, Some(trace))
            .await
        {
            // Only a POST that the API answers ends a run of failures: a working List says
            // nothing about whether groups can be created.
            Ok(children) => Ok(children),
            Err(ApiError::Rejected { .. } | ApiError::DuplicateName { .. }) => Ok(Vec::new()),
            Err(e) => {
                tries.note_status(e.http_status());
                Err(self.api_failure(e))
            }
        }
    }

    /// Before any API call: wait out an account-wide rate-limit pause; stop if the circuit
    /// opened meanwhile.
    async fn gate(&self) -> Result<(), Disposition> {
        self.circuit.wait_until_allowed().await;
        if self.circuit.is_open() {
            return Err(Disposition::Pause(SystemFault::CircuitOpen));
        }
        Ok(())
    }

    /// An API failure, through the disposition, with its effect on the whole worker: a 429
    /// pauses every call, and a run of transient failures opens the circuit.
    fn api_failure(&self, error: ApiError) -> Disposition {
        if let ApiError::RateLimited {
            retry_after: Some(wait),
        } = &error
        {
            self.circuit
                .pause_for((*wait).min(self.config.policy.max_retry_after));
        }
        match disposition(error) {
            Disposition::Retry(e) if self.circuit.record_transient(&e.to_string()) => {
                Disposition::Pause(SystemFault::ApiDown(e.to_string()))
            }
            other => other,
        }
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
                if let Err(e) = self.store.release(&command.ext_id, owner).await {
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
        let record = CreatedRecord {
            org_unit_id: provisioned.org_unit_id,
            created_at: crate::clock::now_rfc3339(),
            api_request_id: provisioned.api_request_id.clone(),
            org_unit_name: command.name.clone(),
            org_unit_parent_id: command.parent_id,
            fingerprint: fingerprint(command),
        };
        match self
            .store
            .record_created(&command.ext_id, owner, &record, self.config.ttl)
            .await
        {
            Ok(RecordResult::Written) => {}
            Ok(RecordResult::Fenced(Some(existing)))
                if existing.org_unit_id != record.org_unit_id =>
            {
                tracing::error!(
                    org_unit_id = record.org_unit_id,
                    recorded_org_unit_id = existing.org_unit_id,
                    "another owner recorded a different group for this ext id"
                );
            }
            Ok(RecordResult::Fenced(_)) => {
                tracing::warn!("lease was taken over; the newer owner's record stands");
            }
            // The group exists and the event says so; a later duplicate finds it by List.
            Err(e) => tracing::warn!(error = %e, "could not record the created group in Redis"),
        }
        let mut event = created_event(msg, command, &record, provisioned.duplicate, attempts);
        event.api_request_id = provisioned.api_request_id;
        Decision::Created { event }
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

fn name_conflict(
    command: &CreateGroup,
    other: &GroupSummary,
    http_status: Option<u16>,
    api_request_id: Option<String>,
) -> Disposition {
    Disposition::DeadLetter(Failure {
        kind: FailureKind::NameConflict,
        message: format!(
            "a group named {:?} already exists under parent {} with ext id {} (org_unit_id {})",
            other.org_unit_name.trim(),
            command.parent_id,
            other
                .org_unit_ext_id
                .as_deref()
                .map_or("none".to_owned(), |e| format!("{e:?}")),
            other.org_unit_id
        ),
        http_status,
        api_request_id,
    })
}

fn dead_letter(msg: &Inbound, ext_id: Option<&str>, failure: Failure, attempts: u32) -> Decision {
    let event = FailedEvent {
        event: FAILED.into(),
        schema_version: SCHEMA_VERSION,
        ext_id: ext_id.map(str::to_owned),
        error: ErrorInfo {
            kind: failure.kind.as_str().into(),
            http_status: failure.http_status,
            message: truncate(&failure.message, 1024),
            api_request_id: failure.api_request_id.clone(),
        },
        attempts,
        dead_lettered: true,
        command_message_id: msg.message_id.clone(),
        correlation_id: msg.correlation_id_or(ext_id),
        occurred_at: crate::clock::now_rfc3339(),
    };
    Decision::DeadLetter {
        failure,
        event,
        attempts,
    }
}

fn created_event(
    msg: &Inbound,
    command: &CreateGroup,
    record: &CreatedRecord,
    duplicate: bool,
    attempts: u32,
) -> CreatedEvent {
    CreatedEvent {
        event: CREATED.into(),
        schema_version: SCHEMA_VERSION,
        ext_id: command.ext_id.to_string(),
        org_unit_id: record.org_unit_id,
        org_unit_name: record.org_unit_name.clone(),
        org_unit_parent_id: record.org_unit_parent_id,
        duplicate,
        attempts,
        api_request_id: record.api_request_id.clone(),
        command_message_id: msg.message_id.clone(),
        correlation_id: msg.correlation_id_or(Some(command.ext_id.as_str())),
        occurred_at: crate::clock::now_rfc3339(),
    }
}

/// Cut to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Field → FNV-1a hash of the value: stable across builds and versions, and keeps
/// addresses and phone numbers out of Redis.
fn fingerprint(command: &CreateGroup) -> std::collections::BTreeMap<String, String> {
    command
        .fingerprint_fields()
        .into_iter()
        .map(|(field, value)| (field.to_owned(), crate::hash::short_hash(value.as_bytes())))
        .collect()
}

/// The fields of `command` that differ from the command that created `record`.
pub fn differing_fields(command: &CreateGroup, record: &CreatedRecord) -> Vec<String> {
    let ours = fingerprint(command);
    ours.keys()
        .chain(record.fingerprint.keys())
        .filter(|k| ours.get(*k) != record.fingerprint.get(*k))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn warn_if_different(command: &CreateGroup, record: &CreatedRecord) {
    if record.fingerprint.is_empty() {
        return;
    }
    let differing = differing_fields(command, record);
    if !differing.is_empty() {
        tracing::warn!(
            differing_fields = ?differing,
            org_unit_id = record.org_unit_id,
            "duplicate command differs from the one that created the group; the group is not changed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}

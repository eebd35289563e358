//! The provisioning loop of one claimed delivery: the in-process retry loop around one
//! "try" (look the group up when an earlier POST may have landed, attempt marker, POST,
//! reconciliation of a rejection).
//!
//! Invariants:
//! - an attempt marker is written before every POST — atomically with a check that the
//!   claim is still ours, so a worker that lost it never posts — and keeps the name and
//!   parent posted. For the first POST of a fresh command the claim itself writes it; it
//!   stands only if the POST follows within a second of sending the claim, and then no
//!   second ownership check precedes that POST: a claim taken from us in that second (only
//!   a shutdown's hand-back can, as a lease is longer) is covered by the open marker, which
//!   makes the next owner wait `api.timeout` plus the margin before it looks or posts;
//! - whenever an earlier POST (of any delivery) may have reached the API, the group is
//!   looked up first, under the command's name *and* every name and parent an earlier POST
//!   used: a group with our ext id is success and no POST is sent;
//! - a delivery that takes over from one that never settled (its marker is still open)
//!   posts nothing until that one's POST must have ended (`api.timeout` plus a margin);
//! - every 4xx rejection is reconciled against the listing before it is called a failure;
//! - no POST after the lease was lost, or while the circuit is open; a 429 holds back every
//!   API call of the worker, not just this one.

use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::Retryable;

use crate::command::CreateGroup;
use crate::traceparent::Traceparent;

use super::api::{ApiError, GroupApi, GroupSummary};
use super::decision::SystemFault;
use super::disposition::{Disposition, disposition};
use super::failure::{Failure, FailureKind};
use super::inbound::Inbound;
use super::processor::Processor;
use super::reconcile::{Reconciled, reconcile};
use super::store::{AttemptMarker, DedupStore, Posting};
use super::tries::{Provisioned, Tries};

/// How long after the claim its attempt marker still stands for the first POST.
const PREMARK_FRESH: Duration = Duration::from_secs(1);

/// Where the group may be: `(parent, name)` pairs, the command's first.
struct Lookups(Vec<(i64, String)>);

impl<S: DedupStore, A: GroupApi> Processor<S, A> {
    /// The in-process retry loop around [`Self::try_once`].
    pub(super) async fn provision(
        &self,
        msg: &Inbound,
        command: &CreateGroup,
        trace: &Traceparent,
        tries: &Tries,
        owner: &str,
        known: Option<Option<AttemptMarker>>,
    ) -> Result<Provisioned, Disposition> {
        let store_fault =
            |e: super::store::StoreError| Disposition::Pause(SystemFault::Store(e.to_string()));
        let marker = match known {
            Some(marker) => marker,
            None => self
                .store
                .attempt(&command.ext_id)
                .await
                .map_err(store_fault)?,
        };
        if let Some(m) = marker.as_ref().filter(|m| m.open) {
            // The delivery that posted last never settled (crashed, frozen, cut off): its
            // POST may still be in the air. Post nothing until it must have ended.
            let must_end = self.config.api_timeout + self.config.takeover_margin;
            if m.age < must_end {
                let wait = must_end - m.age;
                tracing::warn!(
                    wait_ms = wait.as_millis() as u64,
                    "an earlier POST for this ext id may still be in the air; waiting before looking it up"
                );
                tokio::time::sleep(wait).await;
            }
        }
        let mut lookups = Lookups(vec![(command.parent_id, command.name.clone())]);
        for (parent, name) in marker.iter().flat_map(|m| m.posted.iter()) {
            let pair = (*parent, name.clone());
            if !lookups.0.contains(&pair) {
                lookups.0.push(pair);
            }
        }
        // Nothing in the store about this ext id: with `dedup.verify_unknown`, look for it
        // among all of the parent's children before the first POST (Redis may have lost it).
        let unknown = marker.is_none() && !msg.may_have_been_attempted();
        if unknown && self.config.verify_unknown {
            tries.scan_parent.store(true, Ordering::SeqCst);
        }
        let earlier = tries.may_have_reached.load(Ordering::SeqCst)
            || msg.may_have_been_attempted()
            || marker.is_some()
            || tries.scan_parent.load(Ordering::SeqCst);
        tries.may_have_reached.store(earlier, Ordering::SeqCst);
        let policy = self.config.policy;
        (|| self.try_once(command, trace, tries, owner, &lookups))
            .retry(policy)
            .sleep(tokio::time::sleep)
            .when(|d: &Disposition| matches!(d, Disposition::Retry(_)))
            .adjust(move |d: &Disposition, scheduled| {
                policy.clamp_retry_after(d.retry_after(), scheduled)
            })
            .notify(|d: &Disposition, wait: Duration| {
                self.recorder.retry();
                tracing::warn!(
                    error = %d,
                    http_status = d.http_status(),
                    retry_in_ms = wait.as_millis() as u64,
                    "transient failure; retrying"
                );
            })
            .await
    }

    /// Write the attempt marker before a POST (unless the claim wrote it moments ago), only
    /// while this owner still holds the claim.
    async fn mark_before_post(
        &self,
        command: &CreateGroup,
        tries: &Tries,
        owner: &str,
    ) -> Result<(), Disposition> {
        let posting = Posting {
            parent: command.parent_id,
            name: &command.name,
        };
        let fresh = PREMARK_FRESH.min(self.config.lease / 4);
        let marked = tries.take_premark(fresh)
            || self
                .store
                .mark_attempt(&command.ext_id, owner, posting, self.config.ttl)
                .await
                .map_err(|e| Disposition::Pause(SystemFault::Store(e.to_string())))?;
        if !marked {
            // The claim is not ours any more: another owner may be posting.
            tries.lease_lost.store(true, Ordering::SeqCst);
            return Err(Disposition::Pause(SystemFault::LeaseLost));
        }
        Ok(())
    }

    async fn try_once(
        &self,
        command: &CreateGroup,
        trace: &Traceparent,
        tries: &Tries,
        owner: &str,
        lookups: &Lookups,
    ) -> Result<Provisioned, Disposition> {
        self.gate().await?;
        if tries.may_have_reached.load(Ordering::SeqCst) {
            // Boxed, as is the reconciliation below: the listing's future is large, and only
            // a delivery that lists should carry it (inline, it made every delivery's task
            // several KiB larger, copied on every spawn).
            match Box::pin(self.look_up(command, trace, tries, lookups)).await? {
                Reconciled::Found(group) => {
                    tracing::info!(
                        org_unit_id = group.org_unit_id,
                        "group found by List; no POST needed"
                    );
                    return Ok(tries.found(group));
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
        self.mark_before_post(command, tries, owner).await?;
        tries.may_have_reached.store(true, Ordering::SeqCst);
        tries.posts.fetch_add(1, Ordering::SeqCst);
        match self.api.create_group(command, Some(trace)).await {
            Ok(created) => {
                self.circuit.record_success();
                tries.note_status(Some(created.http_status));
                tries.maybe_committed.fetch_add(1, Ordering::SeqCst);
                Ok(Provisioned {
                    org_unit_id: created.org_unit_id,
                    api_request_id: created.request_id,
                    duplicate: false,
                    found: None,
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
                        Box::pin(self.reconcile_rejection(command, trace, tries, lookups, e)).await
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
        lookups: &Lookups,
        rejection: ApiError,
    ) -> Result<Provisioned, Disposition> {
        match self.look_up(command, trace, tries, lookups).await? {
            Reconciled::Found(group) => {
                tracing::info!(
                    org_unit_id = group.org_unit_id,
                    "rejected POST, but the group exists with our ext id"
                );
                Ok(tries.found(group))
            }
            Reconciled::NameTaken(other) => Err(name_conflict(
                command,
                &other,
                rejection.http_status(),
                rejection.request_id().map(str::to_owned),
            )),
            // Rejected or DuplicateName: the disposition dead-letters it as `rejected`.
            Reconciled::NotFound => Err(disposition(rejection)),
        }
    }

    /// Look the group up: under the command's name, under every `(parent, name)` an
    /// earlier POST used, and — once, when the store knew nothing and
    /// `dedup.verify_unknown` is on — among all of the parent's children.
    async fn look_up(
        &self,
        command: &CreateGroup,
        trace: &Traceparent,
        tries: &Tries,
        lookups: &Lookups,
    ) -> Result<Reconciled, Disposition> {
        let mut named = Vec::new();
        let mut elsewhere = Vec::new();
        for (i, (parent, name)) in lookups.0.iter().enumerate() {
            let children = self
                .listing(
                    tries,
                    self.api.find_children_named(*parent, name, Some(trace)),
                )
                .await?;
            let hit = children
                .iter()
                .any(|g| g.org_unit_ext_id.as_deref() == Some(command.ext_id.as_str()));
            if i == 0 {
                named = children;
            } else {
                elsewhere.extend(children);
            }
            if hit {
                break;
            }
        }
        if tries.scan_parent.swap(false, Ordering::SeqCst) {
            let found = self
                .listing(
                    tries,
                    self.api.find_child_with_ext_id(
                        command.parent_id,
                        command.ext_id.as_str(),
                        Some(trace),
                    ),
                )
                .await?;
            elsewhere.extend(found);
        }
        Ok(reconcile(command, named, elsewhere))
    }

    /// One listing call. A 4xx (e.g. the parent does not exist) means nothing can be found
    /// there; only a POST the API answers ends a run of failures (a working List says
    /// nothing about whether groups can be created).
    async fn listing<T: Default>(
        &self,
        tries: &Tries,
        call: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, Disposition> {
        match call.await {
            Ok(found) => Ok(found),
            Err(ApiError::Rejected { .. } | ApiError::DuplicateName { .. }) => Ok(T::default()),
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

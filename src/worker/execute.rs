//! Carrying out a [`Decision`] on the broker: confirmed publishes, then the ack.
//! Also the one `outcome` log line per delivery.
//!
//! Invariants: the ack comes after every publish of the decision is confirmed; a publish
//! that fails parks the message (or returns it to the queue), never drops it; only a lost
//! channel ends the session — a message that cannot be encoded or routed costs only itself
//! (or, when the broker refuses everything, opens the circuit).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::field::Empty;

use crate::amqp::headers::{self, HeaderUpdate};
use crate::amqp::{PublishError, PublishProbe, Publisher, short};
use crate::pipeline::{
    Decision, DeferReason, DelayReason, Failure, InFlight, Inbound, Outcome, Processed,
    SystemFault, truncate,
};

/// Give a delivery back to its queue.
const REQUEUE: BasicNackOptions = BasicNackOptions {
    multiple: false,
    requeue: true,
};

/// Why the publishes of a decision did not all go out.
#[derive(Debug, thiserror::Error)]
enum SettleError {
    /// Publishing an event failed; `probe` can publish it again to test the fix.
    #[error("{source}")]
    Event {
        #[source]
        source: PublishError,
        probe: Box<PublishProbe>,
    },
    /// Publishing a copy into `queue` (the DLQ or a delay tier) failed.
    #[error("{source}")]
    Copy {
        #[source]
        source: PublishError,
        queue: String,
    },
    /// Our own event could not be encoded (a bug; it concerns this message only).
    #[error("cannot encode the event: {0}")]
    Encode(#[source] serde_json::Error),
    /// A delay tier the configuration does not have (a bug; this message only).
    #[error("no delay tier {0}")]
    NoTier(usize),
}

impl SettleError {
    fn publish_error(&self) -> Option<&PublishError> {
        match self {
            SettleError::Event { source, .. } | SettleError::Copy { source, .. } => Some(source),
            SettleError::Encode(_) | SettleError::NoTier(_) => None,
        }
    }
}

use super::{Probe, Shared};

/// What every delivery task of one broker session shares (one reference count per task,
/// not one per field).
pub(crate) struct Links {
    pub publisher: Publisher,
    /// The channel the deliveries arrive on: they are acked on it directly.
    pub consume: Channel,
    /// Cancelled at the drain deadline: unfinished deliveries return to the queue.
    pub abort: CancellationToken,
    /// Cancelled by a task that finds the publish channel gone.
    pub broken: CancellationToken,
}

/// [`handle`] as a task of its own: a panic in it costs only this delivery, which goes
/// back to the queue at once (`crate::fatal`). A delivery already settled is not touched
/// again: its acker is spent.
pub(crate) fn guarded(
    shared: Arc<Shared>,
    links: Arc<Links>,
    delivery: Delivery,
) -> impl std::future::Future<Output = ()> + Send {
    let acker = delivery.acker.clone();
    let give_back = move || {
        tokio::spawn(async move {
            let _ = acker.nack(REQUEUE).await;
        });
    };
    crate::fatal::DeliveryWork::new(handle(shared, links, delivery), give_back)
}

/// Process one delivery end to end.
pub(crate) async fn handle(shared: Arc<Shared>, links: Arc<Links>, delivery: Delivery) {
    // Before anything recurses on its headers (amqp::deep).
    let delivery = crate::amqp::deep::shallow(delivery);
    let Links {
        publisher,
        consume,
        abort,
        broken,
    } = &*links;
    let started = Instant::now();
    let _in_flight = InFlight::start(shared.processor.recorder());
    let inbound = headers::inbound(
        &delivery.data,
        &delivery.properties,
        delivery.redelivered,
        &shared.counter_bounds,
    );
    let span = delivery_span(&inbound, &shared.settings.topology.work_queue);
    let settled_key = shared.settled.key(&inbound);
    if let Some(outcome) = shared.settled.settled(&inbound, settled_key) {
        ack_again(consume, &delivery, &inbound, outcome, started)
            .instrument(span)
            .await;
        return;
    }
    // Acking or nacking a delivery is claimed first: whichever of the two branches below
    // claims it settles the delivery, and the other waits to be dropped. Without it, an ack
    // in flight at the drain deadline could be followed by a nack of the same tag, which
    // the broker answers by closing the channel (and the outcome line would lie).
    let settling = AtomicBool::new(false);
    let work = async {
        let processed = shared.processor.process(&inbound).await;
        if let Some(c) = &processed.correlation_id {
            tracing::Span::current().record("correlation_id", c.as_str());
        }
        let outcome = Executor {
            settled_key,
            dead_letter_written: AtomicBool::new(false),
            settling: &settling,
            shared: &shared,
            publisher,
            consume,
            delivery: &delivery,
            inbound: &inbound,
            processed: &processed,
            broken,
        }
        .run()
        .await;
        log_outcome(&processed, outcome, started);
        count(&shared, &processed, outcome);
        Some((processed, outcome))
    };
    let aborted = async {
        abort.cancelled().await;
        claim_or_wait(&settling).await;
        give_back(&shared, &delivery, &inbound, started).await;
        None
    };
    // The drain deadline races the settling only: once the delivery is acked (or parked,
    // or returned), it is settled, and the report for `status` that follows must not be
    // cut off and counted a second time as requeued. Both are pinned where they are and
    // raced by reference: moving them into `select!` would keep a second copy of each in
    // this task (it doubled the task's size, copied on every spawn).
    let work = std::pin::pin!(work.instrument(span.clone()));
    let aborted = std::pin::pin!(aborted.instrument(span.clone()));
    let settled = tokio::select! {
        biased;
        s = work => s,
        s = aborted => s,
    };
    if let Some((processed, outcome)) = settled {
        report(&shared, &inbound, &processed, outcome)
            .instrument(span)
            .await;
    }
}

/// What the delivery ended as, kept for `status` (after the ack: it is a report, not
/// part of settling).
async fn report(shared: &Shared, inbound: &Inbound, processed: &Processed, outcome: Outcome) {
    shared
        .processor
        .report(
            inbound,
            processed,
            outcome,
            &shared.tier_places,
            &shared.settings.topology.dead_letter_queue,
        )
        .await;
}

/// A redelivery of a message this process settled already (its ack was lost with the
/// connection): acked again, nothing published, its one outcome line says so, and it is
/// not counted a second time.
async fn ack_again(
    consume: &Channel,
    delivery: &Delivery,
    inbound: &Inbound,
    outcome: Outcome,
    started: Instant,
) {
    if let Err(e) = consume
        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
        .await
    {
        tracing::error!(error = %e, "ack failed; the broker will redeliver");
    }
    tracing::info!(
        outcome = outcome.as_str(),
        attempts = inbound.attempts,
        already_settled = true,
        duration_ms = started.elapsed().as_millis() as u64,
        "outcome"
    );
}

/// The span of one delivery: every log line about it carries these fields (`ext_id` and
/// `correlation_id` are recorded once the command is read). When traces are exported it
/// is also the trace's consumer span (messaging conventions; the dotted attributes stay out
/// of the log lines), the child of the command's `traceparent`.
fn delivery_span(inbound: &Inbound, queue: &str) -> tracing::Span {
    if !crate::otel::enabled() {
        return tracing::info_span!(
            "delivery",
            ext_id = Empty,
            message_id = inbound.message_id.as_deref(),
            correlation_id = Empty,
        );
    }
    let span = tracing::info_span!(
        "delivery",
        ext_id = Empty,
        message_id = inbound.message_id.as_deref(),
        correlation_id = Empty,
        otel.name = format!("process {queue}"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = queue,
        messaging.message.id = inbound.message_id.as_deref(),
        messaging.message.conversation_id = inbound.correlation_id.as_deref(),
        messaging.message.body.size = inbound.body.len(),
    );
    crate::otel::set_remote_parent(&span, inbound.traceparent.as_deref());
    span
}

/// Unfinished at the drain deadline: back to the queue. If a POST was in flight, the
/// attempt marker makes the next delivery list before posting again.
async fn give_back(shared: &Shared, delivery: &Delivery, inbound: &Inbound, started: Instant) {
    let outcome = match delivery.nack(REQUEUE).await {
        // `false`: the channel is gone and nothing was sent; the broker redelivers.
        Ok(true) => Outcome::Requeued,
        Ok(false) | Err(_) => Outcome::Failed,
    };
    shared.processor.recorder().command(outcome);
    tracing::info!(
        outcome = outcome.as_str(),
        attempts = inbound.attempts,
        duration_ms = started.elapsed().as_millis() as u64,
        "outcome"
    );
}

/// Take the right to ack or nack a delivery or, when the other side of the race took it
/// (the work, or the drain deadline returning the delivery), wait to be dropped.
async fn claim_or_wait(settling: &AtomicBool) {
    let taken = settling
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err();
    if taken {
        std::future::pending::<()>().await;
    }
}

/// Metrics for one settled delivery: its outcome, and what was published for it.
fn count(shared: &Shared, processed: &Processed, outcome: Outcome) {
    let recorder = shared.processor.recorder();
    recorder.command(outcome);
    match (&processed.decision, outcome) {
        (Decision::DeadLetter { failure, .. }, Outcome::DeadLettered) => {
            recorder.dead_letter(failure.kind)
        }
        (Decision::Delay { reason, .. }, Outcome::Deferred) => {
            recorder.deferral(reason.defer_reason())
        }
        // Could not publish the outcome and parked instead.
        (_, Outcome::Deferred) => recorder.deferral(DeferReason::Parked),
        _ => {}
    }
}

fn log_outcome(processed: &Processed, outcome: Outcome, started: Instant) {
    let (attempts, org_unit_id, error_kind, delay_tier) = match &processed.decision {
        Decision::Created { event } => (event.attempts, Some(event.org_unit_id), None, None),
        Decision::DeadLetter {
            failure, attempts, ..
        } => (*attempts, None, Some(failure.kind.as_str()), None),
        Decision::Delay { tier, attempts, .. } => (*attempts, None, None, Some(*tier)),
    };
    let reason = match (&processed.decision, outcome) {
        (Decision::Delay { reason, .. }, _) => Some(reason.log_label()),
        // The outcome could not be published: the delivery was parked (circuit: publish).
        (_, Outcome::Deferred) => Some("publish"),
        _ => None,
    };
    tracing::info!(
        outcome = outcome.as_str(),
        attempts,
        http_status = processed.http_status,
        org_unit_id,
        error_kind,
        delay_tier,
        reason,
        duration_ms = started.elapsed().as_millis() as u64,
        "outcome"
    );
}

struct Executor<'a> {
    /// This delivery's identity in [`super::settled::Settled`].
    settled_key: u64,
    /// Set once this delivery's dead letter is written (a later failure must not write
    /// another).
    dead_letter_written: AtomicBool,
    /// Claimed by whoever acks or nacks the delivery (see [`claim_or_wait`]).
    settling: &'a AtomicBool,
    shared: &'a Shared,
    publisher: &'a Publisher,
    consume: &'a Channel,
    delivery: &'a Delivery,
    inbound: &'a Inbound,
    processed: &'a Processed,
    broken: &'a CancellationToken,
}

impl Executor<'_> {
    async fn run(&self) -> Outcome {
        let published = match &self.processed.decision {
            Decision::Created { event } => {
                self.publish_event(&self.shared.settings.topology.created_routing_key, event)
                    .await
            }
            // The dead letter first, then its event. A message whose dead letter exists
            // already (an earlier delivery wrote it, then could not publish the event) only
            // owes the event: at most one dead letter per command, however often the event
            // fails.
            Decision::DeadLetter {
                failure,
                event,
                attempts,
            } => {
                let copied = if self.inbound.dead_lettered {
                    Ok(())
                } else {
                    self.dead_letter_copy(failure, *attempts).await
                };
                if copied.is_ok() {
                    self.dead_letter_written.store(true, Ordering::SeqCst);
                    let key = &self.shared.settings.topology.failed_routing_key;
                    self.publish_event(key, event).await
                } else {
                    copied
                }
            }
            Decision::Delay {
                tier,
                attempts,
                retries,
                deferrals,
                reason,
            } => {
                let update = self.counters(*attempts, *retries, *deferrals);
                self.copy_to_tier(*tier, update, reason).await
            }
        };
        match published {
            Ok(()) => self.ack(self.processed.decision.outcome()).await,
            Err(e) => self.recover(e).await,
        }
    }

    /// A publish failed: the message must not be lost nor charged for it. Park it in the
    /// first delay tier if the broker still takes publishes, else return it to the queue.
    async fn recover(&self, error: SettleError) -> Outcome {
        tracing::error!(error = %error, "publishing the outcome failed");
        match error.publish_error() {
            // The channel is gone (or not in confirm mode): nothing more can be settled on
            // it; the session restarts on a new one and the broker redelivers.
            Some(PublishError::Channel(_) | PublishError::NoConfirms) => {
                self.broken.cancel();
                // Claimed all the same: if the drain deadline is returning the delivery
                // already, its outcome is the one to tell.
                claim_or_wait(self.settling).await;
                return Outcome::Failed;
            }
            // The broker refuses, cannot route or does not confirm what we publish: a fault
            // of the system that every delivery will hit. The circuit's probe tests exactly
            // this publish. (An unconfirmed one may have been routed: its retry can send a
            // second event, the contract's "at least once".)
            Some(
                PublishError::Unroutable { .. }
                | PublishError::Nacked { .. }
                | PublishError::Unconfirmed { .. },
            ) => {
                let probe = match &error {
                    SettleError::Event { probe, .. } => Probe::Publish(probe.clone()),
                    SettleError::Copy { queue, .. } => Probe::Queue(queue.clone()),
                    _ => Probe::Queue(self.shared.settings.topology.dead_letter_queue.clone()),
                };
                self.shared.set_probe(probe);
                self.shared
                    .processor
                    .circuit()
                    .trip(SystemFault::Publish(error.to_string()));
            }
            // Only this message is concerned: park it, keep the session and the circuit.
            Some(PublishError::TooLarge) | None => {}
        }
        let is_delay = matches!(self.processed.decision, Decision::Delay { .. });
        if !is_delay {
            let fault = DelayReason::Parked(SystemFault::Publish(error.to_string()));
            let parked = self
                .park_copy(
                    self.inbound.deferrals.saturating_add(1),
                    &fault,
                    self.dead_letter_written.load(Ordering::SeqCst),
                )
                .await;
            match parked {
                Ok(()) => return self.ack(Outcome::Deferred).await,
                Err(e) => tracing::error!(error = %e, "parking failed too"),
            }
        }
        claim_or_wait(self.settling).await;
        match self.delivery.nack(REQUEUE).await {
            Ok(true) => Outcome::Requeued,
            Ok(false) => {
                tracing::error!("cannot nack: the channel is gone; the broker redelivers");
                Outcome::Failed
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot nack; the broker will redeliver when the channel closes");
                Outcome::Failed
            }
        }
    }

    async fn ack(&self, outcome: Outcome) -> Outcome {
        claim_or_wait(self.settling).await;
        // Every publish of the outcome is confirmed: if this ack is lost with the
        // connection, the redelivery is only acked again.
        self.shared.settled.remember(self.settled_key, outcome);
        // On the channel itself rather than through the delivery's acker, which hands each
        // ack to the client's internal task first: one task hop and one spawn fewer per
        // delivery. The acker's own guard against a second settle is `settling` here; the
        // tag is this channel's, as the delivery came on it.
        match self
            .consume
            .basic_ack(self.delivery.delivery_tag, BasicAckOptions::default())
            .await
        {
            Ok(_) => outcome,
            Err(e) => {
                tracing::error!(error = %e, "ack failed after the outcome was published; the broker will redeliver");
                Outcome::Failed
            }
        }
    }

    async fn publish_event<E: serde::Serialize>(
        &self,
        routing_key: &str,
        event: &E,
    ) -> Result<(), SettleError> {
        let body = serde_json::to_vec(event).map_err(SettleError::Encode)?;
        let event_name = routing_key_event_name(&self.processed.decision);
        let exchange = &self.shared.settings.topology.event_exchange;
        // With traces exported, the publish's own span is the consumers' parent.
        let span = crate::otel::publish_span(exchange, routing_key);
        let probe = PublishProbe {
            exchange: exchange.clone(),
            routing_key: routing_key.to_owned(),
            body,
            properties: self.event_properties(event_name, crate::otel::traceparent_of(&span)),
        };
        let published = self
            .publisher
            .publish_probe(&probe)
            .instrument(span.clone())
            .await;
        if let Err(source) = published {
            if !span.is_none() {
                span.record("error.type", source.kind());
                span.record("otel.status_code", "error");
            }
            return Err(SettleError::Event {
                source,
                probe: Box::new(probe),
            });
        }
        if let Some(reply_to) = &self.inbound.reply_to {
            if self.shared.own_queues.contains(reply_to) {
                // The default exchange would deliver into our own work, delay or dead-letter
                // queue: a bogus command or a planted dead letter.
                tracing::warn!(
                    reply_to = %crate::text::printable(reply_to, 255),
                    "reply_to names a queue of the worker's own topology; no reply sent"
                );
            } else if let Err(e) = self
                .publisher
                .publish("", reply_to, &probe.body, probe.properties, false)
                .await
            {
                // Best effort: a requester's reply queue may be gone; the event itself is out.
                tracing::warn!(
                    error = %e,
                    reply_to = %crate::text::printable(reply_to, 255),
                    "could not send the event to reply_to"
                );
            }
        }
        Ok(())
    }

    fn event_properties(&self, event_name: &str, traceparent: Option<String>) -> BasicProperties {
        let traceparent = traceparent.unwrap_or_else(|| self.processed.traceparent.to_string());
        let mut update = HeaderUpdate::default().text(headers::TRACEPARENT, &traceparent);
        if let Some(ext) = &self.processed.ext_id {
            update = update.text(headers::EXT_ID, ext);
        }
        let headers = update.table();
        let mut properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2)
            .with_type(ShortString::from(event_name))
            .with_message_id(ShortString::from(crate::id::random_uuid().to_string()))
            .with_app_id(ShortString::from("group-provisioner"))
            .with_timestamp(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            )
            .with_headers(headers);
        if let Some(c) = &self.processed.correlation_id {
            properties = properties.with_correlation_id(short(c));
        }
        properties
    }

    async fn dead_letter_copy(&self, failure: &Failure, attempts: u32) -> Result<(), SettleError> {
        let now = crate::clock::now_rfc3339();
        let mut update = HeaderUpdate::default()
            .text(headers::X_ERROR_KIND, failure.kind.as_str())
            .text(
                headers::X_ERROR_MESSAGE,
                &truncate(&failure.message, headers::MAX_ERROR_MESSAGE_BYTES),
            )
            .int(headers::X_ATTEMPTS, attempts)
            .text(
                headers::X_FIRST_FAILED_AT,
                self.inbound.first_failed_at.as_deref().unwrap_or(&now),
            )
            .text(headers::X_LAST_FAILED_AT, &now)
            .text(headers::X_WORKER_VERSION, crate::VERSION);
        if let Some(status) = failure.http_status {
            update = update.int(headers::X_HTTP_STATUS, u32::from(status));
        }
        let topology = &self.shared.settings.topology;
        self.publish_copy(
            &topology.dead_letter_exchange,
            &topology.dead_letter_queue,
            &topology.dead_letter_queue,
            update,
        )
        .await
    }

    /// Publish a copy of the delivery with `update`'s headers: bounded so it fits a frame;
    /// if it still does not fit, or the broker refuses it, a minimal copy (body and the
    /// worker's headers) — one odd message never takes the session down.
    async fn publish_copy(
        &self,
        exchange: &str,
        routing_key: &str,
        queue: &str,
        update: HeaderUpdate,
    ) -> Result<(), SettleError> {
        let full = update.clone().apply(&self.delivery.properties);
        let first = if self.publisher.fits(&full) {
            self.publisher
                .publish(exchange, routing_key, &self.delivery.data, full, true)
                .await
        } else {
            Err(PublishError::TooLarge)
        };
        let result = match first {
            Err(e @ (PublishError::TooLarge | PublishError::Nacked { .. })) => {
                tracing::warn!(error = %e, queue, "the copy was refused; sending a minimal copy");
                let minimal = update.apply_minimal(&self.delivery.properties);
                self.publisher
                    .publish(exchange, routing_key, &self.delivery.data, minimal, true)
                    .await
            }
            other => other,
        };
        result.map_err(|source| SettleError::Copy {
            source,
            queue: queue.to_owned(),
        })
    }

    /// Park the delivery in the first tier after its outcome could not be published,
    /// recording whether its dead letter was written already.
    async fn park_copy(
        &self,
        deferrals: u32,
        reason: &DelayReason,
        dead_lettered: bool,
    ) -> Result<(), SettleError> {
        let update = self.counters(self.inbound.attempts, self.inbound.retries, deferrals);
        let update = if dead_lettered && !self.inbound.dead_lettered {
            update.text(headers::X_DEAD_LETTERED_AT, &crate::clock::now_rfc3339())
        } else {
            update
        };
        self.copy_to_tier(0, update, reason).await
    }

    /// The worker's own headers on every copy it parks. A delivery whose dead letter is
    /// written already keeps saying so on whatever copy follows (a full one or a minimal
    /// one), so that however often it is parked, it never gets a second dead letter.
    fn counters(&self, attempts: u32, retries: u32, deferrals: u32) -> HeaderUpdate {
        let update = HeaderUpdate::default()
            .int(headers::X_ATTEMPTS, attempts)
            .int(headers::X_RETRIES, retries)
            .int(headers::X_DEFERRALS, deferrals);
        if self.inbound.dead_lettered {
            update.text(headers::X_DEAD_LETTERED_AT, &crate::clock::now_rfc3339())
        } else {
            update
        }
    }

    async fn copy_to_tier(
        &self,
        tier: usize,
        update: HeaderUpdate,
        reason: &DelayReason,
    ) -> Result<(), SettleError> {
        let settings = &self.shared.settings;
        let Some(delay) = settings.retry.delays.get(tier) else {
            return Err(SettleError::NoTier(tier));
        };
        let mut update = update;
        if let DelayReason::Retry { .. } = reason {
            let now = crate::clock::now_rfc3339();
            update = update
                .text(
                    headers::X_FIRST_FAILED_AT,
                    self.inbound.first_failed_at.as_deref().unwrap_or(&now),
                )
                .text(headers::X_LAST_FAILED_AT, &now);
        }
        // With traces exported, the next delivery is this one's child: one ext id's story
        // across its delay tiers reads as one trace.
        if let Some(tp) = crate::otel::current_traceparent() {
            update = update.text(headers::TRACEPARENT, &tp);
        }
        let queue = settings.topology.delay_queue(delay);
        self.publish_copy("", &queue, &queue, update).await
    }
}

fn routing_key_event_name(decision: &Decision) -> &'static str {
    match decision {
        Decision::DeadLetter { .. } => crate::pipeline::FAILED_EVENT,
        _ => crate::pipeline::CREATED_EVENT,
    }
}

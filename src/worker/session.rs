//! One consuming session per broker connection, the supervisor that replaces a lost
//! session, and the circuit's effect on consumption.
//!
//! Invariants:
//! - while the circuit is open the worker holds no consumer: it cancels it, lets the
//!   deliveries it still holds park themselves, probes after `circuit.cooldown`, and only
//!   consumes again once the probe succeeds;
//! - a session whose connection or publish channel is lost is abandoned and rebuilt
//!   (connection, channels, topology, consumer) with jittered backoff; the broker
//!   redelivers whatever it had not been acked;
//! - on shutdown the consumer is cancelled first, in-flight deliveries get
//!   `shutdown.drain_timeout` to finish, and the rest are nacked back to the queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::verify::{self, EstablishError, Established};
use crate::amqp::{self, PublishError, Publisher, topology::Topology};
use crate::config::Declare;
use crate::pipeline::{ApiError, CircuitState, DedupStore, GroupApi, StoreError};
use crate::retry::RetryPolicy;

use super::{Probe, Shared, execute};

/// A broker step that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error("{what} did not complete within {after:?}")]
    Timeout { what: &'static str, after: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to the broker: {0}")]
    Connect(#[source] amqp::NodesError),
    #[error("broker channel error: {0}")]
    Channel(#[source] StepError),
    #[error("cannot declare the topology: {0}")]
    Topology(String),
    /// The topology can be neither declared nor verified: one line with the object, the
    /// permission and the fix. Retried every [`TOPOLOGY_RETRY`], not sooner.
    #[error("{0}")]
    Unusable(String),
    #[error("consumer failed: {0}")]
    Consume(#[source] StepError),
    #[error("the broker cancelled our consumer (work queue deleted?)")]
    Cancelled,
    #[error("the publish channel is gone")]
    PublishChannel,
}

/// Reconnect schedule: quick first retry, capped so a long outage costs little, jittered
/// so N replicas do not reconnect in lockstep.
const RECONNECT: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(200),
    multiplier: 2.0,
    max_interval: Duration::from_secs(10),
    max_tries: u32::MAX,
    max_retry_after: Duration::ZERO,
};

/// How often a topology that can be neither declared nor verified is tried again (and
/// said again): ops must act, and the line must not flood the log.
const TOPOLOGY_RETRY: Duration = Duration::from_secs(30);

/// How often the session reads the unrouted-events queue's depth.
const UNROUTED_POLL: Duration = Duration::from_secs(5);

// Aborts its task when dropped (when the session ends, however it ends).
use tokio_util::task::AbortOnDropHandle as AbortOnDrop;

/// Connecting or declaring longer than this is treated as a hung broker.
const BROKER_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// After the drain timeout, how long the nacks of the unfinished deliveries may take.
const ABORT_GRACE: Duration = Duration::from_secs(5);

fn reconnect_delay(failures: u32) -> Duration {
    RECONNECT
        .jittered(failures, rand::random::<f64>())
        .max(Duration::from_millis(50))
}

pub(crate) async fn supervise(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    consuming: watch::Sender<bool>,
) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        match session(&shared, &shutdown, &consuming, &mut failures).await {
            Ok(()) => break,
            Err(e) => {
                consuming.send_replace(false);
                // The next connection starts at the next node of `amqp.url`.
                let nodes = shared.settings.amqp.url.urls().len();
                let next = (shared.node.load(Ordering::SeqCst) + 1) % nodes;
                shared.node.store(next, Ordering::SeqCst);
                let wait = if let SessionError::Unusable(line) = &e {
                    tracing::error!(retry_in_ms = TOPOLOGY_RETRY.as_millis() as u64, "{line}");
                    shared.set_broker_problem(Some(line.clone()));
                    TOPOLOGY_RETRY
                } else {
                    let wait = reconnect_delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker session lost; reconnecting");
                    shared.set_broker_problem(None);
                    wait
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
    }
    consuming.send_replace(false);
}

async fn step<T>(
    what: &'static str,
    f: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, StepError> {
    match tokio::time::timeout(BROKER_STEP_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(StepError::Timeout {
            what,
            after: BROKER_STEP_TIMEOUT,
        }),
    }
}

/// Say the session is up, and warn if the broker allows frames deeper than this process
/// can parse.
fn announce(shared: &Shared, conn: &lapin::Connection) {
    shared.set_broker_problem(None);
    let settings = &shared.settings;
    let amqp = &settings.amqp.url.urls()
        [shared.node.load(Ordering::SeqCst) % settings.amqp.url.urls().len()];
    if settings.topology.declare == Declare::Verify || shared.declare_refused().is_some() {
        tracing::info!(%amqp, "connected to the broker; topology verified");
    } else {
        tracing::info!(%amqp, "connected to the broker; topology declared");
    }
    let frame_max = u64::from(conn.configuration().frame_max());
    if frame_max > amqp::frame_max_covered() {
        tracing::warn!(
            frame_max,
            covered = amqp::frame_max_covered(),
            "the broker's frame_max lets a publisher nest headers deeper than this process's \
             thread stacks can parse; lower frame_max or raise RUST_MIN_STACK (512 bytes per \
             byte of frame_max)"
        );
    }
}

/// Watch the unrouted-events queue's depth, for the metric and its alert, until the
/// returned guard is dropped with the session.
async fn watch_unrouted(shared: &Arc<Shared>, conn: &lapin::Connection) -> AbortOnDrop<()> {
    let channel = conn.create_channel().await.ok();
    let shared = shared.clone();
    AbortOnDrop::new(tokio::spawn(async move {
        let Some(channel) = channel else { return };
        let queue = shared.settings.topology.unrouted_events.clone();
        // A passive declare of a missing queue closes the channel: then there is nothing
        // to watch until the next session declares it again.
        while let Ok(n) = amqp::ready_count(&channel, &queue).await {
            shared.metrics.set_unrouted_events(n);
            tokio::time::sleep(UNROUTED_POLL).await;
        }
    }))
}

/// End a session: drain (or, at the deadline, hand back) its deliveries when it ends on
/// purpose; on a lost publish channel, close the consume channel so the broker redelivers.
async fn wind_down(
    shared: &Shared,
    tracker: &TaskTracker,
    abort: &CancellationToken,
    conn: &lapin::Connection,
    consume_channel: &Channel,
    result: &Result<(), SessionError>,
) {
    let settings = &shared.settings;
    tracker.close();
    if result.is_ok() {
        let drain = settings.shutdown.drain_timeout;
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            tracing::warn!(
                drain_timeout_ms = drain.as_millis() as u64,
                in_flight = tracker.len(),
                "drain timeout: returning unfinished deliveries to the queue"
            );
            // Hand their claims back first: the next delivery of each can go ahead at once
            // (their attempt markers stay open, so a POST in the air is still waited out).
            let released = shared.processor.release_held().await;
            tracing::info!(released, "claims of unfinished deliveries handed back");
            abort.cancel();
            let _ = tokio::time::timeout(ABORT_GRACE, tracker.wait()).await;
        }
        let _ = conn.close(200, ShortString::from("worker shutdown")).await;
    }
    // On a lost session the in-flight tasks cannot settle on a dead channel; the broker
    // redelivers their messages, so they are left to finish on their own. They hold the
    // consume channel (to ack on it). When only the publish channel is gone, that channel
    // still lives: close it, or it would keep their deliveries from the broker until the
    // slowest of those tasks ends (none of them can settle without publishing). Otherwise
    // it is either gone with its connection or healthy (our consumer was cancelled), and
    // the tasks still running may ack on it.
    if matches!(result, Err(SessionError::PublishChannel)) {
        let _ = tokio::time::timeout(
            ABORT_GRACE,
            consume_channel.close(200, ShortString::from("session lost")),
        )
        .await;
    }
}

async fn session(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    consuming: &watch::Sender<bool>,
    failures: &mut u32,
) -> Result<(), SessionError> {
    let settings = &shared.settings;
    // SIGTERM while the broker is unreachable must not wait out the connect timeout.
    let (conn, publish_channel, consume_channel) = tokio::select! {
        ready = open(shared) => ready?,
        () = shutdown.cancelled() => return Ok(()),
    };
    announce(shared, &conn);
    shared.connected.store(true, Ordering::SeqCst);

    let tracker = TaskTracker::new();
    let links = Arc::new(execute::Links {
        publisher: Publisher::new(publish_channel)
            .with_frame_max(conn.configuration().frame_max())
            .with_confirm_timeout(shared.settings.amqp.confirm_timeout),
        consume: consume_channel.clone(),
        abort: CancellationToken::new(),
        broken: CancellationToken::new(),
    });
    let (publisher, abort, broken) = (&links.publisher, &links.abort, &links.broken);
    let _stop_watch = watch_unrouted(shared, &conn).await;
    let circuit = shared.processor.circuit().clone();
    let mut circuit_rx = circuit.subscribe();

    let result: Result<(), SessionError> = 'session: loop {
        if circuit.is_open() {
            match wait_for_close(shared, &conn, publisher, shutdown, broken).await {
                Wait::Closed => {}
                Wait::Shutdown => break 'session Ok(()),
                Wait::Broken => break 'session Err(SessionError::PublishChannel),
            }
        }
        let (mut consumer, tag) = match consume(shared, &consume_channel).await {
            Ok(c) => c,
            Err(e) => break 'session Err(e),
        };
        *failures = 0;
        consuming.send_replace(true);
        tracing::info!(queue = %settings.topology.work_queue, consumer_tag = %tag, "consuming");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    consuming.send_replace(false);
                    cancel_consumer(&consume_channel, &tag).await;
                    break 'session Ok(());
                }
                () = broken.cancelled() => break 'session Err(SessionError::PublishChannel),
                _opened = async { circuit_rx.wait_for(|s| matches!(s, CircuitState::Open { .. })).await.is_ok() } => {
                    consuming.send_replace(false);
                    cancel_consumer(&consume_channel, &tag).await;
                    // Deliveries already sent to us: each finds the circuit open and parks.
                    let held = drain_held(&mut consumer, |d| {
                        tracker.spawn(execute::guarded(shared.clone(), links.clone(), d));
                    })
                    .await;
                    tracing::info!(held, "consumer cancelled while the circuit is open");
                    continue 'session;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        tracker.spawn(execute::guarded(shared.clone(), links.clone(), delivery));
                    }
                    Some(Err(e)) => break 'session Err(SessionError::Consume(e.into())),
                    None => break 'session Err(SessionError::Cancelled),
                },
            }
        }
    };
    consuming.send_replace(false);
    shared.connected.store(false, Ordering::SeqCst);
    wind_down(shared, &tracker, abort, &conn, &consume_channel, &result).await;
    result
}

/// Connection, a confirm-mode publish channel with the topology declared, and a consume
/// channel with the QoS set.
async fn open(shared: &Shared) -> Result<(lapin::Connection, Channel, Channel), SessionError> {
    let settings = &shared.settings;
    let (conn, node) = amqp::connect_nodes(
        &settings.amqp.url,
        &settings.amqp.tls,
        shared.node.load(Ordering::SeqCst),
        &format!("group-provisioner {}", shared.worker_id),
    )
    .await
    .map_err(SessionError::Connect)?;
    shared.node.store(node, Ordering::SeqCst);
    let publish_channel = step("open channel", conn.create_channel())
        .await
        .map_err(SessionError::Channel)?;
    step(
        "confirm.select",
        publish_channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .map_err(SessionError::Channel)?;
    let topology = Topology::new(&settings.topology, &settings.retry.delays);
    let established = establish(shared, &conn, node, &topology).await?;
    let declared = established.declared();
    if let Some(words) = &declared.legacy_event_exchange {
        tracing::warn!(
            exchange = %topology.event_exchange,
            broker = %words,
            "{}",
            amqp::topology::legacy_event_exchange_advice(&topology.event_exchange, &topology.unrouted_events)
        );
    }
    if declared.legacy_dead_letter_queue.is_some() {
        // The worker only publishes to the DLQ, so it runs on; inspection is what is at risk.
        tracing::warn!(
            queue = %topology.dead_letter_queue,
            "{}",
            amqp::topology::legacy_dead_letter_queue_advice(&topology.dead_letter_queue)
        );
    }
    let consume_channel = step("open channel", conn.create_channel())
        .await
        .map_err(SessionError::Channel)?;
    step(
        "basic.qos",
        consume_channel.basic_qos(settings.amqp.prefetch, BasicQosOptions::default()),
    )
    .await
    .map_err(SessionError::Channel)?;
    Ok((conn, publish_channel, consume_channel))
}

/// The topology declared, or verified where this user may not (or is told not to) declare
/// it. A refusal is remembered: later sessions verify without asking again.
async fn establish(
    shared: &Shared,
    conn: &lapin::Connection,
    node: usize,
    topology: &Topology,
) -> Result<Established, SessionError> {
    let refused = shared.declare_refused().clone();
    let work = verify::establish(&shared.settings, conn, node, topology, refused.clone());
    let established = match tokio::time::timeout(BROKER_STEP_TIMEOUT, work).await {
        Ok(Ok(established)) => established,
        Ok(Err(EstablishError::Declare(words))) => return Err(SessionError::Topology(words)),
        Ok(Err(EstablishError::Unusable {
            line, refused: now, ..
        })) => {
            // Remembered either way: a refused declaration is not tried (and logged by the
            // client) again every 30 s.
            *shared.declare_refused() = now;
            return Err(SessionError::Unusable(line));
        }
        Err(_) => {
            return Err(SessionError::Topology(format!(
                "no answer within {BROKER_STEP_TIMEOUT:?}"
            )));
        }
    };
    if let Established::Verified {
        refused: Some(words),
        ..
    } = &established
        && refused.is_none()
    {
        *shared.declare_refused() = Some(words.clone());
        tracing::warn!(
            broker = %words,
            "this user may not declare the topology; verified it instead and runs on it \
             (topology.declare = \"verify\" skips the attempt)"
        );
    }
    Ok(established)
}

async fn consume(shared: &Shared, channel: &Channel) -> Result<(Consumer, String), SessionError> {
    let tag = format!(
        "group-provisioner/{}/{}",
        shared.worker_id,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let consumer = step(
        "basic.consume",
        channel.basic_consume(
            ShortString::from(shared.settings.topology.work_queue.as_str()),
            amqp::short(&tag),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .map_err(SessionError::Consume)?;
    Ok((consumer, tag))
}

async fn cancel_consumer(channel: &Channel, tag: &str) {
    if let Err(e) = step(
        "basic.cancel",
        channel.basic_cancel(amqp::short(tag), BasicCancelOptions::default()),
    )
    .await
    {
        tracing::warn!(error = %e, "could not cancel the consumer");
    }
}

/// Hand every delivery still buffered for a cancelled consumer to `spawn`; returns how
/// many there were.
async fn drain_held(
    consumer: &mut Consumer,
    mut spawn: impl FnMut(lapin::message::Delivery),
) -> usize {
    let mut held = 0;
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_secs(5), consumer.next()).await
    {
        held += 1;
        spawn(delivery);
    }
    held
}

enum Wait {
    Closed,
    Shutdown,
    Broken,
}

/// Probe after each cool-down until the probe succeeds and the circuit closes.
async fn wait_for_close(
    shared: &Shared,
    conn: &lapin::Connection,
    publisher: &Publisher,
    shutdown: &CancellationToken,
    broken: &CancellationToken,
) -> Wait {
    let circuit = shared.processor.circuit();
    let cooldown = shared.settings.circuit.cooldown;
    let mut probes = 0u32;
    loop {
        tokio::select! {
            () = tokio::time::sleep(cooldown) => {}
            () = shutdown.cancelled() => return Wait::Shutdown,
            () = broken.cancelled() => return Wait::Broken,
        }
        if !circuit.is_open() {
            return Wait::Closed;
        }
        // A session that lost its connection or publish channel while the circuit was open
        // can never pass the probe: rebuild it rather than probe a dead channel forever.
        if !conn.status().connected() || !publisher.channel().status().connected() {
            return Wait::Broken;
        }
        probes += 1;
        match probe(shared, conn, publisher).await {
            Ok(()) => {
                shared.clear_probe();
                circuit.close();
                return Wait::Closed;
            }
            Err(ProbeError::Publish(PublishError::Channel(e))) => {
                tracing::warn!(error = %e, "the probe's channel is gone; rebuilding the session");
                return Wait::Broken;
            }
            // The state change was logged when the circuit opened; repeat only now and then.
            Err(e) if probes % 10 == 1 => {
                tracing::warn!(probes, error = %e, "circuit still open: probe failed")
            }
            Err(e) => tracing::debug!(probes, error = %e, "probe failed"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("redis: {0}")]
    Store(#[source] StoreError),
    #[error("api: {0}")]
    Api(#[source] ApiError),
    #[error("publish: {0}")]
    Publish(#[source] PublishError),
    #[error("queue {queue}: {source}")]
    Queue {
        queue: String,
        #[source]
        source: StepError,
    },
}

/// The circuit's probe: Redis answers, the API accepts our credentials (a read-only call
/// that creates nothing), and — when a publish fault opened the circuit — that publish goes
/// through now (or the queue it could not reach exists).
async fn probe(
    shared: &Shared,
    conn: &lapin::Connection,
    publisher: &Publisher,
) -> Result<(), ProbeError> {
    shared
        .processor
        .store()
        .ping()
        .await
        .map_err(ProbeError::Store)?;
    shared
        .processor
        .api()
        .probe()
        .await
        .map_err(ProbeError::Api)?;
    match shared.probe() {
        None => Ok(()),
        Some(Probe::Publish(p)) => publisher
            .publish_probe(&p)
            .await
            .map_err(ProbeError::Publish),
        Some(Probe::Queue(queue)) => {
            // A passive declare of a missing queue closes its channel: use a fresh one.
            let checked = async {
                let channel = step("open channel", conn.create_channel()).await?;
                let found = step("queue.declare", amqp::ready_count(&channel, &queue)).await;
                let _ = channel.close(200, ShortString::from("probe done")).await;
                found.map(|_| ())
            };
            checked
                .await
                .map_err(|source| ProbeError::Queue { queue, source })
        }
    }
}

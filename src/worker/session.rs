//! One consuming session per broker connection, and the supervisor that replaces a lost
//! session (SPEC §5.11).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::{self, Publisher, topology::Topology};
use crate::retry::RetryPolicy;

use super::{Shared, execute};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to the broker: {0}")]
    Connect(String),
    #[error("broker channel error: {0}")]
    Channel(String),
    #[error("cannot declare the topology: {0}")]
    Topology(String),
    #[error("consumer failed: {0}")]
    Consume(String),
    #[error("the broker cancelled our consumer (work queue deleted?)")]
    Cancelled,
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
                let wait = reconnect_delay(failures);
                failures = failures.saturating_add(1);
                tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker session lost; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
    }
    consuming.send_replace(false);
}

async fn session(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    consuming: &watch::Sender<bool>,
    failures: &mut u32,
) -> Result<(), SessionError> {
    let settings = &shared.settings;
    let conn = amqp::connect(
        settings.amqp.url.expose(),
        &format!("group-provisioner {}", shared.worker_id),
    )
    .await
    .map_err(|e| SessionError::Connect(e.to_string()))?;
    let channel_err = |e: lapin::Error| SessionError::Channel(e.to_string());
    let publish_channel = conn.create_channel().await.map_err(channel_err)?;
    publish_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(channel_err)?;
    Topology::new(&settings.topology, &settings.retry.delays)
        .declare(&publish_channel)
        .await
        .map_err(|e| SessionError::Topology(e.to_string()))?;
    let consume_channel = conn.create_channel().await.map_err(channel_err)?;
    consume_channel
        .basic_qos(settings.amqp.prefetch, BasicQosOptions::default())
        .await
        .map_err(channel_err)?;
    let tag = format!(
        "group-provisioner/{}/{}",
        shared.worker_id,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut consumer = consume_channel
        .basic_consume(
            ShortString::from(settings.topology.work_queue.as_str()),
            amqp::short(&tag),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| SessionError::Consume(e.to_string()))?;
    *failures = 0;
    consuming.send_replace(true);
    tracing::info!(queue = %settings.topology.work_queue, consumer_tag = %tag, "consuming");

    let publisher = Publisher::new(publish_channel);
    let tracker = TaskTracker::new();
    let result = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tracker.spawn(execute::handle(shared.clone(), publisher.clone(), delivery));
                }
                Some(Err(e)) => break Err(SessionError::Consume(e.to_string())),
                None => break Err(SessionError::Cancelled),
            },
        }
    };
    consuming.send_replace(false);
    tracker.close();
    if result.is_ok() {
        // Stop the flow first, then let what is in flight finish (SPEC §5.10).
        if let Err(e) = consume_channel
            .basic_cancel(amqp::short(&tag), BasicCancelOptions::default())
            .await
        {
            tracing::warn!(error = %e, "could not cancel the consumer");
        }
        let drain = settings.shutdown.drain_timeout;
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            tracing::warn!(
                drain_timeout_ms = drain.as_millis() as u64,
                "drain timeout: unfinished deliveries return to the queue"
            );
        }
        let _ = conn.close(200, ShortString::from("worker shutdown")).await;
    }
    // On a lost session the in-flight tasks cannot settle on the dead channel; the broker
    // redelivers their messages, so they are left to finish on their own.
    result
}

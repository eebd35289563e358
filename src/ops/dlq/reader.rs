//! Reading the DLQ without losing or reordering it: a pass consumes *without acking* as
//! many messages as the queue held when it started, then closes its channels, and the
//! broker puts every unacked message back where it was.
//!
//! A pass always takes the *whole* queue, even to show one message: a quorum queue puts
//! returned messages behind those returned before, so returning only the first few would
//! move them behind the rest whenever the queue has been read before.
//!
//! Memory is bounded whatever the DLQ holds: the pass reads in windows of [`WINDOW`]
//! messages (more for a very large DLQ, see [`MAX_WINDOWS`]), each on its own channel with
//! a consumer of that prefetch, cancelled once its window is delivered — its messages stay
//! unacked on that channel — and each message is dropped once handled. At the end the
//! windows' channels are closed oldest first, so the broker puts the messages back in their
//! order. (Windows as consumers of *one* channel would not do: a quorum queue returns the
//! messages of a channel's consumers in no particular order.)
//!
//! Every return counts as a delivery. The DLQ this version declares has a delivery limit
//! no inspection reaches; one declared by an earlier version has none of its own, and
//! RabbitMQ 4.x drops its messages after 20 deliveries. Such a DLQ is not read at all: the
//! pass is refused with the migration advice before it consumes anything (the client
//! cannot tell the broker's version, and any return, even of a refused pass, counts).

use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use serde_json::{Value, json};

use crate::amqp::headers::{self, header_string, header_u32};
use crate::amqp::topology::{self, DeadLetterQueueState, Topology};
use crate::config::Settings;
use crate::ops::{BROKER_TIMEOUT, OpsError, connect};
use crate::text::printable;

use super::json::table_to_json;

/// One dead letter as operators see it.
#[derive(Debug)]
pub struct DeadLetter {
    pub position: usize,
    pub ext_id: Option<String>,
    /// `x-error-kind`, or for messages the broker dead-lettered itself, `broker:<reason>`
    /// from `x-death` (e.g. `broker:delivery_limit`).
    pub kind: String,
    pub delivery: Delivery,
    /// The window (channel) it came on: its ack goes through [`DlqReader::ack`].
    window: usize,
}

impl DeadLetter {
    fn new(position: usize, delivery: Delivery, window: usize) -> DeadLetter {
        let h = delivery.properties.headers().as_ref();
        let kind = header_string(h, headers::X_ERROR_KIND)
            .or_else(|| broker_reason(h).map(|r| format!("broker:{r}")))
            .unwrap_or_else(|| "unknown".into());
        let ext_id = serde_json::from_slice::<Value>(&delivery.data)
            .ok()
            .and_then(|v| {
                v.get("org_unit_ext_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        DeadLetter {
            position,
            ext_id,
            kind,
            delivery,
            window,
        }
    }

    /// `#3 kind=rejected ext_id=ORG-1`: how replay reports a message.
    /// Escaped and bounded: it is printed to a terminal.
    pub fn describe(&self) -> String {
        format!(
            "#{} kind={} ext_id={}",
            self.position,
            printable(&self.kind, 64),
            printable(self.ext_id.as_deref().unwrap_or("-"), 160)
        )
    }

    pub fn header(&self, name: &str) -> Option<String> {
        header_string(self.delivery.properties.headers().as_ref(), name)
    }

    pub fn replay_count(&self) -> u32 {
        header_u32(
            self.delivery.properties.headers().as_ref(),
            headers::X_REPLAY_COUNT,
        )
    }

    /// The export/peek JSON of this dead letter.
    pub fn to_json(&self) -> Value {
        let p = &self.delivery.properties;
        let text = |s: &Option<ShortString>| s.as_ref().map(|v| v.as_str().to_owned());
        let mut out = json!({
            "position": self.position,
            "ext_id": self.ext_id,
            "kind": self.kind,
            "error_message": self.header(headers::X_ERROR_MESSAGE),
            "http_status": self.header(headers::X_HTTP_STATUS).and_then(|s| s.parse::<u16>().ok()),
            "attempts": header_u32(p.headers().as_ref(), headers::X_ATTEMPTS),
            "replay_count": self.replay_count(),
            "first_failed_at": self.header(headers::X_FIRST_FAILED_AT),
            "last_failed_at": self.header(headers::X_LAST_FAILED_AT),
            "worker_version": self.header(headers::X_WORKER_VERSION),
            "message_id": text(p.message_id()),
            "correlation_id": text(p.correlation_id()),
            "content_type": text(p.content_type()),
            "headers": p.headers().as_ref().map_or(Value::Null, table_to_json),
        });
        match std::str::from_utf8(&self.delivery.data) {
            Ok(body) => out["body"] = Value::String(body.to_owned()),
            Err(_) => {
                out["body"] = Value::Null;
                out["body_base64"] = Value::String(
                    base64::engine::general_purpose::STANDARD.encode(&self.delivery.data),
                );
            }
        }
        out
    }
}

fn broker_reason(h: Option<&FieldTable>) -> Option<String> {
    match h?.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().first().and_then(|d| match d {
            AMQPValue::FieldTable(t) => header_string(Some(t), "reason"),
            _ => None,
        }),
        _ => None,
    }
}

/// How many messages the broker sends ahead of the reader: what a pass holds in memory.
pub const WINDOW: usize = 64;
/// At most this many windows (channels) per pass; a larger DLQ gets larger windows. Far
/// below RabbitMQ's default `channel_max` (2,047).
pub const MAX_WINDOWS: usize = 1_000;

/// One pass over the DLQ. Messages are consumed and never acked unless moved, so the
/// broker keeps them; closing the reader puts back everything not acked, in its original
/// order. (`basic.get` would avoid consumers, but quorum queues return messages taken that
/// way behind the ones never taken: the order would change.) Each message is dropped,
/// still unacked, once handled, so only the current window is buffered. The pass stops at
/// the number of messages the queue held when it started, so newer arrivals are not read.
pub struct DlqReader {
    pub total_in_queue: u32,
    /// The whole pass: every message the queue held at the start.
    wanted: usize,
    /// How many of them [`DlqReader::next`] yields; the rest are read and dropped at close.
    shown: usize,
    read: usize,
    queue: String,
    window_size: usize,
    window: Option<Window>,
    /// The finished windows, oldest first, holding their unacked messages.
    held: Vec<Held>,
    /// Messages each window (by index) holds: delivered, not acked.
    holding: Vec<usize>,
    conn: Connection,
    channel: Channel,
}

/// A finished window: its channel keeps its messages until the pass closes.
struct Held {
    channel: Channel,
    index: usize,
}

/// The consumer of the current window, on its own channel.
struct Window {
    index: usize,
    channel: Channel,
    consumer: lapin::Consumer,
    tag: String,
    /// Deliveries still to come before the window is full.
    left: usize,
    /// Cancel sent: read what it still delivers until it ends.
    cancelling: bool,
}

impl DlqReader {
    /// Open a pass that yields at most `max` messages (all when `None`); it takes the whole
    /// queue all the same (see the module documentation).
    pub async fn open(settings: &Settings, max: Option<usize>) -> Result<DlqReader, OpsError> {
        let queue = settings.topology.dead_letter_queue.clone();
        Self::open_queue(settings, &queue, max).await
    }

    /// A pass over `queue` (the DLQ, or another queue read the same way, such as the
    /// unrouted events). The DLQ's arguments are checked first (module documentation).
    pub async fn open_queue(
        settings: &Settings,
        queue: &str,
        max: Option<usize>,
    ) -> Result<DlqReader, OpsError> {
        let (conn, channel) = connect(settings, "dlq").await?;
        let queue = queue.to_owned();
        let total = crate::amqp::ready_count(&channel, &queue)
            .await
            .map_err(|source| OpsError::Topology {
                what: format!("dead-letter queue {queue:?}"),
                source,
                hint: "",
            })?;
        // A no-op declare when the DLQ has this version's arguments.
        if queue == settings.topology.dead_letter_queue {
            match Topology::new(&settings.topology, &settings.retry.delays)
                .dead_letter_queue_state(&conn)
                .await?
            {
                DeadLetterQueueState::Current => {}
                DeadLetterQueueState::Legacy(_) => {
                    let _ = conn.close(200, ShortString::from("legacy dlq")).await;
                    return Err(OpsError::LegacyDeadLetterQueue {
                        advice: topology::legacy_dead_letter_queue_advice(&queue),
                    });
                }
                // A user without `configure` cannot compare; reading is what it asked for.
                DeadLetterQueueState::Unknown(why) => eprintln!(
                    "warning: the arguments of {queue:?} could not be compared ({why}); if an earlier version declared it, reading it on RabbitMQ 4.x can cost dead letters: run `group-provisioner dlq migrate` with a user that may"
                ),
            }
        }
        let wanted = total as usize;
        let channel_max = match conn.configuration().channel_max() {
            0 => usize::from(u16::MAX),
            n => usize::from(n),
        };
        let max_windows = MAX_WINDOWS.min(channel_max.saturating_sub(8)).max(1);
        Ok(DlqReader {
            total_in_queue: total,
            wanted,
            shown: max.map_or(wanted, |m| m.min(wanted)),
            read: 0,
            queue,
            window_size: WINDOW.max(wanted.div_ceil(max_windows)),
            window: None,
            held: Vec::new(),
            holding: Vec::new(),
            conn,
            channel,
        })
    }

    /// A channel and a consumer that the broker sends at most `size` messages (they stay
    /// unacked).
    async fn open_window(&self, size: usize) -> Result<Window, OpsError> {
        let size = size.min(usize::from(u16::MAX));
        let prefetch = u16::try_from(size).unwrap_or(u16::MAX);
        let channel = self.conn.create_channel().await?;
        // Per consumer (global QoS is refused by RabbitMQ 4.3 and unsupported by quorum
        // queues).
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        let tag = format!("group-provisioner-dlq-{}", uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                ShortString::from(self.queue.as_str()),
                ShortString::from(tag.as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Window {
            index: self.holding.len(),
            channel,
            consumer,
            tag,
            left: size,
            cancelling: false,
        })
    }

    /// The confirm-mode channel for publishing during the pass (a message's ack goes
    /// through its own window's channel: `delivery.ack`).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Messages still to be yielded.
    pub fn remaining(&self) -> usize {
        self.shown.saturating_sub(self.read)
    }

    /// The next dead letter of the pass, or `None` once `max` were yielded or at its end.
    pub async fn next(&mut self) -> Result<Option<DeadLetter>, OpsError> {
        if self.read >= self.shown {
            return Ok(None);
        }
        self.take().await
    }

    /// The next message of the whole pass.
    async fn take(&mut self) -> Result<Option<DeadLetter>, OpsError> {
        loop {
            if self.read >= self.wanted {
                return Ok(None);
            }
            let mut window = match self.window.take() {
                Some(w) => w,
                None => {
                    let left = self.wanted.saturating_sub(self.read);
                    let w = self.open_window(self.window_size.min(left)).await?;
                    self.holding.push(0);
                    w
                }
            };
            if window.left == 0 && !window.cancelling {
                // A full window: no more for this consumer. Its messages stay unacked with
                // the pass; a message it still sends (after a move freed a slot) is read
                // before the next window starts, so the order holds.
                window
                    .channel
                    .basic_cancel(
                        ShortString::from(window.tag.as_str()),
                        BasicCancelOptions::default(),
                    )
                    .await?;
                window.cancelling = true;
            }
            match tokio::time::timeout(BROKER_TIMEOUT, window.consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    window.left = window.left.saturating_sub(1);
                    let index = window.index;
                    if let Some(n) = self.holding.get_mut(index) {
                        *n += 1;
                    }
                    self.window = Some(window);
                    self.read += 1;
                    return Ok(Some(DeadLetter::new(self.read, delivery, index)));
                }
                Ok(Some(Err(e))) => return Err(e.into()),
                // The cancelled window is done: keep its channel (and messages), go on.
                Ok(None) if window.cancelling => self.held.push(Held {
                    channel: window.channel,
                    index: window.index,
                }),
                // Someone else consumed meanwhile, or the queue is gone: the pass is what
                // we got.
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }

    /// Remove `letter` from the DLQ for good (it was moved elsewhere).
    pub async fn ack(&mut self, letter: &DeadLetter) -> Result<(), lapin::Error> {
        letter
            .delivery
            .ack(lapin::options::BasicAckOptions::default())
            .await?;
        if let Some(n) = self.holding.get_mut(letter.window) {
            *n = n.saturating_sub(1);
        }
        Ok(())
    }

    /// Return every unacked message to the queue, in order: the windows' channels are
    /// closed oldest first, each only once the broker shows the previous one's messages
    /// back (so a command run right after sees the whole DLQ, in order).
    pub async fn close(mut self) {
        // Take the rest of the pass (dropping each message as it comes), so that the
        // whole queue goes back in order.
        while let Ok(Some(_)) = self.take().await {}
        // No consumer may be left: it would be sent the messages the first windows give
        // back, out of turn.
        if let Some(mut w) = self.window.take() {
            if !w.cancelling {
                let _ = w
                    .channel
                    .basic_cancel(
                        ShortString::from(w.tag.as_str()),
                        BasicCancelOptions::default(),
                    )
                    .await;
            }
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(BROKER_TIMEOUT, w.consumer.next()).await
            {}
            self.held.push(Held {
                channel: w.channel,
                index: w.index,
            });
        }
        // Oldest window first, each once the previous one's messages are back: the broker
        // puts each channel's messages behind those returned before.
        let mut ready = self.ready().await;
        for held in std::mem::take(&mut self.held) {
            let _ = held
                .channel
                .close(200, ShortString::from("dlq pass done"))
                .await;
            let returned = self.holding.get(held.index).copied().unwrap_or(0);
            if let (Some(before), true) = (ready, returned > 0) {
                ready = self.wait_ready(before + returned).await;
            }
        }
        let _ = self
            .channel
            .close(200, ShortString::from("dlq pass done"))
            .await;
        let _ = self.conn.close(200, ShortString::from("done")).await;
    }

    /// Messages ready in the DLQ now (`None`: cannot tell).
    async fn ready(&self) -> Option<usize> {
        crate::amqp::ready_count(&self.channel, &self.queue)
            .await
            .ok()
            .map(|c| c as usize)
    }

    /// Wait (a few seconds at most) until at least `expected` messages are ready; returns
    /// what is ready then. Quorum queues take returned messages back asynchronously.
    async fn wait_ready(&self, expected: usize) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let ready = self.ready().await?;
            if ready >= expected || tokio::time::Instant::now() > deadline {
                return Some(ready);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_reason_comes_from_x_death() {
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        let mut t = FieldTable::default();
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        assert_eq!(broker_reason(Some(&t)).as_deref(), Some("delivery_limit"));
        assert_eq!(broker_reason(None), None);
    }
}

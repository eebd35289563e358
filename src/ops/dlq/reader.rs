//! Reading the DLQ without losing or reordering it: a pass consumes *without acking* as
//! many messages as the queue held when it started, and the broker puts back every message
//! not acked, in order, when the pass's channel closes.
//!
//! Invariants:
//! - **One pass at a time per queue.** A pass holds the exclusive queue `<queue>.lock` for
//!   its whole life (the broker drops it with the connection, however the process ends).
//!   Two passes at once would split the queue between them, and each would give its share
//!   back on its own: the order would interleave. A second pass waits ([`LOCK_WAIT`], with
//!   a message), then gives up without reading.
//! - **The whole queue, every time.** A quorum queue puts returned messages behind those
//!   returned before, so a pass that gave back only the first few would move them behind
//!   the rest whenever the queue had been read before. A pass that stops early (a limit,
//!   a signal, a closed stdout) still takes the rest, dropping it, before it closes.
//! - **Bounded memory.** The pass reads in windows: consumers of [`WINDOW`] messages (more
//!   for a large queue: at most [`MAX_WINDOWS`] of them), opened one after the other, each
//!   cancelled once full. Its messages stay unacked on the broker; each is dropped in the
//!   client once handled, so only one window is buffered.
//! - **Order on every ending, SIGKILL included.** All windows are consumers of *one*
//!   channel, named so that they sort in the order they were opened, and there are at most
//!   32 of them. When the channel closes, or the connection dies with the process, the
//!   queue returns a channel's consumers in that order (RabbitMQ 3.x sorts them by tag, 4.x
//!   by the order they were created, each only while they are at most 32: an Erlang map of
//!   up to 32 keys is ordered), and each consumer's messages in their order. The tests
//!   check it on both versions, with SIGKILL. What a kill cannot keep is said in
//!   `docs/operations.md`: a pass killed *before it read the whole queue* gives back what
//!   it read behind what it had not read yet (a rotation, not a shuffle).
//! - **Acks at the end.** A letter moved or removed ([`DlqReader::ack`]) is acked only in
//!   [`DlqReader::close`], after the last window is cancelled and drained. An ack in the
//!   middle of a pass frees a slot of its window, the broker sends that window more than it
//!   counted, and on a queue of more than a few windows letters kept came back at the end
//!   (tested with 3,000 letters). The cost: a pass killed before its end removes nothing,
//!   so what it moved is in both places (the worker deduplicates a replayed command).
//!   A quorum queue can also lose acks sent in a burst just before the channel closes
//!   (they wait in the broker's channel for earlier commands, and go with it): the pass
//!   then sees more letters come back than it held, and removes those it acked, found by
//!   content, in a pass of their own (at most three times, then an error says so).
//! - **A short pass says so.** If the queue ends before the count it started with (another
//!   consumer took messages, the queue was deleted), [`DlqReader::close`] reports it and the
//!   command exits non-zero.
//! - **Signals.** SIGINT and SIGTERM stop the pass at the next message: [`DlqReader::next`]
//!   returns [`OpsError::Interrupted`], and the caller closes the pass as usual.
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
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::amqp::headers::{self, header_string, header_u32};
use crate::amqp::topology::{self, DeadLetterQueueState, Topology};
use crate::config::Settings;
use crate::ops::{BROKER_TIMEOUT, OpsError, connect};
use crate::text::printable;

use super::json::table_to_json;
use super::marker::PassMarker;

/// One dead letter as operators see it.
#[derive(Debug)]
pub struct DeadLetter {
    pub position: usize,
    pub ext_id: Option<String>,
    /// `x-error-kind`, or for messages the broker dead-lettered itself, `broker:<reason>`
    /// from `x-death` (e.g. `broker:delivery_limit`).
    pub kind: String,
    pub delivery: Delivery,
    /// [`DeadLetter::id`], computed once: a pass may need it twice (a selection, an ack).
    pub(super) id: std::sync::OnceLock<String>,
}

impl DeadLetter {
    fn new(position: usize, delivery: Delivery) -> DeadLetter {
        // Before anything recurses on its headers (amqp::deep).
        let delivery = crate::amqp::deep::shallow(delivery);
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
            id: std::sync::OnceLock::new(),
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
/// At most this many windows per pass: a larger queue gets larger windows. The broker
/// returns the consumers of one channel in a known order only up to 32 (module
/// documentation).
pub const MAX_WINDOWS: usize = 32;
/// How many times a pass waits [`BROKER_TIMEOUT`] for a slow broker that still shows
/// messages ready before it calls itself short.
const MAX_SLOW_WAITS: u32 = 6;
/// How many times a pass removes again letters whose acks the broker lost.
const MAX_RETRIES: u32 = 3;
/// How long a pass waits for another one to end before giving up.
pub const LOCK_WAIT: Duration = Duration::from_secs(60);

/// One pass over the DLQ (module documentation). Messages are consumed and never acked
/// unless moved, so the broker keeps them; closing the reader puts back everything not
/// acked, in its original order. (`basic.get` would avoid consumers, but quorum queues
/// return messages taken that way behind the ones never taken: the order would change.)
pub struct DlqReader {
    pub total_in_queue: u32,
    /// What the pass is for, in the words its messages use ("export", "discard", …).
    purpose: &'static str,
    /// The whole pass: every message the queue held at the start.
    wanted: usize,
    /// How many of them [`DlqReader::next`] yields; the rest are read and dropped at close.
    shown: usize,
    read: usize,
    acked: usize,
    /// Letters moved or removed, acked at the end of the pass.
    to_ack: Vec<u64>,
    /// The same letters by content, to find them again if an ack is lost (module
    /// documentation, "Acks at the end").
    acked_ids: super::Selection,
    /// For a pass that removes again what a lost ack left: its settings and how deep.
    settings: Settings,
    retries: u32,
    /// The queue ended before `wanted` (module documentation).
    short: bool,
    /// Waits of [`BROKER_TIMEOUT`] that ended with messages still ready.
    slow_waits: u32,
    queue: String,
    window_size: usize,
    windows: usize,
    /// Consumer tags are `<tag_prefix>-<nn>`: they sort in the order the windows open.
    tag_prefix: String,
    window: Option<Window>,
    /// Every window's consumer lives on this channel: it holds the unacked messages.
    pass: Channel,
    conn: Connection,
    /// Confirm mode, for publishing during the pass.
    channel: Channel,
    stop: CancellationToken,
    marker: PassMarker,
}

/// The consumer of the current window.
struct Window {
    consumer: lapin::Consumer,
    tag: String,
    /// Deliveries still to come before the window is full.
    left: usize,
    /// Cancel sent: read what it still delivers until it ends.
    cancelling: bool,
}

impl DlqReader {
    /// Open a pass over the DLQ that yields at most `max` messages (all when `None`); it
    /// takes the whole queue all the same (module documentation).
    pub async fn open(
        settings: &Settings,
        purpose: &'static str,
        max: Option<usize>,
    ) -> Result<DlqReader, OpsError> {
        let queue = settings.topology.dead_letter_queue.clone();
        Self::open_queue(settings, &queue, purpose, max).await
    }

    /// A pass over `queue` (the DLQ, or another queue read the same way, such as the
    /// unrouted events). The DLQ's arguments are checked first (module documentation).
    pub async fn open_queue(
        settings: &Settings,
        queue: &str,
        purpose: &'static str,
        max: Option<usize>,
    ) -> Result<DlqReader, OpsError> {
        Self::open_waiting(settings, queue, purpose, max, LOCK_WAIT).await
    }

    /// [`DlqReader::open_queue`], waiting at most `wait` for another pass to end (a page
    /// of the console gives up sooner than a command).
    pub async fn open_waiting(
        settings: &Settings,
        queue: &str,
        purpose: &'static str,
        max: Option<usize>,
        wait: Duration,
    ) -> Result<DlqReader, OpsError> {
        // Installed before anything is held: from here on a signal stops the pass instead
        // of ending the process.
        let stop = crate::ops::stop();
        let (conn, channel, total) =
            Self::connect_and_lock(settings, queue, purpose, &stop, wait).await?;
        let wanted = total as usize;
        let marker = PassMarker::begin(settings, queue, purpose, wanted).await;
        let window_size = WINDOW.max(wanted.div_ceil(MAX_WINDOWS));
        let pass = match conn.create_channel().await {
            Ok(c) if window_size <= usize::from(u16::MAX) => c,
            Ok(_) => {
                let _ = conn.close(200, ShortString::from("too large")).await;
                return Err(OpsError::BadArgument(format!(
                    "{queue:?} holds {total} messages; a pass keeps the order of at most {} ({MAX_WINDOWS} windows of {}): move part of it elsewhere first",
                    MAX_WINDOWS * usize::from(u16::MAX),
                    u16::MAX
                )));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(DlqReader {
            total_in_queue: total,
            purpose,
            wanted,
            shown: max.map_or(wanted, |m| m.min(wanted)),
            read: 0,
            acked: 0,
            to_ack: Vec::new(),
            acked_ids: super::Selection::default(),
            settings: settings.clone(),
            retries: 0,
            short: false,
            slow_waits: 0,
            queue: queue.to_owned(),
            window_size,
            windows: 0,
            tag_prefix: format!(
                "group-provisioner-pass-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            ),
            window: None,
            pass,
            conn,
            channel,
            stop,
            marker,
        })
    }

    /// Connect, take the queue's lock, count it, check the DLQ's arguments.
    async fn connect_and_lock(
        settings: &Settings,
        queue: &str,
        purpose: &'static str,
        stop: &CancellationToken,
        wait: Duration,
    ) -> Result<(Connection, Channel, u32), OpsError> {
        let (conn, channel, _) = connect(settings, &format!("dlq {purpose}")).await?;
        let counted = async {
            take_lock(&conn, queue, stop, wait).await?;
            let total = crate::amqp::ready_count(&channel, queue)
                .await
                .map_err(|source| OpsError::Topology {
                    what: format!("queue {queue:?}"),
                    source,
                    hint: "",
                })?;
            if queue == settings.topology.dead_letter_queue {
                check_dead_letter_queue(settings, &conn, queue).await?;
            }
            Ok(total)
        }
        .await;
        match counted {
            Ok(total) => Ok((conn, channel, total)),
            Err(e) => {
                let _ = conn.close(200, ShortString::from("not read")).await;
                Err(e)
            }
        }
    }

    /// A consumer that the broker sends at most `size` messages (they stay unacked), on
    /// the pass's channel.
    async fn open_window(&mut self, size: usize) -> Result<Window, OpsError> {
        let prefetch = u16::try_from(size).unwrap_or(u16::MAX);
        // Noted before the broker delivers: a kill from here on may rotate the queue
        // unless the pass holds all of it (marker.rs).
        let may_hold = (self.read + size).min(self.wanted.saturating_sub(1));
        self.marker.holding(may_hold).await;
        // Per consumer, for the consumers opened after it (global QoS is refused by
        // RabbitMQ 4.3 and unsupported by quorum queues).
        self.pass
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        let tag = format!("{}-{:02}", self.tag_prefix, self.windows);
        self.windows += 1;
        let consumer = self
            .pass
            .basic_consume(
                ShortString::from(self.queue.as_str()),
                ShortString::from(tag.as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Window {
            consumer,
            tag,
            left: size,
            cancelling: false,
        })
    }

    /// The confirm-mode channel for publishing during the pass (a message's ack goes
    /// through the pass's channel: [`DlqReader::ack`]).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Messages still to be yielded.
    pub fn remaining(&self) -> usize {
        self.shown.saturating_sub(self.read)
    }

    /// The next dead letter of the pass, or `None` once `max` were yielded or at its end;
    /// [`OpsError::Interrupted`] once SIGINT or SIGTERM arrived.
    pub async fn next(&mut self) -> Result<Option<DeadLetter>, OpsError> {
        if self.read >= self.shown {
            return Ok(None);
        }
        if self.stop.is_cancelled() {
            return Err(self.interrupted());
        }
        self.take(true).await
    }

    fn interrupted(&self) -> OpsError {
        OpsError::Interrupted {
            done: self.returned_in_order(),
        }
    }

    /// What a stopped pass leaves behind, for its error message.
    pub fn returned_in_order(&self) -> String {
        let removed = match self.acked {
            0 => "nothing was removed".to_owned(),
            n => format!("{n} were moved or removed"),
        };
        if self.short {
            // What it read goes back behind what it could not read (marker.rs).
            format!(
                "{removed}; the {} it read go back behind the rest (the queue may be rotated; nothing is lost)",
                self.read.saturating_sub(self.acked)
            )
        } else {
            format!("{removed}; every other message goes back, in order")
        }
    }

    /// The next message of the whole pass. With `interruptible`, a signal ends the wait
    /// for it — only there, where giving up loses nothing (the window stays with the pass).
    async fn take(&mut self, interruptible: bool) -> Result<Option<DeadLetter>, OpsError> {
        loop {
            if self.read >= self.wanted || self.short {
                return Ok(None);
            }
            if self.window.is_none() {
                let left = self.wanted.saturating_sub(self.read);
                let window = self.open_window(self.window_size.min(left)).await?;
                self.window = Some(window);
            }
            let DlqReader {
                window: Some(window),
                pass,
                stop,
                channel,
                queue,
                slow_waits,
                ..
            } = self
            else {
                continue;
            };
            if window.left == 0 && !window.cancelling {
                // A full window: no more for this consumer. Its messages stay unacked with
                // the pass; a message it still sends (after a move freed a slot) is read
                // before the next window starts, so the order holds.
                pass.basic_cancel(
                    ShortString::from(window.tag.as_str()),
                    BasicCancelOptions::default(),
                )
                .await?;
                window.cancelling = true;
            }
            let stop = stop.clone();
            let next = tokio::select! {
                biased;
                () = stop.cancelled(), if interruptible => return Err(self.interrupted()),
                next = tokio::time::timeout(BROKER_TIMEOUT, window.consumer.next()) => next,
            };
            // A slow broker is not a short queue: wait on while messages are still ready
            // for us (a pass that stops early would rotate the queue), up to a bound.
            if next.is_err() && *slow_waits < MAX_SLOW_WAITS {
                *slow_waits += 1;
                let ready = crate::amqp::ready_count(channel, queue).await;
                if ready.is_ok_and(|r| r > 0) {
                    continue;
                }
            }
            match next {
                Ok(Some(Ok(delivery))) => {
                    window.left = window.left.saturating_sub(1);
                    self.read += 1;
                    if self.read == self.wanted {
                        self.marker.holding(self.wanted).await;
                    }
                    return Ok(Some(DeadLetter::new(self.read, delivery)));
                }
                Ok(Some(Err(e))) => return Err(e.into()),
                // The cancelled window is done (its messages stay with the channel): go on.
                Ok(None) if window.cancelling => self.window = None,
                // Someone else consumed meanwhile, or the queue is gone: the pass is short.
                Ok(None) | Err(_) => {
                    self.short = true;
                    return Ok(None);
                }
            }
        }
    }

    /// Remove `letter` from the DLQ for good (it was moved elsewhere): acked when the pass
    /// closes (module documentation, "Acks at the end").
    pub fn ack(&mut self, letter: &DeadLetter) {
        self.to_ack.push(letter.delivery.delivery_tag);
        self.acked_ids.insert(letter.id());
        self.acked += 1;
    }

    /// Send the acks the pass collected, once no window consumer is left; the first
    /// failure, if any (those not acked go back with the rest, in order).
    async fn send_acks(&mut self) -> Result<(), lapin::Error> {
        let mut failed = None;
        for tag in std::mem::take(&mut self.to_ack) {
            let acked = self
                .pass
                .basic_ack(tag, lapin::options::BasicAckOptions::default())
                .await;
            if let Err(e) = acked {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Every letter of the pass to `f` (which may ack it), then the pass closed: the
    /// pass's own error first, as [`super::ended`] says.
    pub async fn each(
        mut self,
        mut f: impl FnMut(&mut DlqReader, DeadLetter),
    ) -> Result<(), OpsError> {
        let read = loop {
            match self.next().await {
                Ok(Some(l)) => f(&mut self, l),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        super::ended(read, self.close().await)
    }

    /// Return every unacked message to the queue, in order, and wait until the broker shows
    /// them back (so a command run right after sees the whole queue). An error if the pass
    /// saw less than the queue held when it started ([`OpsError::Incomplete`]).
    pub async fn close(mut self) -> Result<(), OpsError> {
        // Take the rest of the pass (dropping each message as it comes), so that the
        // whole queue goes back in order; a signal no longer stops this.
        loop {
            match self.take(false).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                // The rest could not be taken: it stays ahead of what goes back.
                Err(_) => {
                    self.short = self.read < self.wanted;
                    break;
                }
            }
        }
        // No consumer may be left: it would be sent the messages given back, out of turn.
        if let Some(mut w) = self.window.take() {
            if !w.cancelling {
                let _ = self
                    .pass
                    .basic_cancel(
                        ShortString::from(w.tag.as_str()),
                        BasicCancelOptions::default(),
                    )
                    .await;
            }
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(BROKER_TIMEOUT, w.consumer.next()).await
            {
                // Never dropped on this thread with deep headers (amqp::deep).
                drop(crate::amqp::deep::shallow(d));
            }
        }
        let acked = self.acked;
        let acks = self.send_acks().await;
        if acks.is_err() {
            // Some went back: the wait below must not count on them being gone.
            self.acked = 0;
        }
        let held = self.read.saturating_sub(self.acked);
        let before = self.ready().await;
        let _ = self
            .pass
            .close(200, ShortString::from("dlq pass done"))
            .await;
        let mut came_back = 0;
        match before {
            // Anything beyond what the pass held is a letter whose ack was lost (or one
            // dead-lettered meanwhile).
            Some(before) if acked > 0 => {
                let settled = self.settled_ready(before + held).await;
                came_back = settled.saturating_sub(before + held);
            }
            Some(before) if held > 0 => self.wait_ready(before + held).await,
            _ => {}
        }
        // A short pass may have rotated the queue: its note stays for the next pass and
        // `check` to report (marker.rs).
        if !self.short {
            self.marker.end().await;
        }
        let _ = self
            .channel
            .close(200, ShortString::from("dlq pass done"))
            .await;
        let _ = self.conn.close(200, ShortString::from("done")).await;
        if self.short {
            return Err(OpsError::Incomplete {
                queue: self.queue.clone(),
                purpose: self.purpose,
                seen: self.read,
                total: self.wanted,
                done: self.returned_in_order(),
            });
        }
        acks.map_err(|source| OpsError::Unacked { acked, source })?;
        if came_back > 0 && acked > 0 {
            self.remove_again(came_back).await?;
        }
        Ok(())
    }

    /// Some letters this pass acked came back (module documentation, "Acks at the end"):
    /// remove them in a pass of their own, found by content, at most [`MAX_RETRIES`]
    /// times. More letters than expected can also be letters dead-lettered meanwhile: a
    /// pass that finds none of its own changes nothing.
    async fn remove_again(self, came_back: usize) -> Result<(), OpsError> {
        if self.retries >= MAX_RETRIES {
            return Err(OpsError::NotRemoved {
                queue: self.queue,
                back: came_back,
            });
        }
        errln!(
            "{came_back} more letters than expected are back in {} after the {}: removing again those it moved (their acks were lost)",
            printable(&self.queue, 300),
            self.purpose
        );
        let mut ids = self.acked_ids;
        let mut again =
            DlqReader::open_queue(&self.settings, &self.queue, self.purpose, None).await?;
        again.retries = self.retries + 1;
        // Boxed: closing this pass may remove again, which reads again.
        Box::pin(again.each(|r, l| {
            if ids.take(&l) {
                r.ack(&l);
            }
        }))
        .await
    }

    /// Messages ready once the broker has taken back what the pass held: at least
    /// `expected`, then no change for a moment (quorum queues take them back
    /// asynchronously; a few seconds at most).
    async fn settled_ready(&self, expected: usize) -> usize {
        self.wait_ready(expected).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut last = self.ready().await.unwrap_or(expected);
        let mut same = 0;
        while same < 5 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.ready().await.unwrap_or(last);
            same = if now == last { same + 1 } else { 0 };
            last = now;
        }
        last
    }

    /// Messages ready in the queue now (`None`: cannot tell).
    async fn ready(&self) -> Option<usize> {
        crate::amqp::ready_count(&self.channel, &self.queue)
            .await
            .ok()
            .map(|c| c as usize)
    }

    /// Wait (a few seconds at most) until at least `expected` messages are ready. Quorum
    /// queues take returned messages back asynchronously.
    async fn wait_ready(&self, expected: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Some(ready) = self.ready().await {
            if ready >= expected || tokio::time::Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Hold `<queue>.lock`, exclusive to this connection, waiting up to `wait` (commands:
/// [`LOCK_WAIT`]) for another pass to end. The broker deletes it when the connection closes, however the
/// process ends, so a killed pass never leaves it behind.
pub(super) async fn take_lock(
    conn: &Connection,
    queue: &str,
    stop: &CancellationToken,
    wait: Duration,
) -> Result<(), OpsError> {
    use lapin::protocol::AMQPSoftError;
    let lock = format!("{queue}.lock");
    let started = tokio::time::Instant::now();
    let mut told = false;
    loop {
        // A refusal closes the channel: a new one per try.
        let side = conn.create_channel().await?;
        let declared = side
            .queue_declare(
                ShortString::from(lock.as_str()),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(_) => {
                let _ = side.close(200, ShortString::from("locked")).await;
                return Ok(());
            }
            Err(e) if crate::amqp::is_soft(&e, AMQPSoftError::RESOURCELOCKED) => {}
            Err(e) if crate::amqp::is_soft(&e, AMQPSoftError::ACCESSREFUSED) => {
                return Err(OpsError::Topology {
                    what: format!("lock queue {lock:?}"),
                    source: e,
                    hint: " (a pass holds this exclusive queue so that two passes never interleave: the user needs configure permission on that name)",
                });
            }
            Err(e) => return Err(e.into()),
        }
        if started.elapsed() >= wait {
            return Err(OpsError::Busy { lock, waited: wait });
        }
        if !told {
            errln!(
                "waiting for another DLQ command to finish (it holds {}; at most {}s)",
                printable(&lock, 300),
                wait.as_secs()
            );
            told = true;
        }
        tokio::select! {
            () = stop.cancelled() => {
                return Err(OpsError::Interrupted {
                    done: "nothing was read".to_owned(),
                });
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Whether a pass over `queue` runs now (its lock queue exists); `None`: cannot tell.
pub async fn pass_running(conn: &Connection, queue: &str) -> Option<bool> {
    use lapin::protocol::AMQPSoftError;
    match crate::ops::queue_counts(conn, &format!("{queue}.lock")).await {
        Ok(found) => Some(found.is_some()),
        Err(OpsError::Broker(e)) if crate::amqp::is_soft(&e, AMQPSoftError::RESOURCELOCKED) => {
            Some(true)
        }
        Err(_) => None,
    }
}

/// Refuse a DLQ declared by an earlier version (module documentation).
async fn check_dead_letter_queue(
    settings: &Settings,
    conn: &Connection,
    queue: &str,
) -> Result<(), OpsError> {
    // A no-op declare when the DLQ has this version's arguments.
    match Topology::new(&settings.topology, &settings.retry.delays)
        .dead_letter_queue_state(conn)
        .await?
    {
        DeadLetterQueueState::Current => Ok(()),
        DeadLetterQueueState::Legacy(_) => Err(OpsError::LegacyDeadLetterQueue {
            advice: topology::legacy_dead_letter_queue_advice(queue),
        }),
        // A user without `configure` cannot compare; reading is what it asked for.
        DeadLetterQueueState::Unknown(why) => {
            errln!(
                "warning: the arguments of {queue:?} could not be compared ({why}); if an earlier version declared it, reading it on RabbitMQ 4.x can cost dead letters: run `group-provisioner dlq migrate` with a user that may"
            );
            Ok(())
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

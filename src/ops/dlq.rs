//! `dlq stats | peek | export | replay`.
//!
//! Reading: take a snapshot of the queue by consuming *without acking* as many messages as
//! the queue held when we looked, then close the channel: the broker puts every unacked
//! message back where it was. Replaying: for each matching message, a confirmed publish to
//! the command exchange, then the ack of the dead letter.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::amqp::Publisher;
use crate::amqp::headers::{self, HeaderUpdate, header_string, header_u32};
use crate::config::Settings;

use super::{BROKER_TIMEOUT, connect};

/// One dead letter as operators see it.
#[derive(Debug)]
pub struct DeadLetter {
    pub position: usize,
    pub ext_id: Option<String>,
    /// `x-error-kind`, or for messages the broker dead-lettered itself, `broker:<reason>`
    /// from `x-death` (e.g. `broker:delivery_limit`).
    pub kind: String,
    pub delivery: Delivery,
}

impl DeadLetter {
    fn new(position: usize, delivery: Delivery) -> DeadLetter {
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
        }
    }

    /// `#3 kind=rejected ext_id=ORG-1`: how replay reports a message.
    fn describe(&self) -> String {
        format!(
            "#{} kind={} ext_id={}",
            self.position,
            self.kind,
            self.ext_id.as_deref().unwrap_or("-")
        )
    }

    fn header(&self, name: &str) -> Option<String> {
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

/// Any AMQP value as JSON (byte arrays base64).
pub fn amqp_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(format!("{d:?}")),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => {
            json!(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        AMQPValue::Void => Value::Null,
    }
}

fn table_to_json(t: &FieldTable) -> Value {
    let mut m = Map::new();
    for (k, v) in t.inner() {
        m.insert(k.as_str().to_owned(), amqp_to_json(v));
    }
    Value::Object(m)
}

/// One pass over the DLQ. Messages are consumed (unlimited prefetch) and never acked
/// unless moved, so the broker keeps them; closing the reader puts back everything not
/// acked, in its original order. (`basic.get` would avoid the prefetch, but quorum queues
/// return messages taken that way behind the ones never taken: the order would change.)
/// Each message is dropped, still unacked, once handled, so only what the broker has sent
/// ahead is buffered. The pass stops at the number of messages the queue held when it
/// started, so newer arrivals are not read.
pub struct DlqReader {
    pub total_in_queue: u32,
    wanted: usize,
    read: usize,
    queue: String,
    consumer: Option<lapin::Consumer>,
    conn: Connection,
    channel: Channel,
}

impl DlqReader {
    /// Open a pass over at most `max` messages (all when `None`).
    pub async fn open(settings: &Settings, max: Option<usize>) -> Result<DlqReader, String> {
        let (conn, channel) = connect(settings, "dlq").await?;
        let queue = settings.topology.dead_letter_queue.clone();
        let total = crate::amqp::ready_count(&channel, &queue)
            .await
            .map_err(|e| format!("dead-letter queue {queue:?}: {e}"))?;
        let wanted = max.map_or(total as usize, |m| m.min(total as usize));
        let consumer = if wanted == 0 {
            None
        } else {
            // Unlimited prefetch: every message of the pass stays unacked until we close.
            channel
                .basic_qos(0, BasicQosOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let tag = format!("group-provisioner-dlq-{}", uuid::Uuid::new_v4().simple());
            Some(
                channel
                    .basic_consume(
                        ShortString::from(queue.as_str()),
                        ShortString::from(tag),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?,
            )
        };
        Ok(DlqReader {
            total_in_queue: total,
            wanted,
            read: 0,
            queue,
            consumer,
            conn,
            channel,
        })
    }

    /// The confirm-mode channel the messages were read on (their acks go through it).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Messages of the pass not read yet.
    pub fn remaining(&self) -> usize {
        self.wanted.saturating_sub(self.read)
    }

    /// The next dead letter of the pass, or `None` at its end.
    pub async fn next(&mut self) -> Result<Option<DeadLetter>, String> {
        if self.read >= self.wanted {
            return Ok(None);
        }
        let Some(consumer) = self.consumer.as_mut() else {
            return Ok(None);
        };
        match tokio::time::timeout(BROKER_TIMEOUT, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                self.read += 1;
                Ok(Some(DeadLetter::new(self.read, delivery)))
            }
            Ok(Some(Err(e))) => Err(e.to_string()),
            // Someone else consumed meanwhile: the pass is what we got.
            Ok(None) | Err(_) => Ok(None),
        }
    }

    /// Return every unacked message to the queue, in order, and wait (up to a few seconds)
    /// until the broker shows them again, so a command run right after sees the whole DLQ.
    /// `removed` is how many of the pass were acked (moved).
    pub async fn close(self, removed: usize) {
        let _ = self
            .channel
            .close(200, ShortString::from("dlq pass done"))
            .await;
        let expected = (self.total_in_queue as usize).saturating_sub(removed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(ch) = self.conn.create_channel().await {
            let count = crate::amqp::ready_count(&ch, &self.queue)
                .await
                .map(|c| c as usize);
            let _ = ch.close(200, ShortString::from("ok")).await;
            // Quorum queues return held messages asynchronously after the channel closes.
            if count.is_err()
                || count.is_ok_and(|c| c >= expected)
                || tokio::time::Instant::now() > deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.conn.close(200, ShortString::from("done")).await;
    }
}

pub async fn stats(settings: &Settings, as_json: bool) -> ExitCode {
    let mut reader = match DlqReader::open(settings, None).await {
        Ok(r) => r,
        Err(e) => return fail("dlq stats", &e),
    };
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut oldest: Option<String> = None;
    let result = loop {
        match reader.next().await {
            Ok(Some(l)) => {
                *by_kind.entry(l.kind.clone()).or_insert(0) += 1;
                if let Some(t) = l.header(headers::X_FIRST_FAILED_AT)
                    && oldest.as_ref().is_none_or(|o| t < *o)
                {
                    oldest = Some(t);
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let total = reader.total_in_queue;
    reader.close(0).await;
    if let Err(e) = result {
        return fail("dlq stats", &e);
    }
    if as_json {
        println!(
            "{}",
            json!({"queue": settings.topology.dead_letter_queue, "count": total, "by_kind": by_kind, "oldest_first_failed_at": oldest})
        );
    } else {
        println!(
            "{}: {total} dead letters",
            settings.topology.dead_letter_queue
        );
        for (kind, n) in &by_kind {
            println!("  {kind:<24} {n}");
        }
        if let Some(o) = oldest {
            println!("  oldest first failure     {o}");
        }
    }
    ExitCode::SUCCESS
}

pub async fn peek(settings: &Settings, limit: usize, as_json: bool) -> ExitCode {
    let mut reader = match DlqReader::open(settings, Some(limit)).await {
        Ok(r) => r,
        Err(e) => return fail("dlq peek", &e),
    };
    let mut shown = 0;
    let result = loop {
        let l = match reader.next().await {
            Ok(Some(l)) => l,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        shown += 1;
        let j = l.to_json();
        if as_json {
            println!("{j}");
            continue;
        }
        println!(
            "#{} kind={} http={} attempts={} replays={} ext_id={} first_failed={}",
            l.position,
            l.kind,
            j["http_status"],
            j["attempts"],
            j["replay_count"],
            l.ext_id.as_deref().unwrap_or("-"),
            j["first_failed_at"].as_str().unwrap_or("-"),
        );
        if let Some(m) = j["error_message"].as_str() {
            println!("   reason: {m}");
        }
        let body = j["body"]
            .as_str()
            .map_or_else(|| "(binary, see --json)".to_owned(), |b| cut(b, 300));
        println!("   body:   {body}");
    };
    let total = reader.total_in_queue;
    reader.close(0).await;
    if let Err(e) = result {
        return fail("dlq peek", &e);
    }
    if !as_json {
        println!("({shown} shown of {total}; nothing was removed)");
    }
    ExitCode::SUCCESS
}

pub async fn export(settings: &Settings, out: &Path) -> ExitCode {
    let mut reader = match DlqReader::open(settings, None).await {
        Ok(r) => r,
        Err(e) => return fail("dlq export", &e),
    };
    // Write next to the target, then rename: a half-written audit file never appears.
    let tmp = out.with_extension("jsonl.tmp");
    let result: Result<usize, String> = async {
        let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let mut n = 0;
        while let Some(l) = reader.next().await? {
            writeln!(file, "{}", l.to_json()).map_err(io)?;
            n += 1;
        }
        file.flush().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(n)
    }
    .await;
    reader.close(0).await;
    match result {
        Ok(n) => {
            eprintln!(
                "exported {n} dead letters to {} (nothing was removed)",
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            fail("dlq export", &e)
        }
    }
}

/// What `dlq replay` moves (its command-line options).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReplayFilter {
    /// Only this ext id.
    #[arg(long)]
    pub ext_id: Option<String>,
    /// Only this x-error-kind (invalid_command, rejected, name_conflict, retries_exhausted,
    /// or broker:<reason> for messages the broker dead-lettered, e.g. broker:delivery_limit).
    #[arg(long)]
    pub kind: Option<String>,
    /// Move at most N messages.
    #[arg(long)]
    pub limit: Option<usize>,
    /// At most R messages per second (e.g. 20 or 20/s).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Show what would move; move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip messages already replayed this many times.
    #[arg(long, default_value_t = 5)]
    pub max_replays: u32,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches("/s");
    match number.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!("{text:?} is not a positive rate (e.g. 20 or 20/s)")),
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub moved: usize,
    /// Matching, but at or over `--max-replays`: left in the DLQ.
    pub skipped: usize,
    /// Not matching the filter (or beyond `--limit`): left in the DLQ.
    pub kept: usize,
    pub interrupted: bool,
}

/// Move matching dead letters back to the command exchange.
pub async fn replay(
    settings: &Settings,
    filter: &ReplayFilter,
    stop: CancellationToken,
) -> Result<ReplaySummary, String> {
    let mut reader = DlqReader::open(settings, None).await?;
    let publisher = Publisher::new(reader.channel().clone());
    let topology = &settings.topology;
    let mut summary = ReplaySummary::default();
    let interval = filter
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next_at = tokio::time::Instant::now();
    let mut result = Ok(());
    loop {
        let letter = match reader.next().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let matches = filter
            .ext_id
            .as_deref()
            .is_none_or(|x| letter.ext_id.as_deref() == Some(x))
            && filter.kind.as_deref().is_none_or(|k| letter.kind == k);
        if filter.limit.is_some_and(|l| summary.moved >= l) || stop.is_cancelled() {
            // Done: this one and the rest of the pass stay where they are.
            summary.kept += 1 + reader.remaining();
            break;
        }
        if !matches {
            summary.kept += 1;
            continue;
        }
        if letter.replay_count() >= filter.max_replays {
            summary.skipped += 1;
            eprintln!(
                "skip {}: replayed {} times already (--max-replays {})",
                letter.describe(),
                letter.replay_count(),
                filter.max_replays
            );
            continue;
        }
        if filter.dry_run {
            summary.moved += 1;
            println!("would replay {}", letter.describe());
            continue;
        }
        if let Some(i) = interval {
            tokio::time::sleep_until(next_at).await;
            next_at = tokio::time::Instant::now() + i;
        }
        let properties = replay_properties(&letter.delivery.properties, letter.replay_count() + 1);
        if let Err(e) = publisher
            .publish(
                &topology.command_exchange,
                &topology.command_routing_key,
                &letter.delivery.data,
                properties,
                true,
            )
            .await
        {
            result = Err(format!(
                "publishing {} back failed ({e}); it stays in the DLQ",
                letter.describe()
            ));
            summary.kept += 1;
            break;
        }
        summary.moved += 1;
        if let Err(e) = letter.delivery.ack(BasicAckOptions::default()).await {
            // Published but not acked: the dead letter returns to the DLQ as well. Replaying
            // it again is harmless (deduplication), so report and stop.
            result = Err(format!(
                "{} was replayed but its dead letter could not be removed: {e}",
                letter.describe()
            ));
            break;
        }
        println!("replayed {}", letter.describe());
    }
    summary.interrupted = stop.is_cancelled();
    // What was not moved goes back, in order.
    reader
        .close(if filter.dry_run { 0 } else { summary.moved })
        .await;
    result.map(|()| summary)
}

/// The dead letter's properties for its return trip: a fresh start for attempts and retries,
/// the replay counted, the failure headers dropped (its history stays in
/// `x-first-failed-at` and `x-replay-count`).
fn replay_properties(original: &BasicProperties, replay_count: u32) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    let drop_names = [
        headers::X_ERROR_KIND,
        headers::X_ERROR_MESSAGE,
        headers::X_HTTP_STATUS,
        headers::X_LAST_FAILED_AT,
        headers::X_DELIVERY_COUNT,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    ];
    let kept: std::collections::BTreeMap<ShortString, AMQPValue> = headers
        .inner()
        .iter()
        .filter(|(k, _)| !drop_names.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    headers = FieldTable::from(kept);
    let base = original.clone().with_headers(headers);
    HeaderUpdate::default()
        .int(headers::X_REPLAY_COUNT, replay_count)
        .int(headers::X_ATTEMPTS, 0)
        .int(headers::X_RETRIES, 0)
        .int(headers::X_DEFERRALS, 0)
        .apply(&base)
}

pub async fn replay_command(settings: &Settings, filter: &ReplayFilter) -> ExitCode {
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    let watcher = tokio::spawn(async move {
        crate::shutdown::signal().await;
        eprintln!("interrupted: finishing the current message, returning the rest");
        on_signal.cancel();
    });
    let result = replay(settings, filter, stop).await;
    watcher.abort();
    match result {
        Ok(s) => {
            let verb = if filter.dry_run {
                "would move"
            } else {
                "moved"
            };
            println!(
                "{verb} {}, skipped {} (replay limit), kept {} (not matching){}",
                s.moved,
                s.skipped,
                s.kept,
                if s.interrupted {
                    " — interrupted"
                } else {
                    ""
                }
            );
            if s.interrupted {
                ExitCode::from(130)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => fail("dlq replay", &e),
    }
}

fn fail(what: &str, error: &str) -> ExitCode {
    eprintln!("{what}: {error}");
    ExitCode::FAILURE
}

fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_resets_attempts_and_drops_failure_headers() {
        let mut t = FieldTable::default();
        for (k, v) in [
            (headers::X_ERROR_KIND, "rejected"),
            (headers::X_ERROR_MESSAGE, "bad parent"),
            (headers::X_FIRST_FAILED_AT, "2026-11-26T00:00:00Z"),
            ("custom", "kept"),
        ] {
            t.insert(ShortString::from(k), AMQPValue::LongString(v.into()));
        }
        t.insert(
            ShortString::from(headers::X_ATTEMPTS),
            AMQPValue::LongLongInt(4),
        );
        let p = replay_properties(
            &BasicProperties::default()
                .with_headers(t)
                .with_message_id("m".into()),
            2,
        );
        let h = p.headers().as_ref();
        assert_eq!(header_u32(h, headers::X_REPLAY_COUNT), 2);
        assert_eq!(header_u32(h, headers::X_ATTEMPTS), 0);
        assert_eq!(header_string(h, headers::X_ERROR_KIND), None);
        assert_eq!(header_string(h, headers::X_ERROR_MESSAGE), None);
        assert_eq!(
            header_string(h, headers::X_FIRST_FAILED_AT).as_deref(),
            Some("2026-11-26T00:00:00Z")
        );
        assert_eq!(header_string(h, "custom").as_deref(), Some("kept"));
        assert_eq!(p.message_id().as_ref().map(|m| m.as_str()), Some("m"));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("20"), Ok(20.0));
        assert_eq!(parse_rate("2.5/s"), Ok(2.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn headers_to_json() {
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut t = FieldTable::default();
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        assert_eq!(broker_reason(Some(&t)).as_deref(), Some("delivery_limit"));
        assert_eq!(
            table_to_json(&t),
            json!({"x-death": [{"count": 1, "reason": "delivery_limit"}]})
        );
    }
}

//! Reading the DLQ without losing or reordering it: a pass consumes *without acking* as
//! many messages as the queue held when it started, then closes its channel, and the
//! broker puts every unacked message back where it was.

use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use serde_json::{Value, json};

use crate::amqp::headers::{self, header_string, header_u32};
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
    pub async fn open(settings: &Settings, max: Option<usize>) -> Result<DlqReader, OpsError> {
        let (conn, channel) = connect(settings, "dlq").await?;
        let queue = settings.topology.dead_letter_queue.clone();
        let total = crate::amqp::ready_count(&channel, &queue)
            .await
            .map_err(|source| OpsError::Topology {
                what: format!("dead-letter queue {queue:?}"),
                source,
                hint: "",
            })?;
        let wanted = max.map_or(total as usize, |m| m.min(total as usize));
        let consumer = if wanted == 0 {
            None
        } else {
            // Unlimited prefetch: every message of the pass stays unacked until we close.
            channel.basic_qos(0, BasicQosOptions::default()).await?;
            let tag = format!("group-provisioner-dlq-{}", uuid::Uuid::new_v4().simple());
            Some(
                channel
                    .basic_consume(
                        ShortString::from(queue.as_str()),
                        ShortString::from(tag),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?,
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
    pub async fn next(&mut self) -> Result<Option<DeadLetter>, OpsError> {
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
            Ok(Some(Err(e))) => Err(e.into()),
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

//! AMQP headers the worker reads and writes, and the mapping of a lapin
//! delivery to the core's [`Inbound`].

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::pipeline::Inbound;

pub const X_ATTEMPTS: &str = "x-attempts";
pub const X_DEFERRALS: &str = "x-deferrals";
pub const X_RETRIES: &str = "x-retries";
pub const X_REPLAY_COUNT: &str = "x-replay-count";
pub const X_FIRST_FAILED_AT: &str = "x-first-failed-at";
pub const X_LAST_FAILED_AT: &str = "x-last-failed-at";
pub const X_ERROR_KIND: &str = "x-error-kind";
pub const X_ERROR_MESSAGE: &str = "x-error-message";
pub const X_HTTP_STATUS: &str = "x-http-status";
pub const X_WORKER_VERSION: &str = "x-worker-version";
pub const X_DELIVERY_COUNT: &str = "x-delivery-count";
/// On a parked copy: its dead letter was written already; only the failure event is owed.
pub const X_DEAD_LETTERED_AT: &str = "x-dead-lettered-at";
pub const TRACEPARENT: &str = "traceparent";
pub const EXT_ID: &str = "ext_id";

/// `x-error-message` is cut to this many bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

fn get<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    headers?.inner().get(name)
}

/// An integer header, whatever integer (or numeric string) type the publisher used;
/// negative or unreadable values count as 0.
pub fn header_u32(headers: Option<&FieldTable>, name: &str) -> u32 {
    let n: i128 = match get(headers, name) {
        Some(AMQPValue::ShortShortInt(v)) => i128::from(*v),
        Some(AMQPValue::ShortShortUInt(v)) => i128::from(*v),
        Some(AMQPValue::ShortInt(v)) => i128::from(*v),
        Some(AMQPValue::ShortUInt(v)) => i128::from(*v),
        Some(AMQPValue::LongInt(v)) => i128::from(*v),
        Some(AMQPValue::LongUInt(v)) => i128::from(*v),
        Some(AMQPValue::LongLongInt(v)) => i128::from(*v),
        Some(AMQPValue::Timestamp(v)) => i128::from(*v),
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes())
            .trim()
            .parse()
            .unwrap_or(0),
        Some(AMQPValue::ShortString(s)) => s.as_str().trim().parse().unwrap_or(0),
        _ => 0,
    };
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

pub fn header_string(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match get(headers, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        _ => None,
    }
}

fn opt(s: &Option<ShortString>) -> Option<String> {
    s.as_ref()
        .map(|v| v.as_str().to_owned())
        .filter(|v| !v.is_empty())
}

/// How far the worker's own counters are trusted on a delivery. They are plain headers, so
/// a publisher can send any value: a counter is only believed as far as a message of ours
/// could have reached it.
#[derive(Debug, Clone, Default)]
pub struct CounterBounds {
    /// The delay-tier queues, in tier order.
    pub delay_queues: Vec<String>,
    /// The most create POSTs one delivery makes (`retry.max_tries`).
    pub max_tries: u32,
}

/// The most deferrals counted (parking and claims held elsewhere can repeat for long, but
/// not for ever).
const MAX_DEFERRALS: u32 = 1_000_000;

impl CounterBounds {
    /// `x-retries` says how many delay tiers the message passed, `x-attempts` how many
    /// POSTs its earlier deliveries made. Every earlier delivery of ours ended in a delay
    /// tier, and each pass through one left the broker's own record in `x-death` (reason
    /// `expired`, with a count): more tiers, or more than `max_tries` POSTs per pass, are
    /// not believed.
    fn bound(&self, headers: Option<&FieldTable>) -> (u32, u32) {
        if !came_back_through_a_tier(headers, &self.delay_queues) {
            return (0, 0);
        }
        let tiers = u32::try_from(self.delay_queues.len()).unwrap_or(u32::MAX);
        let retries = header_u32(headers, X_RETRIES).min(tiers);
        // Per delivery at most `max_tries` POSTs; a command is delivered once per tier and
        // once more, and parking can repeat that: a generous ceiling, but a ceiling.
        let ceiling = self
            .max_tries
            .saturating_mul(tiers.saturating_add(1))
            .saturating_mul(10);
        (retries, header_u32(headers, X_ATTEMPTS).min(ceiling))
    }

    /// `x-dead-lettered-at` is believed only on a copy of ours that came back through a
    /// delay tier: anything else still gets its dead letter.
    fn dead_lettered(&self, headers: Option<&FieldTable>) -> bool {
        header_string(headers, X_DEAD_LETTERED_AT).is_some()
            && came_back_through_a_tier(headers, &self.delay_queues)
    }
}

/// Whether `x-death` shows the message expired out of one of our delay tiers: then it is
/// a copy the worker itself put there, with counters the worker wrote (a copy never keeps
/// the counters it was given). RabbitMQ 3.13+ rewrites `x-death` on every pass instead of
/// accumulating it, so only *some* tier pass is asked for, not all of them.
fn came_back_through_a_tier(headers: Option<&FieldTable>, delay_queues: &[String]) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = get(headers, "x-death") else {
        return false;
    };
    deaths.as_slice().iter().any(|death| {
        let AMQPValue::FieldTable(t) = death else {
            return false;
        };
        let queue = header_string(Some(t), "queue");
        header_string(Some(t), "reason").as_deref() == Some("expired")
            && queue.is_some_and(|q| delay_queues.contains(&q))
    })
}

/// What the core needs of a delivery, with the worker's counters bounded by `bounds`.
pub fn inbound(
    body: &[u8],
    properties: &BasicProperties,
    redelivered: bool,
    bounds: &CounterBounds,
) -> Inbound {
    let headers = properties.headers().as_ref();
    let (retries, attempts) = bounds.bound(headers);
    Inbound {
        body: body.to_vec(),
        content_type: opt(properties.content_type()),
        content_encoding: opt(properties.content_encoding()),
        message_id: opt(properties.message_id()),
        correlation_id: opt(properties.correlation_id()),
        reply_to: opt(properties.reply_to()),
        traceparent: header_string(headers, TRACEPARENT),
        redelivered,
        attempts,
        deferrals: header_u32(headers, X_DEFERRALS).min(MAX_DEFERRALS),
        retries,
        replay_count: header_u32(headers, X_REPLAY_COUNT),
        // Copied onto our own headers later: only a timestamp is believed.
        first_failed_at: header_string(headers, X_FIRST_FAILED_AT)
            .filter(|t| t.len() <= 64 && crate::clock::parse_rfc3339(t).is_some()),
        dead_lettered: bounds.dead_lettered(headers),
    }
}

/// A copy carries at most this many encoded bytes of the headers it inherits; the largest
/// are dropped first. With the worker's own headers (a few hundred bytes, the error message
/// at most 1 KiB) and the short-string properties, a copy's content header stays far below
/// any broker's frame size, however large the headers the publisher sent.
pub const MAX_CARRIED_HEADER_BYTES: usize = 16 * 1024;
/// Inherited headers a copy never drops to fit: the broker's record of the message's
/// passes (what makes the worker believe its own counters) and the trace.
const KEPT: [&str; 8] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    TRACEPARENT,
];
/// Headers a copy never inherits: RabbitMQ's sender-selected distribution (`CC`/`BCC` name
/// more queues to deliver to) and the mark only the worker sets on its own parked copies.
const NOT_INHERITED: [&str; 3] = ["CC", "BCC", X_DEAD_LETTERED_AT];
/// Names of inherited headers a copy left out (comma-separated, at most 1 KiB).
pub const X_DROPPED_HEADERS: &str = "x-dropped-headers";
/// The command's own `expiration`, kept for the record: a copy never expires with it.
pub const X_ORIGINAL_EXPIRATION: &str = "x-original-expiration";
/// The command's `user_id`, kept for the record: the broker refuses a publish whose
/// `user_id` is not the publishing user, so a copy cannot carry it.
pub const X_ORIGINAL_USER_ID: &str = "x-original-user-id";
const MAX_DROPPED_LIST_BYTES: usize = 1024;

/// Header values to set on a copy of a delivery.
#[derive(Debug, Default, Clone)]
pub struct HeaderUpdate(Vec<(&'static str, AMQPValue)>);

impl HeaderUpdate {
    pub fn int(mut self, name: &'static str, value: u32) -> Self {
        self.0
            .push((name, AMQPValue::LongLongInt(i64::from(value))));
        self
    }

    pub fn text(mut self, name: &'static str, value: &str) -> Self {
        self.0
            .push((name, AMQPValue::LongString(LongString::from(value))));
        self
    }

    /// `x-dropped-headers` naming `names`, if there are any.
    fn dropped(self, names: &[String]) -> Self {
        if names.is_empty() {
            return self;
        }
        self.text(X_DROPPED_HEADERS, &dropped_list(names))
    }

    /// The command's `expiration` and `user_id`, which a copy cannot carry as properties.
    fn originals(mut self, original: &BasicProperties) -> Self {
        if let Some(expiration) = original.expiration() {
            self = self.text(X_ORIGINAL_EXPIRATION, expiration.as_str());
        }
        if let Some(user) = original.user_id() {
            self = self.text(X_ORIGINAL_USER_ID, user.as_str());
        }
        self
    }

    /// Set these headers in `headers`.
    pub fn write(self, headers: &mut BTreeMap<ShortString, AMQPValue>) {
        for (name, value) in self.0 {
            headers.insert(ShortString::from(name), value);
        }
    }

    /// These headers as a table of their own.
    pub fn table(self) -> FieldTable {
        let mut headers = BTreeMap::new();
        self.write(&mut headers);
        FieldTable::from(headers)
    }

    /// The properties of a copy of a delivery (a dead letter, a delay-tier copy, a replay):
    /// the original properties with these headers set, made persistent, and safe to publish
    /// whatever the publisher sent — inherited headers bounded to
    /// [`MAX_CARRIED_HEADER_BYTES`] (what was left out is named in `x-dropped-headers`),
    /// no `expiration` (a copy must not vanish with the command's TTL) and no `user_id` (the
    /// broker would refuse it); both are kept in headers instead.
    pub fn apply(self, original: &BasicProperties) -> BasicProperties {
        let mut headers: BTreeMap<ShortString, AMQPValue> = original
            .headers()
            .as_ref()
            .map(|t| t.inner().clone())
            .unwrap_or_default();
        for (name, _) in &self.0 {
            headers.remove(*name);
        }
        // Never inherited: routing instructions (RabbitMQ would deliver the copy to every
        // queue named there) and the marks only the worker may set on its own copies.
        for name in NOT_INHERITED {
            headers.remove(name);
        }
        let mut dropped: Vec<String> = match headers.remove(X_DROPPED_HEADERS) {
            Some(AMQPValue::LongString(d)) => String::from_utf8_lossy(d.as_bytes())
                .split(", ")
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        dropped.extend(bound(&mut headers, MAX_CARRIED_HEADER_BYTES));
        self.dropped(&dropped)
            .originals(original)
            .write(&mut headers);
        copy_properties(original, FieldTable::from(headers))
    }

    /// The smallest copy that still says what happened: the body's content type, the
    /// message and correlation ids, and these headers only. For when even a bounded copy
    /// does not fit, or the broker refused it.
    pub fn apply_minimal(self, original: &BasicProperties) -> BasicProperties {
        let headers = self
            .text(X_DROPPED_HEADERS, "* (the full copy was refused)")
            .table();
        let mut p = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2);
        copy_properties!(p, original;
            content_type => with_content_type,
            message_id => with_message_id,
            correlation_id => with_correlation_id,
        );
        p
    }
}

/// The properties of a message moved as it is (`dlq migrate`, `events replay-unrouted`):
/// every header kept, unbounded (the broker took the message with them), but never the
/// routing instructions (`CC`/`BCC` would deliver the copy to every queue they name; they
/// are named in `x-dropped-headers`), and `expiration`/`user_id` kept in headers as on
/// every copy.
pub fn republishable(original: &BasicProperties) -> BasicProperties {
    let mut headers: BTreeMap<ShortString, AMQPValue> = original
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default();
    let dropped: Vec<String> = ["CC", "BCC"]
        .into_iter()
        .filter(|name| headers.remove(*name).is_some())
        .map(str::to_owned)
        .collect();
    HeaderUpdate::default()
        .dropped(&dropped)
        .originals(original)
        .write(&mut headers);
    copy_properties(original, FieldTable::from(headers))
}

/// Every property of `original` but `expiration` and `user_id`, with `headers`, persistent.
fn copy_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    copy_properties!(p, original;
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        priority => with_priority,
        correlation_id => with_correlation_id,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    // Direct reply-to is only valid on the channel that consumes it: the broker closes any
    // other channel that publishes with it, so a copy never carries it.
    if let Some(v) = original.reply_to()
        && v.as_str() != "amq.rabbitmq.reply-to"
    {
        p = p.with_reply_to(v.clone());
    }
    p
}

/// Drop the largest entries of `headers` until their encoded size is at most `budget`;
/// returns the names dropped.
fn bound(headers: &mut BTreeMap<ShortString, AMQPValue>, budget: usize) -> Vec<String> {
    let mut total: usize = headers.iter().map(|(k, v)| entry_len(k, v)).sum();
    let mut sizes: Vec<(usize, ShortString)> = headers
        .iter()
        .filter(|(k, _)| !KEPT.contains(&k.as_str()))
        .map(|(k, v)| (entry_len(k, v), k.clone()))
        .collect();
    sizes.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    let mut dropped = Vec::new();
    for (size, name) in sizes {
        if total <= budget {
            break;
        }
        headers.remove(&name);
        total -= size;
        dropped.push(name.as_str().to_owned());
    }
    dropped
}

fn dropped_list(names: &[String]) -> String {
    let mut out = String::new();
    for name in names {
        let sep = if out.is_empty() { "" } else { ", " };
        if out.len() + sep.len() + name.len() > MAX_DROPPED_LIST_BYTES {
            out.push_str(", …");
            break;
        }
        out.push_str(sep);
        out.push_str(name);
    }
    out
}

fn entry_len(key: &ShortString, value: &AMQPValue) -> usize {
    1 + key.as_str().len() + value_len(value)
}

/// The encoded size of a field value (type tag included), as AMQP 0-9-1 writes it.
pub fn value_len(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_len).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_len(t),
        AMQPValue::Void => 0,
    }
}

/// The encoded size of a field table (its length prefix included).
pub fn table_len(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(k, v)| entry_len(k, v))
        .sum::<usize>()
}

/// An upper bound of the encoded size of a content header frame carrying `properties`
/// (frame overhead, class, weight, body size, flags, every property).
pub fn content_header_len(properties: &BasicProperties) -> usize {
    let p = properties;
    let short = |v: &Option<ShortString>| v.as_ref().map_or(0, |s| 1 + s.as_str().len());
    7 + 1
        + 14
        + short(p.content_type())
        + short(p.content_encoding())
        + p.headers().as_ref().map_or(0, table_len)
        + 2
        + short(p.correlation_id())
        + short(p.reply_to())
        + short(p.expiration())
        + short(p.message_id())
        + 8
        + short(p.kind())
        + short(p.user_id())
        + short(p.app_id())
        + short(p.cluster_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_any_integer_type() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::LongInt(3));
        t.insert("b".into(), AMQPValue::ShortShortUInt(4));
        t.insert("c".into(), AMQPValue::LongString("7".into()));
        t.insert("d".into(), AMQPValue::LongLongInt(-2));
        t.insert("e".into(), AMQPValue::Boolean(true));
        assert_eq!(header_u32(Some(&t), "a"), 3);
        assert_eq!(header_u32(Some(&t), "b"), 4);
        assert_eq!(header_u32(Some(&t), "c"), 7);
        assert_eq!(header_u32(Some(&t), "d"), 0);
        assert_eq!(header_u32(Some(&t), "e"), 0);
        assert_eq!(header_u32(Some(&t), "missing"), 0);
        assert_eq!(header_u32(None, "a"), 0);
    }

    #[test]
    fn update_keeps_other_headers_and_properties() {
        let mut t = FieldTable::default();
        t.insert("keep".into(), AMQPValue::LongString("me".into()));
        t.insert(X_ATTEMPTS.into(), AMQPValue::LongLongInt(1));
        let original = BasicProperties::default()
            .with_headers(t)
            .with_message_id("m1".into());
        let copy = HeaderUpdate::default()
            .int(X_ATTEMPTS, 3)
            .text(X_ERROR_KIND, "rejected")
            .apply(&original);
        let h = copy.headers().as_ref();
        assert_eq!(header_u32(h, X_ATTEMPTS), 3);
        assert_eq!(header_string(h, X_ERROR_KIND).as_deref(), Some("rejected"));
        assert_eq!(header_string(h, "keep").as_deref(), Some("me"));
        assert_eq!(copy.message_id().as_ref().map(|m| m.as_str()), Some("m1"));
        assert_eq!(*copy.delivery_mode(), Some(2));
    }
}

#[cfg(test)]
mod copy_tests {
    use super::*;

    fn big_original() -> BasicProperties {
        let mut t = FieldTable::default();
        t.insert(
            "x-big".into(),
            AMQPValue::LongString("h".repeat(130_000).into()),
        );
        t.insert(
            "x-medium".into(),
            AMQPValue::LongString("m".repeat(10_000).into()),
        );
        t.insert("keep".into(), AMQPValue::LongString("me".into()));
        BasicProperties::default()
            .with_headers(t)
            .with_expiration("1500".into())
            .with_user_id("upstream".into())
            .with_message_id("m1".into())
    }

    #[test]
    fn a_copy_is_bounded_and_says_what_it_left_out() {
        let copy = HeaderUpdate::default()
            .text(X_ERROR_KIND, "invalid_command")
            .apply(&big_original());
        let h = copy.headers().as_ref();
        assert_eq!(header_string(h, "x-big"), None);
        assert_eq!(header_string(h, "keep").as_deref(), Some("me"));
        assert!(
            header_string(h, "x-medium").is_some(),
            "only what is needed is dropped"
        );
        assert_eq!(
            header_string(h, X_DROPPED_HEADERS).as_deref(),
            Some("x-big")
        );
        assert_eq!(
            header_string(h, X_ERROR_KIND).as_deref(),
            Some("invalid_command")
        );
        assert!(content_header_len(&copy) < MAX_CARRIED_HEADER_BYTES + 4_096);
        assert_eq!(*copy.expiration(), None);
        assert_eq!(*copy.user_id(), None);
        assert_eq!(
            header_string(h, X_ORIGINAL_EXPIRATION).as_deref(),
            Some("1500")
        );
        assert_eq!(
            header_string(h, X_ORIGINAL_USER_ID).as_deref(),
            Some("upstream")
        );
        assert_eq!(copy.message_id().as_ref().map(|m| m.as_str()), Some("m1"));

        // A second copy (the next delay tier) keeps the record and drops nothing more.
        let again = HeaderUpdate::default().int(X_ATTEMPTS, 2).apply(&copy);
        let h = again.headers().as_ref();
        assert_eq!(
            header_string(h, X_DROPPED_HEADERS).as_deref(),
            Some("x-big")
        );
        assert_eq!(
            header_string(h, X_ORIGINAL_EXPIRATION).as_deref(),
            Some("1500")
        );
    }

    #[test]
    fn the_minimal_copy_keeps_only_what_says_what_happened() {
        let copy = HeaderUpdate::default()
            .text(X_ERROR_KIND, "invalid_command")
            .apply_minimal(&big_original());
        let h = copy.headers().as_ref();
        assert_eq!(h.map(|t| t.inner().len()), Some(2));
        assert_eq!(
            header_string(h, X_ERROR_KIND).as_deref(),
            Some("invalid_command")
        );
        assert!(content_header_len(&copy) < 512);
    }

    #[test]
    fn encoded_sizes_match_the_wire_format() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::LongString("xyz".into()));
        t.insert("b".into(), AMQPValue::LongLongInt(1));
        // 4 (table) + [1+1 + 1+4+3] + [1+1 + 1+8]
        assert_eq!(table_len(&t), 4 + 10 + 11);
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    fn death(queue: &str, reason: &str) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("queue".into(), AMQPValue::LongString(queue.into()));
        t.insert("reason".into(), AMQPValue::LongString(reason.into()));
        t.insert("count".into(), AMQPValue::LongLongInt(3));
        AMQPValue::FieldTable(t)
    }

    #[test]
    fn counters_are_believed_only_as_far_as_the_broker_saw_them() {
        let bounds = CounterBounds {
            delay_queues: vec!["w.retry.5s".into(), "w.retry.30s".into()],
            max_tries: 4,
        };
        let mut t = FieldTable::default();
        t.insert(X_ATTEMPTS.into(), AMQPValue::LongLongInt(1 << 62));
        t.insert(X_RETRIES.into(), AMQPValue::LongLongInt(1 << 62));
        t.insert(
            X_FIRST_FAILED_AT.into(),
            AMQPValue::LongString("x".repeat(100_000).into()),
        );
        let forged = BasicProperties::default().with_headers(t.clone());
        let m = inbound(b"{}", &forged, false, &bounds);
        assert_eq!((m.attempts, m.retries, m.first_failed_at), (0, 0, None));

        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(
                vec![
                    death("w.retry.5s", "expired"),
                    death("w.retry.5s", "expired"),
                    death("w", "rejected"),
                ]
                .into(),
            ),
        );
        t.insert(X_RETRIES.into(), AMQPValue::LongLongInt(2));
        t.insert(
            X_FIRST_FAILED_AT.into(),
            AMQPValue::LongString("2026-11-26T12:00:00Z".into()),
        );
        t.insert(X_ATTEMPTS.into(), AMQPValue::LongLongInt(50));
        let m = inbound(
            b"{}",
            &BasicProperties::default().with_headers(t.clone()),
            false,
            &bounds,
        );
        assert_eq!(m.retries, 2, "a copy of ours: its counters are believed");
        assert_eq!(m.attempts, 50);
        t.insert(X_ATTEMPTS.into(), AMQPValue::LongLongInt(1 << 40));
        t.insert(X_RETRIES.into(), AMQPValue::LongLongInt(1 << 40));
        let m = inbound(
            b"{}",
            &BasicProperties::default().with_headers(t.clone()),
            false,
            &bounds,
        );
        assert_eq!(
            (m.retries, m.attempts),
            (2, 4 * 3 * 10),
            "within sane bounds"
        );

        let mut forged = FieldTable::default();
        forged.insert(
            X_DEAD_LETTERED_AT.into(),
            AMQPValue::LongString("now".into()),
        );
        let fresh = BasicProperties::default().with_headers(forged.clone());
        assert!(
            !inbound(b"{}", &fresh, false, &bounds).dead_lettered,
            "not believed without a pass through a delay tier"
        );
        forged.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![death("w.retry.5s", "expired")].into()),
        );
        let parked = BasicProperties::default().with_headers(forged);
        assert!(inbound(b"{}", &parked, false, &bounds).dead_lettered);
        assert_eq!(m.first_failed_at.as_deref(), Some("2026-11-26T12:00:00Z"));
    }
}

#[cfg(test)]
mod inherit_tests {
    use super::*;

    #[test]
    fn routing_headers_and_our_marks_are_never_inherited_and_the_record_never_dropped() {
        let mut t = FieldTable::default();
        t.insert(
            "CC".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString("q".into())].into()),
        );
        t.insert(
            "BCC".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString("q".into())].into()),
        );
        t.insert(
            X_DEAD_LETTERED_AT.into(),
            AMQPValue::LongString("forged".into()),
        );
        // Many medium headers, more than the budget, and the broker's record of passes.
        for i in 0..300 {
            t.insert(
                format!("h{i}").as_str().into(),
                AMQPValue::LongString("v".repeat(100).into()),
            );
        }
        let mut death = FieldTable::default();
        death.insert("queue".into(), AMQPValue::LongString("w.retry.5s".into()));
        death.insert("reason".into(), AMQPValue::LongString("expired".into()));
        death.insert(
            "padding".into(),
            AMQPValue::LongString("p".repeat(500).into()),
        );
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        let copy = HeaderUpdate::default()
            .int(X_ATTEMPTS, 1)
            .apply(&BasicProperties::default().with_headers(t));
        let h = copy.headers().as_ref().expect("headers");
        assert!(!h.contains_key("CC") && !h.contains_key("BCC"));
        assert!(
            !h.contains_key(X_DEAD_LETTERED_AT),
            "only the worker sets it"
        );
        assert!(h.contains_key("x-death"), "never dropped to fit");
        assert!(table_len(h) < MAX_CARRIED_HEADER_BYTES + 2_048);
    }
}

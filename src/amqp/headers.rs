//! AMQP headers the worker reads and writes, and the mapping of a lapin
//! delivery to the core's [`Inbound`].

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

/// What the core needs of a delivery.
pub fn inbound(body: &[u8], properties: &BasicProperties, redelivered: bool) -> Inbound {
    let headers = properties.headers().as_ref();
    Inbound {
        body: body.to_vec(),
        content_type: opt(properties.content_type()),
        message_id: opt(properties.message_id()),
        correlation_id: opt(properties.correlation_id()),
        reply_to: opt(properties.reply_to()),
        traceparent: header_string(headers, TRACEPARENT),
        redelivered,
        attempts: header_u32(headers, X_ATTEMPTS),
        deferrals: header_u32(headers, X_DEFERRALS),
        retries: header_u32(headers, X_RETRIES),
        replay_count: header_u32(headers, X_REPLAY_COUNT),
        first_failed_at: header_string(headers, X_FIRST_FAILED_AT),
    }
}

/// Header values to set on a copy of a delivery.
#[derive(Debug, Default)]
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

    pub fn text_opt(self, name: &'static str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.text(name, v),
            None => self,
        }
    }

    /// The original properties (body is untouched by the caller) with these headers set.
    /// Copies are made persistent: they now live in a queue of ours.
    pub fn apply(self, original: &BasicProperties) -> BasicProperties {
        let mut headers = original.headers().clone().unwrap_or_default();
        for (name, value) in self.0 {
            headers.insert(ShortString::from(name), value);
        }
        original.clone().with_headers(headers).with_delivery_mode(2)
    }
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

//! Headers nested too deep to handle on an ordinary thread.
//!
//! A publisher may nest header tables and arrays as deep as a frame allows (about 21,000
//! levels in RabbitMQ's default 128 KiB frame). The broker client parses them recursively
//! on its own I/O thread, which is why that thread alone has a deep stack (see
//! `THREAD_STACK_BYTES`). Everything after it — copying, measuring, printing and finally
//! dropping the headers — would recurse as deep on the async runtime's threads, which have
//! small stacks (a 16-core node runs 16 of them, and the process must fit `ulimit -v`).
//!
//! Invariants:
//! - a delivery whose headers nest deeper than [`MAX_DEPTH`] is made shallow the moment it
//!   arrives, before anything recurses on it: the too-deep headers are left out and named
//!   in `x-dropped-headers` (so a dead-letter copy says what it left out), and the rest is
//!   kept;
//! - measuring the depth never recurses;
//! - the original, deep headers are dropped on one thread with a deep stack
//!   ([`DROP_STACK_BYTES`]), never on the runtime's.

use std::sync::Mutex;
use std::sync::mpsc::{Sender, channel};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::headers::X_DROPPED_HEADERS;

/// Deeper than this, a header is left out. Far beyond anything a real publisher sends.
pub const MAX_DEPTH: usize = 64;
/// Stack of the thread that drops deep headers: dropping the deepest a 128 KiB frame
/// allows takes under 32 MiB in a debug build, less in a release build.
pub const DROP_STACK_BYTES: usize = 64 << 20;

/// How deep `value` nests (a scalar is 0), counted without recursion and without going
/// past `limit + 1`.
fn depth_over(value: &AMQPValue, limit: usize) -> bool {
    let mut stack: Vec<(&AMQPValue, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        if depth > limit {
            return true;
        }
        match v {
            AMQPValue::FieldTable(t) => stack.extend(t.inner().values().map(|c| (c, depth + 1))),
            AMQPValue::FieldArray(a) => stack.extend(a.as_slice().iter().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    false
}

/// `delivery` with headers nested deeper than [`MAX_DEPTH`] left out (module
/// documentation); as it was when none is.
pub fn shallow(mut delivery: Delivery) -> Delivery {
    if let Some(properties) = shallow_properties(&delivery.properties) {
        let deep = std::mem::replace(&mut delivery.properties, properties);
        dispose(deep);
    }
    delivery
}

/// The shallow copy of `properties`, or `None` if no header nests too deep.
fn shallow_properties(properties: &BasicProperties) -> Option<BasicProperties> {
    let headers = properties.headers().as_ref()?;
    let deep: Vec<&ShortString> = headers
        .inner()
        .iter()
        .filter(|(_, v)| depth_over(v, MAX_DEPTH))
        .map(|(k, _)| k)
        .collect();
    if deep.is_empty() {
        return None;
    }
    let mut kept = FieldTable::default();
    for (k, v) in headers.inner() {
        if !deep.contains(&k) {
            // Bounded: every value kept nests at most MAX_DEPTH deep.
            kept.insert(k.clone(), v.clone());
        }
    }
    let mut dropped: Vec<String> = match headers.inner().get(X_DROPPED_HEADERS) {
        Some(AMQPValue::LongString(d)) => String::from_utf8_lossy(d.as_bytes())
            .split(", ")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    for name in &deep {
        if !dropped.iter().any(|d| d == name.as_str()) {
            dropped.push(name.as_str().to_owned());
        }
    }
    kept.insert(
        ShortString::from(X_DROPPED_HEADERS),
        AMQPValue::LongString(LongString::from(dropped.join(", "))),
    );
    Some(same_but_headers(properties, kept))
}

/// Every property of `o`, with `headers` instead of its own (never cloning those: they
/// may nest too deep to clone here).
fn same_but_headers(o: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default().with_headers(headers);
    copy_properties!(p, o;
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        expiration => with_expiration,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    p
}

/// Drop `deep` on the deep-stack thread (started on first use). If that thread cannot be
/// started, the process cannot handle such a message safely: that is fatal, said in one
/// line (see `crate::fatal`).
fn dispose(deep: BasicProperties) {
    static DROPPER: Mutex<Option<Sender<BasicProperties>>> = Mutex::new(None);
    let mut guard = crate::lock(&DROPPER);
    if guard.is_none() {
        let (tx, rx) = channel::<BasicProperties>();
        let started = std::thread::Builder::new()
            .name("deep-headers-drop".into())
            .stack_size(DROP_STACK_BYTES)
            .spawn(move || {
                for deep in rx {
                    drop(deep)
                }
            });
        if let Err(e) = started {
            crate::fatal::exit(&format!(
                "cannot start the thread that drops deeply nested headers ({e}); the address space limit (ulimit -v) is too small"
            ));
        }
        *guard = Some(tx);
    }
    if let Some(tx) = guard.as_ref()
        && let Err(returned) = tx.send(deep)
    {
        // The thread is gone (it cannot panic on a drop): keep the value rather than
        // recurse here.
        std::mem::forget(returned.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> AMQPValue {
        let mut v = AMQPValue::LongInt(1);
        for i in 0..depth {
            v = if i % 2 == 0 {
                AMQPValue::FieldArray(vec![v].into())
            } else {
                let mut t = FieldTable::default();
                t.insert("a".into(), v);
                AMQPValue::FieldTable(t)
            };
        }
        v
    }

    fn props(pairs: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(k.into(), v);
        }
        BasicProperties::default().with_headers(t)
    }

    #[test]
    fn depth_is_counted_without_recursion() {
        assert!(!depth_over(&nested(MAX_DEPTH), MAX_DEPTH));
        assert!(depth_over(&nested(MAX_DEPTH + 1), MAX_DEPTH));
        assert!(!depth_over(&AMQPValue::LongInt(1), 0));
    }

    #[test]
    fn only_too_deep_headers_are_left_out_and_named() {
        let p = props(vec![
            ("deep", nested(MAX_DEPTH + 1)),
            ("fine", nested(3)),
            (X_DROPPED_HEADERS, AMQPValue::LongString("CC".into())),
        ]);
        let shallow = shallow_properties(&p).expect("made shallow");
        let h = shallow.headers().as_ref().expect("headers");
        assert!(!h.contains_key("deep"));
        assert!(h.contains_key("fine"));
        assert_eq!(
            crate::amqp::headers::header_string(Some(h), X_DROPPED_HEADERS).as_deref(),
            Some("CC, deep")
        );
        assert!(shallow_properties(&props(vec![("fine", nested(3))])).is_none());
        let with_id = p
            .clone()
            .with_message_id("m".into())
            .with_user_id("u".into());
        let copy = shallow_properties(&with_id).expect("shallow");
        assert_eq!(copy.message_id().as_ref().map(|m| m.as_str()), Some("m"));
        assert_eq!(copy.user_id().as_ref().map(|m| m.as_str()), Some("u"));
        dispose(p);
    }
}

//! W3C trace context (`traceparent`) as the worker propagates it.
//!
//! Invariant: the trace id of an incoming command is kept end to end (API call, event);
//! the worker substitutes its own span id in the parent-id part, so the API and event
//! consumers see the worker as the parent span.

use std::fmt;

use rand::RngExt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traceparent {
    trace_id: String,
    span_id: String,
    flags: String,
}

impl Traceparent {
    /// Parse a version-00 `traceparent`; anything malformed is ignored (`None`) rather than
    /// failing the command, since tracing is advisory.
    pub fn parse(value: &str) -> Option<Traceparent> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        if version != "00"
            || parts.next().is_some()
            || !hex(trace_id, 32)
            || !hex(span_id, 16)
            || !hex(flags, 2)
        {
            return None;
        }
        if trace_id.bytes().all(|b| b == b'0') || span_id.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(Traceparent {
            trace_id: trace_id.to_owned(),
            span_id: span_id.to_owned(),
            flags: flags.to_owned(),
        })
    }

    /// A new root trace, for commands that arrive without one.
    pub fn new_root() -> Traceparent {
        let mut rng = rand::rng();
        Traceparent {
            trace_id: format!("{:032x}", rng.random::<u128>() | 1),
            span_id: format!("{:016x}", rng.random::<u64>() | 1),
            flags: "01".into(),
        }
    }

    /// Same trace, a fresh span id: the worker's own span.
    pub fn child(&self) -> Traceparent {
        Traceparent {
            trace_id: self.trace_id.clone(),
            span_id: format!("{:016x}", rand::rng().random::<u64>() | 1),
            flags: self.flags.clone(),
        }
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }
}

impl fmt::Display for Traceparent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_keeps_the_trace_id() {
        let tp = Traceparent::parse(SAMPLE).expect("valid");
        assert_eq!(tp.to_string(), SAMPLE);
        let child = tp.child();
        assert_eq!(child.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(child.to_string(), SAMPLE, "own span id");
        assert!(Traceparent::parse(&child.to_string()).is_some());
        assert!(Traceparent::parse(&Traceparent::new_root().to_string()).is_some());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(Traceparent::parse(bad), None, "{bad:?}");
        }
    }
}

//! Switchable misbehaviour. Every field defaults to "behave", so `{}` clears all faults
//! and a test or a sandbox user sets only what it needs, e.g.
//! `{"fail_next": {"count": 2, "status": 429, "retry_after": "1"}}`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every `/v3` request before it is answered.
    pub latency_ms: u64,
    /// Fail the next `count` create calls without creating anything.
    pub fail_next: Option<FailNext>,
    /// Fraction (0–1) of create calls answered with `error_status` without creating.
    pub error_rate: f64,
    /// Status used by `error_rate` (default 503).
    pub error_status: Option<u16>,
    /// The next N successful creates commit the group, then drop the connection unanswered.
    pub drop_after_commit: u32,
    /// The next N successful creates commit the group, then wait `stall_ms` before answering.
    pub stall_after_commit: u32,
    pub stall_ms: u64,
    /// Fail the next `count` list calls.
    pub fail_next_list: Option<FailNext>,
    /// Which key carries the new id in a 201 (the docs use both).
    pub id_key: IdKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailNext {
    pub count: u32,
    pub status: u16,
    /// Sent verbatim as `Retry-After` (delta-seconds or an HTTP-date).
    #[serde(default)]
    pub retry_after: Option<String>,
    /// Body to send instead of the JSON envelope (e.g. an HTML error page).
    #[serde(default)]
    pub body: Option<String>,
}

impl FailNext {
    pub fn new(count: u32, status: u16) -> FailNext {
        FailNext {
            count,
            status,
            retry_after: None,
            body: None,
        }
    }

    pub fn retry_after(mut self, value: impl Into<String>) -> FailNext {
        self.retry_after = Some(value.into());
        self
    }

    pub fn body(mut self, body: impl Into<String>) -> FailNext {
        self.body = Some(body.into());
        self
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdKey {
    #[default]
    #[serde(rename = "orgUnitId")]
    CamelCase,
    #[serde(rename = "org_unit_id")]
    SnakeCase,
}

impl IdKey {
    pub fn as_str(self) -> &'static str {
        match self {
            IdKey::CamelCase => "orgUnitId",
            IdKey::SnakeCase => "org_unit_id",
        }
    }
}

/// Take one use of a "next N" fault, clearing it when spent.
pub(crate) fn take(slot: &mut Option<FailNext>) -> Option<FailNext> {
    let spec = slot.as_mut()?;
    if spec.count == 0 {
        *slot = None;
        return None;
    }
    spec.count -= 1;
    let out = spec.clone();
    if spec.count == 0 {
        *slot = None;
    }
    Some(out)
}

pub(crate) fn take_count(n: &mut u32) -> bool {
    if *n > 0 {
        *n -= 1;
        true
    } else {
        false
    }
}

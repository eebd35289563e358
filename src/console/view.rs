//! The DLQ as the console shows it: one pass (the operator commands' [`DlqReader`]) read
//! into bounded summaries, shared by the requests of a few seconds.
//!
//! Invariants: a view reads without acking, so the DLQ goes back whole and in order; what
//! it keeps of each letter is bounded (the full letter is read again, alone, for its own
//! page); everything kept from a message is made printable before any page sees it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::Value;

use crate::config::Settings;
use crate::ops::OpsError;
use crate::ops::dlq::{self, DeadLetter, DlqReader};
use crate::text::printable;

/// One dead letter in a list.
#[derive(Debug, Clone)]
pub struct LetterView {
    pub id: String,
    pub position: usize,
    /// Printable and bounded, as every text kept here (the filter compares this form).
    pub kind: String,
    /// As in the body, when it is short enough to look up (at most 255 bytes) and holds
    /// nothing [`printable`] would change; else `None`.
    pub ext_id: Option<String>,
    /// The ext id as shown, whatever it is (`(none)` when the body has none).
    pub ext_id_text: String,
    pub attempts: u64,
    pub http_status: Option<u64>,
    pub replay_count: u64,
    pub first_failed_at: Option<String>,
    pub last_failed_at: Option<String>,
    pub error: Option<String>,
}

impl LetterView {
    pub fn new(l: &DeadLetter) -> LetterView {
        let j = l.to_json();
        let text = |key: &str, max: usize| j[key].as_str().map(|s| printable(s, max));
        LetterView {
            id: l.id(),
            position: l.position,
            kind: printable(&l.kind, 64),
            ext_id: l
                .ext_id
                .clone()
                .filter(|x| x.len() <= 255 && printable(x, 255) == *x),
            ext_id_text: dlq::shown_ext_id(l.ext_id.as_deref()),
            attempts: j["attempts"].as_u64().unwrap_or(0),
            http_status: j["http_status"].as_u64(),
            replay_count: j["replay_count"].as_u64().unwrap_or(0),
            first_failed_at: text("first_failed_at", 64),
            last_failed_at: text("last_failed_at", 64),
            error: text("error_message", 300),
        }
    }

    fn failed_at(&self) -> Option<SystemTime> {
        self.last_failed_at
            .as_deref()
            .or(self.first_failed_at.as_deref())
            .and_then(crate::clock::parse_rfc3339)
    }
}

/// The DLQ at one moment.
#[derive(Debug)]
pub struct Snapshot {
    pub letters: Vec<LetterView>,
    pub taken_at: SystemTime,
}

/// A pass over the DLQ for a page: it waits less than a command for another pass to end.
async fn open(settings: &Settings) -> Result<DlqReader, OpsError> {
    let dlq = &settings.topology.dead_letter_queue;
    DlqReader::open_waiting(settings, dlq, "console view", None, super::VIEW_LOCK_WAIT).await
}

/// Read the whole DLQ (one pass; it goes back in order).
pub async fn read(settings: &Settings) -> Result<Snapshot, OpsError> {
    let mut letters = Vec::new();
    open(settings)
        .await?
        .each(|_, l| letters.push(LetterView::new(&l)))
        .await?;
    Ok(Snapshot {
        letters,
        taken_at: SystemTime::now(),
    })
}

/// The letter `id` as `dlq peek --json` shows it, read in a pass of its own.
pub async fn find(settings: &Settings, id: &str) -> Result<Option<Value>, OpsError> {
    let mut found = None;
    open(settings)
        .await?
        .each(|_, l| {
            if found.is_none() && l.id() == id {
                found = Some(l.to_json());
            }
        })
        .await?;
    Ok(found)
}

/// The list's filter, as the form sends it (blank: any).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Filter {
    pub kind: String,
    pub ext_id: String,
    /// e.g. `2h`, `7d`: dead-lettered (last failed) at least this long ago.
    pub older_than: String,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.kind.is_empty() && self.ext_id.is_empty() && self.older_than.is_empty()
    }

    fn age(&self) -> Result<Option<Duration>, String> {
        let age = self.older_than.trim();
        if age.is_empty() {
            return Ok(None);
        }
        crate::config::parse_duration(age)
            .map(Some)
            .ok_or_else(|| format!("{} is not an age such as 2h or 7d", printable(age, 40)))
    }

    /// The letters of `snapshot` it lets through, or why the filter is wrong.
    pub fn apply<'a>(&self, snapshot: &'a Snapshot) -> Result<Vec<&'a LetterView>, String> {
        let age = self.age()?;
        let now = snapshot.taken_at;
        Ok(snapshot
            .letters
            .iter()
            .filter(|l| self.kind.is_empty() || l.kind == self.kind)
            .filter(|l| self.ext_id.is_empty() || l.ext_id.as_deref() == Some(&self.ext_id))
            .filter(|l| {
                age.is_none_or(|age| {
                    l.failed_at()
                        .and_then(|at| now.duration_since(at).ok())
                        .is_some_and(|elapsed| elapsed >= age)
                })
            })
            .collect())
    }

    /// For the audit line and the confirmation page.
    pub fn describe(&self) -> String {
        if self.is_empty() {
            return "all".to_owned();
        }
        let mut parts = Vec::new();
        for (name, value) in [
            ("kind", &self.kind),
            ("ext_id", &self.ext_id),
            ("older_than", &self.older_than),
        ] {
            if !value.is_empty() {
                parts.push(format!("{name}={}", printable(value, 160)));
            }
        }
        parts.join(" ")
    }

    /// The query string of a link to this filter's list (`page` from 1).
    pub fn query(&self, page: usize) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("kind", &self.kind),
            ("ext_id", &self.ext_id),
            ("older_than", &self.older_than),
        ] {
            if !value.is_empty() {
                query.append_pair(name, value);
            }
        }
        if page > 1 {
            query.append_pair("page", &page.to_string());
        }
        query.finish()
    }
}

/// What the overview shows of a snapshot.
#[derive(Debug, Default)]
pub struct Overview {
    pub by_kind: BTreeMap<String, usize>,
    pub oldest_first_failed: Option<String>,
    /// New dead letters per hour, the last hour first (24 of them).
    pub per_hour: Vec<usize>,
    /// Letters older than a day, or without a time.
    pub older: usize,
}

impl Overview {
    pub fn of(snapshot: &Snapshot) -> Overview {
        let mut o = Overview {
            per_hour: vec![0; 24],
            ..Overview::default()
        };
        for l in &snapshot.letters {
            *o.by_kind.entry(l.kind.clone()).or_insert(0) += 1;
            if let Some(t) = &l.first_failed_at
                && o.oldest_first_failed.as_ref().is_none_or(|old| t < old)
            {
                o.oldest_first_failed = Some(t.clone());
            }
            let hour = l
                .failed_at()
                .map(|at| {
                    snapshot
                        .taken_at
                        .duration_since(at)
                        .unwrap_or(Duration::ZERO)
                })
                .map(|ago| (ago.as_secs() / 3600) as usize);
            match hour.and_then(|h| o.per_hour.get_mut(h)) {
                Some(n) => *n += 1,
                None => o.older += 1,
            }
        }
        o
    }
}

/// A header's value as shown: JSON text, printable, bounded.
pub fn header_text(v: &Value) -> String {
    match v {
        Value::String(s) => printable(s, 2_000),
        other => printable(&other.to_string(), 2_000),
    }
}

/// A body as shown: pretty-printed when it is JSON, each line printable, bounded.
pub fn body_text(letter: &Value) -> String {
    let Some(body) = letter["body"].as_str() else {
        let b64 = letter["body_base64"].as_str().unwrap_or_default();
        return format!(
            "(not UTF-8: {} bytes; base64 below)\n{}",
            b64.len() / 4 * 3,
            printable(b64, 20_000)
        );
    };
    let pretty = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| body.to_owned());
    let mut out = String::new();
    for (i, line) in pretty.lines().enumerate() {
        if out.len() > 100_000 {
            out.push_str(&format!(
                "…({} more lines)",
                pretty.lines().count().saturating_sub(i)
            ));
            break;
        }
        out.push_str(&printable(line, 4_000));
        out.push('\n');
    }
    out
}

/// A JSON object of a letter (headers) as (name, value) rows, printable.
pub fn header_rows(letter: &Value) -> Vec<(String, String)> {
    letter["headers"]
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (printable(k, 200), header_text(v)))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(kind: &str, ext_id: &str, last: &str) -> LetterView {
        LetterView {
            id: format!("{kind}-{ext_id}"),
            position: 1,
            kind: kind.into(),
            ext_id: Some(ext_id.into()),
            ext_id_text: ext_id.into(),
            attempts: 1,
            http_status: None,
            replay_count: 0,
            first_failed_at: Some(last.into()),
            last_failed_at: Some(last.into()),
            error: None,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            letters: vec![
                view("rejected", "A", "2026-12-06T10:30:00Z"),
                view("rejected", "B", "2026-12-06T08:00:00Z"),
                view("retries_exhausted", "C", "2026-12-01T00:00:00Z"),
            ],
            taken_at: crate::clock::parse_rfc3339("2026-12-06T11:00:00Z").expect("time"),
        }
    }

    #[test]
    fn filters_by_kind_ext_id_and_age() {
        let s = snapshot();
        let ids = |f: Filter| -> Vec<String> {
            f.apply(&s)
                .expect("filter")
                .iter()
                .map(|l| l.id.clone())
                .collect()
        };
        assert_eq!(ids(Filter::default()).len(), 3);
        let kind = Filter {
            kind: "rejected".into(),
            ..Filter::default()
        };
        assert_eq!(ids(kind), ["rejected-A", "rejected-B"]);
        let ext = Filter {
            ext_id: "C".into(),
            ..Filter::default()
        };
        assert_eq!(ids(ext), ["retries_exhausted-C"]);
        let old = Filter {
            older_than: "2h".into(),
            ..Filter::default()
        };
        assert_eq!(ids(old), ["rejected-B", "retries_exhausted-C"]);
        let bad = Filter {
            older_than: "soon".into(),
            ..Filter::default()
        };
        assert!(bad.apply(&s).is_err());
    }

    #[test]
    fn the_overview_counts_by_kind_and_hour() {
        let o = Overview::of(&snapshot());
        assert_eq!(o.by_kind.get("rejected"), Some(&2));
        assert_eq!(o.per_hour[0], 1);
        assert_eq!(o.per_hour[3], 1);
        assert_eq!(o.older, 1);
        assert_eq!(
            o.oldest_first_failed.as_deref(),
            Some("2026-12-01T00:00:00Z")
        );
    }

    #[test]
    fn bodies_are_pretty_and_printable() {
        // JSON: pretty, and an escape stays a JSON escape.
        let letter = serde_json::json!({"body": "{\"a\":\"\\u001b[31mred\"}"});
        let text = body_text(&letter);
        assert!(text.contains("\"a\": \"\\u001b[31mred\""), "{text}");
        assert!(!text.contains('\u{1b}'));
        // Not JSON: each line printable.
        let raw = serde_json::json!({"body": "line one\n\u{1b}]0;title\u{7}two"});
        let text = body_text(&raw);
        assert_eq!(text, "line one\n\\u{1b}]0;title\\u{7}two\n");
        let binary = serde_json::json!({"body": null, "body_base64": "/wA="});
        assert!(body_text(&binary).starts_with("(not UTF-8"));
    }

    #[test]
    fn a_filter_links_to_its_list() {
        let f = Filter {
            kind: "rejected".into(),
            ext_id: "A&B".into(),
            older_than: String::new(),
        };
        assert_eq!(f.query(2), "kind=rejected&ext_id=A%26B&page=2");
        assert_eq!(f.describe(), "kind=rejected ext_id=A&B");
    }
}

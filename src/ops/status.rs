//! `status <ext_id>` / `status --message-id <id>`: what is known of one ext id (the dedup
//! record, the attempt marker and the last outcome), or of one invalid command.
//!
//! Read-only. "Known" means the store holds anything about it; the exit code says so.

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::app;
use crate::command::ExtId;
use crate::config::Settings;
use crate::dedup::{ExtIdStatus, RedisStore, StoredRecord};
use crate::pipeline::{LastOutcome, OutcomeKey, Place};
use crate::text::{printable, shell_quote};

use super::OpsError;

/// What to look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    ExtId(&'a str),
    MessageId(&'a str),
}

/// Prints what is known; returns whether anything is.
/// `again` is how to call this binary with the same configuration (for the commands it
/// suggests).
pub async fn run(
    settings: &Settings,
    lookup: Lookup<'_>,
    as_json: bool,
    again: &str,
) -> Result<bool, OpsError> {
    let store_error = |source| OpsError::Store {
        url: settings.redis.url.to_string(),
        source,
    };
    match lookup {
        Lookup::ExtId(text) => {
            let ext_id = ExtId::parse(text)
                .map_err(|e| OpsError::BadArgument(format!("not a valid ext id: {e}")))?;
            let store = app::dedup_store(settings).map_err(store_error)?;
            by_ext_id(&store, &ext_id, as_json, again)
                .await
                .map_err(store_error)
        }
        Lookup::MessageId(id) => {
            if id.is_empty() || id.len() > 255 {
                return Err(OpsError::BadArgument(
                    "a message id is 1 to 255 bytes".into(),
                ));
            }
            let store = app::dedup_store(settings).map_err(store_error)?;
            let last = store
                .last_outcome(OutcomeKey::MessageId(id))
                .await
                .map_err(store_error)?;
            print_message(id, last.as_ref(), as_json, again);
            Ok(last.is_some())
        }
    }
}

/// What is known of one ext id, as `status --json` prints it, for the console's page.
#[derive(Debug)]
pub struct Story {
    pub known: bool,
    /// The `status --json` object.
    pub json: Value,
    /// Where the message is now, in words (the text output's `now:` line).
    pub now: Option<String>,
}

/// [`Story`] of `ext_id`; `again` is how a suggested command calls this binary.
pub async fn story(settings: &Settings, ext_id: &ExtId, again: &str) -> Result<Story, OpsError> {
    let store_error = |source| OpsError::Store {
        url: settings.redis.url.to_string(),
        source,
    };
    let store = app::dedup_store(settings).map_err(store_error)?;
    let status = store.status(ext_id).await.map_err(store_error)?;
    let (known, json) = status_json(ext_id, &status);
    let now = status
        .last_outcome
        .as_ref()
        .map(|l| where_now(l, Some(ext_id.as_str()), again));
    Ok(Story { known, json, now })
}

/// Whether anything is known, and the `--json` object.
fn status_json(ext_id: &ExtId, status: &ExtIdStatus) -> (bool, Value) {
    let last = status.last_outcome.as_ref();
    let known = status.record.is_some()
        || status.unreadable.is_some()
        || status.attempt_markers > 0
        || last.is_some();
    let state = match &status.record {
        Some(StoredRecord::Created(_)) => "created",
        Some(StoredRecord::Claimed { .. }) => "claimed",
        None if status.unreadable.is_some() => "unreadable",
        None => match last {
            Some(l) => l.outcome.as_str(),
            None if known => "attempted",
            None => "unknown",
        },
    };
    let out = json!({
        "ext_id": ext_id.as_str(),
        "state": state,
        "record": status.record,
        "ttl_ms": status.ttl_ms,
        "post_attempts": status.attempt_markers,
        "unreadable": status.unreadable,
        "last_outcome": last.map(outcome_json),
    });
    (known, out)
}

async fn by_ext_id(
    store: &RedisStore,
    ext_id: &ExtId,
    as_json: bool,
    again: &str,
) -> Result<bool, crate::pipeline::StoreError> {
    let status = store.status(ext_id).await?;
    let last = status.last_outcome.as_ref();
    let (known, out) = status_json(ext_id, &status);
    if as_json {
        outln!("{out}");
        return Ok(known);
    }
    outln!("ext_id:        {}", printable(ext_id.as_str(), 160));
    print_state(&status, last, known);
    outln!("post_attempts: {}", status.attempt_markers);
    if let Some(l) = last {
        print_outcome(l, Some(ext_id.as_str()), again);
    }
    Ok(known)
}

/// The state lines of `status <ext_id>`: the record, or what stands for it.
fn print_state(status: &ExtIdStatus, last: Option<&LastOutcome>, known: bool) {
    match &status.record {
        Some(StoredRecord::Created(r)) => {
            outln!("state:         created");
            outln!("org_unit_id:   {}", r.org_unit_id);
            outln!("name:          {}", printable(&r.org_unit_name, 300));
            outln!("parent:        {}", r.org_unit_parent_id);
            match &r.found_at {
                None => outln!("created_at:    {}", printable(&r.created_at, 64)),
                Some(found) if *found == r.created_at => outln!(
                    "created_at:    at or before {} (its record was lost; a delivery found it existing by List then, and nothing kept the original time)",
                    printable(found, 64)
                ),
                Some(found) => outln!(
                    "created_at:    {} (its record was lost; found existing by List at {})",
                    printable(&r.created_at, 64),
                    printable(found, 64)
                ),
            }
            outln!(
                "api_request:   {}",
                printable(r.api_request_id.as_deref().unwrap_or("-"), 128)
            );
            if let Some(id) = &r.message_id {
                outln!("created by:    message {}", printable(id, 255));
            }
            if let Some(ms) = status.ttl_ms {
                outln!("forgotten in:  {}", human(ms));
            }
        }
        Some(StoredRecord::Claimed { owner, claimed_at }) => {
            outln!("state:         claimed (a worker is creating it now)");
            outln!("owner:         {}", printable(owner, 300));
            outln!("claimed_at:    {}", printable(claimed_at, 64));
            if let Some(ms) = status.ttl_ms {
                outln!("lease left:    {}", human(ms));
            }
        }
        None if status.unreadable.is_some() => {
            outln!(
                "state:         unreadable ({}; the worker replaces it on the next delivery)",
                printable(status.unreadable.as_deref().unwrap_or_default(), 300)
            );
        }
        None => match last {
            Some(l) => outln!("state:         {}", l.outcome),
            None if known => outln!(
                "state:         attempted (POSTs were made; no record and no outcome kept now)"
            ),
            None => outln!("state:         unknown (never seen, or forgotten after dedup.ttl)"),
        },
    }
}

fn print_message(id: &str, last: Option<&LastOutcome>, as_json: bool, again: &str) {
    if as_json {
        let out = json!({
            "message_id": id,
            "state": last.map_or("unknown", |l| l.outcome.as_str()),
            "last_outcome": last.map(outcome_json),
        });
        outln!("{out}");
        return;
    }
    outln!("message_id:    {}", printable(id, 255));
    match last {
        Some(l) => {
            outln!("state:         {}", l.outcome);
            match &l.ext_id {
                Some(e) => outln!("ext_id:        {}", printable(e, 160)),
                None => outln!("ext_id:        (none valid in the body)"),
            }
            print_outcome(l, l.ext_id.as_deref(), again);
        }
        None => outln!(
            "state:         unknown (only invalid commands without a valid ext id are kept by message id, for dedup.ttl; look the others up by ext id)"
        ),
    }
}

/// The record as stored, plus `overdue` for a message waiting in a delay queue.
fn outcome_json(last: &LastOutcome) -> Value {
    let mut value = serde_json::to_value(last).unwrap_or(Value::Null);
    if let (Some(overdue), Value::Object(map)) = (last.overdue(SystemTime::now()), &mut value) {
        map.insert("overdue".into(), Value::Bool(overdue));
    }
    value
}

fn print_outcome(last: &LastOutcome, ext_id: Option<&str>, again: &str) {
    let attempts = match last.attempts {
        0 => "no POST".to_owned(),
        1 => "1 POST".to_owned(),
        n => format!("{n} POSTs"),
    };
    outln!(
        "last outcome:  {} at {} ({})",
        last.outcome,
        printable(&last.at, 64),
        attempts
    );
    if let Some(id) = &last.message_id {
        outln!("  message_id:  {}", printable(id, 255));
    }
    if let Some(kind) = &last.error_kind {
        let http = last
            .http_status
            .map(|s| format!(", HTTP {s}"))
            .unwrap_or_default();
        outln!("  error:       {kind}{http}");
    } else if let Some(status) = last.http_status {
        outln!("  http_status: {status}");
    }
    if let Some(reason) = &last.reason {
        outln!("  reason:      {reason}");
    }
    if let Some(message) = &last.message {
        outln!("  message:     {}", printable(message, 512));
    }
    if let Some(id) = last.org_unit_id {
        outln!("  org_unit_id: {id}");
    }
    outln!("  now:         {}", where_now(last, ext_id, again));
}

/// Where the message is, in words an operator can act on; a suggested command is one the
/// shell takes as it is (`again` calls this binary with the same configuration).
fn where_now(last: &LastOutcome, ext_id: Option<&str>, again: &str) -> String {
    match &last.place {
        Place::Done => "done: acked after its event was published".into(),
        Place::DelayQueue { queue, tier, until } => {
            let queue = printable(queue, 255);
            let until = printable(until, 64);
            match last.overdue(SystemTime::now()) {
                Some(true) => format!(
                    "was due back from delay queue {queue} (tier {tier}) at {until}; if nothing newer shows, is a worker consuming?"
                ),
                _ => format!(
                    "in delay queue {queue} (tier {tier}) until about {until}, then back in the work queue"
                ),
            }
        }
        Place::DeadLetterQueue { queue } => {
            let queue = printable(queue, 255);
            let filter = match ext_id {
                Some(e) => format!("--ext-id {}", shell_quote(e)),
                None => "--kind invalid_command".into(),
            };
            if last.error_kind.as_deref() == Some("invalid_command") {
                // Replayed, the same bytes fail again (docs/operations.md §5).
                format!(
                    "in the dead-letter queue {queue}; an invalid command is never replayed: fix the publisher, send a corrected command, then remove this one: {again} dlq discard {filter} --export invalid-$(date +%F).jsonl"
                )
            } else {
                format!(
                    "in the dead-letter queue {queue}: {again} dlq replay {filter} --dry-run, then replay it once the cause is fixed, or discard it"
                )
            }
        }
        Place::WorkQueue => "back in the work queue".into(),
        Place::Discarded { export: Some(file) } => format!(
            "removed from the dead-letter queue by dlq discard; a copy was written to {}",
            printable(file, 512)
        ),
        Place::Discarded { export: None } => {
            "removed from the dead-letter queue by dlq discard --yes (no copy kept)".into()
        }
        Place::Unsettled => {
            "not settled (the channel was lost): the broker delivers it again".into()
        }
    }
}

pub(crate) fn human(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{}.{:03}s", s, ms % 1000),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_durations() {
        assert_eq!(super::human(1_500), "1.500s");
        assert_eq!(super::human(61_000), "1m1s");
        assert_eq!(super::human(7_260_000), "2h1m");
        assert_eq!(super::human(30 * 86_400_000), "30d0h");
    }
}

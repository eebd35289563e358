//! `dlq discard`: remove dead letters that will never succeed, never without a copy unless
//! told so.
//!
//! Invariants:
//! - with `--export FILE`, a first pass writes every matching dead letter to a new file
//!   (synced, then linked into place; never over an existing file); only then a second
//!   pass removes exactly those: a letter is acked only if one with the same content was
//!   exported (position and the broker's delivery count aside; letters that arrived or
//!   changed between the passes stay);
//! - a pass that did not see the whole DLQ, or a second pass that could not find every
//!   exported letter, fails (exit non-zero) and says how many were removed; when nothing
//!   matches, no file is written;
//! - without `--export`, nothing is removed unless `--yes` is given; `--dry-run` removes
//!   nothing and needs neither;
//! - what is not removed stays in the DLQ, in order (the same passes as the other tools).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::amqp::headers;
use crate::config::Settings;
use crate::ops::OpsError;

use crate::pipeline::Place;

use super::reader::{DeadLetter, DlqReader};
use super::{ExportFile, Selection, kinds};

/// Which dead letters `dlq discard` removes (its command-line options).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DiscardFilter {
    /// Only this ext id.
    #[arg(long)]
    pub ext_id: Option<String>,
    /// Only this x-error-kind (invalid_command, rejected, name_conflict, retries_exhausted,
    /// unknown, or broker:<reason>).
    #[arg(long, value_parser = kinds::parse_kind)]
    pub kind: Option<String>,
    /// Only dead letters dead-lettered longer ago than this (e.g. 7d, 12h), by their
    /// x-last-failed-at header; letters without it are kept.
    #[arg(long, value_parser = parse_age)]
    pub older_than: Option<Duration>,
    /// Remove at most N.
    #[arg(long, value_parser = kinds::parse_count)]
    pub limit: Option<usize>,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write the dead letters to this JSON-lines file first (as `dlq export` does); only
    /// those written are removed.
    #[arg(long, value_name = "FILE.jsonl")]
    pub export: Option<PathBuf>,
    /// Remove without writing them anywhere first.
    #[arg(long)]
    pub yes: bool,
    /// The summary as one JSON object: {"dry_run", "discarded", "kept"}.
    #[arg(long)]
    pub json: bool,
    /// Only these letters, each at most once (the console's confirmed pick).
    #[arg(skip)]
    pub only: Option<super::Selection>,
}

fn parse_age(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a duration such as 12h or 7d"))
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DiscardSummary {
    pub discarded: usize,
    pub kept: usize,
}

impl DiscardFilter {
    /// The console reports for itself: nothing per letter on standard output.
    fn quiet(&self) -> bool {
        self.only.is_some()
    }

    fn matches(&self, letter: &DeadLetter, now: SystemTime) -> bool {
        self.ext_id
            .as_deref()
            .is_none_or(|x| letter.ext_id.as_deref() == Some(x))
            && self.kind.as_deref().is_none_or(|k| letter.kind == k)
            && self.older_than.is_none_or(|age| {
                letter
                    .header(headers::X_LAST_FAILED_AT)
                    .and_then(|t| crate::clock::parse_rfc3339(&t))
                    .and_then(|at| now.duration_since(at).ok())
                    .is_some_and(|elapsed| elapsed >= age)
            })
    }
}

/// Headers the broker adds or changes each time it delivers a message.
pub(super) const DELIVERY_COUNTS: [&str; 2] = ["x-delivery-count", "x-acquired-count"];

/// What makes a dead letter the same one in two passes: its JSON form without what the
/// passes themselves change (its position, the broker's delivery counts), with every
/// object's keys in one order (removing a key may reorder the others, and the broker adds
/// `x-delivery-count` only from the second reading on).
pub(super) fn identity(letter: &DeadLetter) -> String {
    identity_of(letter.to_json())
}

fn identity_of(mut j: serde_json::Value) -> String {
    if let Some(o) = j.as_object_mut() {
        o.remove("position");
    }
    if let Some(h) = j.get_mut("headers").and_then(|h| h.as_object_mut()) {
        // The broker's own counts of this letter's deliveries (RabbitMQ 4.3 adds
        // `x-acquired-count` too).
        for count in DELIVERY_COUNTS {
            h.remove(count);
        }
    }
    // Keys sorted at every level: the same letter gives the same text whatever order its
    // keys came in.
    j.sort_all_objects();
    j.to_string()
}

/// `dlq discard`: discard, then print the summary (one JSON object with `--json`).
pub async fn discard_command(
    settings: &Settings,
    filter: &DiscardFilter,
) -> Result<DiscardSummary, OpsError> {
    let s = discard(settings, filter).await?;
    let json =
        serde_json::json!({"dry_run": filter.dry_run, "discarded": s.discarded, "kept": s.kept});
    crate::output::summary(filter.json, json, || {
        let verb = if filter.dry_run {
            "would discard"
        } else {
            "discarded"
        };
        format!("{verb} {}, kept {}", s.discarded, s.kept)
    });
    Ok(s)
}

/// Remove matching dead letters (module documentation).
pub async fn discard(
    settings: &Settings,
    filter: &DiscardFilter,
) -> Result<DiscardSummary, OpsError> {
    if !filter.dry_run && filter.export.is_none() && !filter.yes {
        return Err(OpsError::BadArgument(
            "dlq discard removes dead letters for good: give --export FILE to keep a copy first, or --yes to remove them without one (--dry-run shows what would go)".into(),
        ));
    }
    let now = SystemTime::now();
    // The exported letters, counted: the second pass removes exactly these.
    let mut exported: Option<Selection> = None;
    if let (Some(path), false) = (&filter.export, filter.dry_run) {
        match export_matching(settings, filter, path, now).await? {
            Some(lines) => exported = Some(lines),
            None => {
                errln!(
                    "no dead letter matches: nothing was removed, and {} was not written",
                    crate::text::printable(&path.display().to_string(), 300)
                );
                return Ok(DiscardSummary::default());
            }
        }
    }
    let want = exported.as_ref().map(Selection::len);
    let summary = remove_matching(settings, filter, exported, now).await?;
    match want {
        Some(want) if summary.discarded < want => Err(OpsError::NotAllRemoved {
            removed: summary.discarded,
            exported: want,
            file: filter
                .export
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }),
        _ => Ok(summary),
    }
}

/// The first pass: every matching dead letter into the export file. `None` when nothing
/// matched (no file is written then); the identities written, counted, otherwise. A pass
/// that did not see the whole DLQ writes no file.
async fn export_matching(
    settings: &Settings,
    filter: &DiscardFilter,
    path: &std::path::Path,
    now: SystemTime,
) -> Result<Option<Selection>, OpsError> {
    ExportFile::check_target(path)?;
    let mut reader = DlqReader::open(settings, "discard", None).await?;
    let mut file = match ExportFile::create(path) {
        Ok(f) => f,
        Err(e) => return super::ended(Err(e), reader.close().await),
    };
    let mut lines = Selection::default();
    let mut n = 0;
    let mut only = filter.only.clone();
    let written = loop {
        match reader.next().await {
            Ok(Some(l))
                if filter.limit.is_none_or(|max| n < max)
                    && filter.matches(&l, now)
                    && only.as_mut().is_none_or(|s| s.take(&l)) =>
            {
                if let Err(source) = writeln!(file.writer, "{}", l.to_json()) {
                    break Err(OpsError::output(&file.tmp)(source));
                }
                lines.insert(l.id());
                n += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    match super::ended(written, reader.close().await) {
        Ok(()) if n == 0 => {
            file.abort();
            Ok(None)
        }
        Ok(()) => file.finish().map(|()| Some(lines)),
        Err(e) => {
            file.abort();
            Err(e)
        }
    }
}

/// The second pass: remove the matching dead letters (only those exported, if any were).
async fn remove_matching(
    settings: &Settings,
    filter: &DiscardFilter,
    mut exported: Option<Selection>,
    now: SystemTime,
) -> Result<DiscardSummary, OpsError> {
    let mut reader = DlqReader::open(settings, "discard", None).await?;
    let mut summary = DiscardSummary::default();
    let mut notes = (!filter.dry_run).then(|| super::notes::Notes::new(settings));
    // Without an export, the selection itself (with one, the export is already only it).
    let mut only = filter.only.clone().filter(|_| exported.is_none());
    let place = Place::Discarded {
        export: filter
            .export
            .as_ref()
            .map(|p| crate::text::printable(&p.display().to_string(), 512)),
    };
    let result = loop {
        let letter = match reader.next().await {
            Ok(Some(l)) => l,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let wanted = filter.limit.is_none_or(|max| summary.discarded < max)
            && filter.matches(&letter, now)
            && only.as_mut().is_none_or(|s| s.take(&letter))
            && exported.as_mut().is_none_or(|lines| lines.take(&letter));
        if !wanted {
            summary.kept += 1;
            continue;
        }
        if filter.dry_run {
            if !filter.json
                && !filter.quiet()
                && let Err(e) = crate::output::line(format_args!(
                    "would discard #{} kind={} ext_id={}",
                    letter.position,
                    crate::text::printable(&letter.kind, 64),
                    super::shown_ext_id(letter.ext_id.as_deref())
                ))
            {
                break Err(super::stdout_error(e, reader.returned_in_order()));
            }
            summary.discarded += 1;
            continue;
        }
        reader.ack(&letter);
        summary.discarded += 1;
        if let Some(notes) = notes.as_mut() {
            notes.note(&letter, "discarded", place.clone()).await;
        }
    };
    summary.kept += reader.remaining();
    super::ended(result, reader.close().await).map(|()| summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_letter_is_the_same_whatever_the_key_order_and_delivery_counts() {
        // As read the first time (no count yet), and later, with the broker's counts and
        // the headers in another order.
        let first = json!({"position": 1, "ext_id": "X", "headers": {"x-attempts": 1, "x-error-kind": "rejected", "x-last-failed-at": "t"}});
        let later = json!({"ext_id": "X", "position": 7, "headers": {"x-last-failed-at": "t", "x-delivery-count": 3, "x-acquired-count": 3, "x-error-kind": "rejected", "x-attempts": 1}});
        assert_eq!(identity_of(first), identity_of(later));
        let other = json!({"ext_id": "Y", "headers": {"x-attempts": 1}});
        assert_ne!(
            identity_of(other),
            identity_of(json!({"ext_id": "X", "headers": {"x-attempts": 1}}))
        );
    }
}

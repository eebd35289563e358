//! `dlq stats | peek | export | replay | migrate`: the dead-letter queue for operators.
//!
//! - `reader.rs` — a pass over the DLQ that loses and reorders nothing;
//! - `replay.rs` — moving dead letters back (confirmed publish; acked at the end of the pass);
//! - `json.rs` — dead letters as JSON for `peek --json` and `export`;
//! - `migrate.rs` — re-declaring a DLQ of an earlier version without losing a letter;
//! - `discard.rs` — removing dead letters that will never succeed, after a copy;
//! - `file.rs` — the export file: new, complete or absent, never over another file;
//! - `kinds.rs` — the `--kind` and `--limit` values the tools accept;
//! - `marker.rs` — what a pass that never ended did to the order, for the next one and `check`;
//! - `notes.rs` — the last outcome of a replayed or discarded dead letter, for `status`;
//! - `selection.rs` — letters picked by content, each acted on at most once (the console).

mod discard;
mod file;
mod json;
pub mod kinds;
pub mod marker;
mod migrate;
mod notes;
mod reader;
mod replay;
mod selection;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::amqp::headers;
use crate::config::Settings;
use crate::text::printable;

use super::OpsError;

pub use discard::{DiscardFilter, DiscardSummary, discard, discard_command};
pub(crate) use file::ExportFile;
pub use json::amqp_to_json;
pub use migrate::{Migration, interrupted_migration, migrate, migrate_command};
pub use reader::{DeadLetter, DlqReader, pass_running};
pub use replay::{DEFAULT_MAX_REPLAYS, ReplayFilter, ReplaySummary, replay, replay_command};
pub use selection::Selection;

pub async fn stats(settings: &Settings, as_json: bool) -> Result<(), OpsError> {
    let reader = DlqReader::open(settings, "stats", None).await?;
    let total = reader.total_in_queue;
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut oldest: Option<String> = None;
    reader
        .each(|_, l| {
            *by_kind.entry(l.kind.clone()).or_insert(0) += 1;
            if let Some(t) = l.header(headers::X_FIRST_FAILED_AT)
                && oldest.as_ref().is_none_or(|o| t < *o)
            {
                oldest = Some(t);
            }
        })
        .await?;
    let dlq = &settings.topology.dead_letter_queue;
    let mut lines = Vec::new();
    if as_json {
        lines.push(
            json!({"queue": dlq, "count": total, "by_kind": by_kind, "oldest_first_failed_at": oldest})
                .to_string(),
        );
    } else {
        lines.push(format!(
            "{dlq}: {}",
            crate::text::count(u64::from(total), "dead letter", "dead letters")
        ));
        for (kind, n) in &by_kind {
            lines.push(format!("  {:<24} {n}", printable(kind, 64)));
        }
        if let Some(o) = oldest {
            lines.push(format!("  oldest first failure     {}", printable(&o, 64)));
        }
    }
    lines
        .iter()
        .try_for_each(crate::output::line)
        .map_err(|e| stdout_error(e, "the DLQ is back, in order".into()))
}

/// The result of a pass's work and of its close, as one: the work's own error first (an
/// interruption says more than the short pass it caused).
pub fn ended<T>(work: Result<T, OpsError>, closed: Result<(), OpsError>) -> Result<T, OpsError> {
    let value = work?;
    closed?;
    Ok(value)
}

/// A failed write to standard output: a closed pipe is [`OpsError::StdoutClosed`].
pub(crate) fn stdout_error(e: std::io::Error, done: String) -> OpsError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        OpsError::StdoutClosed { done }
    } else {
        OpsError::output("standard output")(e)
    }
}

/// `dlq peek`: the first `limit` dead letters. A reader that closes standard output early
/// (`| head`) ends the pass quietly, as it asked: the DLQ goes back in order, exit 0.
pub async fn peek(
    settings: &Settings,
    limit: Option<usize>,
    as_json: bool,
) -> Result<(), OpsError> {
    let mut reader = DlqReader::open(settings, "peek", limit).await?;
    let mut shown = 0;
    let result = loop {
        let l = match reader.next().await {
            Ok(Some(l)) => l,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        shown += 1;
        if let Err(e) = show(&l, as_json) {
            break Err(stdout_error(e, reader.returned_in_order()));
        }
    };
    let total = reader.total_in_queue;
    let closed = reader.close().await;
    match (result, closed) {
        // The reader went away (`| head`): what it asked for, unless the pass was short.
        (Err(OpsError::StdoutClosed { .. }), Ok(())) => return Ok(()),
        (Err(OpsError::StdoutClosed { .. }), Err(e)) => return Err(e),
        (result, closed) => ended(result, closed)?,
    }
    if !as_json {
        let _ = crate::output::line(format!("({shown} shown of {total}; nothing was removed)"));
    }
    Ok(())
}

/// One dead letter as `peek` shows it. Everything from the message is escaped and bounded
/// for the terminal.
fn show(l: &DeadLetter, as_json: bool) -> std::io::Result<()> {
    let j = l.to_json();
    if as_json {
        return crate::output::line(&j);
    }
    let http = j["http_status"]
        .as_u64()
        .map_or_else(|| "-".to_owned(), |s| s.to_string());
    let message_id = l
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(|| "(none)".to_owned(), |m| printable(m.as_str(), 128));
    crate::output::line(format_args!(
        "#{} kind={} http={http} attempts={} replays={} ext_id={} message_id={message_id} first_failed={}",
        l.position,
        printable(&l.kind, 64),
        j["attempts"],
        j["replay_count"],
        shown_ext_id(l.ext_id.as_deref()),
        printable(j["first_failed_at"].as_str().unwrap_or("-"), 64),
    ))?;
    if let Some(m) = j["error_message"].as_str() {
        crate::output::line(format_args!("   reason: {}", printable(m, 400)))?;
    }
    let body = j["body"]
        .as_str()
        .map_or_else(|| "(binary, see --json)".to_owned(), |b| printable(b, 300));
    crate::output::line(format_args!("   body:   {body}"))
}

/// An ext id as the text output shows it: one spelling for a missing one, quotes for an
/// empty one, escaped and bounded otherwise.
pub fn shown_ext_id(ext_id: Option<&str>) -> String {
    match ext_id {
        None => "(none)".to_owned(),
        Some("") => "\"\"".to_owned(),
        Some(x) => printable(x, 160),
    }
}

/// `dlq export --out FILE|-`: every dead letter as a JSON line, in queue order, into a new
/// file (see [`ExportFile`]: never over an existing one) or, with `-`, standard output. A
/// pass that did not see the whole DLQ writes no file and fails.
pub async fn export(settings: &Settings, out: &Path) -> Result<(), OpsError> {
    let to_stdout = out.as_os_str() == "-";
    if !to_stdout {
        ExportFile::check_target(out)?;
    }
    let mut reader = DlqReader::open(settings, "export", None).await?;
    let total = reader.total_in_queue;
    if to_stdout {
        let mut stdout = crate::output::writer();
        let written = write_pass(&mut reader, &mut stdout).await;
        let written = written.map_err(|e| match e {
            PassError::Read(e) => e,
            PassError::Write(e) => stdout_error(e, reader.returned_in_order()),
        });
        let n = ended(written, reader.close().await)?;
        report_export(n, total, "standard output");
        return Ok(());
    }
    let mut file = match ExportFile::create(out) {
        Ok(f) => f,
        Err(e) => return ended(Err(e), reader.close().await),
    };
    let written = write_pass(&mut reader, &mut file.writer).await;
    let written = written.map_err(|e| match e {
        PassError::Read(e) => e,
        PassError::Write(source) => OpsError::output(&file.tmp)(source),
    });
    match ended(written, reader.close().await) {
        Ok(n) => {
            file.finish()?;
            report_export(n, total, &out.display().to_string());
            Ok(())
        }
        Err(e) => {
            file.abort();
            Err(e)
        }
    }
}

enum PassError {
    Read(OpsError),
    Write(std::io::Error),
}

/// The pass written as JSON lines to `w`: how many were written.
async fn write_pass(reader: &mut DlqReader, w: &mut impl Write) -> Result<usize, PassError> {
    let mut n = 0;
    while let Some(l) = reader.next().await.map_err(PassError::Read)? {
        writeln!(w, "{}", l.to_json()).map_err(PassError::Write)?;
        n += 1;
    }
    w.flush().map_err(PassError::Write)?;
    Ok(n)
}

fn report_export(n: usize, total: u32, to: &str) {
    errln!(
        "exported {n} of the {total} dead letters to {} (nothing was removed)",
        printable(to, 300)
    );
}

//! `dlq stats | peek | export | replay | migrate`: the dead-letter queue for operators.
//!
//! - `reader.rs` — a pass over the DLQ that loses and reorders nothing;
//! - `replay.rs` — moving dead letters back (confirmed publish, then ack);
//! - `json.rs` — dead letters as JSON for `peek --json` and `export`;
//! - `migrate.rs` — re-declaring a DLQ of an earlier version without losing a letter;
//! - `discard.rs` — removing dead letters that will never succeed, after a copy;
//! - `kinds.rs` — the `--kind` and `--limit` values the tools accept;
//! - `notes.rs` — the last outcome of a replayed or discarded dead letter, for `status`.

mod discard;
mod json;
pub mod kinds;
mod migrate;
mod notes;
mod reader;
mod replay;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::amqp::headers;
use crate::config::Settings;
use crate::text::printable;

use super::OpsError;

pub use discard::{DiscardFilter, DiscardSummary, discard};
pub use json::amqp_to_json;
pub use migrate::{Migration, interrupted_migration, migrate};
pub use reader::{DeadLetter, DlqReader};
pub use replay::{ReplayFilter, ReplaySummary, replay, replay_command};

pub async fn stats(settings: &Settings, as_json: bool) -> Result<(), OpsError> {
    let mut reader = DlqReader::open(settings, None).await?;
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut oldest: Option<String> = None;
    let result = loop {
        match reader.next().await {
            Ok(Some(l)) => {
                *by_kind.entry(l.kind.clone()).or_insert(0) += 1;
                if let Some(t) = l.header(headers::X_FIRST_FAILED_AT)
                    && oldest.as_ref().is_none_or(|o| t < *o)
                {
                    oldest = Some(t);
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let total = reader.total_in_queue;
    reader.close().await;
    result?;
    if as_json {
        println!(
            "{}",
            json!({"queue": settings.topology.dead_letter_queue, "count": total, "by_kind": by_kind, "oldest_first_failed_at": oldest})
        );
    } else {
        println!(
            "{}: {total} dead letters",
            settings.topology.dead_letter_queue
        );
        for (kind, n) in &by_kind {
            println!("  {:<24} {n}", printable(kind, 64));
        }
        if let Some(o) = oldest {
            println!("  oldest first failure     {}", printable(&o, 64));
        }
    }
    Ok(())
}

pub async fn peek(
    settings: &Settings,
    limit: Option<usize>,
    as_json: bool,
) -> Result<(), OpsError> {
    let mut reader = DlqReader::open(settings, limit).await?;
    let mut shown = 0;
    let result = loop {
        let l = match reader.next().await {
            Ok(Some(l)) => l,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        shown += 1;
        let j = l.to_json();
        if as_json {
            println!("{j}");
            continue;
        }
        // Everything below comes from the message: escaped and bounded for the terminal.
        let http = j["http_status"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |s| s.to_string());
        let message_id = l
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map_or_else(|| "(none)".to_owned(), |m| printable(m.as_str(), 128));
        println!(
            "#{} kind={} http={http} attempts={} replays={} ext_id={} message_id={message_id} first_failed={}",
            l.position,
            printable(&l.kind, 64),
            j["attempts"],
            j["replay_count"],
            shown_ext_id(l.ext_id.as_deref()),
            printable(j["first_failed_at"].as_str().unwrap_or("-"), 64),
        );
        if let Some(m) = j["error_message"].as_str() {
            println!("   reason: {}", printable(m, 400));
        }
        let body = j["body"]
            .as_str()
            .map_or_else(|| "(binary, see --json)".to_owned(), |b| printable(b, 300));
        println!("   body:   {body}");
    };
    let total = reader.total_in_queue;
    reader.close().await;
    result?;
    if !as_json {
        println!("({shown} shown of {total}; nothing was removed)");
    }
    Ok(())
}

/// An ext id as the text output shows it: one spelling for a missing one, quotes for an
/// empty one, escaped and bounded otherwise.
pub(crate) fn shown_ext_id(ext_id: Option<&str>) -> String {
    match ext_id {
        None => "(none)".to_owned(),
        Some("") => "\"\"".to_owned(),
        Some(x) => printable(x, 160),
    }
}

/// `dlq export --out FILE|-`: every dead letter as a JSON line, in queue order. A file is
/// written to a new temporary file beside it (created exclusively, owner-only: dead letters
/// hold personal data) and renamed over it when complete, so a half-written export never
/// appears; only a regular file or a new path is accepted (never a device, a directory or
/// a symbolic link). `-` writes to standard output.
pub async fn export(settings: &Settings, out: &Path) -> Result<(), OpsError> {
    if out.as_os_str() == "-" {
        let mut stdout = std::io::BufWriter::new(std::io::stdout());
        let (n, total) = write_pass(settings, &mut stdout, Path::new("standard output")).await?;
        report_export(n, total, "standard output");
        return Ok(());
    }
    let mut file = SafeFile::create(out)?;
    match write_pass(settings, &mut file.writer, &file.tmp).await {
        Ok((n, total)) => {
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

/// A file written beside its target and renamed over it only when complete: created
/// exclusively (never through a symbolic link), owner-only (dead letters hold personal
/// data), synced before the rename; only a regular file or a new path is replaced.
pub(crate) struct SafeFile {
    pub writer: std::io::BufWriter<std::fs::File>,
    pub tmp: std::path::PathBuf,
    out: std::path::PathBuf,
}

impl SafeFile {
    pub fn create(out: &Path) -> Result<SafeFile, OpsError> {
        check_export_target(out)?;
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".to_owned());
        let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            // create_new: O_EXCL, which also refuses to follow a symbolic link planted there.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|source| OpsError::Output {
                    path: tmp.clone(),
                    source,
                })?
        };
        Ok(SafeFile {
            writer: std::io::BufWriter::new(file),
            tmp,
            out: out.to_path_buf(),
        })
    }

    /// Sync, then put it in place of the target.
    pub fn finish(self) -> Result<(), OpsError> {
        let SafeFile { writer, tmp, out } = self;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpsError::Output { path, source }
        };
        let done = (|| {
            let file = writer.into_inner().map_err(|e| OpsError::Output {
                path: tmp.clone(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(io(&tmp))?;
            // What is there now must still be a regular file or nothing.
            check_export_target(&out)?;
            std::fs::rename(&tmp, &out).map_err(io(&out))
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }

    pub fn abort(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Refuse an export target that exists and is not a regular file (a device, a directory,
/// a socket, a symbolic link — not followed).
fn check_export_target(out: &Path) -> Result<(), OpsError> {
    match std::fs::symlink_metadata(out) {
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            let t = meta.file_type();
            let kind = if t.is_symlink() {
                "a symbolic link"
            } else if t.is_dir() {
                "a directory"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else if t.is_fifo() {
                "a named pipe"
            } else if t.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            Err(OpsError::BadArgument(format!(
                "--out {}: is {kind}; export writes only to a regular file, a new path, or - (standard output)",
                out.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(OpsError::Output {
            path: out.to_path_buf(),
            source,
        }),
    }
}

/// One pass written as JSON lines to `w`: (exported, what the DLQ held at the start).
async fn write_pass(
    settings: &Settings,
    w: &mut impl Write,
    path: &Path,
) -> Result<(usize, u32), OpsError> {
    let mut reader = DlqReader::open(settings, None).await?;
    let io = |source| OpsError::Output {
        path: path.to_path_buf(),
        source,
    };
    let result = async {
        let mut n = 0;
        while let Some(l) = reader.next().await? {
            writeln!(w, "{}", l.to_json()).map_err(io)?;
            n += 1;
        }
        w.flush().map_err(io)?;
        Ok(n)
    }
    .await;
    let total = reader.total_in_queue;
    reader.close().await;
    result.map(|n| (n, total))
}

fn report_export(n: usize, total: u32, to: &str) {
    if n < total as usize {
        eprintln!(
            "exported {n} of the {total} dead letters to {} (the DLQ changed during the export; nothing was removed)",
            printable(to, 300)
        );
    } else {
        eprintln!(
            "exported {n} dead letters to {} (nothing was removed)",
            printable(to, 300)
        );
    }
}

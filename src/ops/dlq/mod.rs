//! `dlq stats | peek | export | replay`: the dead-letter queue for operators.
//!
//! - `reader.rs` — a pass over the DLQ that loses and reorders nothing;
//! - `replay.rs` — moving dead letters back (confirmed publish, then ack);
//! - `json.rs` — dead letters as JSON for `peek --json` and `export`.

mod json;
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

pub use json::amqp_to_json;
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

pub async fn peek(settings: &Settings, limit: usize, as_json: bool) -> Result<(), OpsError> {
    let mut reader = DlqReader::open(settings, Some(limit)).await?;
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
        println!(
            "#{} kind={} http={} attempts={} replays={} ext_id={} first_failed={}",
            l.position,
            printable(&l.kind, 64),
            j["http_status"],
            j["attempts"],
            j["replay_count"],
            printable(l.ext_id.as_deref().unwrap_or("-"), 160),
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

pub async fn export(settings: &Settings, out: &Path) -> Result<(), OpsError> {
    let mut reader = DlqReader::open(settings, None).await?;
    // Write next to the target, then rename: a half-written audit file never appears.
    let tmp = out.with_extension("jsonl.tmp");
    let result: Result<usize, OpsError> = async {
        let io = |source| OpsError::Output {
            path: tmp.clone(),
            source,
        };
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let mut n = 0;
        while let Some(l) = reader.next().await? {
            writeln!(file, "{}", l.to_json()).map_err(io)?;
            n += 1;
        }
        file.flush().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, out).map_err(|source| OpsError::Output {
            path: out.to_path_buf(),
            source,
        })?;
        Ok(n)
    }
    .await;
    reader.close().await;
    match result {
        Ok(n) => {
            eprintln!(
                "exported {n} dead letters to {} (nothing was removed)",
                out.display()
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

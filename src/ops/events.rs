//! `events replay-unrouted`: publish the events kept in the unrouted-events queue (no queue
//! was bound for them) to the event exchange again, once consumers have bound theirs.
//!
//! Invariants: the same pass as the DLQ tools (nothing lost or reordered; what is not
//! moved stays, in order); each event is published with its own routing key and
//! properties, mandatory and confirmed, and only then acked (at the end of the pass). An
//! event that still has no queue goes through the alternate exchange back into the
//! unrouted queue: the summary counts those as `came_back`.

use lapin::types::ShortString;

use crate::amqp::Publisher;
use crate::amqp::headers::{self, header_string};
use crate::config::Settings;
use crate::ops::OpsError;

use super::dlq::DlqReader;

/// Which unrouted events to replay (command-line options).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UnroutedFilter {
    /// Only the events of this ext id.
    #[arg(long)]
    pub ext_id: Option<String>,
    /// Only events with this routing key (e.g. group.create.failed).
    #[arg(long, value_name = "ROUTING_KEY")]
    pub event: Option<String>,
    /// Move at most N events.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Show what would move; move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The summary as one JSON object: {"dry_run", "moved", "kept", "came_back"}.
    #[arg(long)]
    pub json: bool,
    /// Only these events, each at most once (the console's confirmed pick; the console
    /// reports for itself, so nothing is printed per event).
    #[arg(skip)]
    pub only: Option<super::dlq::Selection>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnroutedSummary {
    /// Published to the event exchange again (or, with --dry-run, would be).
    pub moved: usize,
    /// Not matching, or beyond --limit: left where they were, in order.
    pub kept: usize,
    /// Of the moved, how many the unrouted queue holds again after the pass beyond the
    /// kept ones: still no queue bound for them (or new unrouted events meanwhile).
    pub came_back: u32,
}

/// `events replay-unrouted`: replay, then print the summary (one JSON object with `--json`).
pub async fn replay_unrouted_command(
    settings: &Settings,
    filter: &UnroutedFilter,
) -> Result<UnroutedSummary, OpsError> {
    let s = replay_unrouted(settings, filter).await?;
    let json = serde_json::json!({"dry_run": filter.dry_run, "moved": s.moved, "kept": s.kept, "came_back": s.came_back});
    crate::output::summary(filter.json, json, || {
        let verb = if filter.dry_run {
            "would move"
        } else {
            "moved"
        };
        format!(
            "{verb} {}, kept {}, came back {}",
            s.moved, s.kept, s.came_back
        )
    });
    Ok(s)
}

pub async fn replay_unrouted(
    settings: &Settings,
    filter: &UnroutedFilter,
) -> Result<UnroutedSummary, OpsError> {
    let queue = settings.topology.unrouted_events.clone();
    let mut reader =
        DlqReader::open_queue(settings, &queue, "replay of unrouted events", None).await?;
    let publisher = Publisher::new(reader.channel().clone());
    let mut summary = UnroutedSummary::default();
    let mut result = Ok(());
    let mut only = filter.only.clone();
    loop {
        let event = match reader.next().await {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let d = &event.delivery;
        let routing_key = d.routing_key.as_str().to_owned();
        let ext_id = header_string(d.properties.headers().as_ref(), headers::EXT_ID);
        let matches = filter
            .ext_id
            .as_deref()
            .is_none_or(|x| ext_id.as_deref() == Some(x))
            && filter.event.as_deref().is_none_or(|k| routing_key == k)
            && filter.limit.is_none_or(|l| summary.moved < l)
            && only.as_mut().is_none_or(|s| s.take(&event));
        if !matches {
            summary.kept += 1;
            continue;
        }
        if filter.dry_run {
            if !filter.json && filter.only.is_none() {
                outln!(
                    "would replay {} {}",
                    crate::text::printable(&routing_key, 64),
                    crate::text::printable(ext_id.as_deref().unwrap_or("(no ext id)"), 128)
                );
            }
            summary.moved += 1;
            continue;
        }
        if let Err(e) = publisher
            .publish(
                &settings.topology.event_exchange,
                &routing_key,
                &d.data,
                headers::republishable(&d.properties),
                true,
            )
            .await
        {
            result = Err(e.into());
            break;
        }
        reader.ack(&event);
        summary.moved += 1;
    }
    let kept_total = reader.remaining() + summary.kept;
    super::dlq::ended(result, reader.close().await)?;
    if !filter.dry_run && summary.moved > 0 {
        let (conn, ..) = super::connect(settings, "events").await?;
        if let Some(depth) = super::queue_depth(&conn, &queue).await? {
            summary.came_back = depth.saturating_sub(u32::try_from(kept_total).unwrap_or(u32::MAX));
        }
        let _ = conn.close(200, ShortString::from("done")).await;
    }
    Ok(summary)
}

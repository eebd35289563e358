//! `dlq replay`: move matching dead letters back to the command exchange — for each, a
//! confirmed publish, then (at the end of the pass) the ack of the dead letter; the rest
//! stay in the DLQ, in order.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::amqp::Publisher;
use crate::amqp::headers::{self, HeaderUpdate};
use crate::config::Settings;
use crate::ops::OpsError;

use super::reader::{DeadLetter, DlqReader};

/// What `dlq replay` moves (its command-line options).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReplayFilter {
    /// Only this ext id.
    #[arg(long)]
    pub ext_id: Option<String>,
    /// Only this x-error-kind (invalid_command, rejected, name_conflict, retries_exhausted,
    /// or broker:<reason> for messages the broker dead-lettered, e.g. broker:delivery_limit).
    #[arg(long, value_parser = super::kinds::parse_kind)]
    pub kind: Option<String>,
    /// Move at most N messages.
    #[arg(long, value_parser = super::kinds::parse_count)]
    pub limit: Option<usize>,
    /// At most R messages per second (e.g. 20 or 20/s).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Show what would move; move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip messages already replayed this many times.
    #[arg(long, default_value_t = DEFAULT_MAX_REPLAYS)]
    pub max_replays: u32,
    /// The summary as one JSON object: {"dry_run", "moved", "skipped", "kept", "interrupted"}.
    #[arg(long)]
    pub json: bool,
    /// Only these letters, each at most once (the console's confirmed pick; the console
    /// reports for itself, so nothing is printed per letter).
    #[arg(skip)]
    pub only: Option<super::Selection>,
}

/// The replay loop guard: a letter replayed this many times stays (`--max-replays`).
pub const DEFAULT_MAX_REPLAYS: u32 = 5;

fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches("/s");
    match number.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!("{text:?} is not a positive rate (e.g. 20 or 20/s)")),
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub moved: usize,
    /// Matching, but at or over `--max-replays`: left in the DLQ.
    pub skipped: usize,
    /// Not matching the filter (or beyond `--limit`): left in the DLQ.
    pub kept: usize,
    pub interrupted: bool,
}

/// What replay does with one dead letter.
enum Pick {
    /// `--limit` reached: this one and the rest stay.
    Done,
    /// Not matching the filter.
    Keep,
    /// Replayed `--max-replays` times already.
    Skip,
    Move,
}

/// `only` is the filter's selection, taken from as letters are picked.
fn pick(
    filter: &ReplayFilter,
    letter: &DeadLetter,
    moved: usize,
    only: &mut Option<super::Selection>,
) -> Pick {
    let matches = filter
        .ext_id
        .as_deref()
        .is_none_or(|x| letter.ext_id.as_deref() == Some(x))
        && filter.kind.as_deref().is_none_or(|k| letter.kind == k);
    if filter.limit.is_some_and(|l| moved >= l) {
        Pick::Done
    } else if !matches || !only.as_mut().is_none_or(|s| s.take(letter)) {
        Pick::Keep
    } else if letter.replay_count() >= filter.max_replays {
        Pick::Skip
    } else {
        Pick::Move
    }
}

/// Move matching dead letters back to the command exchange. SIGINT or SIGTERM ends it
/// after the current message: the rest goes back, in order, and the summary says
/// `interrupted`.
pub async fn replay(settings: &Settings, filter: &ReplayFilter) -> Result<ReplaySummary, OpsError> {
    let mut reader = DlqReader::open(settings, "replay", None).await?;
    let mut mover = Mover {
        publisher: Publisher::new(reader.channel().clone()),
        settings,
        notes: (!filter.dry_run).then(|| super::notes::Notes::new(settings)),
        // With --json, standard output holds the one summary object and nothing else.
        quiet: filter.only.is_some() || filter.json,
    };
    let mut only = filter.only.clone();
    let mut summary = ReplaySummary::default();
    let mut pace = Pace::new(filter.rate);
    let mut result = Ok(());
    loop {
        let letter = match reader.next().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(OpsError::Interrupted { .. }) => {
                summary.interrupt(reader.remaining());
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let picked = pick(filter, &letter, summary.moved, &mut only);
        if letter.kind == "invalid_command" && !matches!(picked, Pick::Keep) {
            warn_invalid_command();
        }
        match picked {
            Pick::Done => {
                summary.kept += 1 + reader.remaining();
                break;
            }
            Pick::Keep => summary.kept += 1,
            Pick::Skip => {
                summary.skipped += 1;
                errln!(
                    "skip {}: replayed {} times already (--max-replays {})",
                    letter.describe(),
                    letter.replay_count(),
                    filter.max_replays
                );
            }
            Pick::Move if filter.dry_run => {
                summary.moved += 1;
                if !filter.json
                    && !mover.quiet
                    && let Err(e) =
                        crate::output::line(format_args!("would replay {}", letter.describe()))
                {
                    result = Err(super::stdout_error(e, reader.returned_in_order()));
                    break;
                }
            }
            Pick::Move => {
                if !pace.wait().await {
                    // Not this one: the rest goes back, in order.
                    summary.interrupt(1 + reader.remaining());
                    break;
                }
                match mover.move_back(&mut reader, &letter).await {
                    Ok(()) => summary.moved += 1,
                    Err(e) => {
                        summary.kept += 1;
                        result = Err(e);
                        break;
                    }
                }
            }
        }
    }
    // What was not moved goes back, in order.
    super::ended(result, reader.close().await).map(|()| summary)
}

impl ReplaySummary {
    fn interrupt(&mut self, kept: usize) {
        errln!("interrupted: the dead letters not yet moved go back, in order");
        self.interrupted = true;
        self.kept += kept;
    }
}

/// `--rate`: at most one message per interval.
struct Pace {
    interval: Option<Duration>,
    next_at: tokio::time::Instant,
}

impl Pace {
    fn new(rate: Option<f64>) -> Pace {
        Pace {
            interval: rate
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            next_at: tokio::time::Instant::now(),
        }
    }

    /// Wait for the next slot; `false` when a signal came first.
    async fn wait(&mut self) -> bool {
        let Some(interval) = self.interval else {
            return true;
        };
        let stop = crate::ops::stop();
        tokio::select! {
            () = tokio::time::sleep_until(self.next_at) => {}
            () = stop.cancelled() => return false,
        }
        self.next_at = tokio::time::Instant::now() + interval;
        true
    }
}

/// Moves one dead letter back: a confirmed publish, then the ack of the dead letter (sent
/// at the end of the pass).
struct Mover<'a> {
    publisher: Publisher,
    settings: &'a Settings,
    notes: Option<super::notes::Notes>,
    /// Nothing printed per letter.
    quiet: bool,
}

impl Mover<'_> {
    /// On failure the letter was not published: it stays a dead letter, where it was.
    async fn move_back(
        &mut self,
        reader: &mut DlqReader,
        letter: &DeadLetter,
    ) -> Result<(), OpsError> {
        let topology = &self.settings.topology;
        // Noted before it is published: the worker may settle it (and note that) at once.
        if let Some(notes) = self.notes.as_mut() {
            notes
                .note(letter, "replayed", crate::pipeline::Place::WorkQueue)
                .await;
        }
        let properties = replay_properties(&letter.delivery.properties, letter.replay_count() + 1);
        let published = self
            .publisher
            .publish(
                &topology.command_exchange,
                &topology.command_routing_key,
                &letter.delivery.data,
                properties,
                true,
            )
            .await;
        if let Err(e) = published {
            // Not replayed after all: still a dead letter, where it was.
            if let Some(notes) = self.notes.as_mut() {
                let place = crate::pipeline::Place::DeadLetterQueue {
                    queue: topology.dead_letter_queue.clone(),
                };
                notes.note(letter, "dead_lettered", place).await;
            }
            return Err(OpsError::ReplayPublish {
                letter: letter.describe(),
                source: e,
            });
        }
        reader.ack(letter);
        // A closed stdout costs only the report of what was moved, never the pass.
        if !self.quiet {
            let _ = crate::output::line(format_args!("replayed {}", letter.describe()));
        }
        Ok(())
    }
}

/// Said once per run, before the first invalid command would be replayed (or, with
/// `--kind invalid_command`, up front): such a dead letter holds the bytes that failed.
fn warn_invalid_command() {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        errln!(
            "warning: an invalid_command dead letter holds the same bytes that failed: replayed, it fails again (fix the publisher and send a corrected command; `dlq discard` removes the old one)"
        );
    });
}

/// The dead letter's properties for its return trip: a fresh start for attempts and retries,
/// the replay counted, the failure headers dropped (its history stays in
/// `x-first-failed-at` and `x-replay-count`).
fn replay_properties(original: &BasicProperties, replay_count: u32) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    let drop_names = [
        headers::X_ERROR_KIND,
        headers::X_ERROR_MESSAGE,
        headers::X_HTTP_STATUS,
        headers::X_LAST_FAILED_AT,
        headers::X_DELIVERY_COUNT,
        "x-acquired-count",
        headers::X_DEAD_LETTERED_AT,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    ];
    let kept: std::collections::BTreeMap<ShortString, AMQPValue> = headers
        .inner()
        .iter()
        .filter(|(k, _)| !drop_names.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    headers = FieldTable::from(kept);
    let base = original.clone().with_headers(headers);
    HeaderUpdate::default()
        .int(headers::X_REPLAY_COUNT, replay_count)
        .int(headers::X_ATTEMPTS, 0)
        .int(headers::X_RETRIES, 0)
        .int(headers::X_DEFERRALS, 0)
        .apply(&base)
}

/// `dlq replay`: replay until done or interrupted by SIGINT/SIGTERM (which finishes the
/// current message and returns the rest), printing the summary.
pub async fn replay_command(
    settings: &Settings,
    filter: &ReplayFilter,
) -> Result<ReplaySummary, OpsError> {
    if filter.kind.as_deref() == Some("invalid_command") {
        warn_invalid_command();
    }
    let s = replay(settings, filter).await?;
    let json = serde_json::json!({"dry_run": filter.dry_run, "moved": s.moved, "skipped": s.skipped, "kept": s.kept, "interrupted": s.interrupted});
    crate::output::summary(filter.json, json, || {
        let verb = if filter.dry_run {
            "would move"
        } else {
            "moved"
        };
        let interrupted = if s.interrupted {
            " — interrupted"
        } else {
            ""
        };
        format!(
            "{verb} {}, skipped {} (replay limit), kept {} (not matching){interrupted}",
            s.moved, s.skipped, s.kept
        )
    });
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::headers::{header_string, header_u32};

    #[test]
    fn replay_resets_attempts_and_drops_failure_headers() {
        let mut t = FieldTable::default();
        for (k, v) in [
            (headers::X_ERROR_KIND, "rejected"),
            (headers::X_ERROR_MESSAGE, "bad parent"),
            (headers::X_FIRST_FAILED_AT, "2026-11-26T00:00:00Z"),
            ("custom", "kept"),
        ] {
            t.insert(ShortString::from(k), AMQPValue::LongString(v.into()));
        }
        t.insert(
            ShortString::from(headers::X_ATTEMPTS),
            AMQPValue::LongLongInt(4),
        );
        let p = replay_properties(
            &BasicProperties::default()
                .with_headers(t)
                .with_message_id("m".into()),
            2,
        );
        let h = p.headers().as_ref();
        assert_eq!(header_u32(h, headers::X_REPLAY_COUNT), 2);
        assert_eq!(header_u32(h, headers::X_ATTEMPTS), 0);
        assert_eq!(header_string(h, headers::X_ERROR_KIND), None);
        assert_eq!(header_string(h, headers::X_ERROR_MESSAGE), None);
        assert_eq!(
            header_string(h, headers::X_FIRST_FAILED_AT).as_deref(),
            Some("2026-11-26T00:00:00Z")
        );
        assert_eq!(header_string(h, "custom").as_deref(), Some("kept"));
        assert_eq!(p.message_id().as_ref().map(|m| m.as_str()), Some("m"));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("20"), Ok(20.0));
        assert_eq!(parse_rate("2.5/s"), Ok(2.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }
}

//! The last outcome a settled delivery leaves for `status`: from the core's decision and
//! how the worker carried it out (`LastOutcome::settled`). Apart from the record itself
//! (`last_outcome.rs`), so that the record depends on nothing the decision does.

use std::time::SystemTime;

use super::decision::{Decision, DelayReason, Outcome, SystemFault};
use super::inbound::Inbound;
use super::last_outcome::{LastOutcome, MAX_MESSAGE_BYTES, Place, TierPlace};
use crate::text::truncate;

impl LastOutcome {
    /// A delivery settled as `outcome` after `decision`. `None` when the store already
    /// holds this outcome (written with the created record or the claim). `tiers` are the
    /// delay tiers in order; `dead_letter_queue` is where dead letters go.
    pub fn settled(
        decision: &Decision,
        outcome: Outcome,
        msg: &Inbound,
        ext_id: Option<&str>,
        http_status: Option<u16>,
        tiers: &[TierPlace],
        dead_letter_queue: &str,
    ) -> Option<LastOutcome> {
        let attempts = match decision {
            Decision::Created { event } => event.attempts,
            Decision::DeadLetter { attempts, .. } | Decision::Delay { attempts, .. } => *attempts,
        };
        let mut record = match (decision, outcome) {
            (Decision::Created { .. }, Outcome::Created | Outcome::Duplicate) => return None,
            (Decision::DeadLetter { failure, .. }, Outcome::DeadLettered) => LastOutcome {
                error_kind: Some(failure.kind.as_str().to_owned()),
                message: Some(truncate(&failure.message, MAX_MESSAGE_BYTES)),
                place: Place::DeadLetterQueue {
                    queue: dead_letter_queue.to_owned(),
                },
                ..LastOutcome::new("dead_lettered", msg, ext_id, attempts)
            },
            (Decision::Delay { tier, reason, .. }, Outcome::Deferred) => {
                let (name, message) = match reason {
                    DelayReason::Retry { last_error, .. } => ("deferred", Some(last_error.clone())),
                    DelayReason::Claimed => ("deferred", None),
                    DelayReason::Parked(fault) => ("parked", Some(fault.to_string())),
                };
                LastOutcome {
                    reason: Some(reason.log_label().to_owned()),
                    message: message.map(|m| truncate(&m, MAX_MESSAGE_BYTES)),
                    place: in_tier(tiers, *tier),
                    ..LastOutcome::new(name, msg, ext_id, attempts)
                }
            }
            // The outcome could not be published: parked in the first tier instead.
            (_, Outcome::Deferred) => LastOutcome {
                reason: Some(SystemFault::Publish(String::new()).label().to_owned()),
                message: Some("the outcome could not be published; parked to try again".into()),
                place: in_tier(tiers, 0),
                ..LastOutcome::new("parked", msg, ext_id, attempts)
            },
            (_, Outcome::Requeued) => LastOutcome {
                place: Place::WorkQueue,
                ..LastOutcome::new("requeued", msg, ext_id, attempts)
            },
            (_, _) => LastOutcome {
                place: Place::Unsettled,
                ..LastOutcome::new("failed", msg, ext_id, attempts)
            },
        };
        if let Decision::DeadLetter { failure, .. } = decision {
            // Also when parking replaced the dead letter's event: say what it was about.
            record.error_kind = Some(failure.kind.as_str().to_owned());
        }
        record.http_status = http_status;
        Some(record)
    }
}

fn in_tier(tiers: &[TierPlace], tier: usize) -> Place {
    match tiers.get(tier) {
        Some(t) => Place::DelayQueue {
            queue: t.queue.clone(),
            tier: t.label.clone(),
            until: crate::clock::rfc3339(SystemTime::now() + t.delay),
        },
        // Not a tier of this configuration (cannot happen: the copy would have failed).
        None => Place::Unsettled,
    }
}

//! The last-outcome record: what the last delivery of an ext id (or, for an invalid
//! command, of a message id) ended as, and where the message is now. It is what `status`
//! answers "what happened to ext id X?" with.
//!
//! Invariants:
//! - it is a report, never an input: no decision reads it (the created record and the
//!   attempt marker decide), so a lost or stale one costs an answer, never a group;
//! - `created` is written in the same store call as the created record, and `duplicate`
//!   in the same call as the claim that found it: the happy path costs no extra round
//!   trip; every other outcome is written after the delivery is settled;
//! - every text in it is bounded: a hostile command cannot make it large.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::inbound::Inbound;
use crate::text::truncate;

/// Bytes of an error message kept in the record.
pub const MAX_MESSAGE_BYTES: usize = 512;
/// Bytes of a message id kept (AMQP allows 255).
const MAX_ID_BYTES: usize = 255;

/// What the last delivery of an ext id ended as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastOutcome {
    /// `created`, `duplicate`, `deferred` (a transient failure or a claim held elsewhere:
    /// waiting in a delay tier), `parked` (a fault of the system: waiting in a delay tier,
    /// not charged), `dead_lettered`, `requeued`, `failed` (not settled); and what an
    /// operator did to its dead letter: `replayed`, `discarded`.
    pub outcome: String,
    /// When it was settled (RFC 3339).
    pub at: String,
    #[serde(default)]
    pub ext_id: Option<String>,
    #[serde(default)]
    pub message_id: Option<String>,
    /// POSTs made for the command over all its deliveries (`x-attempts`).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub error_kind: Option<String>,
    #[serde(default)]
    pub http_status: Option<u16>,
    /// Why it was deferred or parked: `transient`, `claimed_elsewhere`, or the fault
    /// (`redis`, `publish`, `unauthorized`, …) — the `reason` of the outcome log line.
    #[serde(default)]
    pub reason: Option<String>,
    /// The error, bounded to [`MAX_MESSAGE_BYTES`].
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub org_unit_id: Option<i64>,
    /// Where the message is now.
    pub place: Place,
}

/// Where a message is after its last delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "where", rename_all = "snake_case")]
pub enum Place {
    /// Finished: acked after its event was published.
    Done,
    /// Waiting in a delay queue; back in the work queue at about `until`.
    DelayQueue {
        queue: String,
        tier: String,
        until: String,
    },
    /// In the dead-letter queue, until an operator replays or discards it.
    DeadLetterQueue { queue: String },
    /// Returned to the work queue (requeued, or replayed from the DLQ).
    WorkQueue,
    /// Removed from the DLQ by an operator (`dlq discard`), after a copy to `export` if
    /// one was given.
    Discarded { export: Option<String> },
    /// Not settled (the channel was lost): the broker delivers it again.
    Unsettled,
}

/// A delay tier as the worker knows it, to say where a deferred message waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierPlace {
    pub queue: String,
    pub label: String,
    pub delay: Duration,
}

impl LastOutcome {
    pub(super) fn new(
        outcome: &str,
        msg: &Inbound,
        ext_id: Option<&str>,
        attempts: u32,
    ) -> LastOutcome {
        LastOutcome {
            outcome: outcome.to_owned(),
            at: crate::clock::now_rfc3339(),
            ext_id: ext_id.map(str::to_owned),
            message_id: msg.message_id.as_deref().map(|m| truncate(m, MAX_ID_BYTES)),
            attempts,
            error_kind: None,
            http_status: None,
            reason: None,
            message: None,
            org_unit_id: None,
            place: Place::Done,
        }
    }

    /// This delivery created the group (written with the created record).
    pub fn created(msg: &Inbound, ext_id: &str, attempts: u32, org_unit_id: i64) -> LastOutcome {
        LastOutcome {
            org_unit_id: Some(org_unit_id),
            ..LastOutcome::new("created", msg, Some(ext_id), attempts)
        }
    }

    /// The group existed before this delivery (written by the claim that finds it, which
    /// fills in the org unit id from the record it found).
    pub fn duplicate(msg: &Inbound, ext_id: &str) -> LastOutcome {
        LastOutcome::new("duplicate", msg, Some(ext_id), msg.attempts)
    }

    /// The group existed before this delivery, which found it by List.
    pub fn found(msg: &Inbound, ext_id: &str, attempts: u32, org_unit_id: i64) -> LastOutcome {
        LastOutcome {
            org_unit_id: Some(org_unit_id),
            ..LastOutcome::new("duplicate", msg, Some(ext_id), attempts)
        }
    }

    /// Whether the message is waiting in a delay queue whose time has passed: it should
    /// be back in the work queue by now (`None`: not in a delay queue, or no readable
    /// time).
    pub fn overdue(&self, now: SystemTime) -> Option<bool> {
        match &self.place {
            Place::DelayQueue { until, .. } => {
                crate::clock::parse_rfc3339(until).map(|until| until <= now)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::decision::{Decision, DelayReason, Outcome, SystemFault};
    use crate::pipeline::events::FailedEvent;
    use crate::pipeline::failure::{Failure, FailureKind};

    fn tiers() -> Vec<TierPlace> {
        vec![
            TierPlace {
                queue: "q.retry.5s".into(),
                label: "5s".into(),
                delay: Duration::from_secs(5),
            },
            TierPlace {
                queue: "q.retry.1m".into(),
                label: "1m".into(),
                delay: Duration::from_secs(60),
            },
        ]
    }

    fn msg() -> Inbound {
        Inbound {
            message_id: Some("m-1".into()),
            attempts: 2,
            ..Inbound::default()
        }
    }

    fn delay(tier: usize, reason: DelayReason) -> Decision {
        Decision::Delay {
            tier,
            attempts: 3,
            retries: 1,
            deferrals: 0,
            reason,
        }
    }

    /// The record of `decision` settled as `outcome` (ext id E-1, message m-1).
    fn settle(decision: &Decision, outcome: Outcome, http_status: Option<u16>) -> LastOutcome {
        LastOutcome::settled(
            decision,
            outcome,
            &msg(),
            Some("E-1"),
            http_status,
            &tiers(),
            "the.dlq",
        )
        .expect("a record")
    }

    fn dead_letter(kind: FailureKind) -> Decision {
        let failure = Failure {
            kind,
            message: "x".repeat(5_000),
            http_status: Some(422),
            api_request_id: None,
        };
        Decision::DeadLetter {
            event: FailedEvent::new(&msg(), Some("E-1"), &failure, 3),
            failure,
            attempts: 3,
        }
    }

    #[test]
    fn a_retry_waits_in_its_tier_until_its_delay_has_passed() {
        let before = SystemTime::now();
        let reason = DelayReason::Retry {
            last_error: "503".into(),
            http_status: Some(503),
        };
        let r = settle(&delay(1, reason), Outcome::Deferred, Some(503));
        assert_eq!(r.outcome, "deferred");
        assert_eq!(r.reason.as_deref(), Some("transient"));
        assert_eq!((r.attempts, r.http_status), (3, Some(503)));
        let Place::DelayQueue { queue, tier, until } = &r.place else {
            panic!("{:?}", r.place)
        };
        assert_eq!((queue.as_str(), tier.as_str()), ("q.retry.1m", "1m"));
        let until = crate::clock::parse_rfc3339(until).expect("a time");
        assert!(until >= before + Duration::from_secs(59), "{until:?}");
        assert_eq!(r.overdue(before), Some(false));
        assert_eq!(r.overdue(before + Duration::from_secs(61)), Some(true));
    }

    #[test]
    fn a_system_fault_is_parked_and_says_which() {
        let r = settle(
            &delay(
                0,
                DelayReason::Parked(SystemFault::Unauthorized("401".into())),
            ),
            Outcome::Deferred,
            None,
        );
        assert_eq!(r.outcome, "parked");
        assert_eq!(r.reason.as_deref(), Some("unauthorized"));
        assert!(matches!(r.place, Place::DelayQueue { ref tier, .. } if tier == "5s"));
        let claimed = settle(&delay(0, DelayReason::Claimed), Outcome::Deferred, None);
        assert_eq!(
            (claimed.outcome.as_str(), claimed.reason.as_deref()),
            ("deferred", Some("claimed_elsewhere"))
        );
    }

    #[test]
    fn a_dead_letter_names_its_queue_and_keeps_a_bounded_message() {
        let r = settle(
            &dead_letter(FailureKind::Rejected),
            Outcome::DeadLettered,
            Some(422),
        );
        assert_eq!(r.outcome, "dead_lettered");
        assert_eq!(r.error_kind.as_deref(), Some("rejected"));
        assert_eq!(r.message.as_ref().map(String::len), Some(MAX_MESSAGE_BYTES));
        assert_eq!(
            r.place,
            Place::DeadLetterQueue {
                queue: "the.dlq".into()
            }
        );
        assert_eq!(r.message_id.as_deref(), Some("m-1"));
    }

    #[test]
    fn an_outcome_that_could_not_be_published_is_parked_in_the_first_tier() {
        let r = settle(
            &dead_letter(FailureKind::InvalidCommand),
            Outcome::Deferred,
            None,
        );
        assert_eq!(r.outcome, "parked");
        assert_eq!(r.reason.as_deref(), Some("publish"));
        assert_eq!(r.error_kind.as_deref(), Some("invalid_command"));
        assert!(matches!(r.place, Place::DelayQueue { ref tier, .. } if tier == "5s"));
        let requeued = settle(&dead_letter(FailureKind::Rejected), Outcome::Requeued, None);
        assert_eq!(requeued.place, Place::WorkQueue);
        let failed = settle(&dead_letter(FailureKind::Rejected), Outcome::Failed, None);
        assert_eq!(
            (failed.outcome.as_str(), failed.place),
            ("failed", Place::Unsettled)
        );
    }

    #[test]
    fn a_duplicate_round_trips_through_json() {
        let d = LastOutcome::duplicate(&msg(), "E-1");
        assert_eq!((d.outcome.as_str(), d.attempts), ("duplicate", 2));
        let json = serde_json::to_value(&d).expect("json");
        assert_eq!(json["place"]["where"], "done");
        let back: LastOutcome = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, d);
    }
}

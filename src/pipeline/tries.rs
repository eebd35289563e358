//! What one delivery's retry loop keeps track of ([`Tries`], shared with the lease keeper)
//! and what it ends with when the group exists ([`Provisioned`]).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::api::GroupSummary;

/// Per-delivery bookkeeping shared by the tries of one retry loop (and the lease keeper).
#[derive(Default)]
pub(super) struct Tries {
    /// POSTs sent by this delivery.
    pub(super) posts: AtomicU32,
    /// POSTs of this delivery that may have created the group (success, 5xx, lost answer).
    pub(super) maybe_committed: AtomicU32,
    /// Whether some earlier POST (any delivery) may have reached the API.
    pub(super) may_have_reached: AtomicBool,
    /// Look the ext id up among all of the parent's children before the next POST.
    pub(super) scan_parent: AtomicBool,
    pub(super) lease_lost: AtomicBool,
    pub(super) last_status: AtomicU32,
    /// When the claim wrote the attempt marker for the first POST itself.
    pub(super) premarked_at: std::sync::Mutex<Option<Instant>>,
}

impl Tries {
    /// Treat an earlier POST as possible (List before posting), whatever the message says.
    pub(super) fn assume_attempted(&self) {
        self.may_have_reached.store(true, Ordering::SeqCst);
    }

    /// The claim marked the first POST as about to be sent, at `at`.
    pub(super) fn premarked(&self, at: Instant) {
        *crate::lock(&self.premarked_at) = Some(at);
    }

    /// Whether the claim's mark still stands for the POST about to be sent: only for the
    /// first, and only if it is that recent (a takeover waits `api.timeout` plus a margin
    /// from the marker's time; a POST sent much later than it would outlast that wait).
    pub(super) fn take_premark(&self, fresh: Duration) -> bool {
        crate::lock(&self.premarked_at)
            .take()
            .is_some_and(|at| at.elapsed() <= fresh)
    }

    pub(super) fn posts(&self) -> u32 {
        self.posts.load(Ordering::SeqCst)
    }

    pub(super) fn note_status(&self, status: Option<u16>) {
        if let Some(s) = status {
            self.last_status.store(u32::from(s), Ordering::SeqCst);
        }
    }

    pub(super) fn last_status(&self) -> Option<u16> {
        u16::try_from(self.last_status.load(Ordering::SeqCst))
            .ok()
            .filter(|s| *s != 0)
    }

    /// A group List found: it counts as pre-existing unless a POST of this delivery may
    /// have created it (`duplicate` in the event).
    pub(super) fn found(&self, group: GroupSummary) -> Provisioned {
        Provisioned {
            org_unit_id: group.org_unit_id,
            api_request_id: None,
            duplicate: self.maybe_committed.load(Ordering::SeqCst) == 0,
            found: Some(group),
        }
    }
}

/// A group known to exist after the retry loop.
pub(super) struct Provisioned {
    pub org_unit_id: i64,
    pub api_request_id: Option<String>,
    pub duplicate: bool,
    /// The group as the listing showed it, when it was found rather than created by this
    /// delivery's POST (its name may differ from the command's).
    pub found: Option<GroupSummary>,
}

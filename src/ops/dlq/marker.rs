//! What a pass that never ended did to the order of its queue, kept in Redis so that the
//! next pass and `check` can say it.
//!
//! A pass killed (SIGKILL, a crash, a lost host) *before it read the whole queue* gives
//! back what it had read behind what it had not read yet: a rotation (see `reader.rs`).
//! Nothing else can tell afterwards, so each pass writes down what it is doing:
//! - `<prefix>:dlq-pass:<queue>` while it runs: the command, `host:pid`, when it started,
//!   how many messages the queue held and how many the pass may hold (updated as each
//!   window opens, at most 34 writes per pass), deleted when the pass has given everything
//!   back;
//! - a pass that finds that note left behind (it holds the queue's lock, so no pass is
//!   running) keeps it as `<prefix>:dlq-unfinished:<queue>` for [`UNFINISHED_TTL`] if the
//!   order may have changed, and says so on stderr; `check` reports either note.
//!
//! Invariants: best effort. Redis is asked with a short deadline; when it cannot be reached
//! the pass says so once and goes on without notes (the queue matters more than the note).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::dedup::RedisStore;
use crate::text::printable;

/// How long the note of an unfinished pass is kept.
pub const UNFINISHED_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long one Redis call may take before the pass goes on without notes.
const DEADLINE: Duration = Duration::from_secs(2);

/// A pass as written down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PassNote {
    pub command: String,
    pub owner: String,
    pub started_at: String,
    /// Messages the queue held when the pass started.
    pub total: usize,
    /// At most this many of them were delivered to the pass.
    pub holding: usize,
}

impl PassNote {
    /// A killed pass that held less than the whole queue may have rotated it.
    pub fn may_have_rotated(&self) -> bool {
        self.holding > 0 && self.holding < self.total
    }

    /// One line for operators: what happened and what it did to the order.
    pub fn describe(&self, queue: &str) -> String {
        format!(
            "a `dlq {}` pass ({}, started {}) ended without giving {} back in order: the up to {} dead letters it had read of {} now follow the others, in their own order (nothing was lost). Where the order matters, read the export sorted by first_failed_at",
            printable(&self.command, 64),
            printable(&self.owner, 128),
            printable(&self.started_at, 64),
            printable(queue, 255),
            self.holding,
            self.total
        )
    }
}

fn pass_key(queue: &str) -> String {
    format!("dlq-pass:{queue}")
}

fn unfinished_key(queue: &str) -> String {
    format!("dlq-unfinished:{queue}")
}

/// The notes of one pass (module documentation).
pub(super) struct PassMarker {
    store: Option<RedisStore>,
    queue: String,
    note: PassNote,
}

impl PassMarker {
    /// Start the notes of a pass over `queue` (its lock held): an unfinished pass noted
    /// before is reported and kept, then this one is written down.
    pub async fn begin(
        settings: &Settings,
        queue: &str,
        command: &str,
        total: usize,
    ) -> PassMarker {
        let mut marker = PassMarker {
            store: crate::app::dedup_store(settings).ok(),
            queue: queue.to_owned(),
            note: PassNote {
                command: command.to_owned(),
                owner: crate::app::worker_id(),
                started_at: crate::clock::now_rfc3339(),
                total,
                holding: 0,
            },
        };
        let Some(store) = marker.store.clone() else {
            return marker.unavailable("no dedup store is configured");
        };
        let left = match tokio::time::timeout(DEADLINE, store.note(&pass_key(queue))).await {
            Ok(Ok(left)) => left,
            Ok(Err(e)) => return marker.unavailable(&e.to_string()),
            Err(_) => return marker.unavailable("no answer within 2s"),
        };
        if let Some(left) = left.and_then(|t| serde_json::from_str::<PassNote>(&t).ok())
            && left.may_have_rotated()
        {
            errln!("warning: {}", left.describe(queue));
            if let Ok(text) = serde_json::to_string(&left) {
                marker
                    .call(|s| async move {
                        s.set_note(&unfinished_key(queue), &text, Some(UNFINISHED_TTL))
                            .await
                    })
                    .await;
            }
        }
        marker.write().await;
        marker
    }

    fn unavailable(mut self, why: &str) -> PassMarker {
        self.give_up(why);
        self
    }

    fn give_up(&mut self, why: &str) {
        errln!(
            "warning: the dedup store cannot be reached ({why}): this pass is not noted there, so if it is killed nothing will say what it did to the order of {}",
            printable(&self.queue, 255)
        );
        self.store = None;
    }

    /// The pass may now hold up to `holding` messages.
    pub async fn holding(&mut self, holding: usize) {
        if self.store.is_some() && holding != self.note.holding {
            self.note.holding = holding;
            self.write().await;
        }
    }

    /// Everything is back in order: the note goes.
    pub async fn end(&mut self) {
        let queue = self.queue.clone();
        self.call(|s| async move { s.delete_note(&pass_key(&queue)).await })
            .await;
    }

    async fn write(&mut self) {
        let Ok(text) = serde_json::to_string(&self.note) else {
            return;
        };
        let key = pass_key(&self.queue);
        self.call(|s| async move { s.set_note(&key, &text, None).await })
            .await;
    }

    /// One Redis call with the deadline; the first failure ends the notes.
    async fn call<F, Fut>(&mut self, f: F)
    where
        F: FnOnce(RedisStore) -> Fut,
        Fut: std::future::Future<Output = Result<(), crate::pipeline::StoreError>>,
    {
        let Some(store) = self.store.clone() else {
            return;
        };
        let why = match tokio::time::timeout(DEADLINE, f(store)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 2s".to_owned(),
        };
        self.give_up(&why);
    }
}

/// What `check` says about `queue`: the note of a pass that did not end (when no pass runs
/// now: `running` is false), or of one found unfinished earlier.
pub async fn unfinished(store: &RedisStore, queue: &str, running: bool) -> Option<String> {
    let read = |key: String| async move {
        tokio::time::timeout(DEADLINE, store.note(&key))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .and_then(|t| serde_json::from_str::<PassNote>(&t).ok())
    };
    if !running
        && let Some(left) = read(pass_key(queue)).await
        && left.may_have_rotated()
    {
        return Some(left.describe(queue));
    }
    read(unfinished_key(queue))
        .await
        .map(|note| note.describe(queue))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_pass_that_held_part_of_the_queue_may_have_rotated_it() {
        let note = |holding, total| PassNote {
            command: "peek".into(),
            owner: "h:1".into(),
            started_at: "2026-12-06T00:00:00Z".into(),
            total,
            holding,
        };
        assert!(note(64, 2000).may_have_rotated());
        assert!(!note(2000, 2000).may_have_rotated(), "it held everything");
        assert!(!note(0, 2000).may_have_rotated(), "it held nothing");
        let text = note(64, 2000).describe("q");
        assert!(
            text.contains("up to 64") && text.contains("of 2000"),
            "{text}"
        );
    }
}

//! An action between its preview and its run: what it is, the letters it was previewed
//! on, and what it did. Plain data, shared by `actions.rs` (which makes and runs plans)
//! and `pages.rs` (which shows them).
//!
//! Invariant: a plan is taken out of [`Plans`] by the one confirmation that runs it, so
//! no plan runs twice; plans not confirmed within [`PLAN_TTL`] are forgotten.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ops::dlq::Selection;

use super::view::LetterView;

/// A plan not confirmed within this long is forgotten.
pub const PLAN_TTL: Duration = Duration::from_secs(15 * 60);
const MAX_PLANS: usize = 1_000;

closed_set! {
    pub enum Action {
        Replay = "replay",
        Discard = "discard",
        ReplayUnrouted = "replay_unrouted",
    }
}

impl Action {
    /// A button's `do`: the action, and whether it is for the selected letters only
    /// (else for every letter the filter lets through).
    pub fn parse(text: &str) -> Option<(Action, bool)> {
        match text {
            "replay-selected" => Some((Action::Replay, true)),
            "replay-all" => Some((Action::Replay, false)),
            "discard-selected" => Some((Action::Discard, true)),
            "discard-all" => Some((Action::Discard, false)),
            "replay-unrouted" => Some((Action::ReplayUnrouted, false)),
            _ => None,
        }
    }

    /// "Replay 3 dead letters", for buttons and headings.
    pub fn describe(self, n: usize) -> String {
        let letters = crate::text::count(n as u64, "dead letter", "dead letters");
        match self {
            Action::Replay => format!("Replay {letters}"),
            Action::Discard => format!("Discard {letters}"),
            Action::ReplayUnrouted => format!(
                "Replay {}",
                crate::text::count(n as u64, "unrouted event", "unrouted events")
            ),
        }
    }
}

/// An action previewed and waiting for its confirmation.
#[derive(Debug, Clone)]
pub struct Plan {
    pub action: Action,
    pub user: String,
    pub selection: Selection,
    /// The filter or "selected", for the audit line.
    pub scope: String,
    /// What the confirmation page lists (the first ones).
    pub letters: Vec<LetterView>,
    /// Of the selection, letters at the replay limit: a replay leaves them.
    pub at_limit: usize,
    pub expires: Instant,
}

#[derive(Default)]
pub struct Plans(Mutex<HashMap<String, Plan>>);

impl Plans {
    pub fn keep(&self, plan: Plan) -> String {
        let id = super::auth::random_token();
        let now = Instant::now();
        let mut plans = crate::lock(&self.0);
        plans.retain(|_, p| p.expires > now);
        if plans.len() >= MAX_PLANS
            && let Some(oldest) = plans
                .iter()
                .min_by_key(|(_, p)| p.expires)
                .map(|(k, _)| k.clone())
        {
            plans.remove(&oldest);
        }
        plans.insert(id.clone(), plan);
        id
    }

    /// The plan, taken out: nobody can confirm it again.
    pub fn take(&self, id: &str) -> Option<Plan> {
        let mut plans = crate::lock(&self.0);
        plans.remove(id).filter(|p| p.expires > Instant::now())
    }
}

/// What an action did, for the result page.
#[derive(Debug, Default)]
pub struct Done {
    pub done: usize,
    /// Left where they were: at the replay limit, or no longer there.
    pub left: usize,
    pub export: Option<String>,
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_taken_once() {
        let plans = Plans::default();
        let plan = Plan {
            action: Action::Replay,
            user: "op".into(),
            selection: Selection::default(),
            scope: "all".into(),
            letters: Vec::new(),
            at_limit: 0,
            expires: Instant::now() + PLAN_TTL,
        };
        let id = plans.keep(plan);
        assert!(plans.take(&id).is_some());
        assert!(plans.take(&id).is_none());
        assert!(plans.take("").is_none());
    }
}

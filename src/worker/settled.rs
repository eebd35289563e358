//! Deliveries this process settled (every publish of their outcome confirmed) whose ack the
//! broker may never have received. An ack has no confirmation: a connection lost just
//! after it (a node stopped or killed, a leader moving, a network cut) returns the
//! delivery to the queue, marked redelivered. Recognised when it comes back, such a
//! redelivery is only acked: doing its work again would publish its outcome (the event,
//! a delay copy, a dead letter) a second time.
//!
//! Invariants:
//! - a delivery is remembered only once every publish of its outcome is confirmed, so
//!   acking its redelivery without work loses nothing;
//! - only a delivery the broker marks redelivered is looked up, and it must be the same
//!   message: body, properties the worker honours and its counters, hashed with keys
//!   random to this process (a publisher cannot aim a message at another's entry);
//! - memory is bounded: the last [`CAPACITY`] settled deliveries (redeliveries come back
//!   within seconds of the loss, at most a prefetch window at a time). A redelivery to
//!   another replica, or after this process restarted, is processed again, as the contract
//!   allows (an event may come twice).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::Mutex;

use crate::pipeline::{Inbound, Outcome};

/// How many settled deliveries are remembered (about 40 bytes each).
pub const CAPACITY: usize = 8192;

#[derive(Default)]
pub struct Settled {
    keys: RandomState,
    seen: Mutex<(HashMap<u64, Outcome>, VecDeque<u64>)>,
}

impl Settled {
    /// The identity of one message, as it would come back if redelivered.
    pub fn key(&self, inbound: &Inbound) -> u64 {
        let mut h = self.keys.build_hasher();
        inbound.body.hash(&mut h);
        (
            &inbound.message_id,
            &inbound.correlation_id,
            &inbound.reply_to,
            &inbound.content_type,
            &inbound.first_failed_at,
        )
            .hash(&mut h);
        (
            inbound.attempts,
            inbound.deferrals,
            inbound.retries,
            inbound.replay_count,
        )
            .hash(&mut h);
        h.finish()
    }

    /// Remember a delivery whose outcome is published and confirmed.
    pub fn remember(&self, key: u64, outcome: Outcome) {
        let mut guard = crate::lock(&self.seen);
        let (map, order) = &mut *guard;
        if map.insert(key, outcome).is_none() {
            order.push_back(key);
        }
        while order.len() > CAPACITY {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// The outcome this process already settled a redelivered message with.
    pub fn settled(&self, inbound: &Inbound, key: u64) -> Option<Outcome> {
        if !inbound.redelivered {
            return None;
        }
        let guard = crate::lock(&self.seen);
        guard.0.get(&key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(body: &str) -> Inbound {
        Inbound {
            body: body.as_bytes().to_vec(),
            message_id: Some("m-1".into()),
            ..Inbound::default()
        }
    }

    #[test]
    fn only_the_same_message_redelivered_is_recognised() {
        let settled = Settled::default();
        let first = inbound("{\"a\":1}");
        let key = settled.key(&first);
        settled.remember(key, Outcome::Created);
        // Not redelivered: a new delivery of the same bytes is processed.
        assert_eq!(settled.settled(&first, key), None);
        let again = Inbound {
            redelivered: true,
            ..first.clone()
        };
        assert_eq!(settled.key(&again), key);
        assert_eq!(settled.settled(&again, key), Some(Outcome::Created));
        // Another body, or the same one a tier later (its counters moved on): not it.
        for other in [
            Inbound {
                redelivered: true,
                ..inbound("{\"a\":2}")
            },
            Inbound {
                redelivered: true,
                attempts: 1,
                ..first.clone()
            },
        ] {
            let k = settled.key(&other);
            assert_ne!(k, key);
            assert_eq!(settled.settled(&other, k), None);
        }
        // Keys are this process's own.
        assert_ne!(Settled::default().key(&first), key);
    }

    #[test]
    fn memory_is_bounded() {
        let settled = Settled::default();
        for i in 0..(CAPACITY as u64 + 10) {
            settled.remember(i, Outcome::Created);
        }
        let guard = crate::lock(&settled.seen);
        assert_eq!(guard.0.len(), CAPACITY);
        assert_eq!(guard.1.len(), CAPACITY);
        assert!(!guard.0.contains_key(&0) && guard.0.contains_key(&(CAPACITY as u64 + 9)));
    }
}

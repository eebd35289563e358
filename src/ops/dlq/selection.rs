//! Dead letters picked by their content, for an action confirmed before it runs (the
//! console's "these 17"): each letter is known by [`DeadLetter::id`], a SHA-256 of what
//! makes it the same letter in two passes (as `dlq discard` matches its export). A
//! cryptographic hash, because whoever gets a message dead-lettered chooses its content:
//! they must not be able to make a decoy with the id of a letter an operator picked.
//!
//! Invariant: a selection is counted. Each letter it holds is acted on at most once, so
//! an action that runs after another one already moved the same letters finds nothing to
//! do, and two identical letters are two entries.

use std::collections::HashMap;

use super::reader::DeadLetter;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection(HashMap<String, usize>);

impl Selection {
    pub fn insert(&mut self, id: String) {
        *self.0.entry(id).or_insert(0) += 1;
    }

    /// How many letters it still holds.
    pub fn len(&self) -> usize {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take `letter` out of the selection: whether it was in it.
    pub fn take(&mut self, letter: &DeadLetter) -> bool {
        self.take_id(&letter.id())
    }

    /// Take one letter of this [`DeadLetter::id`] out of the selection: whether one was in it.
    pub fn take_id(&mut self, id: &str) -> bool {
        match self.0.get_mut(id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

impl DeadLetter {
    /// The letter's identity, as 32 hex digits (128 bits of SHA-256): the same in every
    /// pass, whatever its position and however often the broker delivered it.
    pub fn id(&self) -> String {
        self.id
            .get_or_init(|| {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(super::discard::identity(self).as_bytes());
                digest[..16].iter().map(|b| format!("{b:02x}")).collect()
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_counts_its_letters() {
        let mut s = Selection::default();
        s.insert("a".into());
        s.insert("a".into());
        s.insert("b".into());
        assert_eq!(s.len(), 3);
        assert_eq!(s.0.get("a"), Some(&2));
        assert!(s.take_id("a") && s.take_id("a"));
        assert!(!s.take_id("a"), "each one is taken once");
        assert_eq!(s.len(), 1);
        assert!(!s.is_empty());
    }
}

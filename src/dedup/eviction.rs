//! Whether Redis may evict the dedup keys: every key the worker writes has a TTL, so under
//! `maxmemory` any policy but `noeviction` (the `volatile-*` ones included, ElastiCache's
//! default among them) may drop created records and claims, and the same ext id could then
//! be created twice. Nothing is lost loudly: the worker keeps running on such a Redis, so it
//! is said at start, in `/readyz`, in a metric and by `check`.
//!
//! Invariants: reading the policy never fails the caller: a refused `CONFIG GET` (an ACL
//! without it, a managed service that renames it) is reported as [`Eviction::Unknown`], not
//! as an error; only an unreachable Redis is.

use std::collections::HashMap;

use redis::RedisError;

use super::RedisStore;
use crate::pipeline::StoreError;

/// What the store's Redis says about evicting keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// `maxmemory-policy noeviction`: writes fail instead (and the circuit handles them).
    Never,
    /// A policy that may evict the worker's keys, and the `maxmemory` (bytes, 0 = no limit
    /// set yet) at which it starts.
    MayEvict { policy: String, maxmemory: u64 },
    /// The policy could not be read, and why.
    Unknown(String),
}

/// The policies Redis knows; anything else is labelled `other` in the metric.
const POLICIES: [&str; 8] = [
    "noeviction",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
];

impl Eviction {
    /// The metric label: the policy, `other`, or `unknown`.
    pub fn label(&self) -> &'static str {
        match self {
            Eviction::Never => "noeviction",
            Eviction::MayEvict { policy, .. } => POLICIES
                .iter()
                .find(|p| **p == policy.as_str())
                .copied()
                .unwrap_or("other"),
            Eviction::Unknown(_) => "unknown",
        }
    }

    /// What to tell an operator, or `None` when there is nothing to say.
    pub fn advice(&self) -> Option<String> {
        let fix = "set `maxmemory-policy noeviction` (`CONFIG SET maxmemory-policy noeviction` \
                   and in redis.conf, or the parameter group of a managed Redis)";
        match self {
            Eviction::Never => None,
            Eviction::MayEvict { policy, maxmemory } => {
                let when = if *maxmemory == 0 {
                    "once a maxmemory limit is set".to_owned()
                } else if *maxmemory == u64::MAX {
                    "when it reaches its maxmemory (which could not be read)".to_owned()
                } else {
                    format!("when it reaches maxmemory ({maxmemory} bytes)")
                };
                Some(format!(
                    "redis maxmemory-policy is {policy}: {when}, Redis evicts keys with a TTL, \
                     and every dedup record and claim has one, so an ext id whose record was \
                     evicted can be created twice; {fix}"
                ))
            }
            Eviction::Unknown(why) => Some(format!(
                "redis maxmemory-policy could not be checked ({why}): it must be noeviction, or \
                 Redis may evict dedup records and an ext id can be created twice; {fix}"
            )),
        }
    }

    /// Whether `check` fails on it (a limit is set and the policy evicts); otherwise it
    /// warns, when there is advice.
    pub fn fails_check(&self) -> bool {
        matches!(self, Eviction::MayEvict { maxmemory, .. } if *maxmemory > 0)
    }
}

/// A refusal to answer `CONFIG GET` (`NOPERM` from an ACL, `ERR unknown command` where a
/// managed service renames it), rather than Redis being away.
fn refused(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::NoPerm | ServerErrorKind::ResponseError)
            | ErrorKind::Extension
    )
}

impl RedisStore {
    /// Read `maxmemory-policy` and `maxmemory`.
    pub async fn eviction(&self) -> Result<Eviction, StoreError> {
        let mut conn = self.conn.clone();
        let mut read = async |name: &str| -> Result<Option<String>, RedisError> {
            let mut values: HashMap<String, String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut conn)
                .await?;
            Ok(values.remove(name))
        };
        let policy = match read("maxmemory-policy").await {
            Ok(Some(policy)) => policy,
            Ok(None) => return Ok(Eviction::Unknown("CONFIG GET returned nothing".into())),
            Err(e) if refused(&e) => {
                return Ok(Eviction::Unknown(format!("CONFIG GET refused: {e}")));
            }
            Err(e) => return Err(super::store_err(e)),
        };
        if policy == "noeviction" {
            return Ok(Eviction::Never);
        }
        let maxmemory = match read("maxmemory").await {
            Ok(value) => value.and_then(|v| v.parse().ok()).unwrap_or(0),
            // The policy evicts; whether a limit is set cannot be told: assume one is.
            Err(e) if refused(&e) => u64::MAX,
            Err(e) => return Err(super::store_err(e)),
        };
        Ok(Eviction::MayEvict { policy, maxmemory })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_a_closed_set() {
        let evict = |p: &str| Eviction::MayEvict {
            policy: p.into(),
            maxmemory: 1,
        };
        assert_eq!(evict("volatile-lru").label(), "volatile-lru");
        assert_eq!(evict("something-new").label(), "other");
        assert_eq!(Eviction::Never.label(), "noeviction");
        assert_eq!(Eviction::Unknown("x".into()).label(), "unknown");
    }

    #[test]
    fn advice_names_the_policy_its_value_and_the_fix() {
        let text = Eviction::MayEvict {
            policy: "volatile-lru".into(),
            maxmemory: 268_435_456,
        }
        .advice()
        .unwrap_or_default();
        for part in [
            "maxmemory-policy is volatile-lru",
            "268435456",
            "noeviction",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        assert_eq!(Eviction::Never.advice(), None);
        let unknown = Eviction::Unknown("CONFIG GET refused: NOPERM".into())
            .advice()
            .unwrap_or_default();
        assert!(unknown.contains("could not be checked (CONFIG GET refused: NOPERM)"));
    }

    #[test]
    fn only_a_set_limit_fails_check() {
        let evict = |maxmemory| Eviction::MayEvict {
            policy: "allkeys-lru".into(),
            maxmemory,
        };
        assert!(evict(1).fails_check());
        assert!(!evict(0).fails_check());
        assert!(!Eviction::Unknown(String::new()).fails_check());
    }
}

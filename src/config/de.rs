//! Serde adapters for configuration values that arrive as TOML values *or* as environment
//! strings (`PROVISIONER__AMQP__PREFETCH=16`): integers, numbers, durations and the delay
//! tier list.
//!
//! Invariants:
//! - an environment string is parsed with the same strict grammar as the TOML value, and
//!   nothing is guessed (`"7.5"` is not an integer, `"5 s"` is not a duration);
//! - every error message quotes the offending value and says what was expected; the key
//!   is added by the caller, from the deserializer's path.
//!
//! The environment layer is read without the `config` crate's type guessing on purpose: it
//! would turn a token like `0123` into the number 123.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use super::duration::parse_duration;
use super::{AuthMode, DelayTier, LogFormat, RedisMode};
use crate::secret::SecretString;

/// A keyword from a closed set, named in the error when it is not one of them.
fn one_of<'de, D: Deserializer<'de>, T: Copy>(d: D, choices: &[(&str, T)]) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    choices
        .iter()
        .find(|(name, _)| *name == text.trim())
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            de::Error::custom(format!("{text:?} is not one of {}", names.join(", ")))
        })
}

impl<'de> serde::Deserialize<'de> for AuthMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AuthMode, D::Error> {
        one_of(d, &[("token", AuthMode::Token), ("login", AuthMode::Login)])
    }
}

impl<'de> serde::Deserialize<'de> for RedisMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RedisMode, D::Error> {
        one_of(
            d,
            &[
                ("standalone", RedisMode::Standalone),
                ("sentinel", RedisMode::Sentinel),
                ("cluster", RedisMode::Cluster),
            ],
        )
    }
}

impl<'de> serde::Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LogFormat, D::Error> {
        one_of(
            d,
            &[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)],
        )
    }
}

/// An integer, from a TOML integer or a decimal string.
pub fn integer<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = i64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            // `8.0` in TOML is the integer 8; `7.5` is not an integer.
            let whole = v.fract() == 0.0 && v.abs() < 9.0e15;
            if whole {
                Ok(v as i64)
            } else {
                Err(E::custom(format!("{v} is not an integer")))
            }
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<i64, E> {
            Err(E::custom(format!("{v} is not an integer")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
            v.trim()
                .parse()
                .map_err(|_| E::custom(format!("{v:?} is not an integer")))
        }
    }
    d.deserialize_any(V)
}

/// A boolean, from a TOML boolean or `true`/`false` in the environment.
pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("true or false")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            match v.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(E::custom(format!("{v:?} is not true or false"))),
            }
        }
    }
    d.deserialize_any(V)
}

/// A number, from a TOML integer or float or a decimal string.
pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = f64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<f64, E> {
            Err(E::custom(format!("{v} is not a number")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            v.trim()
                .parse()
                .map_err(|_| E::custom(format!("{v:?} is not a number")))
        }
    }
    d.deserialize_any(V)
}

fn duration_error<E: de::Error>(text: &str) -> E {
    E::custom(format!(
        "{text:?} is not a duration (use e.g. 250ms, 5s, 2m, 1h, 30d)"
    ))
}

/// A duration written `250ms`, `5s`, `2m`, `1h` or `30d`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as 5s")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse_duration(v).ok_or_else(|| duration_error(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        Err(duration_error(&v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Err(duration_error(&v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Err(duration_error(&v.to_string()))
    }
}

fn tier_error<E: de::Error>(text: &str) -> E {
    E::custom(format!("{text:?} is not a duration (use e.g. 5s, 2m)"))
}

impl<'de> serde::Deserialize<'de> for DelayTier {
    /// The label is kept exactly as written (trimmed): it names the tier's queue.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<DelayTier, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DelayTier;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a delay such as 5s")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DelayTier, E> {
                let label = v.trim();
                let delay = parse_duration(label).ok_or_else(|| tier_error(v))?;
                Ok(DelayTier {
                    label: label.to_owned(),
                    delay,
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DelayTier, E> {
                Err(tier_error(&v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DelayTier, E> {
                Err(tier_error(&v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<DelayTier, E> {
                Err(tier_error(&v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The delay tiers: a TOML list, or one comma-separated string (the environment form,
/// `PROVISIONER__RETRY__DELAYS=5s,30s,2m`).
pub fn delays<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DelayTier>, D::Error> {
    struct V(PhantomData<DelayTier>);
    impl<'de> Visitor<'de> for V {
        type Value = Vec<DelayTier>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of delays such as [\"5s\", \"30s\"]")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<DelayTier>, A::Error> {
            let mut out = Vec::new();
            while let Some(tier) = seq.next_element::<DelayTier>()? {
                out.push(tier);
            }
            Ok(out)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<DelayTier>, E> {
            if v.trim().is_empty() {
                return Ok(Vec::new());
            }
            v.split(',')
                .map(|part| DelayTier::deserialize(de::value::StrDeserializer::<E>::new(part)))
                .collect()
        }
    }
    d.deserialize_any(V(PhantomData))
}

/// URLs: a TOML list, or one string holding one URL or several separated by commas (the
/// environment form). A comma splits only where the next URL starts (`scheme://`), so a
/// comma inside a password never does.
pub fn url_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<SecretString>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a URL, or a list of URLs")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(url) = seq.next_element::<String>()? {
                out.push(SecretString::from(url));
            }
            Ok(out)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(split_urls(v).into_iter().map(SecretString::from).collect())
        }
    }
    d.deserialize_any(V)
}

/// `a,b` → `[a, b]` where `b` starts with `<scheme>://`; other commas stay.
pub fn split_urls(v: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in v.split(',') {
        let starts_url = part
            .trim_start()
            .split_once("://")
            .is_some_and(|(scheme, _)| {
                !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            });
        match out.last_mut() {
            // An empty part is its own (empty) entry, which the caller refuses: a stray
            // comma must not become part of the URL before it.
            Some(last) if !starts_url && !part.trim().is_empty() && !last.is_empty() => {
                last.push(',');
                last.push_str(part);
            }
            _ => out.push(part.trim().to_owned()),
        }
    }
    if out.len() == 1 && out[0].is_empty() {
        out.clear();
    }
    out
}

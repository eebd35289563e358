//! Serde adapters for configuration values that arrive as TOML values *or* as environment
//! strings (`PROVISIONER__AMQP__PREFETCH=16`), each of which also checks its value's own
//! range and grammar (URLs, names, durations with a minimum, the delay tiers).
//!
//! Invariants:
//! - an environment string is parsed with the same strict grammar as the TOML value, and
//!   nothing is guessed (`"7.5"` is not an integer, `"5 s"` is not a duration);
//! - every error message quotes the offending value (URLs with their password masked,
//!   secrets never) and says what was expected; the key is added by the caller, from the
//!   deserializer's path.
//!
//! The environment layer is read without the `config` crate's type guessing on purpose: it
//! would turn a token like `0123` into the number 123.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};

use super::duration::{format_duration, parse_duration};
use super::{AmqpNodes, AuthMode, Declare, DelayTier, LogFormat, RedisMode};
use crate::secret::{ExposeSecret, SecretString, SecretUrl, redact_url};

/// An error made from one of this module's reasons.
fn custom<E: de::Error>(reason: String) -> E {
    E::custom(reason)
}

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

/// `Deserialize` for a keyword enum: `keywords!(Type { "word" => Variant, … })`.
macro_rules! keywords {
    ($($t:ident { $($word:literal => $variant:ident),* })*) => {$(
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                one_of(d, &[$(($word, $t::$variant)),*])
            }
        }
    )*};
}

keywords! {
    AuthMode { "token" => Token, "login" => Login }
    RedisMode { "standalone" => Standalone, "sentinel" => Sentinel, "cluster" => Cluster }
    Declare { "all" => All, "verify" => Verify }
    LogFormat { "json" => Json, "pretty" => Pretty }
}

/// A scalar as the TOML layer or the environment gives it; anything else is serde's
/// "invalid type" error, expecting what the adapter names.
enum Scalar {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Text(String),
}

struct ScalarVisitor(&'static str);

impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar::UInt(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar::Text(v.to_owned()))
    }
}

fn scalar<'de, D: Deserializer<'de>>(d: D, expecting: &'static str) -> Result<Scalar, D::Error> {
    d.deserialize_any(ScalarVisitor(expecting))
}

/// An integer, from a TOML integer or a decimal string.
pub fn integer<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match scalar(d, "an integer")? {
        Scalar::Int(v) => Ok(v),
        Scalar::UInt(v) => i64::try_from(v).map_err(|_| custom(format!("{v} is out of range"))),
        // `8.0` in TOML is the integer 8; `7.5` is not an integer.
        Scalar::Float(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => Ok(v as i64),
        Scalar::Float(v) => Err(custom(format!("{v} is not an integer"))),
        Scalar::Bool(v) => Err(custom(format!("{v} is not an integer"))),
        Scalar::Text(v) => v
            .trim()
            .parse()
            .map_err(|_| custom(format!("{v:?} is not an integer"))),
    }
}

/// A boolean, from a TOML boolean or `true`/`false` in the environment.
pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match scalar(d, "true or false")? {
        Scalar::Bool(v) => Ok(v),
        Scalar::Text(v) if v.trim() == "true" => Ok(true),
        Scalar::Text(v) if v.trim() == "false" => Ok(false),
        Scalar::Text(v) => Err(custom(format!("{v:?} is not true or false"))),
        Scalar::Int(v) => Err(de::Error::invalid_type(
            Unexpected::Signed(v),
            &"true or false",
        )),
        Scalar::UInt(v) => Err(de::Error::invalid_type(
            Unexpected::Unsigned(v),
            &"true or false",
        )),
        Scalar::Float(v) => Err(de::Error::invalid_type(
            Unexpected::Float(v),
            &"true or false",
        )),
    }
}

/// A number, from a TOML integer or float or a decimal string.
pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    match scalar(d, "a number")? {
        Scalar::Int(v) => Ok(v as f64),
        Scalar::UInt(v) => Ok(v as f64),
        Scalar::Float(v) => Ok(v),
        Scalar::Bool(v) => Err(custom(format!("{v} is not a number"))),
        Scalar::Text(v) => v
            .trim()
            .parse()
            .map_err(|_| custom(format!("{v:?} is not a number"))),
    }
}

/// The text of a duration; a number is its own text (which no duration is).
fn duration_text<'de, D: Deserializer<'de>>(
    d: D,
    expecting: &'static str,
) -> Result<String, D::Error> {
    match scalar(d, expecting)? {
        Scalar::Text(v) => Ok(v),
        Scalar::Int(v) => Ok(v.to_string()),
        Scalar::UInt(v) => Ok(v.to_string()),
        Scalar::Float(v) => Ok(v.to_string()),
        Scalar::Bool(v) => Err(de::Error::invalid_type(Unexpected::Bool(v), &expecting)),
    }
}

/// A duration written `250ms`, `5s`, `2m`, `1h` or `30d`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = duration_text(d, "a duration such as 5s")?;
    parse_duration(&text).ok_or_else(|| {
        custom(format!(
            "{text:?} is not a duration (use e.g. 250ms, 5s, 2m, 1h, 30d)"
        ))
    })
}

impl<'de> serde::Deserialize<'de> for DelayTier {
    /// The label is kept exactly as written (trimmed): it names the tier's queue.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<DelayTier, D::Error> {
        let text = duration_text(d, "a delay such as 5s")?;
        let label = text.trim();
        let delay = parse_duration(label)
            .ok_or_else(|| custom(format!("{text:?} is not a duration (use e.g. 5s, 2m)")))?;
        Ok(DelayTier {
            label: label.to_owned(),
            delay,
        })
    }
}

/// The delay tiers: a TOML list, or one comma-separated string (the environment form,
/// `PROVISIONER__RETRY__DELAYS=5s,30s,2m`). At least one; each longer than 0, short enough
/// for a queue TTL, and named once.
pub fn delays<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DelayTier>, D::Error> {
    let tiers = tier_list(d)?;
    if tiers.is_empty() {
        return Err(custom("needs at least one delay tier".to_owned()));
    }
    for (i, tier) in tiers.iter().enumerate() {
        let label = &tier.label;
        if tier.delay.is_zero() {
            return Err(custom(format!(
                "{label:?}: a delay tier must be longer than 0"
            )));
        }
        if tier.delay.as_millis() > u128::from(u32::MAX) {
            return Err(custom(format!(
                "{label:?} is longer than RabbitMQ accepts as a queue TTL (4294967295 ms, about 49 days)"
            )));
        }
        if tiers[..i].iter().any(|t| t.label == *label) {
            return Err(custom(format!("{label:?} appears twice")));
        }
    }
    Ok(tiers)
}

fn tier_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DelayTier>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<DelayTier>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of delays such as [\"5s\", \"30s\"]")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<DelayTier>, A::Error> {
            Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))
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
    d.deserialize_any(V)
}

/// URLs: a TOML list, or one string holding one URL or several separated by commas (the
/// environment form). A comma splits only where the next URL starts (`scheme://`), so a
/// comma inside a password never does.
pub fn url_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a URL, or a list of URLs")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<String>, A::Error> {
            Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(split_urls(v))
        }
    }
    Ok(d.deserialize_any(V)?
        .into_iter()
        .map(SecretString::from)
        .collect())
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

/// An integer in `MIN..=MAX`, as `T`.
pub fn ranged<'de, D, T, const MIN: i64, const MAX: i64>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    let n = integer(d)?;
    if !(MIN..=MAX).contains(&n) {
        return Err(custom(format!("{n} is out of range ({MIN}..={MAX})")));
    }
    T::try_from(n).map_err(|_| custom(format!("{n} is out of range")))
}

/// A duration of at least `MIN_MS` milliseconds.
pub fn duration_min<'de, D: Deserializer<'de>, const MIN_MS: u64>(
    d: D,
) -> Result<Duration, D::Error> {
    let value = duration(d)?;
    let min = Duration::from_millis(MIN_MS);
    if value < min {
        return Err(custom(format!(
            "{:?} is too short (minimum {})",
            format_duration(value),
            format_duration(min)
        )));
    }
    Ok(value)
}

/// `retry.multiplier`: between 1 and 10.
pub fn multiplier<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let m = number(d)?;
    if !(m.is_finite() && (1.0..=10.0).contains(&m)) {
        return Err(custom(format!("{m} is not a number between 1 and 10")));
    }
    Ok(m)
}

/// A socket address such as `127.0.0.1:9464`.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<std::net::SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    let listen = text.trim();
    listen.parse().map_err(|_| {
        custom(format!(
            "{listen:?} is not a socket address (e.g. 127.0.0.1:9464)"
        ))
    })
}

/// A level or an `EnvFilter` directive.
pub fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let level = String::deserialize(d)?.trim().to_owned();
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        return Err(custom(format!(
            "{level:?} is not a level or filter (e.g. info, debug, group_provisioner=debug)"
        )));
    }
    Ok(level)
}

/// An AMQP exchange, queue or routing key name: 1–255 bytes, no control characters.
pub fn name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(custom("must not be empty".to_owned()));
    }
    if trimmed.len() > 255 || trimmed.chars().any(char::is_control) {
        return Err(custom(format!(
            "{value:?} is not a valid AMQP name (1-255 bytes, no control characters)"
        )));
    }
    Ok(trimmed.to_owned())
}

/// Text without surrounding whitespace; blank means unset.
pub fn nonempty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(d)?;
    Ok(value.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()))
}

/// A token without surrounding whitespace (a secret made from a file often ends with a
/// newline, which no `Authorization` header may carry); blank means unset.
pub fn token<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    let value = Option::<SecretString>::deserialize(d)?;
    Ok(value
        .map(|s| SecretString::from(s.expose_secret().trim()))
        .filter(|s| !s.expose_secret().is_empty()))
}

/// A password exactly as given (spaces may belong to it); empty means unset.
pub fn password<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    let value = Option::<SecretString>::deserialize(d)?;
    Ok(value.filter(|s| !s.expose_secret().is_empty()))
}

/// A console password: unset, or at least [`CONSOLE_PASSWORD_MIN`] characters (it guards
/// the buttons that move and remove dead letters).
pub fn console_password<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    let value = password(d)?;
    match value {
        Some(p) if p.expose_secret().chars().count() < CONSOLE_PASSWORD_MIN => Err(custom(
            format!("is shorter than {CONSOLE_PASSWORD_MIN} characters"),
        )),
        other => Ok(other),
    }
}

pub const CONSOLE_PASSWORD_MIN: usize = 12;

/// `console.public_url`: the origin people reach the console at (`https://dlq.example.com`),
/// as `scheme://host[:port]`; no path, no credentials.
pub fn public_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = String::deserialize(d)?;
    if value.trim().is_empty() {
        return Ok(None);
    }
    let (v, parsed) = url(&value, &["http", "https"]).map_err(custom)?;
    let plain = parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.path() == "/"
        && parsed.query().is_none()
        && parsed.fragment().is_none();
    if !plain {
        return Err(custom(format!(
            "{:?} must be an origin only, e.g. https://dlq.example.com (no path, no credentials)",
            redact_url(&v)
        )));
    }
    Ok(Some(parsed.origin().ascii_serialization()))
}

/// A console user name: 1-64 characters of A-Z a-z 0-9 _ - . @ (it is written in every
/// audit line).
pub fn user_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@');
    if value.is_empty() || value.len() > 64 || !value.chars().all(safe) {
        return Err(custom(format!(
            "{value:?} must be 1-64 characters of A-Z a-z 0-9 _ - . @"
        )));
    }
    Ok(value)
}

/// `redis.key_prefix`. Keys are also matched by patterns (`KEYS`, `SCAN MATCH` in
/// runbooks): no glob characters, nothing that needs quoting.
pub fn key_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let prefix = String::deserialize(d)?;
    let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/');
    if prefix.is_empty() || prefix.len() > 128 || !prefix.chars().all(safe) {
        return Err(custom(format!(
            "{prefix:?} must be 1-128 characters of A-Z a-z 0-9 _ - . : /"
        )));
    }
    Ok(prefix)
}

/// `url` with one of `schemes`, parseable as a URL; shown with its password masked.
fn url(value: &str, schemes: &[&str]) -> Result<(String, reqwest::Url), String> {
    let v = value.trim();
    let shown = redact_url(v);
    let scheme = v.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if !scheme.is_some_and(|s| schemes.contains(&s.as_str())) {
        return Err(format!(
            "{shown:?} is not a URL with scheme {}",
            schemes.join(" or ")
        ));
    }
    let parsed =
        reqwest::Url::parse(v).map_err(|e| format!("{shown:?} is not a valid URL: {e}"))?;
    Ok((v.to_owned(), parsed))
}

/// A list of URLs with one of `schemes`, each also accepted by `accepts` (whose error is
/// the reason after "is not …"). With several entries, an error names the entry by number
/// and never quotes it: splitting a comma-separated value inside an unencoded password
/// would leave a piece of the password without the `@` that redaction keys on.
fn url_entries(
    urls: Vec<SecretString>,
    schemes: &[&str],
    accepts: impl Fn(&str) -> Result<(), String>,
) -> Result<Vec<SecretUrl>, String> {
    let count = urls.len();
    let mut out = Vec::with_capacity(count);
    for (i, raw) in urls.iter().enumerate() {
        let entry = format!("entry {} of {count}", i + 1);
        let value = raw.expose_secret();
        if value.trim().is_empty() {
            return Err(format!("{entry} is empty (a stray comma?)"));
        }
        let (checked, _) = url(value, schemes).map_err(|e| {
            if count == 1 {
                return e;
            }
            format!(
                "{entry} is not a valid URL with scheme {} (not shown: it may hold a password; percent-encode , @ / : in passwords)",
                schemes.join(" or ")
            )
        })?;
        accepts(&checked).map_err(|e| {
            let shown = if count == 1 {
                format!("{:?}", redact_url(&checked))
            } else {
                entry
            };
            format!("{shown} is not {e}")
        })?;
        out.push(SecretUrl::new(checked));
    }
    Ok(out)
}

/// `amqp.url`: one broker, or the nodes of one cluster.
pub fn amqp_nodes<'de, D: Deserializer<'de>>(d: D) -> Result<AmqpNodes, D::Error> {
    let urls = url_list(d)?;
    let nodes = url_entries(urls, &["amqp", "amqps"], |u| {
        u.parse::<lapin::uri::AMQPUri>()
            .map(drop)
            .map_err(|e| format!("an AMQP URI: {e}"))
    })
    .map_err(custom)?;
    AmqpNodes::new(nodes).ok_or_else(|| custom("at least one broker URL is needed".to_owned()))
}

fn redis_client(u: &str) -> Result<(), String> {
    redis::Client::open(u)
        .map(drop)
        .map_err(|e| format!("a Redis URL: {e}"))
}

/// `redis.url`.
pub fn redis_url<'de, D: Deserializer<'de>>(d: D) -> Result<SecretUrl, D::Error> {
    let value = SecretString::deserialize(d)?;
    let schemes = ["redis", "rediss", "unix", "redis+unix"];
    let (checked, _) = url(value.expose_secret(), &schemes).map_err(custom)?;
    redis_client(&checked).map_err(|e| custom(format!("{:?} is not {e}", redact_url(&checked))))?;
    Ok(SecretUrl::new(checked))
}

/// `redis.nodes`: sentinels or cluster seeds.
pub fn redis_nodes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SecretUrl>, D::Error> {
    url_entries(url_list(d)?, &["redis", "rediss"], redis_client).map_err(custom)
}

/// An HTTP URL of the API, without a trailing slash. Credentials never go in it (they
/// would print wherever the URL does, and the API authenticates with `api.token` or a
/// login).
pub fn api_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    let (v, parsed) = url(&value, &["http", "https"]).map_err(custom)?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(custom(format!(
            "{:?} carries credentials; put them in api.token or api.email/api.password",
            redact_url(&v)
        )));
    }
    Ok(v.trim_end_matches('/').to_owned())
}

/// `amqp.management_url`: an HTTP URL without credentials (the management API is read
/// with those of `amqp.url`); empty means unset.
pub fn management_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = String::deserialize(d)?;
    if value.trim().is_empty() {
        return Ok(None);
    }
    let (v, parsed) = url(&value, &["http", "https"]).map_err(custom)?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(custom(format!(
            "{:?} carries credentials; the management API is read with those of amqp.url",
            redact_url(&v)
        )));
    }
    Ok(Some(v.trim_end_matches('/').to_owned()))
}

//! The configuration as written (serde, one struct per section, unknown keys denied) and
//! its conversion into the typed [`Settings`]: ranges, URLs, names and the rules that tie
//! keys together. Every check names its dotted key.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{
    AmqpNodes, AmqpSettings, ApiAuth, ApiSettings, AuthMode, CircuitSettings, ClientIdentity,
    ConfigError, Credentials, DedupSettings, DelayTier, LogFormat, LogSettings, MetricsSettings,
    RedisMode, RedisSettings, RetrySettings, Settings, ShutdownSettings, TlsSettings,
    TopologySettings, de, format_duration,
};
use crate::secret::{ExposeSecret, SecretString, SecretUrl, redact_url};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    amqp: RawAmqp,
    redis: RawRedis,
    api: RawApi,
    retry: RawRetry,
    circuit: RawCircuit,
    dedup: RawDedup,
    shutdown: RawShutdown,
    metrics: RawMetrics,
    log: RawLog,
    topology: RawTopology,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAmqp {
    #[serde(deserialize_with = "de::url_list")]
    url: Vec<SecretString>,
    #[serde(default)]
    tls: RawTls,
    #[serde(deserialize_with = "de::integer")]
    prefetch: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: SecretString,
    mode: RedisMode,
    #[serde(default, deserialize_with = "de::url_list")]
    nodes: Vec<SecretString>,
    sentinel_master: Option<String>,
    key_prefix: String,
    #[serde(default)]
    tls: RawTls,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

impl RawTls {
    /// Read and check the files; `section` is `amqp` or `redis`, for the key names.
    fn into_settings(self, section: &str) -> Result<TlsSettings, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let key = |leaf: &str| format!("{section}.tls.{leaf}");
        let read = |leaf: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                ConfigError::new(key(leaf), format!("cannot read {}: {e}", path.display()))
            })
        };
        // The contents are never quoted: a key file is a secret, and a wrong file could be.
        let certificates = |leaf: &str, path: &PathBuf, pem: &[u8]| {
            let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
            match parsed {
                Ok(certs) if !certs.is_empty() => Ok(()),
                _ => Err(ConfigError::new(
                    key(leaf),
                    format!("{} holds no PEM certificate", path.display()),
                )),
            }
        };
        let ca_pem = match &self.ca_file {
            Some(path) => {
                let pem = read("ca_file", path)?;
                certificates("ca_file", path, &pem)?;
                Some(pem)
            }
            None => None,
        };
        let client = match (self.cert_file, self.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    key("key_file"),
                    format!("is required with {}", key("cert_file")),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    key("cert_file"),
                    format!("is required with {}", key("key_file")),
                ));
            }
            (Some(cert_file), Some(key_file)) => {
                let cert_pem = read("cert_file", &cert_file)?;
                certificates("cert_file", &cert_file, &cert_pem)?;
                let key_pem = read("key_file", &key_file)?;
                let Ok(private) = PrivateKeyDer::from_pem_slice(&key_pem) else {
                    return Err(ConfigError::new(
                        key("key_file"),
                        format!("{} holds no PEM private key", key_file.display()),
                    ));
                };
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
                    .filter_map(Result::ok)
                    .collect();
                let provider = rustls::crypto::aws_lc_rs::default_provider();
                if let Err(e) = rustls::sign::CertifiedKey::from_der(chain, private, &provider) {
                    return Err(ConfigError::new(
                        key("key_file"),
                        format!(
                            "{} is not the key of {} ({e})",
                            key_file.display(),
                            cert_file.display()
                        ),
                    ));
                }
                Some(ClientIdentity {
                    cert_file,
                    cert_pem,
                    key_pem: key_pem.into(),
                })
            }
        };
        Ok(TlsSettings {
            ca_file: self.ca_file,
            ca_pem,
            client,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    base_url: String,
    auth: AuthMode,
    token: Option<SecretString>,
    email: Option<String>,
    password: Option<SecretString>,
    auth_url: String,
    #[serde(deserialize_with = "de::duration")]
    timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(deserialize_with = "de::duration")]
    initial: Duration,
    #[serde(deserialize_with = "de::number")]
    multiplier: f64,
    #[serde(deserialize_with = "de::duration")]
    max_interval: Duration,
    #[serde(deserialize_with = "de::integer")]
    max_tries: i64,
    #[serde(deserialize_with = "de::duration")]
    max_retry_after: Duration,
    #[serde(deserialize_with = "de::delays")]
    delays: Vec<DelayTier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCircuit {
    #[serde(deserialize_with = "de::integer")]
    failure_threshold: i64,
    #[serde(deserialize_with = "de::duration")]
    cooldown: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDedup {
    #[serde(deserialize_with = "de::duration")]
    ttl: Duration,
    #[serde(deserialize_with = "de::duration")]
    lease: Duration,
    #[serde(deserialize_with = "de::boolean")]
    verify_unknown: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    #[serde(deserialize_with = "de::duration")]
    drain_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: LogFormat,
    level: String,
    queue_lines: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    command_exchange: String,
    command_routing_key: String,
    work_queue: String,
    dead_letter_exchange: String,
    dead_letter_queue: String,
    event_exchange: String,
    unrouted_events: String,
    created_routing_key: String,
    failed_routing_key: String,
    #[serde(deserialize_with = "de::integer")]
    delivery_limit: i64,
}

/// Every key of the merged configuration, dotted, checked against the keys this version
/// knows (the defaults and the keys without one) before anything is deserialized: an
/// unknown key, or a value where a section of keys belongs, is named with a "did you
/// mean" — decided here, never read back from serde's English.
pub(super) fn check_keys(merged: &::config::Config) -> Result<(), ConfigError> {
    let known: Vec<String> = super::defaults()
        .into_iter()
        .map(|(k, _)| k)
        .chain(super::KEYS_WITHOUT_DEFAULT.iter().map(|k| (*k).to_owned()))
        .collect();
    let mut stack: Vec<(String, ::config::Value)> = match &merged.cache.kind {
        ::config::ValueKind::Table(table) => table.clone().into_iter().collect(),
        _ => Vec::new(),
    };
    while let Some((key, value)) = stack.pop() {
        let section = known.iter().any(|k| k.starts_with(&format!("{key}.")));
        match value.kind {
            ::config::ValueKind::Table(inner) if section || !known.contains(&key) => {
                if !section {
                    return Err(unknown_key(&key, &known));
                }
                stack.extend(inner.into_iter().map(|(k, v)| (format!("{key}.{k}"), v)));
            }
            _ if section => {
                return Err(ConfigError::new(
                    key,
                    format!("is {}, expected a section of keys", describe(&value.kind)),
                ));
            }
            _ if !known.contains(&key) => return Err(unknown_key(&key, &known)),
            _ => {}
        }
    }
    Ok(())
}

/// A value as a reader names it: its type, then itself (`integer \`5\``).
fn describe(kind: &::config::ValueKind) -> String {
    use ::config::ValueKind as K;
    let name = match kind {
        K::Nil => return "empty".to_owned(),
        K::Boolean(_) => "boolean",
        K::I64(_) | K::I128(_) | K::U64(_) | K::U128(_) => "integer",
        K::Float(_) => "floating point",
        K::String(_) => "string",
        K::Table(_) => "a section",
        K::Array(_) => "a list",
    };
    format!("{name} `{kind}`")
}

/// `key` is not a key of this version: the closest one in its section, or the same name in
/// another section (`amqp.key_prefix` → `redis.key_prefix`).
fn unknown_key(key: &str, known: &[String]) -> ConfigError {
    let (section, leaf) = key.rsplit_once('.').unwrap_or(("", key));
    let siblings: Vec<String> = known
        .iter()
        .filter_map(|k| {
            let (s, l) = k.rsplit_once('.')?;
            (s == section).then(|| l.to_owned())
        })
        .collect();
    let hint = closest(leaf, &siblings)
        .map(|l| format!("{section}.{l}"))
        .or_else(|| {
            known
                .iter()
                .find(|k| k.rsplit_once('.').is_some_and(|(_, l)| l == leaf))
                .cloned()
        })
        .map(|full| format!(" (did you mean {full}?)"))
        .unwrap_or_default();
    ConfigError::new(key, format!("unknown key{hint}"))
}

/// A deserialization error as `config error: <key>: <reason>`: the key from the path, the
/// reason from this crate's own deserializers (keys were checked before: [`check_keys`]).
pub(super) fn key_error(e: serde_path_to_error::Error<::config::ConfigError>) -> ConfigError {
    let key = e
        .path()
        .iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(".");
    ConfigError::new(key, innermost(e.inner()))
}

/// The message of the innermost error (the `config` crate wraps errors with their key,
/// which the path already gives).
fn innermost(e: &::config::ConfigError) -> String {
    match e {
        ::config::ConfigError::At { error, .. } => innermost(error),
        ::config::ConfigError::NotFound(field) => format!("missing field `{field}`"),
        ::config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("{unexpected} is not {expected}"),
        other => other.to_string(),
    }
}

fn closest(unknown: &str, known: &[String]) -> Option<String> {
    known
        .iter()
        .find(|k| k.starts_with(unknown) || unknown.starts_with(k.as_str()))
        .or_else(|| known.iter().find(|k| one_edit_apart(unknown, k)))
        .cloned()
}

/// At most one insertion, deletion, substitution or swap of neighbours apart.
fn one_edit_apart(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    // Optimal string alignment distance, rows reused.
    let mut before: Vec<usize> = Vec::new();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut row = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (prev[j] + 1).min(row[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(before[j - 2] + 1);
            }
        }
        before = std::mem::replace(&mut prev, row);
    }
    prev[b.len()] <= 1
}

fn in_range<T: TryFrom<i64>>(key: &str, n: i64, min: i64, max: i64) -> Result<T, ConfigError> {
    if n < min || n > max {
        return Err(ConfigError::new(
            key,
            format!("{n} is out of range ({min}..={max})"),
        ));
    }
    T::try_from(n).map_err(|_| ConfigError::new(key, format!("{n} is out of range")))
}

fn at_least(key: &str, d: Duration, min: Duration) -> Result<Duration, ConfigError> {
    if d < min {
        return Err(ConfigError::new(
            key,
            format!(
                "{:?} is too short (minimum {})",
                format_duration(d),
                format_duration(min)
            ),
        ));
    }
    Ok(d)
}

/// `url` with one of `schemes`, parseable as a URL; shown with its password masked.
fn url(key: &str, value: &str, schemes: &[&str]) -> Result<String, ConfigError> {
    let v = value.trim();
    let shown = redact_url(v);
    let scheme = v.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if !scheme.is_some_and(|s| schemes.contains(&s.as_str())) {
        return Err(ConfigError::new(
            key,
            format!(
                "{shown:?} is not a URL with scheme {}",
                schemes.join(" or ")
            ),
        ));
    }
    reqwest::Url::parse(v)
        .map_err(|e| ConfigError::new(key, format!("{shown:?} is not a valid URL: {e}")))?;
    Ok(v.to_owned())
}

/// Entry `index` of a list of `count` URLs. With several entries, an error names the entry
/// by number and never quotes it: splitting a comma-separated value inside an unencoded
/// password would leave a piece of the password without the `@` that redaction keys on.
fn list_url(
    key: &str,
    index: usize,
    count: usize,
    value: &str,
    schemes: &[&str],
) -> Result<String, ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::new(
            key,
            format!("entry {} of {count} is empty (a stray comma?)", index + 1),
        ));
    }
    if count == 1 {
        return url(key, value, schemes);
    }
    url(key, value, schemes).map_err(|_| {
        ConfigError::new(
            key,
            format!(
                "entry {} of {count} is not a valid URL with scheme {} (not shown: it may hold a password; percent-encode , @ / : in passwords)",
                index + 1,
                schemes.join(" or ")
            ),
        )
    })
}

/// An HTTP URL of the API: credentials never go in it (they would print wherever the URL
/// does, and the API authenticates with `api.token` or a login).
fn api_url(key: &str, value: &str) -> Result<String, ConfigError> {
    let v = url(key, value, &["http", "https"])?;
    let parsed = reqwest::Url::parse(&v).map_err(|e| {
        ConfigError::new(key, format!("{:?} is not a valid URL: {e}", redact_url(&v)))
    })?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ConfigError::new(
            key,
            format!(
                "{:?} carries credentials; put them in api.token or api.email/api.password",
                redact_url(&v)
            ),
        ));
    }
    Ok(v.trim_end_matches('/').to_owned())
}

/// An AMQP exchange, queue or routing key name: 1–255 bytes, no control characters.
fn name(key: &str, value: &str) -> Result<String, ConfigError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ConfigError::new(key, "must not be empty"));
    }
    if trimmed.len() > 255 || trimmed.chars().any(char::is_control) {
        return Err(ConfigError::new(
            key,
            format!("{value:?} is not a valid AMQP name (1-255 bytes, no control characters)"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// `value` if `value` + `suffix` is still an AMQP name (the tools derive such names).
fn with_room(value: String, key: &str, suffix: &str) -> Result<String, ConfigError> {
    if value.len() + suffix.len() > 255 {
        return Err(ConfigError::new(
            key,
            format!(
                "is {} bytes; at most {} (the tools name queues after it, adding {suffix:?})",
                value.len(),
                255 - suffix.len()
            ),
        ));
    }
    Ok(value)
}

fn nonempty(value: Option<String>) -> Option<String> {
    value.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// A token without surrounding whitespace (a secret made from a file often ends with a
/// newline, which no `Authorization` header may carry); blank means unset.
fn trimmed_secret(value: Option<SecretString>) -> Option<SecretString> {
    value
        .map(|s| SecretString::from(s.expose_secret().trim()))
        .filter(|s| !s.expose_secret().is_empty())
}

/// A password exactly as given (spaces may belong to it); empty means unset.
fn nonempty_secret(value: Option<SecretString>) -> Option<SecretString> {
    value.filter(|s| !s.expose_secret().is_empty())
}

impl ApiAuth {
    /// The credentials `api.auth` needs, or the key that is missing.
    fn from_raw(
        mode: AuthMode,
        token: Option<SecretString>,
        email: Option<String>,
        password: Option<SecretString>,
    ) -> Result<ApiAuth, ConfigError> {
        match mode {
            AuthMode::Token => token.map(ApiAuth::Token).ok_or_else(|| {
                ConfigError::new(
                    "api.token",
                    "is required when api.auth = \"token\" (set PROVISIONER__API__TOKEN)",
                )
            }),
            AuthMode::Login => {
                let email = email.ok_or_else(|| {
                    ConfigError::new("api.email", "is required when api.auth = \"login\"")
                })?;
                let password = password.ok_or_else(|| {
                    ConfigError::new(
                        "api.password",
                        "is required when api.auth = \"login\" (set PROVISIONER__API__PASSWORD)",
                    )
                })?;
                Ok(ApiAuth::Login { email, password })
            }
        }
    }
}

impl Raw {
    pub(super) fn into_settings(self, credentials: Credentials) -> Result<Settings, ConfigError> {
        let amqp = self.amqp.into_settings()?;
        let redis = self.redis.into_settings()?;
        let api = self.api.into_settings(credentials)?;
        let retry = self.retry.into_settings()?;
        let circuit = self.circuit.into_settings()?;
        let dedup = self.dedup.into_settings()?;
        let shutdown = ShutdownSettings {
            drain_timeout: self.shutdown.drain_timeout,
        };
        let metrics = self.metrics.into_settings()?;
        let log = self.log.into_settings()?;
        let topology = self.topology.into_settings()?;
        for tier in &retry.delays {
            let queue = topology.delay_queue(tier);
            if queue.len() > 255 {
                return Err(ConfigError::new(
                    "topology.work_queue",
                    format!(
                        "delay queue name {queue:?} would exceed 255 bytes; shorten the work queue name"
                    ),
                ));
            }
        }
        Ok(Settings {
            amqp,
            redis,
            api,
            retry,
            circuit,
            dedup,
            shutdown,
            metrics,
            log,
            topology,
        })
    }
}

impl RawCircuit {
    fn into_settings(self) -> Result<CircuitSettings, ConfigError> {
        Ok(CircuitSettings {
            failure_threshold: in_range(
                "circuit.failure_threshold",
                self.failure_threshold,
                1,
                1_000_000,
            )?,
            cooldown: at_least("circuit.cooldown", self.cooldown, Duration::from_millis(10))?,
        })
    }
}

impl RawDedup {
    fn into_settings(self) -> Result<DedupSettings, ConfigError> {
        let dedup = DedupSettings {
            ttl: at_least("dedup.ttl", self.ttl, Duration::from_secs(1))?,
            lease: at_least("dedup.lease", self.lease, Duration::from_millis(100))?,
            verify_unknown: self.verify_unknown,
        };
        if dedup.ttl <= dedup.lease {
            return Err(ConfigError::new(
                "dedup.ttl",
                format!(
                    "{} must be longer than dedup.lease ({})",
                    format_duration(dedup.ttl),
                    format_duration(dedup.lease)
                ),
            ));
        }
        Ok(dedup)
    }
}

impl RawMetrics {
    fn into_settings(self) -> Result<MetricsSettings, ConfigError> {
        let listen = self.listen.trim();
        Ok(MetricsSettings {
            listen: listen.parse().map_err(|_| {
                ConfigError::new(
                    "metrics.listen",
                    format!("{listen:?} is not a socket address (e.g. 127.0.0.1:9464)"),
                )
            })?,
        })
    }
}

impl RawLog {
    fn into_settings(self) -> Result<LogSettings, ConfigError> {
        let level = self.level.trim().to_owned();
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(ConfigError::new(
                "log.level",
                format!(
                    "{level:?} is not a level or filter (e.g. info, debug, group_provisioner=debug)"
                ),
            ));
        }
        Ok(LogSettings {
            format: self.format,
            level,
            queue_lines: in_range("log.queue_lines", self.queue_lines, 1, 1_000_000)?,
        })
    }
}

impl RawAmqp {
    fn into_settings(self) -> Result<AmqpSettings, ConfigError> {
        let mut nodes = Vec::new();
        let count = self.url.len();
        for (i, raw) in self.url.iter().enumerate() {
            let url = list_url(
                "amqp.url",
                i,
                count,
                raw.expose_secret(),
                &["amqp", "amqps"],
            )?;
            if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
                let shown = if count == 1 {
                    format!("{:?}", redact_url(&url))
                } else {
                    format!("entry {} of {count}", i + 1)
                };
                return Err(ConfigError::new(
                    "amqp.url",
                    format!("{shown} is not an AMQP URI: {e}"),
                ));
            }
            nodes.push(SecretUrl::new(url));
        }
        let url = AmqpNodes::new(nodes)
            .ok_or_else(|| ConfigError::new("amqp.url", "at least one broker URL is needed"))?;
        Ok(AmqpSettings {
            url,
            tls: self.tls.into_settings("amqp")?,
            prefetch: in_range("amqp.prefetch", self.prefetch, 1, i64::from(u16::MAX))?,
        })
    }
}

impl RawRedis {
    fn into_settings(self) -> Result<RedisSettings, ConfigError> {
        let redis_url = url(
            "redis.url",
            self.url.expose_secret(),
            &["redis", "rediss", "unix", "redis+unix"],
        )?;
        if let Err(e) = redis::Client::open(redis_url.as_str()) {
            return Err(ConfigError::new(
                "redis.url",
                format!("{:?} is not a Redis URL: {e}", redact_url(&redis_url)),
            ));
        }
        let prefix = self.key_prefix;
        // Keys are also matched by patterns (`KEYS`, `SCAN MATCH` in runbooks): no glob
        // characters, nothing that needs quoting.
        let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/');
        if prefix.is_empty() || prefix.len() > 128 || !prefix.chars().all(safe) {
            return Err(ConfigError::new(
                "redis.key_prefix",
                format!("{prefix:?} must be 1-128 characters of A-Z a-z 0-9 _ - . : /"),
            ));
        }
        let mut nodes = Vec::new();
        let count = self.nodes.len();
        for (i, raw) in self.nodes.iter().enumerate() {
            let node = list_url(
                "redis.nodes",
                i,
                count,
                raw.expose_secret(),
                &["redis", "rediss"],
            )?;
            if let Err(e) = redis::Client::open(node.as_str()) {
                return Err(ConfigError::new(
                    "redis.nodes",
                    format!("{:?} is not a Redis URL: {e}", redact_url(&node)),
                ));
            }
            nodes.push(SecretUrl::new(node));
        }
        let sentinel_master = self
            .sentinel_master
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty());
        match self.mode {
            RedisMode::Standalone => {}
            RedisMode::Sentinel | RedisMode::Cluster if nodes.is_empty() => {
                let what = if self.mode == RedisMode::Sentinel {
                    "the sentinels' addresses (redis://host:26379)"
                } else {
                    "one or more cluster nodes (redis://host:port)"
                };
                return Err(ConfigError::new(
                    "redis.nodes",
                    format!("is required with this redis.mode: list {what}"),
                ));
            }
            RedisMode::Sentinel if sentinel_master.is_none() => {
                return Err(ConfigError::new(
                    "redis.sentinel_master",
                    "is required with redis.mode = \"sentinel\": the master's name at the sentinels",
                ));
            }
            RedisMode::Sentinel | RedisMode::Cluster => {}
        }
        Ok(RedisSettings {
            url: SecretUrl::new(redis_url),
            mode: self.mode,
            nodes,
            sentinel_master,
            key_prefix: prefix,
            tls: self.tls.into_settings("redis")?,
        })
    }
}

impl RawApi {
    fn into_settings(self, credentials: Credentials) -> Result<ApiSettings, ConfigError> {
        let base_url = api_url("api.base_url", &self.base_url)?;
        let auth_url = api_url("api.auth_url", &self.auth_url)?;
        let timeout = at_least("api.timeout", self.timeout, Duration::from_millis(1))?;
        let auth = ApiAuth::from_raw(
            self.auth,
            trimmed_secret(self.token),
            nonempty(self.email),
            nonempty_secret(self.password),
        );
        let auth = match credentials {
            Credentials::Required => Some(auth?),
            Credentials::Optional => auth.ok(),
        };
        Ok(ApiSettings {
            base_url,
            auth,
            auth_url,
            timeout,
        })
    }
}

impl RawRetry {
    fn into_settings(self) -> Result<RetrySettings, ConfigError> {
        let initial = at_least("retry.initial", self.initial, Duration::from_millis(1))?;
        let multiplier = self.multiplier;
        if !(multiplier.is_finite() && (1.0..=10.0).contains(&multiplier)) {
            return Err(ConfigError::new(
                "retry.multiplier",
                format!("{multiplier} is not a number between 1 and 10"),
            ));
        }
        let max_interval = at_least(
            "retry.max_interval",
            self.max_interval,
            Duration::from_millis(1),
        )?;
        if max_interval < initial {
            return Err(ConfigError::new(
                "retry.max_interval",
                format!(
                    "{} is shorter than retry.initial ({})",
                    format_duration(max_interval),
                    format_duration(initial)
                ),
            ));
        }
        let mut delays: Vec<DelayTier> = Vec::with_capacity(self.delays.len());
        for tier in self.delays {
            if tier.delay.is_zero() {
                return Err(ConfigError::new(
                    "retry.delays",
                    format!("{:?}: a delay tier must be longer than 0", tier.label),
                ));
            }
            if tier.delay.as_millis() > u128::from(u32::MAX) {
                return Err(ConfigError::new(
                    "retry.delays",
                    format!(
                        "{:?} is longer than RabbitMQ accepts as a queue TTL (4294967295 ms, about 49 days)",
                        tier.label
                    ),
                ));
            }
            if delays.iter().any(|t| t.label == tier.label) {
                return Err(ConfigError::new(
                    "retry.delays",
                    format!("{:?} appears twice", tier.label),
                ));
            }
            delays.push(tier);
        }
        if delays.is_empty() {
            return Err(ConfigError::new(
                "retry.delays",
                "needs at least one delay tier",
            ));
        }
        Ok(RetrySettings {
            initial,
            multiplier,
            max_interval,
            max_tries: in_range("retry.max_tries", self.max_tries, 1, 100)?,
            max_retry_after: self.max_retry_after,
            delays,
        })
    }
}

impl RawTopology {
    fn into_settings(self) -> Result<TopologySettings, ConfigError> {
        Ok(TopologySettings {
            command_exchange: name("topology.command_exchange", &self.command_exchange)?,
            command_routing_key: name("topology.command_routing_key", &self.command_routing_key)?,
            work_queue: name("topology.work_queue", &self.work_queue)?,
            dead_letter_exchange: name(
                "topology.dead_letter_exchange",
                &self.dead_letter_exchange,
            )?,
            // Room for the names the tools derive: `<dlq>.migrating`, `<queue>.lock`.
            dead_letter_queue: with_room(
                name("topology.dead_letter_queue", &self.dead_letter_queue)?,
                "topology.dead_letter_queue",
                ".migrating",
            )?,
            event_exchange: name("topology.event_exchange", &self.event_exchange)?,
            unrouted_events: with_room(
                name("topology.unrouted_events", &self.unrouted_events)?,
                "topology.unrouted_events",
                ".lock",
            )?,
            created_routing_key: name("topology.created_routing_key", &self.created_routing_key)?,
            failed_routing_key: name("topology.failed_routing_key", &self.failed_routing_key)?,
            delivery_limit: in_range("topology.delivery_limit", self.delivery_limit, 1, 1_000_000)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typo_hints() {
        let known: Vec<String> = ["delays", "initial", "max_tries"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(closest("delay", &known).as_deref(), Some("delays"));
        assert_eq!(closest("intial", &known).as_deref(), Some("initial"));
        assert_eq!(closest("max_trise", &known).as_deref(), Some("max_tries"));
        assert_eq!(closest("colour", &known), None);
        assert!(one_edit_apart("prefetch", "perfetch"));
        assert!(!one_edit_apart("prefetch", "prefix"));
    }
}

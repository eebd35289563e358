//! Configuration: built-in defaults → TOML file → `PROVISIONER__SECTION__KEY` environment,
//! layered by the `config` crate and read with serde into [`Settings`].
//!
//! Invariants:
//! - the built-in defaults are `config/example.toml`, compiled in: the documented file
//!   *is* the default layer, so the two cannot drift, and the README table is checked
//!   against it;
//! - every section denies unknown fields: a typo is an error naming the dotted key (with a
//!   "did you mean" hint), never a silent fall-back to a default;
//! - a bad value is a [`ConfigError`] `config error: <key>: <reason>` that quotes the value
//!   (URLs with their password masked, secrets never) and start-up stops with exit code 2;
//! - what cannot be represented is not: API credentials are an [`ApiAuth`] (a login always
//!   has an email and a password), durations are `Duration`s, delay tiers keep their label;
//! - tokens and passwords are `SecretString`s, URLs `SecretUrl`s.

mod check;
mod de;
mod duration;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::config::{Config, Environment, File, FileFormat, Map, Source, Value, ValueKind};
use serde::Deserialize;

pub use duration::{format_duration, parse_duration};

use crate::secret::{SecretString, SecretUrl};

/// Where the file layer comes from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/default.toml";
/// Environment prefix; `PROVISIONER__API__TOKEN` sets `api.token`.
pub const ENV_PREFIX: &str = "PROVISIONER";
/// The built-in defaults: every key that has one, at its default.
pub const DEFAULTS_TOML: &str = include_str!("../../config/example.toml");
/// Keys that exist but have no default (credentials; which are required depends on
/// `api.auth`).
pub const KEYS_WITHOUT_DEFAULT: [&str; 15] = [
    "amqp.management_url",
    "redis.nodes",
    "redis.sentinel_master",
    "api.token",
    "api.email",
    "api.password",
    "amqp.tls.ca_file",
    "amqp.tls.cert_file",
    "amqp.tls.key_file",
    "redis.tls.ca_file",
    "redis.tls.cert_file",
    "redis.tls.key_file",
    "console.public_url",
    "console.operator_password",
    "console.viewer_password",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config error: {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The whole configuration. Deserialized straight from the merged layers: each value is
/// read and range-checked by its adapter in [`de`] (so an error carries the value's dotted
/// key), then the rules that tie keys together run in `check::finish`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub redis: RedisSettings,
    pub api: ApiSettings,
    pub retry: RetrySettings,
    pub circuit: CircuitSettings,
    pub dedup: DedupSettings,
    pub shutdown: ShutdownSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
    pub topology: TopologySettings,
    pub console: ConsoleSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    #[serde(deserialize_with = "de::amqp_nodes")]
    pub url: AmqpNodes,
    #[serde(deserialize_with = "de::ranged::<_, u16, 1, 65535>")]
    pub prefetch: u16,
    /// How long a publish waits for the broker's confirm before it counts as refused: a
    /// broker that holds confirms (a queue without a quorum, a memory alarm) must not hold
    /// every delivery with them, silently.
    #[serde(deserialize_with = "de::duration_min::<_, 100>")]
    pub confirm_timeout: Duration,
    /// Used by `amqps://` nodes.
    #[serde(default)]
    pub tls: TlsSettings,
    /// Where `topology.declare = "verify"` reads the topology (RabbitMQ's management API);
    /// unset: the connected node's host, port 15672 (15671 for `amqps`).
    #[serde(default, deserialize_with = "de::management_url")]
    pub management_url: Option<String>,
}

/// `<section>.tls.*`: a private CA (trusted beside the system's roots) and a client
/// certificate for mutual TLS, read and checked at start so a bad file stops start-up
/// with the key's name (the files are named by the configuration; their contents are
/// filled in by `check::finish`).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    /// PEM, one or more certificates.
    #[serde(skip)]
    pub ca_pem: Option<Vec<u8>>,
    #[serde(skip)]
    pub client: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, both PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: secrecy::SecretSlice<u8>,
}

impl RedisSettings {
    /// Where the store is, passwords masked: for `check` and the start-up line.
    pub fn describe(&self) -> String {
        let nodes = || joined(&self.nodes);
        match self.mode {
            RedisMode::Standalone => self.url.to_string(),
            RedisMode::Sentinel => format!(
                "master {:?} via sentinels {}",
                self.sentinel_master.as_deref().unwrap_or_default(),
                nodes()
            ),
            RedisMode::Cluster => format!("cluster via {}", nodes()),
        }
    }
}

impl TlsSettings {
    /// How connections to `urls` are protected, for `check` and the start-up line;
    /// `scheme` is the TLS scheme (`amqps`, `rediss`).
    pub fn state<'a>(&self, scheme: &str, urls: impl IntoIterator<Item = &'a str>) -> String {
        let prefix = format!("{scheme}://");
        let (tls, plain): (Vec<&str>, Vec<&str>) =
            urls.into_iter().partition(|u| u.starts_with(&prefix));
        match (tls.len(), plain.len()) {
            (0, _) if self.is_default() => "no TLS".to_owned(),
            (0, _) => format!("no TLS ({scheme}:// is needed for the TLS files to be used)"),
            (_, 0) => format!("TLS: {}", self.describe()),
            _ => format!("TLS on the {scheme}:// nodes only: {}", self.describe()),
        }
    }

    /// Nothing configured: the system's roots, no client certificate.
    pub fn is_default(&self) -> bool {
        self.ca_pem.is_none() && self.client.is_none()
    }

    /// What `check` and the start-up line show: the files, never their contents.
    pub fn describe(&self) -> String {
        let ca = self.ca_file.as_ref().map_or_else(
            || "system CAs".to_owned(),
            |f| format!("CA {}", f.display()),
        );
        match (&self.client, &self.cert_file) {
            (Some(_), Some(file)) => format!("{ca}, client certificate {}", file.display()),
            _ => ca,
        }
    }
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// `amqp.url`: one broker, or the nodes of one cluster, tried in turn. Never empty.
#[derive(Debug, Clone)]
pub struct AmqpNodes(Vec<SecretUrl>);

impl AmqpNodes {
    /// `None` when `urls` is empty.
    pub fn new(urls: Vec<SecretUrl>) -> Option<AmqpNodes> {
        (!urls.is_empty()).then_some(AmqpNodes(urls))
    }

    pub fn urls(&self) -> &[SecretUrl] {
        &self.0
    }

    /// The first node (the only one, for most deployments).
    pub fn first(&self) -> &SecretUrl {
        &self.0[0]
    }
}

/// Each node with its password masked, comma-separated.
impl std::fmt::Display for AmqpNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&joined(&self.0))
    }
}

/// URLs (passwords masked), comma-separated.
fn joined(urls: &[SecretUrl]) -> String {
    urls.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `redis.mode`: how the store reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// One server (`redis.url`), or a managed endpoint that fails over behind one address.
    Standalone,
    /// The master that the sentinels of `redis.nodes` name `redis.sentinel_master`.
    Sentinel,
    /// A Redis Cluster, found from the seed nodes `redis.nodes`.
    Cluster,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    #[serde(deserialize_with = "de::redis_url")]
    pub url: SecretUrl,
    pub mode: RedisMode,
    /// Sentinel addresses or cluster seed nodes; empty in standalone mode.
    #[serde(default, deserialize_with = "de::redis_nodes")]
    pub nodes: Vec<SecretUrl>,
    /// The master's name at the sentinels (sentinel mode).
    #[serde(default, deserialize_with = "de::nonempty")]
    pub sentinel_master: Option<String>,
    #[serde(deserialize_with = "de::key_prefix")]
    pub key_prefix: String,
    /// Used by `rediss://` URLs.
    #[serde(default)]
    pub tls: TlsSettings,
}

/// `api.auth` as written in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Token,
    Login,
}

/// How the worker authenticates to the API (`api.auth` with its credentials).
#[derive(Debug, Clone)]
pub enum ApiAuth {
    /// A static bearer token.
    Token(SecretString),
    /// An admin user's email and password; the session is shared through Redis.
    Login {
        email: String,
        password: SecretString,
    },
}

impl ApiAuth {
    pub fn mode(&self) -> AuthMode {
        match self {
            ApiAuth::Token(_) => AuthMode::Token,
            ApiAuth::Login { .. } => AuthMode::Login,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Always without a trailing slash, e.g. `https://platform-api.convirza.com/v3`.
    #[serde(deserialize_with = "de::api_url")]
    pub base_url: String,
    /// `None` only when loaded for a command that never calls the API
    /// ([`Settings::load_without_credentials`]). Made by `check::finish` from `api.auth`
    /// and the credentials below, which it takes.
    #[serde(skip)]
    pub auth: Option<ApiAuth>,
    #[serde(rename = "auth")]
    mode: AuthMode,
    #[serde(default, deserialize_with = "de::token")]
    token: Option<SecretString>,
    #[serde(default, deserialize_with = "de::nonempty")]
    email: Option<String>,
    #[serde(default, deserialize_with = "de::password")]
    password: Option<SecretString>,
    #[serde(deserialize_with = "de::api_url")]
    pub auth_url: String,
    #[serde(deserialize_with = "de::duration_min::<_, 1>")]
    pub timeout: Duration,
}

impl ApiSettings {
    /// What this configuration would send in clear over the network: the credentials go
    /// to an `http://` URL of a host that is not this machine. One warning per URL.
    pub fn cleartext_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if is_remote_http(&self.base_url) {
            out.push(format!(
                "api.base_url {} is http:// to another host: the bearer token is sent in clear (use https://)",
                self.base_url
            ));
        }
        if matches!(self.auth, Some(ApiAuth::Login { .. })) && is_remote_http(&self.auth_url) {
            out.push(format!(
                "api.auth_url {} is http:// to another host: the password is sent in clear (use https://)",
                self.auth_url
            ));
        }
        out
    }
}

fn is_remote_http(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let host = u.host_str().unwrap_or("localhost");
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    u.scheme() == "http" && !loopback
}

/// One delay tier: the label exactly as configured (it names the queue) and its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayTier {
    pub label: String,
    pub delay: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(deserialize_with = "de::duration_min::<_, 1>")]
    pub initial: Duration,
    #[serde(deserialize_with = "de::multiplier")]
    pub multiplier: f64,
    #[serde(deserialize_with = "de::duration_min::<_, 1>")]
    pub max_interval: Duration,
    #[serde(deserialize_with = "de::ranged::<_, u32, 1, 100>")]
    pub max_tries: u32,
    /// Upper bound applied to a server's `Retry-After`, so a hostile or buggy header cannot
    /// park the worker for hours.
    #[serde(deserialize_with = "de::duration")]
    pub max_retry_after: Duration,
    #[serde(deserialize_with = "de::delays")]
    pub delays: Vec<DelayTier>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitSettings {
    #[serde(deserialize_with = "de::ranged::<_, u32, 1, 1_000_000>")]
    pub failure_threshold: u32,
    #[serde(deserialize_with = "de::duration_min::<_, 10>")]
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupSettings {
    #[serde(deserialize_with = "de::duration_min::<_, 1000>")]
    pub ttl: Duration,
    #[serde(deserialize_with = "de::duration_min::<_, 100>")]
    pub lease: Duration,
    /// Before the first POST of an ext id the store knows nothing of, look for it among
    /// all of the parent's children (for deployments that cannot trust Redis to keep data).
    #[serde(deserialize_with = "de::boolean")]
    pub verify_unknown: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    #[serde(deserialize_with = "de::duration")]
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    #[serde(deserialize_with = "de::socket_addr")]
    pub listen: SocketAddr,
}

/// `group-provisioner console`: the DLQ web console. Who may log in is a user name and a
/// password per role; a role without a password has no user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    #[serde(deserialize_with = "de::socket_addr")]
    pub listen: SocketAddr,
    /// Where people reach it, when that is not `listen` (a TLS proxy): its pages are
    /// served to that host too, forms posted from that origin are accepted, and with
    /// `https` the session cookie is `Secure`. `scheme://host[:port]`.
    #[serde(default, deserialize_with = "de::public_url")]
    pub public_url: Option<String>,
    /// A login lasts this long, then the console asks again.
    #[serde(deserialize_with = "de::duration_min::<_, 1000>")]
    pub session_ttl: Duration,
    /// Where a discard from the console writes its export (created, owner-only, at start).
    pub export_dir: PathBuf,
    #[serde(deserialize_with = "de::user_name")]
    pub operator_user: String,
    #[serde(default, deserialize_with = "de::console_password")]
    pub operator_password: Option<SecretString>,
    #[serde(deserialize_with = "de::user_name")]
    pub viewer_user: String,
    #[serde(default, deserialize_with = "de::console_password")]
    pub viewer_password: Option<SecretString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    #[serde(deserialize_with = "de::log_level")]
    pub level: String,
    /// Lines held for a slow stdout before lines are dropped.
    #[serde(deserialize_with = "de::ranged::<_, usize, 1, 1_000_000>")]
    pub queue_lines: usize,
}

/// AMQP names, 1–255 bytes without control characters ([`de::name`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySettings {
    #[serde(deserialize_with = "de::name")]
    pub command_exchange: String,
    #[serde(deserialize_with = "de::name")]
    pub command_routing_key: String,
    #[serde(deserialize_with = "de::name")]
    pub work_queue: String,
    #[serde(deserialize_with = "de::name")]
    pub dead_letter_exchange: String,
    #[serde(deserialize_with = "de::name")]
    pub dead_letter_queue: String,
    #[serde(deserialize_with = "de::name")]
    pub event_exchange: String,
    /// The event exchange's alternate exchange (fanout) and the quorum queue behind it,
    /// one name for both: events no queue is bound for are kept there.
    #[serde(deserialize_with = "de::name")]
    pub unrouted_events: String,
    #[serde(deserialize_with = "de::name")]
    pub created_routing_key: String,
    #[serde(deserialize_with = "de::name")]
    pub failed_routing_key: String,
    /// Quorum `x-delivery-limit` of the work queue: deliveries the broker allows before it
    /// dead-letters a message on its own (the crash-loop guard).
    #[serde(deserialize_with = "de::ranged::<_, u32, 1, 1_000_000>")]
    pub delivery_limit: u32,
    /// Whether the worker declares the topology or only verifies it.
    pub declare: Declare,
}

/// `topology.declare`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declare {
    /// Declare everything (idempotent); where the broker refuses for want of `configure`,
    /// verify instead.
    All,
    /// Never declare: verify that what ops declared is what the worker relies on.
    Verify,
}

impl TopologySettings {
    /// `provisioning.group.create.retry.5s` for the tier labelled `5s`.
    pub fn delay_queue(&self, tier: &DelayTier) -> String {
        format!("{}.retry.{}", self.work_queue, tier.label)
    }
}

/// Whether the API credentials must be present (`run`, `check`) or may be absent (operator
/// commands that never call the API).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Credentials {
    #[default]
    Required,
    Optional,
}

/// Where configuration comes from. Tests pass an explicit environment map instead of
/// mutating the process environment, so they can run in parallel.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// Explicit `--config` path; a missing file is then an error.
    pub file: Option<PathBuf>,
    /// Inline TOML (tests).
    pub toml: Option<String>,
    /// `None` reads the process environment.
    pub env: Option<HashMap<String, String>>,
    pub credentials: Credentials,
}

impl Settings {
    /// Load from `--config PATH` (or `config/default.toml` if present) and the process
    /// environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Settings::load_with(file, Credentials::Required)
    }

    /// As [`Settings::load`], without requiring API credentials (for commands that never
    /// call the API).
    pub fn load_without_credentials(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Settings::load_with(file, Credentials::Optional)
    }

    fn load_with(file: Option<&Path>, credentials: Credentials) -> Result<Settings, ConfigError> {
        let file = file.map(Path::to_path_buf);
        Settings::from_sources(Sources {
            file,
            credentials,
            ..Sources::default()
        })
    }

    /// Defaults plus an inline TOML document, without reading the process environment.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_sources(Sources {
            toml: Some(text.to_owned()),
            env: Some(HashMap::new()),
            ..Sources::default()
        })
    }

    pub fn from_sources(sources: Sources) -> Result<Settings, ConfigError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULTS_TOML, FileFormat::Toml));
        match &sources.file {
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError::new(
                        "--config",
                        format!("{}: no such file", path.display()),
                    ));
                }
                builder = builder.add_source(LowercaseKeys(
                    File::from(path.as_path()).format(FileFormat::Toml),
                ));
            }
            None if sources.toml.is_none() => {
                builder = builder.add_source(LowercaseKeys(
                    File::new(DEFAULT_CONFIG_PATH, FileFormat::Toml).required(false),
                ));
            }
            None => {}
        }
        if let Some(text) = &sources.toml {
            builder = builder.add_source(LowercaseKeys(File::from_str(text, FileFormat::Toml)));
        }
        let env = match sources.env.clone() {
            Some(map) => map,
            None => process_env()?,
        };
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        let merged = builder.build().map_err(|e| {
            let origin = sources
                .file
                .as_ref()
                .map_or_else(|| "--config".to_owned(), |p| p.display().to_string());
            ConfigError::new(origin, parse_error_without_text(&e))
        })?;
        check::check_keys(&merged)?;
        let settings: Settings =
            serde_path_to_error::deserialize(merged).map_err(check::key_error)?;
        settings.finish(sources.credentials)
    }
}

/// The `PROVISIONER__…` variables of the process. A value that is not UTF-8 is an error
/// naming the key, never showing the value (it may be a password).
fn process_env() -> Result<HashMap<String, String>, ConfigError> {
    let prefix = format!("{ENV_PREFIX}__");
    let mut out = HashMap::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with(&prefix)) else {
            continue;
        };
        let Some(value) = value.to_str() else {
            let key = name[prefix.len()..].to_lowercase().replace("__", ".");
            return Err(ConfigError::new(
                key,
                format!("{name} is not valid UTF-8 (its value is not shown)"),
            ));
        };
        out.insert(name.to_owned(), value.to_owned());
    }
    Ok(out)
}

/// A file that does not parse, said in one line without quoting the file: the line that
/// failed may hold a token. TOML errors come as "TOML parse error at line L, column C",
/// an excerpt, and the reason; only the first and the last are kept.
fn parse_error_without_text(e: &::config::ConfigError) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    match (lines.first(), lines.last()) {
        (Some(first), Some(last)) if lines.len() > 1 && first.contains("parse error") => {
            let reason = last.split(" in ").next().unwrap_or(last);
            format!("{first}: {reason}")
        }
        _ => {
            // Not a TOML excerpt: still one line, never more than the message's first.
            lines.first().map_or_else(String::new, |l| (*l).to_owned())
        }
    }
}

/// A file layer whose keys are case-insensitive (`[API]` is `[api]`), as the environment's
/// are: lowercased before they are merged over the defaults.
#[derive(Debug, Clone)]
struct LowercaseKeys<S>(S);

impl<S: Source + Clone + Send + Sync + 'static> Source for LowercaseKeys<S> {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, ::config::ConfigError> {
        Ok(self
            .0
            .collect()?
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), lowercase_keys(v)))
            .collect())
    }
}

fn lowercase_keys(value: Value) -> Value {
    let origin = value.origin().map(str::to_owned);
    let kind = match value.kind {
        ValueKind::Table(table) => ValueKind::Table(
            table
                .into_iter()
                .map(|(k, v)| (k.to_lowercase(), lowercase_keys(v)))
                .collect(),
        ),
        other => other,
    };
    Value::new(origin.as_ref(), kind)
}

/// Every key that has a default, with the default as the README writes it (`5s`, `64`,
/// `["5s","30s"]`), sorted by key.
pub fn defaults() -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Ok(cfg) = Config::builder()
        .add_source(File::from_str(DEFAULTS_TOML, FileFormat::Toml))
        .build()
    {
        flatten("", &cfg.cache, &mut out);
    }
    out.sort();
    out
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match &value.kind {
        ValueKind::Table(table) => {
            for (k, v) in table {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        ValueKind::Array(items) => {
            let texts: Vec<String> = items
                .iter()
                .map(|i| format!("{:?}", i.to_string()))
                .collect();
            out.push((prefix.to_owned(), format!("[{}]", texts.join(","))));
        }
        _ => out.push((prefix.to_owned(), value.to_string())),
    }
}

#[cfg(test)]
mod tests;

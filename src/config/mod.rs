//! Configuration: built-in defaults → TOML file → `PROVISIONER__SECTION__KEY` environment.
//!
//! Invariants:
//! - every key of SPEC §9 exists with its documented default;
//! - a bad value or an unknown key is a [`ConfigError`] that names the dotted key and the
//!   offending value, and start-up stops (exit code 2) — a typo never silently falls back
//!   to a default;
//! - secrets are held as [`Secret`]/[`SecretUrl`] and never printed.

mod duration;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::config::{Config, Environment, File, FileFormat, Value, ValueKind};

pub use duration::{format_duration, parse_duration};

use crate::secret::{Secret, SecretUrl};

/// Where the file layer comes from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/default.toml";
/// Environment prefix; `PROVISIONER__API__TOKEN` sets `api.token`.
pub const ENV_PREFIX: &str = "PROVISIONER";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config error: {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone)]
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
}

#[derive(Debug, Clone)]
pub struct AmqpSettings {
    pub url: SecretUrl,
    pub prefetch: u16,
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: SecretUrl,
    pub key_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Token,
    Login,
}

#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Always without a trailing slash, e.g. `https://platform-api.convirza.com/v3`.
    pub base_url: String,
    pub auth: AuthMode,
    pub token: Option<Secret>,
    pub email: Option<String>,
    pub password: Option<Secret>,
    pub auth_url: String,
    pub timeout: Duration,
}

/// One delay tier: the label exactly as configured (it names the queue) and its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayTier {
    pub label: String,
    pub delay: Duration,
}

#[derive(Debug, Clone)]
pub struct RetrySettings {
    pub initial: Duration,
    pub multiplier: f64,
    pub max_interval: Duration,
    pub max_tries: u32,
    /// Upper bound applied to a server's `Retry-After`, so a hostile or buggy header cannot
    /// park the worker for hours.
    pub max_retry_after: Duration,
    pub delays: Vec<DelayTier>,
}

#[derive(Debug, Clone)]
pub struct CircuitSettings {
    pub failure_threshold: u32,
    pub cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct DedupSettings {
    pub ttl: Duration,
    pub lease: Duration,
}

#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologySettings {
    pub command_exchange: String,
    pub command_routing_key: String,
    pub work_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub event_exchange: String,
    pub created_routing_key: String,
    pub failed_routing_key: String,
    /// Quorum `x-delivery-limit` of the work queue: deliveries the broker allows before it
    /// dead-letters a message on its own (the crash-loop guard of SPEC §5.8).
    pub delivery_limit: u32,
}

impl TopologySettings {
    /// `provisioning.group.create.retry.5s` for the tier labelled `5s`.
    pub fn delay_queue(&self, tier: &DelayTier) -> String {
        format!("{}.retry.{}", self.work_queue, tier.label)
    }
}

impl Default for TopologySettings {
    fn default() -> Self {
        TopologySettings {
            command_exchange: "provisioning".into(),
            command_routing_key: "group.create".into(),
            work_queue: "provisioning.group.create".into(),
            dead_letter_exchange: "provisioning.dlx".into(),
            dead_letter_queue: "provisioning.group.create.dlq".into(),
            event_exchange: "provisioning.events".into(),
            created_routing_key: "group.created".into(),
            failed_routing_key: "group.create.failed".into(),
            delivery_limit: 10,
        }
    }
}

/// Every key with its default, in the order the README documents them. `None` means the
/// key has no default (it is optional or required depending on other keys).
pub const KEYS: &[(&str, Option<&str>)] = &[
    ("amqp.url", Some("amqp://guest:guest@127.0.0.1:5672/%2f")),
    ("amqp.prefetch", Some("64")),
    ("redis.url", Some("redis://127.0.0.1:6379/0")),
    ("redis.key_prefix", Some("provisioner")),
    ("api.base_url", Some("https://platform-api.convirza.com/v3")),
    ("api.auth", Some("token")),
    ("api.token", None),
    ("api.email", None),
    ("api.password", None),
    ("api.auth_url", Some("https://platform-oauth.convirza.com")),
    ("api.timeout", Some("15s")),
    ("retry.initial", Some("250ms")),
    ("retry.multiplier", Some("2")),
    ("retry.max_interval", Some("10s")),
    ("retry.max_tries", Some("4")),
    ("retry.max_retry_after", Some("2m")),
    ("retry.delays", Some("5s,30s,2m,10m,30m")),
    ("circuit.failure_threshold", Some("10")),
    ("circuit.cooldown", Some("30s")),
    ("dedup.ttl", Some("30d")),
    ("dedup.lease", Some("60s")),
    ("shutdown.drain_timeout", Some("30s")),
    ("metrics.listen", Some("127.0.0.1:9464")),
    ("log.format", Some("json")),
    ("log.level", Some("info")),
    ("topology.command_exchange", Some("provisioning")),
    ("topology.command_routing_key", Some("group.create")),
    ("topology.work_queue", Some("provisioning.group.create")),
    ("topology.dead_letter_exchange", Some("provisioning.dlx")),
    (
        "topology.dead_letter_queue",
        Some("provisioning.group.create.dlq"),
    ),
    ("topology.event_exchange", Some("provisioning.events")),
    ("topology.created_routing_key", Some("group.created")),
    ("topology.failed_routing_key", Some("group.create.failed")),
    ("topology.delivery_limit", Some("10")),
];

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
    /// Operator commands that never call the API (`dlq`, `send`, `status`) do not need
    /// `api.token` / `api.email` / `api.password`.
    pub credentials_optional: bool,
}

impl Settings {
    /// Load from `--config PATH` (or `config/default.toml` if present) and the process
    /// environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Settings::from_sources(Sources {
            file: file.map(Path::to_path_buf),
            ..Sources::default()
        })
    }

    /// As [`Settings::load`], without requiring API credentials (for commands that never
    /// call the API).
    pub fn load_without_credentials(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Settings::from_sources(Sources {
            file: file.map(Path::to_path_buf),
            credentials_optional: true,
            ..Sources::default()
        })
    }

    pub fn from_sources(sources: Sources) -> Result<Settings, ConfigError> {
        let mut builder = Config::builder();
        match &sources.file {
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError::new(
                        "--config",
                        format!("{}: no such file", path.display()),
                    ));
                }
                builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
            }
            None if sources.toml.is_none() => {
                builder = builder
                    .add_source(File::new(DEFAULT_CONFIG_PATH, FileFormat::Toml).required(false));
            }
            None => {}
        }
        if let Some(text) = &sources.toml {
            builder = builder.add_source(File::from_str(text, FileFormat::Toml));
        }
        let env = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .source(sources.env.clone());
        builder = builder.add_source(env);
        let cfg = builder.build().map_err(|e| {
            let origin = sources
                .file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "--config".into());
            ConfigError::new(origin, e.to_string())
        })?;

        let mut flat = BTreeMap::new();
        flatten("", cfg.cache, &mut flat)?;
        let mut r = Reader {
            values: flat,
            credentials_optional: sources.credentials_optional,
        };
        let settings = r.settings()?;
        if let Some(unknown) = r.values.keys().next() {
            let hint = closest_key(unknown)
                .map(|k| format!(" (did you mean {k}?)"))
                .unwrap_or_default();
            return Err(ConfigError::new(
                unknown.clone(),
                format!("unknown key{hint}"),
            ));
        }
        Ok(settings)
    }

    /// Defaults plus an inline TOML document, without reading the process environment.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_sources(Sources {
            toml: Some(text.to_owned()),
            env: Some(HashMap::new()),
            ..Sources::default()
        })
    }
}

fn closest_key(unknown: &str) -> Option<&'static str> {
    let (section, leaf) = unknown.rsplit_once('.').unwrap_or(("", unknown));
    KEYS.iter().map(|(k, _)| *k).find(|k| {
        let (ks, kl) = k.rsplit_once('.').unwrap_or(("", k));
        (ks == section && (kl.starts_with(leaf) || leaf.starts_with(kl))) || kl == leaf
    })
}

fn flatten(
    prefix: &str,
    value: Value,
    out: &mut BTreeMap<String, Value>,
) -> Result<(), ConfigError> {
    match value.kind {
        ValueKind::Table(table) => {
            for (k, v) in table {
                let key = if prefix.is_empty() {
                    k.to_lowercase()
                } else {
                    format!("{prefix}.{}", k.to_lowercase())
                };
                // A whole section given as a scalar (e.g. `retry = 5`) is a mistake too.
                if matches!(v.kind, ValueKind::Table(_)) && key.contains('.') {
                    return Err(ConfigError::new(
                        key,
                        "unknown key (nested tables are not used)",
                    ));
                }
                flatten(&key, v, out)?;
            }
            Ok(())
        }
        _ => {
            out.insert(prefix.to_owned(), value);
            Ok(())
        }
    }
}

/// Takes keys out of the flattened configuration; whatever is left at the end is unknown.
struct Reader {
    values: BTreeMap<String, Value>,
    credentials_optional: bool,
}

fn default_of(key: &str) -> Option<&'static str> {
    KEYS.iter().find(|(k, _)| *k == key).and_then(|(_, d)| *d)
}

impl Reader {
    /// The raw text of a scalar key, or its default.
    fn text(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.values.remove(key) {
            None => Ok(default_of(key).map(str::to_owned)),
            Some(v) => scalar_text(key, v).map(Some),
        }
    }

    fn required_text(&mut self, key: &str) -> Result<String, ConfigError> {
        self.text(key)?
            .ok_or_else(|| ConfigError::new(key, "is required"))
    }

    fn name(&mut self, key: &str) -> Result<String, ConfigError> {
        let v = self.required_text(key)?;
        let trimmed = v.trim();
        if trimmed.is_empty() {
            return Err(ConfigError::new(key, "must not be empty"));
        }
        if trimmed.len() > 255 || trimmed.chars().any(|c| c.is_control()) {
            return Err(ConfigError::new(
                key,
                format!("{v:?} is not a valid AMQP name (1-255 bytes, no control characters)"),
            ));
        }
        Ok(trimmed.to_owned())
    }

    fn duration(&mut self, key: &str, min: Duration) -> Result<Duration, ConfigError> {
        let v = self.required_text(key)?;
        let d = parse_duration(&v).ok_or_else(|| {
            ConfigError::new(
                key,
                format!("{v:?} is not a duration (use e.g. 250ms, 5s, 2m, 1h, 30d)"),
            )
        })?;
        if d < min {
            return Err(ConfigError::new(
                key,
                format!("{v:?} is too short (minimum {})", format_duration(min)),
            ));
        }
        Ok(d)
    }

    fn integer<T: TryFrom<i64>>(
        &mut self,
        key: &str,
        min: i64,
        max: i64,
    ) -> Result<T, ConfigError> {
        let v = self.required_text(key)?;
        let n: i64 = v
            .trim()
            .parse()
            .map_err(|_| ConfigError::new(key, format!("{v:?} is not an integer")))?;
        if n < min || n > max {
            return Err(ConfigError::new(
                key,
                format!("{n} is out of range ({min}..={max})"),
            ));
        }
        T::try_from(n).map_err(|_| ConfigError::new(key, format!("{n} is out of range")))
    }

    fn url(&mut self, key: &str, schemes: &[&str]) -> Result<String, ConfigError> {
        let v = self.required_text(key)?;
        let v = v.trim().to_owned();
        let scheme = v.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme {
            Some(s) if schemes.contains(&s.as_str()) => {}
            _ => {
                let shown = SecretUrl::new(v.clone()).redacted();
                return Err(ConfigError::new(
                    key,
                    format!(
                        "{shown:?} is not a URL with scheme {}",
                        schemes.join(" or ")
                    ),
                ));
            }
        }
        if let Err(e) = reqwest::Url::parse(&v) {
            let shown = SecretUrl::new(v.clone()).redacted();
            return Err(ConfigError::new(
                key,
                format!("{shown:?} is not a valid URL: {e}"),
            ));
        }
        Ok(v)
    }

    fn optional_nonempty(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        Ok(self
            .text(key)?
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()))
    }

    fn delays(&mut self, key: &str) -> Result<Vec<DelayTier>, ConfigError> {
        let labels: Vec<String> = match self.values.remove(key) {
            None => default_of(key)
                .unwrap_or_default()
                .split(',')
                .map(str::to_owned)
                .collect(),
            Some(v) => match v.kind {
                ValueKind::Array(items) => items
                    .into_iter()
                    .map(|item| scalar_text(key, item))
                    .collect::<Result<_, _>>()?,
                _ => scalar_text(key, v)?.split(',').map(str::to_owned).collect(),
            },
        };
        let mut tiers: Vec<DelayTier> = Vec::new();
        for raw in labels {
            let label = raw.trim().to_owned();
            let delay = parse_duration(&label).ok_or_else(|| {
                ConfigError::new(key, format!("{raw:?} is not a duration (use e.g. 5s, 2m)"))
            })?;
            if delay.is_zero() {
                return Err(ConfigError::new(
                    key,
                    format!("{raw:?}: a delay tier must be longer than 0"),
                ));
            }
            if tiers.iter().any(|t| t.label == label) {
                return Err(ConfigError::new(key, format!("{label:?} appears twice")));
            }
            tiers.push(DelayTier { label, delay });
        }
        if tiers.is_empty() {
            return Err(ConfigError::new(key, "needs at least one delay tier"));
        }
        Ok(tiers)
    }

    fn settings(&mut self) -> Result<Settings, ConfigError> {
        let amqp = AmqpSettings {
            url: SecretUrl::new(self.url("amqp.url", &["amqp", "amqps"]).and_then(|u| {
                u.parse::<lapin::uri::AMQPUri>()
                    .map(|_| u.clone())
                    .map_err(|e| {
                        ConfigError::new(
                            "amqp.url",
                            format!("{:?} is not an AMQP URI: {e}", SecretUrl::new(u).redacted()),
                        )
                    })
            })?),
            prefetch: self.integer("amqp.prefetch", 1, i64::from(u16::MAX))?,
        };
        let redis = RedisSettings {
            url: SecretUrl::new(
                self.url("redis.url", &["redis", "rediss", "unix", "redis+unix"])
                    .and_then(|u| {
                        redis::Client::open(u.as_str())
                            .map(|_| u.clone())
                            .map_err(|e| {
                                ConfigError::new(
                                    "redis.url",
                                    format!(
                                        "{:?} is not a Redis URL: {e}",
                                        SecretUrl::new(u).redacted()
                                    ),
                                )
                            })
                    })?,
            ),
            key_prefix: {
                let p = self.required_text("redis.key_prefix")?;
                if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(ConfigError::new(
                        "redis.key_prefix",
                        format!("{p:?} must be non-empty without spaces"),
                    ));
                }
                p
            },
        };
        let api = self.api()?;
        let retry = self.retry()?;
        let circuit = CircuitSettings {
            failure_threshold: self.integer("circuit.failure_threshold", 1, 1_000_000)?,
            cooldown: self.duration("circuit.cooldown", Duration::from_millis(10))?,
        };
        let dedup = DedupSettings {
            ttl: self.duration("dedup.ttl", Duration::from_secs(1))?,
            lease: self.duration("dedup.lease", Duration::from_millis(100))?,
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
        let shutdown = ShutdownSettings {
            drain_timeout: self.duration("shutdown.drain_timeout", Duration::ZERO)?,
        };
        let metrics = MetricsSettings {
            listen: {
                let v = self.required_text("metrics.listen")?;
                v.trim().parse().map_err(|_| {
                    ConfigError::new(
                        "metrics.listen",
                        format!("{v:?} is not a socket address (e.g. 127.0.0.1:9464)"),
                    )
                })?
            },
        };
        let log = LogSettings {
            format: match self.required_text("log.format")?.trim() {
                "json" => LogFormat::Json,
                "pretty" => LogFormat::Pretty,
                other => {
                    return Err(ConfigError::new(
                        "log.format",
                        format!("{other:?} is not one of json, pretty"),
                    ));
                }
            },
            level: {
                let v = self.required_text("log.level")?;
                if tracing_subscriber::EnvFilter::try_new(v.trim()).is_err() {
                    return Err(ConfigError::new(
                        "log.level",
                        format!(
                            "{v:?} is not a level or filter (e.g. info, debug, group_provisioner=debug)"
                        ),
                    ));
                }
                v.trim().to_owned()
            },
        };
        let topology = TopologySettings {
            command_exchange: self.name("topology.command_exchange")?,
            command_routing_key: self.name("topology.command_routing_key")?,
            work_queue: self.name("topology.work_queue")?,
            dead_letter_exchange: self.name("topology.dead_letter_exchange")?,
            dead_letter_queue: self.name("topology.dead_letter_queue")?,
            event_exchange: self.name("topology.event_exchange")?,
            created_routing_key: self.name("topology.created_routing_key")?,
            failed_routing_key: self.name("topology.failed_routing_key")?,
            delivery_limit: self.integer("topology.delivery_limit", 1, 1_000_000)?,
        };
        for tier in &retry.delays {
            let name = topology.delay_queue(tier);
            if name.len() > 255 {
                return Err(ConfigError::new(
                    "topology.work_queue",
                    format!(
                        "delay queue name {name:?} would exceed 255 bytes; shorten the work queue name"
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

    fn api(&mut self) -> Result<ApiSettings, ConfigError> {
        let base_url = self
            .url("api.base_url", &["http", "https"])?
            .trim_end_matches('/')
            .to_owned();
        let auth = match self.required_text("api.auth")?.trim() {
            "token" => AuthMode::Token,
            "login" => AuthMode::Login,
            other => {
                return Err(ConfigError::new(
                    "api.auth",
                    format!("{other:?} is not one of token, login"),
                ));
            }
        };
        let token = self.optional_nonempty("api.token")?.map(Secret::new);
        let email = self.optional_nonempty("api.email")?;
        let password = self
            .text("api.password")?
            .filter(|p| !p.is_empty())
            .map(Secret::new);
        let auth_url = self
            .url("api.auth_url", &["http", "https"])?
            .trim_end_matches('/')
            .to_owned();
        let timeout = self.duration("api.timeout", Duration::from_millis(1))?;
        match auth {
            _ if self.credentials_optional => {}
            AuthMode::Token if token.is_none() => {
                return Err(ConfigError::new(
                    "api.token",
                    "is required when api.auth = \"token\" (set PROVISIONER__API__TOKEN)",
                ));
            }
            AuthMode::Login if email.is_none() => {
                return Err(ConfigError::new(
                    "api.email",
                    "is required when api.auth = \"login\"",
                ));
            }
            AuthMode::Login if password.is_none() => {
                return Err(ConfigError::new(
                    "api.password",
                    "is required when api.auth = \"login\" (set PROVISIONER__API__PASSWORD)",
                ));
            }
            _ => {}
        }
        Ok(ApiSettings {
            base_url,
            auth,
            token,
            email,
            password,
            auth_url,
            timeout,
        })
    }

    fn retry(&mut self) -> Result<RetrySettings, ConfigError> {
        let initial = self.duration("retry.initial", Duration::from_millis(1))?;
        let multiplier = {
            let v = self.required_text("retry.multiplier")?;
            match v.trim().parse::<f64>() {
                Ok(m) if m.is_finite() && (1.0..=10.0).contains(&m) => m,
                _ => {
                    return Err(ConfigError::new(
                        "retry.multiplier",
                        format!("{v:?} is not a number between 1 and 10"),
                    ));
                }
            }
        };
        let max_interval = self.duration("retry.max_interval", Duration::from_millis(1))?;
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
        Ok(RetrySettings {
            initial,
            multiplier,
            max_interval,
            max_tries: self.integer("retry.max_tries", 1, 100)?,
            max_retry_after: self.duration("retry.max_retry_after", Duration::ZERO)?,
            delays: self.delays("retry.delays")?,
        })
    }
}

fn scalar_text(key: &str, v: Value) -> Result<String, ConfigError> {
    match v.kind {
        ValueKind::String(s) => Ok(s),
        ValueKind::Boolean(b) => Ok(b.to_string()),
        ValueKind::I64(n) => Ok(n.to_string()),
        ValueKind::I128(n) => Ok(n.to_string()),
        ValueKind::U64(n) => Ok(n.to_string()),
        ValueKind::U128(n) => Ok(n.to_string()),
        ValueKind::Float(f) => Ok(f.to_string()),
        ValueKind::Nil => Err(ConfigError::new(key, "has no value")),
        ValueKind::Table(_) => Err(ConfigError::new(key, "is a table, expected a value")),
        ValueKind::Array(_) => Err(ConfigError::new(key, "is a list, expected a single value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "[api]\ntoken = \"t\"\n";

    fn with_env(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::from_sources(Sources {
            toml: Some(TOKEN.into()),
            env: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Sources::default()
        })
    }

    fn err(toml: &str) -> ConfigError {
        Settings::from_sources(Sources {
            toml: Some(toml.into()),
            env: Some(HashMap::from([(
                "PROVISIONER__API__TOKEN".to_string(),
                "t".to_string(),
            )])),
            ..Sources::default()
        })
        .expect_err("should be rejected")
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = Settings::from_toml(TOKEN).expect("defaults load");
        assert_eq!(s.amqp.url.expose(), "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.amqp.prefetch, 64);
        assert_eq!(s.redis.url.expose(), "redis://127.0.0.1:6379/0");
        assert_eq!(s.redis.key_prefix, "provisioner");
        assert_eq!(s.api.base_url, "https://platform-api.convirza.com/v3");
        assert_eq!(s.api.auth, AuthMode::Token);
        assert_eq!(s.api.auth_url, "https://platform-oauth.convirza.com");
        assert_eq!(s.api.timeout, Duration::from_secs(15));
        assert_eq!(s.retry.initial, Duration::from_millis(250));
        assert_eq!(s.retry.multiplier, 2.0);
        assert_eq!(s.retry.max_interval, Duration::from_secs(10));
        assert_eq!(s.retry.max_tries, 4);
        let labels: Vec<_> = s.retry.delays.iter().map(|t| t.label.as_str()).collect();
        assert_eq!(labels, ["5s", "30s", "2m", "10m", "30m"]);
        assert_eq!(s.retry.delays[4].delay, Duration::from_secs(1800));
        assert_eq!(s.circuit.failure_threshold, 10);
        assert_eq!(s.circuit.cooldown, Duration::from_secs(30));
        assert_eq!(s.dedup.ttl, Duration::from_secs(30 * 86_400));
        assert_eq!(s.dedup.lease, Duration::from_secs(60));
        assert_eq!(s.shutdown.drain_timeout, Duration::from_secs(30));
        assert_eq!(s.metrics.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.log.level, "info");
        assert_eq!(s.topology, TopologySettings::default());
        assert_eq!(
            s.topology.delay_queue(&s.retry.delays[0]),
            "provisioning.group.create.retry.5s"
        );
    }

    #[test]
    fn toml_then_env_layering() {
        let s = Settings::from_sources(Sources {
            toml: Some("[api]\ntoken = \"file\"\n[amqp]\nprefetch = 8\n[retry]\ndelays = [\"1s\", \"2s\"]\n".into()),
            env: Some(HashMap::from([
                ("PROVISIONER__AMQP__PREFETCH".to_string(), "16".to_string()),
                ("PROVISIONER__REDIS__KEY_PREFIX".to_string(), "t1".to_string()),
            ])),
            ..Sources::default()
        })
        .expect("loads");
        assert_eq!(s.amqp.prefetch, 16, "env wins over the file");
        assert_eq!(s.redis.key_prefix, "t1");
        assert_eq!(s.api.token.as_ref().map(Secret::expose), Some("file"));
        let labels: Vec<_> = s.retry.delays.iter().map(|t| t.label.clone()).collect();
        assert_eq!(labels, ["1s", "2s"]);
    }

    #[test]
    fn lists_from_env_are_comma_separated() {
        let s = with_env(&[("PROVISIONER__RETRY__DELAYS", "5s,30s,2m")]).expect("loads");
        let labels: Vec<_> = s.retry.delays.iter().map(|t| t.label.clone()).collect();
        assert_eq!(labels, ["5s", "30s", "2m"]);
        let one = with_env(&[("PROVISIONER__RETRY__DELAYS", "1s")]).expect("loads");
        assert_eq!(one.retry.delays.len(), 1);
        assert_eq!(
            one.topology.delay_queue(&one.retry.delays[0]),
            "provisioning.group.create.retry.1s"
        );
    }

    #[test]
    fn bad_values_name_the_key_and_value() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[api]\ntimeout = \"5 parsecs\"\n",
                "api.timeout",
                "\"5 parsecs\" is not a duration",
            ),
            ("[amqp]\nprefetch = 0\n", "amqp.prefetch", "out of range"),
            (
                "[amqp]\nprefetch = \"many\"\n",
                "amqp.prefetch",
                "\"many\" is not an integer",
            ),
            (
                "[amqp]\nurl = \"http://x\"\n",
                "amqp.url",
                "scheme amqp or amqps",
            ),
            ("[redis]\nurl = \"nope\"\n", "redis.url", "not a URL"),
            (
                "[redis]\nurl = \"redis://h:6379/db\"\n",
                "redis.url",
                "not a Redis URL",
            ),
            (
                "[amqp]\nurl = \"amqp://h:notaport/x\"\n",
                "amqp.url",
                "not a",
            ),
            (
                "[retry]\ndelays = [\"5s\", \"soon\"]\n",
                "retry.delays",
                "\"soon\" is not a duration",
            ),
            ("[retry]\ndelays = []\n", "retry.delays", "at least one"),
            (
                "[retry]\ndelays = [\"5s\", \"5s\"]\n",
                "retry.delays",
                "twice",
            ),
            (
                "[retry]\nmax_tries = 0\n",
                "retry.max_tries",
                "out of range",
            ),
            (
                "[retry]\ninitial = \"20s\"\n",
                "retry.max_interval",
                "shorter than retry.initial",
            ),
            (
                "[metrics]\nlisten = \"localhost\"\n",
                "metrics.listen",
                "not a socket address",
            ),
            (
                "[log]\nformat = \"xml\"\n",
                "log.format",
                "\"xml\" is not one of json, pretty",
            ),
            ("[log]\nlevel = \"[[[\"\n", "log.level", "is not a level"),
            (
                "[api]\nauth = \"oauth\"\n",
                "api.auth",
                "\"oauth\" is not one of token, login",
            ),
            (
                "[dedup]\nttl = \"30s\"\nlease = \"60s\"\n",
                "dedup.ttl",
                "longer than dedup.lease",
            ),
            (
                "[topology]\nwork_queue = \"  \"\n",
                "topology.work_queue",
                "must not be empty",
            ),
            (
                "[retry]\ndelay = [\"5s\"]\n",
                "retry.delay",
                "unknown key (did you mean retry.delays?)",
            ),
            (
                "[circuit]\ncooldown = \"-1s\"\n",
                "circuit.cooldown",
                "not a duration",
            ),
        ];
        for (toml, key, reason) in cases {
            let e = err(toml);
            assert_eq!(e.key, *key, "for {toml:?}: {e}");
            assert!(e.reason.contains(reason), "for {toml:?}: got {e}");
            assert!(e.to_string().starts_with(&format!("config error: {key}: ")));
        }
    }

    #[test]
    fn bad_env_value_names_the_dotted_key() {
        let e = with_env(&[("PROVISIONER__API__TIMEOUT", "5 parsecs")]).expect_err("rejected");
        assert_eq!(
            e.to_string(),
            "config error: api.timeout: \"5 parsecs\" is not a duration (use e.g. 250ms, 5s, 2m, 1h, 30d)"
        );
        let e = with_env(&[("PROVISIONER__AMQP__PREFTECH", "5")]).expect_err("rejected");
        assert_eq!(e.key, "amqp.preftech");
    }

    #[test]
    fn auth_mode_requirements() {
        let e = Settings::from_toml("").expect_err("token required");
        assert_eq!(e.key, "api.token");
        let e = Settings::from_toml("[api]\nauth = \"login\"\nemail = \"a@b.c\"\n")
            .expect_err("password");
        assert_eq!(e.key, "api.password");
        let s =
            Settings::from_toml("[api]\nauth = \"login\"\nemail = \"a@b.c\"\npassword = \"pw\"\n")
                .expect("login config");
        assert_eq!(s.api.auth, AuthMode::Login);
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings::from_toml(
            "[api]\ntoken = \"tok-123\"\npassword = \"pw-456\"\n[amqp]\nurl = \"amqp://u:pw-789@h/%2f\"\n",
        )
        .expect("loads");
        let printed = format!("{s:?}");
        for secret in ["tok-123", "pw-456", "pw-789"] {
            assert!(!printed.contains(secret), "{secret} leaked: {printed}");
        }
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let e = Settings::from_sources(Sources {
            file: Some(PathBuf::from("/nonexistent/provisioner.toml")),
            env: Some(HashMap::new()),
            ..Sources::default()
        })
        .expect_err("missing file");
        assert_eq!(e.key, "--config");
    }

    #[test]
    fn every_key_has_a_reader() {
        // Setting each documented key to its default must load without "unknown key".
        let mut env = HashMap::new();
        for (k, d) in KEYS {
            let v = d.unwrap_or(match *k {
                "api.email" => "ops@example.com",
                _ => "x",
            });
            env.insert(
                format!("PROVISIONER__{}", k.replace('.', "__").to_uppercase()),
                v.to_string(),
            );
        }
        Settings::from_sources(Sources {
            env: Some(env),
            toml: Some(String::new()),
            ..Sources::default()
        })
        .expect("every documented key is known");
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// The README table and `config/example.toml` must cover every key, so a new key
    /// cannot ship undocumented.
    #[test]
    fn every_key_is_documented() {
        let readme = include_str!("../../README.md");
        let example = include_str!("../../config/example.toml");
        for (key, _) in KEYS {
            assert!(
                readme.contains(&format!("| `{key}` |")),
                "README lacks {key}"
            );
            let leaf = key.rsplit_once('.').map(|(_, l)| l).unwrap_or(key);
            assert!(
                example.contains(&format!("{leaf} =")),
                "example.toml lacks {key}"
            );
        }
        let with_token = format!("{example}\n").replace("# token = \"...\"", "token = \"t\"");
        Settings::from_toml(&with_token).expect("example.toml loads");
    }
}

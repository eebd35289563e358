//! What the configuration must satisfy beyond each value's own grammar (which the
//! adapters in `de` check): every key is one this version knows, with a "did you mean"
//! decided here (never read back from serde's English), and the rules that tie keys
//! together — TLS files readable and matching, the credentials `api.auth` needs, the nodes
//! a Redis mode needs, derived queue names within AMQP's 255 bytes. Every error names its
//! dotted key.

use super::{
    ApiAuth, AuthMode, ClientIdentity, ConfigError, Credentials, RedisMode, Settings, TlsSettings,
    format_duration,
};

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

impl Settings {
    /// Apply the rules between keys; read the TLS files; make the API credentials.
    pub(super) fn finish(mut self, credentials: Credentials) -> Result<Settings, ConfigError> {
        self.amqp.tls.load("amqp")?;
        self.redis.tls.load("redis")?;
        self.check_redis()?;
        let auth = self.api.take_auth();
        self.api.auth = match credentials {
            Credentials::Required => Some(auth?),
            Credentials::Optional => auth.ok(),
        };
        let (retry, dedup) = (&self.retry, &self.dedup);
        if retry.max_interval < retry.initial {
            return Err(ConfigError::new(
                "retry.max_interval",
                format!(
                    "{} is shorter than retry.initial ({})",
                    format_duration(retry.max_interval),
                    format_duration(retry.initial)
                ),
            ));
        }
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
        self.check_names()?;
        let console = &self.console;
        if console.operator_user == console.viewer_user {
            return Err(ConfigError::new(
                "console.viewer_user",
                format!(
                    "{:?} is also console.operator_user: each role needs its own user",
                    console.viewer_user
                ),
            ));
        }
        Ok(self)
    }

    /// Room for the names derived from configured ones: `<dlq>.migrating`,
    /// `<queue>.lock`, and each tier's delay queue.
    fn check_names(&self) -> Result<(), ConfigError> {
        let t = &self.topology;
        for (key, value, suffix) in [
            (
                "topology.dead_letter_queue",
                &t.dead_letter_queue,
                ".migrating",
            ),
            ("topology.unrouted_events", &t.unrouted_events, ".lock"),
        ] {
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
        }
        for tier in &self.retry.delays {
            let queue = t.delay_queue(tier);
            if queue.len() > 255 {
                return Err(ConfigError::new(
                    "topology.work_queue",
                    format!(
                        "delay queue name {queue:?} would exceed 255 bytes; shorten the work queue name"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_redis(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        match r.mode {
            RedisMode::Sentinel | RedisMode::Cluster if r.nodes.is_empty() => {
                let what = if r.mode == RedisMode::Sentinel {
                    "the sentinels' addresses (redis://host:26379)"
                } else {
                    "one or more cluster nodes (redis://host:port)"
                };
                Err(ConfigError::new(
                    "redis.nodes",
                    format!("is required with this redis.mode: list {what}"),
                ))
            }
            RedisMode::Sentinel if r.sentinel_master.is_none() => Err(ConfigError::new(
                "redis.sentinel_master",
                "is required with redis.mode = \"sentinel\": the master's name at the sentinels",
            )),
            _ => Ok(()),
        }
    }
}

impl super::ApiSettings {
    /// The credentials `api.auth` needs, or the key that is missing; taken out of the
    /// fields they were read into.
    fn take_auth(&mut self) -> Result<ApiAuth, ConfigError> {
        let (token, email, password) = (self.token.take(), self.email.take(), self.password.take());
        match self.mode {
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

impl TlsSettings {
    /// Read and check the files; `section` is `amqp` or `redis`, for the key names. The
    /// contents are never quoted: a key file is a secret, and a wrong file could be.
    fn load(&mut self, section: &str) -> Result<(), ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let key = |leaf: &str| format!("{section}.tls.{leaf}");
        let read = |leaf: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                ConfigError::new(key(leaf), format!("cannot read {}: {e}", path.display()))
            })
        };
        let certificates = |leaf: &str, path: &std::path::Path| {
            let pem = read(leaf, path)?;
            let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
            match parsed {
                Ok(certs) if !certs.is_empty() => Ok((pem, certs)),
                _ => Err(ConfigError::new(
                    key(leaf),
                    format!("{} holds no PEM certificate", path.display()),
                )),
            }
        };
        if let Some(path) = &self.ca_file {
            self.ca_pem = Some(certificates("ca_file", path)?.0);
        }
        let (cert_file, key_file) = match (&self.cert_file, &self.key_file) {
            (None, None) => return Ok(()),
            (Some(c), Some(k)) => (c, k),
            (cert, _) => {
                let (missing, given) = match cert {
                    Some(_) => ("key_file", "cert_file"),
                    None => ("cert_file", "key_file"),
                };
                let reason = format!("is required with {}", key(given));
                return Err(ConfigError::new(key(missing), reason));
            }
        };
        let (cert_pem, chain) = certificates("cert_file", cert_file)?;
        let key_pem = read("key_file", key_file)?;
        let Ok(private) = PrivateKeyDer::from_pem_slice(&key_pem) else {
            return Err(ConfigError::new(
                key("key_file"),
                format!("{} holds no PEM private key", key_file.display()),
            ));
        };
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
        self.client = Some(ClientIdentity {
            cert_pem,
            key_pem: key_pem.into(),
        });
        Ok(())
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

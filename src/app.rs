//! Wiring: settings → the clients every command builds the same way (the dedup store, the
//! API client with its auth, the worker's identity). The worker and `check` both start
//! here, so a client is configured in exactly one place.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ApiAuth, ConfigError, Settings};
use crate::convirza::{Auth, BuildError, ConvirzaClient, LoginSession};
use crate::dedup::RedisStore;
use crate::pipeline::{ProcessorConfig, StoreError};
use crate::retry::RetryPolicy;

/// Why the wiring failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot set up the dedup store: {0}")]
    Store(#[source] StoreError),
    #[error(transparent)]
    Client(#[from] BuildError),
}

/// How long after `api.timeout` a POST of a delivery that never settled is taken to have
/// ended: the API may still commit a request whose client gave up.
pub const TAKEOVER_MARGIN: Duration = Duration::from_secs(5);

/// `host:pid`: names this process in claims, lock owners and broker connections.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

/// The Redis store (connects lazily: building it never waits for Redis).
pub fn dedup_store(settings: &Settings) -> Result<RedisStore, StoreError> {
    RedisStore::from_settings(&settings.redis)
}

/// The API credentials, which `run` and `check` load as required.
pub fn api_auth(settings: &Settings) -> Result<&ApiAuth, ConfigError> {
    settings
        .api
        .auth
        .as_ref()
        .ok_or_else(|| ConfigError::new("api.auth", "no API credentials are configured"))
}

/// The API client for `settings`; in login mode its session is shared through `store`.
pub fn api_client(
    settings: &Settings,
    store: &RedisStore,
    owner: &str,
) -> Result<ConvirzaClient, AppError> {
    let api = &settings.api;
    let auth = match api_auth(settings)? {
        ApiAuth::Token(token) => Auth::Static(token.clone()),
        ApiAuth::Login { email, password } => Auth::Login(Arc::new(LoginSession::new(
            &api.auth_url,
            email,
            password.clone(),
            api.timeout,
            Arc::new(store.clone()),
            owner,
        )?)),
    };
    Ok(ConvirzaClient::new(&api.base_url, auth, api.timeout)?)
}

/// The core's configuration from the settings.
pub fn processor_config(settings: &Settings, worker_id: &str) -> ProcessorConfig {
    ProcessorConfig {
        policy: RetryPolicy {
            initial: settings.retry.initial,
            multiplier: settings.retry.multiplier,
            max_interval: settings.retry.max_interval,
            max_tries: settings.retry.max_tries,
            max_retry_after: settings.retry.max_retry_after,
        },
        tiers: settings.retry.delays.len(),
        lease: settings.dedup.lease,
        ttl: settings.dedup.ttl,
        worker_id: worker_id.to_owned(),
        failure_threshold: settings.circuit.failure_threshold,
        api_timeout: settings.api.timeout,
        takeover_margin: TAKEOVER_MARGIN,
        verify_unknown: settings.dedup.verify_unknown,
    }
}

/// How the broker connections are protected (`check`, the start-up line).
pub fn amqp_tls_state(settings: &Settings) -> String {
    let urls = settings.amqp.url.urls().iter().map(|u| u.expose());
    settings.amqp.tls.state("amqps", urls)
}

/// How the Redis connection is protected.
pub fn redis_tls_state(settings: &Settings) -> String {
    let r = &settings.redis;
    let urls: Vec<&str> = match r.mode {
        crate::config::RedisMode::Standalone => vec![r.url.expose()],
        crate::config::RedisMode::Sentinel => std::iter::once(r.url.expose())
            .chain(r.nodes.iter().map(|n| n.expose()))
            .collect(),
        crate::config::RedisMode::Cluster => r.nodes.iter().map(|n| n.expose()).collect(),
    };
    r.tls.state("rediss", urls)
}

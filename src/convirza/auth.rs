//! How the client gets a bearer token: a static one, or a login session.
//!
//! Invariants:
//! - a token is only ever read through [`Auth::bearer`]; after a 401/403 the client asks
//!   [`Auth::after_unauthorized`] once whether a *different* token exists;
//! - login mode keeps one token pair per account in a shared [`TokenStore`] (Redis), and
//!   refreshes only while holding the store's lock, after re-reading the pair: N replicas
//!   share one session, and a single-use refresh token is never presented twice;
//! - tokens, the password and the auth server's bodies never reach logs or errors.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::RwLock;

use crate::clock::{Clock, SystemClock};
use crate::pipeline::{ApiError, StoreError};
use crate::secret::{ExposeSecret, SecretString};

use super::client::{BuildError, http_client};

#[derive(Clone)]
pub enum Auth {
    /// `api.auth = "token"`.
    Static(SecretString),
    /// `api.auth = "login"`.
    Login(Arc<LoginSession>),
}

impl Auth {
    pub async fn bearer(&self) -> Result<SecretString, ApiError> {
        match self {
            Auth::Static(token) => Ok(token.clone()),
            Auth::Login(session) => session.bearer().await,
        }
    }

    /// The API refused `refused`. Returns true when another token is now available and one
    /// more try is worthwhile.
    pub async fn after_unauthorized(&self, refused: &SecretString) -> Result<bool, ApiError> {
        match self {
            Auth::Static(token) => Ok(token.expose_secret() != refused.expose_secret()),
            Auth::Login(session) => session.after_unauthorized(refused).await,
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Static(_) => f.write_str("Auth::Static([redacted])"),
            Auth::Login(s) => write!(f, "Auth::Login({})", s.auth_url),
        }
    }
}

/// An access/refresh token pair with absolute expiries (unix seconds).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub access_expires_at: u64,
    pub refresh_expires_at: u64,
    pub obtained_at: u64,
}

impl std::fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPair")
            .field("access_expires_at", &self.access_expires_at)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .finish_non_exhaustive()
    }
}

impl TokenPair {
    /// Usable for a call now: not within the refresh margin of its expiry (a tenth of its
    /// lifetime, at most five minutes).
    pub fn access_fresh(&self, now: u64) -> bool {
        let lifetime = self.access_expires_at.saturating_sub(self.obtained_at);
        let margin = (lifetime / 10).min(300);
        now + margin < self.access_expires_at
    }

    pub fn refresh_usable(&self, now: u64) -> bool {
        !self.refresh_token.is_empty() && now + 5 < self.refresh_expires_at
    }
}

/// Where replicas share their token pair and the lock that serialises refreshes.
pub trait TokenStore: Send + Sync {
    fn load<'a>(&'a self, account: &'a str)
    -> BoxFuture<'a, Result<Option<TokenPair>, StoreError>>;
    fn save<'a>(
        &'a self,
        account: &'a str,
        pair: &'a TokenPair,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Take the refresh lock for `ttl`; false when someone else holds it.
    fn try_lock<'a>(
        &'a self,
        account: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn unlock<'a>(
        &'a self,
        account: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// How long one replica may hold the refresh lock (a login or refresh call plus margin).
const LOCK_TTL: Duration = Duration::from_secs(20);
/// How long a replica waits for another one's refresh before giving up for now.
const WAIT_FOR_OTHERS: Duration = Duration::from_secs(30);

pub struct LoginSession {
    http: reqwest::Client,
    auth_url: String,
    email: String,
    password: SecretString,
    /// Identifies the account in the shared store (not secret: a hash).
    account: String,
    owner: String,
    store: Arc<dyn TokenStore>,
    cached: RwLock<Option<TokenPair>>,
    /// Expiries are judged by this clock (tests move it forward instead of sleeping).
    clock: Arc<dyn Clock>,
}

fn auth_err(message: impl Into<String>, transient: bool) -> ApiError {
    ApiError::Auth {
        message: message.into(),
        transient,
    }
}

/// The shared token store failed: worth another try later.
fn store_failed(e: StoreError) -> ApiError {
    auth_err(format!("token store: {e}"), true)
}

impl LoginSession {
    pub fn new(
        auth_url: &str,
        email: &str,
        password: SecretString,
        timeout: Duration,
        store: Arc<dyn TokenStore>,
        owner: &str,
    ) -> Result<LoginSession, BuildError> {
        let http = http_client(timeout)?;
        let auth_url = auth_url.trim_end_matches('/').to_owned();
        let account = crate::hash::short_hash(format!("{auth_url}\n{email}").as_bytes());
        Ok(LoginSession {
            http,
            auth_url,
            email: email.to_owned(),
            password,
            account,
            owner: format!("{owner}/{}", uuid::Uuid::new_v4().simple()),
            store,
            cached: RwLock::new(None),
            clock: Arc::new(SystemClock),
        })
    }

    /// Judge token expiries by `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn now_secs(&self) -> u64 {
        self.clock
            .now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub async fn bearer(&self) -> Result<SecretString, ApiError> {
        if let Some(pair) = self.cached.read().await.as_ref()
            && pair.access_fresh(self.now_secs())
        {
            return Ok(SecretString::from(pair.access_token.clone()));
        }
        self.obtain(None)
            .await
            .map(|p| SecretString::from(p.access_token))
    }

    pub async fn after_unauthorized(&self, refused: &SecretString) -> Result<bool, ApiError> {
        let pair = self.obtain(Some(refused.expose_secret())).await?;
        Ok(pair.access_token != refused.expose_secret())
    }

    /// Fresh by this session's clock, and not the token the API just refused.
    fn usable(&self, pair: &TokenPair, refused: Option<&str>) -> bool {
        pair.access_fresh(self.now_secs()) && Some(pair.access_token.as_str()) != refused
    }

    /// A usable pair: the shared one if it is fresh and not the refused token, else a new
    /// one obtained under the lock.
    async fn obtain(&self, refused: Option<&str>) -> Result<TokenPair, ApiError> {
        let usable = |p: &TokenPair| self.usable(p, refused);
        let started = tokio::time::Instant::now();
        loop {
            let shared = self.store.load(&self.account).await.map_err(store_failed)?;
            if let Some(pair) = shared.as_ref().filter(|p| usable(p)) {
                *self.cached.write().await = Some(pair.clone());
                return Ok(pair.clone());
            }
            let locked = self
                .store
                .try_lock(&self.account, &self.owner, LOCK_TTL)
                .await
                .map_err(store_failed)?;
            if locked {
                let result = self.renew_locked(refused).await;
                if let Err(e) = self.store.unlock(&self.account, &self.owner).await {
                    tracing::warn!(error = %e, "could not release the token refresh lock; it expires by itself");
                }
                let pair = result?;
                *self.cached.write().await = Some(pair.clone());
                return Ok(pair);
            }
            if started.elapsed() > WAIT_FOR_OTHERS {
                return Err(auth_err(
                    "another replica has been refreshing the token for too long",
                    true,
                ));
            }
            // Another replica is refreshing: wait for its pair rather than burn ours.
            tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 100)).await;
        }
    }

    /// Holding the lock: re-read (someone may have refreshed just before we locked), then
    /// refresh, or log in when there is no usable refresh token or it is refused.
    async fn renew_locked(&self, refused: Option<&str>) -> Result<TokenPair, ApiError> {
        let current = self.store.load(&self.account).await.map_err(store_failed)?;
        if let Some(pair) = current.as_ref().filter(|p| self.usable(p, refused)) {
            return Ok(pair.clone());
        }
        let now = self.now_secs();
        let renewed = match current.filter(|p| p.refresh_usable(now)) {
            Some(pair) => match self.refresh(&pair.refresh_token).await {
                Ok(p) => {
                    tracing::info!(account = %self.account, "API token refreshed");
                    p
                }
                Err(RefreshError::Refused(why)) => {
                    tracing::warn!(account = %self.account, reason = %why, "refresh token refused; logging in again");
                    self.login().await?
                }
                Err(RefreshError::Api(e)) => return Err(e),
            },
            None => self.login().await?,
        };
        let ttl = Duration::from_secs(
            renewed
                .refresh_expires_at
                .saturating_sub(self.now_secs())
                .max(60),
        );
        self.store
            .save(&self.account, &renewed, ttl)
            .await
            .map_err(store_failed)?;
        Ok(renewed)
    }

    async fn login(&self) -> Result<TokenPair, ApiError> {
        let url = format!("{}/oauth/token", self.auth_url);
        let body =
            serde_json::json!({"email": self.email, "password": self.password.expose_secret()});
        let response =
            self.http.post(&url).json(&body).send().await.map_err(|e| {
                auth_err(format!("login request failed: {}", without_url(&e)), true)
            })?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        match status {
            200..=299 => {
                let pair = parse_token_response(&text, self.now_secs())
                    .map_err(|e| auth_err(format!("login response: {e}"), true))?;
                tracing::info!(account = %self.account, "logged in to the API");
                Ok(pair)
            }
            429 | 500..=599 => Err(auth_err(format!("login failed with HTTP {status}"), true)),
            _ => Err(auth_err(
                format!("login refused with HTTP {status} (check api.email / api.password)"),
                false,
            )),
        }
    }

    async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, RefreshError> {
        let url = format!("{}/oauth/refresh-token", self.auth_url);
        let response = self
            .http
            .post(&url)
            .json(&serde_json::json!({"refresh_token": refresh_token}))
            .send()
            .await
            // The refresh may have been consumed without us seeing the answer: the old
            // token is then dead, so the next attempt logs in.
            .map_err(|e| {
                RefreshError::Refused(format!("refresh request failed: {}", without_url(&e)))
            })?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        match status {
            200..=299 => parse_token_response(&text, self.now_secs())
                .map_err(|e| RefreshError::Refused(format!("refresh response: {e}"))),
            400 | 401 | 403 => Err(RefreshError::Refused(format!("HTTP {status}"))),
            _ => Err(RefreshError::Api(auth_err(
                format!("refresh failed with HTTP {status}"),
                true,
            ))),
        }
    }
}

enum RefreshError {
    /// The refresh token is dead: log in instead.
    Refused(String),
    Api(ApiError),
}

fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "<auth url>");
    }
    text
}

/// Why a login or refresh answer could not be used. The body itself is never included:
/// it holds tokens.
#[derive(Debug, thiserror::Error)]
pub enum TokenResponseError {
    #[error("not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("no access_token")]
    NoAccessToken,
    #[error("token_type {0:?} is not Bearer")]
    NotBearer(String),
}

/// Parse a login/refresh answer, flat or inside the API envelope (`data`). Expiries are
/// ISO-8601 timestamps per the docs; plain seconds are accepted too.
pub fn parse_token_response(text: &str, now: u64) -> Result<TokenPair, TokenResponseError> {
    let value: Value = serde_json::from_str(text).map_err(TokenResponseError::NotJson)?;
    let body = match value.get("data") {
        Some(data) if data.get("access_token").is_some() => data,
        _ => &value,
    };
    let field = |name: &str| {
        body.get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .filter(|s| !s.is_empty())
    };
    let access_token = field("access_token").ok_or(TokenResponseError::NoAccessToken)?;
    let refresh_token = field("refresh_token").unwrap_or_default();
    if let Some(kind) = field("token_type")
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(TokenResponseError::NotBearer(kind));
    }
    let expiry = |name: &str, default: u64| -> u64 {
        match body.get(name) {
            Some(Value::String(s)) => crate::clock::parse_rfc3339(s)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .or_else(|| s.trim().parse::<u64>().ok().map(|secs| now + secs))
                .unwrap_or(now + default),
            Some(Value::Number(n)) => n.as_u64().map_or(now + default, |secs| now + secs),
            _ => now + default,
        }
    };
    Ok(TokenPair {
        access_token,
        refresh_token,
        access_expires_at: expiry("expires_in", 7 * 86_400),
        refresh_expires_at: expiry("refresh_expires_in", 180 * 86_400),
        obtained_at: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_795_000_000;

    #[test]
    fn flat_and_enveloped_responses() {
        let flat = r#"{"access_token":"a","refresh_token":"r","token_type":"Bearer",
            "expires_in":"2026-11-25T09:06:40Z","refresh_expires_in":"2027-05-18T09:06:40Z","user":{"id":1}}"#;
        let p = parse_token_response(flat, NOW).expect("flat");
        assert_eq!(p.access_token, "a");
        assert_eq!(p.access_expires_at, NOW + 7 * 86_400 - 2 * 3600);
        assert!(p.refresh_expires_at > p.access_expires_at);
        let wrapped = format!(r#"{{"code":200,"message":"Success","data":{flat}}}"#);
        assert_eq!(parse_token_response(&wrapped, NOW).expect("wrapped"), p);
        let seconds = r#"{"access_token":"a","refresh_token":"r","expires_in":3600}"#;
        assert_eq!(
            parse_token_response(seconds, NOW)
                .expect("secs")
                .access_expires_at,
            NOW + 3600
        );
        assert!(parse_token_response(r#"{"token_type":"Bearer"}"#, NOW).is_err());
        assert!(parse_token_response(r#"{"access_token":"a","token_type":"MAC"}"#, NOW).is_err());
        assert!(parse_token_response("<html>", NOW).is_err());
    }

    #[test]
    fn freshness_margin() {
        let p = TokenPair {
            access_token: "tok-AAA".into(),
            refresh_token: "tok-RRR".into(),
            access_expires_at: NOW + 1000,
            refresh_expires_at: NOW + 10_000,
            obtained_at: NOW,
        };
        assert!(p.access_fresh(NOW));
        assert!(p.access_fresh(NOW + 899));
        assert!(
            !p.access_fresh(NOW + 900),
            "refreshed a tenth of its life early"
        );
        let week = TokenPair {
            access_expires_at: NOW + 7 * 86_400,
            ..p.clone()
        };
        assert!(
            !week.access_fresh(NOW + 7 * 86_400 - 300),
            "at most five minutes early"
        );
        assert!(week.access_fresh(NOW + 7 * 86_400 - 301));
        let printed = format!("{p:?}");
        assert!(
            !printed.contains("tok-AAA") && !printed.contains("tok-RRR"),
            "{printed}"
        );
    }
}

//! The dedup store in Redis, through the redis connection manager: the core's
//! [`DedupStore`] port, and the shared login session's [`TokenStore`].
//!
//! Keys (prefix `redis.key_prefix`):
//! - `<prefix>:group:<ext_id>` — JSON, either `{"state":"claimed","owner":…}` with the
//!   lease as its expiry, or `{"state":"created","org_unit_id":…}` kept `dedup.ttl`;
//! - `<prefix>:attempt:<ext_id>` — the attempt marker: POSTs ever about to be sent, when
//!   the last one was, whether its delivery settled, and what was posted; kept `dedup.ttl`;
//! - `<prefix>:outcome:<ext_id>` — the last outcome (JSON), kept `dedup.ttl`: a report for
//!   `status`, never read by the worker;
//! - `<prefix>:message:<message_id>` — the last outcome of an invalid command, by its
//!   message id (it may have no valid ext id), kept `dedup.ttl`.
//!
//! Invariants:
//! - every transition is one Lua script, so it is atomic: claim-or-read, renew-if-owner,
//!   claimed(owner)→created, release-if-owner;
//! - a record is only written by the owner of the current claim (fencing by owner token),
//!   or when no claim exists at all; a created record is never overwritten.

use std::time::Duration;

mod conn;
mod eviction;

pub use eviction::Eviction;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};

use futures_util::future::BoxFuture;

use crate::command::ExtId;
use crate::config::{RedisMode, RedisSettings, TlsSettings};
use crate::convirza::{TokenPair, TokenStore};
use crate::pipeline::{
    AttemptMarker, Claim, ClaimRequest, CreatedRecord, DedupStore, LastOutcome, OutcomeKey,
    Posting, RecordResult, StoreError, Unreadable,
};
use conn::RedisConn;

/// What a `group` key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StoredRecord {
    Claimed { owner: String, claimed_at: String },
    Created(CreatedRecord),
}

/// What `status` reports about one ext id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtIdStatus {
    pub record: Option<StoredRecord>,
    /// Why the record that exists cannot be read (the worker replaces it on the next
    /// delivery of the ext id).
    pub unreadable: Option<String>,
    /// Remaining time to live of the record (the lease for a claim).
    pub ttl_ms: Option<i64>,
    /// POSTs ever about to be sent for this ext id.
    pub attempt_markers: u64,
    /// What the last delivery ended as, if it is still kept (and readable).
    pub last_outcome: Option<LastOutcome>,
}

// The Lua scripts the store runs, one file each (`scripts/*.lua`, with what each answers).
// A key of another type (a hash, a list) is "unreadable", not an error of Redis: the
// scripts read with `redis.pcall` and say so with a value that starts with NUL and names
// the type. Public so that the tests can run each one against a real Redis.
pub mod scripts {
    pub const CLAIM: &str = include_str!("scripts/claim.lua");
    pub const REPLACE_UNREADABLE: &str = include_str!("scripts/replace_unreadable.lua");
    pub const RENEW: &str = include_str!("scripts/renew.lua");
    pub const CLOSE_MARKER: &str = include_str!("scripts/close_marker.lua");
    pub const RECORD_CREATED: &str = include_str!("scripts/record_created.lua");
    pub const RELEASE: &str = include_str!("scripts/release.lua");
    pub const UNLOCK: &str = include_str!("scripts/unlock.lua");
    pub const MARK_ATTEMPT: &str = include_str!("scripts/mark_attempt.lua");
    pub const READ_ATTEMPT: &str = include_str!("scripts/read_attempt.lua");
    pub const READ_KEYS: &str = include_str!("scripts/read_keys.lua");
}
use scripts::*;

/// The connection manager's timeouts and reconnection for a standalone Redis: a reply
/// slower than 2 s is an error (the delivery parks), not a hung delivery.
pub fn connection_manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    keys: KeyShape,
    prefix: String,
    claim: Script,
    replace_unreadable: Script,
    renew: Script,
    record_created: Script,
    release: Script,
    mark_attempt: Script,
    read_attempt: Script,
    read_keys: Script,
    unlock: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A client for `url`; with a private CA or a client certificate when `tls` has them
/// (`rediss://` only: the redis crate uses them for TLS connections).
pub fn client(url: &str, tls: &TlsSettings) -> redis::RedisResult<redis::Client> {
    if tls.is_default() {
        return redis::Client::open(url);
    }
    redis::Client::build_with_tls(url, tls_certificates(tls))
}

/// The redis crate's form of `tls`. Its `root_cert` *replaces* the system's roots: a
/// private CA is the one that signed the server.
pub fn tls_certificates(tls: &TlsSettings) -> redis::TlsCertificates {
    use secrecy::ExposeSecret;
    redis::TlsCertificates {
        client_tls: tls.client.as_ref().map(|c| redis::ClientTlsConfig {
            client_cert: c.cert_pem.clone(),
            client_key: c.key_pem.expose_secret().to_vec(),
        }),
        root_cert: tls.ca_pem.clone(),
    }
}

/// How an ext id's keys are named. A Redis Cluster runs a script only when all its keys
/// are in one slot, so there each key carries a hash tag derived from the ext id (a hash,
/// so an ext id holding `{` or `}` cannot break the tag); elsewhere the names stay as
/// they always were, so existing records are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyShape {
    /// `<prefix>:group:<ext_id>`
    Plain,
    /// `<prefix>:group:{<16 hex digits>}:<ext_id>`
    HashTagged,
}

impl KeyShape {
    /// The key of `kind` for any name (an ext id, a message id).
    pub fn key_of(self, prefix: &str, kind: &str, name: &str) -> String {
        match self {
            KeyShape::Plain => format!("{prefix}:{kind}:{name}"),
            KeyShape::HashTagged => format!(
                "{prefix}:{kind}:{{{}}}:{name}",
                crate::hash::short_hash(name.as_bytes())
            ),
        }
    }
}

/// `url` with its host and port replaced (the master the sentinels named keeps the
/// scheme, credentials and database of `redis.url`).
fn with_host(url: &str, host: &str, port: u16) -> String {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return format!("redis://{host}:{port}");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let userinfo = authority
        .rfind('@')
        .map(|at| &authority[..=at])
        .unwrap_or("");
    format!("{scheme}://{userinfo}{host}:{port}{path}")
}

/// The cluster of the seed nodes `redis.nodes` (credentials from the first node's URL).
fn cluster_client(settings: &RedisSettings) -> redis::RedisResult<redis::cluster::ClusterClient> {
    let nodes: Vec<&str> = settings.nodes.iter().map(|n| n.expose()).collect();
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.clone())
        .connection_timeout(conn::TIMEOUT)
        .response_timeout(conn::TIMEOUT);
    if nodes.iter().any(|n| n.starts_with("rediss://")) {
        builder = builder
            .tls(redis::TlsMode::Secure)
            .certs(tls_certificates(&settings.tls));
    }
    builder.build()
}

fn store_err(e: redis::RedisError) -> StoreError {
    StoreError::unavailable(e)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// Build the store without waiting for Redis: the connection manager connects (and
    /// reconnects) in the background, and calls fail fast while Redis is away.
    pub fn new(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(store_err)?;
        Self::with_client(client, prefix)
    }

    /// The store `settings` describe: its mode, nodes and TLS material.
    pub fn from_settings(settings: &RedisSettings) -> Result<RedisStore, StoreError> {
        let prefix = &settings.key_prefix;
        match settings.mode {
            RedisMode::Standalone => {
                let client = client(settings.url.expose(), &settings.tls).map_err(store_err)?;
                Self::with_client(client, prefix)
            }
            RedisMode::Sentinel => {
                let sentinels = settings
                    .nodes
                    .iter()
                    .map(|n| client(n.expose(), &settings.tls))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(store_err)?;
                let db = redis::IntoConnectionInfo::into_connection_info(settings.url.expose())
                    .map(|i| i.redis_settings().db())
                    .map_err(store_err)?;
                let (url, tls) = (settings.url.clone(), settings.tls.clone());
                let master_client = Box::new(move |host: &str, port: u16| {
                    client(&with_host(url.expose(), host, port), &tls)
                });
                Ok(Self::with_conn(
                    RedisConn::Sentinel(conn::SentinelConn::new(
                        sentinels,
                        settings.sentinel_master.as_deref().unwrap_or_default(),
                        master_client,
                        db,
                    )),
                    prefix,
                    KeyShape::Plain,
                ))
            }
            RedisMode::Cluster => {
                let cluster = cluster_client(settings).map_err(store_err)?;
                Ok(Self::with_conn(
                    RedisConn::Cluster(conn::LazyCluster::new(cluster)),
                    prefix,
                    KeyShape::HashTagged,
                ))
            }
        }
    }

    fn with_client(client: redis::Client, prefix: &str) -> Result<RedisStore, StoreError> {
        let conn = ConnectionManager::new_lazy_with_config(client, connection_manager_config())
            .map_err(store_err)?;
        Ok(Self::with_conn(
            RedisConn::Standalone(conn),
            prefix,
            KeyShape::Plain,
        ))
    }

    fn with_conn(conn: RedisConn, prefix: &str, keys: KeyShape) -> RedisStore {
        RedisStore {
            conn,
            keys,
            prefix: prefix.to_owned(),
            claim: Script::new(CLAIM),
            replace_unreadable: Script::new(REPLACE_UNREADABLE),
            renew: Script::new(RENEW),
            record_created: Script::new(&format!("{CLOSE_MARKER}{RECORD_CREATED}")),
            release: Script::new(&format!("{CLOSE_MARKER}{RELEASE}")),
            mark_attempt: Script::new(MARK_ATTEMPT),
            read_attempt: Script::new(READ_ATTEMPT),
            read_keys: Script::new(READ_KEYS),
            unlock: Script::new(UNLOCK),
        }
    }

    /// Run one of the scripts on a connection of its own.
    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        script
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_err)
    }

    pub fn group_key(&self, ext_id: &ExtId) -> String {
        self.keys.key_of(&self.prefix, "group", ext_id.as_str())
    }

    pub fn attempt_key(&self, ext_id: &ExtId) -> String {
        self.keys.key_of(&self.prefix, "attempt", ext_id.as_str())
    }

    pub fn outcome_key(&self, key: OutcomeKey<'_>) -> String {
        match key {
            OutcomeKey::ExtId(ext_id) => self.keys.key_of(&self.prefix, "outcome", ext_id.as_str()),
            OutcomeKey::MessageId(id) => self.keys.key_of(&self.prefix, "message", id),
        }
    }

    /// An operator note `<prefix>:<name>` (the DLQ tools keep what a pass is doing there).
    pub async fn note(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .clone()
            .get(format!("{}:{name}", self.prefix))
            .await
            .map_err(store_err)
    }

    /// Write an operator note, kept `ttl` (for ever when `None`).
    pub async fn set_note(
        &self,
        name: &str,
        text: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = format!("{}:{name}", self.prefix);
        match ttl {
            Some(ttl) => conn.pset_ex::<_, _, ()>(key, text, millis(ttl)).await,
            None => conn.set::<_, _, ()>(key, text).await,
        }
        .map_err(store_err)
    }

    pub async fn delete_note(&self, name: &str) -> Result<(), StoreError> {
        let key = format!("{}:{name}", self.prefix);
        self.conn.clone().del::<_, ()>(key).await.map_err(store_err)
    }

    /// The last outcome kept under `key`; `None` when there is none or it cannot be read
    /// (a report only: an unreadable one is as good as none).
    pub async fn last_outcome(
        &self,
        key: OutcomeKey<'_>,
    ) -> Result<Option<LastOutcome>, StoreError> {
        let (_, raw, _): (String, Option<Vec<u8>>, i64) =
            self.run(&self.read_keys.key(self.outcome_key(key))).await?;
        Ok(raw.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    /// Everything known about one ext id (read-only).
    pub async fn status(&self, ext_id: &ExtId) -> Result<ExtIdStatus, StoreError> {
        // Bytes, not text: a value that is not UTF-8 is still reported, never an error.
        type Read = (
            String,
            Option<Vec<u8>>,
            String,
            Option<Vec<u8>>,
            String,
            Option<Vec<u8>>,
            i64,
        );
        let (kind, raw, attempt_kind, attempts, _, outcome, ttl): Read = self
            .run(
                self.read_keys
                    .key(self.group_key(ext_id))
                    .key(self.attempt_key(ext_id))
                    .key(self.outcome_key(OutcomeKey::ExtId(ext_id))),
            )
            .await?;
        let (record, unreadable) = match (kind.as_str(), raw) {
            ("none", _) => (None, None),
            ("string", Some(bytes)) => match serde_json::from_slice(&bytes) {
                Ok(record) => (Some(record), None),
                Err(e) => (None, Some(format!("not a record of this version ({e})"))),
            },
            (other, _) => (None, Some(format!("a Redis {other}, not a string"))),
        };
        let known = record.is_some() || unreadable.is_some();
        Ok(ExtIdStatus {
            last_outcome: outcome.and_then(|bytes| serde_json::from_slice(&bytes).ok()),
            ttl_ms: Some(ttl).filter(|t| known && *t >= 0),
            record,
            unreadable,
            // An unreadable marker still records that an attempt was made.
            attempt_markers: match (attempt_kind.as_str(), attempts) {
                ("none", _) => 0,
                (_, Some(bytes)) => u64::from(parse_marker(&bytes, 0).count),
                (_, None) => 1,
            },
        })
    }

    fn parse(&self, ext_id: &ExtId, text: &str) -> Result<StoredRecord, StoreError> {
        serde_json::from_str(text).map_err(|source| StoreError::Corrupt {
            key: self.group_key(ext_id),
            source,
        })
    }
}

impl DedupStore for RedisStore {
    async fn claim(&self, ext_id: &ExtId, request: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
        crate::otel::db_step("dedup claim", async move {
            let value = encode(&StoredRecord::Claimed {
                owner: request.owner.to_owned(),
                claimed_at: crate::clock::now_rfc3339(),
            })?;
            let duplicate = encode(request.duplicate)?;
            let (mark, parent, name) = match request.mark {
                Some(p) => ("1", p.parent.to_string(), p.name),
                None => ("0", String::new(), ""),
            };
            let answer: redis::Value = self
                .run(
                    self.claim
                        .key(self.group_key(ext_id))
                        .key(self.outcome_key(OutcomeKey::ExtId(ext_id)))
                        .key(self.attempt_key(ext_id))
                        .arg(value)
                        .arg(millis(request.lease))
                        .arg(duplicate)
                        .arg(millis(request.ttl))
                        .arg(mark)
                        .arg(parent)
                        .arg(name),
                )
                .await?;
            let unexpected = || StoreError::Protocol("unexpected answer to the claim".into());
            let redis::Value::Array(items) = answer else {
                return Err(unexpected());
            };
            match items.as_slice() {
                [redis::Value::BulkString(tag), marked, marker, now] if tag == b"acquired" => {
                    let now = match now {
                        redis::Value::Int(n) => *n,
                        _ => return Err(unexpected()),
                    };
                    let marker = match marker {
                        redis::Value::BulkString(raw) => Some(parse_marker(raw, now)),
                        redis::Value::Nil => None,
                        _ => return Err(unexpected()),
                    };
                    Ok(Claim::Acquired {
                        marker,
                        marked: matches!(marked, redis::Value::Int(1)),
                    })
                }
                [
                    redis::Value::BulkString(tag),
                    redis::Value::BulkString(bytes),
                ] if tag == b"found" => match serde_json::from_slice(bytes) {
                    Ok(StoredRecord::Created(record)) => Ok(Claim::Created(record)),
                    Ok(StoredRecord::Claimed { owner, .. }) => Ok(Claim::HeldByOther { owner }),
                    Err(_) => Ok(Claim::Unreadable(Unreadable::Value(bytes.clone()))),
                },
                [
                    redis::Value::BulkString(tag),
                    redis::Value::BulkString(kind),
                ] if tag == b"type" => Ok(Claim::Unreadable(Unreadable::WrongType(
                    String::from_utf8_lossy(kind).into_owned(),
                ))),
                _ => Err(unexpected()),
            }
        })
        .await
    }

    async fn replace_unreadable(
        &self,
        ext_id: &ExtId,
        found: &Unreadable,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let value = encode(&StoredRecord::Claimed {
            owner: owner.to_owned(),
            claimed_at: crate::clock::now_rfc3339(),
        })?;
        let (mode, seen): (&str, &[u8]) = match found {
            Unreadable::Value(bytes) => ("value", bytes),
            Unreadable::WrongType(kind) => ("type", kind.as_bytes()),
        };
        let replaced: i64 = self
            .run(
                self.replace_unreadable
                    .key(self.group_key(ext_id))
                    .arg(mode)
                    .arg(seen)
                    .arg(value)
                    .arg(millis(lease)),
            )
            .await?;
        Ok(replaced == 1)
    }

    async fn renew(
        &self,
        ext_id: &ExtId,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let renewed: i64 = self
            .run(
                self.renew
                    .key(self.group_key(ext_id))
                    .arg(owner)
                    .arg(millis(lease)),
            )
            .await?;
        Ok(renewed == 1)
    }

    async fn record_created(
        &self,
        ext_id: &ExtId,
        owner: &str,
        record: &CreatedRecord,
        outcome: &LastOutcome,
        ttl: Duration,
    ) -> Result<RecordResult, StoreError> {
        crate::otel::db_step("dedup record", async move {
            let value = encode(&StoredRecord::Created(record.clone()))?;
            let outcome = encode(outcome)?;
            let answer: String = self
                .run(
                    self.record_created
                        .key(self.group_key(ext_id))
                        .key(self.attempt_key(ext_id))
                        .key(self.outcome_key(OutcomeKey::ExtId(ext_id)))
                        .arg(owner)
                        .arg(value)
                        .arg(millis(ttl))
                        .arg(outcome),
                )
                .await?;
            match answer.as_str() {
                "ok" => Ok(RecordResult::Written),
                "fenced" => Ok(RecordResult::Fenced(None)),
                text => match self.parse(ext_id, text)? {
                    StoredRecord::Created(existing) => Ok(RecordResult::Fenced(Some(existing))),
                    StoredRecord::Claimed { .. } => Ok(RecordResult::Fenced(None)),
                },
            }
        })
        .await
    }

    async fn release(&self, ext_id: &ExtId, owner: &str, settled: bool) -> Result<(), StoreError> {
        let _: i64 = self
            .run(
                self.release
                    .key(self.group_key(ext_id))
                    .key(self.attempt_key(ext_id))
                    .arg(owner)
                    .arg(if settled { "1" } else { "0" }),
            )
            .await?;
        Ok(())
    }

    async fn mark_attempt(
        &self,
        ext_id: &ExtId,
        owner: &str,
        posting: Posting<'_>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let marked: i64 = self
            .run(
                self.mark_attempt
                    .key(self.group_key(ext_id))
                    .key(self.attempt_key(ext_id))
                    .arg(owner)
                    .arg(millis(ttl))
                    .arg(posting.parent.to_string())
                    .arg(posting.name),
            )
            .await?;
        Ok(marked == 1)
    }

    async fn attempt(&self, ext_id: &ExtId) -> Result<Option<AttemptMarker>, StoreError> {
        let (raw, now): (Option<Vec<u8>>, i64) = self
            .run(&self.read_attempt.key(self.attempt_key(ext_id)))
            .await?;
        Ok(raw.map(|bytes| parse_marker(&bytes, now)))
    }

    async fn outcome(&self, ext_id: &ExtId) -> Result<Option<LastOutcome>, StoreError> {
        self.last_outcome(OutcomeKey::ExtId(ext_id)).await
    }

    async fn record_outcome(
        &self,
        key: OutcomeKey<'_>,
        outcome: &LastOutcome,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let text = encode(outcome)?;
        conn.pset_ex::<_, _, ()>(self.outcome_key(key), text, millis(ttl))
            .await
            .map_err(store_err)
    }

    /// `PING`: readiness checks and the circuit's probe.
    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(store_err)?;
        Ok(())
    }
}

/// The marker as the scripts write it.
#[derive(Deserialize)]
struct StoredMarker {
    #[serde(default)]
    count: u32,
    #[serde(default)]
    at: i64,
    #[serde(default)]
    open: bool,
    #[serde(default, deserialize_with = "lenient_posted")]
    posted: Vec<(String, String)>,
}

/// cjson writes an empty list as `{}`.
fn lenient_posted<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, String)>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|i| serde_json::from_value(i).ok())
            .collect(),
        _ => Vec::new(),
    })
}

/// A marker of any shape: a JSON marker, an older plain count, or something unreadable
/// (which still says an attempt was made, and is treated as possibly in the air).
fn parse_marker(raw: &[u8], now_ms: i64) -> AttemptMarker {
    if let Ok(m) = serde_json::from_slice::<StoredMarker>(raw) {
        return AttemptMarker {
            count: m.count.max(1),
            age: Duration::from_millis(u64::try_from(now_ms.saturating_sub(m.at)).unwrap_or(0)),
            open: m.open,
            posted: m
                .posted
                .into_iter()
                .filter_map(|(parent, name)| Some((parent.parse().ok()?, name)))
                .collect(),
        };
    }
    AttemptMarker {
        count: std::str::from_utf8(raw)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(1)
            .max(1),
        age: Duration::MAX,
        open: false,
        posted: Vec::new(),
    }
}

/// A value as stored (records, outcomes, token pairs).
fn encode<T: Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(StoreError::Encode)
}

/// The login session shared by replicas: `<prefix>:auth:<account>` holds the
/// token pair, `<prefix>:auth-lock:<account>` serialises refreshes.
impl TokenStore for RedisStore {
    fn load<'a>(
        &'a self,
        account: &'a str,
    ) -> BoxFuture<'a, Result<Option<TokenPair>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let raw: Option<Vec<u8>> = conn
                .get(format!("{}:auth:{account}", self.prefix))
                .await
                .map_err(store_err)?;
            // An unreadable pair is as good as none: a fresh login replaces it.
            Ok(raw.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
        })
    }

    fn save<'a>(
        &'a self,
        account: &'a str,
        pair: &'a TokenPair,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let text = encode(pair)?;
            conn.pset_ex::<_, _, ()>(format!("{}:auth:{account}", self.prefix), text, millis(ttl))
                .await
                .map_err(store_err)
        })
    }

    fn try_lock<'a>(
        &'a self,
        account: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let set: Option<String> = redis::cmd("SET")
                .arg(format!("{}:auth-lock:{account}", self.prefix))
                .arg(owner)
                .arg("NX")
                .arg("PX")
                .arg(millis(ttl))
                .query_async(&mut conn)
                .await
                .map_err(store_err)?;
            Ok(set.is_some())
        })
    }

    fn unlock<'a>(
        &'a self,
        account: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let _: i64 = self
                .run(
                    self.unlock
                        .key(format!("{}:auth-lock:{account}", self.prefix))
                        .arg(owner),
                )
                .await?;
            Ok(())
        })
    }
}

//! The connection the store talks through, whatever the Redis deployment (`redis.mode`):
//! - `standalone`: the redis crate's connection manager, which reconnects in the
//!   background;
//! - `sentinel`: a connection to the master the sentinels name, asked for again whenever
//!   the connection fails or the node answers `READONLY` (a failover demoted it), and
//!   checked against the sentinels when they announce a new master (`+switch-master`,
//!   watched on one sentinel at a time) and at most [`MASTER_CHECK`] apart otherwise:
//!   after a failover the old master keeps accepting writes until the sentinels demote it
//!   (seconds later), and whatever it accepts then is lost when it resyncs from the new
//!   one;
//! - `cluster`: the redis crate's cluster connection, which follows `MOVED`/`ASK` and slot
//!   changes; every key of one ext id carries the same hash tag (see the store's keys), so
//!   each script touches one slot.
//!
//! Invariants:
//! - building a connection never waits for Redis: sentinel and cluster connect on first use
//!   and again after a failure, and a call fails fast (with its timeout) while Redis is away;
//! - standalone and sentinel: a command is sent a second time only when it certainly did
//!   not run: the node refused a write as a replica (`READONLY`, which happens before any
//!   effect), or no connection could be made; never after a request may have reached a
//!   master. Cluster: the redis crate's cluster client also re-sends a command after a
//!   connection error (it must, to follow a failover), so a script can run twice; each of
//!   the store's scripts tolerates that (a repeated claim finds its own claim and defers
//!   the command until the lease ends; a repeated attempt marker only makes the next
//!   owner list before it posts; records are compare-and-set).

use std::future::Future;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// Connect and answer timeouts of every mode (Redis answers in microseconds; anything
/// slower is an outage for the circuit to handle).
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Sentinel mode: how long a master connection is used before the sentinels are asked
/// again whether it is still the master.
pub const MASTER_CHECK: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub enum RedisConn {
    Standalone(ConnectionManager),
    Sentinel(SentinelConn),
    Cluster(LazyCluster),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_command(cmd),
            RedisConn::Sentinel(c) => {
                Box::pin(c.retried(move |mut m| async move { m.req_packed_command(cmd).await }))
            }
            RedisConn::Cluster(c) => Box::pin(async move {
                let mut conn = c.connection().await?;
                let result = conn.req_packed_command(cmd).await;
                c.forget_after(&result);
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Sentinel(c) => Box::pin(c.retried(move |mut m| async move {
                m.req_packed_commands(pipeline, offset, count).await
            })),
            RedisConn::Cluster(c) => Box::pin(async move {
                let mut conn = c.connection().await?;
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                c.forget_after(&result);
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Standalone(c) => c.get_db(),
            RedisConn::Sentinel(c) => c.db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

/// The node was a master and is a replica now, or the connection is gone: ask again.
fn stale(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || refused_as_replica(e)
}

/// `READONLY`, also when a script met it at its first write: nothing was written.
fn refused_as_replica(e: &RedisError) -> bool {
    e.code() == Some("READONLY") || e.to_string().contains("READONLY")
}

/// The master as the sentinels name it, connected on first use and looked up again after
/// a failure, an announcement, or [`MASTER_CHECK`].
///
/// The master is looked up with `SENTINEL GET-MASTER-ADDR-BY-NAME`, which names the
/// promoted replica as soon as a failover promotes it (`SENTINEL MASTERS` keeps naming the
/// old master until the failover ends, while the old master still takes writes that are
/// then lost), and confirmed with `ROLE` on the node itself.
/// Builds a client for the master at `host:port`.
pub type MasterClient = Box<dyn Fn(&str, u16) -> RedisResult<redis::Client> + Send + Sync>;

#[derive(Clone)]
pub struct SentinelConn {
    inner: Arc<SentinelInner>,
}

struct SentinelInner {
    /// One client per sentinel: lookups and the `+switch-master` watch.
    sentinels: Vec<redis::Client>,
    /// The master's name at the sentinels.
    service: String,
    /// Builds a client for the master at `host:port` (scheme, credentials, database and
    /// TLS from `redis.url` and `redis.tls`).
    master_client: MasterClient,
    db: i64,
    current: Mutex<Option<Master>>,
    /// One lookup at a time.
    lookup: tokio::sync::Mutex<()>,
    watching: AtomicBool,
    /// Announcements seen: a lookup that overlapped one does not count as a check.
    announcements: AtomicU64,
}

#[derive(Clone)]
struct Master {
    conn: MultiplexedConnection,
    /// `host:port`, as the sentinels named it.
    addr: String,
    /// When the sentinels last confirmed it; `None` after one announced a switch.
    checked: Option<std::time::Instant>,
}

impl SentinelConn {
    pub fn new(
        sentinels: Vec<redis::Client>,
        service: &str,
        master_client: MasterClient,
        db: i64,
    ) -> SentinelConn {
        SentinelConn {
            inner: Arc::new(SentinelInner {
                sentinels,
                service: service.to_owned(),
                master_client,
                db,
                current: Mutex::new(None),
                lookup: tokio::sync::Mutex::new(()),
                watching: AtomicBool::new(false),
                announcements: AtomicU64::new(0),
            }),
        }
    }

    fn db(&self) -> i64 {
        self.inner.db
    }

    /// Start the `+switch-master` watch (once, from inside the runtime). It ends when the
    /// store is gone.
    fn watch_switches(&self) {
        if self.inner.sentinels.is_empty() || self.inner.watching.swap(true, SeqCst) {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let sentinels = self.inner.sentinels.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            for sentinel in sentinels.iter().cycle() {
                if inner.strong_count() == 0 {
                    return;
                }
                if let Ok(mut pubsub) = sentinel.get_async_pubsub().await
                    && pubsub.subscribe("+switch-master").await.is_ok()
                {
                    let mut announcements = pubsub.on_message();
                    let mut alive = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        let message = tokio::select! {
                            m = announcements.next() => match m {
                                Some(m) => m,
                                None => break,
                            },
                            // The store may be gone while no announcement comes.
                            _ = alive.tick() => {
                                if inner.strong_count() == 0 {
                                    return;
                                }
                                continue;
                            }
                        };
                        let Some(inner) = inner.upgrade() else {
                            return;
                        };
                        // "<name> <old ip> <old port> <new ip> <new port>"
                        let text: String = message.get_payload().unwrap_or_default();
                        if text.split_whitespace().next() != Some(inner.service.as_str()) {
                            continue;
                        }
                        tracing::info!(announcement = %text, "a sentinel announced a new Redis master");
                        inner.announcements.fetch_add(1, SeqCst);
                        if let Some(m) = crate::lock(&inner.current).as_mut() {
                            m.checked = None;
                        }
                    }
                }
                tokio::time::sleep(MASTER_CHECK).await;
            }
        });
    }

    /// The current master connection, if it was confirmed within [`MASTER_CHECK`].
    fn fresh(&self) -> Option<MultiplexedConnection> {
        crate::lock(&self.inner.current)
            .as_ref()
            .filter(|m| m.checked.is_some_and(|at| at.elapsed() < MASTER_CHECK))
            .map(|m| m.conn.clone())
    }

    fn forget(&self) {
        *crate::lock(&self.inner.current) = None;
    }

    /// `host:port` of the master, as the first sentinel that answers names it.
    async fn ask_sentinels(&self) -> RedisResult<(String, u16)> {
        let mut last = timeout_error("no sentinel answered");
        for sentinel in &self.inner.sentinels {
            let asked = async {
                let mut conn = sentinel
                    .get_multiplexed_async_connection_with_config(&connection_config())
                    .await?;
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.inner.service)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
            };
            match tokio::time::timeout(TIMEOUT * 2, asked).await {
                Ok(Ok(Some(addr))) => return Ok(addr),
                Ok(Ok(None)) => {
                    last = RedisError::from((
                        redis::ErrorKind::Client,
                        "a sentinel does not know the master",
                        self.inner.service.clone(),
                    ));
                }
                Ok(Err(e)) => last = e,
                Err(_) => last = timeout_error("asking a sentinel for the master"),
            }
        }
        Err(last)
    }

    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        self.watch_switches();
        let _one = self.inner.lookup.lock().await;
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        let seen = self.inner.announcements.load(SeqCst);
        let (host, port) = self.ask_sentinels().await?;
        let addr = format!("{host}:{port}");
        let mut current = crate::lock(&self.inner.current).clone();
        match &mut current {
            Some(m) if m.addr == addr => m.checked = Some(std::time::Instant::now()),
            _ => {
                let mut conn = (self.inner.master_client)(&host, port)?
                    .get_multiplexed_async_connection_with_config(&connection_config())
                    .await?;
                // The node named must say it is a master: a sentinel that has not yet seen
                // a failover could name a demoted one.
                let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
                if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                    return Err(RedisError::from((
                        redis::ErrorKind::Client,
                        "the node the sentinels name is not a master (yet)",
                        addr,
                    )));
                }
                if current.is_some() {
                    tracing::warn!(master = %addr, "the sentinels name another Redis master; following it");
                }
                current = Some(Master {
                    conn,
                    addr,
                    checked: Some(std::time::Instant::now()),
                });
            }
        }
        let conn = current.as_ref().map(|m| m.conn.clone());
        let mut stored = crate::lock(&self.inner.current);
        *stored = current;
        // An announcement that came while we asked: ask again next time.
        if self.inner.announcements.load(SeqCst) != seen
            && let Some(m) = stored.as_mut()
        {
            m.checked = None;
        }
        drop(stored);
        conn.ok_or_else(|| timeout_error("connecting to the master"))
    }

    /// Send through the master's connection. A command the node refused as a replica
    /// (`READONLY`, before any effect) is sent once more, to the master asked for again; the
    /// store's pipelines only read, so sending one again is harmless too.
    async fn retried<T, F: Future<Output = RedisResult<T>>>(
        &self,
        send: impl Fn(MultiplexedConnection) -> F,
    ) -> RedisResult<T> {
        match send(self.connection().await?).await {
            Err(e) if refused_as_replica(&e) => {
                self.forget();
                send(self.connection().await?).await
            }
            Err(e) => {
                if stale(&e) {
                    self.forget();
                }
                Err(e)
            }
            ok => ok,
        }
    }
}

fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT))
}

/// A cluster connection made on first use (and again after it failed).
#[derive(Clone)]
pub struct LazyCluster {
    client: Arc<redis::cluster::ClusterClient>,
    current: Arc<Mutex<Option<ClusterConnection>>>,
    connecting: Arc<tokio::sync::Mutex<()>>,
}

impl LazyCluster {
    pub fn new(client: redis::cluster::ClusterClient) -> LazyCluster {
        LazyCluster {
            client: Arc::new(client),
            current: Arc::new(Mutex::new(None)),
            connecting: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn cached(&self) -> Option<ClusterConnection> {
        crate::lock(&self.current).clone()
    }

    async fn connection(&self) -> RedisResult<ClusterConnection> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let conn = tokio::time::timeout(TIMEOUT * 2, self.client.get_async_connection())
            .await
            .map_err(|_| timeout_error("connecting to the cluster"))??;
        *crate::lock(&self.current) = Some(conn.clone());
        Ok(conn)
    }

    /// The cluster connection re-discovers slots by itself; a connection that failed at the
    /// transport (dropped, refused, timed out) is dropped all the same and made anew from
    /// the seed nodes, so a slot map stuck on a dead master cannot outlive one call.
    fn forget_after<T>(&self, result: &RedisResult<T>) {
        if let Err(e) = result
            && (e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || e.is_io_error())
        {
            *crate::lock(&self.current) = None;
        }
    }
}

fn timeout_error(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, "timed out", what.to_owned()))
}

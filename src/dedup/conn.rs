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
//! - a command is sent a second time only when it certainly did not run: the node refused
//!   a write as a replica (`READONLY`, which happens before any effect), or no connection
//!   could be made; never after a request may have reached a master.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// Connect and answer timeouts of every mode (Redis answers in microseconds; anything
/// slower is an outage for the circuit to handle).
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Sentinel mode: how long a master connection is used before the sentinels are asked
/// again whether it is still the master.
pub const MASTER_CHECK: Duration = Duration::from_secs(1);

/// How long a `+switch-master` announcement outranks what the asked sentinel says.
const ANNOUNCEMENT_TRUSTED: Duration = Duration::from_secs(30);

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
            RedisConn::Sentinel(c) => Box::pin(c.command(cmd)),
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
            RedisConn::Sentinel(c) => Box::pin(c.commands(pipeline, offset, count)),
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
            RedisConn::Sentinel(c) => c.db,
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
/// a failure.
#[derive(Clone)]
pub struct SentinelConn {
    sentinels: Arc<tokio::sync::Mutex<SentinelClient>>,
    current: Arc<Mutex<Option<Master>>>,
    /// One client per sentinel, for the `+switch-master` watch.
    announcers: Arc<Vec<redis::Client>>,
    /// The master's name at the sentinels.
    service: Arc<str>,
    /// The master a sentinel announced last (`host:port`) and when: until the sentinel
    /// that is asked names it too (they learn of a failover one after the other), no other
    /// is used.
    announced: Arc<Mutex<Option<(String, std::time::Instant)>>>,
    watching: Arc<std::sync::atomic::AtomicBool>,
    db: i64,
}

#[derive(Clone)]
struct Master {
    conn: MultiplexedConnection,
    /// `host:port`, as the sentinels named it.
    addr: String,
    /// When the sentinels last confirmed it; `None` after they announced a switch.
    checked: Option<std::time::Instant>,
}

impl SentinelConn {
    pub fn new(
        sentinels: SentinelClient,
        announcers: Vec<redis::Client>,
        service: &str,
        db: i64,
    ) -> SentinelConn {
        SentinelConn {
            sentinels: Arc::new(tokio::sync::Mutex::new(sentinels)),
            current: Arc::new(Mutex::new(None)),
            announcers: Arc::new(announcers),
            service: Arc::from(service),
            announced: Arc::new(Mutex::new(None)),
            watching: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            db,
        }
    }

    /// Start the `+switch-master` watch (once, from inside the runtime). It ends when the
    /// store is gone.
    fn watch_switches(&self) {
        if self.announcers.is_empty()
            || self
                .watching
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let current = Arc::downgrade(&self.current);
        let announced = Arc::downgrade(&self.announced);
        let service = self.service.clone();
        let announcers = self.announcers.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            for client in announcers.iter().cycle() {
                if current.strong_count() == 0 {
                    return;
                }
                if let Ok(mut pubsub) = client.get_async_pubsub().await
                    && pubsub.subscribe("+switch-master").await.is_ok()
                {
                    let mut announcements = pubsub.on_message();
                    while let Some(message) = announcements.next().await {
                        // "<name> <old ip> <old port> <new ip> <new port>"
                        let text: String = message.get_payload().unwrap_or_default();
                        let parts: Vec<&str> = text.split_whitespace().collect();
                        if parts.len() != 5 || parts[0] != &*service {
                            continue;
                        }
                        let (Some(current), Some(announced)) =
                            (current.upgrade(), announced.upgrade())
                        else {
                            return;
                        };
                        let addr = format!("{}:{}", parts[3], parts[4]);
                        tracing::info!(master = %addr, "a sentinel announced a new Redis master");
                        *announced.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((addr, std::time::Instant::now()));
                        if let Some(m) = current.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
                        {
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
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|m| m.checked.is_some_and(|at| at.elapsed() < MASTER_CHECK))
            .map(|m| m.conn.clone())
    }

    fn forget(&self) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        self.watch_switches();
        // One lookup at a time; whoever waited may find it done.
        let mut sentinels = self.sentinels.lock().await;
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        let master = tokio::time::timeout(TIMEOUT * 2, sentinels.async_get_client())
            .await
            .map_err(|_| timeout_error("asking the sentinels for the master"))??;
        let addr = master.get_connection_info().addr().to_string();
        {
            let mut announced = self.announced.lock().unwrap_or_else(|p| p.into_inner());
            match announced.as_ref() {
                Some((a, _)) if *a == addr => *announced = None,
                Some((a, at)) if at.elapsed() < ANNOUNCEMENT_TRUSTED => {
                    return Err(RedisError::from((
                        redis::ErrorKind::Io,
                        "the sentinels do not agree on the master yet",
                        format!("announced {a}, asked sentinel names {addr}"),
                    )));
                }
                Some(_) => *announced = None,
                None => {}
            }
        }
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match &mut current {
            Some(m) if m.addr == addr => m.checked = Some(std::time::Instant::now()),
            _ => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(TIMEOUT))
                    .set_response_timeout(Some(TIMEOUT));
                let conn = master
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
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
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = current;
        conn.ok_or_else(|| timeout_error("connecting to the master"))
    }

    async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let mut conn = self.connection().await?;
        match conn.req_packed_command(cmd).await {
            Err(e) if refused_as_replica(&e) => {
                self.forget();
                self.connection().await?.req_packed_command(cmd).await
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

    async fn commands(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let mut conn = self.connection().await?;
        match conn.req_packed_commands(pipeline, offset, count).await {
            // The store's pipelines only read: sending one again is harmless.
            Err(e) if refused_as_replica(&e) => {
                self.forget();
                self.connection()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await
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
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// The cluster connection re-discovers slots by itself; only a connection that can
    /// no longer reach any node is dropped, to be made anew.
    fn forget_after<T>(&self, result: &RedisResult<T>) {
        if let Err(e) = result
            && (e.is_connection_dropped() || e.is_connection_refusal())
        {
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

fn timeout_error(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, "timed out", what.to_owned()))
}

//! `group-provisioner run`: the core (with the clients `app` builds) around RabbitMQ: the
//! metrics endpoint, a supervised consuming session, signals and draining.
//!
//! Invariants:
//! - deliveries are processed concurrently, at most `amqp.prefetch` at a time (the
//!   broker's QoS bounds what is in flight);
//! - a delivery is acked only after every publish its decision needs is confirmed;
//! - a lost connection is re-established with backoff and the topology re-declared; the
//!   deliveries of the lost session are redelivered by the broker.

mod execute;
mod session;
mod settled;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::amqp::PublishProbe;
use crate::amqp::headers::CounterBounds;
use crate::amqp::topology::Topology;
use crate::app::{self, AppError};
use crate::config::Settings;
use crate::convirza::ConvirzaClient;
use crate::dedup::{Eviction, RedisStore};
use crate::http::{self, Health};
use crate::metrics::Metrics;
use crate::pipeline::{Circuit, CircuitState, Processor, TierPlace};

pub use session::SessionError;

pub type LiveProcessor = Processor<RedisStore, ConvirzaClient>;

/// Everything a delivery task needs, shared by all of them.
pub(crate) struct Shared {
    pub settings: Settings,
    pub processor: LiveProcessor,
    pub worker_id: String,
    /// A broker session is established (readiness).
    pub connected: Arc<AtomicBool>,
    /// The queues of our own topology: a `reply_to` naming one is refused.
    pub own_queues: HashSet<String>,
    /// How far the counters on a delivery are believed.
    pub counter_bounds: CounterBounds,
    /// The delay tiers, as the last outcome names them.
    pub tier_places: Vec<TierPlace>,
    /// What the circuit's probe must test when a publish fault opened it.
    probe: Mutex<Option<Probe>>,
    /// The process's metrics (the session reports the unrouted-events queue's depth).
    pub metrics: Arc<Metrics>,
    /// Deliveries settled lately, so a redelivery after a lost ack is not done twice.
    pub settled: settled::Settled,
    /// The broker's words when it refused to let this user declare the topology: later
    /// sessions verify it without asking again.
    declare_refused: Mutex<Option<String>>,
    /// Why the broker session cannot be established, for `/readyz` (the topology line).
    pub broker_problem: Arc<Mutex<Option<String>>>,
    /// The `amqp.url` node the next connection tries first: a random one at start (so
    /// replicas spread), the next one after a session is lost.
    pub node: AtomicUsize,
}

/// The probe of a publish fault: test what failed, not something else.
#[derive(Debug, Clone)]
pub(crate) enum Probe {
    /// Publish this event again (consumers dedupe on the ext id; a repeat is harmless).
    Publish(Box<PublishProbe>),
    /// The queue a copy could not reach must exist.
    Queue(String),
}

impl Shared {
    pub fn set_probe(&self, probe: Probe) {
        *crate::lock(&self.probe) = Some(probe);
    }

    pub fn probe(&self) -> Option<Probe> {
        crate::lock(&self.probe).clone()
    }

    pub fn clear_probe(&self) {
        *crate::lock(&self.probe) = None;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    App(#[from] AppError),
    #[error("cannot listen on metrics.listen {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running worker. Dropping the handle does not stop it; call [`WorkerHandle::shutdown`].
pub struct WorkerHandle {
    shutdown: CancellationToken,
    consuming: watch::Receiver<bool>,
    circuit: Arc<Circuit>,
    metrics: Arc<Metrics>,
    metrics_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl WorkerHandle {
    /// Ask the worker to drain and stop (what SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Wait until a session is consuming, or `timeout` passes. Returns whether it is.
    pub async fn wait_consuming(&self, timeout: Duration) -> bool {
        let mut rx = self.consuming.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether a session is consuming right now.
    pub fn is_consuming(&self) -> bool {
        *self.consuming.borrow()
    }

    /// The circuit's state right now.
    pub fn circuit(&self) -> CircuitState {
        self.circuit.state()
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Wait for the worker to finish after [`shutdown`](Self::shutdown).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Start the worker in the background: it serves `metrics.listen` at once, connects
/// (retrying until it can), declares the topology and consumes until
/// [`WorkerHandle::shutdown`].
pub fn start(settings: Settings) -> Result<WorkerHandle, StartError> {
    let store = app::dedup_store(&settings).map_err(AppError::Store)?;
    let worker_id = app::worker_id();
    let metrics = Arc::new(Metrics::new());
    let observed = metrics.clone();
    let client = app::api_client(&settings, &store, &worker_id)?.with_observer(Arc::new(
        move |op, status, elapsed| observed.api_request(op, status, elapsed),
    ));
    let listener = bind(settings.metrics.listen)?;
    let metrics_addr = listener
        .local_addr()
        .map_err(|source| StartError::Metrics {
            addr: settings.metrics.listen,
            source,
        })?;
    let processor = Processor::new(
        store.clone(),
        client,
        app::processor_config(&settings, &worker_id),
    )
    .with_recorder(metrics.clone());
    let circuit = processor.circuit().clone();
    let connected = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared::new(
        settings,
        processor,
        worker_id,
        connected.clone(),
        metrics.clone(),
    ));
    let shutdown = CancellationToken::new();
    let (consuming_tx, consuming) = watch::channel(false);
    let redis_warning = Arc::new(Mutex::new(None));
    let eviction = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watch_eviction(
        store.clone(),
        metrics.clone(),
        redis_warning.clone(),
    )));
    let health = Health {
        metrics: metrics.clone(),
        circuit: circuit.clone(),
        connected,
        consuming: consuming.clone(),
        store,
        redis_warning,
        broker_problem: shared.broker_problem.clone(),
    };
    tracing::info!(listen = %metrics_addr, "serving /healthz, /readyz and /metrics");
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(http::serve(listener, health, http_stop.clone()));
    let worker = session::supervise(shared, shutdown.clone(), consuming_tx);
    let task = tokio::spawn(async move {
        worker.await;
        drop(eviction);
        // The endpoint outlives the drain, so probes see "not ready" until the end.
        http_stop.cancel();
        let _ = http.await;
    });
    Ok(WorkerHandle {
        shutdown,
        consuming,
        circuit,
        metrics,
        metrics_addr,
        task,
    })
}

/// How often Redis's eviction policy is read again (it can be changed at runtime).
const EVICTION_CHECK: Duration = Duration::from_secs(60);

/// Read Redis's eviction policy at start and every [`EVICTION_CHECK`], and say so
/// whenever what it means changes: a warning while Redis may evict dedup records.
async fn watch_eviction(
    store: RedisStore,
    metrics: Arc<Metrics>,
    slot: Arc<Mutex<Option<String>>>,
) {
    let mut last: Option<Eviction> = None;
    loop {
        if let Ok(now) = store.eviction().await
            && last.as_ref() != Some(&now)
        {
            let advice = now.advice();
            match &advice {
                Some(text) => tracing::warn!(redis_policy = now.label(), "{text}"),
                None if last.is_some() => tracing::info!("redis maxmemory-policy is noeviction"),
                None => {}
            }
            metrics.set_redis_policy(now.label());
            *crate::lock(&slot) = advice;
            last = Some(now);
        }
        // Until Redis first answers, ask again soon.
        let wait = if last.is_some() {
            EVICTION_CHECK
        } else {
            Duration::from_secs(2)
        };
        tokio::time::sleep(wait).await;
    }
}

fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    let err = |source: std::io::Error| StartError::Metrics { addr, source };
    let std_listener = std::net::TcpListener::bind(addr).map_err(err)?;
    std_listener.set_nonblocking(true).map_err(err)?;
    http::prepare_listener(&std_listener);
    tokio::net::TcpListener::from_std(std_listener).map_err(err)
}

impl Shared {
    fn declare_refused(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        crate::lock(&self.declare_refused)
    }

    fn set_broker_problem(&self, problem: Option<String>) {
        *crate::lock(&self.broker_problem) = problem;
    }

    /// What every session of the worker shares, derived once from the settings.
    fn new(
        settings: Settings,
        processor: Processor<RedisStore, ConvirzaClient>,
        worker_id: String,
        connected: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> Shared {
        let own_queues = Topology::new(&settings.topology, &settings.retry.delays)
            .queues
            .into_iter()
            .map(|q| q.name)
            .collect();
        let tier_places: Vec<TierPlace> = settings
            .retry
            .delays
            .iter()
            .map(|t| TierPlace {
                queue: settings.topology.delay_queue(t),
                label: t.label.clone(),
                delay: t.delay,
            })
            .collect();
        let counter_bounds = CounterBounds {
            delay_queues: tier_places.iter().map(|t| t.queue.clone()).collect(),
            max_tries: settings.retry.max_tries,
        };
        let node = AtomicUsize::new(crate::amqp::random_start(&settings.amqp.url));
        Shared {
            tier_places,
            settings,
            processor,
            worker_id,
            connected,
            own_queues,
            counter_bounds,
            probe: Mutex::new(None),
            declare_refused: Mutex::new(None),
            settled: settled::Settled::default(),
            broker_problem: Arc::new(Mutex::new(None)),
            node,
            metrics,
        }
    }
}

/// The `run` subcommand: start, wait for SIGTERM/SIGINT, drain. Returns once the worker
/// has stopped; an error only when it could not start.
pub async fn run(settings: Settings) -> Result<(), StartError> {
    let stop = crate::shutdown::listen();
    tracing::info!(
        version = crate::VERSION,
        commit = crate::COMMIT,
        api = %settings.api.base_url,
        amqp = %settings.amqp.url,
        amqp_tls = %crate::app::amqp_tls_state(&settings),
        redis = %settings.redis.describe(),
        redis_tls = %crate::app::redis_tls_state(&settings),
        prefetch = settings.amqp.prefetch,
        "worker starting"
    );
    for warning in settings.api.cleartext_warnings() {
        tracing::warn!("{warning}");
    }
    let handle = start(settings)?;
    stop.await;
    tracing::info!("shutdown requested; draining");
    handle.shutdown();
    handle.join().await;
    tracing::info!("worker stopped");
    Ok(())
}

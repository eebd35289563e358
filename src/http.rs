//! The worker's HTTP endpoint on `metrics.listen`: `/healthz`, `/readyz`, `/metrics`.
//!
//! Invariants: `/healthz` answers while the process runs; `/readyz` is 200 only when the
//! broker session is up, a consumer is running, Redis answers and the circuit is closed —
//! otherwise 503 with every failing reason, one per line.
//!
//! The endpoint may be reachable by anyone (images bind it on `0.0.0.0`), so no client can
//! hold on to it. The kernel hands a connection over only once its client has sent
//! something ([`prepare_listener`]). At most [`MAX_CONNECTIONS`] connections at once: in a
//! full house, a connection without its whole request is closed to make room once it has
//! had [`ADMISSION_GRACE`]; a newcomer whose request is already waiting (a probe's, a
//! scrape's) takes the place of the oldest such connection at once; a newcomer with only
//! part of a request while every place is younger is closed. So a burst of connections
//! cannot push out a probe about to be served. The request header must arrive within
//! [`HEADER_READ_TIMEOUT`], a connection serves one request and lives at most
//! [`CONNECTION_LIFETIME`]. A flood costs the flooder; the worker's own connections to the
//! broker, Redis and the API keep their file descriptors, and probes keep their answers.
//!
//! Why the admission is this module's own: hyper's connection builder and a semaphore alone
//! let a full house of slow clients make a probe wait past its timeout
//! (`tests/it/endpoint.rs`, `with_the_crates_alone_a_full_house_of_slow_clients_silences_a_probe`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::dedup::RedisStore;
use crate::metrics::{self, Metrics};
use crate::pipeline::{Circuit, CircuitState, DedupStore};

#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    pub circuit: Arc<Circuit>,
    pub connected: Arc<AtomicBool>,
    pub consuming: watch::Receiver<bool>,
    pub store: RedisStore,
    /// What to say about Redis's eviction policy, as last read (`None`: nothing).
    pub redis_warning: Arc<Mutex<Option<String>>>,
    /// Why the broker session cannot be established, when the worker knows more than
    /// "not connected" (a topology it can neither declare nor verify).
    pub broker_problem: Arc<Mutex<Option<String>>>,
}

impl Health {
    /// Every reason the worker is not ready (empty: ready).
    pub async fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.connected.load(Ordering::SeqCst) {
            let problem = crate::lock(&self.broker_problem);
            reasons.push(match problem.as_ref() {
                Some(line) => format!("broker: not connected: {line}"),
                None => "broker: not connected".to_owned(),
            });
        }
        if let CircuitState::Open { fault } = self.circuit.state() {
            reasons.push(format!("circuit open: {fault}"));
        }
        if !*self.consuming.borrow() {
            reasons.push("consumer: not running".to_owned());
        }
        match tokio::time::timeout(Duration::from_secs(1), self.store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => reasons.push(format!("redis: {e}")),
            Err(_) => reasons.push("redis: no answer within 1s".to_owned()),
        }
        reasons
    }
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn readyz(State(h): State<Health>) -> Response {
    let reasons = h.not_ready().await;
    if !reasons.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", reasons.join("\n")),
        )
            .into_response();
    }
    // Ready all the same: the worker goes on, but someone should act on these.
    let mut body = String::from("ready\n");
    let unrouted = h.metrics.unrouted_events();
    if unrouted > 0 {
        body.push_str(&format!(
            "warning: {unrouted} events nobody is bound for wait in the unrouted-events queue (bind a queue, then events replay-unrouted)\n"
        ));
    }
    if let Some(text) = crate::lock(&h.redis_warning).as_ref() {
        body.push_str(&format!("warning: {text}\n"));
    }
    (StatusCode::OK, body).into_response()
}

async fn metrics(State(h): State<Health>, headers: HeaderMap) -> Response {
    // Readiness as a series, so an alert reads it whatever the scrape job is called.
    h.metrics.set_ready(h.not_ready().await.is_empty());
    let body = h.metrics.render(h.circuit.is_open());
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = metrics::Format::negotiate(accept);
    let body = match format {
        metrics::Format::OpenMetrics => body,
        metrics::Format::Classic => metrics::classic(&body),
    };
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::VARY, "Accept"),
        ],
        body,
    )
        .into_response()
}

/// Connections served at once; more close the oldest one still waiting for its request.
/// Probes and scrapes take a connection for milliseconds, so this is far above need and
/// far below the common file-descriptor limit of 1,024.
pub const MAX_CONNECTIONS: usize = 256;
/// The whole request header must arrive within this (kubelet and Prometheus send it at
/// once).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// No connection lives longer, however slowly its client reads the answer.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// A connection without a complete request keeps its place this long before a newcomer may
/// take it (a real client sends its request within milliseconds of connecting).
pub const ADMISSION_GRACE: Duration = Duration::from_millis(500);
/// Request line and headers, at most (hyper's smallest allowed buffer is 8 KiB).
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// After a failed `accept` (out of file descriptors, say), wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serve until `shutdown`, then close every connection.
pub async fn serve(listener: tokio::net::TcpListener, health: Health, shutdown: CancellationToken) {
    let metrics = health.metrics.clone();
    let router = router(health);
    let slots = Arc::new(Slots::default());
    let mut accept_errors = 0u64;
    let mut peek = vec![0u8; MAX_HEADER_BYTES];
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if accept_errors.is_multiple_of(100) {
                    tracing::warn!(error = %e, failures = accept_errors + 1, "metrics endpoint: accept failed");
                }
                accept_errors += 1;
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let requested = request_waiting(&stream, &mut peek);
        let (admitted, shed) = slots.admit(requested, std::time::Instant::now());
        if shed {
            metrics.http_connection_shed();
        }
        // Refused: dropping the stream closes it.
        let Some(slot) = admitted else {
            continue;
        };
        let (router, slots, stop) = (router.clone(), slots.clone(), shutdown.clone());
        tokio::spawn(async move {
            let id = slot.id;
            serve_connection(stream, router, slot, stop).await;
            slots.leave(id);
        });
    }
    slots.close_all();
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: Router,
    slot: Slot,
    stop: CancellationToken,
) {
    let served = slot.served.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        served.store(true, Ordering::SeqCst);
        router.clone().oneshot(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(false);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
        () = slot.close.cancelled() => {}
        () = stop.cancelled() => {}
    }
}

/// Connections the kernel may hold for us to accept.
const ACCEPT_BACKLOG: i32 = 4096;

/// Set up the listening socket: a deep accept queue (the kernel caps it at
/// net.core.somaxconn: when a burst overflows it, the kernel drops the SYN of whoever comes
/// next — a probe — which then waits a second to retry), and TCP_DEFER_ACCEPT — the kernel
/// hands over a connection only once its client has sent something (or
/// [`HEADER_READ_TIMEOUT`] has passed): a client that connects and says nothing costs no
/// file descriptor of ours, and on every accepted connection a probe's request is already
/// there to be seen. If refused, the endpoint's other limits still hold.
pub fn prepare_listener(listener: &std::net::TcpListener) {
    if let Err(e) = socket2::SockRef::from(listener).listen(ACCEPT_BACKLOG) {
        tracing::warn!(error = %e, "metrics endpoint: cannot deepen the accept queue");
    }
    let seconds = u32::try_from(HEADER_READ_TIMEOUT.as_secs()).unwrap_or(2);
    if let Err(e) = crate::sys::defer_accept(listener, seconds) {
        tracing::warn!(error = %e, "metrics endpoint: TCP_DEFER_ACCEPT refused");
    }
}

/// Whether a whole request header is already waiting on a just-accepted connection (a
/// probe or a scrape sends it at once; with [`prepare_listener`] it is there when the
/// connection is accepted); never waits (the socket is non-blocking).
fn request_waiting(stream: &tokio::net::TcpStream, buf: &mut [u8]) -> bool {
    // Straight to the socket: tokio's readiness for a just-accepted stream is not known
    // until its first event, so its own `peek` would say "nothing yet" though data is there.
    // Through a duplicate of its descriptor (the same non-blocking socket): std's `peek`
    // asks the socket itself.
    use std::os::fd::AsFd;
    stream
        .as_fd()
        .try_clone_to_owned()
        .map(std::net::TcpStream::from)
        .and_then(|s| s.peek(buf))
        .ok()
        .and_then(|n| buf.get(..n))
        .is_some_and(|seen| seen.windows(4).any(|w| w == b"\r\n\r\n"))
}

/// One open connection: when it was accepted, whether its request arrived, and how to
/// close it.
#[derive(Clone)]
struct Slot {
    id: u64,
    opened: std::time::Instant,
    served: Arc<AtomicBool>,
    close: CancellationToken,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Slots {
    open: Mutex<VecDeque<Slot>>,
    next_id: AtomicU64,
}

impl Slots {
    /// Admit a new connection (`requested`: its request is complete already) at `now`:
    /// its slot, or `None` when it is refused, and whether a connection was shed (closed
    /// for it, or the refused newcomer itself).
    fn admit(&self, requested: bool, now: std::time::Instant) -> (Option<Slot>, bool) {
        let slot = Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            opened: now,
            served: Arc::new(AtomicBool::new(requested)),
            close: CancellationToken::new(),
        };
        let mut open = crate::lock(&self.open);
        if open.len() < MAX_CONNECTIONS {
            open.push_back(slot.clone());
            return (Some(slot), false);
        }
        let waiting = |s: &Slot| !s.served.load(Ordering::SeqCst);
        let victim = open
            .iter()
            .position(|s| waiting(s) && now.duration_since(s.opened) >= ADMISSION_GRACE)
            .or_else(|| {
                // A newcomer ready to be served goes before any connection still waiting,
                // or else before the oldest; one with nothing to say waits its turn.
                requested.then(|| open.iter().position(waiting).unwrap_or(0))
            });
        match victim.and_then(|i| open.remove(i)) {
            Some(old) => {
                old.close.cancel();
                open.push_back(slot.clone());
                (Some(slot), true)
            }
            None => (None, true),
        }
    }

    fn leave(&self, id: u64) {
        let mut open = crate::lock(&self.open);
        if let Some(i) = open.iter().position(|s| s.id == id) {
            open.remove(i);
        }
    }

    fn close_all(&self) {
        let mut open = crate::lock(&self.open);
        for slot in open.drain(..) {
            slot.close.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_house_makes_room_without_pushing_out_a_connection_about_to_be_served() {
        let slots = Slots::default();
        let t0 = std::time::Instant::now();
        let first: Vec<Slot> = (0..MAX_CONNECTIONS)
            .filter_map(|_| slots.admit(false, t0).0)
            .collect();
        assert_eq!(first.len(), MAX_CONNECTIONS);
        let count = || slots.open.lock().expect("lock").len();

        // All young: a newcomer with nothing to say is refused, nobody is closed.
        let (admitted, shed) = slots.admit(false, t0 + ADMISSION_GRACE / 2);
        assert!(admitted.is_none() && shed);
        assert!(first.iter().all(|s| !s.close.is_cancelled()));
        // A newcomer whose request is waiting takes the oldest waiting one's place.
        first[0].served.store(true, Ordering::SeqCst);
        let (probe, shed) = slots.admit(true, t0 + ADMISSION_GRACE / 2);
        let probe = probe.expect("a ready newcomer is admitted");
        assert!(shed && first[1].close.is_cancelled() && !first[0].close.is_cancelled());
        assert_eq!(count(), MAX_CONNECTIONS);

        // After the grace, any newcomer may take the oldest waiting one's place…
        let later = t0 + ADMISSION_GRACE;
        let (admitted, _) = slots.admit(false, later);
        assert!(admitted.is_some() && first[2].close.is_cancelled());
        // …but a burst never pushes out a young connection (the probe, or one that may
        // be about to send its request).
        let young = slots.admit(false, later).0;
        for _ in 0..MAX_CONNECTIONS * 4 {
            slots.admit(false, later + ADMISSION_GRACE / 10);
        }
        assert!(!probe.close.is_cancelled());
        assert!(young.is_some_and(|y| !y.close.is_cancelled()));
        assert_eq!(count(), MAX_CONNECTIONS);

        // Leaving frees a place: no shedding below the cap.
        slots.leave(probe.id);
        let (admitted, shed) = slots.admit(false, later);
        assert!(admitted.is_some() && !shed);
    }
}

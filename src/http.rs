//! The worker's HTTP endpoint on `metrics.listen`: `/healthz`, `/readyz`, `/metrics`.
//!
//! Invariants: `/healthz` answers while the process runs; `/readyz` is 200 only when the
//! broker session is up, a consumer is running, Redis answers and the circuit is closed —
//! otherwise 503 with every failing reason, one per line.
//!
//! The endpoint may be reachable by anyone (images bind it on `0.0.0.0`), so no client can
//! hold on to it: at most [`MAX_CONNECTIONS`] connections at once (a full house closes the
//! oldest connection still without a complete request; one whose request is already
//! waiting when it is accepted — a probe's — is not a candidate), the request header must
//! arrive within
//! [`HEADER_READ_TIMEOUT`], a connection serves one request and lives at most
//! [`CONNECTION_LIFETIME`]. A flood costs the flooder; the worker's own connections to the
//! broker, Redis and the API keep their file descriptors, and probes keep their answers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
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
}

impl Health {
    /// Every reason the worker is not ready (empty: ready).
    pub async fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.connected.load(Ordering::SeqCst) {
            reasons.push("broker: not connected".to_owned());
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
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", reasons.join("\n")),
        )
            .into_response()
    }
}

async fn metrics(State(h): State<Health>) -> Response {
    let body = h.metrics.render(h.circuit.is_open());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
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
        let (slot, shed) = slots.admit(request_waiting(&stream, &mut peek));
        if shed {
            metrics.http_connection_shed();
        }
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

/// Whether a whole request header is already waiting on a just-accepted connection (a
/// probe or a scrape sends it at once); never waits.
fn request_waiting(stream: &tokio::net::TcpStream, buf: &mut [u8]) -> bool {
    use futures_util::FutureExt as _;
    match stream.peek(buf).now_or_never() {
        Some(Ok(n)) => buf[..n].windows(4).any(|w| w == b"\r\n\r\n"),
        _ => false,
    }
}

/// One open connection: whether its request arrived, and how to close it.
#[derive(Clone)]
struct Slot {
    id: u64,
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
    /// A slot for a new connection (`requested`: its request is complete already), and
    /// whether another connection was closed for it: the oldest still waiting for its
    /// request, or else the oldest.
    fn admit(&self, requested: bool) -> (Slot, bool) {
        let slot = Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            served: Arc::new(AtomicBool::new(requested)),
            close: CancellationToken::new(),
        };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut shed = false;
        if open.len() >= MAX_CONNECTIONS {
            let victim = open
                .iter()
                .position(|s| !s.served.load(Ordering::SeqCst))
                .unwrap_or(0);
            if let Some(old) = open.remove(victim) {
                old.close.cancel();
                shed = true;
            }
        }
        open.push_back(slot.clone());
        (slot, shed)
    }

    fn leave(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = open.iter().position(|s| s.id == id) {
            open.remove(i);
        }
    }

    fn close_all(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for slot in open.drain(..) {
            slot.close.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_house_closes_the_oldest_connection_still_waiting_for_its_request() {
        let slots = Slots::default();
        let first: Vec<Slot> = (0..MAX_CONNECTIONS).map(|_| slots.admit(false).0).collect();
        // The two oldest are being served; the third oldest is only waiting.
        first[0].served.store(true, Ordering::SeqCst);
        first[1].served.store(true, Ordering::SeqCst);
        let (_, shed) = slots.admit(false);
        assert!(shed);
        assert!(first[2].close.is_cancelled(), "the oldest idle one goes");
        assert!(!first[0].close.is_cancelled() && !first[1].close.is_cancelled());
        assert_eq!(slots.open.lock().expect("lock").len(), MAX_CONNECTIONS);
        // When every connection is being served, the oldest goes.
        for s in slots.open.lock().expect("lock").iter() {
            s.served.store(true, Ordering::SeqCst);
        }
        assert!(slots.admit(false).1);
        assert!(first[0].close.is_cancelled());
        // Leaving frees a place: no shedding below the cap.
        slots.leave(first[1].id);
        assert!(!slots.admit(false).1);
        // A connection admitted with its request waiting is not a candidate.
        let (probe, _) = slots.admit(true);
        for _ in 0..MAX_CONNECTIONS * 2 {
            slots.admit(false);
        }
        assert!(!probe.close.is_cancelled());
    }
}

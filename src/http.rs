//! The worker's HTTP endpoint on `metrics.listen`: `/healthz`, `/readyz`, `/metrics`.
//!
//! Invariants: `/healthz` answers while the process runs; `/readyz` is 200 only when the
//! broker session is up, a consumer is running, Redis answers and the circuit is closed —
//! otherwise 503 with every failing reason, one per line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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

/// Serve until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, health: Health, shutdown: CancellationToken) {
    let result = axum::serve(listener, router(health))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

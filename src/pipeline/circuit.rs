//! The circuit and the account-wide rate-limit pause.
//!
//! Invariants:
//! - the circuit opens on a fault of the system (credentials, endpoint, Redis, the API
//!   failing `failure_threshold` times in a row) and only closes through [`Circuit::close`],
//!   which the worker calls after a successful probe;
//! - each state change is logged exactly once, whoever triggers it and however many
//!   deliveries hit the same fault at once;
//! - while open, the core parks deliveries without touching Redis or the API;
//! - a 429's `Retry-After` holds back *every* API call of this worker until it passes (the
//!   limit is the account's, not the message's).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::decision::SystemFault;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open { fault: SystemFault },
}

#[derive(Debug)]
pub struct Circuit {
    state: watch::Sender<CircuitState>,
    consecutive_failures: AtomicU32,
    threshold: u32,
    not_before: Mutex<Option<Instant>>,
}

impl Circuit {
    pub fn new(threshold: u32) -> Circuit {
        Circuit {
            state: watch::Sender::new(CircuitState::Closed),
            consecutive_failures: AtomicU32::new(0),
            threshold: threshold.max(1),
            not_before: Mutex::new(None),
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(*self.state.borrow(), CircuitState::Open { .. })
    }

    pub fn state(&self) -> CircuitState {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<CircuitState> {
        self.state.subscribe()
    }

    /// Open the circuit for `fault` (no-op, and no log line, if it is already open).
    pub fn trip(&self, fault: SystemFault) {
        let opened = self.state.send_if_modified(|state| match state {
            CircuitState::Closed => {
                *state = CircuitState::Open {
                    fault: fault.clone(),
                };
                true
            }
            CircuitState::Open { .. } => false,
        });
        if opened {
            tracing::error!(
                circuit = "open",
                fault = fault.label(),
                reason = %fault,
                "circuit opened: consumption paused, held deliveries are parked"
            );
        }
    }

    /// Close after a successful probe.
    pub fn close(&self) {
        self.consecutive_failures.store(0, Ordering::SeqCst);
        let closed = self.state.send_if_modified(|state| match state {
            CircuitState::Open { .. } => {
                *state = CircuitState::Closed;
                true
            }
            CircuitState::Closed => false,
        });
        if closed {
            tracing::info!(
                circuit = "closed",
                "circuit closed: probe succeeded, consumption resumes"
            );
        }
    }

    /// A create POST was answered (anything but a transient failure).
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::SeqCst);
    }

    /// A transient API failure. Returns true when it completes a run of `threshold`: the
    /// circuit is then open and the caller should stop retrying.
    pub fn record_transient(&self, error: &str) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.threshold {
            self.trip(SystemFault::ApiDown(format!(
                "{n} consecutive transient failures; last: {error}"
            )));
            return true;
        }
        self.is_open()
    }

    /// Hold every API call back until `wait` has passed (a 429's `Retry-After`).
    pub fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut nb = crate::lock(&self.not_before);
        if nb.is_none_or(|current| current < until) {
            *nb = Some(until);
            tracing::warn!(
                pause_ms = wait.as_millis() as u64,
                "API rate limit: pausing all API calls"
            );
        }
    }

    /// Wait out an account-wide pause, if any.
    pub async fn wait_until_allowed(&self) {
        let until = *crate::lock(&self.not_before);
        if let Some(until) = until
            && until > Instant::now()
        {
            tokio::time::sleep_until(until).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_the_threshold_and_resets_on_success() {
        let c = Circuit::new(3);
        assert!(!c.record_transient("a"));
        assert!(!c.record_transient("b"));
        c.record_success();
        assert!(!c.record_transient("c"));
        assert!(!c.record_transient("d"));
        assert!(c.record_transient("e"), "third in a row opens");
        assert!(matches!(
            c.state(),
            CircuitState::Open {
                fault: SystemFault::ApiDown(_)
            }
        ));
        // Further failures keep it open and say so.
        assert!(c.record_transient("f"));
        c.close();
        assert_eq!(c.state(), CircuitState::Closed);
        assert!(!c.record_transient("g"), "the count restarted");
    }

    #[test]
    fn trip_keeps_the_first_fault() {
        let c = Circuit::new(10);
        let rx = c.subscribe();
        c.trip(SystemFault::Store("down".into()));
        c.trip(SystemFault::Unauthorized("401".into()));
        assert_eq!(
            c.state(),
            CircuitState::Open {
                fault: SystemFault::Store("down".into())
            }
        );
        assert!(rx.has_changed().unwrap_or(false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_pause_holds_every_caller() {
        let c = Circuit::new(10);
        let started = Instant::now();
        c.pause_for(Duration::from_secs(3));
        c.pause_for(Duration::from_secs(1)); // a shorter pause does not shorten it
        c.wait_until_allowed().await;
        assert_eq!(started.elapsed().as_secs(), 3);
        c.wait_until_allowed().await;
        assert_eq!(started.elapsed().as_secs(), 3, "no wait once it has passed");
    }
}

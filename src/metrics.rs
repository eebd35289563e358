//! Prometheus metrics (SPEC §8), kept in atomics and rendered as text on `/metrics`.
//!
//! Invariants: names follow Prometheus conventions (`_total` counters, `_seconds`
//! histograms); label values come from closed sets (outcomes, failure kinds, HTTP status
//! codes, operation names), so no escaping is needed and cardinality stays bounded.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::pipeline::{FailureKind, Outcome};

const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// Why a message went to a delay queue (the `reason` label of deferrals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeferReason {
    Transient,
    Claimed,
    Parked,
}

impl DeferReason {
    const ALL: [DeferReason; 3] = [
        DeferReason::Transient,
        DeferReason::Claimed,
        DeferReason::Parked,
    ];

    fn as_str(self) -> &'static str {
        match self {
            DeferReason::Transient => "transient",
            DeferReason::Claimed => "claimed",
            DeferReason::Parked => "parked",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    commands: [AtomicU64; Outcome::ALL.len()],
    dead_letters: [AtomicU64; FailureKind::ALL.len()],
    deferrals: [AtomicU64; DeferReason::ALL.len()],
    retries: AtomicU64,
    dedup_hits: AtomicU64,
    in_flight: AtomicI64,
    /// (operation, status) → count; status is the HTTP code or `error` (no answer).
    api_requests: Mutex<BTreeMap<(&'static str, String), u64>>,
    api_durations: Mutex<BTreeMap<&'static str, Histogram>>,
}

fn index_of<T: PartialEq>(all: &[T], item: &T) -> usize {
    all.iter().position(|x| x == item).unwrap_or(0)
}

impl Metrics {
    pub fn command(&self, outcome: Outcome) {
        self.commands[index_of(&Outcome::ALL, &outcome)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dead_letter(&self, kind: FailureKind) {
        self.dead_letters[index_of(&FailureKind::ALL, &kind)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn deferral(&self, reason: DeferReason) {
        self.deferrals[index_of(&DeferReason::ALL, &reason)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dedup_hit(&self) {
        self.dedup_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a delivery in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub fn api_request(&self, operation: &'static str, status: Option<u16>, elapsed: Duration) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        let mut requests = self.api_requests.lock().unwrap_or_else(|p| p.into_inner());
        *requests.entry((operation, status)).or_insert(0) += 1;
        drop(requests);
        let mut durations = self.api_durations.lock().unwrap_or_else(|p| p.into_inner());
        durations
            .entry(operation)
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    pub fn commands_total(&self, outcome: Outcome) -> u64 {
        self.commands[index_of(&Outcome::ALL, &outcome)].load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, circuit_open: bool) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP provisioner_build_info Worker version.");
        let _ = writeln!(out, "# TYPE provisioner_build_info gauge");
        let _ = writeln!(
            out,
            "provisioner_build_info{{version=\"{}\"}} 1",
            crate::VERSION
        );

        header(
            &mut out,
            "provisioner_commands_total",
            "counter",
            "Deliveries by final outcome.",
        );
        for (i, o) in Outcome::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "provisioner_commands_total{{outcome=\"{}\"}} {}",
                o.as_str(),
                self.commands[i].load(Ordering::Relaxed)
            );
        }

        header(
            &mut out,
            "provisioner_api_requests_total",
            "counter",
            "Convirza API requests by operation and HTTP status (error: no answer).",
        );
        let requests = self
            .api_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for ((op, status), n) in &requests {
            let _ = writeln!(
                out,
                "provisioner_api_requests_total{{operation=\"{op}\",status=\"{status}\"}} {n}"
            );
        }

        header(
            &mut out,
            "provisioner_api_request_duration_seconds",
            "histogram",
            "Convirza API request latency.",
        );
        let durations = self
            .api_durations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (op, h) in &durations {
            for (le, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "provisioner_api_request_duration_seconds_bucket{{operation=\"{op}\",le=\"{le}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "provisioner_api_request_duration_seconds_bucket{{operation=\"{op}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "provisioner_api_request_duration_seconds_sum{{operation=\"{op}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "provisioner_api_request_duration_seconds_count{{operation=\"{op}\"}} {}",
                h.count
            );
        }

        header(
            &mut out,
            "provisioner_retries_total",
            "counter",
            "In-process retries of API calls after transient failures.",
        );
        let _ = writeln!(
            out,
            "provisioner_retries_total {}",
            self.retries.load(Ordering::Relaxed)
        );

        header(
            &mut out,
            "provisioner_deferrals_total",
            "counter",
            "Messages moved to a delay queue, by reason.",
        );
        for (i, r) in DeferReason::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "provisioner_deferrals_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.deferrals[i].load(Ordering::Relaxed)
            );
        }

        header(
            &mut out,
            "provisioner_in_flight",
            "gauge",
            "Deliveries being processed now.",
        );
        let _ = writeln!(
            out,
            "provisioner_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );

        header(
            &mut out,
            "provisioner_circuit_open",
            "gauge",
            "1 while the circuit is open (consumption paused).",
        );
        let _ = writeln!(out, "provisioner_circuit_open {}", u8::from(circuit_open));

        header(
            &mut out,
            "provisioner_dedup_hits_total",
            "counter",
            "Commands answered from the Redis created record, without an API call.",
        );
        let _ = writeln!(
            out,
            "provisioner_dedup_hits_total {}",
            self.dedup_hits.load(Ordering::Relaxed)
        );

        header(
            &mut out,
            "provisioner_dead_letters_total",
            "counter",
            "Messages dead-lettered by the worker, by failure kind.",
        );
        for (i, k) in FailureKind::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "provisioner_dead_letters_total{{kind=\"{}\"}} {}",
                k.as_str(),
                self.dead_letters[i].load(Ordering::Relaxed)
            );
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_in_text_format() {
        let m = Metrics::default();
        m.command(Outcome::Created);
        m.command(Outcome::Created);
        m.command(Outcome::DeadLettered);
        m.dead_letter(FailureKind::Rejected);
        m.deferral(DeferReason::Claimed);
        m.retry();
        m.dedup_hit();
        m.api_request("create_group", Some(201), Duration::from_millis(30));
        m.api_request("create_group", None, Duration::from_secs(3));
        let guard = m.in_flight();
        let text = m.render(true);
        drop(guard);
        for line in [
            "provisioner_commands_total{outcome=\"created\"} 2",
            "provisioner_commands_total{outcome=\"dead_lettered\"} 1",
            "provisioner_commands_total{outcome=\"failed\"} 0",
            "provisioner_api_requests_total{operation=\"create_group\",status=\"201\"} 1",
            "provisioner_api_requests_total{operation=\"create_group\",status=\"error\"} 1",
            "provisioner_api_request_duration_seconds_bucket{operation=\"create_group\",le=\"0.05\"} 1",
            "provisioner_api_request_duration_seconds_bucket{operation=\"create_group\",le=\"5\"} 2",
            "provisioner_api_request_duration_seconds_bucket{operation=\"create_group\",le=\"+Inf\"} 2",
            "provisioner_api_request_duration_seconds_count{operation=\"create_group\"} 2",
            "provisioner_retries_total 1",
            "provisioner_deferrals_total{reason=\"claimed\"} 1",
            "provisioner_in_flight 1",
            "provisioner_circuit_open 1",
            "provisioner_dedup_hits_total 1",
            "provisioner_dead_letters_total{kind=\"rejected\"} 1",
            "# TYPE provisioner_api_request_duration_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(m.render(false).contains("provisioner_in_flight 0"));
    }
}

//! Prometheus metrics through `prometheus-client` (OpenMetrics text on `/metrics`).
//!
//! Invariants:
//! - names and labels are the contract monitoring relies on: `provisioner_commands_total
//!   {outcome}`, `provisioner_api_requests_total{operation,status}`,
//!   `provisioner_api_request_duration_seconds{operation}`, `provisioner_retries_total`,
//!   `provisioner_deferrals_total{reason}`, `provisioner_in_flight`,
//!   `provisioner_circuit_open`, `provisioner_dedup_hits_total`,
//!   `provisioner_dead_letters_total{kind}`, `provisioner_orphaned_groups_total`,
//!   `provisioner_http_connections_shed_total`, `provisioner_log_lines_dropped_total
//!   {reason}`, `provisioner_trace_spans_dropped_total{reason}`, `provisioner_ready`, `provisioner_redis_maxmemory_policy{policy}`,
//!   `provisioner_build_info{version,commit}`;
//! - label values come from closed, typed sets (outcomes, failure kinds, deferral
//!   reasons, operations, HTTP status codes), so cardinality stays bounded, and every
//!   value of a closed set is exported from the start (at 0), so alerts see the series
//!   before the first event;
//! - the core records through the [`Recorder`] trait and never sees this registry.

use std::fmt::Write as _;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::convirza::Operation;
use crate::pipeline::{DeferReason, FailureKind, Outcome, Recorder};

/// The two expositions `/metrics` speaks, chosen by the scraper's `Accept` header as the
/// Prometheus client libraries do: OpenMetrics when asked for, the classic text format
/// (0.0.4) otherwise: what `curl` and older scrapers get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Classic,
}

impl Format {
    /// OpenMetrics when the header accepts `application/openmetrics-text` at least as much
    /// as `text/plain` (or `*/*`): Prometheus asks for it first; `*/*` alone or no header
    /// gets the classic format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, q)| q.trim().trim_matches('"').parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The classic text format (0.0.4) of an OpenMetrics exposition from `prometheus-client`
/// (which writes only OpenMetrics): counters are typed under their `_total` sample name,
/// an info metric becomes a gauge under its `_info` name, and `# UNIT` and `# EOF` go.
/// Sample lines are the same in both formats for the metric types used here. Hand-written
/// because no kept crate does it for this registry (the test
/// `the_kept_crate_writes_openmetrics_only` shows what `prometheus-client` writes).
pub fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // prometheus-client writes `# HELP` before `# TYPE`, and the name HELP needs depends on
    // the type: hold it until the TYPE line comes.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').map(|(_, text)| text).or(Some(""));
            continue;
        }
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            let _ = writeln!(out, "{line}");
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
        let (name, kind) = match kind {
            "counter" => (format!("{name}_total"), "counter"),
            "info" => (format!("{name}_info"), "gauge"),
            "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
            _ => (name.to_owned(), "untyped"),
        };
        if let Some(text) = help.take() {
            let _ = writeln!(out, "# HELP {name} {text}");
        }
        let _ = writeln!(out, "# TYPE {name} {kind}");
    }
    out
}

const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The HTTP status of an API call, or `error` when no answer came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Code(u16),
    NoAnswer,
}

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}

label_value!(Outcome, FailureKind, DeferReason, Operation);

impl EncodeLabelValue for Status {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        match self {
            Status::Code(code) => write!(encoder, "{code}"),
            Status::NoAnswer => encoder.write_str("error"),
        }
    }
}

/// One label set per line: `Name { label: Type, … }`.
macro_rules! label_sets {
    ($($name:ident { $($label:ident: $t:ty),* })*) => {$(
        #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
        struct $name { $($label: $t),* }
    )*};
}

label_sets! {
    OutcomeLabels { outcome: Outcome }
    KindLabels { kind: FailureKind }
    ReasonLabels { reason: DeferReason }
    // Why log lines or trace spans were lost (`telemetry::lines_lost`, `otel::spans_dropped`).
    LossLabels { reason: &'static str }
    RequestLabels { operation: Operation, status: Status }
    OperationLabels { operation: Operation }
    PolicyLabels { policy: &'static str }
    VersionLabels { version: &'static str, commit: &'static str }
}

fn duration_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    commands: Family<OutcomeLabels, Counter>,
    dead_letters: Family<KindLabels, Counter>,
    deferrals: Family<ReasonLabels, Counter>,
    retries: Counter,
    dedup_hits: Counter,
    orphans: Counter,
    http_shed: Counter,
    log_lines_dropped: Family<LossLabels, Counter>,
    /// Same label shape: `queue_full` or `export_failed` (`otel::spans_dropped`).
    spans_dropped: Family<LossLabels, Counter>,
    in_flight: Gauge<i64, AtomicI64>,
    circuit_open: Gauge<i64, AtomicI64>,
    ready: Gauge<i64, AtomicI64>,
    unrouted_events: Gauge<i64, AtomicI64>,
    redis_policy: Family<PolicyLabels, Gauge<i64, AtomicI64>>,
    api_requests: Family<RequestLabels, Counter>,
    api_durations: Family<OperationLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("provisioner");
        let m = Metrics {
            commands: Family::default(),
            dead_letters: Family::default(),
            deferrals: Family::default(),
            retries: Counter::default(),
            dedup_hits: Counter::default(),
            orphans: Counter::default(),
            http_shed: Counter::default(),
            log_lines_dropped: Family::default(),
            spans_dropped: Family::default(),
            in_flight: Gauge::default(),
            circuit_open: Gauge::default(),
            ready: Gauge::default(),
            unrouted_events: Gauge::default(),
            redis_policy: Family::default(),
            api_requests: Family::default(),
            api_durations: Family::new_with_constructor(duration_histogram),
            registry: Registry::default(),
        };
        m.register_all(&mut registry);
        // Create every series of the closed sets now, so they are exported at 0.
        m.count_losses();
        for outcome in Outcome::ALL {
            drop(m.commands.get_or_create(&OutcomeLabels { outcome }));
        }
        for kind in FailureKind::ALL {
            drop(m.dead_letters.get_or_create(&KindLabels { kind }));
        }
        for reason in DeferReason::ALL {
            drop(m.deferrals.get_or_create(&ReasonLabels { reason }));
        }
        Metrics { registry, ..m }
    }

    /// Bring the lost log lines and trace spans up to what was counted where they were lost.
    fn count_losses(&self) {
        let (stalled, write_error) = crate::telemetry::lines_lost();
        let (queue_full, export_failed) = crate::otel::spans_dropped();
        for (family, reason, seen) in [
            (&self.log_lines_dropped, "stalled", stalled),
            (&self.log_lines_dropped, "write_error", write_error),
            (&self.spans_dropped, "queue_full", queue_full),
            (&self.spans_dropped, "export_failed", export_failed),
        ] {
            let counter = family.get_or_create(&LossLabels { reason });
            counter.inc_by(seen.saturating_sub(counter.get()));
        }
    }

    /// One observed API exchange.
    pub fn api_request(&self, operation: Operation, status: Option<u16>, elapsed: Duration) {
        let status = status.map_or(Status::NoAnswer, Status::Code);
        self.api_requests
            .get_or_create(&RequestLabels { operation, status })
            .inc();
        self.api_durations
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }

    /// Redis's `maxmemory-policy` as last read: one series at 1, labelled with it.
    pub fn set_redis_policy(&self, policy: &'static str) {
        self.redis_policy.clear();
        self.redis_policy
            .get_or_create(&PolicyLabels { policy })
            .set(1);
    }

    /// The OpenMetrics text exposition, with the circuit's state as of now.
    pub fn render(&self, circuit_open: bool) -> String {
        self.circuit_open.set(i64::from(circuit_open));
        self.count_losses();
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One line per family: name, help, field (the names are the contract).
macro_rules! register {
    ($registry:expr, $metrics:expr; $($name:literal, $help:literal, $field:ident;)*) => {
        $($registry.register($name, $help, $metrics.$field.clone());)*
    };
}

impl Metrics {
    fn register_all(&self, registry: &mut Registry) {
        registry.register(
            "build",
            "Worker version",
            Info::new(VersionLabels {
                version: crate::VERSION,
                commit: crate::COMMIT,
            }),
        );
        registry.register_with_unit(
            "api_request_duration",
            "Convirza API request latency",
            prometheus_client::registry::Unit::Seconds,
            self.api_durations.clone(),
        );
        #[rustfmt::skip]
        register!(registry, self;
            "commands", "Deliveries by final outcome", commands;
            "api_requests", "Convirza API requests by operation and HTTP status (error: no answer)", api_requests;
            "retries", "In-process retries of API calls after transient failures", retries;
            "deferrals", "Messages moved to a delay queue, by reason", deferrals;
            "in_flight", "Deliveries being processed now", in_flight;
            "circuit_open", "1 while the circuit is open (consumption paused)", circuit_open;
            "unrouted_events", "Events waiting in the unrouted-events queue: no queue was bound for them (bind one, then events replay-unrouted)", unrouted_events;
            "dedup_hits", "Commands answered from the Redis created record, without an API call", dedup_hits;
            "orphaned_groups", "Groups created for an ext id that already had another one recorded (remove them: see the runbook)", orphans;
            "http_connections_shed", "Connections to this endpoint closed to make room (a flood of slow or idle clients)", http_shed;
            "dead_letters", "Messages dead-lettered by the worker, by failure kind", dead_letters;
            "redis_maxmemory_policy", "1, labelled with Redis's maxmemory-policy as last read (unknown: CONFIG GET refused); any policy but noeviction may evict dedup records", redis_policy;
            "ready", "1 when /readyz answers 200 (broker connected, consumer running, Redis answering, circuit closed), as of the last scrape", ready;
            "log_lines_dropped", "Log lines lost: stalled (stdout not read fast enough; dropped, not waited for) or write_error (stdout refused them)", log_lines_dropped;
            "trace_spans_dropped", "Trace spans lost (OTLP export on): queue_full (the exporter fell behind; dropped, not waited for) or export_failed (the collector did not take them)", spans_dropped;
        );
    }
}

impl Recorder for Metrics {
    fn command(&self, outcome: Outcome) {
        self.commands
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    fn dead_letter(&self, kind: FailureKind) {
        self.dead_letters.get_or_create(&KindLabels { kind }).inc();
    }

    fn deferral(&self, reason: DeferReason) {
        self.deferrals.get_or_create(&ReasonLabels { reason }).inc();
    }

    fn retry(&self) {
        self.retries.inc();
    }

    fn dedup_hit(&self) {
        self.dedup_hits.inc();
    }

    fn in_flight(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    fn orphan(&self) {
        self.orphans.inc();
    }
}

impl Metrics {
    /// The HTTP endpoint closed a connection to make room for another.
    /// The unrouted-events queue's depth, as the worker last saw it.
    pub fn unrouted_events(&self) -> i64 {
        self.unrouted_events.get()
    }

    /// Whether the worker is ready, as `/readyz` would answer now (set before a scrape).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// The unrouted-events queue's depth, as the worker last saw it.
    pub fn set_unrouted_events(&self, n: u32) {
        self.unrouted_events.set(i64::from(n));
    }

    pub fn http_connection_shed(&self) {
        self.http_shed.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::InFlight;

    #[test]
    fn the_format_follows_the_accept_header() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; version=1.0.0")),
            Format::OpenMetrics
        );
        for classic in [
            None,
            Some(""),
            Some("*/*"),
            Some("text/plain"),
            Some("text/plain;version=0.0.4"),
            Some("text/plain;q=0.9,application/openmetrics-text;q=0.5"),
            Some("application/openmetrics-text;q=0"),
            Some("application/openmetrics-text; Q=0"),
            Some("application/openmetrics-text;q=\"0\""),
            Some("application/json"),
        ] {
            assert_eq!(Format::negotiate(classic), Format::Classic, "{classic:?}");
        }
    }

    /// Why `classic` exists: `prometheus-client` writes OpenMetrics only (a counter typed
    /// under its family name, `# EOF`), which a classic-format reader types as `untyped`
    /// (the `_total` sample matches no TYPE line); the `prometheus` crate writes the classic format but only for its
    /// own registry, which would mean keeping every metric twice.
    #[test]
    fn the_kept_crate_writes_openmetrics_only() {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("jobs", "Jobs", counter.clone());
        counter.inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encodes");
        assert!(out.contains("# TYPE jobs counter\n"), "{out}");
        assert!(out.contains("jobs_total 1\n"), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
        let classic = classic(&out);
        assert!(classic.contains("# TYPE jobs_total counter\n"), "{classic}");
        assert!(!classic.contains("# EOF"), "{classic}");
    }

    #[test]
    fn the_classic_format_types_counters_and_info_under_their_sample_names() {
        let m = Metrics::new();
        m.command(Outcome::Created);
        m.api_request(Operation::CreateGroup, Some(201), Duration::from_millis(20));
        let text = classic(&m.render(false));
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        for line in [
            "# HELP provisioner_commands_total Deliveries by final outcome.",
            "# TYPE provisioner_commands_total counter",
            "provisioner_commands_total{outcome=\"created\"} 1",
            "# TYPE provisioner_build_info gauge",
            "# TYPE provisioner_api_request_duration_seconds histogram",
            "# TYPE provisioner_in_flight gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
    }

    #[test]
    fn renders_every_metric_with_the_contract_names() {
        let m = Metrics::new();
        m.command(Outcome::Created);
        m.command(Outcome::Created);
        m.command(Outcome::DeadLettered);
        m.dead_letter(FailureKind::Rejected);
        m.deferral(DeferReason::Claimed);
        m.retry();
        m.dedup_hit();
        m.api_request(Operation::CreateGroup, Some(201), Duration::from_millis(30));
        m.api_request(Operation::CreateGroup, None, Duration::from_secs(3));
        let guard = InFlight::start(&m);
        let text = m.render(true);
        drop(guard);
        let build = format!(
            "provisioner_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            crate::VERSION,
            crate::COMMIT
        );
        for line in [
            build.as_str(),
            "provisioner_commands_total{outcome=\"created\"} 2",
            "provisioner_commands_total{outcome=\"dead_lettered\"} 1",
            "provisioner_commands_total{outcome=\"failed\"} 0",
            "provisioner_api_requests_total{operation=\"create_group\",status=\"201\"} 1",
            "provisioner_api_requests_total{operation=\"create_group\",status=\"error\"} 1",
            "provisioner_api_request_duration_seconds_bucket{le=\"0.05\",operation=\"create_group\"} 1",
            "provisioner_api_request_duration_seconds_bucket{le=\"5.0\",operation=\"create_group\"} 2",
            "provisioner_api_request_duration_seconds_bucket{le=\"+Inf\",operation=\"create_group\"} 2",
            "provisioner_api_request_duration_seconds_count{operation=\"create_group\"} 2",
            "provisioner_retries_total 1",
            "provisioner_deferrals_total{reason=\"claimed\"} 1",
            "provisioner_deferrals_total{reason=\"parked\"} 0",
            "provisioner_in_flight 1",
            "provisioner_circuit_open 1",
            "provisioner_dedup_hits_total 1",
            "provisioner_orphaned_groups_total 0",
            "provisioner_http_connections_shed_total 0",
            "provisioner_dead_letters_total{kind=\"rejected\"} 1",
            "provisioner_dead_letters_total{kind=\"name_conflict\"} 0",
            "# TYPE provisioner_api_request_duration_seconds histogram",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let after = m.render(false);
        assert!(
            after.lines().any(|l| l == "provisioner_in_flight 0"),
            "{after}"
        );
        assert!(
            after.lines().any(|l| l == "provisioner_circuit_open 0"),
            "{after}"
        );
    }

    #[test]
    fn every_label_value_of_a_closed_set_is_its_own_series() {
        // The hand-written registry this replaced filed an unknown variant under the first
        // label; typed label sets make each value its own series.
        let m = Metrics::new();
        for kind in FailureKind::ALL {
            m.dead_letter(kind);
        }
        let text = m.render(false);
        for kind in FailureKind::ALL {
            let line = format!(
                "provisioner_dead_letters_total{{kind=\"{}\"}} 1",
                kind.as_str()
            );
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}

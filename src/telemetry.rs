//! Logging set-up: JSON lines on stdout by default, `pretty` for humans. The lines go
//! through `tracing-appender`'s non-blocking writer; the JSON layer is this crate's own,
//! kept because `tracing-subscriber`'s formatter cannot put span fields at the top level
//! (the test `the_crates_json_formatter_cannot_put_span_fields_at_the_top_level` shows it)
//! and costs more CPU per line (docs/performance.md), and `json-subscriber`, which can,
//! writes a name twice in one line and logs the trace's attributes
//! (`the_json_subscriber_crate_writes_a_name_twice_and_logs_trace_attributes`).
//!
//! Invariants:
//! - in JSON, the fields of every enclosing span (`ext_id`, `message_id`,
//!   `correlation_id` of the delivery) are flattened into each line next to the event's
//!   own fields, so `jq 'select(.ext_id == "X")'` finds everything about one ext id;
//! - initialised once per process, before anything logs; the filter comes from
//!   `log.level` (validated by the config layer);
//! - other crates never log below `info`, whatever `log.level` asks: at `debug`/`trace`
//!   the AMQP client prints its frames (the login with its password, message bodies with
//!   phone numbers) and HTTP stacks their headers.

use crate::lock;
use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::Registry;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Context;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings};

/// The worker's logging, and its traces when the `OTEL_*` environment asks for them
/// (`crate::otel`); `Err` names what in that environment is wrong. Runs inside the runtime.
pub fn init(settings: &LogSettings) -> Result<(), String> {
    let tracer = crate::otel::init()?;
    // Spans are made at `info`: a log level above it leaves nothing to export.
    let hides_spans = matches!(
        settings.level.trim().to_ascii_lowercase().as_str(),
        "warn" | "error" | "off"
    );
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = match settings.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter(&settings.level))
            .with(JsonLines::new(stdout_writer(settings.queue_lines)))
            .with(traces(tracer.clone()))
            .try_init(),
        LogFormat::Pretty => tracing_subscriber::registry()
            .with(filter(&settings.level))
            .with(tracing_subscriber::fmt::layer().with_writer(stdout_writer(settings.queue_lines)))
            .with(traces(tracer.clone()))
            .try_init(),
    };
    if tracer.is_some() {
        tracing::info!(traces = %crate::otel::describe(), "exporting traces");
        if hides_spans {
            tracing::warn!(
                log_level = %settings.level,
                "trace export is on but log.level is above info, where the worker's spans are made: no trace will be exported; set log.level = \"info\""
            );
        }
    }
    Ok(())
}

/// The layer that turns spans into OpenTelemetry spans, when traces are exported.
/// Only this crate's spans and log lines: the HTTP, AMQP and Redis stacks' own would make
/// traces of their internals (and the exporter's own calls would trace themselves).
fn traces<S>(tracer: Option<opentelemetry_sdk::trace::Tracer>) -> Option<impl Layer<S>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                ours(meta.target())
            }))
    })
}

/// `log.level` as a filter, with other crates held at `info` or quieter.
fn filter(level: &str) -> Box<dyn Layer<Registry> + Send + Sync> {
    // A bare level (what nearly everyone sets) needs no directive engine: `ByCrate` decides
    // once per call site, while an `EnvFilter` also takes a shared lock on every span
    // enter and exit, several times per delivery.
    if let Some(max) = bare_level(level) {
        return Box::new(ByCrate {
            ours: max,
            others: max.min(LevelFilter::INFO),
        });
    }
    // Directives: `EnvFilter` decides, and other crates still stop at `info`.
    let directives = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    Box::new(directives.and_then(ByCrate {
        ours: LevelFilter::TRACE,
        others: LevelFilter::INFO,
    }))
}

/// A bare `log.level`: this project's crates at it, every other crate at `info` or
/// quieter. Decided once per call site (the answer depends on static metadata only).
struct ByCrate {
    ours: LevelFilter,
    others: LevelFilter,
}

impl ByCrate {
    fn allows(&self, meta: &Metadata<'_>) -> bool {
        let max = if ours(meta.target()) {
            self.ours
        } else {
            self.others
        };
        *meta.level() <= max
    }
}

impl<S: Subscriber> Layer<S> for ByCrate {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.allows(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        self.allows(meta)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.ours.max(self.others))
    }
}

/// `level` when it is one level name and nothing else (any case, as `EnvFilter` reads it).
fn bare_level(level: &str) -> Option<LevelFilter> {
    let name = level.trim().to_ascii_lowercase();
    ["off", "error", "warn", "info", "debug", "trace"]
        .contains(&name.as_str())
        .then(|| name.parse().ok())
        .flatten()
}

/// Log lines go to stdout through `tracing-appender`'s non-blocking writer: a queue of
/// `log.queue_lines` lines that its own thread writes out, a batch per `write(2)` (one
/// `write(2)` per line was a measurable share of the worker's CPU per command).
///
/// Invariants:
/// - **logging never waits for stdout.** A reader that falls behind (a stalled log shipper,
///   a FIFO nobody reads) fills the queue, and past it lines are *dropped*, not waited for:
///   commands and `/healthz` go on. Each dropped line is counted
///   (`provisioner_log_lines_dropped_total{reason="stalled"}`);
/// - **a line that cannot be written is counted, never silent.** A closed pipe, `/dev/full`
///   or any other write error costs the lines of that batch, counted with
///   `reason="write_error"`; a line cut off part-way costs only itself (the next batch
///   starts on a new line);
/// - both are said on stderr, at most once every [`REPORT_EVERY`], by a thread of their own
///   (a stderr that blocks stops only that thread);
/// - [`flush`] at exit writes what is queued, waiting at most [`FLUSH_WAIT`].
fn stdout_writer(queue_lines: usize) -> NonBlocking {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(queue_lines)
        .thread_name("log-writer")
        .finish(StdoutSink::default());
    let _ = STALLED.set(writer.error_counter());
    *lock(&GUARD) = Some(guard);
    REPORTER.call_once(|| {
        // Best effort: without it the counts are still in the metric.
        let _ = std::thread::Builder::new()
            .name("log-report".into())
            .stack_size(256 << 10)
            .spawn(report_drops);
    });
    writer
}

/// The thread that flushes the log at exit (`crate::fatal` lets it panic quietly).
pub const FLUSH_THREAD: &str = "log-flush";
/// How often, at most, lost log lines are reported on stderr.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How long [`flush`] waits for the queue to be written out.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// The sink writes out when this much is gathered, even while lines keep coming.
const MAX_BATCH: usize = 1 << 20;

static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);
static STALLED: OnceLock<ErrorCounter> = OnceLock::new();
static WRITE_FAILED: AtomicU64 = AtomicU64::new(0);
static LAST_WRITE_ERROR: Mutex<Option<String>> = Mutex::new(None);
static REPORTER: Once = Once::new();

/// Log lines lost so far: (dropped because stdout was not read fast enough, lost to a
/// write error). For the metric `provisioner_log_lines_dropped_total`.
pub fn lines_lost() -> (u64, u64) {
    let stalled = STALLED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX));
    (stalled, WRITE_FAILED.load(Ordering::Relaxed))
}

/// Write out every log line still queued (at exit), waiting at most [`FLUSH_WAIT`]: the
/// writer's own shutdown may block on a stdout nobody reads.
pub fn flush() {
    let Some(guard) = lock(&GUARD).take() else {
        return;
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let flushed = std::thread::Builder::new()
        .name(FLUSH_THREAD.into())
        .stack_size(256 << 10)
        .spawn(move || {
            drop(guard);
            let _ = done_tx.send(());
        });
    if flushed.is_ok() {
        let _ = done_rx.recv_timeout(FLUSH_WAIT);
    }
}

/// Say on stderr, at a bounded rate, that log lines were lost (see [`stdout_writer`]).
fn report_drops() {
    let mut reported = (0, 0);
    loop {
        std::thread::sleep(REPORT_EVERY);
        let (stalled, failed) = lines_lost();
        if stalled > reported.0 {
            errln!(
                "log: {} lines dropped in the last {}s because stdout is not read fast enough ({stalled} in all); commands go on",
                stalled - reported.0,
                REPORT_EVERY.as_secs()
            );
        }
        if failed > reported.1 {
            let why = lock(&LAST_WRITE_ERROR).clone().unwrap_or_default();
            errln!(
                "log: {} lines could not be written to stdout in the last {}s ({why}; {failed} in all); commands go on",
                failed - reported.1,
                REPORT_EVERY.as_secs()
            );
        }
        reported = (stalled, failed);
    }
}

/// The writer thread's end: lines gathered, written out a batch at a time (see
/// [`stdout_writer`]).
#[derive(Default)]
struct StdoutSink {
    batch: Vec<u8>,
    /// A write failed part-way: the next batch starts on a new line.
    cut_off: bool,
}

impl StdoutSink {
    fn write_out(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        let mut result = Ok(());
        if self.cut_off {
            result = write_fully(&mut out, b"\n").map_err(|(_, why)| (self.batch.len(), why));
        }
        if result.is_ok() {
            self.cut_off = false;
            result = write_fully(&mut out, &self.batch);
        }
        let _ = out.flush();
        if let Err((left, why)) = result {
            // Every line not written out whole is lost; one cut part-way costs only itself.
            // (If even the newline owed to a line cut off before failed, it is still owed.)
            let from = self.batch.len().saturating_sub(left);
            self.cut_off = self.cut_off || (from > 0 && left > 0);
            let lost = self.batch[from..].iter().filter(|b| **b == b'\n').count();
            WRITE_FAILED.fetch_add(lost as u64, Ordering::Relaxed);
            *lock(&LAST_WRITE_ERROR) = Some(why);
        }
        self.batch.clear();
        // After a burst, give the memory back rather than hold a megabyte for good.
        self.batch.shrink_to(64 << 10);
    }
}

/// Write all of `bytes`, waiting out a full non-blocking stdout; on failure, how many
/// bytes were left and why.
fn write_fully(out: &mut impl Write, bytes: &[u8]) -> Result<(), (usize, String)> {
    let mut rest = bytes;
    while !rest.is_empty() {
        match out.write(rest) {
            Ok(0) => return Err((rest.len(), "stdout took nothing".to_owned())),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err((rest.len(), e.to_string())),
        }
    }
    Ok(())
}

impl Write for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.batch.extend_from_slice(buf);
        if self.batch.len() >= MAX_BATCH {
            self.write_out();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.write_out();
        Ok(())
    }
}

/// Log targets of this project (the library and its binaries): the crate name itself, or
/// one of its modules (`group_provisioner_x` is another crate).
fn ours(target: &str) -> bool {
    ["group_provisioner", "convirza_sim"].iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Operator commands: warnings and errors only, to stderr, so stdout stays their output.
/// The AMQP client's own log lines are left out: a command reports its errors itself, and
/// the client logs expected refusals (a channel the broker closed on purpose) as errors.
/// Colour only on a terminal, and never with `NO_COLOR` set.
pub fn init_for_cli() {
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(
            "warn,lapin=off,amq_protocol=off,amq_protocol_tcp=off,tcp_stream=off",
        ))
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .try_init();
}

/// One JSON object per line: `timestamp`, `level`, `target`, the event's fields (with
/// `message`), then the fields of every enclosing span, innermost first. Each name appears
/// once: the three fixed keys cannot be overridden, an event field wins over a span field
/// of the same name and an inner span over an outer one.
///
/// Why not `tracing_subscriber`'s JSON formatter: it keeps span fields as one JSON text,
/// re-parsing and re-serialising it on every `record` and for every line, and builds each
/// line as a map of owned values. One line per delivery made that a measurable share of the
/// worker's CPU per command (see docs/performance.md). Here a span keeps its fields already
/// encoded, and a line is written straight into one buffer and out in one `write`.
pub struct JsonLines<W> {
    make_writer: W,
}

impl<W> JsonLines<W> {
    pub fn new(make_writer: W) -> Self {
        JsonLines { make_writer }
    }
}

/// A span's fields, each value already encoded as JSON.
#[derive(Default)]
struct SpanFields(Vec<(&'static str, String)>);

impl<S, W> Layer<S> for JsonLines<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = SpanFields::default();
        attrs.record(&mut Encoder(&mut fields.0, SPAN));
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            values.record(&mut Encoder(&mut fields.0, SPAN));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut own = Vec::with_capacity(8);
        event.record(&mut Encoder(&mut own, EVENT));
        let now = OffsetDateTime::now_utc();
        let mut line = String::with_capacity(512);
        line.push_str("{\"timestamp\":");
        match now.format(&Rfc3339) {
            Ok(t) => push_json_str(&mut line, &t),
            Err(_) => line.push_str(&now.unix_timestamp().to_string()),
        }
        line.push_str(",\"level\":");
        push_json_str(&mut line, event.metadata().level().as_str());
        line.push_str(",\"target\":");
        push_json_str(&mut line, event.metadata().target());
        let mut written: Vec<&'static str> = vec!["timestamp", "level", "target"];
        let mut push = |line: &mut String, name: &'static str, value: &str| {
            if !written.contains(&name) {
                written.push(name);
                line.push(',');
                push_json_str(line, name);
                line.push(':');
                line.push_str(value);
            }
        };
        for (name, value) in &own {
            push(&mut line, name, value);
        }
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<SpanFields>() {
                    for (name, value) in fields.0.iter().rev() {
                        push(&mut line, name, value);
                    }
                }
            }
        }
        line.push_str("}\n");
        // One write per line: lines from concurrent tasks never interleave.
        let _ = self.make_writer.make_writer().write_all(line.as_bytes());
    }
}

/// Records fields as `(name, JSON value)`; a name recorded again replaces its value. A
/// span field named with a dot (`messaging.system`, `otel.kind`) is an OpenTelemetry
/// attribute, for the trace only (`SPAN`): log lines keep their keys.
struct Encoder<'a>(&'a mut Vec<(&'static str, String)>, bool);

const SPAN: bool = true;
const EVENT: bool = false;

impl Encoder<'_> {
    fn put(&mut self, field: &Field, value: String) {
        if self.1 && field.name().contains('.') {
            return;
        }
        match self.0.iter_mut().find(|(n, _)| *n == field.name()) {
            Some(slot) => slot.1 = value,
            None => self.0.push((field.name(), value)),
        }
    }

    fn put_str(&mut self, field: &Field, value: &str) {
        let mut encoded = String::with_capacity(value.len() + 2);
        push_json_str(&mut encoded, value);
        self.put(field, encoded);
    }
}

impl Visit for Encoder<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put_str(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.to_string());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.to_string());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: those become null, as serde_json writes them.
        let encoded = if value.is_finite() {
            Value::from(value).to_string()
        } else {
            "null".to_owned()
        };
        self.put(field, encoded);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put_str(field, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put_str(field, &format!("{value:?}"));
    }
}

/// Append `s` as a JSON string literal (RFC 8259 escaping).
fn push_json_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            out.push_str(&format!("\\u{b:04x}"));
        } else {
            out.push_str(escape);
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    /// Run `f` under a [`JsonLines`] subscriber; the lines it wrote, parsed.
    fn lines_of(f: impl FnOnce()) -> Vec<Value> {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(buffer.clone()));
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf8");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Why this layer is kept instead of `tracing-subscriber`'s JSON formatter: with its
    /// event flattened and its current span shown, the formatter still writes the span's
    /// fields one level down (`span.ext_id`), so `jq 'select(.ext_id == "X")'` misses every
    /// line about a delivery. This layer writes them at the top level. (The CPU this layer
    /// saves, measured, is in docs/performance.md.)
    #[test]
    fn the_crates_json_formatter_cannot_put_span_fields_at_the_top_level() {
        let event = || {
            let span = tracing::info_span!("delivery", ext_id = "X-1", message_id = "m-1");
            let _enter = span.enter();
            tracing::info!(outcome = "created", "outcome");
        };
        let buffer = Buffer::default();
        let formatter = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(buffer.clone());
        tracing::subscriber::with_default(tracing_subscriber::registry().with(formatter), event);
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf8");
        let theirs: Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(theirs["outcome"], "created");
        assert_eq!(theirs["ext_id"], Value::Null, "{theirs}");
        assert_eq!(theirs["span"]["ext_id"], "X-1", "{theirs}");

        let ours = &lines_of(event)[0];
        assert_eq!(ours["ext_id"], "X-1");
        assert_eq!(ours["message_id"], "m-1");
        assert_eq!(ours["outcome"], "created");
    }

    /// Why this layer is kept instead of `json-subscriber`, the crate built for JSON lines
    /// with flattened spans: with the event and the span list flattened, a name the event
    /// shares with its span is written twice in one object (which value a reader keeps
    /// depends on the reader), and the span's OpenTelemetry attributes (`otel.kind`) and
    /// name reach the log as keys. This layer writes each name once, the event's value
    /// first, and keeps those for the trace.
    #[test]
    fn the_json_subscriber_crate_writes_a_name_twice_and_logs_trace_attributes() {
        let event = || {
            let span = tracing::info_span!("delivery", ext_id = "X-1", otel.kind = "consumer");
            let _enter = span.enter();
            tracing::warn!(ext_id = "X-2", "a message about another ext id");
        };
        let buffer = Buffer::default();
        let mut theirs = json_subscriber::JsonLayer::new(buffer.clone());
        theirs
            .with_level("level")
            .with_target("target")
            .with_flattened_event()
            .with_top_level_flattened_span_list();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(theirs), event);
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf8");
        assert_eq!(text.matches("\"ext_id\":").count(), 2, "{text}");
        assert!(text.contains("\"otel.kind\":"), "{text}");
        assert!(text.contains("\"name\":\"delivery\""), "{text}");

        let buffer = Buffer::default();
        let ours = tracing_subscriber::registry().with(JsonLines::new(buffer.clone()));
        tracing::subscriber::with_default(ours, event);
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf8");
        assert_eq!(text.matches("\"ext_id\":").count(), 1, "{text}");
        assert!(
            !text.contains("otel.kind") && !text.contains("\"name\""),
            "{text}"
        );
        let line: Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["ext_id"], "X-2");
    }

    /// Which of a fixed set of events pass `filter(level)`, as "target:level".
    fn passed(level: &str) -> Vec<String> {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::registry()
            .with(filter(level))
            .with(JsonLines::new(buffer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "group_provisioner::worker", "group_provisioner:trace");
            tracing::debug!(target: "group_provisioner::worker", "group_provisioner:debug");
            tracing::info!(target: "group_provisioner::worker", "group_provisioner:info");
            tracing::debug!(target: "convirza_sim", "convirza_sim:debug");
            // Another crate whose name only starts like ours.
            tracing::debug!(target: "group_provisioner_x", "group_provisioner_x:debug");
            tracing::debug!(target: "lapin::channel", "lapin:debug");
            tracing::info!(target: "lapin::channel", "lapin:info");
            tracing::warn!(target: "reqwest", "reqwest:warn");
        });
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf8");
        text.lines()
            .map(|l| {
                let line: Value = serde_json::from_str(l).expect("JSON line");
                line["message"].as_str().unwrap_or_default().to_owned()
            })
            .collect()
    }

    #[test]
    fn other_crates_stay_at_info_whatever_the_level_and_however_it_is_written() {
        let all_ours = [
            "group_provisioner:trace",
            "group_provisioner:debug",
            "group_provisioner:info",
            "convirza_sim:debug",
            "lapin:info",
            "reqwest:warn",
        ];
        // A bare level (the fast path) and the same through directives (EnvFilter) agree.
        assert_eq!(passed("trace"), all_ours);
        assert_eq!(passed(" TRACE "), all_ours);
        assert_eq!(passed("trace,lapin=trace"), all_ours);
        assert_eq!(
            passed("info"),
            ["group_provisioner:info", "lapin:info", "reqwest:warn"]
        );
        assert_eq!(passed("warn"), ["reqwest:warn"]);
        assert_eq!(
            passed("warn,group_provisioner=info"),
            ["group_provisioner:info", "reqwest:warn"]
        );
        assert!(passed("off").is_empty());
        assert_eq!(bare_level("Debug"), Some(LevelFilter::DEBUG));
        assert_eq!(bare_level("3"), None);
        assert_eq!(bare_level("info,lapin=warn"), None);
    }

    #[test]
    fn span_fields_are_flattened_and_recorded_late_fields_appear() {
        let lines = lines_of(|| {
            let span = tracing::info_span!(
                "delivery",
                ext_id = tracing::field::Empty,
                message_id = "m-1"
            );
            let _guard = span.enter();
            tracing::info!(attempts = 2u32, "before");
            span.record("ext_id", "ORG-1");
            tracing::info!(outcome = "created", org_unit_id = 5i64, "outcome");
        });
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["message_id"], "m-1");
        assert_eq!(lines[0]["attempts"], 2);
        assert!(lines[0].get("ext_id").is_none());
        assert_eq!(lines[1]["ext_id"], "ORG-1");
        assert_eq!(lines[1]["outcome"], "created");
        assert_eq!(lines[1]["org_unit_id"], 5);
        assert_eq!(lines[1]["message"], "outcome");
        assert_eq!(lines[1]["level"], "INFO");
        assert_eq!(lines[1]["target"], module_path!());
        let stamp = lines[1]["timestamp"].as_str().expect("timestamp");
        assert!(OffsetDateTime::parse(stamp, &Rfc3339).is_ok(), "{stamp}");
    }

    #[test]
    fn each_name_appears_once_event_over_inner_span_over_outer_span() {
        let lines = lines_of(|| {
            let outer = tracing::info_span!("outer", a = "outer", b = "outer", c = "outer");
            let _o = outer.enter();
            let inner = tracing::info_span!("inner", b = "inner", c = "inner");
            let _i = inner.enter();
            inner.record("c", "inner-late");
            tracing::warn!(c = "event", level = "spoofed", "m");
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["a"], "outer");
        assert_eq!(line["b"], "inner");
        assert_eq!(line["c"], "event");
        // The fixed keys cannot be overridden by a field.
        assert_eq!(line["level"], "WARN");
        // No duplicate keys in the text (serde_json would keep the last silently).
        let object = line.as_object().expect("object");
        assert_eq!(object.len(), 7, "{object:?}");
    }

    #[test]
    fn values_are_encoded_as_json_whatever_they_hold() {
        let hostile =
            "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} \u{1f} é 日本 🦀";
        let lines = lines_of(|| {
            tracing::info!(
                text = hostile,
                number = -3i64,
                big = u64::MAX,
                ratio = 0.5f64,
                nan = f64::NAN,
                yes = true,
                debug = ?vec!["x\"y"],
                "{hostile}"
            );
        });
        let line = &lines[0];
        assert_eq!(line["text"], hostile);
        assert_eq!(line["message"], hostile);
        assert_eq!(line["number"], -3);
        assert_eq!(line["big"], u64::MAX);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["nan"], Value::Null);
        assert_eq!(line["yes"], true);
        assert_eq!(line["debug"], "[\"x\\\"y\"]");
        let mut encoded = String::new();
        push_json_str(&mut encoded, hostile);
        assert_eq!(encoded, serde_json::to_string(hostile).expect("encode"));
    }
}

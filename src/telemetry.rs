//! Logging set-up: JSON lines on stdout by default, `pretty` for humans.
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

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
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

pub fn init(settings: &LogSettings) {
    static PANIC_HOOK: Once = Once::new();
    PANIC_HOOK.call_once(|| {
        // A panic's own report (on stderr) comes after every line logged before it.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Only the main thread's panic ends the process; one in a task is caught by the
            // runtime, and its thread must not wait here for a stalled log reader.
            if std::thread::current().name() == Some("main") {
                STDOUT.flush_from_panic();
            }
            previous(info);
        }));
    });
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = match settings.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter(&settings.level))
            .with(JsonLines::new(&STDOUT))
            .try_init(),
        LogFormat::Pretty => tracing_subscriber::registry()
            .with(filter(&settings.level))
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stdout))
            .try_init(),
    };
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

/// Write out every log line still held back (at exit; the worker's `main` calls it, and so
/// does a panic).
pub fn flush() {
    STDOUT.flush();
}

/// The worker's log lines on their way to stdout.
static STDOUT: BatchedStdout = BatchedStdout::new();

/// Log lines are appended to a buffer that one thread writes to stdout a batch at a time,
/// [`BATCH_WINDOW`] after the first line of the batch.
///
/// Why: one `write(2)` per line was a measurable share of the worker's CPU per command,
/// and a log reader that falls behind blocked the task that logged, on a runtime thread.
///
/// Invariants: the lines of one task leave in the order it logged them, and never
/// interleave with others; what is gathered is bounded by [`MAX_PENDING`], besides the
/// batch being written (past it, the line that overflows waits for that batch and writes
/// the backlog out itself, in order); [`flush`] at exit and on a panic of the main thread
/// writes the rest, so only a `SIGKILL` can cost lines: those of its last window, or what
/// a stalled reader had not taken yet.
struct BatchedStdout {
    pending: Mutex<Vec<u8>>,
    /// Held while a batch is written: a batch taken later is written later.
    writing: Mutex<()>,
    ready: Condvar,
    started: Once,
    /// Whether the writer thread runs (if it could not be started, each line is written by
    /// the task that logs it, as before).
    threaded: AtomicBool,
}

/// How long the writer waits after the first line of a batch for more lines.
const BATCH_WINDOW: Duration = Duration::from_millis(2);
/// At most this many bytes are gathered.
const MAX_PENDING: usize = 1 << 20;
/// The writer's buffer keeps this much capacity between batches.
const KEEP_CAPACITY: usize = 64 << 10;

impl BatchedStdout {
    const fn new() -> Self {
        BatchedStdout {
            pending: Mutex::new(Vec::new()),
            writing: Mutex::new(()),
            ready: Condvar::new(),
            started: Once::new(),
            threaded: AtomicBool::new(false),
        }
    }

    fn append(&'static self, line: &[u8]) {
        self.started.call_once(|| {
            let spawned = std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || self.run());
            self.threaded.store(spawned.is_ok(), Ordering::Release);
        });
        let mut pending = lock(&self.pending);
        if pending.len() + line.len() <= MAX_PENDING && self.threaded.load(Ordering::Acquire) {
            let first = pending.is_empty();
            pending.extend_from_slice(line);
            if first {
                self.ready.notify_one();
            }
            return;
        }
        // The writer is behind (stdout blocks): write the backlog and this line now.
        drop(pending);
        self.write_pending(&mut Vec::new(), line);
    }

    fn run(&self) {
        let mut batch = Vec::new();
        loop {
            {
                let mut pending = lock(&self.pending);
                while pending.is_empty() {
                    pending = self.ready.wait(pending).unwrap_or_else(|p| p.into_inner());
                }
            }
            std::thread::sleep(BATCH_WINDOW);
            self.write_pending(&mut batch, &[]);
        }
    }

    /// Write what is pending, then `line`; `batch` is a buffer to reuse.
    fn write_pending(&self, batch: &mut Vec<u8>, line: &[u8]) {
        let _writing = lock(&self.writing);
        std::mem::swap(batch, &mut *lock(&self.pending));
        batch.extend_from_slice(line);
        write_out(batch);
        batch.clear();
        // After a burst, give the memory back rather than hold a megabyte for good.
        batch.shrink_to(KEEP_CAPACITY);
    }

    fn flush(&self) {
        self.write_pending(&mut Vec::new(), &[]);
    }

    /// [`Self::flush`] from a panic hook. It waits a little for the writer to finish a
    /// batch, but never blocks: the panicking thread may hold one of the locks itself.
    fn flush_from_panic(&self) {
        for _ in 0..50 {
            if let Ok(_writing) = self.writing.try_lock() {
                if let Ok(mut pending) = self.pending.try_lock() {
                    let batch = std::mem::take(&mut *pending);
                    drop(pending);
                    write_out(&batch);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Set when a write failed part-way: the next batch starts on a new line, so a line cut
/// off costs only itself, not the one after it.
static CUT_OFF: AtomicBool = AtomicBool::new(false);

/// Write a batch to stdout. A non-blocking stdout that is full is waited for (only the
/// writer thread, or an overflowing logger, waits); any other error drops the batch, as a
/// full disk would, with nowhere to report it.
fn write_out(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    if CUT_OFF.load(Ordering::Relaxed) {
        if unwritten(&mut out, b"\n") > 0 {
            return;
        }
        CUT_OFF.store(false, Ordering::Relaxed);
    }
    let left = unwritten(&mut out, bytes);
    if left > 0 && left < bytes.len() {
        CUT_OFF.store(true, Ordering::Relaxed);
    }
    let _ = out.flush();
}

/// Write `bytes`, waiting out a full non-blocking stdout; how many bytes could not be
/// written.
fn unwritten(out: &mut impl Write, bytes: &[u8]) -> usize {
    let mut rest = bytes;
    while !rest.is_empty() {
        match out.write(rest) {
            Ok(0) => break,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => break,
        }
    }
    rest.len()
}

impl<'a> MakeWriter<'a> for &'static BatchedStdout {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter(self)
    }
}

/// One [`JsonLines`] line (it writes each line with one `write_all`).
struct LineWriter(&'static BatchedStdout);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
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
        attrs.record(&mut Encoder(&mut fields.0));
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            values.record(&mut Encoder(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut own = Vec::with_capacity(8);
        event.record(&mut Encoder(&mut own));
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

/// Records fields as `(name, JSON value)`; a name recorded again replaces its value.
struct Encoder<'a>(&'a mut Vec<(&'static str, String)>);

impl Encoder<'_> {
    fn put(&mut self, field: &Field, value: String) {
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

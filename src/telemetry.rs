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

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings};

pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.level)
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .and(filter_fn(|meta| {
            ours(meta.target()) || *meta.level() <= Level::INFO
        }));
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = match settings.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stdout)
                    .fmt_fields(JsonFields::new())
                    .event_format(FlatJson)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Pretty => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stdout)
                    .with_filter(filter),
            )
            .try_init(),
    };
}

/// Log targets of this project (the library and its binaries).
fn ours(target: &str) -> bool {
    ["group_provisioner", "convirza_sim"]
        .iter()
        .any(|t| target == *t || target.starts_with(&format!("{t}::")))
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

/// One JSON object per line: `timestamp`, `level`, `target`, `message`, span fields, event
/// fields (event fields win on a name clash).
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let now = OffsetDateTime::now_utc();
        line.insert(
            "timestamp".into(),
            Value::String(
                now.format(&Rfc3339)
                    .unwrap_or_else(|_| now.unix_timestamp().to_string()),
            ),
        );
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().as_str().to_owned()),
        );
        line.insert(
            "target".into(),
            Value::String(event.metadata().target().to_owned()),
        );
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields.as_str())
                {
                    line.extend(map);
                }
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::Bool(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

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

    #[test]
    fn span_fields_are_flattened_and_recorded_late_fields_appear() {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buffer.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
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
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf8");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["message_id"], "m-1");
        assert_eq!(lines[0]["attempts"], 2);
        assert!(lines[0].get("ext_id").is_none());
        assert_eq!(lines[1]["ext_id"], "ORG-1");
        assert_eq!(lines[1]["outcome"], "created");
        assert_eq!(lines[1]["org_unit_id"], 5);
        assert_eq!(lines[1]["message"], "outcome");
        assert_eq!(lines[1]["level"], "INFO");
    }
}

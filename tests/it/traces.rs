//! OpenTelemetry traces through the binary: the worker exports over OTLP (http/protobuf)
//! to a receiver the test runs on port 0, built on the protocol's own message types. A
//! command's `traceparent` is the parent of the delivery's span; the dedup steps, each API
//! request and the event publish are its children; the API and the event consumers see
//! those spans' ids; a command retried across a delay tier stays in one trace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message as _;
use serde_json::json;

use group_provisioner::sim::FailNext;

use crate::helpers::*;
use crate::process::{WorkerProcess, worker_env};

/// One span as the receiver got it: ids in hex, attributes as text.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    kind: i32,
    attributes: HashMap<String, String>,
    events: Vec<String>,
    service: String,
    start: u64,
    end: u64,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// Every span of an export request, as the receiver keeps it.
fn keep_spans(keep: &Mutex<Vec<Got>>, request: ExportTraceServiceRequest) {
    let mut got = keep.lock().expect("lock");
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|a| a.key == "service.name")
            .map(|a| text(a.value.as_ref()))
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            got.push(Got {
                name: span.name.clone(),
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent: hex(&span.parent_span_id),
                kind: span.kind,
                attributes: span
                    .attributes
                    .iter()
                    .map(|a| (a.key.clone(), text(a.value.as_ref())))
                    .collect(),
                events: span.events.iter().map(|e| e.name.clone()).collect(),
                service: service.clone(),
                start: span.start_time_unix_nano,
                end: span.end_time_unix_nano,
            });
        }
    }
}

/// The same receiver's gRPC service.
struct Grpc(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep_spans(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP trace receiver on 127.0.0.1, port 0: over HTTP (`/v1/traces`, protobuf) or
/// gRPC.
struct Receiver {
    endpoint: String,
    protocol: &'static str,
    spans: Arc<Mutex<Vec<Got>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
        let keep = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |body: Bytes| {
                let keep = keep.clone();
                async move {
                    let request =
                        ExportTraceServiceRequest::decode(body).expect("an OTLP trace request");
                    keep_spans(&keep, request);
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            endpoint,
            protocol: "http/protobuf",
            spans,
            _server: server,
        }
    }

    async fn start_grpc() -> Receiver {
        let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let service = TraceServiceServer::new(Grpc(spans.clone()));
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Receiver {
            endpoint,
            protocol: "grpc",
            spans,
            _server: server,
        }
    }

    /// Wait until the trace holds spans matching every name in `names` (as many times as
    /// listed), then return all of the trace's spans.
    async fn trace(&self, trace_id: &str, names: &[&str]) -> Vec<Got> {
        wait_for("the trace's spans", Duration::from_secs(30), || async {
            let spans: Vec<Got> = self
                .spans
                .lock()
                .expect("lock")
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            let complete = names.iter().all(|n| {
                let want = names.iter().filter(|m| *m == n).count();
                spans.iter().filter(|s| s.name == *n).count() >= want
            });
            complete.then_some(spans)
        })
        .await
    }
}

fn otel_env(receiver: &Receiver) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", receiver.protocol.to_owned()),
        ("OTEL_SERVICE_NAME", "provisioner-under-test".to_owned()),
        // Export every 100 ms, so a test waits for its spans briefly.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ]
}

fn spawn(
    env: &TestEnv,
    receiver: &Receiver,
    extra: &[(&'static str, &'static str)],
) -> WorkerProcess {
    let otel = otel_env(receiver);
    let mut all: Vec<(&str, &str)> = worker_env(extra);
    all.extend(otel.iter().map(|(k, v)| (*k, v.as_str())));
    WorkerProcess::spawn(env, &all)
}

async fn send_traced(env: &TestEnv, ext: &str, traceparent: &str) {
    let mut headers = FieldTable::default();
    headers.insert(ShortString::from("traceparent"), header_value(traceparent));
    let body = json!({"org_unit_ext_id": ext, "org_unit_name": format!("Traced {ext}"), "org_unit_parent_id": 1000});
    env.send_raw(
        body.to_string().as_bytes(),
        BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from("traced-message"))
            .with_correlation_id(ShortString::from("traced-conversation"))
            .with_headers(headers),
    )
    .await;
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const UPSTREAM: &str = "00f067aa0ba902b7";

/// `kind` values of the OTLP protocol.
const INTERNAL_OR_CLIENT: [i32; 2] = [1, 3];
const CONSUMER: i32 = 5;
const PRODUCER: i32 = 4;
const CLIENT: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_trace_runs_from_its_publisher_through_the_api_to_its_event() {
    one_commands_trace(Receiver::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_goes_out_over_grpc_too() {
    one_commands_trace(Receiver::start_grpc().await).await;
}

async fn one_commands_trace(receiver: Receiver) {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut worker = spawn(&env, &receiver, &[]);
    let ext = unique("TRACED");
    send_traced(&env, &ext, &format!("00-{TRACE}-{UPSTREAM}-01")).await;
    let event = tap.next(Duration::from_secs(30)).await;
    assert_eq!(event.routing_key, "group.created");

    let spans = receiver
        .trace(
            TRACE,
            &[
                "process provisioning.group.create",
                "dedup claim",
                "POST /v3/groups",
                "dedup record",
                "publish provisioning.events",
            ],
        )
        .await;
    eprintln!("{}", tree(&spans, UPSTREAM, 0));
    let one = |name: &str| {
        let found: Vec<&Got> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "{name}: {spans:#?}");
        found[0].clone()
    };
    let delivery = one("process provisioning.group.create");
    assert_eq!(
        delivery.parent, UPSTREAM,
        "the publisher's span is the parent"
    );
    assert_eq!(delivery.kind, CONSUMER);
    assert_eq!(delivery.service, "provisioner-under-test");
    for (key, value) in [
        ("messaging.system", "rabbitmq"),
        ("messaging.operation.type", "process"),
        (
            "messaging.destination.name",
            env.settings.topology.work_queue.as_str(),
        ),
        ("messaging.message.id", "traced-message"),
        ("messaging.message.conversation_id", "traced-conversation"),
        ("ext_id", ext.as_str()),
    ] {
        assert_eq!(delivery.attr(key), Some(value), "{key}: {delivery:#?}");
    }
    for child in [
        "dedup claim",
        "dedup record",
        "POST /v3/groups",
        "publish provisioning.events",
    ] {
        let span = one(child);
        assert_eq!(
            span.parent, delivery.span_id,
            "{child} is the delivery's child"
        );
        assert!(
            INTERNAL_OR_CLIENT.contains(&span.kind) || span.kind == PRODUCER,
            "{span:#?}"
        );
    }
    let http = one("POST /v3/groups");
    assert_eq!(http.kind, CLIENT);
    assert_eq!(http.attr("http.request.method"), Some("POST"));
    assert_eq!(http.attr("server.address"), Some("127.0.0.1"));
    assert_eq!(http.attr("http.response.status_code"), Some("201"));
    let api_tp = env.sim.sim.requests()[0].traceparent.clone().expect("sent");
    assert_eq!(
        api_tp,
        format!("00-{TRACE}-{}-01", http.span_id),
        "the API's parent is the request's span"
    );
    let publish = one("publish provisioning.events");
    assert_eq!(publish.kind, PRODUCER);
    assert_eq!(
        publish.attr("messaging.rabbitmq.destination.routing_key"),
        Some("group.created")
    );
    assert_eq!(
        event.header("traceparent"),
        Some(format!("00-{TRACE}-{}-01", publish.span_id)),
        "the event's consumers see the publish span as their parent"
    );
    assert_eq!(one("dedup claim").attr("db.system.name"), Some("redis"));
    // The log lines kept their keys: no dotted attribute leaked into them.
    let outcome = worker
        .wait_line("the outcome", Duration::from_secs(5), |l| {
            l["message"] == "outcome"
        })
        .await;
    assert!(
        outcome
            .as_object()
            .expect("object")
            .keys()
            .all(|k| !k.contains('.')),
        "{outcome}"
    );
    worker.stop().await;
    env.cleanup().await;
}

/// A command whose API calls fail: its attempts are spans of their own, and after a delay
/// tier the next delivery continues the same trace as the child of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_command_shows_every_attempt_in_one_trace() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new().await;
    env.sim
        .sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(2, 503)));
    let mut tap = env.event_tap().await;
    let mut worker = spawn(&env, &receiver, &[("PROVISIONER__RETRY__MAX_TRIES", "2")]);
    let ext = unique("RETRIED");
    send_traced(&env, &ext, &format!("00-{TRACE}-{UPSTREAM}-01")).await;
    let event = tap.next(Duration::from_secs(30)).await;
    assert_eq!(event.routing_key, "group.created", "{}", event.body);
    let delivery = "process provisioning.group.create";
    let spans = receiver
        .trace(
            TRACE,
            &[
                delivery,
                delivery,
                "POST /v3/groups",
                "POST /v3/groups",
                "POST /v3/groups",
            ],
        )
        .await;
    eprintln!("{}", tree(&spans, UPSTREAM, 0));
    let deliveries: Vec<&Got> = spans.iter().filter(|s| s.name == delivery).collect();
    let first = deliveries
        .iter()
        .find(|d| d.parent == UPSTREAM)
        .expect("the first delivery is the publisher's child");
    let second = deliveries
        .iter()
        .find(|d| d.parent == first.span_id)
        .expect("the delivery after the delay tier is the first one's child");
    let statuses = |parent: &str| -> Vec<String> {
        spans
            .iter()
            .filter(|s| s.name == "POST /v3/groups" && s.parent == parent)
            .map(|s| {
                s.attr("http.response.status_code")
                    .unwrap_or("none")
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(statuses(&first.span_id), ["503", "503"], "{spans:#?}");
    assert_eq!(statuses(&second.span_id), ["201"]);
    let failed = spans
        .iter()
        .find(|s| s.name == "POST /v3/groups" && s.parent == first.span_id)
        .expect("a failed attempt");
    assert_eq!(failed.attr("error.type"), Some("503"));
    assert!(
        !first.events.is_empty(),
        "the first delivery's log lines are its span events: {first:#?}"
    );
    worker.stop().await;
    env.cleanup().await;
}

/// With export on and the collector gone, commands still flow; what cannot be sent is
/// counted, never waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_spans_not_commands() {
    let receiver = Receiver::start().await;
    // Nothing listens here any more.
    let endpoint = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut all: Vec<(&str, &str)> = worker_env(&[]);
    let otel = otel_env(&receiver);
    all.extend(otel.iter().map(|(k, v)| (*k, v.as_str())));
    all.retain(|(k, _)| *k != "OTEL_EXPORTER_OTLP_ENDPOINT");
    all.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()));
    all.push(("OTEL_EXPORTER_OTLP_TIMEOUT", "500"));
    let mut worker = WorkerProcess::spawn(&env, &all);
    let (bodies, exts) = crate::faults::commands(&unique("NOCOLLECTOR"), 50);
    env.send_many(&bodies).await;
    collect_created(&mut tap, &exts, Duration::from_secs(60)).await;
    wait_for("spans counted as lost", Duration::from_secs(30), || async {
        let lost = worker
            .metric("provisioner_trace_spans_dropped_total{reason=\"export_failed\"}")
            .await
            .unwrap_or(0.0);
        (lost > 0.0).then_some(())
    })
    .await;
    assert!(receiver.spans.lock().expect("lock").is_empty());
    let said = worker
        .wait_text("message", "trace export failed", Duration::from_secs(5))
        .await;
    assert_eq!(said["level"], "WARN", "{said}");
    let started = worker
        .wait_line("where traces go", Duration::from_secs(5), |l| {
            l["message"] == "exporting traces"
        })
        .await;
    assert!(
        started["traces"]
            .as_str()
            .is_some_and(|t| t.contains("http/protobuf")),
        "{started}"
    );
    worker.stop().await;
    env.cleanup().await;
}

/// The spans under `parent`, indented, with their ids and main attributes: printed by the
/// test, so a failure shows the trace the receiver got.
fn tree(spans: &[Got], parent: &str, depth: usize) -> String {
    let mut out = String::new();
    let mut children: Vec<&Got> = spans.iter().filter(|s| s.parent == parent).collect();
    children.sort_by_key(|s| s.start);
    for s in children {
        let mut attrs: Vec<String> = s
            .attributes
            .iter()
            .filter(|(k, _)| k.contains('.') || k.as_str() == "ext_id")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        attrs.sort();
        out.push_str(&format!(
            "{}{} [span {}, kind {}, {:.1} ms] {}\n",
            "  ".repeat(depth),
            s.name,
            s.span_id,
            s.kind,
            s.end.saturating_sub(s.start) as f64 / 1e6,
            attrs.join(" ")
        ));
        out.push_str(&tree(spans, &s.span_id, depth + 1));
    }
    out
}

/// What the SDK would take silently stops start-up with exit 2, naming the variable and
/// never quoting the endpoint (it may hold credentials).
#[test]
fn a_wrong_otel_variable_stops_start_up_and_names_it() {
    let endpoint = (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://user:s3cret@127.0.0.1:4318",
    );
    for (bad, named) in [
        (
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "user:s3cret@collector")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            vec![endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            vec![endpoint, ("OTEL_TRACES_SAMPLER", "sometimes")],
            "OTEL_TRACES_SAMPLER",
        ),
        (
            vec![
                endpoint,
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0,1"),
            ],
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            vec![endpoint, ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")],
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ),
    ] {
        let mut env = bad.clone();
        env.push(("PROVISIONER__API__TOKEN", "t"));
        let out = crate::process::run_with_env(&["run"], &env);
        let err = crate::process::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert!(
            err.starts_with(&format!("config error: {named}: ")),
            "{bad:?}: {err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }
}

/// Spans are made at `info`: with a log level above it nothing could be exported, and the
/// worker says so at start instead of exporting nothing in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_level_that_hides_the_spans_is_said_at_start() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new().await;
    let mut worker = spawn(&env, &receiver, &[("PROVISIONER__LOG__LEVEL", "warn")]);
    let said = worker
        .wait_text(
            "message",
            "trace export is on but log.level is above info",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(said["level"], "WARN", "{said}");
    assert_eq!(said["log_level"], "warn", "{said}");
    worker.stop().await;
    env.cleanup().await;
}

/// A hostile publisher's trace headers with export on: a 64 KiB `traceparent`, one in
/// upper case, one with a zero trace id, control characters. Each command is still
/// created, and its delivery starts a trace of its own instead of joining a bogus one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_trace_headers_start_a_trace_of_their_own() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut worker = spawn(&env, &receiver, &[]);
    let hostile = [
        format!("00-{}-{UPSTREAM}-01", "f".repeat(65_536)),
        format!("00-{}-{}-01", TRACE.to_uppercase(), UPSTREAM.to_uppercase()),
        format!("00-{}-{UPSTREAM}-01", "0".repeat(32)),
        format!("00-{TRACE}-{UPSTREAM}-01\u{1b}[2J\r\n"),
    ];
    let mut exts = Vec::new();
    for tp in &hostile {
        let ext = unique("HOSTILE-TP");
        send_traced(&env, &ext, tp).await;
        exts.push(ext);
    }
    let created = collect_created(
        &mut tap,
        &exts.iter().cloned().collect(),
        Duration::from_secs(30),
    )
    .await;
    for e in &created {
        let tp = e.header("traceparent").expect("a traceparent on the event");
        assert!(!tp.contains(TRACE), "joined a bogus trace: {tp}");
    }
    wait_for(
        "a delivery span per command",
        Duration::from_secs(30),
        || async {
            let spans = receiver.spans.lock().expect("lock");
            let roots = spans
                .iter()
                .filter(|s| s.name.starts_with("process ") && s.parent.is_empty())
                .filter(|s| {
                    s.attr("ext_id")
                        .is_some_and(|x| exts.iter().any(|e| e == x))
                })
                .count();
            (roots == exts.len()).then_some(())
        },
    )
    .await;
    worker.stop().await;
    env.cleanup().await;
}

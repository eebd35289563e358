//! Test scaffolding: a simulator on port 0, a RabbitMQ vhost and a Redis key prefix per
//! test, a worker in process, a command publisher and an event tap.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use group_provisioner::amqp::headers::{header_string, header_u32};
use group_provisioner::amqp::topology::Topology;
use group_provisioner::config::{DelayTier, Settings, Sources};
use group_provisioner::convirza::{Auth, ConvirzaClient};
use group_provisioner::secret::SecretString;
use group_provisioner::sim::{self, SimConfig, SimHandle};
use group_provisioner::worker::{self, WorkerHandle};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::Value;

pub const SIM_TOKEN: &str = "sim-token";
/// The broker under test: the machine's own (`127.0.0.1:5672`); with `GP_TEST_RABBITMQ=4`,
/// the RabbitMQ 4.x node `scripts/rabbitmq4.sh` runs beside it (5673, management 15673);
/// or any other named by `GP_TEST_AMQP_HOST` and `GP_TEST_MANAGEMENT`.
pub static AMQP_HOST: Endpoint =
    Endpoint::new("GP_TEST_AMQP_HOST", "127.0.0.1:5672", "127.0.0.1:5673");
pub static MANAGEMENT: Endpoint = Endpoint::new(
    "GP_TEST_MANAGEMENT",
    "http://127.0.0.1:15672",
    "http://127.0.0.1:15673",
);

/// An address from the environment, or its default; formats as the address.
pub struct Endpoint {
    var: &'static str,
    default: &'static str,
    rabbitmq4: &'static str,
    value: std::sync::OnceLock<String>,
}

impl Endpoint {
    const fn new(var: &'static str, default: &'static str, rabbitmq4: &'static str) -> Endpoint {
        Endpoint {
            var,
            default,
            rabbitmq4,
            value: std::sync::OnceLock::new(),
        }
    }

    pub fn get(&self) -> &str {
        self.value.get_or_init(|| {
            std::env::var(self.var).unwrap_or_else(|_| {
                match std::env::var("GP_TEST_RABBITMQ").as_deref() {
                    Ok("4") => self.rabbitmq4.to_owned(),
                    _ => self.default.to_owned(),
                }
            })
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
const VHOST_PREFIX: &str = "gp-test-";

/// A simulator on a free loopback port with default rules.
pub async fn spawn_sim() -> SimHandle {
    spawn_sim_with(SimConfig::default()).await
}

pub async fn spawn_sim_with(config: SimConfig) -> SimHandle {
    sim::spawn(SimConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..config
    })
    .await
    .expect("simulator binds a free port")
}

pub fn client_for(sim: &SimHandle, timeout: Duration) -> ConvirzaClient {
    client_with_token(&sim.base_url(), SIM_TOKEN, timeout)
}

pub fn client_with_token(base_url: &str, token: &str, timeout: Duration) -> ConvirzaClient {
    ConvirzaClient::new(base_url, Auth::Static(SecretString::from(token)), timeout).expect("client")
}

/// A short random suffix so names never collide between tests or runs.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Poll `check` until it returns `Some`, or fail the test after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if started.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// A broker user with full permissions on `vhost` (management HTTP API); delete it with
/// [`delete_user`].
pub async fn create_user(name: &str, password: &str, vhost: &str) {
    create_user_with(name, password, vhost, [".*", ".*", ".*"], "").await;
}

/// A broker user with these (configure, write, read) permissions on `vhost` and these
/// tags; delete it with [`delete_user`].
pub async fn create_user_with(
    name: &str,
    password: &str,
    vhost: &str,
    [configure, write, read]: [&str; 3],
    tags: &str,
) {
    let c = http();
    for (path, body) in [
        (
            format!("users/{name}"),
            serde_json::json!({"password": password, "tags": tags}),
        ),
        (
            format!("permissions/{vhost}/{name}"),
            serde_json::json!({"configure": configure, "write": write, "read": read}),
        ),
    ] {
        let r = c
            .put(format!("{MANAGEMENT}/api/{path}"))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .await
            .expect("management API");
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
    }
}

pub async fn delete_user(name: &str) {
    let _ = http()
        .delete(format!("{MANAGEMENT}/api/users/{name}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
}

/// Create a vhost with full permissions for guest (management HTTP API).
pub async fn create_vhost(name: &str) {
    let c = http();
    management_put(&c, &format!("vhosts/{name}"), "{}").await;
    management_put(
        &c,
        &format!("permissions/{name}/guest"),
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .await;
}

/// PUT a JSON body to the management API, failing the test on anything but success.
async fn management_put(c: &reqwest::Client, path: &str, body: &'static str) {
    let r = c
        .put(format!("{MANAGEMENT}/api/{path}"))
        .basic_auth("guest", Some("guest"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("management API reachable (rabbitmq_management enabled? see scripts/services.sh)");
    assert!(r.status().is_success(), "PUT {path}: {}", r.status());
}

pub async fn delete_vhost(name: &str) {
    let _ = http()
        .delete(format!("{MANAGEMENT}/api/vhosts/{name}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
}

/// Remove test vhosts older than an hour (left behind by interrupted runs).
async fn reap_old_vhosts() {
    let Ok(r) = http()
        .get(format!("{MANAGEMENT}/api/vhosts"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
    else {
        return;
    };
    let Ok(list) = r.json::<Vec<Value>>().await else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for v in list {
        let Some(name) = v["name"].as_str() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(VHOST_PREFIX) else {
            continue;
        };
        let born: u64 = rest
            .split('-')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(now);
        if now.saturating_sub(born) > 3600 {
            delete_vhost(name).await;
        }
    }
}

pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis reachable")
}

pub async fn delete_redis_prefix(prefix: &str) {
    let mut conn = redis_conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
}

/// One isolated world: a vhost, a Redis prefix, a simulator, settings pointing at them,
/// and a confirm-mode channel for the test's own publishing and reading.
pub struct TestEnv {
    pub vhost: String,
    pub prefix: String,
    pub sim: SimHandle,
    pub settings: Settings,
    pub conn: Connection,
    pub channel: Channel,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        TestEnv::with_sim(SimConfig::default()).await
    }

    pub async fn with_sim(config: SimConfig) -> TestEnv {
        reap_old_vhosts().await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let vhost = format!(
            "{VHOST_PREFIX}{now}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        create_vhost(&vhost).await;
        let prefix = unique("gp-test");
        let sim = spawn_sim_with(config).await;
        let settings = test_settings(&vhost, &prefix, &sim.base_url());
        let conn = Connection::connect(
            settings.amqp.url.first().expose(),
            ConnectionProperties::default(),
        )
        .await
        .expect("test connection to the broker");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        TestEnv {
            vhost,
            prefix,
            sim,
            settings,
            conn,
            channel,
        }
    }

    /// Start a worker in process and wait until it consumes.
    pub async fn spawn_worker(&self) -> WorkerHandle {
        self.spawn_worker_with(self.settings.clone()).await
    }

    pub async fn spawn_worker_with(&self, settings: Settings) -> WorkerHandle {
        let handle = worker::start(settings).expect("worker starts");
        assert!(
            handle.wait_consuming(Duration::from_secs(30)).await,
            "worker did not start consuming"
        );
        handle
    }

    /// Declare the topology exactly as the worker does (idempotent).
    pub async fn declare_topology(&self) {
        Topology::new(&self.settings.topology, &self.settings.retry.delays)
            .declare(&self.conn, &self.channel)
            .await
            .expect("topology");
    }

    /// The event exchange as an earlier version declared it: no alternate exchange, so an
    /// event no queue is bound for comes back to the worker.
    pub async fn declare_legacy_event_exchange(&self) {
        self.channel
            .exchange_declare(
                ShortString::from(self.settings.topology.event_exchange.as_str()),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the event exchange as an earlier version declared it");
    }

    /// A durable queue bound to the event exchange for one routing key only.
    pub async fn event_queue(&self, routing_key: &str) -> String {
        self.event_queue_with(routing_key, FieldTable::default())
            .await
    }

    /// A durable queue with these arguments (a quorum queue, a length limit), bound to the
    /// event exchange with `routing_key`: an event consumer's queue.
    pub async fn event_queue_with(&self, routing_key: &str, arguments: FieldTable) -> String {
        let queue = unique("events-only");
        self.channel
            .queue_declare(
                ShortString::from(queue.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .expect("queue");
        self.channel
            .queue_bind(
                ShortString::from(queue.as_str()),
                ShortString::from(self.settings.topology.event_exchange.as_str()),
                ShortString::from(routing_key),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        queue
    }

    /// A channel consuming (no-ack) an exclusive queue bound to every event.
    pub async fn consume_all_events(&self) -> (Channel, lapin::Consumer) {
        let channel = self.conn.create_channel().await.expect("channel");
        let queue = unique("events");
        channel
            .queue_declare(
                ShortString::from(queue.as_str()),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("event queue");
        channel
            .queue_bind(
                ShortString::from(queue.as_str()),
                ShortString::from(self.settings.topology.event_exchange.as_str()),
                ShortString::from("#"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind event queue");
        let consumer = channel
            .basic_consume(
                ShortString::from(queue.as_str()),
                ShortString::from(""),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume events");
        (channel, consumer)
    }

    /// Wait until something consumes the work queue (a worker started as a process).
    pub async fn wait_work_queue_consumed(&self, deadline: Duration) {
        let queue = self.settings.topology.work_queue.clone();
        wait_for("a consumer on the work queue", deadline, || async {
            self.channel
                .queue_declare(
                    ShortString::from(queue.as_str()),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .ok()
                .filter(|q| q.consumer_count() > 0)
                .map(|_| ())
        })
        .await
    }

    /// A queue bound to every event, declared before commands are sent.
    pub async fn event_tap(&self) -> EventTap {
        self.declare_topology().await;
        let (channel, consumer) = self.consume_all_events().await;
        EventTap {
            _channel: channel,
            consumer,
        }
    }

    /// Publish a command body with default properties (JSON, a message id) and confirm.
    pub async fn send(&self, body: &Value) -> String {
        let message_id = uuid::Uuid::new_v4().to_string();
        let props = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(message_id.as_str()));
        self.send_raw(body.to_string().as_bytes(), props).await;
        message_id
    }

    pub async fn send_raw(&self, body: &[u8], props: BasicProperties) {
        let confirm = group_provisioner::amqp::publish_command(
            &self.channel,
            &self.settings.topology,
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        assert_eq!(
            confirm,
            Confirmation::Ack(None),
            "command routed to the work queue"
        );
    }

    /// Publish many commands with pipelined confirms (fast pre-loading).
    pub async fn send_many(&self, bodies: &[Value]) {
        let t = &self.settings.topology;
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in bodies {
            let props =
                BasicProperties::default().with_content_type(ShortString::from("application/json"));
            confirms.push(
                group_provisioner::amqp::publish_command(
                    &self.channel,
                    t,
                    body.to_string().as_bytes(),
                    props,
                )
                .await
                .expect("publish"),
            );
        }
        for c in confirms {
            assert_eq!(c.await.expect("confirm"), Confirmation::Ack(None));
        }
    }

    /// Wait until the work queue, every delay queue and the DLQ hold nothing but what
    /// `dlq` says.
    pub async fn wait_drained(&self, dlq: u32, deadline: Duration) {
        let t = &self.settings.topology;
        let mut queues = vec![t.work_queue.clone()];
        queues.extend(self.settings.retry.delays.iter().map(|d| t.delay_queue(d)));
        wait_for("queues drained", deadline, || {
            let queues = queues.clone();
            async move {
                for q in &queues {
                    if self.queue_depth(q).await > 0 {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
        assert_eq!(
            self.queue_depth(&t.dead_letter_queue).await,
            dlq,
            "dead letters"
        );
    }

    /// Close every connection the worker(s) hold in this vhost (the test's own excluded),
    /// as `rabbitmqctl close_connection` would. The management API lists a connection only
    /// after its next stats emission, so this first waits for one to show up.
    pub async fn close_worker_connections(&self) -> usize {
        let c = http();
        let names = wait_for(
            "the worker's connection in the management API",
            Duration::from_secs(20),
            || {
                let c = c.clone();
                async move {
                    let list: Vec<Value> = c
                        .get(format!(
                            "{MANAGEMENT}/api/vhosts/{}/connections",
                            self.vhost
                        ))
                        .basic_auth("guest", Some("guest"))
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    let names: Vec<String> = list
                        .iter()
                        .filter(|conn| {
                            conn["client_properties"]["connection_name"]
                                .as_str()
                                .is_some_and(|n| n.starts_with("group-provisioner"))
                        })
                        .filter_map(|conn| conn["name"].as_str().map(str::to_owned))
                        .collect();
                    (!names.is_empty()).then_some(names)
                }
            },
        )
        .await;
        for name in &names {
            let r = c
                .delete(format!("{MANAGEMENT}/api/connections/{}", urlencode(name)))
                .basic_auth("guest", Some("guest"))
                .header("X-Reason", "fault test")
                .send()
                .await
                .expect("close connection");
            assert!(r.status().is_success(), "close {name}: {}", r.status());
        }
        names.len()
    }

    /// Publish through the management HTTP API (the broker encodes the frames, so the
    /// test's own client library is not what limits `headers_json`). Returns whether the
    /// message was routed.
    pub async fn publish_via_management(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &str,
        headers_json: &str,
    ) -> bool {
        let request = format!(
            r#"{{"properties":{{"delivery_mode":2,"headers":{headers_json}}},"routing_key":{},"payload":{},"payload_encoding":"string"}}"#,
            Value::from(routing_key),
            Value::from(body),
        );
        let r = http()
            .post(format!(
                "{MANAGEMENT}/api/exchanges/{}/{}/publish",
                self.vhost,
                urlencode(exchange)
            ))
            .basic_auth("guest", Some("guest"))
            .header("content-type", "application/json")
            .body(request)
            .send()
            .await
            .expect("management API");
        assert!(r.status().is_success(), "publish: {}", r.status());
        let answer: Value = r.json().await.expect("json");
        answer["routed"] == true
    }

    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.expect("channel");
        let n = group_provisioner::amqp::ready_count(&ch, queue)
            .await
            .expect("queue exists");
        let _ = ch.close(200, ShortString::from("ok")).await;
        n
    }

    /// Take every message currently in the DLQ.
    pub async fn drain_dlq(&self) -> Vec<DeadLetter> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(
                ShortString::from(self.settings.topology.dead_letter_queue.as_str()),
                BasicGetOptions::default(),
            )
            .await
            .expect("basic_get")
        {
            let d = &m.delivery;
            let headers = d.properties.headers().as_ref();
            out.push(DeadLetter {
                body: d.data.clone(),
                kind: header_string(headers, "x-error-kind"),
                message: header_string(headers, "x-error-message"),
                http_status: header_string(headers, "x-http-status"),
                attempts: header_u32(headers, "x-attempts"),
                first_failed_at: header_string(headers, "x-first-failed-at"),
                worker_version: header_string(headers, "x-worker-version"),
                message_id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_owned()),
                properties: d.properties.clone(),
            });
            d.ack(BasicAckOptions::default())
                .await
                .expect("ack dead letter");
        }
        out
    }

    /// Wait until the dead-letter queue holds `n` messages, then take them.
    pub async fn wait_dlq(&self, n: u32, deadline: Duration) -> Vec<DeadLetter> {
        let dlq = self.settings.topology.dead_letter_queue.clone();
        wait_for(&format!("{n} dead letters"), deadline, || async {
            (self.queue_depth(&dlq).await >= n).then_some(())
        })
        .await;
        self.drain_dlq().await
    }

    /// A command for one of our binaries, configured for this world through the
    /// environment only (as operators run it), outside the repository so no
    /// config/default.toml is picked up.
    pub fn command(&self, bin: &str) -> tokio::process::Command {
        let s = &self.settings;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.current_dir(std::env::temp_dir())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PROVISIONER__AMQP__URL", amqp_env(&s.amqp.url))
            .env("PROVISIONER__AMQP__MANAGEMENT_URL", MANAGEMENT.get())
            .env("PROVISIONER__REDIS__URL", s.redis.url.expose())
            .env("PROVISIONER__REDIS__KEY_PREFIX", &s.redis.key_prefix)
            .env("PROVISIONER__API__BASE_URL", &s.api.base_url)
            .env("PROVISIONER__API__TOKEN", SIM_TOKEN)
            .env("PROVISIONER__API__TIMEOUT", "2s")
            .env("PROVISIONER__RETRY__INITIAL", "10ms")
            .env("PROVISIONER__RETRY__MAX_INTERVAL", "50ms")
            .env("PROVISIONER__RETRY__DELAYS", "1s,2s")
            .env("PROVISIONER__METRICS__LISTEN", "127.0.0.1:0");
        cmd
    }

    pub async fn cleanup(self) {
        let _ = self.conn.close(200, ShortString::from("test done")).await;
        delete_vhost(&self.vhost).await;
        delete_redis_prefix(&self.prefix).await;
    }
}

/// Settings for one test: its vhost and prefix, the simulator, fast retries.
pub fn test_settings(vhost: &str, prefix: &str, api_base: &str) -> Settings {
    let mut s = Settings::from_sources(Sources {
        toml: Some(format!(
            r#"
[amqp]
url = "amqp://guest:guest@{AMQP_HOST}/{vhost}"
management_url = "{MANAGEMENT}"
prefetch = 32
[redis]
url = "{REDIS_URL}"
key_prefix = "{prefix}"
[api]
base_url = "{api_base}"
token = "{SIM_TOKEN}"
timeout = "2s"
[retry]
initial = "10ms"
max_interval = "50ms"
max_tries = 4
delays = ["1s", "2s"]
[dedup]
lease = "10s"
[circuit]
cooldown = "500ms"
[shutdown]
drain_timeout = "10s"
[metrics]
listen = "127.0.0.1:0"
"#
        )),
        env: Some(HashMap::new()),
        ..Sources::default()
    })
    .expect("test settings");
    s.retry.max_retry_after = Duration::from_secs(5);
    s
}

pub fn tiers(labels: &[&str]) -> Vec<DelayTier> {
    labels
        .iter()
        .map(|l| DelayTier {
            label: (*l).to_owned(),
            delay: group_provisioner::config::parse_duration(l).expect("duration"),
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub kind: Option<String>,
    pub message: Option<String>,
    pub http_status: Option<String>,
    pub attempts: u32,
    pub first_failed_at: Option<String>,
    pub worker_version: Option<String>,
    pub message_id: Option<String>,
    pub properties: BasicProperties,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub routing_key: String,
    pub body: Value,
    pub properties: BasicProperties,
}

impl Event {
    pub fn header(&self, name: &str) -> Option<String> {
        header_string(self.properties.headers().as_ref(), name)
    }
}

pub struct EventTap {
    _channel: Channel,
    consumer: lapin::Consumer,
}

impl EventTap {
    pub async fn next(&mut self, deadline: Duration) -> Event {
        let delivery = tokio::time::timeout(deadline, self.consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no event within {deadline:?}"))
            .expect("event stream open")
            .expect("event delivery");
        let event = Event {
            routing_key: delivery.routing_key.as_str().to_owned(),
            body: serde_json::from_slice(&delivery.data).expect("event is JSON"),
            properties: delivery.properties,
        };
        assert_fits_its_schema(&event);
        event
    }

    pub async fn take(&mut self, n: usize, deadline: Duration) -> Vec<Event> {
        let started = tokio::time::Instant::now();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline
                .checked_sub(started.elapsed())
                .unwrap_or_else(|| panic!("only {} of {n} events within {deadline:?}", out.len()));
            out.push(self.next(left).await);
        }
        out
    }

    /// Assert that no further event arrives within `quiet`.
    pub async fn assert_quiet(&mut self, quiet: Duration) {
        if let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, self.consumer.next()).await {
            panic!(
                "unexpected extra event: {}",
                String::from_utf8_lossy(&d.data)
            );
        }
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A port nothing listens on right now.
/// A free port below the kernel's ephemeral range (32768–60999 by default), for a server
/// that is stopped and started again on the same port: while it is down, no port-0 bind or
/// outgoing connection elsewhere in the suite can take it.
pub fn stable_port() -> u16 {
    loop {
        let port = 20_000 + (rand_u16() % 10_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn rand_u16() -> u16 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u16::from_le_bytes([bytes[0], bytes[1]])
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A private redis-server on its own port (for tests that stop Redis).
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start(port: u16) -> RedisServer {
        RedisServer::start_with(port, &[]).await
    }

    /// With extra `redis-server` arguments (e.g. `--requirepass`).
    pub async fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (installed by scripts/services.sh)");
        let server = RedisServer {
            port,
            child: Some(child),
        };
        // Answering on the port is not enough: it must be this process (another one may
        // hold the port, and then this redis-server has exited).
        let pid = server.child.as_ref().map(std::process::Child::id);
        let password = extra
            .iter()
            .position(|a| *a == "--requirepass")
            .and_then(|i| extra.get(i + 1))
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        let answered = wait_for(
            "redis-server to answer",
            Duration::from_secs(10),
            || async {
                let client =
                    redis::Client::open(format!("redis://{password}127.0.0.1:{port}/0")).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                let info: String = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                info.lines()
                    .find_map(|l| l.strip_prefix("process_id:"))
                    .and_then(|p| p.trim().parse::<u32>().ok())
            },
        )
        .await;
        assert_eq!(
            Some(answered),
            pid,
            "port {port} is answered by another redis-server (port taken?)"
        );
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Collect events until every ext id in `expected` has a `group.created`; returns them
/// all. Fails on any `group.create.failed`.
pub async fn collect_created(
    tap: &mut EventTap,
    expected: &HashSet<String>,
    deadline: Duration,
) -> Vec<Event> {
    let started = tokio::time::Instant::now();
    let mut seen: HashSet<String> = HashSet::new();
    let mut all = Vec::new();
    while !expected.is_subset(&seen) {
        let left = deadline.checked_sub(started.elapsed()).unwrap_or_else(|| {
            panic!(
                "{} of {} ext ids created within {deadline:?}",
                seen.len(),
                expected.len()
            )
        });
        let e = tap.next(left).await;
        assert_eq!(
            e.routing_key, "group.created",
            "unexpected failure: {}",
            e.body
        );
        seen.insert(e.body["ext_id"].as_str().expect("ext id").to_owned());
        all.push(e);
    }
    all
}

pub fn header_value(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// `amqp.url` as the environment carries it: the nodes, comma-separated.
pub fn amqp_env(nodes: &group_provisioner::config::AmqpNodes) -> String {
    nodes
        .urls()
        .iter()
        .map(|u| u.expose())
        .collect::<Vec<_>>()
        .join(",")
}

/// `amqp.url` from plain URLs.
pub fn amqp_nodes(urls: &[String]) -> group_provisioner::config::AmqpNodes {
    group_provisioner::config::AmqpNodes::new(
        urls.iter()
            .map(|u| group_provisioner::secret::SecretUrl::new(u.clone()))
            .collect(),
    )
    .expect("at least one node")
}

/// A TCP proxy on loopback in front of one address: two of them in front of one broker
/// stand in for two nodes of a cluster, and [`TcpProxy::cut`] makes one disappear.
pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    cut: tokio_util::sync::CancellationToken,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TcpProxy {
    pub async fn start(upstream: &str) -> TcpProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = tokio_util::sync::CancellationToken::new();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_owned();
        let (c, a, o) = (cut.clone(), accepted.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    // Dropping the listener: the port refuses from now on.
                    () = c.cancelled() => return,
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (c, o, upstream) = (c.clone(), o.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    o.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = c.cancelled() => {}
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        TcpProxy {
            addr,
            cut,
            accepted,
            open,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The node disappears: every connection is dropped and the port refuses.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut.cancel();
    }
}

/// Every event a test captures must fit its schema in `docs/schemas/`: the contract and
/// the code cannot drift apart without a test failing.
pub fn assert_fits_its_schema(event: &Event) {
    static CREATED: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    static FAILED: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    let validator = match event.routing_key.as_str() {
        "group.created" => CREATED.get_or_init(|| schema_validator("group.created.schema.json")),
        "group.create.failed" => {
            FAILED.get_or_init(|| schema_validator("group.create.failed.schema.json"))
        }
        other => panic!("an event with routing key {other:?} is not in the contract"),
    };
    let errors: Vec<String> = validator
        .iter_errors(&event.body)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{} does not fit its schema: {errors:?}\n{}",
        event.routing_key,
        event.body
    );
}

/// A validator for one of `docs/schemas/` (formats such as `date-time` checked too).
pub fn schema_validator(file: &str) -> jsonschema::Validator {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/schemas")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema: Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{} is not a valid schema: {e}", path.display()))
}

/// A new directory under the temporary directory, removed when the test ends (passed or
/// failed): the suite fails if its temporary directory is not empty at the end.
pub struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(unique(name));
    std::fs::create_dir(&dir).expect("a temporary directory");
    TempDir(dir)
}

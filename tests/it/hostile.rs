//! Hostile or odd messages, through the worker binary: one message may cost only itself —
//! never the session, another command, or a dead letter.

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::{Value, json};

use crate::helpers::*;
use crate::process::{WorkerProcess, cli, stdout, worker_env};
use group_provisioner::amqp::headers::header_string;
use group_provisioner::sim::FailNext;

fn commands(prefix: &str, n: usize) -> (Vec<Value>, HashSet<String>) {
    let bodies: Vec<Value> = (0..n)
        .map(|i| json!({"org_unit_ext_id": format!("{prefix}-{i}"), "org_unit_name": format!("{prefix} team {i}"), "org_unit_parent_id": 1000}))
        .collect();
    let exts = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    (bodies, exts)
}

fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

/// No "broker session lost" line: the worker never had to reconnect.
fn assert_no_session_restart(worker: &WorkerProcess) {
    let lost: Vec<Value> = worker
        .lines()
        .into_iter()
        .filter(|l| l["message"] == "broker session lost; reconnecting")
        .collect();
    assert!(lost.is_empty(), "the session restarted: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_costs_only_its_own_message() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut worker = WorkerProcess::spawn(&env, &worker_env(&[]));
    worker.wait_consuming().await;
    let (bodies, exts) = commands("BIG", 50);
    // Invalid body, and one header just under what the broker accepts in a frame (131,072
    // bytes, the copy must fit too): any header the worker adds to a copy overflows it.
    let big = AMQPValue::LongString(LongString::from("h".repeat(130_950)));
    env.send_raw(
        b"not json",
        BasicProperties::default()
            .with_message_id("m-big".into())
            .with_headers(headers(&[("x-big", big)])),
    )
    .await;
    env.send_many(&bodies).await;

    let mut created = HashSet::new();
    let mut failed = 0;
    while created.len() < exts.len() || failed < 1 {
        let e = tap.next(Duration::from_secs(60)).await;
        match e.routing_key.as_str() {
            "group.created" => {
                assert_eq!(
                    e.body["duplicate"], false,
                    "an innocent command: {}",
                    e.body
                );
                created.insert(e.body["ext_id"].as_str().expect("ext id").to_owned());
            }
            _ => {
                assert_eq!(e.body["error"]["kind"], "invalid_command", "{}", e.body);
                failed += 1;
            }
        }
    }
    assert_eq!(created, exts);
    env.wait_drained(1, Duration::from_secs(30)).await;
    assert_eq!(env.sim.sim.stats().groups_created, 50);
    assert_no_session_restart(&worker);

    let peek = cli(&env, &["dlq", "peek", "--json"], &[]).await;
    assert_eq!(peek.status.code(), Some(0), "{peek:?}");
    let out = stdout(&peek);
    let letter: Value =
        serde_json::from_str(out.lines().next().expect("one dead letter")).expect("json");
    assert_eq!(letter["kind"], "invalid_command");
    assert_eq!(letter["message_id"], "m-big");
    assert!(
        letter["headers"]["x-dropped-headers"]
            .as_str()
            .is_some_and(|d| d.contains("x-big")),
        "the copy says what it dropped: {letter}"
    );
    worker.stop().await;
    env.cleanup().await;
}

/// A worker process that is consuming.
async fn worker(env: &TestEnv, extra: &[(&'static str, &'static str)]) -> WorkerProcess {
    let w = WorkerProcess::spawn(env, &worker_env(extra));
    w.wait_consuming().await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_do_not_inherit_the_commands_expiration() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut w = worker(&env, &[]).await;
    let expiring = || BasicProperties::default().with_expiration("1500".into());
    // Rejected by the API (no such parent), and invalid.
    env.send_raw(
        json!({"org_unit_ext_id": "EXP-1", "org_unit_name": "x", "org_unit_parent_id": 4242})
            .to_string()
            .as_bytes(),
        expiring(),
    )
    .await;
    env.send_raw(b"{\"org_unit_ext_id\": \"EXP-2\"}", expiring())
        .await;
    let events = tap.take(2, Duration::from_secs(30)).await;
    assert!(
        events
            .iter()
            .all(|e| e.routing_key == "group.create.failed")
    );
    // Past the original TTL, both are still there.
    wait_for(
        "the original TTL to pass",
        Duration::from_secs(10),
        || async {
            let since = events[1].properties.timestamp().unwrap_or(0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            (now >= since + 3).then_some(())
        },
    )
    .await;
    let letters = env.wait_dlq(2, Duration::from_secs(5)).await;
    assert_eq!(letters.len(), 2, "no dead letter expired");
    for l in &letters {
        assert_eq!(*l.properties.expiration(), None, "{:?}", l.properties);
        assert_eq!(
            header_value_of(&l.properties, "x-original-expiration").as_deref(),
            Some("1500")
        );
    }
    w.stop().await;
    env.cleanup().await;
}

fn header_value_of(p: &BasicProperties, name: &str) -> Option<String> {
    group_provisioner::amqp::headers::header_string(p.headers().as_ref(), name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_failure_event_never_makes_a_second_dead_letter() {
    let env = TestEnv::new().await;
    let queue = created_events_only(&env).await;
    let mut w = worker(&env, &[]).await;
    env.send_raw(b"not json", BasicProperties::default()).await;
    let circuit_open = w
        .wait_line(
            "the circuit to open on the publish",
            Duration::from_secs(20),
            |l| l["circuit"] == "open" && l["fault"] == "publish",
        )
        .await;
    assert!(circuit_open["reason"].as_str().is_some());
    // The probe publishes the failed event again: while nobody routes it, the circuit stays
    // open (two failed probes) instead of flapping.
    let failed_probes = || {
        w.lines()
            .iter()
            .filter(|l| {
                l["message"] == "probe failed" || l["message"] == "circuit still open: probe failed"
            })
            .count()
    };
    wait_for("two failed probes", Duration::from_secs(30), || async {
        (failed_probes() >= 2).then_some(())
    })
    .await;
    assert!(
        !w.lines().iter().any(|l| l["circuit"] == "closed"),
        "no flapping"
    );
    // The dead letter was written before the event failed; the parked message knows it.
    assert_eq!(env.queue_depth("provisioning.group.create.dlq").await, 1);

    // Once someone listens, the circuit closes, the parked message comes back owing only
    // its event, and there is still exactly one dead letter.
    bind_events(&env, &queue, "group.create.failed").await;
    w.wait_line("the circuit to close", Duration::from_secs(30), |l| {
        l["circuit"] == "closed"
    })
    .await;
    w.wait_line(
        "the parked message to settle",
        Duration::from_secs(30),
        |l| l["message"] == "outcome" && l["outcome"] == "dead_lettered",
    )
    .await;
    env.wait_drained(1, Duration::from_secs(30)).await;
    wait_for("nothing in flight", Duration::from_secs(20), || async {
        (w.metric("provisioner_in_flight").await == Some(0.0)).then_some(())
    })
    .await;
    assert_eq!(env.drain_dlq().await.len(), 1, "exactly one dead letter");
    // The delivery parked after the publish fault says why, like every outcome line.
    let deferred: Vec<Value> = w
        .lines()
        .into_iter()
        .filter(|l| l["message"] == "outcome" && l["outcome"] == "deferred")
        .collect();
    assert!(!deferred.is_empty(), "the parked delivery's outcome line");
    for l in &deferred {
        assert!(l["reason"].is_string(), "outcome without a reason: {l}");
    }
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_the_circuit_is_open_is_rebuilt_not_probed_forever() {
    let env = TestEnv::new().await;
    let queue = created_events_only(&env).await;
    let mut w = worker(&env, &[]).await;
    env.send_raw(b"not json", BasicProperties::default()).await;
    w.wait_line(
        "the circuit to open on the publish",
        Duration::from_secs(20),
        |l| l["circuit"] == "open" && l["fault"] == "publish",
    )
    .await;
    // The consumer is cancelled while the circuit is open: nothing but the probe would
    // notice the connection is gone.
    assert!(env.close_worker_connections().await >= 1);
    w.wait_line("the session to be rebuilt", Duration::from_secs(30), |l| {
        l["message"] == "broker session lost; reconnecting"
    })
    .await;
    w.wait_line("a new connection", Duration::from_secs(30), |l| {
        l["message"] == "connected to the broker; topology declared"
    })
    .await;
    bind_events(&env, &queue, "group.create.failed").await;
    w.wait_line("the circuit to close", Duration::from_secs(30), |l| {
        l["circuit"] == "closed"
    })
    .await;
    w.wait_line(
        "the parked message to settle",
        Duration::from_secs(30),
        |l| l["message"] == "outcome" && l["outcome"] == "dead_lettered",
    )
    .await;
    env.wait_drained(1, Duration::from_secs(30)).await;
    assert_eq!(env.drain_dlq().await.len(), 1, "exactly one dead letter");
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_headers_cost_only_their_message() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut w = worker(&env, &[]).await;
    // 15,000 levels of tables, and of arrays: far past what a default 2 MiB thread stack
    // parses (the broker client aborted the whole process on the first one), within what
    // a frame can carry. The deepest a frame allows (about 21,000 tables or 26,000 arrays)
    // is measured against the release build in docs/deployment.md.
    let depth = 15_000;
    let nested = [
        format!(
            "{{\"deep\":{}1{}}}",
            "{\"a\":".repeat(depth),
            "}".repeat(depth)
        ),
        format!("{{\"deep\":{}1{}}}", "[".repeat(depth), "]".repeat(depth)),
    ];
    for (i, headers) in nested.iter().enumerate() {
        let body = json!({"org_unit_ext_id": format!("DEEP-{i}"), "org_unit_name": "deep", "org_unit_parent_id": 4242});
        assert!(
            env.publish_via_management("provisioning", "group.create", &body.to_string(), headers)
                .await,
            "routed"
        );
    }
    env.send(&json!({"org_unit_ext_id": "DEEP-OK", "org_unit_name": "after", "org_unit_parent_id": 1000}))
        .await;
    let events = tap.take(3, Duration::from_secs(60)).await;
    let key_of = |ext: &str| {
        events
            .iter()
            .find(|e| e.body["ext_id"] == ext)
            .map(|e| e.routing_key.clone())
    };
    // 4242 is no parent the API knows: each deep command fails on its own merits.
    for ext in ["DEEP-0", "DEEP-1"] {
        assert_eq!(key_of(ext).as_deref(), Some("group.create.failed"), "{ext}");
    }
    assert_eq!(key_of("DEEP-OK").as_deref(), Some("group.created"));
    let dead = env.drain_dlq().await;
    assert_eq!(dead.len(), 2, "their dead letters");
    for d in &dead {
        assert!(
            header_string(d.properties.headers().as_ref(), "x-dropped-headers")
                .is_some_and(|h| h.contains("deep")),
            "the nested header was left out of the copy"
        );
    }
    assert!(
        w.metric("provisioner_in_flight").await.is_some(),
        "still serving"
    );
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc_headers_never_route_a_copy_anywhere_else() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    env.declare_topology().await;
    let planted = unique("planted");
    env.channel
        .queue_declare(
            ShortString::from(planted.as_str()),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("planted queue");
    let work_queue = env.settings.topology.work_queue.clone();
    // Sender-selected distribution: a copy published with these headers would also land in
    // the planted queue and a second time in the work queue.
    let cc = || {
        let mut t = FieldTable::default();
        for name in ["CC", "BCC"] {
            t.insert(
                name.into(),
                AMQPValue::FieldArray(
                    vec![
                        AMQPValue::LongString(planted.as_str().into()),
                        AMQPValue::LongString(work_queue.as_str().into()),
                    ]
                    .into(),
                ),
            );
        }
        BasicProperties::default().with_headers(t)
    };
    let mut w = worker(&env, &[]).await;
    // One retried (every try of its first delivery fails: a delay-tier copy), one invalid
    // (a dead letter).
    env.sim
        .sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(4, 503)));
    env.send_raw(
        json!({"org_unit_ext_id": "CC-1", "org_unit_name": "cc", "org_unit_parent_id": 1000})
            .to_string()
            .as_bytes(),
        cc(),
    )
    .await;
    env.send_raw(b"{\"org_unit_ext_id\": \"CC-2\"}", cc()).await;
    let events = tap.take(2, Duration::from_secs(60)).await;
    let key_of = |ext: &str| {
        events
            .iter()
            .find(|e| e.body["ext_id"] == ext)
            .map(|e| e.routing_key.clone())
    };
    assert_eq!(key_of("CC-1").as_deref(), Some("group.created"));
    assert_eq!(key_of("CC-2").as_deref(), Some("group.create.failed"));
    env.wait_drained(1, Duration::from_secs(30)).await;
    assert_eq!(env.queue_depth(&planted).await, 0, "nothing planted");
    assert_eq!(env.sim.sim.groups_for("CC-1").len(), 1);
    // Each command settled once: no copy came back through the work queue a second time.
    let mut outcomes: Vec<String> = w
        .lines()
        .iter()
        .filter(|l| l["message"] == "outcome")
        .map(|l| {
            format!(
                "{} {}",
                l["ext_id"].as_str().unwrap_or("?"),
                l["outcome"].as_str().unwrap_or("?")
            )
        })
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        ["CC-1 created", "CC-1 deferred", "CC-2 dead_lettered"]
    );
    tap.assert_quiet(Duration::from_millis(300)).await;
    w.stop().await;
    env.cleanup().await;
}

/// Declare the topology as an earlier version did (an event exchange without alternate
/// exchange, and no policy) and a queue that hears only `group.created` events: a failure
/// event is then unroutable and comes back to the worker.
async fn created_events_only(env: &TestEnv) -> String {
    env.declare_legacy_event_exchange().await;
    env.declare_topology().await;
    env.event_queue("group.created").await
}

async fn bind_events(env: &TestEnv, queue: &str, routing_key: &str) {
    env.channel
        .queue_bind(
            ShortString::from(queue),
            ShortString::from("provisioning.events"),
            ShortString::from(routing_key),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
}

/// Damage an ext id's records: `Some(bytes)` stores that value, `None` a hash in its place;
/// the attempt marker gets bytes that are neither JSON nor UTF-8.
async fn write_raw_record(env: &TestEnv, ext_id: &str, value: Option<&[u8]>) {
    let mut conn = redis_conn().await;
    let key = format!("{}:group:{ext_id}", env.prefix);
    let _: () = match value {
        Some(bytes) => {
            redis::cmd("SET")
                .arg(&key)
                .arg(bytes)
                .query_async(&mut conn)
                .await
        }
        None => {
            redis::cmd("HSET")
                .arg(&key)
                .arg("f")
                .arg("v")
                .query_async(&mut conn)
                .await
        }
    }
    .expect("write the damaged record");
    let attempt = format!("{}:attempt:{ext_id}", env.prefix);
    let _: () = redis::cmd("SET")
        .arg(&attempt)
        .arg(b"not-a-number\xff\xfe".as_slice())
        .query_async(&mut conn)
        .await
        .expect("set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_dedup_record_concerns_only_its_ext_id() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let damaged: [(&str, Option<&[u8]>); 4] = [
        (
            "COR-1",
            Some(b"{\"state\":\"from-a-future-version\",\"x\":1}"),
        ),
        ("COR-2", None),
        // Not UTF-8 at all.
        ("COR-3", Some(b"\xff\xfe{\"state\":\"created\"")),
        // What an older marker of a key of another type looked like.
        ("COR-4", Some(b"\0\0\0")),
    ];
    for (ext, value) in damaged {
        write_raw_record(&env, ext, value).await;
    }
    // The operator can look at every one of them before the worker repairs it.
    for (ext, _) in damaged {
        let st = crate::process::cli(&env, &["status", ext, "--json"], &[]).await;
        assert_eq!(st.status.code(), Some(0), "{ext}: {st:?}");
        let status: Value = serde_json::from_slice(&st.stdout).expect("json");
        assert_eq!(status["state"], "unreadable", "{ext}");
    }
    // COR-2's group exists already: reconciliation must find it, not post again.
    let existing = env.sim.sim.seed_group(1000, "COR team 2", Some("COR-2"));
    let mut w = worker(&env, &[]).await;
    let (mut bodies, mut exts) = commands("OK", 20);
    for (i, (e, _)) in damaged.iter().enumerate() {
        bodies.push(json!({"org_unit_ext_id": e, "org_unit_name": format!("COR team {}", i + 1), "org_unit_parent_id": 1000}));
        exts.insert((*e).to_owned());
    }
    env.send_many(&bodies).await;
    let events = collect_created(&mut tap, &exts, Duration::from_secs(60)).await;
    let cor2 = events
        .iter()
        .find(|e| e.body["ext_id"] == "COR-2")
        .expect("COR-2");
    assert_eq!(cor2.body["org_unit_id"], existing);
    assert_eq!(cor2.body["duplicate"], true);
    for (ext, _) in damaged {
        assert_eq!(env.sim.sim.groups_for(ext).len(), 1, "{ext}");
    }
    assert!(
        !w.lines().iter().any(|l| l["circuit"] == "open"),
        "Redis stayed up"
    );
    // The records are repaired.
    for (ext, _) in damaged {
        let st = crate::process::cli(&env, &["status", ext, "--json"], &[]).await;
        assert_eq!(st.status.code(), Some(0), "{ext}: {st:?}");
        let status: Value = serde_json::from_slice(&st.stdout).expect("json");
        assert_eq!(status["state"], "created", "{ext}");
    }
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_tools_escape_what_they_print_and_json_stays_exact() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let mut tap = env.event_tap().await;
    let mut w = worker(&env, &[]).await;
    let hostile_ext = "\u{1b}]0;pwned\u{7}\u{1b}[2J\nX";
    let long_name = "n".repeat(10_000);
    env.send_raw(
        json!({"org_unit_ext_id": hostile_ext, "org_unit_name": long_name, "org_unit_parent_id": 1000})
            .to_string()
            .as_bytes(),
        BasicProperties::default(),
    )
    .await;
    tap.take(1, Duration::from_secs(20)).await;
    env.wait_drained(1, Duration::from_secs(20)).await;
    w.stop().await;
    for args in [
        &["dlq", "peek"][..],
        &["dlq", "stats"][..],
        &["dlq", "replay", "--dry-run"][..],
    ] {
        let o = cli(&env, args, &[]).await;
        assert_eq!(o.status.code(), Some(0), "{args:?}: {o:?}");
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{args:?} printed a raw escape: {text:?}"
        );
        assert!(
            text.lines().all(|l| l.chars().count() <= 1_000),
            "{args:?} printed an unbounded line"
        );
        assert!(
            !text.contains("\nX"),
            "{args:?}: a raw newline from the message"
        );
    }
    let o = cli(&env, &["dlq", "peek", "--json"], &[]).await;
    let letter: Value = serde_json::from_slice(&o.stdout).expect("one JSON line");
    assert_eq!(letter["ext_id"], hostile_ext, "--json is exact");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_never_writes_into_the_workers_own_queues() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut w = worker(&env, &[]).await;
    for (ext, reply_to) in [
        ("RT-1", "provisioning.group.create"),
        ("RT-2", "provisioning.group.create.dlq"),
        ("RT-3", "provisioning.group.create.retry.1s"),
    ] {
        env.send_raw(
            json!({"org_unit_ext_id": ext, "org_unit_name": ext, "org_unit_parent_id": 1000})
                .to_string()
                .as_bytes(),
            BasicProperties::default().with_reply_to(reply_to.into()),
        )
        .await;
    }
    let exts: HashSet<String> = ["RT-1", "RT-2", "RT-3"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    collect_created(&mut tap, &exts, Duration::from_secs(30)).await;
    env.wait_drained(0, Duration::from_secs(20)).await;
    let refused = w
        .lines()
        .iter()
        .filter(|l| {
            l["message"] == "reply_to names a queue of the worker's own topology; no reply sent"
        })
        .count();
    assert_eq!(refused, 3);
    assert_eq!(
        w.lines()
            .iter()
            .filter(|l| l["message"] == "outcome")
            .count(),
        3,
        "nothing was fed back to the worker"
    );
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_inputs_are_invalid_commands_that_name_what_is_wrong() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut w = worker(&env, &[]).await;
    let deep = format!(
        "{{\"org_unit_ext_id\":\"DEEP\",\"org_unit_name\":\"d\",\"org_unit_parent_id\":1000,\"x\":{}1{}}}",
        "[".repeat(30_000),
        "]".repeat(30_000)
    );
    let cases: Vec<(Vec<u8>, BasicProperties, &str)> = vec![
        (
            br#"{"org_unit_ext_id":"   ","org_unit_name":"n","org_unit_parent_id":1000}"#.to_vec(),
            BasicProperties::default(),
            "org_unit_ext_id: must not be blank",
        ),
        (
            br#"{"org_unit_ext_id":"NUL-1","org_unit_name":"a\u0000b","org_unit_parent_id":1000}"#
                .to_vec(),
            BasicProperties::default(),
            "org_unit_name: contains a NUL character",
        ),
        (
            br#"{"org_unit_ext_id":"NUL-2","org_unit_name":"n","org_unit_parent_id":1000,"city":"x\u0000"}"#
                .to_vec(),
            BasicProperties::default(),
            "city: contains a NUL character",
        ),
        (
            br#"{"org_unit_ext_id":"SUR-1","org_unit_name":"\ud800","org_unit_parent_id":1000}"#
                .to_vec(),
            BasicProperties::default(),
            "org_unit_name: is not valid Unicode",
        ),
        (
            br#"{"org_unit_ext_id":"GZ-1","org_unit_name":"n","org_unit_parent_id":1000}"#.to_vec(),
            BasicProperties::default().with_content_encoding("gzip".into()),
            "content_encoding \"gzip\"",
        ),
        (
            deep.into_bytes(),
            BasicProperties::default(),
            "x: nested deeper than",
        ),
        (
            br#"{"org_unit_ext_id":"BIGNUM","org_unit_name":"n","org_unit_parent_id":1000,"y":1e999999}"#
                .to_vec(),
            BasicProperties::default(),
            "y: contains a number JSON cannot represent",
        ),
    ];
    for (body, props, _) in &cases {
        env.send_raw(body, props.clone()).await;
    }
    let events = tap.take(cases.len(), Duration::from_secs(30)).await;
    let messages: Vec<String> = events
        .iter()
        .map(|e| {
            assert_eq!(e.body["error"]["kind"], "invalid_command", "{}", e.body);
            e.body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    for (_, _, expected) in &cases {
        assert!(
            messages.iter().any(|m| m.contains(expected)),
            "no failure says {expected:?}: {messages:?}"
        );
    }
    assert_eq!(
        env.sim.sim.stats().create_requests,
        0,
        "nothing cost a POST"
    );
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_counters_are_not_trusted() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut w = worker(&env, &[]).await;
    let forged = headers(&[
        ("x-attempts", AMQPValue::LongLongInt(1 << 62)),
        ("x-retries", AMQPValue::LongLongInt(1 << 62)),
        ("x-deferrals", AMQPValue::LongLongInt(-5)),
    ]);
    env.send_raw(
        json!({"org_unit_ext_id": "FORGED-1", "org_unit_name": "f", "org_unit_parent_id": 1000})
            .to_string()
            .as_bytes(),
        BasicProperties::default().with_headers(forged.clone()),
    )
    .await;
    let e = tap.next(Duration::from_secs(20)).await;
    assert_eq!(e.routing_key, "group.created");
    assert_eq!(
        e.body["attempts"], 1,
        "a forged x-attempts is not reported: {}",
        e.body
    );

    // A forged x-retries does not skip the delay tiers: a failing command still goes
    // through the first tier before anything else happens.
    env.sim
        .sim
        .update_faults(|f| f.fail_next = Some(group_provisioner::sim::FailNext::new(100, 503)));
    env.send_raw(
        json!({"org_unit_ext_id": "FORGED-2", "org_unit_name": "f2", "org_unit_parent_id": 1000})
            .to_string()
            .as_bytes(),
        BasicProperties::default().with_headers(forged),
    )
    .await;
    let first = w
        .wait_line(
            "the first outcome of FORGED-2",
            Duration::from_secs(20),
            |l| l["message"] == "outcome" && l["ext_id"] == "FORGED-2",
        )
        .await;
    assert_eq!(first["outcome"], "deferred", "{first}");
    assert_eq!(first["delay_tier"], 0, "{first}");
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reports_bad_bytes_by_line_and_refuses_empty_input() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let dir = std::env::temp_dir().join(unique("send"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("mixed.jsonl");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(
        br#"{"org_unit_ext_id":"S-1","org_unit_name":"a","org_unit_parent_id":1000}"#,
    );
    bytes.push(b'\n');
    bytes.extend_from_slice(b"{\"org_unit_ext_id\":\"S-2\",\"org_unit_name\":\"caf\xe9\",\"org_unit_parent_id\":1000}\n");
    bytes.extend_from_slice(
        br#"{"org_unit_ext_id":"S-3","org_unit_name":"c","org_unit_parent_id":1000}"#,
    );
    bytes.push(b'\n');
    std::fs::write(&file, bytes).expect("write");
    let path = file.display().to_string();
    let o = cli(&env, &["send", &path], &[]).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("{path}:2: not UTF-8")), "{err}");
    assert!(stdout(&o).contains("sent 2, invalid 1"), "{}", stdout(&o));
    assert_eq!(env.queue_depth("provisioning.group.create").await, 2);

    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n\n").expect("write");
    let o = cli(&env, &["send", &empty.display().to_string()], &[]).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to send"));
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
}

#[test]
fn config_that_cannot_work_is_refused_or_warned() {
    use crate::process::run_with_env;
    let o = run_with_env(
        &["run"],
        &[
            ("PROVISIONER__API__TOKEN", "t"),
            ("PROVISIONER__RETRY__DELAYS", "5s,99999999d"),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).starts_with("config error: retry.delays: \"99999999d\""),
        "{o:?}"
    );
    let o = run_with_env(
        &["run"],
        &[
            ("PROVISIONER__API__TOKEN", "t"),
            ("PROVISIONER__REDIS__KEY_PREFIX", "a*b"),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).starts_with("config error: redis.key_prefix:"),
        "{o:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_sent_in_clear_is_warned_about() {
    let env = TestEnv::new().await;
    let clear = [(
        "PROVISIONER__API__BASE_URL",
        "http://api.example.invalid/v3",
    )];
    let o = cli(&env, &["check"], &clear).await;
    let out = stdout(&o);
    assert!(
        out.lines()
            .any(|l| l.starts_with("WARN") && l.contains("sent in clear")),
        "{out}"
    );
    let mut w = worker(&env, &clear).await;
    w.wait_line("the warning", Duration::from_secs(20), |l| {
        l["level"] == "WARN"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("sent in clear"))
    })
    .await;
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_published_with_its_own_user_id_is_copied_without_it() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let mut tap = env.event_tap().await;
    // An upstream system with its own broker user, which stamps its messages (user_id is
    // validated by the broker against the publishing user).
    let user = unique("gp-upstream");
    let http = reqwest::Client::new();
    for (path, body) in [
        (
            format!("users/{user}"),
            json!({"password": "upstream-pw", "tags": ""}),
        ),
        (
            format!("permissions/{}/{user}", env.vhost),
            json!({"configure": ".*", "write": ".*", "read": ".*"}),
        ),
    ] {
        let r = http
            .put(format!("{MANAGEMENT}/api/{path}"))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .await
            .expect("management API");
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
    }
    let upstream = lapin::Connection::connect(
        &format!("amqp://{user}:upstream-pw@{AMQP_HOST}/{}", env.vhost),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("upstream connection");
    let channel = upstream.create_channel().await.expect("channel");
    let mut w = worker(&env, &[]).await;
    channel
        .basic_publish(
            ShortString::from("provisioning"),
            ShortString::from("group.create"),
            lapin::options::BasicPublishOptions::default(),
            b"not json",
            BasicProperties::default().with_user_id(ShortString::from(user.as_str())),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let (bodies, exts) = commands("UID", 5);
    env.send_many(&bodies).await;
    let mut events = tap.take(6, Duration::from_secs(30)).await;
    events.retain(|e| e.routing_key == "group.created");
    assert_eq!(events.len(), exts.len());
    let letters = env.wait_dlq(1, Duration::from_secs(20)).await;
    assert_eq!(*letters[0].properties.user_id(), None);
    assert_eq!(
        header_value_of(&letters[0].properties, "x-original-user-id").as_deref(),
        Some(user.as_str())
    );
    assert_no_session_restart(&w);
    w.stop().await;
    let _ = upstream.close(200, ShortString::from("done")).await;
    let _ = http
        .delete(format!("{MANAGEMENT}/api/users/{user}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
    env.cleanup().await;
}

/// Properties a publisher controls land in every log line of their delivery (the span's
/// `message_id` and `correlation_id`): quotes, newlines, NUL, escape sequences and
/// non-ASCII must leave each line one valid JSON object carrying the exact value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_message_and_correlation_ids_keep_every_log_line_json() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut worker = WorkerProcess::spawn(&env, &worker_env(&[]));
    worker.wait_consuming().await;
    let id = "m\"1\n{\"level\":\"ERROR\"}\u{0}\u{1b}[31mé日\\";
    let correlation = "c\r\n\t\u{7f}\u{2028}";
    env.send_raw(
        json!({"org_unit_ext_id": "LOG-HOSTILE", "org_unit_name": "Log hostile", "org_unit_parent_id": 1000})
            .to_string()
            .as_bytes(),
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(id.into())
            .with_correlation_id(correlation.into()),
    )
    .await;
    assert_eq!(
        tap.next(Duration::from_secs(30)).await.routing_key,
        "group.created"
    );
    let outcome = worker
        .wait_line("the outcome line", Duration::from_secs(10), |l| {
            l["message"] == "outcome" && l["ext_id"] == "LOG-HOSTILE"
        })
        .await;
    assert_eq!(outcome["message_id"], id);
    assert_eq!(outcome["correlation_id"], correlation);
    assert_eq!(outcome["level"], "INFO", "a field cannot forge the level");
    // `lines` fails the test if any line was not JSON.
    assert!(worker.lines().iter().all(|l| l.is_object()));
    worker.stop().await;
    env.cleanup().await;
}

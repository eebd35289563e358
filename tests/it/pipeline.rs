//! The pipeline end to end: real RabbitMQ and Redis, convirza-sim on port 0, the worker
//! in process.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use group_provisioner::sim::FailNext;
use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};
use serde_json::{Value, json};

use crate::helpers::*;

const T: Duration = Duration::from_secs(20);

fn cmd(ext: &str, name: &str, parent: i64) -> Value {
    json!({"org_unit_ext_id": ext, "org_unit_name": name, "org_unit_parent_id": parent})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_every_event_field() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;

    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("traceparent"),
        header_value("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let body = json!({"org_unit_ext_id": "ORG-2001", "org_unit_name": "New Sales Division",
        "parent_org_unit_id": 1000, "timezone": "America/Chicago", "spam_guard": {"level": 2}});
    env.send_raw(
        body.to_string().as_bytes(),
        BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from("msg-1"))
            .with_correlation_id(ShortString::from("corr-1"))
            .with_headers(headers),
    )
    .await;

    let e = events.next(T).await;
    assert_eq!(e.routing_key, "group.created");
    let b = &e.body;
    let group = env.sim.sim.groups_for("ORG-2001");
    assert_eq!(group.len(), 1);
    assert_eq!(b["event"], "group.created");
    assert_eq!(b["schema_version"], 1);
    assert_eq!(b["ext_id"], "ORG-2001");
    assert_eq!(b["org_unit_id"], group[0].org_unit_id);
    assert_eq!(b["org_unit_name"], "New Sales Division");
    assert_eq!(b["org_unit_parent_id"], 1000);
    assert_eq!(b["duplicate"], false);
    assert_eq!(b["attempts"], 1);
    assert!(
        b["api_request_id"].as_str().is_some_and(|r| r.len() == 36),
        "{b}"
    );
    assert_eq!(b["command_message_id"], "msg-1");
    assert_eq!(b["correlation_id"], "corr-1");
    assert!(
        group_provisioner::clock::parse_rfc3339(b["occurred_at"].as_str().expect("occurred_at"))
            .is_some()
    );
    let keys: BTreeSet<_> = b.as_object().expect("object").keys().cloned().collect();
    let expected: BTreeSet<String> = [
        "event",
        "schema_version",
        "ext_id",
        "org_unit_id",
        "org_unit_name",
        "org_unit_parent_id",
        "duplicate",
        "attempts",
        "api_request_id",
        "command_message_id",
        "correlation_id",
        "occurred_at",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(keys, expected);

    // AMQP properties of the event.
    let p = &e.properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("group.created"));
    assert_eq!(
        p.correlation_id().as_ref().map(|s| s.as_str()),
        Some("corr-1")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    let mid = p
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .expect("message id");
    assert_ne!(mid, "msg-1", "a fresh message id");
    assert_eq!(e.header("ext_id").as_deref(), Some("ORG-2001"));
    let tp = e.header("traceparent").expect("traceparent on the event");
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(!tp.contains("00f067aa0ba902b7"), "the worker's own span id");

    // The API saw the alias renamed, the unknown field verbatim and the same trace.
    assert_eq!(group[0].body["org_unit_parent_id"], 1000);
    assert!(group[0].body.get("parent_org_unit_id").is_none());
    assert_eq!(group[0].body["spam_guard"], json!({"level": 2}));
    let api_tp = env.sim.sim.requests()[0]
        .traceparent
        .clone()
        .expect("traceparent sent to the API");
    assert!(api_tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));

    // Nothing left behind.
    wait_for("work queue empty", T, || async {
        (env.queue_depth(&env.settings.topology.work_queue).await == 0).then_some(())
    })
    .await;
    assert_eq!(
        env.queue_depth(&env.settings.topology.dead_letter_queue)
            .await,
        0
    );
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_distinct_commands_make_a_hundred_groups() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    for i in 0..100 {
        env.send(&cmd(
            &format!("BULK-{i}"),
            &format!("Team {i}"),
            1000 + (i % 2),
        ))
        .await;
    }
    let got = events.take(100, Duration::from_secs(60)).await;
    let ids: HashSet<_> = got
        .iter()
        .map(|e| e.body["org_unit_id"].as_i64().expect("id"))
        .collect();
    let exts: HashSet<_> = got
        .iter()
        .map(|e| e.body["ext_id"].as_str().expect("ext").to_owned())
        .collect();
    assert_eq!(ids.len(), 100);
    assert_eq!(exts.len(), 100);
    assert!(
        got.iter()
            .all(|e| e.routing_key == "group.created" && e.body["duplicate"] == false)
    );
    let stats = env.sim.sim.stats();
    assert_eq!(stats.groups_created, 100);
    assert!(stats.duplicated_ext_ids.is_empty());
    events.assert_quiet(Duration::from_millis(300)).await;
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_ext_id_twenty_times_at_once_makes_one_group() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 100);
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    for _ in 0..20 {
        env.send(&cmd("SAME-1", "Only Once", 1000)).await;
    }
    let got = events.take(20, Duration::from_secs(60)).await;
    let ids: HashSet<_> = got
        .iter()
        .map(|e| e.body["org_unit_id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids.len(), 1, "one org_unit_id in all 20 events");
    assert!(got.iter().all(|e| e.routing_key == "group.created"));
    let originals = got.iter().filter(|e| e.body["duplicate"] == false).count();
    assert_eq!(
        originals, 1,
        "exactly one event for the delivery that created it"
    );
    assert_eq!(env.sim.sim.groups_for("SAME-1").len(), 1);
    assert_eq!(env.sim.sim.stats().create_requests, 1, "one POST in all");
    events.assert_quiet(Duration::from_millis(300)).await;
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_gets_the_event_too() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let reply_queue = env
        .channel
        .queue_declare(
            ShortString::from(""),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("reply queue");
    let worker = env.spawn_worker().await;
    env.send_raw(
        cmd("REPLY-1", "Replies", 1000).to_string().as_bytes(),
        BasicProperties::default().with_reply_to(reply_queue.name().clone()),
    )
    .await;
    let e = events.next(T).await;
    let reply = wait_for("reply", T, || async {
        env.channel
            .basic_get(
                reply_queue.name().clone(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get")
    })
    .await;
    let body: Value = serde_json::from_slice(&reply.delivery.data).expect("json");
    assert_eq!(body, e.body);
    assert_eq!(
        body["correlation_id"], "REPLY-1",
        "defaults to the ext id without message/correlation id"
    );
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_commands_are_dead_lettered_with_reasons_and_no_api_call() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let big = json!({"org_unit_ext_id": "BIG", "org_unit_name": "x", "org_unit_parent_id": 1000, "pad": "x".repeat(70 * 1024)});
    let corpus: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("non-json", b"this is not json".to_vec(), None),
        ("array", b"[1,2,3]".to_vec(), None),
        ("missing ext id", json!({"org_unit_name": "a", "org_unit_parent_id": 1000}).to_string().into_bytes(), None),
        ("oversized ext id", cmd(&"x".repeat(129), "a", 1000).to_string().into_bytes(), None),
        ("control char ext id", cmd("bad\u{1}id", "a", 1000).to_string().into_bytes(), None),
        ("blank name", cmd("INV-NAME", "   ", 1000).to_string().into_bytes(), Some("INV-NAME")),
        ("string parent", json!({"org_unit_ext_id": "INV-P1", "org_unit_name": "a", "org_unit_parent_id": "1000"}).to_string().into_bytes(), Some("INV-P1")),
        ("negative parent", cmd("INV-P2", "a", -5).to_string().into_bytes(), Some("INV-P2")),
        ("70 KiB body", big.to_string().into_bytes(), None),
        ("wrong optional type", json!({"org_unit_ext_id": "INV-OPT", "org_unit_name": "a", "org_unit_parent_id": 1000, "billing_id": "12"}).to_string().into_bytes(), Some("INV-OPT")),
    ];
    for (label, body, _) in &corpus {
        let props = BasicProperties::default().with_message_id(ShortString::from(*label));
        env.send_raw(body, props).await;
    }
    let failed = events.take(corpus.len(), T).await;
    let dead = env.wait_dlq(corpus.len() as u32, T).await;
    assert_eq!(dead.len(), corpus.len());
    for (label, body, ext) in &corpus {
        let d = dead
            .iter()
            .find(|d| d.message_id.as_deref() == Some(*label))
            .unwrap_or_else(|| panic!("{label} not dead-lettered"));
        assert_eq!(d.kind.as_deref(), Some("invalid_command"), "{label}");
        assert_eq!(&d.body, body, "{label}: body kept verbatim");
        assert!(
            d.message.as_deref().is_some_and(|m| !m.is_empty()),
            "{label}: reason given"
        );
        assert_eq!(d.worker_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
        let e = failed
            .iter()
            .find(|e| e.body["command_message_id"] == *label)
            .unwrap_or_else(|| panic!("{label}: no failed event"));
        assert_eq!(e.routing_key, "group.create.failed");
        assert_eq!(e.body["error"]["kind"], "invalid_command");
        assert_eq!(e.body["dead_lettered"], true);
        assert_eq!(e.body["attempts"], 0);
        match ext {
            Some(x) => assert_eq!(e.body["ext_id"], *x, "{label}"),
            None => assert!(e.body["ext_id"].is_null(), "{label}: {}", e.body),
        }
    }
    let reason = dead
        .iter()
        .find(|d| d.message_id.as_deref() == Some("70 KiB body"))
        .and_then(|d| d.message.clone());
    assert!(reason.is_some_and(|m| m.contains("65536")));
    assert_eq!(
        env.sim.sim.stats().create_requests + env.sim.sim.stats().list_requests,
        0,
        "no API call"
    );

    // Still processing.
    env.send(&cmd("AFTER-INVALID", "Fine", 1000)).await;
    let ok = events.next(T).await;
    assert_eq!(ok.body["ext_id"], "AFTER-INVALID");
    assert_eq!(ok.routing_key, "group.created");
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_parent_is_rejected_and_a_taken_name_is_a_name_conflict() {
    let env = TestEnv::new().await;
    env.sim
        .sim
        .seed_group(1000, "Taken Name", Some("SOMEONE-ELSE"));
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    env.send(&cmd("NO-PARENT", "Orphan", 987654)).await;
    env.send(&cmd("TAKER", " taken name ", 1000)).await;
    let got = events.take(2, T).await;
    let by_ext = |x: &str| {
        got.iter()
            .find(|e| e.body["ext_id"] == x)
            .expect("event")
            .body
            .clone()
    };
    let orphan = by_ext("NO-PARENT");
    assert_eq!(orphan["event"], "group.create.failed");
    assert_eq!(orphan["error"]["kind"], "rejected");
    assert_eq!(orphan["error"]["http_status"], 400);
    assert!(
        orphan["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("987654")
    );
    assert!(orphan["error"]["api_request_id"].is_string());
    assert_eq!(orphan["attempts"], 1);
    let taker = by_ext("TAKER");
    assert_eq!(taker["error"]["kind"], "name_conflict");
    assert!(
        taker["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("SOMEONE-ELSE")
    );
    let dead = env.wait_dlq(2, T).await;
    let kinds: BTreeSet<_> = dead.iter().filter_map(|d| d.kind.clone()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["name_conflict".to_owned(), "rejected".to_owned()])
    );
    assert!(
        dead.iter()
            .all(|d| d.http_status.as_deref() == Some("400") && d.attempts == 1)
    );
    assert_eq!(env.sim.sim.groups_for("TAKER").len(), 0);
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_already_in_the_api_but_not_in_redis_is_a_duplicate_success() {
    let env = TestEnv::new().await;
    let existing = env.sim.sim.seed_group(1001, "Pre Existing", Some("PRE-1"));
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    env.send(&cmd("PRE-1", "Pre Existing", 1001)).await;
    let e = events.next(T).await;
    assert_eq!(e.routing_key, "group.created");
    assert_eq!(e.body["org_unit_id"], existing);
    assert_eq!(
        e.body["duplicate"], true,
        "it existed before this delivery posted"
    );
    assert_eq!(
        e.body["attempts"], 1,
        "one POST, answered 400, reconciled by List"
    );
    assert_eq!(env.sim.sim.groups_for("PRE-1").len(), 1);

    // The second time Redis knows it: no API call at all.
    let calls = env.sim.sim.stats();
    env.send(&cmd("PRE-1", "Pre Existing", 1001)).await;
    let again = events.next(T).await;
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(again.body["attempts"], 0);
    assert_eq!(again.body["org_unit_id"], existing);
    assert_eq!(env.sim.sim.stats().create_requests, calls.create_requests);
    assert_eq!(env.sim.sim.stats().list_requests, calls.list_requests);
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_then_drop_and_commit_then_stall_make_exactly_one_group() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;

    env.sim.sim.update_faults(|f| f.drop_after_commit = 1);
    env.send(&cmd("DROP-1", "Dropped", 1000)).await;
    let e = events.next(T).await;
    assert_eq!(e.body["ext_id"], "DROP-1");
    assert_eq!(e.body["duplicate"], false, "its own lost POST created it");
    assert_eq!(e.body["attempts"], 1, "recovered by List, no second POST");
    assert_eq!(env.sim.sim.groups_for("DROP-1").len(), 1);
    assert_eq!(
        e.body["org_unit_id"],
        env.sim.sim.groups_for("DROP-1")[0].org_unit_id
    );

    env.sim.sim.update_faults(|f| {
        f.stall_after_commit = 1;
        f.stall_ms = 4_000; // the test client timeout is 2 s
    });
    env.send(&cmd("STALL-1", "Stalled", 1000)).await;
    let e = events.next(T).await;
    assert_eq!(e.body["ext_id"], "STALL-1");
    assert_eq!(e.body["duplicate"], false);
    assert_eq!(env.sim.sim.groups_for("STALL-1").len(), 1);
    assert_eq!(
        env.sim.sim.stats().create_requests,
        2,
        "no second POST for either"
    );
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_retry_after_is_honoured() {
    let env = TestEnv::new().await;
    env.sim
        .sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(1, 429).retry_after("2")));
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let started = std::time::Instant::now();
    env.send(&cmd("RATE-1", "Limited", 1000)).await;
    let e = events.next(T).await;
    assert_eq!(e.routing_key, "group.created");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(e.body["attempts"], 2);
    let log = env.sim.sim.requests();
    let posts: Vec<_> = log.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[0].status, Some(429));
    assert_eq!(posts[1].status, Some(201));
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_then_success() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| {
        f.fail_next = Some(FailNext::new(2, 502).body("<html>Bad Gateway</html>"))
    });
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    env.send(&cmd("FLAKY-1", "Flaky", 1000)).await;
    let e = events.next(T).await;
    assert_eq!(e.routing_key, "group.created");
    assert_eq!(e.body["duplicate"], false);
    assert_eq!(e.body["attempts"], 3);
    assert_eq!(env.sim.sim.groups_for("FLAKY-1").len(), 1);
    // After a 5xx the API may have committed: each re-POST was preceded by a List.
    assert!(env.sim.sim.stats().list_requests >= 2);
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_503_walks_the_delay_tiers_then_dead_letters() {
    let mut env = TestEnv::new().await;
    env.settings.retry.delays = tiers(&["1s", "2s"]);
    env.settings.retry.max_tries = 2;
    env.sim
        .sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(1_000, 503)));
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    env.send(&cmd("DOWN-1", "Never", 1000)).await;
    let e = events.next(Duration::from_secs(30)).await;
    assert_eq!(e.routing_key, "group.create.failed");
    assert_eq!(e.body["error"]["kind"], "retries_exhausted");
    assert_eq!(e.body["error"]["http_status"], 503);
    assert_eq!(
        e.body["attempts"], 6,
        "2 tries in process × (first delivery + 2 tiers)"
    );
    let dead = env.wait_dlq(1, T).await;
    assert_eq!(dead[0].kind.as_deref(), Some("retries_exhausted"));
    assert_eq!(dead[0].attempts, 6);
    assert!(dead[0].first_failed_at.is_some());
    // Both delay queues were used and are empty again.
    assert_eq!(env.sim.sim.stats().create_requests, 6);
    for tier in &env.settings.retry.delays {
        assert_eq!(
            env.queue_depth(&env.settings.topology.delay_queue(tier))
                .await,
            0
        );
    }
    assert_eq!(env.sim.sim.stats().groups_created, 0);
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_published_is_parked_not_lost() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    // Take the DLQ away: the worker's dead-letter publish becomes unroutable.
    env.channel
        .queue_delete(
            ShortString::from(env.settings.topology.dead_letter_queue.as_str()),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .expect("delete dlq");
    env.send(
        &json!({"org_unit_ext_id": "PARK-1", "org_unit_name": " ", "org_unit_parent_id": 1000}),
    )
    .await;
    // It cycles through the first delay tier while the DLQ is missing…
    let tier = env
        .settings
        .topology
        .delay_queue(&env.settings.retry.delays[0]);
    wait_for("the message parked in the delay tier", T, || async {
        (env.queue_depth(&tier).await > 0).then_some(())
    })
    .await;
    events.assert_quiet(Duration::from_millis(200)).await;
    // …and lands in the DLQ, with its failure event, once the DLQ is back.
    env.declare_topology().await;
    let e = events.next(T).await;
    assert_eq!(e.body["error"]["kind"], "invalid_command");
    let dead = env.wait_dlq(1, T).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].kind.as_deref(), Some("invalid_command"));
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_every_api_call_not_just_its_message() {
    let env = TestEnv::new().await;
    env.sim
        .sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(1, 429).retry_after("3")));
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    env.send(&cmd("PAUSE-1", "First", 1000)).await;
    wait_for("the 429", T, || async {
        env.sim
            .sim
            .requests()
            .iter()
            .any(|r| r.status == Some(429))
            .then_some(())
    })
    .await;
    let limited_at = std::time::Instant::now();
    // A second, unrelated command must also wait for the account-wide pause.
    env.send(&cmd("PAUSE-2", "Second", 1000)).await;
    let mut second_after = None;
    for _ in 0..2 {
        let e = events.next(T).await;
        assert_eq!(e.routing_key, "group.created");
        if e.body["ext_id"] == "PAUSE-2" {
            second_after = Some(limited_at.elapsed());
        }
    }
    let waited = second_after.expect("PAUSE-2 created");
    assert!(
        waited >= Duration::from_millis(2_800),
        "the second command went ahead after {waited:?}"
    );
    let posts = env.sim.sim.stats().create_requests;
    assert_eq!(posts, 3, "429, then one POST each");
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

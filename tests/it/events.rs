//! Events nobody is bound for: kept behind the event exchange's alternate exchange, so
//! the worker goes on; `check` says they are there and how to get them out.

use std::time::Duration;

use lapin::BasicProperties;
use serde_json::json;

use crate::helpers::*;
use crate::process::{cli, stdout};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_nobody_is_bound_for_is_kept_and_the_worker_goes_on() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let created = env.event_queue("group.created").await;
    let unrouted = env.settings.topology.unrouted_events.clone();
    let worker = env.spawn_worker().await;

    // Failure events have no queue: each lands in the unrouted queue, and the commands
    // after them are processed all the same.
    for i in 0..3 {
        env.send_raw(
            format!("not json {i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    for i in 0..5 {
        env.send(&json!({"org_unit_ext_id": format!("AE-{i}"), "org_unit_name": format!("AE {i}"), "org_unit_parent_id": 1000}))
            .await;
    }
    wait_for("5 created events and 3 unrouted", T, || async {
        (env.queue_depth(&created).await == 5 && env.queue_depth(&unrouted).await == 3)
            .then_some(())
    })
    .await;
    assert_eq!(
        worker.circuit(),
        group_provisioner::pipeline::CircuitState::Closed,
        "an unbound routing key must not stop the worker"
    );
    assert_eq!(
        env.queue_depth(&env.settings.topology.dead_letter_queue)
            .await,
        3
    );
    // The metric the alert watches (the worker reads the queue's depth every 5 s).
    let metrics = format!("http://{}/metrics", worker.metrics_addr());
    wait_for("provisioner_unrouted_events 3", T, || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        text.lines()
            .any(|l| l == "provisioner_unrouted_events 3")
            .then_some(())
    })
    .await;

    let o = cli(&env, &["check"], &[]).await;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).lines().any(|l| l.starts_with("FAIL  events")
            && l.contains("3 events nobody is bound for")
            && l.contains("bind a queue")),
        "{}",
        stdout(&o)
    );

    // Ready all the same, and it says why someone should look.
    let readyz = reqwest::get(format!("http://{}/readyz", worker.metrics_addr()))
        .await
        .expect("readyz");
    assert_eq!(readyz.status().as_u16(), 200);
    let body = readyz.text().await.unwrap_or_default();
    assert!(body.contains("3 events nobody is bound for"), "{body}");

    // Replaying before anyone is bound for them: they come back, nothing is lost.
    let o = cli(&env, &["events", "replay-unrouted"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("moved 3, kept 0, came back 3"),
        "{}",
        stdout(&o)
    );
    assert_eq!(env.queue_depth(&unrouted).await, 3);

    // A consumer binds the failure key; a dry run moves nothing; then they are delivered.
    let failed = env.event_queue("group.create.failed").await;
    let o = cli(&env, &["events", "replay-unrouted", "--dry-run"], &[]).await;
    assert!(stdout(&o).contains("would move 3"), "{}", stdout(&o));
    assert_eq!(env.queue_depth(&unrouted).await, 3);
    let o = cli(
        &env,
        &[
            "events",
            "replay-unrouted",
            "--event",
            "group.create.failed",
            "--limit",
            "2",
        ],
        &[],
    )
    .await;
    assert!(
        stdout(&o).contains("moved 2, kept 1, came back 0"),
        "{}",
        stdout(&o)
    );
    let o = cli(&env, &["events", "replay-unrouted"], &[]).await;
    assert!(
        stdout(&o).contains("moved 1, kept 0, came back 0"),
        "{}",
        stdout(&o)
    );
    assert_eq!(env.queue_depth(&failed).await, 3);
    assert_eq!(env.queue_depth(&unrouted).await, 0);
    // Each is the event it was: a group.create.failed of kind invalid_command.
    let ch = env.conn.create_channel().await.expect("channel");
    for _ in 0..3 {
        let m = ch
            .basic_get(
                failed.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
            .expect("get")
            .expect("an event");
        let body: serde_json::Value = serde_json::from_slice(&m.delivery.data).expect("JSON");
        assert_eq!(body["error"]["kind"], "invalid_command", "{body}");
        assert_eq!(m.delivery.routing_key.as_str(), "group.create.failed");
    }
    let o = cli(&env, &["check"], &[]).await;
    assert!(
        stdout(&o).lines().any(|l| l.starts_with("ok    events")),
        "{}",
        stdout(&o)
    );
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

/// An event exchange without the alternate exchange (an earlier version's, or a consumer's
/// that started first and declared it as the AsyncAPI document's exchange binding reads:
/// topic, durable, nothing else): the worker runs on it as before, and `check` says both
/// cases and what it costs, for the `check` that declares and the one that verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_exchange_without_the_alternate_exchange_is_reported() {
    let env = TestEnv::new().await;
    env.declare_legacy_event_exchange().await;
    let mut events = env.event_tap().await;
    for args in [&["check"][..], &["check", "--no-declare"]] {
        let o = cli(&env, args, &[]).await;
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stdout(&o));
        assert!(
            stdout(&o).lines().any(|l| l.starts_with("WARN  events")
                && l.contains("alternate-exchange")
                && l.contains("an earlier version")
                && l.contains("a consumer that started before any worker")
                && l.contains("stalls the worker")
                && l.contains("pausing all consumption")),
            "{args:?}: {}",
            stdout(&o)
        );
    }
    let worker = env.spawn_worker().await;
    env.send(
        &json!({"org_unit_ext_id": "OLD-EX", "org_unit_name": "Old", "org_unit_parent_id": 1000}),
    )
    .await;
    assert_eq!(events.next(T).await.body["ext_id"], "OLD-EX");
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

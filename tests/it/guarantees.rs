//! One ext id, one group — when a worker freezes mid-POST and the command comes back
//! renamed, when Redis forgets, and when a shutdown cuts deliveries off.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::process::{WorkerProcess, worker_env};

fn named(prefix: &str, name: &str, n: usize) -> (Vec<Value>, HashSet<String>) {
    let bodies = (0..n)
        .map(|i| json!({"org_unit_ext_id": format!("{prefix}-{i}"), "org_unit_name": format!("{name}-{i}"), "org_unit_parent_id": 1000}))
        .collect();
    (bodies, (0..n).map(|i| format!("{prefix}-{i}")).collect())
}

fn assert_one_group_each(env: &TestEnv, exts: &HashSet<String>) {
    let stats = env.sim.sim.stats();
    for e in exts {
        assert_eq!(
            stats.per_ext_id.get(e),
            Some(&1),
            "{e}: {:?}",
            stats.per_ext_id.get(e)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_and_a_renamed_command_make_one_group() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 4_000);
    let mut tap = env.event_tap().await;
    let slow_api = worker_env(&[("PROVISIONER__API__TIMEOUT", "6s")]);
    // The first worker's prefetch is full with the 20 commands, so while it is frozen the
    // broker hands everything else to the second worker.
    let mut w1 = WorkerProcess::spawn(
        &env,
        &worker_env(&[
            ("PROVISIONER__API__TIMEOUT", "6s"),
            ("PROVISIONER__AMQP__PREFETCH", "20"),
        ]),
    );
    w1.wait_consuming().await;
    let (first, exts) = named("SD", "A", 20);
    env.send_many(&first).await;
    wait_for("20 POSTs in the air", Duration::from_secs(20), || async {
        (env.sim.sim.stats().creates_received >= 20).then_some(())
    })
    .await;
    w1.signal("-STOP");
    // Upstream renames every command and sends it again; a second worker takes over once
    // the frozen worker's claims (2 s leases) expire.
    let (renamed, _) = named("SD", "B", 20);
    env.send_many(&renamed).await;
    let mut w2 = WorkerProcess::spawn(&env, &slow_api);
    let events = collect_created(&mut tap, &exts, Duration::from_secs(60)).await;
    for e in &events {
        assert!(
            e.body["org_unit_name"]
                .as_str()
                .is_some_and(|n| n.starts_with("A-")),
            "the group that exists is the one first posted: {}",
            e.body
        );
    }
    assert_one_group_each(&env, &exts);
    w1.signal("-CONT");
    // The frozen worker wakes up, its POSTs answered long ago: it finds the same groups
    // recorded, reports no orphan, and nothing more is created.
    w1.wait_line("w1's outcomes", Duration::from_secs(30), |l| {
        l["message"] == "outcome"
    })
    .await;
    env.wait_drained(0, Duration::from_secs(60)).await;
    assert_one_group_each(&env, &exts);
    for w in [&w1, &w2] {
        assert!(
            !w.lines().iter().any(|l| l["orphan_org_unit_id"].is_i64()),
            "no orphan"
        );
    }
    assert_eq!(env.sim.sim.stats().groups_created, 20);
    w1.stop().await;
    w2.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_verify_unknown_a_renamed_command_after_redis_lost_its_data_finds_its_group() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut w = WorkerProcess::spawn(
        &env,
        &worker_env(&[("PROVISIONER__DEDUP__VERIFY_UNKNOWN", "true")]),
    );
    w.wait_consuming().await;
    env.send(
        &json!({"org_unit_ext_id": "CRM-42", "org_unit_name": "Alpha", "org_unit_parent_id": 1000}),
    )
    .await;
    let first = tap.next(Duration::from_secs(20)).await;
    assert_eq!(first.body["duplicate"], false);
    // Redis restarted without persistence: everything the worker knew is gone. The parent
    // has 250 other children, so the lookup by ext id pages through them.
    delete_redis_prefix(&env.prefix).await;
    for i in 0..250 {
        env.sim
            .sim
            .seed_group(1000, &format!("Other {i}"), Some(&format!("OTHER-{i}")));
    }
    let lists_before = env.sim.sim.stats().list_requests;
    env.send(&json!({"org_unit_ext_id": "CRM-42", "org_unit_name": "Alpha (renamed upstream)", "org_unit_parent_id": 1000}))
        .await;
    let second = tap.next(Duration::from_secs(20)).await;
    assert_eq!(second.routing_key, "group.created");
    assert_eq!(second.body["org_unit_id"], first.body["org_unit_id"]);
    assert_eq!(second.body["duplicate"], true);
    assert_eq!(second.body["org_unit_name"], "Alpha");
    assert_eq!(env.sim.sim.groups_for("CRM-42").len(), 1, "no second group");
    assert_eq!(
        env.sim.sim.stats().list_requests - lists_before,
        1 + 1,
        "the listing by name, plus the first page of children (where it was found)"
    );
    // The cost for every new ext id: the parent's children are paged through to the end.
    let lists_before = env.sim.sim.stats().list_requests;
    env.send(
        &json!({"org_unit_ext_id": "NEW-1", "org_unit_name": "New", "org_unit_parent_id": 1000}),
    )
    .await;
    let new = tap.next(Duration::from_secs(20)).await;
    assert_eq!(new.body["duplicate"], false);
    assert_eq!(
        env.sim.sim.stats().list_requests - lists_before,
        1 + 3,
        "the listing by name, plus one call per 100 of the parent's 251 children"
    );
    w.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_hands_back_the_claims_of_what_it_cut_off() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 3_000);
    let mut tap = env.event_tap().await;
    let fast_drain = [
        ("PROVISIONER__SHUTDOWN__DRAIN_TIMEOUT", "500ms"),
        ("PROVISIONER__DEDUP__LEASE", "60s"),
        ("PROVISIONER__API__TIMEOUT", "5s"),
    ];
    let mut w1 = WorkerProcess::spawn(&env, &fast_drain);
    w1.wait_consuming().await;
    let (bodies, exts) = named("CUT", "Cut", 20);
    env.send_many(&bodies).await;
    wait_for("20 POSTs in the air", Duration::from_secs(20), || async {
        (env.sim.sim.stats().creates_received >= 20).then_some(())
    })
    .await;
    w1.stop().await;
    assert!(
        w1.lines().iter().any(
            |l| l["message"] == "claims of unfinished deliveries handed back"
                && l["released"] == 20
        ),
        "every cut-off claim was handed back"
    );
    // The restarted worker need not wait out 60 s leases: it waits for the cut-off POSTs
    // to have ended, finds their groups, and defers nothing as "claimed elsewhere".
    let mut w2 = WorkerProcess::spawn(&env, &fast_drain);
    collect_created(&mut tap, &exts, Duration::from_secs(60)).await;
    assert_one_group_each(&env, &exts);
    let claimed_elsewhere = w2
        .lines()
        .iter()
        .filter(|l| l["reason"] == "claimed_elsewhere")
        .count();
    assert_eq!(claimed_elsewhere, 0);
    w2.stop().await;
    env.cleanup().await;
}

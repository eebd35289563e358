//! The process under resource limits: a bounded address space with many runtime threads,
//! and a limit too small to start, which must end the process in one line rather than
//! leave it retrying or half alive.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::process::{BIN, WorkerProcess, worker_env};

const T: Duration = Duration::from_secs(60);
const ONE_GIB_KIB: u64 = 1 << 20;

/// A 16-core node (16 runtime threads) under `ulimit -v` 1 GiB: the worker starts, creates
/// groups, handles the most deeply nested headers a frame allows, and the operator tools
/// run under the same limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_threads_fit_in_one_gib_of_address_space() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut extra = worker_env(&[]);
    extra.push(("TOKIO_WORKER_THREADS", "16"));
    let mut w = WorkerProcess::spawn_with_address_space(&env, &extra, ONE_GIB_KIB);
    w.wait_consuming().await;

    let depth = 15_000;
    let deep = format!("{{\"deep\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
    let body =
        json!({"org_unit_ext_id": "LIM-DEEP", "org_unit_name": "deep", "org_unit_parent_id": 4242});
    assert!(
        env.publish_via_management("provisioning", "group.create", &body.to_string(), &deep)
            .await,
        "routed"
    );
    let bodies: Vec<_> = (0..20)
        .map(|i| json!({"org_unit_ext_id": format!("LIM-{i}"), "org_unit_name": format!("Team {i}"), "org_unit_parent_id": 1000}))
        .collect();
    env.send_many(&bodies).await;
    let events = tap.take(21, T).await;
    let created = events
        .iter()
        .filter(|e| e.routing_key == "group.created")
        .count();
    assert_eq!(created, 20);
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.routing_key == "group.create.failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].body["ext_id"], "LIM-DEEP");
    let dead = env.wait_dlq(1, T).await;
    assert!(
        group_provisioner::amqp::headers::header_string(
            dead[0].properties.headers().as_ref(),
            "x-dropped-headers"
        )
        .is_some_and(|h| h.contains("deep")),
        "the nested header is named in the copy"
    );

    // An operator command under the same limit.
    let mut cmd = env.command("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -v {ONE_GIB_KIB} && exec \"$0\" dlq stats --json"
        ))
        .arg(BIN)
        .env("TOKIO_WORKER_THREADS", "16")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let o = tokio::time::timeout(T, cmd.output())
        .await
        .expect("stats ends")
        .expect("stats runs");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        w.metric("provisioner_in_flight").await.is_some(),
        "still serving"
    );
    w.stop().await;
    env.cleanup().await;
}

/// A limit too small for the broker client's thread: one `fatal:` line and exit 1, at
/// once — not a reconnect loop, not a process that lingers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_too_small_to_start_ends_the_process_in_one_line() {
    let env = TestEnv::new().await;
    for args in [&["run"][..], &["dlq", "stats"][..]] {
        let mut cmd = env.command("sh");
        // Room for the runtime, not for a thread of the broker client's stack.
        cmd.arg("-c")
            .arg("ulimit -v 200000 && exec \"$0\" \"$@\"")
            .arg(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let o = tokio::time::timeout(T, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{args:?} kept running under a limit it cannot start in"))
            .expect("runs");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        let fatal: Vec<&str> = err.lines().filter(|l| l.starts_with("fatal: ")).collect();
        assert_eq!(fatal.len(), 1, "{args:?}: {err}");
        assert!(
            fatal[0].contains("limit is too small") || fatal[0].contains("Resource limits"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    env.cleanup().await;
}

/// A dead letter with the most deeply nested headers (the broker dead-letters a command
/// with all its headers): the tools read, export and move it on their small runtime
/// stacks, leaving the nested header out and naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_tools_handle_a_deeply_nested_dead_letter() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    let depth = 15_000;
    let deep = format!(
        "{{\"deep\":{}1{},\"x-error-kind\":\"rejected\"}}",
        "{\"a\":".repeat(depth),
        "}".repeat(depth)
    );
    let body =
        json!({"org_unit_ext_id": "DLQ-DEEP", "org_unit_name": "deep", "org_unit_parent_id": 1000});
    assert!(
        env.publish_via_management("amq.default", &dlq, &body.to_string(), &deep)
            .await,
        "routed"
    );
    for args in [
        &["dlq", "peek", "--json"][..],
        &["dlq", "export", "--out", "-"][..],
        &["dlq", "stats"][..],
    ] {
        let o = crate::process::cli(&env, args, &[]).await;
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        if args[1] != "stats" {
            let letter: serde_json::Value =
                serde_json::from_str(out.lines().next().unwrap_or("")).expect("one JSON line");
            assert_eq!(letter["ext_id"], "DLQ-DEEP");
            assert!(letter["headers"].get("deep").is_none(), "{letter}");
            assert_eq!(letter["headers"]["x-dropped-headers"], "deep", "{letter}");
        }
    }
    // Replayed, it goes back without the nested header (named), and the DLQ is empty.
    let o = crate::process::cli(&env, &["dlq", "replay"], &[]).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(env.queue_depth(&dlq).await, 0);
    assert_eq!(
        env.queue_depth(&env.settings.topology.work_queue).await,
        1,
        "replayed into the work queue"
    );
    env.cleanup().await;
}

//! Faults survived (issue: resilience): every command processed exactly once, nothing in
//! the DLQ that does not belong there, the worker still up (or cleanly exited on SIGTERM).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use group_provisioner::config::ApiAuth;
use group_provisioner::pipeline::CircuitState;
use group_provisioner::secret::SecretString;
use group_provisioner::sim::{FailNext, SimConfig};
use serde_json::{Value, json};

use crate::helpers::*;
use crate::process::{WorkerProcess, worker_env};

pub(crate) fn commands(prefix: &str, n: usize) -> (Vec<Value>, HashSet<String>) {
    let bodies: Vec<Value> = (0..n)
        .map(|i| json!({"org_unit_ext_id": format!("{prefix}-{i}"), "org_unit_name": format!("{prefix} team {i}"), "org_unit_parent_id": 1000}))
        .collect();
    let exts = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    (bodies, exts)
}

/// Each ext id has exactly one group in the API.
pub(crate) fn assert_exactly_once(env: &TestEnv, exts: &HashSet<String>) {
    let stats = env.sim.sim.stats();
    assert!(
        stats.duplicated_ext_ids.is_empty(),
        "ext ids with two groups: {:?}",
        stats.duplicated_ext_ids
    );
    for e in exts {
        assert_eq!(
            stats.per_ext_id.get(e).copied(),
            Some(1),
            "{e} has {:?} groups",
            stats.per_ext_id.get(e)
        );
    }
}

/// The remaining ext ids all get a `group.created`, the queues drain with nothing
/// dead-lettered, and every ext id has exactly one group.
pub(crate) async fn all_done_exactly_once(
    env: &TestEnv,
    tap: &mut EventTap,
    remaining: &HashSet<String>,
    exts: &HashSet<String>,
    deadline: Duration,
) {
    collect_created(tap, remaining, deadline).await;
    env.wait_drained(0, Duration::from_secs(30)).await;
    assert_exactly_once(env, exts);
}

/// Wait for `n` events and return the ext ids still to be created afterwards.
pub(crate) async fn wait_events(
    tap: &mut EventTap,
    n: usize,
    exts: &HashSet<String>,
) -> HashSet<String> {
    let seen: HashSet<String> = tap
        .take(n, Duration::from_secs(60))
        .await
        .iter()
        .filter(|e| e.routing_key == "group.created")
        .filter_map(|e| e.body["ext_id"].as_str().map(str::to_owned))
        .collect();
    exts.difference(&seen).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_then_restart_is_exactly_once() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 50);
    let mut tap = env.event_tap().await;
    let (bodies, exts) = commands("K9", 200);
    env.send_many(&bodies).await;

    let mut first = WorkerProcess::spawn(&env, &worker_env(&[]));
    let rest = wait_events(&mut tap, 40, &exts).await;
    first.signal("-KILL");
    first.wait_exit(Duration::from_secs(10)).await;
    let created_before = env.sim.sim.stats().groups_created;
    assert!(
        created_before < 200,
        "killed mid-load ({created_before} created)"
    );

    let mut second = WorkerProcess::spawn(&env, &worker_env(&[]));
    all_done_exactly_once(&env, &mut tap, &rest, &exts, Duration::from_secs(120)).await;
    second.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_the_same_ext_id_fifty_times_make_one_group() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 30);
    let mut tap = env.event_tap().await;
    let mut a = WorkerProcess::spawn(&env, &worker_env(&[]));
    let mut b = WorkerProcess::spawn(&env, &worker_env(&[]));
    for w in [&a, &b] {
        w.wait_consuming().await;
    }
    let body =
        json!({"org_unit_ext_id": "TWO-1", "org_unit_name": "Shared", "org_unit_parent_id": 1000});
    env.send_many(&vec![body; 50]).await;
    let events = tap.take(50, Duration::from_secs(90)).await;
    let ids: HashSet<_> = events
        .iter()
        .map(|e| e.body["org_unit_id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(env.sim.sim.groups_for("TWO-1").len(), 1);
    assert_eq!(
        events
            .iter()
            .filter(|e| e.body["duplicate"] == false)
            .count(),
        1
    );
    let served: Vec<usize> = [&a, &b]
        .iter()
        .map(|w| {
            w.lines()
                .iter()
                .filter(|l| l["message"] == "outcome")
                .count()
        })
        .collect();
    assert!(
        served.iter().all(|n| *n > 0),
        "both workers took deliveries: {served:?}"
    );
    for w in [&mut a, &mut b] {
        w.stop().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_for_ten_seconds_under_load() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 20);
    // Restarted on the same port below: one no other bind in the suite can take meanwhile.
    let port = stable_port();
    let mut redis = RedisServer::start(port).await;
    let url = redis.url();
    let url: &'static str = Box::leak(url.into_boxed_str());
    let mut tap = env.event_tap().await;
    let (bodies, exts) = commands("RD", 150);
    let mut worker = WorkerProcess::spawn(&env, &worker_env(&[("PROVISIONER__REDIS__URL", url)]));
    worker.wait_consuming().await;
    env.send_many(&bodies).await;
    let rest = wait_events(&mut tap, 30, &exts).await;

    redis.stop();
    let down_at = Instant::now();
    worker
        .wait_line(
            "the circuit to open on Redis",
            // Seconds on an idle machine; a loaded one (the suite on two cores) takes longer.
            Duration::from_secs(30),
            |l| l["circuit"] == "open" && l["fault"] == "redis",
        )
        .await;
    // Deliveries that had passed Redis before it stopped may still be posting; once none
    // is in flight (the rest are parked, and the consumer is cancelled), nothing can post.
    wait_for(
        "every held delivery to settle",
        Duration::from_secs(20),
        || async { (worker.metric("provisioner_in_flight").await == Some(0.0)).then_some(()) },
    )
    .await;
    let posts_while_down = env.sim.sim.stats().create_requests;
    // The outage itself: Redis stays down for ten seconds.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed())).await;
    assert_eq!(
        env.sim.sim.stats().create_requests,
        posts_while_down,
        "no API POST while Redis is down"
    );
    assert!(
        worker.child.try_wait().expect("status").is_none(),
        "the worker is still running"
    );

    let _redis = RedisServer::start(port).await; // empty: everything it knew is gone
    all_done_exactly_once(&env, &mut tap, &rest, &exts, Duration::from_secs(120)).await;
    assert!(worker.lines().iter().any(|l| l["circuit"] == "closed"));
    assert!(
        worker.child.try_wait().expect("status").is_none(),
        "the worker never exited"
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closing_the_connections_mid_load() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 20);
    let mut tap = env.event_tap().await;
    let (bodies, exts) = commands("BC", 200);
    env.send_many(&bodies).await;
    let mut settings = env.settings.clone();
    settings.dedup.lease = Duration::from_secs(2);
    let worker = env.spawn_worker_with(settings).await;
    let rest = wait_events(&mut tap, 40, &exts).await;
    let closed = env.close_worker_connections().await;
    assert!(closed >= 1);
    let closed_at = Instant::now();
    wait_for(
        "the worker to reconnect",
        Duration::from_secs(60),
        || async {
            (worker.is_consuming() && closed_at.elapsed() > Duration::from_millis(100))
                .then_some(())
        },
    )
    .await;
    assert!(
        closed_at.elapsed() < Duration::from_secs(60),
        "resumed within 60 s"
    );
    all_done_exactly_once(&env, &mut tap, &rest, &exts, Duration::from_secs(120)).await;
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_exits_0_within_the_drain_timeout() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 50);
    let mut tap = env.event_tap().await;
    let (bodies, exts) = commands("ST", 200);
    env.send_many(&bodies).await;
    let mut first = WorkerProcess::spawn(&env, &worker_env(&[]));
    let rest = wait_events(&mut tap, 40, &exts).await;
    let asked = Instant::now();
    first.signal("-TERM");
    let status = first.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        asked.elapsed() < Duration::from_secs(5 + 3),
        "within the 5 s drain timeout (+ close)"
    );
    let lines = first.lines();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "shutdown requested; draining")
    );
    assert!(env.sim.sim.stats().groups_created < 200, "stopped mid-load");

    let mut second = WorkerProcess::spawn(&env, &worker_env(&[]));
    all_done_exactly_once(&env, &mut tap, &rest, &exts, Duration::from_secs(120)).await;
    second.signal("-INT");
    assert_eq!(
        second.wait_exit(Duration::from_secs(15)).await.code(),
        Some(0),
        "SIGINT too"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_static_token_parks_everything_until_it_is_valid_again() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let (bodies, exts) = commands("TK", 30);
    env.sim.sim.set_token(None);
    env.send_many(&bodies).await;
    wait_for("the circuit to open", Duration::from_secs(20), || async {
        matches!(worker.circuit(), CircuitState::Open { .. }).then_some(())
    })
    .await;
    // Stays open while the token is refused, with nothing failed: two more probes
    // (authenticated lists) are refused and the circuit is still open after them.
    let refused_probes = || {
        env.sim
            .sim
            .requests()
            .iter()
            .filter(|r| r.path.contains("/groups/list") && r.status == Some(401))
            .count()
    };
    let before = refused_probes();
    wait_for("two refused probes", Duration::from_secs(20), || async {
        (refused_probes() >= before + 2).then_some(())
    })
    .await;
    assert!(matches!(worker.circuit(), CircuitState::Open { .. }));
    assert!(
        !worker.is_consuming(),
        "no consumer while the circuit is open"
    );
    tap.assert_quiet(Duration::from_millis(100)).await;
    assert_eq!(
        env.queue_depth(&env.settings.topology.dead_letter_queue)
            .await,
        0
    );

    env.sim.sim.set_token(Some(SIM_TOKEN));
    collect_created(&mut tap, &exts, Duration::from_secs(60)).await;
    assert_eq!(worker.circuit(), CircuitState::Closed);
    env.wait_drained(0, Duration::from_secs(30)).await;
    assert_exactly_once(&env, &exts);
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_mode_two_replicas_tokens_revoked_mid_run() {
    let env = TestEnv::with_sim(SimConfig {
        token: "no-static-token".into(),
        ..SimConfig::default()
    })
    .await;
    env.sim.sim.update_faults(|f| f.latency_ms = 20);
    let mut settings = env.settings.clone();
    settings.api.auth = Some(ApiAuth::Login {
        email: "admin@example.com".into(),
        password: SecretString::from("sim-password"),
    });
    settings.api.auth_url = format!("http://{}", env.sim.addr);
    let mut tap = env.event_tap().await;
    let a = env.spawn_worker_with(settings.clone()).await;
    let b = env.spawn_worker_with(settings).await;
    let (bodies, exts) = commands("LG", 120);
    env.send_many(&bodies).await;
    let rest = wait_events(&mut tap, 30, &exts).await;
    env.sim.sim.revoke_access_tokens();
    all_done_exactly_once(&env, &mut tap, &rest, &exts, Duration::from_secs(90)).await;
    let stats = env.sim.sim.stats();
    assert_eq!(
        stats.refresh_reuse, 0,
        "a single-use refresh token was reused"
    );
    assert_eq!(stats.logins, 1, "one session shared by both replicas");
    assert!(stats.refreshes >= 1, "the revoked token was refreshed");
    for w in [a, b] {
        w.shutdown();
        w.join().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_consecutive_503s_open_the_circuit_which_closes_after_recovery() {
    let env = TestEnv::new().await;
    env.sim
        .sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(20, 503)));
    let mut tap = env.event_tap().await;
    let mut worker =
        WorkerProcess::spawn(&env, &worker_env(&[("PROVISIONER__RETRY__MAX_TRIES", "3")]));
    let (bodies, exts) = commands("CB", 20);
    env.send_many(&bodies).await;
    let opened = worker
        .wait_line("circuit opened", Duration::from_secs(30), |l| {
            l["circuit"] == "open"
        })
        .await;
    assert_eq!(opened["fault"], "api_down");
    collect_created(&mut tap, &exts, Duration::from_secs(60)).await;
    worker
        .wait_line("circuit closed", Duration::from_secs(10), |l| {
            l["circuit"] == "closed"
        })
        .await;
    env.wait_drained(0, Duration::from_secs(30)).await;
    assert_exactly_once(&env, &exts);
    let lines = worker.lines();
    let opens = lines.iter().filter(|l| l["circuit"] == "open").count();
    assert!(opens >= 1);
    let outcomes: Vec<_> = lines.iter().filter(|l| l["message"] == "outcome").collect();
    assert!(
        outcomes.iter().all(|l| l["outcome"] != "dead_lettered"),
        "nothing dead-lettered"
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_unfinished_at_the_drain_timeout_go_back_to_the_queue() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 30_000);
    let mut tap = env.event_tap().await;
    let mut settings = env.settings.clone();
    settings.shutdown.drain_timeout = Duration::from_millis(500);
    settings.api.timeout = Duration::from_secs(60);
    settings.dedup.lease = Duration::from_secs(1);
    let worker = env.spawn_worker_with(settings.clone()).await;
    let (bodies, exts) = commands("DR", 3);
    env.send_many(&bodies).await;
    wait_for(
        "the calls to be in flight",
        Duration::from_secs(10),
        || async { (env.queue_depth(&env.settings.topology.work_queue).await == 0).then_some(()) },
    )
    .await;
    let asked = Instant::now();
    worker.shutdown();
    worker.join().await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "stopped at the drain timeout, not after the API"
    );
    wait_for(
        "the unfinished deliveries back in the queue",
        Duration::from_secs(10),
        || async { (env.queue_depth(&env.settings.topology.work_queue).await == 3).then_some(()) },
    )
    .await;

    // The API calls that were cut off may still land: the next worker waits until they
    // must have ended (its api.timeout plus a margin), then lists before posting.
    env.sim.sim.update_faults(|f| f.latency_ms = 0);
    settings.shutdown.drain_timeout = Duration::from_secs(10);
    settings.api.timeout = Duration::from_secs(2);
    let again = env.spawn_worker_with(settings).await;
    all_done_exactly_once(&env, &mut tap, &exts, &exts, Duration::from_secs(60)).await;
    again.shutdown();
    again.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_prompt_while_the_broker_does_not_answer() {
    // A "broker" that accepts TCP connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    let (connected_tx, mut connected) = tokio::sync::mpsc::unbounded_channel();
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
            let _ = connected_tx.send(());
        }
    });
    let sim = spawn_sim().await;
    let prefix = unique("gp-hung");
    let mut settings = test_settings("unused", &prefix, &sim.base_url());
    settings.amqp.url = amqp_nodes(&[format!("amqp://guest:guest@{addr}/%2f")]);
    let worker = group_provisioner::worker::start(settings).expect("starts");
    // Wait until it is stuck in the AMQP handshake with the silent peer.
    tokio::time::timeout(Duration::from_secs(10), connected.recv())
        .await
        .expect("the worker connects")
        .expect("accepted");
    assert!(!worker.is_consuming());
    let asked = Instant::now();
    worker.shutdown();
    tokio::time::timeout(Duration::from_secs(5), worker.join())
        .await
        .expect("stopped without waiting out the 30 s connect timeout");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    accept.abort();
}

/// `amqp.url` with several nodes: an unreachable node is skipped, and when the node in use
/// disappears mid-load the worker moves to another; nothing is lost or done twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_nodes_are_tried_in_turn_and_losing_one_costs_nothing() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 50);
    let mut tap = env.event_tap().await;
    let a = TcpProxy::start(AMQP_HOST.get()).await;
    let b = TcpProxy::start(AMQP_HOST.get()).await;
    let closed = free_port();
    let url = |addr: String| format!("amqp://guest:guest@{addr}/{}", env.vhost);
    let nodes = amqp_nodes(&[
        url(format!("127.0.0.1:{closed}")),
        url(a.addr.to_string()),
        url(b.addr.to_string()),
    ]);

    // From the unreachable first node to the next.
    let (conn, node) =
        group_provisioner::amqp::connect_nodes(&nodes, &Default::default(), 0, "nodes test")
            .await
            .expect("a node answers");
    assert_eq!(node, 1, "the unreachable node is skipped");
    let _ = conn.close(200, "done".into()).await;

    let (bodies, exts) = commands("NODE", 300);
    env.send_many(&bodies).await;
    let mut settings = env.settings.clone();
    settings.amqp.url = nodes;
    let worker = env.spawn_worker_with(settings).await;
    let rest = wait_events(&mut tap, 60, &exts).await;
    let (used, other) = if a.open() > 0 { (&a, &b) } else { (&b, &a) };
    assert!(
        used.open() > 0,
        "the worker is connected through one of the nodes"
    );
    let before = other.accepted();
    used.cut();
    all_done_exactly_once(&env, &mut tap, &rest, &exts, Duration::from_secs(90)).await;
    assert!(
        other.accepted() > before,
        "the worker moved to the other node"
    );
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

/// A log shipper that stops reading the worker's stdout (the pipe fills at 64 KiB) must not
/// stop the worker: its lines wait in memory while commands go on, and once the pipe is
/// read again every outcome line is there. [Before the lines were batched, the task that
/// logged blocked in write(2) on a runtime thread, and processing stopped with the pipe.]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_does_not_stall_the_worker() {
    use tokio::io::AsyncBufReadExt;
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let (mut child, stdout) = WorkerProcess::spawn_unread(&env);
    env.wait_work_queue_consumed(Duration::from_secs(30)).await;
    // About 400 bytes of outcome line each: 400 of them are more than twice a pipe's 64 KiB.
    let n = 400;
    let (bodies, exts) = commands("STALLED-LOG", n);
    env.send_many(&bodies).await;
    let got = events.take(n, Duration::from_secs(60)).await;
    assert_eq!(got.len(), n);
    assert_exactly_once(&env, &exts);

    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut outcomes = Vec::new();
    let read_all = async {
        while outcomes.len() < n {
            let Ok(Some(line)) = lines.next_line().await else {
                break;
            };
            let value: Value = serde_json::from_str(&line).expect("a JSON line");
            if value["message"] == "outcome" {
                outcomes.push(value["ext_id"].as_str().unwrap_or_default().to_owned());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read_all)
        .await
        .expect("the held-back lines are written once the pipe is read");
    assert_eq!(outcomes.len(), n);
    let distinct: HashSet<String> = outcomes.into_iter().collect();
    assert_eq!(distinct, exts, "one outcome line per command, none twice");
    let _ = child.kill().await;
    env.cleanup().await;
}

/// A log reader that goes away (the pipe's read end closed: every write fails with EPIPE)
/// costs the log lines, never a command: the worker goes on creating groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_goes_away_costs_lines_not_commands() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let (mut child, stdout) = WorkerProcess::spawn_unread(&env);
    env.wait_work_queue_consumed(Duration::from_secs(30)).await;
    drop(stdout);
    let n = 200;
    let (bodies, exts) = commands("GONE-LOG", n);
    env.send_many(&bodies).await;
    let got = events.take(n, Duration::from_secs(60)).await;
    assert_eq!(got.len(), n);
    assert_exactly_once(&env, &exts);
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the worker is still running"
    );
    let _ = child.kill().await;
    env.cleanup().await;
}

/// A consumer's queue that refuses events (full, `reject-publish`): the broker nacks every
/// event publish. Each command is parked and retried, none is lost or dead-lettered, and
/// once the queue stops refusing, every ext id has its event and one group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_broker_nacks_are_retried_not_lost() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongLongInt(0),
    );
    args.insert("x-overflow".into(), header_value("reject-publish"));
    let refusing = env.event_queue_with("#", args).await;
    let mut worker = WorkerProcess::spawn(&env, &worker_env(&[]));
    let (bodies, exts) = commands(&unique("NACK"), 20);
    env.send_many(&bodies).await;
    let opened = worker
        .wait_line("circuit opened", Duration::from_secs(30), |l| {
            l["circuit"] == "open"
        })
        .await;
    assert_eq!(opened["fault"], "publish", "{opened}");
    let refused = worker
        .wait_text(
            "error",
            "refused the message (nack)",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(refused["level"], "ERROR", "{refused}");
    env.channel
        .queue_delete(refusing.as_str().into(), Default::default())
        .await
        .expect("the consumer's queue goes away");
    // Events of nacked publishes may have reached the tap already (the broker routes to
    // every other queue): each ext id has an event; the API saw each ext id once.
    collect_created(&mut tap, &exts, Duration::from_secs(60)).await;
    env.wait_drained(0, Duration::from_secs(30)).await;
    assert_exactly_once(&env, &exts);
    worker
        .wait_line("circuit closed", Duration::from_secs(10), |l| {
            l["circuit"] == "closed"
        })
        .await;
    let dead = worker
        .lines()
        .iter()
        .filter(|l| l["message"] == "outcome" && l["outcome"] == "dead_lettered")
        .count();
    assert_eq!(dead, 0, "nothing dead-lettered");
    worker.stop().await;
    env.cleanup().await;
}

/// The broker cancels the worker's consumer (here: ops delete the work queue and the
/// worker's next session declares it again; a cluster may cancel consumers on its own).
/// The worker says so, starts a new session and consumes again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_the_broker_cancels_is_resumed_on_its_own() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut worker = WorkerProcess::spawn(&env, &worker_env(&[]));
    worker.wait_consuming().await;
    env.channel
        .queue_delete(
            env.settings.topology.work_queue.as_str().into(),
            Default::default(),
        )
        .await
        .expect("delete the work queue");
    let lost = worker
        .wait_text("error", "cancelled our consumer", Duration::from_secs(30))
        .await;
    assert_eq!(
        lost["message"], "broker session lost; reconnecting",
        "{lost}"
    );
    wait_for("consuming again", Duration::from_secs(30), || async {
        let n = worker
            .lines()
            .iter()
            .filter(|l| l["message"] == "consuming")
            .count();
        (n >= 2).then_some(())
    })
    .await;
    let (bodies, exts) = commands(&unique("CANCEL"), 10);
    env.send_many(&bodies).await;
    collect_created(&mut tap, &exts, Duration::from_secs(60)).await;
    env.wait_drained(0, Duration::from_secs(30)).await;
    assert_exactly_once(&env, &exts);
    worker.stop().await;
    env.cleanup().await;
}

/// A replica frozen (SIGSTOP) longer than its confirm timeout while events are in flight:
/// on waking, its timers may fire before its I/O thread reads the confirms that arrived
/// meanwhile. Whatever it then decides (a publish given up on, a delivery parked), nothing
/// is lost, created twice or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_frozen_past_its_confirm_timeout_loses_nothing() {
    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 20);
    let mut tap = env.event_tap().await;
    let mut worker = WorkerProcess::spawn(
        &env,
        &worker_env(&[("PROVISIONER__AMQP__CONFIRM_TIMEOUT", "200ms")]),
    );
    worker.wait_consuming().await;
    let (bodies, exts) = commands(&unique("FROZEN"), 300);
    env.send_many(&bodies).await;
    let rest = wait_events(&mut tap, 50, &exts).await;
    worker.signal("-STOP");
    // Frozen for ten times the confirm timeout (the process cannot run: nothing to wait on).
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.signal("-CONT");
    all_done_exactly_once(&env, &mut tap, &rest, &exts, Duration::from_secs(120)).await;
    let lines = worker.lines();
    let given_up = lines
        .iter()
        .filter(|l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("did not confirm"))
        })
        .count();
    assert!(
        !lines
            .iter()
            .any(|l| l["message"] == "outcome" && l["outcome"] == "dead_lettered"),
        "nothing dead-lettered"
    );
    eprintln!("frozen past the confirm timeout: {given_up} publishes given up on");
    worker.stop().await;
    env.cleanup().await;
}

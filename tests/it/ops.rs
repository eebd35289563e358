//! Operator commands and the HTTP endpoint, as operators use them: the binary against real
//! RabbitMQ and Redis, the worker in process, convirza-sim on port 0.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use serde_json::{Value, json};

use group_provisioner::sim::FailNext;

use crate::helpers::*;
use crate::process::{cli, cli_measured, cli_with_stdin, json_lines, stderr, stdout};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_and_fails_with_the_right_exit_codes() {
    let env = TestEnv::new().await;
    // A fresh vhost: --no-declare finds nothing, and says what is missing.
    let o = cli(&env, &["check", "--no-declare"], &[]).await;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("FAIL  topology")
                && l.contains("queue provisioning.group.create"))
    );

    let o = cli(&env, &["check"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    for item in ["config", "rabbitmq", "topology", "redis", "api"] {
        assert!(
            out.lines().any(|l| l.starts_with("ok") && l.contains(item)),
            "{item} not ok:\n{out}"
        );
    }
    assert!(
        !out.contains("guest:guest") && !out.contains(SIM_TOKEN),
        "secrets in the output:\n{out}"
    );
    // Now it exists: --no-declare passes too.
    assert_eq!(
        cli(&env, &["check", "--no-declare"], &[])
            .await
            .status
            .code(),
        Some(0)
    );

    let o = cli(
        &env,
        &["check"],
        &[("PROVISIONER__API__TOKEN", "wrong-token")],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("FAIL  api") && l.contains("401")),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("wrong-token"));

    let bad_port = format!("amqp://guest:guest@127.0.0.1:{}/{}", free_port(), env.vhost);
    let o = cli(&env, &["check"], &[("PROVISIONER__AMQP__URL", &bad_port)]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).lines().any(|l| l.starts_with("FAIL  rabbitmq")),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).lines().any(|l| l.starts_with("ok    redis")),
        "other items still checked"
    );

    let o = cli(&env, &["check"], &[("PROVISIONER__API__TIMEOUT", "soon")]).await;
    assert_eq!(o.status.code(), Some(2), "config error");

    // `check --help` names every item `check` prints (with unrouted events waiting, so the
    // `events` line shows too), and counts read as words.
    env.declare_topology().await;
    env.channel
        .basic_publish(
            env.settings.topology.event_exchange.as_str().into(),
            "nobody.listens".into(),
            lapin::options::BasicPublishOptions::default(),
            b"{}",
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let o = cli(&env, &["check"], &[]).await;
    let help = crate::process::help("group-provisioner", &["check"]);
    let items: BTreeSet<String> = stdout(&o)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    assert!(items.len() >= 7, "{}", stdout(&o));
    for item in &items {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{item} "))),
            "check prints {item}, which check --help does not list:\n{help}"
        );
    }
    assert!(
        stdout(&o).contains("1 event nobody is bound for waits in"),
        "{}",
        stdout(&o)
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_stats_peek_export_and_replay() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let exts: Vec<String> = (0..5).map(|i| format!("DLQ-{i}")).collect();
    for e in &exts {
        env.send(&json!({"org_unit_ext_id": e, "org_unit_name": format!("Team {e}"), "org_unit_parent_id": 4242})).await;
    }
    let failed = events.take(5, T).await;
    assert!(failed.iter().all(|e| e.body["error"]["kind"] == "rejected"));
    let dlq = env.settings.topology.dead_letter_queue.clone();
    wait_for("5 dead letters", T, || async {
        (env.queue_depth(&dlq).await == 5).then_some(())
    })
    .await;

    let o = cli(&env, &["dlq", "stats", "--json"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let stats = &json_lines(&o)[0];
    assert_eq!(stats["count"], 5);
    assert_eq!(stats["by_kind"], json!({"rejected": 5}));
    let human = stdout(&cli(&env, &["dlq", "stats"], &[]).await);
    assert!(
        human.contains("5 dead letters") && human.contains("rejected"),
        "{human}"
    );

    let peek = |limit: &'static str| {
        let env = &env;
        async move { json_lines(&cli(env, &["dlq", "peek", "--limit", limit, "--json"], &[]).await) }
    };
    let first = peek("3").await;
    assert_eq!(first.len(), 3);
    assert_eq!(first[0]["kind"], "rejected");
    assert_eq!(first[0]["http_status"], 400);
    assert!(
        first[0]["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("4242"))
    );
    assert!(
        first[0]["body"]
            .as_str()
            .is_some_and(|b| b.contains("org_unit_ext_id"))
    );
    assert_eq!(env.queue_depth(&dlq).await, 5, "peek removes nothing");
    let all = peek("10").await;
    let order: Vec<_> = all.iter().map(|l| l["ext_id"].clone()).collect();
    assert_eq!(
        order[..3],
        first
            .iter()
            .map(|l| l["ext_id"].clone())
            .collect::<Vec<_>>()[..],
        "same order again"
    );
    let peek_text = stdout(&cli(&env, &["dlq", "peek", "--limit", "2"], &[]).await);
    assert!(
        peek_text.contains("kind=rejected") && peek_text.contains("nothing was removed"),
        "{peek_text}"
    );

    let o = cli(
        &env,
        &["dlq", "replay", "--kind", "rejected", "--dry-run"],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("would move 5, skipped 0 (replay limit), kept 0"),
        "{}",
        stdout(&o)
    );
    assert_eq!(env.queue_depth(&dlq).await, 5, "dry run moves nothing");

    let o = cli(&env, &["dlq", "replay", "--kind", "name_conflict"], &[]).await;
    assert!(
        stdout(&o).contains("moved 0, skipped 0 (replay limit), kept 5"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        env.queue_depth(&dlq).await,
        5,
        "non-matching filter keeps them"
    );

    let file = std::env::temp_dir().join(format!("{}.jsonl", unique("dlq-export")));
    let o = cli(
        &env,
        &["dlq", "export", "--out", file.to_str().expect("path")],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let exported: Vec<Value> = std::fs::read_to_string(&file)
        .expect("export file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("parseable JSON line"))
        .collect();
    assert_eq!(exported.len(), 5);
    assert_eq!(
        exported
            .iter()
            .map(|l| l["ext_id"].clone())
            .collect::<Vec<_>>(),
        order
    );
    assert!(exported[0]["headers"]["x-error-kind"] == "rejected");
    let _ = std::fs::remove_file(&file);
    assert_eq!(env.queue_depth(&dlq).await, 5, "export removes nothing");

    // Fix the cause, replay two by ext id and limit, then the rest by kind.
    env.sim.sim.add_parent(4242);
    let second = order[1].as_str().expect("ext id").to_owned();
    let o = cli(&env, &["dlq", "replay", "--ext-id", &second], &[]).await;
    assert!(
        stdout(&o).contains("moved 1, skipped 0 (replay limit), kept 4"),
        "{}",
        stdout(&o)
    );
    let o = cli(
        &env,
        &[
            "dlq", "replay", "--kind", "rejected", "--limit", "1", "--rate", "50/s",
        ],
        &[],
    )
    .await;
    assert!(
        stdout(&o).contains("moved 1, skipped 0 (replay limit), kept 3"),
        "{}",
        stdout(&o)
    );
    let left: Vec<_> = peek("10")
        .await
        .iter()
        .map(|l| l["ext_id"].clone())
        .collect();
    let expected: Vec<_> = order
        .iter()
        .filter(|e| **e != order[0] && **e != order[1])
        .cloned()
        .collect();
    assert_eq!(left, expected, "what stays keeps its order");
    let o = cli(&env, &["dlq", "replay", "--kind", "rejected"], &[]).await;
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("moved 3, skipped 0 (replay limit), kept 0"),
        "{}",
        stdout(&o)
    );

    let created = events.take(5, T).await;
    assert!(
        created.iter().all(|e| e.routing_key == "group.created"),
        "all five created after the fix"
    );
    let got: HashSet<_> = created
        .iter()
        .map(|e| e.body["ext_id"].as_str().expect("ext").to_owned())
        .collect();
    assert_eq!(got, exts.iter().cloned().collect());
    assert_eq!(env.sim.sim.stats().groups_created, 5);
    assert!(
        created.iter().all(|e| e.body["attempts"] == 1),
        "x-attempts reset by the replay: one new POST each"
    );
    env.wait_drained(0, T).await;
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_loop_guard_skips_messages_replayed_too_often() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    env.send(
        &json!({"org_unit_ext_id": "LOOP-1", "org_unit_name": "x", "org_unit_parent_id": 4242}),
    )
    .await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    for round in 1..=2 {
        events.next(T).await;
        wait_for("the dead letter", T, || async {
            (env.queue_depth(&dlq).await == 1).then_some(())
        })
        .await;
        if round == 2 {
            break;
        }
        let o = cli(&env, &["dlq", "replay", "--max-replays", "1"], &[]).await;
        assert!(stdout(&o).contains("moved 1"), "{}", stdout(&o));
    }
    let peeked = json_lines(&cli(&env, &["dlq", "peek", "--json"], &[]).await);
    assert_eq!(peeked[0]["replay_count"], 1);
    let o = cli(&env, &["dlq", "replay", "--max-replays", "1"], &[]).await;
    assert!(
        stdout(&o).contains("moved 0, skipped 1 (replay limit), kept 0"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("replayed 1 times already"));
    assert_eq!(env.queue_depth(&dlq).await, 1);
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_status() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;

    let o = cli(&env, &["status", "SEND-2", "--json"], &[]).await;
    assert_eq!(o.status.code(), Some(1), "unknown before");
    assert_eq!(json_lines(&o)[0]["state"], "unknown");

    let file = std::env::temp_dir().join(format!("{}.jsonl", unique("send")));
    std::fs::write(
        &file,
        "{\"org_unit_ext_id\":\"SEND-1\",\"org_unit_name\":\"One\",\"org_unit_parent_id\":1000}\n\
         {\"org_unit_ext_id\":\"SEND-2\",\"org_unit_name\":\"Two\",\"org_unit_parent_id\":1000}\n\
         {\"org_unit_ext_id\":\"SEND-X\",\"org_unit_name\":\"\",\"org_unit_parent_id\":1000}\n\
         \n\
         {\"org_unit_ext_id\":\"SEND-3\",\"org_unit_name\":\"Three\",\"org_unit_parent_id\":1001}\n",
    )
    .expect("write");
    let path = file.to_str().expect("path").to_owned();
    let o = cli(&env, &["send", &path], &[]).await;
    assert_eq!(
        o.status.code(),
        Some(1),
        "an invalid line makes the exit code non-zero"
    );
    assert!(
        stdout(&o).contains("sent 3, invalid 1, failed 0"),
        "{}",
        stdout(&o)
    );
    assert!(
        stderr(&o).contains(&format!(
            "{path}:3: invalid command, not sent: org_unit_name: must not be blank"
        )),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_file(&file);

    let worker = env.spawn_worker().await;
    let got = events.take(3, T).await;
    assert!(got.iter().all(|e| e.routing_key == "group.created"));
    assert_eq!(env.sim.sim.stats().groups_created, 3);
    assert!(env.sim.sim.groups_for("SEND-X").is_empty());

    let o = cli(&env, &["status", "SEND-2", "--json"], &[]).await;
    assert_eq!(o.status.code(), Some(0));
    let st = &json_lines(&o)[0];
    assert_eq!(st["state"], "created");
    assert_eq!(
        st["record"]["org_unit_id"],
        env.sim.sim.groups_for("SEND-2")[0].org_unit_id
    );
    assert_eq!(st["post_attempts"], 1);
    let text = stdout(&cli(&env, &["status", "SEND-2"], &[]).await);
    assert!(
        text.contains("state:         created") && text.contains("org_unit_id:"),
        "{text}"
    );

    // One command from stdin, pretty-printed.
    let o = cli_with_stdin(&env, &["send", "-"], &[], Some("{\n \"org_unit_ext_id\": \"SEND-4\",\n \"org_unit_name\": \"Four\",\n \"org_unit_parent_id\": 1000\n}\n")).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(events.next(T).await.body["ext_id"], "SEND-4");
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("http");
    (r.status().as_u16(), r.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_redis_and_metrics_count_what_happened() {
    let mut env = TestEnv::new().await;
    // Restarted on the same port below: one no other bind in the suite can take meanwhile.
    let port = stable_port();
    let mut redis = RedisServer::start(port).await;
    env.settings.redis.url = group_provisioner::secret::SecretUrl::new(redis.url());
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let base = format!("http://{}", worker.metrics_addr());
    wait_for("ready", T, || async {
        (get(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;

    for e in ["M-1", "M-2", "M-3", "M-1"] {
        env.send(&json!({"org_unit_ext_id": e, "org_unit_name": e, "org_unit_parent_id": 1000}))
            .await;
        events.next(T).await;
    }
    env.send_raw(b"nope", lapin::BasicProperties::default())
        .await;
    events.next(T).await;
    let metrics = wait_for("metrics to count 5 outcomes", T, || async {
        let (_, text) = get(&format!("{base}/metrics")).await;
        text.contains("provisioner_commands_total{outcome=\"dead_lettered\"} 1")
            .then_some(text)
    })
    .await;
    for line in [
        "provisioner_commands_total{outcome=\"created\"} 3",
        "provisioner_commands_total{outcome=\"duplicate\"} 1",
        "provisioner_commands_total{outcome=\"dead_lettered\"} 1",
        "provisioner_dead_letters_total{kind=\"invalid_command\"} 1",
        "provisioner_api_requests_total{operation=\"create_group\",status=\"201\"} 3",
        "provisioner_api_request_duration_seconds_count{operation=\"create_group\"} 3",
        "provisioner_dedup_hits_total 1",
        "provisioner_circuit_open 0",
        "provisioner_in_flight 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?}:\n{metrics}"
        );
    }

    redis.stop();
    let (status, body) = wait_for("readyz 503", T, || async {
        let r = get(&format!("{base}/readyz")).await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert_eq!(status, 503);
    assert!(body.contains("redis"), "{body}");
    assert_eq!(
        get(&format!("{base}/healthz")).await.0,
        200,
        "alive all the same"
    );

    let _redis = RedisServer::start(port).await;
    wait_for("ready again", T, || async {
        (get(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

/// A DLQ far larger than the memory the tools may use: every tool reads it in bounded
/// memory, and none of them reorders it, however often it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_tools_read_a_large_dlq_in_bounded_memory_and_keep_its_order() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    // 1,200 dead letters of 100 KB: 120 MB.
    let n = 1_200;
    let padding = "p".repeat(100_000);
    let mut confirms = Vec::new();
    for i in 0..n {
        let body =
            json!({"org_unit_ext_id": format!("BIG-{i:04}"), "padding": padding}).to_string();
        confirms.push(
            env.channel
                .basic_publish(
                    "".into(),
                    dlq.as_str().into(),
                    lapin::options::BasicPublishOptions::default(),
                    body.as_bytes(),
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
        );
        if confirms.len() == 100 {
            for c in confirms.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in confirms.drain(..) {
        c.await.expect("confirm");
    }
    assert_eq!(env.queue_depth(&dlq).await, n);

    let limit = 64 << 20;
    let ext_ids = |o: &std::process::Output| -> Vec<String> {
        json_lines(o)
            .iter()
            .map(|l| l["ext_id"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    let expected = |k: usize| -> Vec<String> { (0..k).map(|i| format!("BIG-{i:04}")).collect() };
    // Read it several ways, twice each: the order never changes.
    for round in 0..2 {
        let (peek, rss) = cli_measured(&env, &["dlq", "peek", "--limit", "1", "--json"]).await;
        assert_eq!(peek.status.code(), Some(0), "{}", stderr(&peek));
        assert_eq!(ext_ids(&peek), expected(1), "round {round}");
        assert!(rss < limit, "peek --limit 1 peaked at {} MiB", rss >> 20);
        eprintln!("dlq peek --limit 1 on 120 MB: {} MiB peak", rss >> 20);

        let (peek, _) = cli_measured(&env, &["dlq", "peek", "--limit", "5", "--json"]).await;
        assert_eq!(ext_ids(&peek), expected(5), "round {round}");

        let (stats, rss) = cli_measured(&env, &["dlq", "stats", "--json"]).await;
        assert_eq!(json_lines(&stats)[0]["count"], n, "{}", stderr(&stats));
        assert!(rss < limit, "stats peaked at {} MiB", rss >> 20);

        let out = std::env::temp_dir().join(format!("{}.jsonl", unique("export")));
        let out_arg = out.display().to_string();
        let (export, rss) = cli_measured(&env, &["dlq", "export", "--out", &out_arg]).await;
        assert_eq!(export.status.code(), Some(0), "{}", stderr(&export));
        assert!(rss < limit, "export peaked at {} MiB", rss >> 20);
        let text = std::fs::read_to_string(&out).expect("export file");
        let _ = std::fs::remove_file(&out);
        let exported: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).expect("json")["ext_id"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned()
            })
            .collect();
        let want = expected(n as usize);
        let first_diff = exported.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            exported.len() == want.len() && first_diff.is_none(),
            "round {round}: export of {} lines, first difference at {first_diff:?}: {:?}",
            exported.len(),
            first_diff.map(|i| &exported[i.saturating_sub(2)..(i + 3).min(exported.len())])
        );
    }
    assert_eq!(env.queue_depth(&dlq).await, n, "nothing removed");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_export_writes_only_to_a_regular_file_a_new_path_or_stdout() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    for i in 0..2 {
        env.channel
            .basic_publish(
                "".into(),
                dlq.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                json!({"org_unit_ext_id": format!("EXP-{i}")})
                    .to_string()
                    .as_bytes(),
                lapin::BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let dir = std::env::temp_dir().join(unique("export-dir"));
    std::fs::create_dir(&dir).expect("dir");
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "precious").expect("victim");
    let export = |path: std::path::PathBuf| {
        let env = &env;
        async move {
            let p = path.display().to_string();
            cli(env, &["dlq", "export", "--out", &p], &[]).await
        }
    };

    // Not regular files: refused with the reason, left as they are.
    let link = dir.join("link.jsonl");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    let fifo = dir.join("fifo.jsonl");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    for (path, kind) in [
        (&link, "a symbolic link"),
        (&fifo, "a named pipe"),
        (&dir, "a directory"),
    ] {
        let o = export(path.clone()).await;
        assert_eq!(o.status.code(), Some(2), "{kind}: {}", stderr(&o));
        assert!(stderr(&o).contains(kind), "{}", stderr(&o));
    }
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink()
    );
    assert!(
        std::fs::symlink_metadata(&fifo)
            .expect("fifo")
            .file_type()
            .is_fifo()
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );

    // A symbolic link planted where a temporary file might be written is never followed.
    let out = dir.join("dlq.jsonl");
    let planted = ["dlq.jsonl.tmp", "dlq.jsonl.jsonl.tmp", ".dlq.jsonl.tmp"];
    for planted in planted {
        std::os::unix::fs::symlink(&victim, dir.join(planted)).expect("plant");
    }
    let o = export(out.clone()).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
    let lines = std::fs::read_to_string(&out).expect("export");
    assert_eq!(lines.lines().count(), 2);
    let mode = std::fs::metadata(&out).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "dead letters hold personal data");
    // An existing regular file is never replaced (it may be the only copy of a discard).
    std::fs::write(&out, "old").expect("old");
    let o = export(out.clone()).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("never replaces"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out).expect("old"), "old");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp") && !planted.contains(&n.as_str()))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // `-` is standard output.
    let o = cli(&env, &["dlq", "export", "--out", "-"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let ext: Vec<Value> = json_lines(&o).iter().map(|l| l["ext_id"].clone()).collect();
    assert_eq!(ext, [json!("EXP-0"), json!("EXP-1")]);
    assert_eq!(env.queue_depth(&dlq).await, 2, "nothing removed");
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
}

/// The DLQ as an earlier version declared it: quorum, no delivery limit of its own.
async fn declare_legacy_dlq(env: &TestEnv) {
    let mut old = lapin::types::FieldTable::default();
    old.insert("x-queue-type".into(), header_value("quorum"));
    env.channel
        .queue_declare(
            env.settings.topology.dead_letter_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            old,
        )
        .await
        .expect("the DLQ as an earlier version declared it");
}

/// Publish `ext_ids` straight into the DLQ as dead letters of kind `rejected`, in order.
async fn plant_dead_letters(env: &TestEnv, ext_ids: &[String]) {
    let letters: Vec<(String, &str)> = ext_ids.iter().map(|e| (e.clone(), "rejected")).collect();
    plant_dead_letters_of(env, &letters).await;
}

/// Dead letters (ext id, x-error-kind) straight into the DLQ, in order.
async fn plant_dead_letters_of(env: &TestEnv, letters: &[(String, &str)]) {
    let dlq = env.settings.topology.dead_letter_queue.clone();
    for (e, kind) in letters {
        let body = json!({"org_unit_ext_id": e, "org_unit_name": format!("Team {e}"), "org_unit_parent_id": 1000})
            .to_string();
        let mut headers = lapin::types::FieldTable::default();
        headers.insert("x-error-kind".into(), header_value(kind));
        headers.insert(
            "x-last-failed-at".into(),
            header_value("2026-01-01T00:00:00Z"),
        );
        env.channel
            .basic_publish(
                "".into(),
                dlq.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                body.as_bytes(),
                lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
}

/// The DLQ's ext ids in queue order (`dlq peek --json`).
pub async fn dlq_order(env: &TestEnv) -> Vec<String> {
    let o = cli(env, &["dlq", "peek", "--limit", "all", "--json"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    json_lines(&o)
        .iter()
        .map(|l| l["ext_id"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// RabbitMQ 4.x gives a quorum queue without a delivery limit of its own a limit of 20 and
/// counts every message a reader hands back: the DLQ must keep its dead letters however
/// often operators look at them, on every supported broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_inspections_lose_and_reorder_no_dead_letter() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    let exts: Vec<String> = (0..3).map(|i| format!("LOOK-{i}")).collect();
    plant_dead_letters(&env, &exts).await;

    for round in 0..50 {
        let args: &[&str] = match round % 3 {
            0 => &["dlq", "stats", "--json"],
            1 => &["dlq", "peek", "--limit", "1"],
            _ => &["dlq", "export", "--out", "-"],
        };
        let o = cli(&env, args, &[]).await;
        assert_eq!(o.status.code(), Some(0), "round {round}: {}", stderr(&o));
    }
    assert_eq!(env.queue_depth(&dlq).await, 3, "nothing lost");
    assert_eq!(dlq_order(&env).await, exts, "nothing reordered");

    // And each still replays.
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let o = cli(&env, &["dlq", "replay", "--kind", "rejected"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let created = events.take(3, T).await;
    let mut got: Vec<_> = created
        .iter()
        .map(|e| (e.body["event"].clone(), e.body["ext_id"].clone()))
        .collect();
    got.sort_by_key(|(_, x)| x.to_string());
    assert_eq!(
        got,
        exts.iter()
            .map(|x| (json!("group.created"), json!(x)))
            .collect::<Vec<_>>()
    );
    assert_eq!(env.queue_depth(&dlq).await, 0);
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

/// A DLQ an earlier version declared (no delivery limit of its own) still works for the
/// worker, `check` says what is wrong in plain words, and the tools refuse to read it, so
/// no inspection can cost a dead letter on RabbitMQ 4.x.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_of_an_earlier_version_is_reported_and_never_inspected_to_death() {
    let env = TestEnv::new().await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    declare_legacy_dlq(&env).await;
    env.declare_topology().await;
    let exts: Vec<String> = (0..2).map(|i| format!("OLD-{i}")).collect();
    plant_dead_letters(&env, &exts).await;

    let o = cli(&env, &["check"], &[]).await;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let fail = stdout(&o)
        .lines()
        .find(|l| l.starts_with("FAIL  dlq"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no dlq line:\n{}", stdout(&o)));
    assert!(
        fail.contains("earlier version") && fail.contains("Migrating the DLQ"),
        "{fail}"
    );
    let o = cli(&env, &["check", "--no-declare"], &[]).await;
    assert!(
        stdout(&o).lines().any(|l| l.starts_with("FAIL  dlq")),
        "{}",
        stdout(&o)
    );

    // The worker runs on it (it only publishes there).
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    env.send(&json!({"org_unit_ext_id": "OLD-NEW", "org_unit_name": "Team new", "org_unit_parent_id": 1000}))
        .await;
    assert_eq!(events.next(T).await.body["event"], "group.created");
    worker.shutdown();
    worker.join().await;

    // Every reading command refuses, reads nothing and so returns nothing.
    for args in [
        &["dlq", "stats"][..],
        &["dlq", "peek"],
        &["dlq", "export", "--out", "-"],
        &["dlq", "replay", "--kind", "rejected"],
    ] {
        for _ in 0..12 {
            let o = cli(&env, args, &[]).await;
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
            assert!(
                stderr(&o).contains("nothing was read") && stderr(&o).contains("Migrating the DLQ"),
                "{}",
                stderr(&o)
            );
            // Only the command's own words: no client library lines, no colour codes.
            assert!(
                !stderr(&o).contains('\u{1b}') && !stderr(&o).contains("lapin"),
                "{}",
                stderr(&o)
            );
        }
    }
    assert_eq!(env.queue_depth(&dlq).await, 2, "nothing lost");
    // A message the broker delivered before carries its count; these were never delivered.
    let letters = env.drain_dlq().await;
    assert_eq!(letters.len(), 2);
    for l in &letters {
        let count = l
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        assert!(
            matches!(
                count,
                None | Some(
                    lapin::types::AMQPValue::LongLongInt(0) | lapin::types::AMQPValue::LongInt(0)
                )
            ),
            "delivered before: {count:?}"
        );
    }

    // The way out: `dlq migrate` keeps every letter, in order, and the DLQ is current,
    // with a worker running and dead-lettering meanwhile.
    let exts: Vec<String> = (0..30).map(|i| format!("MIG-{i:02}")).collect();
    plant_dead_letters(&env, &exts).await;
    let worker = env.spawn_worker().await;
    let o = cli(&env, &["dlq", "migrate"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("migrated: 30 dead letters"),
        "{}",
        stdout(&o)
    );
    // A dead letter written after the migration lands behind the moved ones.
    env.send(&json!({"org_unit_ext_id": "MIG-LATE", "org_unit_name": "Late", "org_unit_parent_id": 4242}))
        .await;
    wait_for("the late dead letter", T, || async {
        (env.queue_depth(&dlq).await == 31).then_some(())
    })
    .await;
    worker.shutdown();
    worker.join().await;
    let mut expected = exts.clone();
    expected.push("MIG-LATE".to_owned());
    assert_eq!(dlq_order(&env).await, expected);
    let o = cli(&env, &["check"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).lines().any(|l| l.starts_with("ok    dlq")));
    let o = cli(&env, &["dlq", "migrate"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("nothing to do"), "{}", stdout(&o));
    let ch = env.conn.create_channel().await.expect("channel");
    let holding = group_provisioner::amqp::ready_count(&ch, &format!("{dlq}.migrating")).await;
    assert!(holding.is_err(), "holding queue left: {holding:?}");
    env.cleanup().await;
}

/// An interrupted migration (the DLQ already deleted, the letters in the holding queue) is
/// reported by `check` and finished by running `dlq migrate` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_dlq_migration_is_reported_and_resumed() {
    let env = TestEnv::new().await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    let holding = format!("{dlq}.migrating");
    env.declare_topology().await;
    // What a run killed after its first half leaves: no DLQ, the letters held.
    env.channel
        .queue_delete(dlq.as_str().into(), Default::default())
        .await
        .expect("delete dlq");
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-queue-type".into(), header_value("quorum"));
    env.channel
        .queue_declare(
            holding.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("holding queue");
    let exts: Vec<String> = (0..5).map(|i| format!("HELD-{i}")).collect();
    for e in &exts {
        env.channel
            .basic_publish(
                "".into(),
                holding.as_str().into(),
                Default::default(),
                json!({"org_unit_ext_id": e}).to_string().as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let o = cli(&env, &["check"], &[]).await;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).lines().any(|l| l.starts_with("FAIL  dlq")
            && l.contains("interrupted")
            && l.contains("5 dead letters")),
        "{}",
        stdout(&o)
    );
    let o = cli(&env, &["dlq", "migrate"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("migrated: 5 dead letters"),
        "{}",
        stdout(&o)
    );
    assert_eq!(dlq_order(&env).await, exts);
    let o = cli(&env, &["check"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    env.cleanup().await;
}

/// What RabbitMQ 4.3 refuses, the worker never uses: global QoS, and queues that are
/// neither durable nor exclusive. Checked on the broker's own view of a running worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_uses_no_global_qos_and_no_transient_queue() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker().await;
    let get = |path: String| async move {
        let list: Vec<Value> = reqwest::Client::new()
            .get(format!("{MANAGEMENT}/api/{path}"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(list)
    };
    // The management API's statistics lag: wait until it shows the consuming channel.
    let channels = wait_for("the worker's channels", T, || async {
        get(format!("vhosts/{}/channels", env.vhost))
            .await
            .filter(|c| c.iter().any(|ch| ch["prefetch_count"] == 32))
    })
    .await;
    for ch in &channels {
        // RabbitMQ 4.x no longer reports the field at all.
        let global = &ch["global_prefetch_count"];
        assert!(
            global.is_null() || *global == 0,
            "global QoS {global} on {}",
            ch["name"]
        );
    }
    let queues = get(format!("queues/{}", env.vhost)).await.expect("queues");
    assert!(!queues.is_empty());
    for q in &queues {
        assert!(
            q["durable"] == true || q["exclusive"] == true,
            "transient non-exclusive queue {}",
            q["name"]
        );
    }
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

/// `dlq discard` removes only what it was asked to and wrote down first; the rest stay in
/// order. `--kind` and `--limit` values are checked; `peek --limit all` shows everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_discard_removes_only_what_it_wrote_down_and_keeps_the_rest_in_order() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    let mut letters = Vec::new();
    for i in 0..3 {
        letters.push((format!("INV-{i}"), "invalid_command"));
        letters.push((format!("REJ-{i}"), "rejected"));
    }
    plant_dead_letters_of(&env, &letters).await;

    // Refused: no copy and no --yes; a typo in --kind; a zero limit.
    let o = cli(&env, &["dlq", "discard", "--kind", "invalid_command"], &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--export FILE"), "{}", stderr(&o));
    let o = cli(
        &env,
        &["dlq", "discard", "--kind", "rejceted", "--yes"],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("known: invalid_command, rejected"),
        "{}",
        stderr(&o)
    );
    let o = cli(&env, &["dlq", "peek", "--limit", "0"], &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(env.queue_depth(&dlq).await, 6);

    // A dry run, then the real thing with a copy.
    let o = cli(
        &env,
        &[
            "dlq",
            "discard",
            "--kind",
            "invalid_command",
            "--older-than",
            "1d",
            "--dry-run",
        ],
        &[],
    )
    .await;
    assert!(
        stdout(&o).contains("would discard 3, kept 3"),
        "{}",
        stdout(&o)
    );
    assert_eq!(env.queue_depth(&dlq).await, 6);
    let copy = std::env::temp_dir().join(format!("{}.jsonl", unique("discarded")));
    let o = cli(
        &env,
        &[
            "dlq",
            "discard",
            "--kind",
            "invalid_command",
            "--export",
            copy.to_str().expect("path"),
        ],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("discarded 3, kept 3"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let written = std::fs::read_to_string(&copy).expect("the copy");
    let kinds: Vec<Value> = written
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON line")["kind"].clone())
        .collect();
    assert_eq!(kinds, vec![json!("invalid_command"); 3]);
    let _ = std::fs::remove_file(&copy);
    assert_eq!(dlq_order(&env).await, ["REJ-0", "REJ-1", "REJ-2"]);

    // Nothing younger than the age given is touched; --yes removes without a copy.
    let o = cli(
        &env,
        &["dlq", "discard", "--older-than", "100000d", "--yes"],
        &[],
    )
    .await;
    assert!(stdout(&o).contains("discarded 0, kept 3"), "{}", stdout(&o));
    let o = cli(&env, &["dlq", "discard", "--ext-id", "REJ-1", "--yes"], &[]).await;
    assert!(stdout(&o).contains("discarded 1, kept 2"), "{}", stdout(&o));
    assert_eq!(dlq_order(&env).await, ["REJ-0", "REJ-2"]);

    // peek shows everything with `all`, and no JSON nulls in its text.
    let o = cli(&env, &["dlq", "peek", "--limit", "all"], &[]).await;
    let text = stdout(&o);
    assert!(text.contains("(2 shown of 2"), "{text}");
    assert!(!text.contains("null"), "{text}");
    assert!(
        text.contains("http=- ") && text.contains("message_id=(none)"),
        "{text}"
    );
    env.cleanup().await;
}

/// What a script calls answers with one JSON object with stable keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_facing_commands_answer_with_one_json_object() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let one = |o: &std::process::Output| -> Value {
        let lines = json_lines(o);
        assert_eq!(lines.len(), 1, "one object: {}", stdout(o));
        lines[0].clone()
    };

    let o = cli(&env, &["check", "--json"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let check = one(&o);
    assert_eq!(check["ok"], true);
    assert_eq!(check["failed"], 0);
    let items = check["items"].as_array().expect("items");
    for item in [
        "config", "rabbitmq", "topology", "dlq", "events", "redis", "api",
    ] {
        assert!(
            items
                .iter()
                .any(|i| i["item"] == item && i["status"] == "ok"),
            "{item}: {check}"
        );
    }

    let command =
        json!({"org_unit_ext_id": "JSON-1", "org_unit_name": "J", "org_unit_parent_id": 1000});
    let o = cli_with_stdin(
        &env,
        &["send", "--json", "-"],
        &[],
        Some(&format!("{command}\nnot json\n")),
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "one line was invalid");
    assert_eq!(one(&o), json!({"sent": 1, "invalid": 1, "failed": 0}));

    plant_dead_letters(&env, &["J-1".to_owned(), "J-2".to_owned()]).await;
    let o = cli(
        &env,
        &["dlq", "replay", "--kind", "rejected", "--dry-run", "--json"],
        &[],
    )
    .await;
    assert_eq!(
        one(&o),
        json!({"dry_run": true, "moved": 2, "skipped": 0, "kept": 0, "interrupted": false})
    );
    let o = cli(
        &env,
        &["dlq", "discard", "--ext-id", "J-1", "--yes", "--json"],
        &[],
    )
    .await;
    assert_eq!(
        one(&o),
        json!({"dry_run": false, "discarded": 1, "kept": 1})
    );
    let o = cli(&env, &["events", "replay-unrouted", "--json"], &[]).await;
    assert_eq!(
        one(&o),
        json!({"dry_run": false, "moved": 0, "kept": 0, "came_back": 0})
    );
    env.cleanup().await;
}

/// A hostile dead letter (a header as large as the broker takes, odd properties) in a DLQ
/// of an earlier version: `dlq migrate` keeps it, byte for byte, and the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_migrate_keeps_a_hostile_dead_letter_intact() {
    let env = TestEnv::new().await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    declare_legacy_dlq(&env).await;
    env.declare_topology().await;
    plant_dead_letters(&env, &["H-0".to_owned()]).await;
    let mut headers = lapin::types::FieldTable::default();
    headers.insert("x-error-kind".into(), header_value("rejected"));
    headers.insert("x-huge".into(), header_value(&"h".repeat(100_000)));
    // Sender-selected distribution: a copy published with this would also land there.
    let planted = env.event_queue("nothing-routes-here").await;
    headers.insert(
        "CC".into(),
        lapin::types::AMQPValue::FieldArray(vec![header_value(&planted)].into()),
    );
    env.channel
        .basic_publish(
            "".into(),
            dlq.as_str().into(),
            Default::default(),
            b"\xff\xfe not UTF-8",
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_expiration("3600000".into())
                .with_reply_to("provisioning.group.create".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    plant_dead_letters(&env, &["H-2".to_owned()]).await;

    let o = cli(&env, &["dlq", "migrate"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("migrated: 3 dead letters"),
        "{}",
        stdout(&o)
    );
    let letters = env.drain_dlq().await;
    assert_eq!(letters.len(), 3);
    assert_eq!(letters[1].body, b"\xff\xfe not UTF-8".to_vec());
    let huge = letters[1]
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-huge").cloned());
    assert!(
        matches!(huge, Some(lapin::types::AMQPValue::LongString(ref v)) if v.as_bytes().len() == 100_000),
        "the header is gone"
    );
    // One is from planting it (the broker honoured CC on our own publish); a migration's
    // copies add none.
    assert_eq!(
        env.queue_depth(&planted).await,
        1,
        "CC routed a copy elsewhere"
    );
    assert_eq!(
        env.queue_depth(&env.settings.topology.work_queue).await,
        0,
        "the reply_to or CC fed a dead letter back as a command"
    );
    for (letter, ext) in [(&letters[0], "H-0"), (&letters[2], "H-2")] {
        let body: Value = serde_json::from_slice(&letter.body).expect("JSON");
        assert_eq!(body["org_unit_ext_id"], ext);
    }
    env.cleanup().await;
}

/// `status` JSON of one lookup, with its exit code.
async fn status_json(env: &TestEnv, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    all.push("--json");
    let o = cli(env, &all, &[]).await;
    let value = json_lines(&o).into_iter().next().unwrap_or(Value::Null);
    (o.status.code(), value)
}

/// [`status_json`] once the worker has kept the delivery's last outcome. Apart from
/// `created` and `duplicate` (kept by the same Redis script that decides them), it is
/// written just after the ack, so it may trail the event a test waited for by a moment.
async fn settled_status_json(env: &TestEnv, args: &[&str]) -> (Option<i32>, Value) {
    wait_for("the last outcome kept for status", T, || async {
        let (code, st) = status_json(env, args).await;
        (code == Some(0) && !st["last_outcome"].is_null()).then_some((code, st))
    })
    .await
}

/// The command `status` suggests for a dead letter works when pasted into a shell as it
/// is: the ext id shell-quoted, the same `--config`; and every operator command says on
/// stderr which broker vhost, Redis and key prefix it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_status_suggests_runs_as_it_is() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    // No such parent: rejected, dead-lettered.
    env.send(
        &json!({"org_unit_ext_id": "BAD 1", "org_unit_name": "Bad", "org_unit_parent_id": 424_242}),
    )
    .await;
    assert_eq!(events.next(T).await.body["error"]["kind"], "rejected");
    settled_status_json(&env, &["BAD 1"]).await;
    let dir = std::env::temp_dir().join(unique("status-config"));
    std::fs::create_dir(&dir).expect("dir");
    let config = dir.join("my settings.toml");
    std::fs::write(&config, "# everything from the environment\n").expect("config");
    let config = config.display().to_string();
    let o = cli(&env, &["status", "BAD 1", "--config", &config], &[]).await;
    let text = stdout(&o);
    let suggested = text
        .lines()
        .find_map(|l| {
            l.split(": ")
                .find(|part| part.starts_with("group-provisioner "))
        })
        .unwrap_or_else(|| panic!("no suggested command in {text}"))
        .split(", then")
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        suggested.contains("--config '") && suggested.contains("--ext-id 'BAD 1'"),
        "{suggested}"
    );
    // Pasted into a shell as it is (the binary in place of its name).
    let pasted = suggested.replacen("group-provisioner", crate::process::BIN, 1);
    let mut sh = env.command("sh");
    sh.arg("-c")
        .arg(&pasted)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let ran = sh.output().await.expect("sh");
    assert_eq!(ran.status.code(), Some(0), "{pasted}: {}", stderr(&ran));
    assert!(stdout(&ran).contains("would replay"), "{}", stdout(&ran));
    // What it read, said first.
    let said = stderr(&ran);
    assert!(
        said.lines()
            .next()
            .is_some_and(|l| l.starts_with("using broker ")
                && l.contains(&format!("(vhost {:?})", env.vhost))
                && l.contains(&format!("(key prefix {:?})", env.prefix))
                && l.contains(&config)),
        "{said}"
    );
    let said = stderr(&o);
    assert!(
        said.starts_with("using redis ")
            && said.contains(&format!("(key prefix {:?})", env.prefix)),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

/// After a duplicate, `status` names the group; after a duplicate found by List (Redis lost
/// the ext id's keys), it says duplicate and keeps the original creation time when an
/// earlier outcome still has it, and says the time is unknown when nothing does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_after_a_duplicate_names_the_group_and_keeps_its_creation_time() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let body = |ext: &str| json!({"org_unit_ext_id": ext, "org_unit_name": format!("Team {ext}"), "org_unit_parent_id": 1000});

    // A re-send of a created ext id.
    env.send(&body("DUP-A")).await;
    let created = events.next(T).await;
    let id = created.body["org_unit_id"].clone();
    env.send(&body("DUP-A")).await;
    assert_eq!(events.next(T).await.body["duplicate"], true);
    let (_, st) = status_json(&env, &["DUP-A"]).await;
    assert_eq!(st["last_outcome"]["outcome"], "duplicate", "{st}");
    assert_eq!(st["last_outcome"]["org_unit_id"], id, "{st}");

    // Redis lost the record and the attempt marker; the last outcome survived.
    env.send(&body("DUP-B")).await;
    let id = events.next(T).await.body["org_unit_id"].clone();
    let (_, st) = status_json(&env, &["DUP-B"]).await;
    let original = st["record"]["created_at"].clone();
    assert!(original.is_string(), "{st}");
    let mut redis = redis_conn().await;
    let lose = |kinds: &'static [&'static str], ext: &'static str| {
        let keys: Vec<String> = kinds
            .iter()
            .map(|k| format!("{}:{k}:{ext}", env.prefix))
            .collect();
        let mut cmd = redis::cmd("DEL");
        cmd.arg(keys);
        cmd
    };
    let _: i64 = lose(&["group", "attempt"], "DUP-B")
        .query_async(&mut redis)
        .await
        .expect("DEL");
    // Times have whole seconds: once the clock has passed the creation's second, a record
    // that said "created now" would show.
    wait_for("the clock to pass the creation second", T, || async {
        (json!(group_provisioner::clock::now_rfc3339()) != original).then_some(())
    })
    .await;
    env.send(&body("DUP-B")).await;
    let again = events.next(T).await;
    assert_eq!(again.body["duplicate"], true, "{}", again.body);
    assert_eq!(again.body["org_unit_id"], id);
    let (_, st) = status_json(&env, &["DUP-B"]).await;
    assert_eq!(st["last_outcome"]["outcome"], "duplicate", "{st}");
    assert_eq!(st["last_outcome"]["org_unit_id"], id, "{st}");
    assert_eq!(st["record"]["created_at"], original, "{st}");
    assert!(st["record"]["found_at"].is_string(), "{st}");
    let text = stdout(&cli(&env, &["status", "DUP-B"], &[]).await);
    assert!(text.contains("found existing by List at"), "{text}");

    // Every key lost: the original time is unknown, and status says so.
    let _: i64 = lose(&["group", "attempt", "outcome"], "DUP-B")
        .query_async(&mut redis)
        .await
        .expect("DEL");
    env.send(&body("DUP-B")).await;
    assert_eq!(events.next(T).await.body["duplicate"], true);
    let (_, st) = status_json(&env, &["DUP-B"]).await;
    assert_eq!(st["last_outcome"]["outcome"], "duplicate", "{st}");
    assert_eq!(st["record"]["created_at"], st["record"]["found_at"], "{st}");
    let text = stdout(&cli(&env, &["status", "DUP-B"], &[]).await);
    assert!(text.contains("created_at:    at or before"), "{text}");
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_what_happened_to_each_ext_id_and_where_it_is_now() {
    let mut env = TestEnv::new().await;
    env.settings.retry.delays = tiers(&["1s", "30s"]);
    env.settings.retry.max_tries = 1;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    let body = |ext: &str, parent: i64| json!({"org_unit_ext_id": ext, "org_unit_name": format!("Team {ext}"), "org_unit_parent_id": parent});

    // Created, then the same command again: a duplicate, by its own message id.
    let first = env.send(&body("ST-OK", 1000)).await;
    events.next(T).await;
    let (code, st) = status_json(&env, &["ST-OK"]).await;
    assert_eq!(code, Some(0));
    assert_eq!(st["state"], "created");
    assert_eq!(st["last_outcome"]["outcome"], "created");
    assert_eq!(st["last_outcome"]["message_id"], first.as_str());
    assert_eq!(st["last_outcome"]["attempts"], 1);
    assert_eq!(st["last_outcome"]["place"]["where"], "done");
    assert_eq!(
        st["last_outcome"]["org_unit_id"],
        st["record"]["org_unit_id"]
    );
    let text = stdout(&cli(&env, &["status", "ST-OK"], &[]).await);
    assert!(
        text.contains("last outcome:  created at ")
            && text.contains(&format!("created by:    message {first}"))
            && text.contains("now:         done"),
        "{text}"
    );
    let second = env.send(&body("ST-OK", 1000)).await;
    assert_eq!(events.next(T).await.body["duplicate"], true);
    let (_, st) = status_json(&env, &["ST-OK"]).await;
    assert_eq!(st["state"], "created");
    assert_eq!(st["last_outcome"]["outcome"], "duplicate");
    assert_eq!(st["last_outcome"]["message_id"], second.as_str());

    // Rejected by the API (no such parent): dead-lettered, and the runbook's next step.
    env.send(&body("ST-REJ", 424_242)).await;
    assert_eq!(events.next(T).await.body["error"]["kind"], "rejected");
    let (code, st) = settled_status_json(&env, &["ST-REJ"]).await;
    assert_eq!(code, Some(0), "{st}");
    assert_eq!(st["state"], "dead_lettered");
    assert_eq!(st["last_outcome"]["error_kind"], "rejected");
    assert!(st["last_outcome"]["http_status"].is_u64(), "{st}");
    assert_eq!(st["last_outcome"]["place"]["where"], "dead_letter_queue");
    assert_eq!(st["last_outcome"]["place"]["queue"], dlq.as_str());
    let text = stdout(&cli(&env, &["status", "ST-REJ"], &[]).await);
    assert!(
        text.contains("state:         dead_lettered")
            && text.contains("dlq replay --ext-id ST-REJ --dry-run"),
        "{text}"
    );

    // Invalid with a valid ext id: known by it (it used to say "unknown").
    let inv = env
        .send(
            &json!({"org_unit_ext_id": "ST-INV", "org_unit_name": " ", "org_unit_parent_id": 1000}),
        )
        .await;
    events.next(T).await;
    let (code, st) = settled_status_json(&env, &["ST-INV"]).await;
    assert_eq!(code, Some(0), "{st}");
    assert_eq!(st["last_outcome"]["error_kind"], "invalid_command");
    assert_eq!(st["last_outcome"]["message_id"], inv.as_str());
    // Found by its ext id, so not kept a second time under its message id.
    let (code, _) = status_json(&env, &["--message-id", &inv]).await;
    assert_eq!(code, Some(1));
    // Invalid without one: known by its message id only.
    let bad = env.send(&json!({"org_unit_name": "no ext id"})).await;
    events.next(T).await;
    let (code, st) = settled_status_json(&env, &["--message-id", &bad]).await;
    assert_eq!(code, Some(0), "{st}");
    assert_eq!(st["state"], "dead_lettered");
    assert_eq!(st["last_outcome"]["error_kind"], "invalid_command");
    assert_eq!(st["last_outcome"]["ext_id"], Value::Null);
    let text = stdout(&cli(&env, &["status", "--message-id", &bad], &[]).await);
    // An invalid command is never replayed (the same bytes fail again): fix and discard.
    assert!(
        text.contains("ext_id:        (none valid in the body)")
            && text.contains("never replayed")
            && text.contains("dlq discard --kind invalid_command --export"),
        "{text}"
    );
    assert!(!text.contains("dlq replay"), "{text}");
    let (code, st) = status_json(&env, &["--message-id", "never-sent"]).await;
    assert_eq!((code, &st["state"]), (Some(1), &json!("unknown")));

    // A transient failure twice: waiting in the 30 s tier, and status says until when.
    env.sim
        .sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(2, 503)));
    let before = std::time::SystemTime::now();
    env.send(&body("ST-WAIT", 1000)).await;
    let st = wait_for("the command waiting in the 30s tier", T, || async {
        let (_, st) = status_json(&env, &["ST-WAIT"]).await;
        (st["last_outcome"]["place"]["tier"] == "30s").then_some(st)
    })
    .await;
    assert_eq!(st["state"], "deferred");
    assert_eq!(st["last_outcome"]["reason"], "transient");
    assert_eq!(st["last_outcome"]["http_status"], 503);
    assert_eq!(st["last_outcome"]["attempts"], 2);
    assert_eq!(st["last_outcome"]["overdue"], false);
    let until = st["last_outcome"]["place"]["until"]
        .as_str()
        .and_then(group_provisioner::clock::parse_rfc3339)
        .expect("until");
    assert!(
        until >= before + Duration::from_secs(29) && until <= before + Duration::from_secs(60),
        "{st}"
    );
    let text = stdout(&cli(&env, &["status", "ST-WAIT"], &[]).await);
    assert!(text.contains("(tier 30s) until about"), "{text}");

    // Usage errors are exit 2; an unreachable store is exit 3.
    for args in [
        &["status"][..],
        &["status", "A-1", "--message-id", "m"],
        &["status", "--message-id", ""],
        &["status", "bad\u{7}id"],
    ] {
        let o = cli(&env, args, &[]).await;
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let closed = format!("redis://127.0.0.1:{}", free_port());
    let o = cli(
        &env,
        &["status", "ST-OK"],
        &[("PROVISIONER__REDIS__URL", closed.as_str())],
    )
    .await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

/// `status` reads one moment, never the record of one and the last outcome of another: a
/// worker releases a claim and keeps its outcome a moment later, and a report mixing the
/// two said "claimed" beside an outcome that had already left the claim behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_one_moment_not_a_mix_of_two() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    // Two real last outcomes to flip between: a created one and a rejected one.
    let body = |ext: &str, parent: i64| json!({"org_unit_ext_id": ext, "org_unit_name": format!("Team {ext}"), "org_unit_parent_id": parent});
    let created_by = env.send(&body("SNAP-A", 1000)).await;
    let rejected_by = env.send(&body("SNAP-B", 424_242)).await;
    events.take(2, T).await;
    settled_status_json(&env, &["SNAP-B"]).await;
    worker.shutdown();
    worker.join().await;
    let key = |kind: &str, ext: &str| format!("{}:{kind}:{ext}", env.prefix);
    let mut conn = redis_conn().await;
    let outcome_a: Vec<u8> = redis::cmd("GET")
        .arg(key("outcome", "SNAP-A"))
        .query_async(&mut conn)
        .await
        .expect("outcome of SNAP-A");
    let outcome_b: Vec<u8> = redis::cmd("GET")
        .arg(key("outcome", "SNAP-B"))
        .query_async(&mut conn)
        .await
        .expect("outcome of SNAP-B");

    // Moment A: claimed, last outcome A. Moment B: no record, last outcome B. Each moment
    // is written in one transaction, as fast as Redis takes them.
    let (group, outcome) = (key("group", "SNAP-X"), key("outcome", "SNAP-X"));
    let claimed =
        json!({"state": "claimed", "owner": "other-worker", "claimed_at": "2026-11-27T00:00:00Z"})
            .to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = tokio::spawn({
        let stop = stop.clone();
        let mut conn = conn.clone();
        async move {
            let mut flips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut moment = redis::pipe();
                moment.atomic();
                if flips.is_multiple_of(2) {
                    moment
                        .set_ex(&group, &claimed, 60)
                        .set_ex(&outcome, &outcome_a, 60);
                } else {
                    moment.del(&group).set_ex(&outcome, &outcome_b, 60);
                }
                let _: () = moment.query_async(&mut conn).await.expect("flip");
                flips += 1;
            }
            flips
        }
    });
    for _ in 0..40 {
        let (code, st) = status_json(&env, &["SNAP-X"]).await;
        assert_eq!(code, Some(0), "{st}");
        let by = st["last_outcome"]["message_id"]
            .as_str()
            .unwrap_or_default();
        match st["state"].as_str() {
            Some("claimed") => {
                assert_eq!(by, created_by, "claimed beside moment B's outcome: {st}")
            }
            Some("dead_lettered") => {
                assert_eq!(by, rejected_by, "{st}");
                assert!(st["record"].is_null(), "{st}");
            }
            _ => panic!("neither moment: {st}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.await.expect("flipper");
    assert!(
        flips > 40,
        "the moments did not change while status read: {flips}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_a_dead_letter_through_replay_and_discard() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let orphan = |ext: &str| json!({"org_unit_ext_id": ext, "org_unit_name": format!("Team {ext}"), "org_unit_parent_id": 424_242});
    env.send(&orphan("SD-GONE")).await;
    env.send(&orphan("SD-BACK")).await;
    let bad = env.send(&json!({"org_unit_name": "no ext id"})).await;
    events.take(3, T).await;
    worker.shutdown();
    worker.join().await;

    let o = cli(
        &env,
        &["dlq", "discard", "--ext-id", "SD-GONE", "--yes"],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (code, st) = status_json(&env, &["SD-GONE"]).await;
    assert_eq!(code, Some(0));
    assert_eq!(st["state"], "discarded", "{st}");
    assert_eq!(st["last_outcome"]["error_kind"], "rejected");
    assert_eq!(st["last_outcome"]["place"]["where"], "discarded");
    assert_eq!(st["last_outcome"]["place"]["export"], Value::Null);

    let file = std::env::temp_dir().join(format!("{}.jsonl", unique("discarded")));
    let path = file.to_str().expect("path").to_owned();
    let o = cli(
        &env,
        &[
            "dlq",
            "discard",
            "--kind",
            "invalid_command",
            "--export",
            &path,
        ],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (_, st) = status_json(&env, &["--message-id", &bad]).await;
    assert_eq!(st["state"], "discarded", "{st}");
    assert_eq!(st["last_outcome"]["place"]["export"], path.as_str());
    let text = stdout(&cli(&env, &["status", "--message-id", &bad], &[]).await);
    assert!(
        text.contains(&format!("a copy was written to {path}")),
        "{text}"
    );
    let _ = std::fs::remove_file(&file);

    // Replayed while no worker runs: back in the work queue…
    let o = cli(&env, &["dlq", "replay", "--ext-id", "SD-BACK"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (_, st) = status_json(&env, &["SD-BACK"]).await;
    assert_eq!(st["state"], "replayed", "{st}");
    assert_eq!(st["last_outcome"]["place"]["where"], "work_queue");
    // …and once a worker takes it, the worker's outcome is the last word.
    let worker = env.spawn_worker().await;
    events.next(T).await;
    let st = wait_for("the replayed command dead-lettered again", T, || async {
        let (_, st) = status_json(&env, &["SD-BACK"]).await;
        (st["state"] == "dead_lettered").then_some(st)
    })
    .await;
    assert_eq!(st["last_outcome"]["place"]["where"], "dead_letter_queue");
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

/// A replay and a discard that move letters from every window of a large DLQ keep the rest
/// in order. (Acked as they were moved, letters freed slots of their window mid-pass: the
/// broker sent more than the window counted, and some letters kept came back at the end.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_discard_across_many_windows_keep_the_rest_in_order() {
    use crate::console::{letters, plant};
    let env = TestEnv::new().await;
    let kinds = ["rejected", "retries_exhausted", "name_conflict"];
    plant(&env, &letters("WIN", 3000, |i| kinds[i % 3])).await;
    let all = dlq_order(&env).await;
    assert_eq!(all.len(), 3000);
    let of = |k: usize| -> Vec<String> { all.iter().skip(k).step_by(3).cloned().collect() };
    let o = cli(
        &env,
        &["dlq", "replay", "--kind", "rejected", "--json"],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        json_lines(&o).last().map(|j| j["moved"].clone()),
        Some(json!(1000))
    );
    let mut rest: Vec<String> = all.iter().filter(|e| !of(0).contains(e)).cloned().collect();
    assert_eq!(dlq_order(&env).await, rest, "after the replay");
    let dir = tempdir("windows");
    let file = dir.join("discarded.jsonl");
    let path = file.display().to_string();
    let o = cli(
        &env,
        &[
            "dlq",
            "discard",
            "--kind",
            "name_conflict",
            "--export",
            &path,
        ],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let exported: Vec<String> = std::fs::read_to_string(&file)
        .expect("export")
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("JSON")["ext_id"]
                .as_str()
                .unwrap_or("?")
                .to_owned()
        })
        .collect();
    assert_eq!(exported, of(2));
    rest.retain(|e| !exported.contains(e));
    assert_eq!(dlq_order(&env).await, rest, "after the discard");
    assert_eq!(rest, of(1));
    env.cleanup().await;
}

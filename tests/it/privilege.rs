//! The worker as a guest in someone else's infrastructure: a Redis that may evict, a Redis
//! ACL user limited to the key prefix and the commands the worker uses, through the binary.
//! The ACL line is read from docs/deployment.md, so the docs say what the test runs.

use std::time::Duration;

use serde_json::json;

use crate::faults::{all_done_exactly_once, commands};
use crate::helpers::*;
use crate::process::{WorkerProcess, cli, cli_with_stdin, json_lines, stderr, stdout};

const T: Duration = Duration::from_secs(30);

/// `/readyz`'s body.
async fn readyz(worker: &WorkerProcess) -> String {
    let url = format!("http://{}/readyz", worker.metrics_addr().await);
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => format!("no answer: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_is_flagged_by_check_and_the_worker() {
    let env = TestEnv::new().await;
    let redis = RedisServer::start_with(
        free_port(),
        &["--maxmemory", "256mb", "--maxmemory-policy", "volatile-lru"],
    )
    .await;
    let url = redis.url();
    let redis_env = [("PROVISIONER__REDIS__URL", url.as_str())];

    let o = cli(&env, &["check"], &redis_env).await;
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL  redis"))
        .unwrap_or_else(|| panic!("no FAIL redis line:\n{out}"));
    for part in [
        "maxmemory-policy is volatile-lru",
        "268435456 bytes",
        "CONFIG SET maxmemory-policy noeviction",
    ] {
        assert!(line.contains(part), "{part:?} not in {line}");
    }

    let mut worker = WorkerProcess::spawn(&env, &redis_env);
    worker
        .wait_line("the eviction warning", T, |l| {
            l["level"] == "WARN"
                && l["redis_policy"] == "volatile-lru"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("can be created twice"))
        })
        .await;
    worker.wait_consuming().await;
    let sample = r#"provisioner_redis_maxmemory_policy{policy="volatile-lru"}"#;
    assert_eq!(worker.metric(sample).await, Some(1.0));
    let ready = wait_for("ready with the warning", T, || async {
        let body = readyz(&worker).await;
        body.starts_with("ready\n").then_some(body)
    })
    .await;
    assert!(
        ready.contains("warning: redis maxmemory-policy is volatile-lru"),
        "{ready}"
    );
    worker.stop().await;

    // No limit set yet: a warning, not a failure.
    let mut conn = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("private redis");
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("config set");
    let o = cli(&env, &["check"], &redis_env).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("WARN  redis") && l.contains("once a maxmemory limit is set")),
        "{}",
        stdout(&o)
    );
    env.cleanup().await;
}

/// The rules of the `ACL SETUSER` line docs/deployment.md gives, with this password and
/// prefix.
fn documented_acl(password: &str, prefix: &str) -> Vec<String> {
    let docs = include_str!("../../docs/deployment.md");
    let line = docs
        .lines()
        .find(|l| l.starts_with("ACL SETUSER provisioner "))
        .expect("docs/deployment.md gives the ACL SETUSER line");
    line.split_whitespace()
        .skip(3)
        .map(|word| match word {
            w if w.starts_with('>') => format!(">{password}"),
            "~provisioner:*" => format!("~{prefix}:*"),
            w => w.to_owned(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_and_status_run_as_the_documented_redis_acl_user() {
    let env = TestEnv::new().await;
    let redis = RedisServer::start(free_port()).await;
    let mut admin = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("private redis");
    let (user, password) = ("provisioner", "acl-test-secret");
    let rules = documented_acl(password, &env.prefix);
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg(&rules)
        .query_async(&mut admin)
        .await
        .expect("the documented ACL line is valid");
    let url = format!("redis://{user}:{password}@127.0.0.1:{}/0", redis.port);
    // The ACL is in force: a key outside the prefix is refused to this user.
    let mut limited = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("the ACL user logs in");
    let outside: redis::RedisResult<Option<String>> = redis::cmd("GET")
        .arg("elsewhere:key")
        .query_async(&mut limited)
        .await;
    assert!(
        outside
            .as_ref()
            .is_err_and(|e| e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)),
        "a key outside the prefix must be refused: {outside:?}"
    );

    let redis_env = [("PROVISIONER__REDIS__URL", url.as_str())];
    let mut worker = WorkerProcess::spawn(&env, &redis_env);
    worker.wait_consuming().await;
    let (bodies, exts) = commands(&unique("acl"), 5);
    let mut tap = env.event_tap().await;
    env.send_many(&bodies).await;
    all_done_exactly_once(&env, &mut tap, &exts, &exts, T).await;

    let ext_id = bodies[0]["org_unit_ext_id"].as_str().expect("ext id");
    let o = cli(&env, &["status", ext_id, "--json"], &redis_env).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let status = &json_lines(&o)[0];
    assert_eq!(status["state"], json!("created"), "{status}");

    // Without CONFIG GET in the ACL, the policy is said to be unchecked, not assumed.
    let o = cli(&env, &["check"], &redis_env).await;
    let out = stdout(&o);
    assert!(
        out.lines().any(|l| l.starts_with("ok    redis")),
        "{out}{}",
        stderr(&o)
    );
    assert!(
        out.lines().any(|l| l.starts_with("WARN  redis")
            && l.contains("maxmemory-policy could not be checked (CONFIG GET refused")),
        "{out}"
    );
    assert!(!out.contains(password), "{out}");
    worker.stop().await;
    let refused = worker
        .lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .map(|l| l.to_string())
        .collect::<Vec<_>>();
    assert!(refused.is_empty(), "errors as the ACL user: {refused:?}");
    env.cleanup().await;
}

/// The (configure, write, read) permissions docs/deployment.md gives `role`, and whether
/// it gives the user the `management` tag.
fn documented_role(role: &str) -> ([String; 3], bool) {
    let docs = include_str!("../../docs/deployment.md");
    let start = docs
        .lines()
        .position(|l| l.starts_with(&format!("# role: {role} ")))
        .unwrap_or_else(|| panic!("docs/deployment.md has no `# role: {role}` line"));
    let block: Vec<&str> = docs
        .lines()
        .skip(start + 1)
        .take_while(|l| !l.starts_with("# role:") && !l.starts_with("```"))
        .collect();
    let perms = block
        .iter()
        .find(|l| l.starts_with("rabbitmqctl set_permissions"))
        .unwrap_or_else(|| panic!("role {role}: no set_permissions line"));
    let quoted: Vec<String> = perms
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    let [configure, write, read]: [String; 3] = quoted
        .try_into()
        .unwrap_or_else(|q| panic!("role {role}: expected three quoted patterns, got {q:?}"));
    let management = block
        .iter()
        .any(|l| l.starts_with("rabbitmqctl set_user_tags") && l.ends_with(" management"));
    ([configure, write, read], management)
}

/// A broker user with the permissions the docs give `role` on the test's vhost, and its
/// AMQP URL. Delete it with [`delete_user`].
async fn documented_user(env: &TestEnv, role: &str) -> (String, String) {
    let ([c, w, r], management) = documented_role(role);
    let name = unique(&format!("gp-{role}"));
    let tags = if management { "management" } else { "" };
    create_user_with(&name, "role-secret", &env.vhost, [&c, &w, &r], tags).await;
    let url = format!("amqp://{name}:role-secret@{AMQP_HOST}/{}", env.vhost);
    (name, url)
}

/// Delete one queue as the operator who owns the topology.
async fn delete_queue(env: &TestEnv, queue: &str) {
    let r = reqwest::Client::new()
        .delete(format!("{MANAGEMENT}/api/queues/{}/{queue}", env.vhost))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API");
    assert!(r.status().is_success(), "DELETE {queue}: {}", r.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_configure_runs_on_the_topology_ops_declared() {
    let env = TestEnv::new().await;
    // Ops declare the topology (as importing deploy/rabbitmq/definitions.json does).
    env.declare_topology().await;
    let (user, url) = documented_user(&env, "worker-verify").await;
    let amqp = ("PROVISIONER__AMQP__URL", url.as_str());

    let o = cli(&env, &["check", "--no-declare"], &[amqp]).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("ok    topology") && l.contains("verified")),
        "{}",
        stdout(&o)
    );

    // Told to verify: nothing declared, no channel refused, not one ERROR line.
    let mut worker =
        WorkerProcess::spawn(&env, &[amqp, ("PROVISIONER__TOPOLOGY__DECLARE", "verify")]);
    worker.wait_consuming().await;
    worker
        .wait_line("the verified topology", T, |l| {
            l["message"] == "connected to the broker; topology verified"
        })
        .await;
    let mut tap = env.event_tap().await;
    let (bodies, exts) = commands(&unique("verify"), 3);
    env.send_many(&bodies).await;
    all_done_exactly_once(&env, &mut tap, &exts, &exts, T).await;
    worker.stop().await;
    let errors: Vec<String> = worker
        .lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .map(|l| l.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");

    // Left at "all": the refusal is said once, then the worker verifies and runs.
    let mut worker = WorkerProcess::spawn(&env, &[amqp]);
    let warned = worker
        .wait_line("the refusal, said", T, |l| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("this user may not declare the topology"))
        })
        .await;
    assert!(
        warned["broker"]
            .as_str()
            .is_some_and(|b| b.contains("ACCESS_REFUSED")),
        "{warned}"
    );
    worker.wait_consuming().await;
    let (bodies, more) = commands(&unique("fallback"), 3);
    env.send_many(&bodies).await;
    let all: std::collections::HashSet<String> = exts.union(&more).cloned().collect();
    all_done_exactly_once(&env, &mut tap, &more, &all, T).await;
    worker.stop().await;
    delete_user(&user).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_neither_declarable_nor_verifiable_is_one_line_and_not_ready() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let missing = env
        .settings
        .topology
        .delay_queue(&env.settings.retry.delays[0]);
    delete_queue(&env, &missing).await;
    let (user, url) = documented_user(&env, "worker-verify").await;
    let amqp = ("PROVISIONER__AMQP__URL", url.as_str());
    let said = |text: &str| {
        text.contains(&format!("queue {missing} is missing"))
            && text.contains("this user may not declare it (ACCESS_REFUSED")
            && text.contains("import deploy/rabbitmq/definitions.json")
    };

    let o = cli(&env, &["check"], &[amqp]).await;
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL  topology") && said(l)),
        "{out}"
    );

    let worker = WorkerProcess::spawn(&env, &[amqp]);
    let line = worker
        .wait_line("the one line", T, |l| {
            l["level"] == "ERROR" && l["message"].as_str().is_some_and(said)
        })
        .await;
    // Said again only at a bounded rate, while the worker waits for ops.
    assert_eq!(line["retry_in_ms"], json!(30_000), "{line}");
    let body = wait_for("not ready, with the line", T, || async {
        let body = readyz(&worker).await;
        (body.starts_with("not ready") && said(&body)).then_some(body)
    })
    .await;
    assert!(
        body.contains("broker: not connected: the topology"),
        "{body}"
    );
    assert!(
        !worker.lines().iter().any(|l| l["message"] == "consuming"),
        "consumed on a topology it could not verify"
    );
    // Ops fix the topology: the worker starts on its own at its next try.
    env.declare_topology().await;
    worker
        .wait_line("consuming once fixed", Duration::from_secs(45), |l| {
            l["message"] == "consuming"
        })
        .await;

    // Without the management tag the topology cannot be read: said, with the fix.
    let ([c, w, r], _) = documented_role("worker-verify");
    let untagged = unique("gp-untagged");
    create_user_with(&untagged, "role-secret", &env.vhost, [&c, &w, &r], "").await;
    let url = format!("amqp://{untagged}:role-secret@{AMQP_HOST}/{}", env.vhost);
    let untagged_env = [("PROVISIONER__AMQP__URL", url.as_str())];
    // `check --no-declare` (an init step) still checks that everything exists, and says
    // what it could not compare.
    let o = cli(&env, &["check", "--no-declare"], &untagged_env).await;
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(
        stdout(&o).lines().any(|l| l.starts_with("WARN  topology")
            && l.contains("needs the `management` tag")
            && l.contains("only the existence of each exchange and queue was checked")),
        "{}",
        stdout(&o)
    );
    // A worker can neither declare nor verify: the one line says both.
    let o = cli(&env, &["check"], &untagged_env).await;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).lines().any(|l| l.starts_with("FAIL  topology")
            && l.contains("cannot verify the topology")
            && l.contains("needs the `management` tag")
            && l.contains("declaring it is refused too (ACCESS_REFUSED")),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("role-secret"), "{}", stdout(&o));
    drop(worker);
    delete_user(&user).await;
    delete_user(&untagged).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_consumers_and_operator_commands_need_only_their_documented_permissions() {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;

    let env = TestEnv::new().await;
    let worker = env.spawn_worker().await;
    let t = &env.settings.topology;
    let command = |ext: &str| {
        format!(
            "{{\"org_unit_ext_id\":\"{ext}\",\"org_unit_name\":\"{ext} team\",\"org_unit_parent_id\":1000}}\n"
        )
    };
    let as_user = |url: &str| [("PROVISIONER__AMQP__URL", url.to_owned())];

    // A publisher that may only write to the command exchange: `send`.
    let (publisher, publisher_url) = documented_user(&env, "publisher").await;
    let early = unique("PUB-EARLY");
    let [(k, v)] = as_user(&publisher_url);
    let o = cli_with_stdin(&env, &["send", "-"], &[(k, &v)], Some(&command(&early))).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    // Nobody is bound yet: its event waits in the unrouted-events queue.
    wait_for("the unrouted event", T, || async {
        (env.queue_depth(&t.unrouted_events).await == 1).then_some(())
    })
    .await;

    // A consumer that declares, binds and reads only its own queue.
    let (consumer, consumer_url) = documented_user(&env, "consumer").await;
    let conn = lapin::Connection::connect(&consumer_url, lapin::ConnectionProperties::default())
        .await
        .expect("the consumer connects");
    let ch = conn.create_channel().await.expect("channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare("my-events".into(), durable, FieldTable::default())
        .await
        .expect("the consumer declares its queue");
    ch.queue_bind(
        "my-events".into(),
        t.event_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("the consumer binds its queue");
    let mut events = ch
        .basic_consume(
            "my-events".into(),
            "privilege-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the consumer reads its queue");
    let mut next_ext = async || {
        let d = tokio::time::timeout(T, events.next())
            .await
            .expect("an event within the deadline")
            .expect("a delivery")
            .expect("not an error");
        d.ack(BasicAckOptions::default()).await.expect("ack");
        let body: serde_json::Value = serde_json::from_slice(&d.data).expect("event JSON");
        body["ext_id"].as_str().unwrap_or_default().to_owned()
    };

    // `events replay-unrouted` with its own set delivers the early event.
    let (unrouted, unrouted_url) = documented_user(&env, "unrouted").await;
    let [(k, v)] = as_user(&unrouted_url);
    let o = cli(&env, &["events", "replay-unrouted"], &[(k, &v)]).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("moved 1, kept 0, came back 0"),
        "{}",
        stdout(&o)
    );
    assert_eq!(next_ext().await, early);

    // Three invalid commands become dead letters; the dlq commands run with their set.
    for i in 0..3 {
        env.send(&json!({"org_unit_ext_id": format!("BAD-{i}"), "org_unit_parent_id": 1000}))
            .await;
    }
    for _ in 0..3 {
        assert!(next_ext().await.starts_with("BAD-"));
    }
    wait_for("three dead letters", T, || async {
        (env.queue_depth(&t.dead_letter_queue).await == 3).then_some(())
    })
    .await;
    let (operator, operator_url) = documented_user(&env, "dlq").await;
    let [(k, v)] = as_user(&operator_url);
    let export = std::env::temp_dir().join(format!("{}.jsonl", unique("privilege")));
    let export = export.to_str().expect("path").to_owned();
    for args in [
        &["dlq", "stats"][..],
        &["dlq", "peek", "--limit", "2"],
        &["dlq", "export", "--out", &export],
        &["dlq", "replay", "--ext-id", "BAD-0"],
        &["dlq", "discard", "--ext-id", "BAD-1", "--yes"],
    ] {
        let o = cli(&env, args, &[(k, &v)]).await;
        assert_eq!(
            o.status.code(),
            Some(0),
            "{args:?}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        assert!(
            !stderr(&o).contains("could not be compared") && !stderr(&o).contains("ACCESS_REFUSED"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let _ = std::fs::remove_file(&export);
    // The replayed one was dead-lettered again (still invalid); the discarded one is gone.
    assert_eq!(next_ext().await, "BAD-0");
    wait_for("two dead letters", T, || async {
        (env.queue_depth(&t.dead_letter_queue).await == 2).then_some(())
    })
    .await;

    let _ = conn.close(200, "done".into()).await;
    worker.shutdown();
    worker.join().await;
    for user in [publisher, consumer, unrouted, operator] {
        delete_user(&user).await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_the_documented_declaring_set_declares_defers_dead_letters_and_replies() {
    use group_provisioner::sim::FailNext;
    use lapin::BasicProperties;

    let env = TestEnv::new().await;
    let (user, url) = documented_user(&env, "worker").await;
    let amqp = ("PROVISIONER__AMQP__URL", url.as_str());
    // A fresh vhost: `check` declares everything as this user.
    let o = cli(&env, &["check"], &[amqp]).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("ok    topology   declared")),
        "{}",
        stdout(&o)
    );
    let mut tap = env.event_tap().await;
    let replies = env.event_queue("no.such.key").await;
    // Every in-process try fails once: the command goes to a delay tier and comes back.
    env.sim
        .sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(4, 503)));
    let mut worker = WorkerProcess::spawn(&env, &[amqp]);
    worker.wait_consuming().await;
    let ext = unique("WORKER-ROLE");
    env.send_raw(
        json!({"org_unit_ext_id": ext, "org_unit_name": "Role", "org_unit_parent_id": 1000})
            .to_string()
            .as_bytes(),
        BasicProperties::default().with_reply_to(replies.as_str().into()),
    )
    .await;
    env.send(&json!({"org_unit_ext_id": "BAD-ROLE", "org_unit_parent_id": 1000}))
        .await;
    let got = tap.take(2, T).await;
    let created = got
        .iter()
        .find(|e| e.routing_key == "group.created")
        .expect("a group.created");
    assert_eq!(created.body["ext_id"], json!(ext));
    assert!(got.iter().any(|e| e.routing_key == "group.create.failed"));
    worker
        .wait_line("the deferral", T, |l| l["outcome"] == "deferred")
        .await;
    env.wait_drained(1, T).await;
    wait_for("the reply", T, || async {
        (env.queue_depth(&replies).await == 1).then_some(())
    })
    .await;
    worker.stop().await;
    let errors: Vec<String> = worker
        .lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .map(|l| l.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    delete_user(&user).await;
    env.cleanup().await;
}

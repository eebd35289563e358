//! The worker as a guest in someone else's infrastructure: a Redis that may evict, a Redis
//! ACL user limited to the key prefix and the commands the worker uses, through the binary.
//! The ACL line is read from docs/deployment.md, so the docs say what the test runs.

use std::time::Duration;

use serde_json::json;

use crate::faults::{all_done_exactly_once, commands};
use crate::helpers::*;
use crate::process::{WorkerProcess, cli, json_lines, stderr, stdout};

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
    let o = cli(
        &env,
        &["check", "--no-declare"],
        &[("PROVISIONER__AMQP__URL", &url)],
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).lines().any(|l| l.starts_with("FAIL  topology")
            && l.contains("cannot verify the topology")
            && l.contains("needs the `management` tag")),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("role-secret"), "{}", stdout(&o));
    drop(worker);
    delete_user(&user).await;
    delete_user(&untagged).await;
    env.cleanup().await;
}

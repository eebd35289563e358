//! Secrets and personal data never leave the process: not in logs at any level (library
//! logs included), not in `check`, not in configuration errors, not in Redis.

use std::time::Duration;

use group_provisioner::sim::{SimAuth, SimConfig};
use serde_json::json;

use crate::helpers::*;
use crate::process::{WorkerProcess, cli, run_with_env};

const AMQP_PASSWORD: &str = "amqpSEKRIT1";
const REDIS_PASSWORD: &str = "redisSEKRIT2";
const API_PASSWORD: &str = "apiSEKRIT3";
const PHONE: &str = "+1-555-0199-7733";

fn assert_clean(what: &str, text: &str) {
    for secret in [
        AMQP_PASSWORD,
        REDIS_PASSWORD,
        API_PASSWORD,
        PHONE,
        "SEC?RET",
        "SEC/RET",
    ] {
        // As text, and as the byte list a `Debug` of a frame prints.
        let bytes = secret
            .bytes()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        assert!(!text.contains(secret), "{what} leaked {secret:?}");
        assert!(!text.contains(&bytes), "{what} leaked {secret:?} as bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_is_logged_even_at_trace() {
    let env = TestEnv::with_sim(SimConfig {
        auth: SimAuth {
            password: API_PASSWORD.into(),
            ..SimAuth::default()
        },
        ..SimConfig::default()
    })
    .await;
    let mut tap = env.event_tap().await;
    let user = unique("gp-secret");
    create_user(&user, AMQP_PASSWORD, &env.vhost).await;
    let port = free_port();
    let _redis = RedisServer::start_with(port, &["--requirepass", REDIS_PASSWORD]).await;
    let amqp = format!("amqp://{user}:{AMQP_PASSWORD}@{AMQP_HOST}/{}", env.vhost);
    let redis = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0");
    let auth_url = format!("http://{}", env.sim.addr);
    let vars = [
        ("PROVISIONER__LOG__LEVEL", "trace"),
        ("PROVISIONER__AMQP__URL", amqp.as_str()),
        ("PROVISIONER__REDIS__URL", redis.as_str()),
        ("PROVISIONER__API__AUTH", "login"),
        ("PROVISIONER__API__EMAIL", "admin@example.com"),
        ("PROVISIONER__API__PASSWORD", API_PASSWORD),
        ("PROVISIONER__API__AUTH_URL", auth_url.as_str()),
    ];
    let mut w = WorkerProcess::spawn(&env, &vars);
    w.wait_consuming().await;
    env.send(&json!({"org_unit_ext_id": "PII-1", "org_unit_name": "Private", "org_unit_parent_id": 1000, "phone_number": PHONE, "address": "1 Hidden Road"}))
        .await;
    let e = tap.next(Duration::from_secs(30)).await;
    assert_eq!(e.routing_key, "group.created", "{}", e.body);
    w.stop().await;
    let log: String = w.lines().iter().map(|l| l.to_string() + "\n").collect();
    assert!(
        w.lines()
            .iter()
            .any(|l| l["level"] == "DEBUG" && l["message"] == "convirza call"),
        "the worker's own debug lines are there: trace was on"
    );
    let chatty: Vec<_> = w
        .lines()
        .into_iter()
        .filter(|l| {
            let target = l["target"].as_str().unwrap_or("");
            let level = l["level"].as_str().unwrap_or("");
            !target.starts_with("group_provisioner") && (level == "TRACE" || level == "DEBUG")
        })
        .collect();
    assert!(
        chatty.is_empty(),
        "library logs below info: {:?}",
        chatty.first()
    );
    assert_clean("the trace log", &log);
    assert!(!log.contains("Hidden Road"));

    // `check` with the same configuration, and a unix-socket Redis URL with a password.
    let o = cli(&env, &["check"], &vars).await;
    assert_clean("check", &String::from_utf8_lossy(&o.stdout));
    assert_clean("check", &String::from_utf8_lossy(&o.stderr));
    let unix = format!("redis+unix:///tmp/redis.sock?db=0&pass={REDIS_PASSWORD}");
    let o = cli(
        &env,
        &["check"],
        &[("PROVISIONER__REDIS__URL", unix.as_str())],
    )
    .await;
    assert_clean("check (unix socket)", &String::from_utf8_lossy(&o.stdout));

    // Redis holds no trace of the phone number, not even a hash.
    let mut conn = redis::Client::open(redis.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", env.prefix))
        .query_async(&mut conn)
        .await
        .expect("keys");
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("type");
        if kind == "string" {
            let value: String = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("get");
            assert!(
                !value.contains("phone_number") && !value.contains("address"),
                "{key}: {value}"
            );
        }
    }
    delete_user(&user).await;
    env.cleanup().await;
}

#[test]
fn configuration_errors_never_echo_a_secret() {
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![(
            "PROVISIONER__AMQP__URL",
            "amqp://guest:SEC?RET@127.0.0.1:notaport/%2f".to_owned(),
        )],
        vec![(
            "PROVISIONER__REDIS__URL",
            "redis://:SEC/RET@127.0.0.1:notaport/0".to_owned(),
        )],
        vec![(
            "PROVISIONER__API__BASE_URL",
            format!("http://user:{API_PASSWORD}@api.example.com/v3"),
        )],
    ];
    for vars in cases {
        let mut env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.push(("PROVISIONER__API__TOKEN", "t"));
        let o = run_with_env(&["run"], &env);
        assert_eq!(o.status.code(), Some(2), "{vars:?} is refused");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_clean("a config error", &err);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }

    // A password holding `@` and `/` is a URL that parses (host "SEC"): what prints it
    // must still mask all of it.
    let odd = format!("amqp://guest:{AMQP_PASSWORD}@SEC/RET@127.0.0.1:5672/%2f");
    let o = run_with_env(
        &["check"],
        &[
            ("PROVISIONER__AMQP__URL", odd.as_str()),
            ("PROVISIONER__API__TOKEN", "t"),
        ],
    );
    assert_clean("check", &String::from_utf8_lossy(&o.stdout));
    assert_clean("check", &String::from_utf8_lossy(&o.stderr));

    // A TOML file whose broken line holds the token.
    let dir = std::env::temp_dir().join(unique("toml"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("broken.toml");
    std::fs::write(&file, format!("[api]\ntoken = \"{API_PASSWORD}\n")).expect("write");
    let o = run_with_env(&["--config", &file.display().to_string(), "run"], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_clean("a TOML error", &err);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("line 2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_secret_that_is_not_utf8_is_named_not_shown() {
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = std::process::Command::new(crate::process::BIN);
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir())
        .env(
            "PROVISIONER__API__TOKEN",
            std::ffi::OsStr::from_bytes(b"p\xe4ssSEKRIT"),
        );
    let o = cmd.output().expect("runs");
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("config error: api.token:"), "{err}");
    assert!(!err.contains("SEKRIT") && !err.contains("ssSE"), "{err}");
}

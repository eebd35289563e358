//! The binaries as operators run them: exit codes, messages and the worker's log.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::process::{BIN, SIM_BIN, WorkerProcess, run_with_env};

#[test]
fn bad_config_exits_2_with_one_line_naming_the_key() {
    let out = run_with_env(
        &["run"],
        &[
            ("PROVISIONER__API__TOKEN", "t"),
            ("PROVISIONER__API__TIMEOUT", "5 parsecs"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "config error: api.timeout: \"5 parsecs\" is not a duration (use e.g. 250ms, 5s, 2m, 1h, 30d)"
    );
    assert_eq!(stderr.lines().count(), 1);
}

/// A standard output or error that cannot be written (`/dev/full`) costs the text, never
/// the exit code: a command whose output is lost says so on stderr and exits 1; a lost
/// error message leaves the command's own exit code (it used to end in an abort).
#[test]
fn a_full_stdout_or_stderr_costs_the_text_not_the_exit_code() {
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full")
    };
    let bare = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(std::env::temp_dir());
        cmd
    };
    let schema = bare(&["schema", "created"])
        .stdout(full())
        .output()
        .expect("runs");
    let said = String::from_utf8_lossy(&schema.stderr);
    assert_eq!(schema.status.code(), Some(1), "{said}");
    assert!(
        said.starts_with("schema: cannot write to standard output:"),
        "{said}"
    );
    let config = bare(&["--config", "/nonexistent.toml", "check"])
        .env("PROVISIONER__API__TOKEN", "t")
        .stderr(full())
        .output()
        .expect("runs");
    assert_eq!(config.status.code(), Some(2), "{config:?}");
}

#[test]
fn config_flag_is_global_and_a_missing_file_is_an_error() {
    for args in [
        ["--config", "/nonexistent.toml", "run"],
        ["run", "--config", "/nonexistent.toml"],
    ] {
        let out = run_with_env(&args, &[("PROVISIONER__API__TOKEN", "t")]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .starts_with("config error: --config: /nonexistent.toml")
        );
    }
}

#[test]
fn missing_token_names_the_key_and_never_echoes_secrets() {
    let out = run_with_env(
        &["run"],
        &[
            ("PROVISIONER__AMQP__URL", "amqp://u:s3cr3t@h:5672/%2f"),
            ("PROVISIONER__AMQP__PREFETCH", "x"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("config error: amqp.prefetch: \"x\" is not an integer"),
        "{stderr}"
    );
    let out = run_with_env(
        &["run"],
        &[("PROVISIONER__AMQP__URL", "http://u:s3cr3t@h/")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("config error: amqp.url:"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "password echoed: {stderr}");
    let out = run_with_env(&["run"], &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("config error: api.token: is required")
    );
}

#[test]
fn help_texts_exist_with_examples() {
    let out = Command::new(BIN)
        .args(["run", "--help"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Example"));
    let out = Command::new(SIM_BIN).arg("--help").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "/_sim/faults",
        "drop_after_commit",
        "retry_after",
        "--listen",
    ] {
        assert!(text.contains(needle), "sim --help lacks {needle}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outcome_line_per_delivery_with_the_contract_fields_and_no_pii() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let mut worker = WorkerProcess::spawn(&env, &[]);
    worker.wait_consuming().await;
    let props = lapin::BasicProperties::default()
        .with_message_id("m-log-1".into())
        .with_correlation_id("c-log-1".into());
    let body = json!({"org_unit_ext_id": "LOG-1", "org_unit_name": "Logged", "org_unit_parent_id": 1000,
        "phone_number": "+1-555-0100-SECRET", "address": "42 Hidden Lane"});
    env.send_raw(body.to_string().as_bytes(), props).await;
    env.send_raw(
        b"not json",
        lapin::BasicProperties::default().with_message_id("m-log-2".into()),
    )
    .await;
    events.take(2, Duration::from_secs(20)).await;

    let outcome = worker
        .wait_line("outcome line for LOG-1", Duration::from_secs(10), |l| {
            l["message"] == "outcome" && l["ext_id"] == "LOG-1"
        })
        .await;
    assert_eq!(outcome["outcome"], "created");
    assert_eq!(outcome["message_id"], "m-log-1");
    assert_eq!(outcome["correlation_id"], "c-log-1");
    assert_eq!(outcome["attempts"], 1);
    assert_eq!(outcome["http_status"], 201);
    assert_eq!(
        outcome["org_unit_id"],
        env.sim.sim.groups_for("LOG-1")[0].org_unit_id
    );
    assert!(outcome["duration_ms"].is_u64());
    let invalid = worker
        .wait_line(
            "outcome line for the invalid one",
            Duration::from_secs(10),
            |l| l["message"] == "outcome" && l["message_id"] == "m-log-2",
        )
        .await;
    assert_eq!(invalid["outcome"], "dead_lettered");
    assert_eq!(invalid["error_kind"], "invalid_command");

    let lines = worker.lines();
    let outcomes = lines.iter().filter(|l| l["message"] == "outcome").count();
    assert_eq!(outcomes, 2, "exactly one outcome line per delivery");
    for l in lines.iter().filter(|l| l["ext_id"] == "LOG-1") {
        assert_eq!(
            l["message_id"], "m-log-1",
            "every line about the message carries its ids: {l}"
        );
        assert_eq!(l["correlation_id"], "c-log-1", "{l}");
    }

    // After the exit the whole log has been read: the check below sees every line.
    worker.stop().await;
    let lines = worker.lines();
    assert!(lines.iter().any(|l| l["message"] == "worker stopped"));
    let all = lines.iter().map(Value::to_string).collect::<String>();
    for secret in ["SECRET", "Hidden Lane", SIM_TOKEN, "guest:guest"] {
        assert!(!all.contains(secret), "{secret} leaked into the logs");
    }
    env.cleanup().await;
}

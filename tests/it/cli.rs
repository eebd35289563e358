//! The binaries as operators run them: exit codes and messages.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_group-provisioner");
const SIM_BIN: &str = env!("CARGO_BIN_EXE_convirza-sim");

fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    // Run outside the repository so config/default.toml cannot leak in.
    cmd.current_dir(std::env::temp_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("binary runs")
}

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

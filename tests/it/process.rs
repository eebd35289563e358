//! The worker binary as operators run it: logs, signals, exit codes.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_group-provisioner");

/// A worker process with its stdout collected as JSON lines.
pub struct WorkerProcess {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<Value>>>,
}

impl WorkerProcess {
    pub fn spawn(env: &TestEnv, extra_env: &[(&str, &str)]) -> WorkerProcess {
        let mut cmd = env.command(BIN);
        cmd.arg("run")
            .env("PROVISIONER__LOG__LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("worker binary starts");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        // GP_TEST_ECHO=1 echoes the worker's log lines to stderr, for debugging a test.
        let echo = std::env::var_os("GP_TEST_ECHO").is_some();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if echo {
                    eprintln!("[worker] {line}");
                }
                let value = serde_json::from_str::<Value>(&line)
                    .unwrap_or_else(|_| panic!("log line is not JSON: {line}"));
                sink.lock().expect("lines").push(value);
            }
        });
        WorkerProcess { child, lines }
    }

    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().expect("lines").clone()
    }

    pub async fn wait_line(
        &self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(what, deadline, || async {
            self.lines().into_iter().find(|l| pred(l))
        })
        .await
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// SIGTERM, and expect exit code 0 within 15 s.
    pub async fn stop(&mut self) {
        self.signal("-TERM");
        assert_eq!(
            self.wait_exit(Duration::from_secs(15)).await.code(),
            Some(0),
            "SIGTERM exits 0"
        );
    }

    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(deadline, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("worker did not exit within {deadline:?}"))
            .expect("wait")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outcome_line_per_delivery_with_the_contract_fields_and_no_pii() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let mut worker = WorkerProcess::spawn(&env, &[]);
    worker
        .wait_line("consuming", Duration::from_secs(30), |l| {
            l["message"] == "consuming"
        })
        .await;
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
    let all = lines.iter().map(Value::to_string).collect::<String>();
    for secret in ["SECRET", "Hidden Lane", SIM_TOKEN, "guest:guest"] {
        assert!(!all.contains(secret), "{secret} leaked into the logs");
    }

    worker.stop().await;
    assert!(
        worker
            .lines()
            .iter()
            .any(|l| l["message"] == "worker stopped")
    );
    env.cleanup().await;
}

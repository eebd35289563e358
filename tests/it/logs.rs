//! The log when stdout misbehaves: a closed pipe, a full device, a reader that stalls.
//! Lines that cannot be written are counted in `/metrics` and said on stderr at a bounded
//! rate; commands and `/healthz` never wait for stdout.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr};

use crate::faults::{assert_exactly_once, commands};
use crate::helpers::*;
use crate::process::BIN;

const T: Duration = Duration::from_secs(60);

/// The worker with stdout as given, stderr collected, and `/metrics` on a known port (its
/// address is normally read from the log, which these tests take away).
fn spawn(env: &TestEnv, stdout: Stdio, extra: &[(&str, &str)]) -> (Child, ChildStderr, u16) {
    let port = free_port();
    let mut cmd = env.command(BIN);
    cmd.arg("run")
        .env("PROVISIONER__METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .env("PROVISIONER__LOG__LEVEL", "info")
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("worker runs");
    let stderr = child.stderr.take().expect("stderr");
    (child, stderr, port)
}

async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

async fn lost(port: u16, reason: &str) -> f64 {
    let sample = format!("provisioner_log_lines_dropped_total{{reason=\"{reason}\"}} ");
    get(port, "/metrics")
        .await
        .and_then(|(_, text)| {
            text.lines()
                .find_map(|l| l.strip_prefix(sample.as_str())?.parse().ok())
        })
        .unwrap_or(0.0)
}

/// Wait for a stderr line containing `needle`.
async fn stderr_line(stderr: ChildStderr, needle: &str) -> String {
    let mut lines = BufReader::new(stderr).lines();
    tokio::time::timeout(T, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("stderr ended without {needle:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no stderr line with {needle:?} within {T:?}"))
}

/// stdout a closed pipe, or `/dev/full`: every command is still created, the lost lines
/// are counted, and stderr says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_stdout_refuses_are_counted_and_said_on_stderr() {
    for target in ["closed pipe", "/dev/full"] {
        let env = TestEnv::new().await;
        let mut events = env.event_tap().await;
        let stdout = if target == "/dev/full" {
            Stdio::from(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .expect("/dev/full"),
            )
        } else {
            Stdio::piped()
        };
        let (mut child, stderr, port) = spawn(&env, stdout, &[]);
        if let Some(out) = child.stdout.take() {
            drop(out);
        }
        env.wait_work_queue_consumed(T).await;
        let (bodies, exts) = commands("LOST-LOG", 20);
        env.send_many(&bodies).await;
        assert_eq!(events.take(20, T).await.len(), 20, "{target}");
        assert_exactly_once(&env, &exts);
        wait_for("lost lines in the metric", T, || async {
            (lost(port, "write_error").await >= 20.0).then_some(())
        })
        .await;
        let said = stderr_line(stderr, "could not be written to stdout").await;
        assert!(said.starts_with("log: "), "{target}: {said}");
        assert!(
            child.try_wait().expect("wait").is_none(),
            "{target}: still running"
        );
        let _ = child.kill().await;
        env.cleanup().await;
    }
}

/// A reader that stalls (stdout a pipe nobody reads): commands go on, `/healthz` answers at
/// once, and past `log.queue_lines` lines are dropped, counted and said on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_costs_lines_counted_not_the_worker_or_its_probes() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let (mut child, stderr, port) = spawn(
        &env,
        Stdio::piped(),
        &[("PROVISIONER__LOG__QUEUE_LINES", "16")],
    );
    let _unread = child.stdout.take();
    env.wait_work_queue_consumed(T).await;
    // Far more than a pipe (64 KiB) and the queue hold.
    let n = 600;
    let (bodies, exts) = commands("STALL-LOG", n);
    env.send_many(&bodies).await;
    assert_eq!(events.take(n, T).await.len(), n);
    assert_exactly_once(&env, &exts);
    let asked = Instant::now();
    let health = get(port, "/healthz").await;
    assert_eq!(health.map(|h| h.0), Some(200));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    wait_for("dropped lines in the metric", T, || async {
        (lost(port, "stalled").await > 0.0).then_some(())
    })
    .await;
    let said = stderr_line(stderr, "not read fast enough").await;
    assert!(said.starts_with("log: "), "{said}");
    let _ = child.kill().await;
    env.cleanup().await;
}

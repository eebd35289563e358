//! Our binaries as processes, the way operators run them: the worker with its log lines
//! collected, and one-shot commands with their output. Every test that starts a process
//! goes through here.

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::task::JoinHandle;

use crate::helpers::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_group-provisioner");
pub const SIM_BIN: &str = env!("CARGO_BIN_EXE_convirza-sim");

/// Settings for fault scenarios, as environment: a short lease, a quick circuit probe and
/// a short drain, so a scenario settles in seconds.
pub fn worker_env(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("PROVISIONER__DEDUP__LEASE", "2s"),
        ("PROVISIONER__CIRCUIT__COOLDOWN", "500ms"),
        ("PROVISIONER__SHUTDOWN__DRAIN_TIMEOUT", "5s"),
    ];
    v.extend_from_slice(extra);
    v
}

/// A worker process with its stdout collected as JSON lines.
pub struct WorkerProcess {
    pub child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    /// Lines that were not JSON: the collector records them instead of panicking in its
    /// own task (where a panic would not fail the test), and [`Self::lines`] fails on them.
    not_json: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl WorkerProcess {
    pub fn spawn(env: &TestEnv, extra_env: &[(&str, &str)]) -> WorkerProcess {
        let mut cmd = env.command(BIN);
        cmd.arg("run");
        WorkerProcess::start(cmd, extra_env)
    }

    /// Another long-running subcommand of the binary (`console`), its log lines collected
    /// the same way.
    pub fn spawn_args(env: &TestEnv, args: &[&str], extra_env: &[(&str, &str)]) -> WorkerProcess {
        let mut cmd = env.command(BIN);
        cmd.args(args);
        WorkerProcess::start(cmd, extra_env)
    }

    /// The worker with at most `nofile` file descriptors, as in a container with the common
    /// default of 1,024.
    pub fn spawn_with_nofile(
        env: &TestEnv,
        extra_env: &[(&str, &str)],
        nofile: u32,
    ) -> WorkerProcess {
        let mut cmd = env.command("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" run"))
            .arg(BIN);
        WorkerProcess::start(cmd, extra_env)
    }

    /// The worker with its address space limited to `kib` KiB (`ulimit -v`), as in a
    /// container with a memory limit enforced that way.
    pub fn spawn_with_address_space(
        env: &TestEnv,
        extra_env: &[(&str, &str)],
        kib: u64,
    ) -> WorkerProcess {
        let mut cmd = env.command("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -v {kib} && exec \"$0\" run"))
            .arg(BIN);
        WorkerProcess::start(cmd, extra_env)
    }

    /// The worker with its stdout connected to a pipe nobody reads yet (a stuck log
    /// shipper); the returned end starts the reading when the test wants.
    pub fn spawn_unread(env: &TestEnv) -> (tokio::process::Child, tokio::process::ChildStdout) {
        let mut cmd = env.command(BIN);
        cmd.arg("run")
            .env("PROVISIONER__LOG__LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("worker binary starts");
        let stdout = child.stdout.take().expect("stdout");
        (child, stdout)
    }

    fn start(mut cmd: tokio::process::Command, extra_env: &[(&str, &str)]) -> WorkerProcess {
        cmd.env("PROVISIONER__LOG__LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("worker binary starts");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let not_json = Arc::new(Mutex::new(Vec::new()));
        let (sink, bad) = (lines.clone(), not_json.clone());
        // GP_TEST_ECHO=1 echoes the worker's log lines to stderr, for debugging a test.
        let echo = std::env::var_os("GP_TEST_ECHO").is_some();
        let reader = tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if echo {
                    eprintln!("[worker] {line}");
                }
                match serde_json::from_str::<Value>(&line) {
                    Ok(value) => sink.lock().expect("lines").push(value),
                    Err(_) => bad.lock().expect("lines").push(line),
                }
            }
        });
        WorkerProcess {
            child,
            lines,
            not_json,
            reader: Some(reader),
        }
    }

    /// Every log line so far. Fails the test if any line was not JSON.
    pub fn lines(&self) -> Vec<Value> {
        let bad = self.not_json.lock().expect("lines").clone();
        assert!(bad.is_empty(), "log lines that are not JSON: {bad:?}");
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

    /// Wait for a line whose text field `field` (`message`, `error`) contains `text`.
    pub async fn wait_text(&self, field: &str, text: &str, deadline: Duration) -> Value {
        self.wait_line(
            &format!("a line whose {field} says {text:?}"),
            deadline,
            |l| l[field].as_str().is_some_and(|v| v.contains(text)),
        )
        .await
    }

    /// Wait until the worker logs that it consumes the work queue.
    pub async fn wait_consuming(&self) {
        self.wait_line("consuming", Duration::from_secs(30), |l| {
            l["message"] == "consuming"
        })
        .await;
    }

    /// Where the worker serves `/healthz`, `/readyz` and `/metrics` (it logs the address
    /// it bound, since the tests give it port 0).
    pub async fn metrics_addr(&self) -> SocketAddr {
        let line = self
            .wait_line("the metrics address", Duration::from_secs(30), |l| {
                l["message"] == "serving /healthz, /readyz and /metrics"
            })
            .await;
        line["listen"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no listen address in {line}"))
    }

    /// A value of the worker's `/metrics`, by its exact sample name (labels included).
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let url = format!("http://{}/metrics", self.metrics_addr().await);
        let text = reqwest::get(url).await.ok()?.text().await.ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
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

    /// Wait for the process to exit, then for its log to be read to the end, so
    /// [`Self::lines`] holds every line it wrote.
    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let status = tokio::time::timeout(deadline, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("worker did not exit within {deadline:?}"))
            .expect("wait");
        if let Some(reader) = self.reader.take() {
            tokio::time::timeout(Duration::from_secs(10), reader)
                .await
                .expect("the log was read to its end")
                .expect("the log collector did not fail");
        }
        status
    }
}

/// Run the worker binary to completion with the test's settings in its environment.
pub async fn cli(env: &TestEnv, args: &[&str], extra: &[(&str, &str)]) -> Output {
    cli_with_stdin(env, args, extra, None).await
}

/// Run an operator command and report its peak resident memory (bytes), measured by the
/// small `peak-rss` example program (a test binary cannot measure its own children).
pub async fn cli_measured(env: &TestEnv, args: &[&str]) -> (Output, u64) {
    let peak_rss = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("examples").join("peak-rss")))
        .expect("target directory");
    if !peak_rss.exists() {
        // `cargo test` builds examples; `cargo test --test integration …` does not.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let built = std::process::Command::new(cargo)
            .args(["build", "--example", "peak-rss"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(
            built.success() && peak_rss.exists(),
            "cannot build the peak-rss example"
        );
    }
    let mut cmd = env.command(&peak_rss.display().to_string());
    cmd.arg(BIN).args(args).stdin(Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("finished in time")
        .expect("peak-rss runs");
    let text = String::from_utf8_lossy(&output.stderr);
    let peak = text
        .lines()
        .filter_map(|l| l.strip_prefix("peak_rss_bytes="))
        .next_back()
        .and_then(|n| n.trim().parse().ok())
        .expect("peak-rss reports");
    (output, peak)
}

pub async fn cli_with_stdin(
    env: &TestEnv,
    args: &[&str],
    extra: &[(&str, &str)],
    stdin: Option<&str>,
) -> Output {
    let mut cmd = env.command(BIN);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("binary runs");
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("command finished within 60 s")
        .expect("output")
}

/// Run the worker binary with only `env` in its environment (no test world: for
/// configuration errors), outside the repository so `config/default.toml` cannot leak in.
/// It must exit within 30 s (a configuration that should have been refused would
/// otherwise start a worker that never stops).
pub fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("binary runs");
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("{args:?} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// `<bin> <args> --help`, which must succeed (so the subcommand exists).
pub fn help(bin: &str, args: &[&str]) -> String {
    let path = match bin {
        "group-provisioner" => BIN,
        "convirza-sim" => SIM_BIN,
        other => panic!("{other} is not one of our binaries"),
    };
    let out = std::process::Command::new(path)
        .args(args)
        .arg("--help")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{bin} {args:?} --help failed: it does not exist"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect()
}

//! Passes over the DLQ under interruption and in company: signals, a closed stdout,
//! SIGKILL, two passes at once, a DLQ that changes during a pass, and the export file.
//! Every scenario goes through the binary, on whichever broker the suite runs against.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdout};

use crate::helpers::*;
use crate::process::{BIN, cli, json_lines, stderr, stdout};

const T: Duration = Duration::from_secs(60);

/// `n` dead letters straight into the DLQ, numbered by `message_id` (`00000`, …), each with
/// the headers the worker writes (so that a header sorts after `x-delivery-count`).
async fn plant_numbered(env: &TestEnv, n: usize, padding: usize) {
    let dlq = env.settings.topology.dead_letter_queue.clone();
    let pad = "p".repeat(padding);
    let mut confirms = Vec::new();
    for i in 0..n {
        let body = json!({"org_unit_ext_id": format!("N-{i:05}"), "org_unit_name": "Team", "org_unit_parent_id": 1000, "pad": pad});
        let mut headers = lapin::types::FieldTable::default();
        for (k, v) in [
            ("x-error-kind", "rejected"),
            ("x-error-message", "parent 1000 is not active"),
            ("x-first-failed-at", "2026-01-01T00:00:00Z"),
            ("x-last-failed-at", "2026-01-01T00:00:00Z"),
            ("x-worker-version", "0.0.0-test"),
        ] {
            headers.insert(k.into(), header_value(v));
        }
        headers.insert("x-attempts".into(), lapin::types::AMQPValue::LongInt(1));
        confirms.push(
            env.channel
                .basic_publish(
                    "".into(),
                    dlq.as_str().into(),
                    lapin::options::BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    lapin::BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(format!("{i:05}").into())
                        .with_headers(headers),
                )
                .await
                .expect("publish"),
        );
        if confirms.len() == 200 {
            for c in confirms.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in confirms {
        c.await.expect("confirm");
    }
}

/// The DLQ's message ids, in queue order, read with the tool itself.
async fn order(env: &TestEnv) -> Vec<String> {
    let o = cli(env, &["dlq", "peek", "--limit", "all", "--json"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    json_lines(&o)
        .iter()
        .map(|l| l["message_id"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{i:05}")).collect()
}

/// Adjacent pairs out of order: 0 for the original order, 1 for a rotation of it.
fn inversions(ids: &[String]) -> usize {
    ids.windows(2).filter(|w| w[1] < w[0]).count()
}

/// `ids` is `expected` turned around one point (what a killed pass may leave: module
/// documentation of the reader), with nothing lost or doubled.
fn is_rotation(ids: &[String], expected: &[String]) -> bool {
    ids.len() == expected.len()
        && (ids.is_empty()
            || expected
                .iter()
                .position(|e| *e == ids[0])
                .is_some_and(|k| ids.iter().eq(expected[k..].iter().chain(&expected[..k]))))
}

/// A pipe already full: the first line written to it blocks until `reader` is read.
fn full_pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let (reader, mut writer) = std::io::pipe().expect("pipe");
    let fd = writer.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns; flags read, then set.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    // Pages first, then single bytes: not one byte of room is left.
    for size in [4096, 1] {
        let chunk = vec![b'.'; size];
        loop {
            match writer.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the pipe: {e}"),
            }
        }
    }
    // Blocking again before the tool inherits it (the flag belongs to the open file).
    unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    (reader, writer)
}

/// A tool whose stdout nobody reads yet: once the pipe is full it stops in the middle of
/// its pass, holding part of the DLQ.
struct Stalled {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Stalled {
    async fn start(env: &TestEnv, args: &[&str]) -> Stalled {
        let mut cmd = env.command(BIN);
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("binary runs");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        // One line out: the pass is under way (and stalls once the pipe is full).
        let mut first = String::new();
        tokio::time::timeout(T, stdout.read_line(&mut first))
            .await
            .expect("first line in time")
            .expect("read");
        assert!(!first.is_empty(), "the tool wrote nothing");
        Stalled { child, stdout }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Read the rest of stdout (so the tool can go on) and wait for it: (exit code,
    /// stderr).
    async fn finish(mut self) -> (Option<i32>, String) {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(T, self.stdout.read_to_end(&mut rest)).await;
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = tokio::time::timeout(T, e.read_to_string(&mut err)).await;
        }
        let status = tokio::time::timeout(T, self.child.wait())
            .await
            .expect("the tool ends")
            .expect("wait");
        (status.code(), err)
    }
}

/// Item: `dlq discard --export` removed nothing on a DLQ never read before (the letter's
/// identity changed between its first and second reading).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_ever_discard_removes_what_it_exported() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    plant_numbered(&env, 3, 0).await;
    let dir = tempdir("discard-first");
    let file = dir.join("d.jsonl");
    let o = cli(
        &env,
        &[
            "dlq",
            "discard",
            "--ext-id",
            "N-00001",
            "--export",
            file.to_str().expect("path"),
        ],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("discarded 1, kept 2"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    assert_eq!(order(&env).await, ["00000", "00002"]);
    let lines = std::fs::read_to_string(&file).expect("export");
    assert_eq!(lines.lines().count(), 1);
    env.cleanup().await;
}

/// Item: SIGINT, SIGTERM and a closed stdout end a pass cleanly, with the DLQ in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_and_a_closed_stdout_leave_the_dlq_in_order() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let n = 2_000;
    plant_numbered(&env, n, 0).await;
    let all = numbered(n);

    for (signal, args) in [
        ("-INT", &["dlq", "peek", "--limit", "all", "--json"][..]),
        ("-TERM", &["dlq", "export", "--out", "-"][..]),
        (
            "-INT",
            &["dlq", "discard", "--kind", "rejected", "--dry-run"][..],
        ),
        ("-TERM", &["dlq", "replay", "--dry-run"][..]),
    ] {
        let tool = Stalled::start(&env, args).await;
        tool.signal(signal);
        let (code, err) = tool.finish().await;
        assert_eq!(code, Some(130), "{signal} {args:?}: {err}");
        assert!(err.contains("interrupted"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        let now = order(&env).await;
        assert_eq!(inversions(&now), 0, "{signal} {args:?} reordered the DLQ");
        assert_eq!(now, all, "{signal} {args:?}");
    }

    // A reader that goes away (`| head -2`): no panic, exit 0, the DLQ in order.
    for _ in 0..2 {
        let mut tool = Stalled::start(&env, &["dlq", "peek", "--limit", "all", "--json"]).await;
        let mut second = String::new();
        tool.stdout.read_line(&mut second).await.expect("read");
        let Stalled { mut child, stdout } = tool;
        drop(stdout);
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = tokio::time::timeout(T, e.read_to_string(&mut err)).await;
        }
        let status = tokio::time::timeout(T, child.wait())
            .await
            .expect("peek ends once its stdout is closed")
            .expect("wait");
        assert_eq!(status.code(), Some(0), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(order(&env).await, all);
    }
    env.cleanup().await;
}

/// Item: passes that run at once are serialised (the second waits, and says so) instead of
/// splitting the DLQ between them and giving it back interleaved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_at_once_take_turns_and_keep_the_order() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let n = 1_000;
    plant_numbered(&env, n, 0).await;
    let all = numbered(n);

    // A pass stalled in the middle holds the DLQ; a second one waits for it, saying so.
    let stalled = Stalled::start(&env, &["dlq", "peek", "--limit", "all", "--json"]).await;
    let mut cmd = env.command(BIN);
    cmd.args(["dlq", "stats", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut waiting = cmd.spawn().expect("stats runs");
    let mut waiting_err = BufReader::new(waiting.stderr.take().expect("stderr")).lines();
    let said = tokio::time::timeout(T, waiting_err.next_line())
        .await
        .expect("stats says it waits")
        .expect("read")
        .unwrap_or_default();
    assert!(
        said.contains("waiting for another DLQ command to finish"),
        "{said}"
    );
    let (code, err) = stalled.finish().await;
    assert_eq!(code, Some(0), "{err}");
    let out = tokio::time::timeout(T, waiting.wait_with_output())
        .await
        .expect("stats ends")
        .expect("output");
    assert_eq!(out.status.code(), Some(0));
    let stats: Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    assert_eq!(stats["count"], n);
    assert_eq!(stats["by_kind"]["rejected"], n, "{stats}");

    // Many at once: each sees the whole DLQ, and the order survives.
    let mut runs = Vec::new();
    for i in 0..6 {
        let args: &[&str] = if i % 2 == 0 {
            &["dlq", "stats", "--json"]
        } else {
            &["dlq", "peek", "--limit", "1", "--json"]
        };
        runs.push(cli(&env, args, &[]));
    }
    for o in futures_util::future::join_all(runs).await {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let first = &json_lines(&o)[0];
        match first.get("count") {
            Some(count) => assert_eq!(*count, n, "{first}"),
            None => assert_eq!(first["message_id"], "00000", "{first}"),
        }
    }
    assert_eq!(order(&env).await, all);
    env.cleanup().await;
}

/// Item: a discard beside a loop of `dlq stats` removes exactly what it exported, and says
/// so truthfully; a pass whose DLQ shrinks under it (another consumer) fails, non-zero,
/// with the same words as `dlq export`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_does_not_see_the_whole_dlq_says_so() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let n = 600;
    plant_numbered(&env, n, 0).await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    let dir = tempdir("discard-company");
    let file = dir.join("y.jsonl");

    let looping = {
        let mut cmd = env.command("sh");
        cmd.arg("-c")
            .arg("for i in 1 2 3 4 5 6 7 8; do \"$0\" dlq stats --json >/dev/null 2>&1; done")
            .arg(BIN)
            .kill_on_drop(true);
        cmd.spawn().expect("stats loop")
    };
    let o = cli(
        &env,
        &[
            "dlq",
            "discard",
            "--ext-id",
            "N-00300",
            "--export",
            file.to_str().expect("path"),
            "--json",
        ],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let summary: Value = serde_json::from_str(stdout(&o).trim()).expect("summary");
    assert_eq!(summary["discarded"], 1, "{summary}");
    assert_eq!(summary["kept"], n - 1, "{summary}");
    let exported = std::fs::read_to_string(&file).expect("export");
    assert_eq!(exported.lines().count(), 1);
    assert!(exported.contains("N-00300"));
    let _ = looping.wait_with_output().await;
    assert_eq!(env.queue_depth(&dlq).await, n as u32 - 1);

    // Another consumer takes letters while an export is stalled in the middle: the export
    // ends non-zero and says the DLQ changed.
    let stalled = Stalled::start(&env, &["dlq", "export", "--out", "-"]).await;
    let mut taken = 0;
    while taken < 20 {
        match env
            .channel
            .basic_get(
                dlq.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
            .expect("basic_get")
        {
            Some(m) => {
                m.delivery
                    .ack(lapin::options::BasicAckOptions::default())
                    .await
                    .expect("ack");
                taken += 1;
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let (code, err) = stalled.finish().await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the DLQ changed during the export"), "{err}");
    assert_eq!(
        env.queue_depth(&dlq).await,
        n as u32 - 21,
        "nothing else lost"
    );
    env.cleanup().await;
}

/// Item: a pass killed with SIGKILL loses nothing, and what it does to the order is what
/// docs/operations.md says: a rotation at most (what it had read moves behind the rest),
/// never a shuffle; a DLQ never read before keeps its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pass_loses_nothing_and_at_most_rotates_the_dlq() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let n = 2_000;
    plant_numbered(&env, n, 0).await;
    let all = numbered(n);
    let dlq = env.settings.topology.dead_letter_queue.clone();

    // Never read before: a kill in the middle keeps the order.
    let tool = Stalled::start(&env, &["dlq", "peek", "--limit", "all", "--json"]).await;
    tool.signal("-KILL");
    let _ = tool.finish().await;
    wait_for("the killed pass's letters back", T, || async {
        (env.queue_depth(&dlq).await == n as u32).then_some(())
    })
    .await;
    let mut expected = all.clone();
    assert_eq!(order(&env).await, expected);

    // Killed once it holds the whole DLQ (it blocks on a full stdout at the last letter):
    // every letter comes back in order.
    for round in 0..2 {
        let (reader, writer) = full_pipe();
        let mut cmd = env.command(BIN);
        cmd.args(["dlq", "replay", "--dry-run", "--ext-id", "N-01999"])
            .stdout(Stdio::from(writer))
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("replay runs");
        wait_for("the pass to hold every letter", T, || async {
            (env.queue_depth(&dlq).await == 0).then_some(())
        })
        .await;
        child.start_kill().expect("SIGKILL");
        let _ = child.wait().await;
        drop(reader);
        wait_for("the killed pass's letters back", T, || async {
            (env.queue_depth(&dlq).await == n as u32).then_some(())
        })
        .await;
        let now = order(&env).await;
        assert_eq!(
            inversions(&now),
            0,
            "round {round}: a pass killed holding the whole DLQ reordered it"
        );
        assert_eq!(now, expected);
    }

    // Read before: each kill in the middle at most rotates it.
    for round in 0..3 {
        let tool = Stalled::start(&env, &["dlq", "export", "--out", "-"]).await;
        tool.signal("-KILL");
        let _ = tool.finish().await;
        wait_for("the killed pass's letters back", T, || async {
            (env.queue_depth(&dlq).await == n as u32).then_some(())
        })
        .await;
        // The next pass says what the killed one may have done.
        let o = cli(&env, &["dlq", "stats"], &[]).await;
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("a `dlq export` pass")
                && stderr(&o).contains("now follow the others"),
            "{}",
            stderr(&o)
        );
        let now = order(&env).await;
        assert!(
            is_rotation(&now, &expected),
            "round {round}: not a rotation ({} inversions)",
            inversions(&now)
        );
        expected = now;
    }
    // And `check` reports it (a warning, not a failure).
    let o = cli(&env, &["check"], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("WARN  dlq") && l.contains("ended without giving")),
        "{}",
        stdout(&o)
    );
    env.cleanup().await;
}

/// Item: an export never replaces a file (a second discard into the same file destroyed
/// the first one's copy), a discard that matches nothing writes no file, and temporary
/// files do not outlive their command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_never_replace_a_file_and_leave_no_temporary_file() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    plant_numbered(&env, 3, 0).await;
    let dir = tempdir("exports");
    let file = dir.join("d.jsonl");
    let path = file.to_str().expect("path");

    let o = cli(
        &env,
        &["dlq", "discard", "--ext-id", "N-00000", "--export", path],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let first = std::fs::read_to_string(&file).expect("first copy");
    assert!(first.contains("N-00000"));

    // The same file again: refused, the first copy intact, nothing removed.
    let o = cli(
        &env,
        &["dlq", "discard", "--ext-id", "N-00001", "--export", path],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("never replaces"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&file).expect("copy"), first);
    let o = cli(&env, &["dlq", "export", "--out", path], &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&file).expect("copy"), first);
    assert_eq!(order(&env).await, ["00001", "00002"]);

    // Nothing matches: no file at all.
    let none = dir.join("none.jsonl");
    let o = cli(
        &env,
        &[
            "dlq",
            "discard",
            "--ext-id",
            "NOBODY",
            "--export",
            none.to_str().expect("path"),
        ],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!none.exists(), "an empty export was written");

    // A temporary file a killed export left is removed by the next export there; one that
    // a live export still writes (it holds its lock) is kept.
    use std::os::unix::fs::PermissionsExt;
    let stale = dir.join(format!(".old.jsonl.gp-export-{}.tmp", "0".repeat(32)));
    std::fs::write(&stale, "{\"phone_number\":\"+15550100\"}\n").expect("stale");
    // One an earlier version left (no mark; owner-only JSON lines), and another tool's
    // file of the same shape, which is not ours to remove.
    let earlier = dir.join(format!(".older.jsonl.{}.tmp", "2".repeat(32)));
    std::fs::write(&earlier, "{\"ext_id\":\"X\"}\n").expect("earlier");
    std::fs::set_permissions(&earlier, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let foreign = dir.join(format!(".notes.{}.tmp", "3".repeat(32)));
    std::fs::write(&foreign, "draft").expect("foreign");
    let live = dir.join(format!(".live.jsonl.gp-export-{}.tmp", "1".repeat(32)));
    let live_file = std::fs::File::create(&live).expect("live");
    live_file.try_lock().expect("lock");
    let o = cli(
        &env,
        &[
            "dlq",
            "export",
            "--out",
            dir.join("e.jsonl").to_str().expect("path"),
        ],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stale.exists(), "a stale temporary file stayed");
    assert!(
        !earlier.exists(),
        "an earlier version's stale temporary file stayed"
    );
    assert!(foreign.exists(), "another tool's file was removed");
    assert!(live.exists(), "a live export's temporary file was removed");
    drop(live_file);

    // SIGINT during an export to a file: its temporary file goes too.
    plant_numbered(&env, 3_000, 2_000).await;
    let mut cmd = env.command(BIN);
    let out = dir.join("interrupted.jsonl");
    cmd.args(["dlq", "export", "--out", out.to_str().expect("path")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("export runs");
    let pid = child.id().expect("pid").to_string();
    let tmp_exists = || {
        std::fs::read_dir(&*dir).expect("dir").flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".interrupted.jsonl.")
        })
    };
    wait_for("the export's temporary file", T, || async {
        tmp_exists().then_some(())
    })
    .await;
    // Frozen, signalled, thawed: the signal is handled in the middle of the pass.
    for signal in ["-STOP", "-INT", "-CONT"] {
        let s = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(s.success());
    }
    let o = tokio::time::timeout(T, child.wait_with_output())
        .await
        .expect("export ends")
        .expect("output");
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        !tmp_exists(),
        "the interrupted export left its temporary file"
    );
    assert!(!out.exists());
    env.cleanup().await;
}

//! `group-provisioner console`, through the binary against the suite's broker and Redis:
//! logins and roles, CSRF and origins, sessions that end, actions previewed then run once
//! (also when two operators confirm the same letters at once), the replay limit, unrouted
//! events — and, in a real headless Chromium over WebDriver, an operator's whole night
//! with screenshots of each page (`browser_…`).

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

use crate::helpers::*;
use crate::ops::dlq_order;
use crate::process::WorkerProcess;

pub const T: Duration = Duration::from_secs(60);
pub const OPERATOR_PASSWORD: &str = "operator-password-5f2c";
pub const VIEWER_PASSWORD: &str = "viewer-password-9a1e";

/// A console process on port 0, with both roles and an export directory of its own.
pub struct ConsoleProcess {
    pub process: WorkerProcess,
    pub base: String,
    pub exports: TempDir,
}

impl ConsoleProcess {
    pub async fn start(env: &TestEnv, extra: &[(&str, &str)]) -> ConsoleProcess {
        let exports = tempdir("console-exports");
        let dir = exports.display().to_string();
        let mut vars: Vec<(&str, &str)> = vec![
            ("PROVISIONER__CONSOLE__LISTEN", "127.0.0.1:0"),
            ("PROVISIONER__CONSOLE__OPERATOR_PASSWORD", OPERATOR_PASSWORD),
            ("PROVISIONER__CONSOLE__VIEWER_PASSWORD", VIEWER_PASSWORD),
            ("PROVISIONER__CONSOLE__EXPORT_DIR", &dir),
        ];
        vars.extend_from_slice(extra);
        let process = WorkerProcess::spawn_args(env, &["console"], &vars);
        let line = process.wait_text("message", "console: listening", T).await;
        let listen = line["listen"].as_str().expect("listen address").to_owned();
        ConsoleProcess {
            process,
            base: format!("http://{listen}"),
            exports,
        }
    }

    /// The audit lines of one kind (`action`, `login`, `refused`, …) once there are at
    /// least `n` of them (the log is read as the process writes it).
    pub async fn audit(&self, kind: &str, n: usize) -> Vec<Value> {
        wait_for(&format!("{n} audit lines {kind:?}"), T, || async {
            let lines: Vec<Value> = self
                .process
                .lines()
                .into_iter()
                .filter(|l| l["audit"] == kind)
                .collect();
            (lines.len() >= n).then_some(lines)
        })
        .await
    }
}

/// One logged-in browser-less user: the session cookie and the page's CSRF token.
pub struct Login {
    pub http: reqwest::Client,
    base: String,
    pub cookie: String,
    pub csrf: String,
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// A form body, as a browser sends it.
pub fn form(request: reqwest::RequestBuilder, pairs: &[(&str, &str)]) -> reqwest::RequestBuilder {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    request
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
}

/// `value` of the first `name="…" value="…"` input in `html`.
pub fn field(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\" value=\""))?;
    let rest = &html[at + name.len() + 15..];
    rest.split('"').next().map(str::to_owned)
}

impl Login {
    pub async fn new(base: &str, user: &str, password: &str) -> Login {
        let http = http();
        let r = form(
            http.post(format!("{base}/login")),
            &[("user", user), ("password", password)],
        )
        .send()
        .await
        .expect("login");
        assert_eq!(r.status().as_u16(), 303, "login as {user}");
        let cookie = r
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .expect("a session cookie")
            .to_owned();
        let mut login = Login {
            http,
            base: base.to_owned(),
            cookie,
            csrf: String::new(),
        };
        let (status, page) = login.get("/story").await;
        assert_eq!(status, 200, "{page}");
        login.csrf = field(&page, "csrf").expect("a CSRF token on the page");
        login
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .expect("GET");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> (u16, String) {
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie);
        let r = form(request, fields).send().await.expect("POST");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// Preview `action` (a button's `do`) with `fields`: the plan id, if anything matched.
    pub async fn preview(&self, action: &str, fields: &[(&str, &str)]) -> (u16, String) {
        let mut all = vec![("csrf", self.csrf.as_str()), ("do", action)];
        all.extend_from_slice(fields);
        self.post("/actions/preview", &all).await
    }

    pub async fn run(&self, plan: &str) -> (u16, String) {
        self.post("/actions/run", &[("csrf", &self.csrf), ("plan", plan)])
            .await
    }
}

/// A dead letter to plant: its ext id, kind, and headers beyond the usual ones.
pub struct Letter {
    pub kind: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, AMQPValue)>,
}

impl Letter {
    pub fn new(ext_id: &str, kind: &str) -> Letter {
        Letter {
            kind: kind.to_owned(),
            body: json!({"org_unit_ext_id": ext_id, "org_unit_name": format!("Team {ext_id}"), "org_unit_parent_id": 1000})
                .to_string()
                .into_bytes(),
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: AMQPValue) -> Letter {
        self.headers.push((name.to_owned(), value));
        self
    }
}

/// `n` letters `<prefix>-0000`, … of the kind `kind(i)` gives.
pub fn letters(prefix: &str, n: usize, kind: impl Fn(usize) -> &'static str) -> Vec<Letter> {
    (0..n)
        .map(|i| Letter::new(&format!("{prefix}-{i:04}"), kind(i)))
        .collect()
}

/// Dead letters straight into the DLQ, in order, with the headers the worker writes.
pub async fn plant(env: &TestEnv, letters: &[Letter]) {
    env.declare_topology().await;
    let dlq = env.settings.topology.dead_letter_queue.clone();
    let mut confirms = Vec::new();
    for l in letters {
        let mut headers = FieldTable::default();
        for (k, v) in [
            ("x-error-kind", l.kind.as_str()),
            ("x-error-message", "parent 1000 is not active"),
            ("x-first-failed-at", "2026-01-01T00:00:00Z"),
            ("x-last-failed-at", "2026-01-01T00:00:00Z"),
        ] {
            headers.insert(k.into(), header_value(v));
        }
        headers.insert("x-attempts".into(), AMQPValue::LongInt(2));
        headers.insert("x-http-status".into(), header_value("422"));
        for (k, v) in &l.headers {
            headers.insert(k.as_str().into(), v.clone());
        }
        let confirm = env
            .channel
            .basic_publish(
                "".into(),
                dlq.as_str().into(),
                BasicPublishOptions::default(),
                &l.body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_headers(headers),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        confirm.await.expect("confirm");
    }
}

/// Take every message from `queue` (acked): their ext ids, in order.
async fn take_all(env: &TestEnv, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = env
        .channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let body: Value = serde_json::from_slice(&m.delivery.data).unwrap_or(Value::Null);
        out.push(body["org_unit_ext_id"].as_str().unwrap_or("?").to_owned());
    }
    out
}

fn cli_env(env: &TestEnv) -> tokio::process::Command {
    env.command(crate::process::BIN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_does_not_start_without_credentials_or_on_a_wide_address_without_them() {
    let env = TestEnv::new().await;
    // (arguments, environment, the key the error names)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        (&["console"], &[], "console.operator_password"),
        (
            &["console", "--no-auth"],
            &[("PROVISIONER__CONSOLE__LISTEN", "0.0.0.0:0")],
            "console.listen",
        ),
        (
            &["console"],
            &[("PROVISIONER__CONSOLE__OPERATOR_PASSWORD", "tiny-pw9")],
            "console.operator_password",
        ),
        (
            &["console"],
            &[
                ("PROVISIONER__CONSOLE__OPERATOR_PASSWORD", OPERATOR_PASSWORD),
                ("PROVISIONER__CONSOLE__VIEWER_USER", "operator"),
            ],
            "console.viewer_user",
        ),
    ];
    for (args, vars, key) in cases {
        let mut cmd = cli_env(&env);
        cmd.args(args)
            .env("PROVISIONER__CONSOLE__LISTEN", "127.0.0.1:0");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(T, cmd.output())
            .await
            .expect("the console stops at once")
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {vars:?}: {stderr}");
        assert!(
            stderr.contains(&format!("config error: {key}:")),
            "{args:?} {vars:?}: {stderr}"
        );
        assert!(
            !stderr.contains("tiny-pw9"),
            "a password is never quoted: {stderr}"
        );
    }
    // On loopback, --no-auth opens it to whoever reaches it: every page, no login.
    env.declare_topology().await;
    let exports = tempdir("console-open");
    let dir = exports.display().to_string();
    let open = WorkerProcess::spawn_args(
        &env,
        &["console", "--no-auth"],
        &[
            ("PROVISIONER__CONSOLE__LISTEN", "127.0.0.1:0"),
            ("PROVISIONER__CONSOLE__EXPORT_DIR", &dir),
        ],
    );
    let line = open.wait_text("message", "console: listening", T).await;
    let base = format!("http://{}", line["listen"].as_str().expect("address"));
    let r = http()
        .get(format!("{base}/letters"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        open.lines().iter().any(|l| l["level"] == "WARN"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("--no-auth"))),
        "the open console says so"
    );
    env.cleanup().await;
}

/// Hostile `Cookie` headers: only the session's own id, as the console set it, opens a
/// page; a quoted, padded, empty, oversized or non-UTF-8 one is no session, and a valid id
/// among other cookies (in any order, in several headers) still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_session_cookie_as_set_opens_a_page() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let console = ConsoleProcess::start(&env, &[]).await;
    let op = Login::new(&console.base, "operator", OPERATOR_PASSWORD).await;
    let id = op
        .cookie
        .strip_prefix("gp_console=")
        .expect("the session cookie")
        .to_owned();
    let status = |cookies: Vec<Vec<u8>>| {
        let (base, id) = (console.base.clone(), id.clone());
        async move {
            let mut request = http().get(format!("{base}/letters"));
            for c in cookies {
                let value = reqwest::header::HeaderValue::from_bytes(&c).expect("header value");
                request = request.header("cookie", value);
            }
            let r = request.send().await.expect("answer");
            (r.status().as_u16(), id)
        }
    };
    for opens in [
        vec![format!("gp_console={id}").into_bytes()],
        vec![format!("theme=dark; gp_console={id}; lang=en").into_bytes()],
        vec![
            b"theme=dark".to_vec(),
            format!("gp_console={id}").into_bytes(),
        ],
    ] {
        assert_eq!(status(opens.clone()).await.0, 200, "{opens:?}");
    }
    let big = "x".repeat(6_000);
    for refused in [
        vec![format!("gp_console=\"{id}\"").into_bytes()],
        vec![format!("gp_console={id}x").into_bytes()],
        vec![b"gp_console=".to_vec()],
        vec![format!("gp_console={big}").into_bytes()],
        vec![b"gp_console=\xff\xfe".to_vec()],
        vec![format!("GP_CONSOLE={id}").into_bytes()],
    ] {
        assert_eq!(status(refused.clone()).await.0, 303, "{refused:?}");
    }
    drop(console);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_looks_and_every_action_is_refused_to_them() {
    let env = TestEnv::new().await;
    plant(&env, &letters("V", 3, |_| "rejected")).await;
    let console = ConsoleProcess::start(&env, &[]).await;
    let viewer = Login::new(&console.base, "viewer", VIEWER_PASSWORD).await;
    let (status, page) = viewer.get("/letters").await;
    assert_eq!(status, 200);
    assert!(page.contains("3 of 3 dead letters match"), "{page}");
    assert!(
        !page.contains("name=\"id\""),
        "no selection boxes for a viewer"
    );
    assert!(
        !page.contains("Replay all"),
        "no action buttons for a viewer"
    );
    let (status, page) = viewer.preview("replay-all", &[]).await;
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("only an operator may"), "{page}");
    let (status, _) = viewer.run("anything").await;
    assert_eq!(status, 403);
    let (status, _) = viewer.get("/exports/discard-x.jsonl").await;
    assert_eq!(status, 403);
    assert_eq!(
        env.queue_depth(&env.settings.topology.dead_letter_queue)
            .await,
        3
    );
    let refused = console.audit("refused", 3).await;
    assert!(refused.iter().all(|l| l["user"] == "viewer"), "{refused:?}");
    // A wrong password: refused, said in the log with the user, and no session.
    let r = form(
        http().post(format!("{}/login", console.base)),
        &[("user", "operator"), ("password", VIEWER_PASSWORD)],
    )
    .send()
    .await
    .expect("login");
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let refused_logins = console.audit("login_refused", 1).await;
    assert_eq!(refused_logins.len(), 1, "{refused_logins:?}");
    assert_eq!(refused_logins[0]["user"], "operator");
    drop(console);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_need_the_session_s_csrf_token_and_this_origin_and_sessions_end() {
    let env = TestEnv::new().await;
    plant(&env, &[Letter::new("C-1", "rejected")]).await;
    let console = ConsoleProcess::start(&env, &[("PROVISIONER__CONSOLE__SESSION_TTL", "3s")]).await;
    let operator = Login::new(&console.base, "operator", OPERATOR_PASSWORD).await;
    let other = Login::new(&console.base, "operator", OPERATOR_PASSWORD).await;
    assert_ne!(operator.csrf, other.csrf, "each session has its own token");
    for csrf in ["", "0", other.csrf.as_str()] {
        let (status, page) = operator
            .post("/actions/preview", &[("csrf", csrf), ("do", "discard-all")])
            .await;
        assert_eq!(status, 403, "csrf {csrf:?}: {page}");
    }
    let cross = form(
        http()
            .post(format!("{}/actions/preview", console.base))
            .header("cookie", &operator.cookie)
            .header("origin", "http://evil.example"),
        &[("csrf", operator.csrf.as_str()), ("do", "discard-all")],
    )
    .send()
    .await
    .expect("POST");
    assert_eq!(cross.status().as_u16(), 403);
    // DNS rebinding: another site's name for this address gets nothing, not even a page
    // with a CSRF token on it.
    let rebound = http()
        .get(format!("{}/letters", console.base))
        .header("cookie", &operator.cookie)
        .header("host", "rebind.evil.example:80")
        .send()
        .await
        .expect("GET");
    assert_eq!(rebound.status().as_u16(), 421);
    let port = console.base.rsplit(':').next().expect("port");
    let local = http()
        .get(format!("{}/letters", console.base))
        .header("cookie", &operator.cookie)
        .header("host", format!("localhost:{port}"))
        .send()
        .await
        .expect("GET");
    assert_eq!(
        local.status().as_u16(),
        200,
        "localhost is this loopback console"
    );
    // A page far past the end is the last page, not a crash.
    let (status, page) = operator.get("/letters?page=400000000000000000").await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Page 1 of 1"), "{page}");
    // Security headers on every answer, the login page and a 404 included.
    for path in ["/", "/login", "/letters", "/nowhere", "/assets/console.js"] {
        let r = http()
            .get(format!("{}{path}", console.base))
            .header("cookie", &operator.cookie)
            .send()
            .await
            .expect("GET");
        let h = r.headers();
        let csp = h
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{path}: {csp}"
        );
        assert_eq!(
            h.get("x-frame-options").map(|v| v.as_bytes()),
            Some(&b"DENY"[..]),
            "{path}"
        );
        assert_eq!(
            h.get("referrer-policy").map(|v| v.as_bytes()),
            Some(&b"same-origin"[..]),
            "{path}"
        );
    }
    assert_eq!(
        env.queue_depth(&env.settings.topology.dead_letter_queue)
            .await,
        1,
        "nothing was acted on"
    );
    // The session ends after console.session_ttl: the next page asks for a login again,
    // and says why.
    let location = wait_for("the session to expire", Duration::from_secs(20), || async {
        let r = http()
            .get(format!("{}/letters", console.base))
            .header("cookie", &operator.cookie)
            .send()
            .await
            .expect("GET");
        (r.status().as_u16() == 303).then(|| {
            r.headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        })
    })
    .await;
    assert_eq!(location, "/login?expired=1");
    let (status, _) = operator.get("/").await;
    assert_eq!(status, 303, "an ended session stays ended");
    drop(console);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_confirming_the_same_letters_move_each_of_them_once() {
    let env = TestEnv::new().await;
    let kinds = ["retries_exhausted", "rejected", "rejected"];
    plant(&env, &letters("TWO", 30, |i| kinds[i % 3])).await;
    let before = dlq_order(&env).await;
    let console = ConsoleProcess::start(&env, &[]).await;
    let a = Login::new(&console.base, "operator", OPERATOR_PASSWORD).await;
    let b = Login::new(&console.base, "operator", OPERATOR_PASSWORD).await;
    let (status, page_a) = a.preview("replay-all", &[("kind", "rejected")]).await;
    assert_eq!(status, 200, "{page_a}");
    assert!(page_a.contains("Replay 20 dead letters"), "{page_a}");
    let (_, page_b) = b.preview("replay-all", &[("kind", "rejected")]).await;
    let (plan_a, plan_b) = (
        field(&page_a, "plan").expect("plan"),
        field(&page_b, "plan").expect("plan"),
    );
    // Both confirm at the same moment.
    let ((sa, ra), (sb, rb)) = tokio::join!(a.run(&plan_a), b.run(&plan_b));
    assert_eq!((sa, sb), (200, 200), "{ra}\n{rb}");
    let actions = console.audit("action", 2).await;
    assert_eq!(actions.len(), 2, "{actions:?}");
    let moved: u64 = actions
        .iter()
        .map(|l| l["count"].as_u64().unwrap_or(99))
        .sum();
    assert_eq!(
        moved, 20,
        "each letter moved once between the two: {actions:?}"
    );
    assert!(
        actions
            .iter()
            .all(|l| l["user"] == "operator" && l["filter"] == "kind=rejected")
    );
    // No worker runs: the work queue holds what was replayed, each ext id once.
    let replayed = take_all(&env, &env.settings.topology.work_queue).await;
    let unique: BTreeSet<&String> = replayed.iter().collect();
    assert_eq!((replayed.len(), unique.len()), (20, 20), "{replayed:?}");
    // The rest stays, in its order.
    let kept: Vec<String> = before
        .iter()
        .filter(|e| !unique.contains(e))
        .cloned()
        .collect();
    assert_eq!(dlq_order(&env).await, kept);
    // The same confirmation again does nothing.
    let (status, page) = a.run(&plan_a).await;
    assert_eq!(status, 409, "{page}");
    assert!(page.contains("already ran"), "{page}");
    assert_eq!(console.audit("action", 2).await.len(), 2);
    drop(console);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_limit_holds_in_the_console_and_unrouted_events_are_replayed() {
    let env = TestEnv::new().await;
    plant(
        &env,
        &[
            Letter::new("LIM-1", "rejected").header("x-replay-count", AMQPValue::LongInt(5)),
            Letter::new("LIM-2", "rejected"),
        ],
    )
    .await;
    // Two events nobody is bound for: kept in the unrouted-events queue.
    for ext in ["UNR-1", "UNR-2"] {
        let mut h = FieldTable::default();
        h.insert("ext_id".into(), header_value(ext));
        env.channel
            .basic_publish(
                env.settings.topology.event_exchange.as_str().into(),
                "group.created".into(),
                BasicPublishOptions::default(),
                json!({"org_unit_ext_id": ext}).to_string().as_bytes(),
                BasicProperties::default().with_headers(h),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let unrouted = env.settings.topology.unrouted_events.clone();
    wait_for("2 unrouted events", T, || async {
        (env.queue_depth(&unrouted).await == 2).then_some(())
    })
    .await;
    let console = ConsoleProcess::start(&env, &[]).await;
    let op = Login::new(&console.base, "operator", OPERATOR_PASSWORD).await;
    let (_, overview) = op.get("/").await;
    assert!(
        overview.contains("<strong>2</strong> events wait"),
        "{overview}"
    );
    let (_, page) = op.preview("replay-all", &[]).await;
    assert!(page.contains("Replay 2 dead letters"), "{page}");
    assert!(
        page.contains("<strong>1</strong> of them were replayed 5 times"),
        "{page}"
    );
    let (_, done) = op.run(&field(&page, "plan").expect("plan")).await;
    assert!(done.contains("Replayed <strong>1</strong> of 2"), "{done}");
    assert_eq!(
        dlq_order(&env).await,
        ["LIM-1"],
        "the letter at the limit stays"
    );
    // Unrouted events: bind a queue, then replay them from the console.
    let bound = env.event_queue("group.created").await;
    let (_, page) = op.preview("replay-unrouted", &[]).await;
    assert!(page.contains("Replay 2 unrouted events"), "{page}");
    let (_, done) = op.run(&field(&page, "plan").expect("plan")).await;
    assert!(done.contains("Replayed <strong>2</strong> of 2"), "{done}");
    assert_eq!(take_all(&env, &bound).await, ["UNR-1", "UNR-2"]);
    assert_eq!(env.queue_depth(&unrouted).await, 0);
    drop(console);
    env.cleanup().await;
}

/// Behind a TLS proxy that sends its own `Host` (`console.public_url`): forms from that
/// origin are accepted, the session cookie is `Secure`, and refused logins, however many
/// come at once, are answered one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_tls_proxy_forms_work_and_cookies_are_secure() {
    let env = TestEnv::new().await;
    plant(&env, &[Letter::new("PROXY-1", "rejected")]).await;
    let console = ConsoleProcess::start(
        &env,
        &[(
            "PROVISIONER__CONSOLE__PUBLIC_URL",
            "https://dlq.example.com",
        )],
    )
    .await;
    let base = &console.base;
    let login = form(
        http()
            .post(format!("{base}/login"))
            .header("origin", "https://dlq.example.com"),
        &[("user", "operator"), ("password", OPERATOR_PASSWORD)],
    )
    .send()
    .await
    .expect("login");
    assert_eq!(login.status().as_u16(), 303);
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    // The proxy's own host name is served too.
    let page = http()
        .get(format!("{base}/letters"))
        .header("host", "dlq.example.com")
        .header("cookie", cookie.split(';').next().unwrap_or_default())
        .send()
        .await
        .expect("GET");
    assert_eq!(page.status().as_u16(), 200);
    // Four wrong passwords at once take at least four refusal delays.
    let started = std::time::Instant::now();
    let attempts = (0..4).map(|_| {
        form(
            http().post(format!("{base}/login")),
            &[("user", "operator"), ("password", "not-the-password")],
        )
        .send()
    });
    let answers = futures_util::future::join_all(attempts).await;
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|r| r.status().as_u16() == 401))
    );
    assert!(
        started.elapsed() >= Duration::from_millis(4 * 500 - 50),
        "refused logins are answered one at a time: {:?}",
        started.elapsed()
    );
    drop(console);
    env.cleanup().await;
}

/// An operator whose browser goes away while an action runs: the action runs to its end
/// and is written to the audit log all the same; a page left while it loads leaves the
/// DLQ whole and in order (a pass cut short would give back what it read behind what it
/// had not read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_a_page_or_an_action_midway_costs_nothing() {
    let env = TestEnv::new().await;
    let kinds = ["rejected", "retries_exhausted"];
    plant(&env, &letters("GONE", 3000, |i| kinds[i % 2])).await;
    let before = dlq_order(&env).await;
    assert_eq!(before.len(), 3000);
    let console = ConsoleProcess::start(&env, &[]).await;
    let op = Login::new(&console.base, "operator", OPERATOR_PASSWORD).await;
    let gone = op
        .http
        .get(format!("{}/letters", console.base))
        .header("cookie", &op.cookie)
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(
        gone.is_err(),
        "the page answered within 200 ms: the test proves nothing"
    );
    assert_eq!(dlq_order(&env).await, before, "after a page left midway");
    let (_, page) = op.preview("discard-all", &[("kind", "rejected")]).await;
    let plan = field(&page, "plan").expect("plan");
    let request = op
        .http
        .post(format!("{}/actions/run", console.base))
        .header("cookie", &op.cookie)
        .timeout(Duration::from_millis(200));
    let gone = form(request, &[("csrf", &op.csrf), ("plan", &plan)])
        .send()
        .await;
    assert!(
        gone.is_err(),
        "the action answered within 200 ms: the test proves nothing"
    );
    let audit = console.audit("action", 1).await;
    assert_eq!(audit[0]["count"], 1500, "{audit:?}");
    let export = audit[0]["export"]
        .as_str()
        .expect("the export's name")
        .to_owned();
    let kept: Vec<String> = before.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(dlq_order(&env).await, kept);
    // The export is listed for the operator, who never saw the result page.
    let (status, listing) = op.get("/exports").await;
    assert_eq!(status, 200);
    assert!(listing.contains(&export), "{listing}");
    drop(console);
    env.cleanup().await;
}

/// A hostile publisher's odd properties and header names reach the pages inert, and a
/// Redis that goes away, then comes back empty, costs the console only what it says: the
/// story page says the store cannot be read, a replay still moves its letters, and the
/// story of an ext id the empty store forgot is "unknown".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_properties_render_inert_and_a_lost_redis_costs_only_the_story() {
    let env = TestEnv::new().await;
    env.declare_topology().await;
    let mut redis = RedisServer::start(stable_port()).await;
    let mut nested = FieldTable::default();
    nested.insert(
        "<script>".into(),
        header_value("<img src=x onerror=alert(1)>"),
    );
    for (i, ext) in ["ODD-1", "ODD-2"].iter().enumerate() {
        let mut h = FieldTable::default();
        h.insert("x-error-kind".into(), header_value("rejected"));
        h.insert("<b>bold-name</b>".into(), header_value("v"));
        h.insert(
            "esc-\u{1b}[2J-name".into(),
            header_value("\u{1b}]0;owned\u{7}"),
        );
        h.insert(
            "bytes".into(),
            AMQPValue::ByteArray(vec![0xff, 0x00, b'<', b'b', b'>'].into()),
        );
        h.insert("nested".into(), AMQPValue::FieldTable(nested.clone()));
        h.insert("float".into(), AMQPValue::Double(-0.0));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("\u{1b}]0;x\u{7}<b>m{i}</b>").into())
            .with_correlation_id("\"><img src=x>".into())
            .with_content_type("<script>x</script>".into())
            .with_app_id("<i>app</i>".into())
            .with_headers(h);
        let body =
            json!({"org_unit_ext_id": ext, "org_unit_name": "Odd", "org_unit_parent_id": 1000});
        env.channel
            .basic_publish(
                "".into(),
                env.settings.topology.dead_letter_queue.as_str().into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let console = ConsoleProcess::start(&env, &[("PROVISIONER__REDIS__URL", &redis.url())]).await;
    let op = Login::new(&console.base, "operator", OPERATOR_PASSWORD).await;
    let (status, list) = op.get("/letters").await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<String> = list
        .split("href=\"/letters/")
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    for page in [
        "/letters".to_owned(),
        format!("/letters/{}", ids[0]),
        format!("/letters/{}", ids[1]),
        "/".to_owned(),
    ] {
        let (status, html) = op.get(&page).await;
        assert_eq!(status, 200, "{page}: {html}");
        for raw in ["<b>", "<img", "<script>x", "<i>", "\u{1b}", "<script>\""] {
            assert!(!html.contains(raw), "{page} holds {raw:?} unescaped");
        }
        if page.starts_with("/letters/") {
            assert!(
                html.contains("&lt;b&gt;bold-name&lt;/b&gt;"),
                "{page}: the header name is shown, escaped"
            );
            assert!(
                html.contains("\\u{1b}"),
                "{page}: the escape is shown as text"
            );
        }
    }
    // Redis goes away: the story page says so, a replay still moves its letters.
    redis.stop();
    let (status, story) = op.get("/story?ext_id=ODD-1").await;
    assert_eq!(status, 200);
    assert!(
        story.contains("role=\"alert\"") && story.contains("redis"),
        "{story}"
    );
    let (_, page) = op.preview("replay-all", &[]).await;
    let (_, done) = op.run(&field(&page, "plan").expect("plan")).await;
    assert!(done.contains("Replayed <strong>2</strong> of 2"), "{done}");
    assert_eq!(
        take_all(&env, &env.settings.topology.work_queue).await,
        ["ODD-1", "ODD-2"]
    );
    let warned = console.audit("action", 1).await;
    assert_eq!(warned[0]["count"], 2);
    // It comes back with nothing: the story is "unknown", not an error.
    let _redis = RedisServer::start(redis.port).await;
    let story = wait_for("the story once Redis is back", T, || async {
        let (_, story) = op.get("/story?ext_id=ODD-1").await;
        story
            .contains("State: <strong>unknown</strong>")
            .then_some(story)
    })
    .await;
    assert!(story.contains("knows nothing of it"), "{story}");
    drop(console);
    env.cleanup().await;
}

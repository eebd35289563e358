//! The console in a real browser: Debian's headless Chromium driven over WebDriver
//! (`chromedriver`, through `fantoccini`), through the binary against the suite's broker
//! and Redis. A screenshot of each page goes to `<target>/tmp/console-screenshots/`.
//!
//! Chromium and chromedriver are required (`.ci/run` installs them); the test fails, not
//! skips, without them.

use std::path::PathBuf;
use std::process::Stdio;

use fantoccini::{Client, ClientBuilder, Locator};
use lapin::types::AMQPValue;
use serde_json::{Value, json};

use crate::console::{
    ConsoleProcess, Letter, OPERATOR_PASSWORD, T, VIEWER_PASSWORD, field, http, letters, plant,
};
use crate::helpers::*;
use crate::ops::dlq_order;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver on a port of its own, with a temporary directory of its own (the
/// browser's profile goes there, and goes with it).
struct Browser {
    driver: tokio::process::Child,
    pub client: Client,
    _tmp: TempDir,
    shots: PathBuf,
    /// Every page's source, for the checks that hold on all of them.
    pub sources: Vec<(String, String)>,
}

impl Browser {
    async fn start() -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} is missing: apt-get install -y chromium chromium-driver (.ci/run does)"
            );
        }
        let tmp = tempdir("browser");
        let port = free_port();
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .env("TMPDIR", &*tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver to answer", T, || async {
            let r = reqwest::get(format!("{url}/status")).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                         format!("--user-data-dir={}", tmp.join("profile").display())],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a browser session");
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&shots).expect("screenshot directory");
        Browser {
            driver,
            client,
            _tmp: tmp,
            shots,
            sources: Vec::new(),
        }
    }

    async fn goto(&mut self, url: &str) {
        self.client.goto(url).await.expect("goto");
        self.record().await;
    }

    /// Keep the page's source for the checks that hold on every page.
    async fn record(&mut self) {
        let url = self.client.current_url().await.expect("url").to_string();
        let source = self.client.source().await.expect("source");
        self.sources.push((url, source));
    }

    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("write screenshot");
    }

    async fn click(&mut self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .expect("click");
        self.record().await;
    }

    async fn text(&self) -> String {
        let v = self
            .client
            .execute("return document.body.innerText", vec![])
            .await
            .expect("script");
        v.as_str().unwrap_or_default().to_owned()
    }

    /// The page's text, which must say `what`.
    async fn says(&self, what: &str) -> String {
        let text = self.text().await;
        assert!(
            text.contains(what),
            "the page does not say {what:?}: {text}"
        );
        text
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.expect("script")
    }

    /// Log in with the keyboard alone: the user field has the focus, Tab, Enter.
    async fn login(&mut self, base: &str, user: &str, password: &str) {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        self.goto(&format!("{base}/login")).await;
        let focused = self
            .js("return document.activeElement && document.activeElement.id")
            .await;
        assert_eq!(
            focused,
            json!("user"),
            "the login page puts the focus on the user name"
        );
        let mut keys = KeyActions::new("keyboard".into());
        for c in format!("{user}\u{e004}{password}\u{e007}").chars() {
            keys = keys
                .then(KeyAction::Down { value: c })
                .then(KeyAction::Up { value: c });
        }
        self.client.perform_actions(keys).await.expect("typing");
        wait_for("the overview after the login", T, || async {
            let url = self.client.current_url().await.ok()?;
            (url.path() == "/").then_some(())
        })
        .await;
        self.record().await;
    }

    async fn logout(&mut self) {
        self.click("form.user button").await;
    }

    /// Every visible form control has a label (its own, or `aria-label`).
    async fn assert_labelled(&self) {
        let unlabelled = self
            .js("return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]\
                 .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))\
                 .map(e => e.outerHTML)")
            .await;
        assert_eq!(unlabelled, json!([]), "controls without a label");
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
    }
}

/// The operator's night of docs/operations.md, in a browser: 50 dead letters of three
/// kinds; a viewer looks and may not act; the operator filters, opens one, replays one
/// kind (events come out, the DLQ shrinks in order), discards the rest with the export
/// (the file holds exactly them); a hostile corpus renders inert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_an_operator_works_the_dlq_in_the_console() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let kinds = ["rejected", "retries_exhausted", "name_conflict"];
    plant(&env, &letters("BR", 50, |i| kinds[[0, 1, 0, 2, 1][i % 5]])).await;
    let all = dlq_order(&env).await;
    assert_eq!(all.len(), 50);
    let console = ConsoleProcess::start(&env, &[]).await;
    let base = console.base.clone();
    let mut b = Browser::start().await;

    // 1. The login page, then a viewer, by keyboard: everything to see, nothing to do.
    b.goto(&format!("{base}/")).await;
    assert!(b.client.current_url().await.expect("url").path() == "/login");
    b.assert_labelled().await;
    b.shot("login").await;
    b.login(&base, "viewer", VIEWER_PASSWORD).await;
    let overview = b.text().await;
    assert!(overview.contains("50 dead letters"), "{overview}");
    assert!(
        overview.contains("rejected") && overview.contains("name_conflict"),
        "{overview}"
    );
    b.goto(&format!("{base}/letters")).await;
    assert_eq!(
        b.js("return document.querySelectorAll('input[name=id], fieldset.actions').length")
            .await,
        json!(0),
        "a viewer gets no selection and no action button"
    );
    // A form the viewer makes up (with their own CSRF token) is refused all the same.
    b.js("const f = document.createElement('form'); f.method = 'post'; f.action = '/actions/preview';\
          for (const [k, v] of [['csrf', document.querySelector('input[name=csrf]').value], ['do', 'discard-all']]) {\
            const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i); }\
          document.body.appendChild(f); f.submit(); return null;")
        .await;
    wait_for("the refusal page", T, || async {
        let t = b.text().await;
        t.contains("only an operator may").then_some(())
    })
    .await;
    b.record().await;
    b.shot("viewer-refused").await;
    assert_eq!(dlq_order(&env).await, all, "a viewer changed nothing");
    b.logout().await;

    // 2. The operator filters, opens one letter, replays one kind.
    b.login(&base, "operator", OPERATOR_PASSWORD).await;
    b.shot("overview").await;
    b.goto(&format!("{base}/letters")).await;
    b.assert_labelled().await;
    b.shot("letters").await;
    b.client
        .find(Locator::Css("#kind"))
        .await
        .expect("kind")
        .select_by_value("rejected")
        .await
        .expect("select");
    b.click("form.filter button").await;
    b.says("20 of 50 dead letters match (kind=rejected)").await;
    b.shot("letters-filtered").await;
    b.click("table.letters tbody tr a").await;
    b.says("\"org_unit_ext_id\": \"BR-0000\"").await;
    b.says("parent 1000 is not active").await;
    b.assert_labelled().await;
    b.shot("letter").await;
    b.client.back().await.expect("back");
    b.click("button[value=replay-all]").await;
    b.says("Replay 20 dead letters (kind=rejected)?").await;
    b.shot("confirm-replay").await;
    b.click("form[action='/actions/run'] button").await;
    b.says("Replayed 20 of 20.").await;
    b.shot("replayed").await;
    let rejected: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| [0, 2].contains(&(i % 5)))
        .map(|(_, e)| e.clone())
        .collect();
    let created = events.take(20, T).await;
    let mut created_ids: Vec<String> = created
        .iter()
        .map(|e| e.body["ext_id"].as_str().unwrap_or("?").to_owned())
        .collect();
    created_ids.sort();
    assert!(created.iter().all(|e| e.routing_key == "group.created"));
    assert_eq!(created_ids, rejected, "one event per replayed letter");
    let rest: Vec<String> = all
        .iter()
        .filter(|e| !rejected.contains(e))
        .cloned()
        .collect();
    assert_eq!(dlq_order(&env).await, rest, "the DLQ shrank, in order");

    // 3. The ext id story of one replayed letter.
    b.goto(&format!("{base}/story?ext_id=BR-0000")).await;
    b.says("State: created").await;
    b.shot("story").await;

    // 4. Discard the rest, with the export.
    b.goto(&format!("{base}/letters")).await;
    b.click("button[value=discard-all]").await;
    b.says("Discard 30 dead letters (all)?").await;
    b.shot("confirm-discard").await;
    b.click("form[action='/actions/run'] button").await;
    b.says("Discarded 30 of 30.").await;
    b.shot("discarded").await;
    let href = b
        .client
        .find(Locator::Css("a[download]"))
        .await
        .expect("the export link")
        .attr("href")
        .await
        .expect("href")
        .expect("an href");
    let cookie = b
        .client
        .get_named_cookie("gp_console")
        .await
        .expect("cookie");
    let export = http()
        .get(format!("{base}{href}"))
        .header("cookie", format!("gp_console={}", cookie.value()))
        .send()
        .await
        .expect("download");
    assert_eq!(export.status().as_u16(), 200);
    let text = export.text().await.expect("export");
    let exported: Vec<String> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            v["ext_id"].as_str().unwrap_or("?").to_owned()
        })
        .collect();
    assert_eq!(
        exported, rest,
        "the export holds exactly what was discarded, in order"
    );
    let name = href.rsplit('/').next().expect("a file name");
    let on_disk = std::fs::read_to_string(console.exports.join(name)).expect("the export file");
    assert_eq!(
        on_disk, text,
        "the download is the file in console.export_dir"
    );
    assert_eq!(dlq_order(&env).await, Vec::<String>::new());
    let audit = console.audit("action", 2).await;
    assert_eq!(audit[1]["action"], "discard");
    assert_eq!(audit[1]["count"], 30);
    assert!(
        audit[1]["export"]
            .as_str()
            .is_some_and(|e| href.ends_with(e))
    );

    // 5. The hostile corpus renders inert.
    let huge = "<script>window.__pwned=9</script>".repeat(3_200);
    let hostile = [
        Letter::new("<script>window.__pwned=1</script>", "rejected").header(
            "x-error-message",
            header_value("<img src=x onerror=\"window.__pwned=2\">"),
        ),
        Letter::new("\"><img src=x onerror=\"window.__pwned=3\">", "rejected")
            .header("x-evil", AMQPValue::LongString(huge.as_str().into())),
        Letter::new("TERM-\u{1b}]0;owned\u{7}\u{1b}[2J", "retries_exhausted"),
        Letter {
            body: b"\xff\xfe<script>window.__pwned=4</script>\x00".to_vec(),
            ..Letter::new("BIN", "invalid_command")
        },
        Letter::new("KIND", "<b id=pwn>kind</b>"),
        Letter::new("LONG-KIND", &"k".repeat(100_000)),
    ];
    plant(&env, &hostile).await;
    b.goto(&format!("{base}/letters")).await;
    let ids: Vec<String> = b
        .js("return [...document.querySelectorAll('input[name=id]')].map(e => e.value)")
        .await
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 6);
    let size = b
        .js("return document.documentElement.outerHTML.length")
        .await;
    assert!(
        size.as_u64().is_some_and(|n| n < 200_000),
        "a 100 KB kind and a 100 KB header do not make the list huge: {size}"
    );
    b.shot("hostile-letters").await;
    let mut pages = vec![format!("{base}/letters")];
    pages.extend(ids.iter().map(|id| format!("{base}/letters/{id}")));
    pages.push(format!("{base}/"));
    for (i, page) in pages.iter().enumerate() {
        b.goto(page).await;
        let dom = b
            .js(
                "return {pwned: window.__pwned === undefined ? null : window.__pwned,\
                 injected: document.querySelectorAll('img, b, iframe, object, embed, svg').length,\
                 scripts: document.scripts.length}",
            )
            .await;
        assert_eq!(
            dom,
            json!({"pwned": null, "injected": 0, "scripts": 1}),
            "{page}"
        );
        if i == 2 {
            b.shot("hostile-letter").await;
        }
    }
    let shown = {
        b.goto(&format!("{base}/letters/{}", ids[0])).await;
        b.text().await
    };
    assert!(
        shown.contains("<script>window.__pwned=1</script>"),
        "shown as text: {shown}"
    );
    let text_of = |i: usize| format!("{base}/letters/{}", ids[i]);
    b.goto(&text_of(1)).await;
    b.says("…(+").await; // a 100 KB header is cut
    b.goto(&text_of(2)).await;
    b.says("TERM-\\u{1b}]0;owned\\u{7}").await;
    b.goto(&text_of(3)).await;
    b.says("not UTF-8").await;

    // 6. On a phone.
    b.client.set_window_size(390, 844).await.expect("size");
    b.goto(&format!("{base}/letters")).await;
    let overflow = b
        .js("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        .await;
    assert_eq!(
        overflow,
        json!(true),
        "the page fits a phone's width (tables scroll)"
    );
    b.shot("phone-letters").await;

    // No page held a secret.
    for (url, source) in &b.sources {
        for secret in [OPERATOR_PASSWORD, VIEWER_PASSWORD, SIM_TOKEN] {
            assert!(!source.contains(secret), "{url} holds a secret");
        }
    }
    let csrf_seen = b
        .sources
        .iter()
        .filter_map(|(_, s)| field(s, "csrf"))
        .count();
    assert!(csrf_seen > 0);
    b.close().await;
    drop(console);
    worker.shutdown();
    env.cleanup().await;
}

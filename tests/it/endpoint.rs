//! The HTTP endpoint under a flood of slow clients, through the binary.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;
use crate::process::{WorkerProcess, worker_env};

/// Let this process open more sockets than the common default of 1,024 (up to its hard
/// limit): the flood below needs 1,100.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// One slow client: connect, send part of a request header, never finish it; when the
/// worker closes the connection, come back two seconds later (so the flood lasts as long
/// as the test, at some 500 new connections a second).
async fn slow_client(addr: std::net::SocketAddr, stop: CancellationToken) -> u32 {
    let mut connections = 0;
    while !stop.is_cancelled() {
        let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        connections += 1;
        let _ = stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: flood\r\nX-Slow: ")
            .await;
        let mut buf = [0u8; 64];
        tokio::select! {
            _ = stream.read(&mut buf) => {}
            () = stop.cancelled() => {}
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.cancelled() => {}
        }
    }
    connections
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_slow_clients_neither_silences_probes_nor_parks_commands() {
    raise_nofile_limit();
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    // The file-descriptor limit of a typical container: a flood that takes them all would
    // starve the worker's Redis, broker and API connections.
    let mut w = WorkerProcess::spawn_with_nofile(&env, &worker_env(&[]), 1024);
    w.wait_consuming().await;
    let addr = w.metrics_addr().await;

    let stop = CancellationToken::new();
    let flood: Vec<_> = (0..1_100)
        .map(|_| tokio::spawn(slow_client(addr, stop.clone())))
        .collect();
    // The flood is on once the endpoint had to shed connections.
    wait_for(
        "the endpoint to shed connections",
        Duration::from_secs(30),
        || async {
            (w.metric("provisioner_http_connections_shed_total").await? >= 100.0).then_some(())
        },
    )
    .await;

    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("client");
    let (bodies, exts) = {
        let bodies: Vec<_> = (0..20)
            .map(|i| json!({"org_unit_ext_id": format!("FLOOD-{i}"), "org_unit_name": format!("flood {i}"), "org_unit_parent_id": 1000}))
            .collect();
        let exts = (0..20).map(|i| format!("FLOOD-{i}")).collect();
        (bodies, exts)
    };
    env.send_many(&bodies).await;
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        let answer = probe
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("probe {i} during the flood: {e:?}"));
        assert!(
            answer.status().is_success(),
            "probe {i}: {}",
            answer.status()
        );
        slowest = slowest.max(started.elapsed());
        // Probes are spread over the flood, as a kubelet's would be.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = collect_created(&mut tap, &exts, Duration::from_secs(60)).await;
    stop.cancel();
    let mut connections = 0;
    for client in flood {
        connections += client.await.expect("client");
    }
    assert_eq!(events.len(), 20);
    let lines = w.lines();
    let not_created: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "outcome" && l["outcome"] != "created")
        .collect();
    assert!(not_created.is_empty(), "nothing parked: {not_created:?}");
    assert!(
        !lines.iter().any(|l| l["circuit"] == "open"),
        "the circuit stayed closed"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l["message"] == "metrics endpoint: accept failed"),
        "file descriptors to spare"
    );
    eprintln!("flood: {connections} connections; slowest probe {slowest:?}");
    w.stop().await;
    env.cleanup().await;
}

/// Why `src/http.rs` admits connections itself: the kept crates alone (hyper's connection
/// builder with its header-read timeout, and a semaphore bounding the connections, as
/// `axum::serve` would be bounded) let a full house of slow clients silence a probe: the
/// probe waits behind them until their header timeout frees a place, longer than a
/// kubelet's one second. The endpoint's own admission closes a waiting connection for a
/// probe whose request is already there (`a_flood_of_slow_clients_neither_silences_probes_nor_parks_commands`
/// above, through the binary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_crates_alone_a_full_house_of_slow_clients_silences_a_probe() {
    use axum::routing::get;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;

    const PLACES: usize = 16;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let places = std::sync::Arc::new(tokio::sync::Semaphore::new(PLACES));
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let router = axum::Router::new().route("/healthz", get(|| async { "ok" }));
    let server = {
        let (places, accepted) = (places.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let place = places.clone().acquire_owned().await.expect("open");
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let router = router.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |r| router.clone().oneshot(r));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(group_provisioner::http::HEADER_READ_TIMEOUT)
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    drop(place);
                });
            }
        })
    };
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("client");
    let healthz = format!("http://{addr}/healthz");
    let before = probe.get(&healthz).send().await;
    assert!(
        before.is_ok_and(|r| r.status().is_success()),
        "a probe with places free is answered"
    );
    let stop = CancellationToken::new();
    let flood: Vec<_> = (0..PLACES * 2)
        .map(|_| tokio::spawn(slow_client(addr, stop.clone())))
        .collect();
    wait_for(
        "the slow clients to take every place",
        Duration::from_secs(10),
        || {
            let taken = accepted.load(std::sync::atomic::Ordering::SeqCst);
            async move { (taken >= PLACES).then_some(()) }
        },
    )
    .await;

    let during = probe.get(&healthz).send().await;
    assert!(
        during.as_ref().is_err_and(reqwest::Error::is_timeout),
        "a probe got through a full house of slow clients: {during:?}"
    );
    stop.cancel();
    server.abort();
    for client in flood {
        client.await.expect("client");
    }
}

/// `/metrics` body and content type for an `Accept` header (none: no header).
async fn scrape(addr: std::net::SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut request = reqwest::Client::new().get(format!("http://{addr}/metrics"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.expect("scrape");
    assert!(response.status().is_success());
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    (content_type, response.text().await.expect("body"))
}

/// What the Prometheus Python client's parser for `format` reads in `body`.
async fn parsed(format: &str, body: &str) -> serde_json::Value {
    let mut child = tokio::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/tools/parse_metrics.py"
        ))
        .arg(format)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(body.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("parser ran");
    assert!(
        out.status.success(),
        "the {format} parser refused the body (prometheus_client installed? scripts/test.sh \
         installs it): {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Every sample as (name, labels, value), whatever family the parser put it in.
fn samples(families: &serde_json::Value) -> std::collections::BTreeSet<String> {
    families
        .as_object()
        .expect("families")
        .values()
        .flat_map(|f| f["samples"].as_array().expect("samples").iter())
        .map(|s| s.to_string())
        .collect()
}

/// Prometheus asks for OpenMetrics and gets it; `curl`, older scrapers and anything asking
/// for `text/plain` get the classic text format. Each body passes the official parser of
/// its format, and both carry the same samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_come_in_the_format_the_scraper_asks_for() {
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let mut w = WorkerProcess::spawn(&env, &worker_env(&[]));
    env.send(&json!({"org_unit_ext_id": unique("METRICS"), "org_unit_name": "Metrics", "org_unit_parent_id": 1000}))
        .await;
    tap.next(Duration::from_secs(30)).await;
    let addr = w.metrics_addr().await;
    let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,\
        application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let (om_type, om_body) = scrape(addr, Some(prometheus)).await;
    assert_eq!(
        om_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let om = parsed("openmetrics", &om_body).await;
    assert_eq!(om["provisioner_commands"]["type"], "counter", "{om}");
    assert_eq!(om["provisioner_build"]["type"], "info", "{om}");
    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let (content_type, body) = scrape(addr, accept).await;
        assert_eq!(
            content_type, "text/plain; version=0.0.4; charset=utf-8",
            "{accept:?}"
        );
        assert!(!body.contains("# EOF"), "{accept:?}: {body}");
        let text = parsed("classic", &body).await;
        assert_eq!(text["provisioner_commands"]["type"], "counter", "{text}");
        assert_eq!(
            text["provisioner_api_request_duration_seconds"]["type"],
            "histogram"
        );
        // The scrapes differ only in what moved between them (none here: the worker is
        // idle; `provisioner_ready` is re-read, and equal).
        assert_eq!(samples(&text), samples(&om), "{accept:?}");
    }
    let created = om_body
        .lines()
        .find(|l| l.starts_with("provisioner_commands_total{outcome=\"created\"}"));
    assert_eq!(
        created,
        Some("provisioner_commands_total{outcome=\"created\"} 1")
    );
    // The build, with the commit `--version` prints (a test in deploy.rs ties that one to
    // the checkout).
    let version = std::process::Command::new(crate::process::BIN)
        .arg("--version")
        .output()
        .expect("runs");
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let commit = version
        .trim()
        .strip_suffix(')')
        .and_then(|v| v.rsplit_once("(commit "))
        .map(|(_, c)| c)
        .expect("--version names the commit");
    let build = format!(
        "provisioner_build_info{{version=\"{}\",commit=\"{commit}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(om_body.lines().any(|l| l == build), "{build} in\n{om_body}");
    w.stop().await;
    env.cleanup().await;
}

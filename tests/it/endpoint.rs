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

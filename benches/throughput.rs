//! Throughput of the whole pipeline: real RabbitMQ and Redis, convirza-sim in process,
//! the worker in process. Prints commands/s for a few API latencies.
//!
//!     cargo bench --bench throughput            # N=2000 per scenario
//!     BENCH_N=500 BENCH_LATENCIES=0,50 cargo bench --bench throughput

#[path = "../tests/it/helpers.rs"]
mod helpers;

use std::time::{Duration, Instant};

use helpers::*;
use serde_json::json;

async fn scenario(n: usize, latency_ms: u64, prefetch: u16) {
    let mut env = TestEnv::new().await;
    env.settings.amqp.prefetch = prefetch;
    env.sim.sim.update_faults(|f| f.latency_ms = latency_ms);
    let mut events = env.event_tap().await;
    // Pre-load the work queue so the figure is the worker's, not the test publisher's.
    let bodies: Vec<_> = (0..n)
        .map(|i| json!({"org_unit_ext_id": format!("B-{i}"), "org_unit_name": format!("Bench {i}"), "org_unit_parent_id": 1000}))
        .collect();
    env.send_many(&bodies).await;
    let started = Instant::now();
    let worker = env.spawn_worker().await;
    events.take(n, Duration::from_secs(600)).await;
    let total = started.elapsed();
    let stats = env.sim.sim.stats();
    assert_eq!(stats.groups_created as usize, n);
    assert!(stats.duplicated_ext_ids.is_empty());
    println!(
        "latency {latency_ms:>3} ms  prefetch {prefetch:>3}  n {n:>5}  drained in {:>6.2} s  {:>7.1} commands/s",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let latencies: Vec<u64> = std::env::var("BENCH_LATENCIES")
        .unwrap_or_else(|_| "0,50".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    for latency in latencies {
        scenario(n, latency, 64).await;
    }
}

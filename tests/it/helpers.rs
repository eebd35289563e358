//! Test scaffolding: a simulator on port 0, clients pointed at it, waiting on conditions.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use group_provisioner::convirza::{Auth, ConvirzaClient};
use group_provisioner::secret::Secret;
use group_provisioner::sim::{self, SimConfig, SimHandle};

pub const SIM_TOKEN: &str = "sim-token";

/// A simulator on a free loopback port with default rules.
pub async fn spawn_sim() -> SimHandle {
    spawn_sim_with(SimConfig::default()).await
}

pub async fn spawn_sim_with(config: SimConfig) -> SimHandle {
    sim::spawn(SimConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..config
    })
    .await
    .expect("simulator binds a free port")
}

pub fn client_for(sim: &SimHandle, timeout: Duration) -> ConvirzaClient {
    client_with_token(&sim.base_url(), SIM_TOKEN, timeout)
}

pub fn client_with_token(base_url: &str, token: &str, timeout: Duration) -> ConvirzaClient {
    ConvirzaClient::new(base_url, Auth::Static(Secret::new(token)), timeout).expect("client")
}

/// A short random suffix so names never collide between tests or runs.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Poll `check` until it returns `Some`, or fail the test after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if started.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

//! Login mode against convirza-sim, with the session shared through real Redis.

use std::sync::Arc;
use std::time::Duration;

use group_provisioner::clock::{Clock, OffsetClock, SystemClock};
use group_provisioner::command::CreateGroup;
use group_provisioner::convirza::{ApiError, Auth, ConvirzaClient, LoginSession};
use group_provisioner::dedup::RedisStore;
use group_provisioner::secret::SecretString;
use group_provisioner::sim::{SimAuth, SimConfig, SimHandle};
use serde_json::json;

use crate::helpers::*;

fn login_client(sim: &SimHandle, prefix: &str, password: &str) -> ConvirzaClient {
    login_client_with_clock(sim, prefix, password, Arc::new(SystemClock))
}

fn login_client_with_clock(
    sim: &SimHandle,
    prefix: &str,
    password: &str,
    clock: Arc<dyn Clock>,
) -> ConvirzaClient {
    let store = RedisStore::new(REDIS_URL, prefix).expect("store");
    let session = LoginSession::new(
        &format!("http://{}", sim.addr),
        "admin@example.com",
        SecretString::from(password),
        Duration::from_secs(5),
        Arc::new(store),
        "test",
    )
    .expect("session")
    .with_clock(clock);
    ConvirzaClient::new(
        &sim.base_url(),
        Auth::Login(Arc::new(session)),
        Duration::from_secs(5),
    )
    .expect("client")
}

fn command(ext: &str) -> CreateGroup {
    CreateGroup::parse(
        json!({"org_unit_ext_id": ext, "org_unit_name": ext, "org_unit_parent_id": 1000})
            .to_string()
            .as_bytes(),
    )
    .expect("valid")
}

async fn sim_with(auth: SimAuth) -> SimHandle {
    spawn_sim_with(SimConfig {
        token: "static-token-not-used".into(),
        auth,
        ..SimConfig::default()
    })
    .await
}

#[tokio::test]
async fn logs_in_once_and_reuses_the_token_both_response_shapes() {
    for enveloped in [false, true] {
        let sim = sim_with(SimAuth {
            enveloped,
            ..SimAuth::default()
        })
        .await;
        let prefix = unique("gp-auth");
        let client = login_client(&sim, &prefix, "sim-password");
        for i in 0..5 {
            client
                .create_group(&command(&format!("L-{i}")), None)
                .await
                .expect("created");
        }
        let stats = sim.sim.stats();
        assert_eq!(
            stats.logins, 1,
            "one login for five calls (enveloped: {enveloped})"
        );
        assert_eq!(stats.groups_created, 5);
        // A second replica (another client, same Redis) reuses the session: no new login.
        let replica = login_client(&sim, &prefix, "sim-password");
        replica
            .create_group(&command("L-replica"), None)
            .await
            .expect("created");
        assert_eq!(sim.sim.stats().logins, 1);
        delete_redis_prefix(&prefix).await;
    }
}

#[tokio::test]
async fn revoked_tokens_are_refreshed_once_for_all_replicas_and_never_reused() {
    let sim = sim_with(SimAuth::default()).await;
    let prefix = unique("gp-auth");
    let replicas: Vec<_> = (0..4)
        .map(|_| login_client(&sim, &prefix, "sim-password"))
        .collect();
    replicas[0]
        .create_group(&command("R-0"), None)
        .await
        .expect("created");
    for r in &replicas {
        r.list_child_groups(None, None, 1, 0, None)
            .await
            .expect("warm cache");
    }
    assert_eq!(sim.sim.stats().logins, 1);

    sim.sim.revoke_access_tokens();
    // Every replica hits a 401 at the same moment; one refreshes under the Redis lock, the
    // others pick up the new pair.
    let calls = replicas.iter().enumerate().map(|(i, r)| async move {
        let cmd = command(&format!("R-after-{i}"));
        r.create_group(&cmd, None).await
    });
    for result in futures_util::future::join_all(calls).await {
        result.expect("created after the refresh");
    }
    let stats = sim.sim.stats();
    assert_eq!(
        stats.refresh_reuse, 0,
        "a single-use refresh token was presented twice"
    );
    assert_eq!(stats.refreshes, 1, "one refresh for all replicas");
    assert_eq!(stats.logins, 1, "no new login needed");
    assert_eq!(stats.groups_created, 5);
    delete_redis_prefix(&prefix).await;
}

#[tokio::test]
async fn refreshes_shortly_before_expiry_without_a_401() {
    let sim = sim_with(SimAuth {
        access_ttl: Duration::from_secs(10),
        ..SimAuth::default()
    })
    .await;
    let prefix = unique("gp-auth");
    let clock = Arc::new(OffsetClock::default());
    let client = login_client_with_clock(&sim, &prefix, "sim-password", clock.clone());
    client
        .create_group(&command("E-1"), None)
        .await
        .expect("created");
    // A 10 s token is refreshed in its last tenth: 9.5 s later by the worker's clock it is
    // due, while the API (on real time) still accepts it, so no 401 can be what triggers
    // the refresh.
    clock.advance(Duration::from_millis(9_500));
    client
        .create_group(&command("E-2"), None)
        .await
        .expect("created");
    let stats = sim.sim.stats();
    assert_eq!(stats.refreshes, 1);
    let unauthorized = sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.status == Some(401))
        .count();
    assert_eq!(
        unauthorized, 0,
        "refreshed ahead of expiry, not after a 401"
    );
    delete_redis_prefix(&prefix).await;
}

#[tokio::test]
async fn a_wrong_password_is_a_permanent_auth_error_and_never_echoed() {
    let sim = sim_with(SimAuth::default()).await;
    let prefix = unique("gp-auth");
    let client = login_client(&sim, &prefix, "wrong-pass-123");
    let err = client
        .create_group(&command("W-1"), None)
        .await
        .expect_err("refused");
    assert!(
        matches!(
            err,
            ApiError::Auth {
                transient: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.to_string().contains("wrong-pass-123"));
    assert_eq!(sim.sim.stats().create_requests, 0);
    delete_redis_prefix(&prefix).await;
}

#[tokio::test]
async fn a_used_refresh_token_falls_back_to_login() {
    let sim = sim_with(SimAuth::default()).await;
    let prefix = unique("gp-auth");
    let client = login_client(&sim, &prefix, "sim-password");
    client
        .create_group(&command("U-1"), None)
        .await
        .expect("created");
    // Someone else (outside this store) used our refresh token: it is dead now.
    let mut conn = redis_conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:auth:*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert_eq!(keys.len(), 1);
    let raw: String = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .expect("pair");
    let pair: serde_json::Value = serde_json::from_str(&raw).expect("json");
    let r = reqwest::Client::new()
        .post(format!("http://{}/oauth/refresh-token", sim.addr))
        .json(&json!({"refresh_token": pair["refresh_token"]}))
        .send()
        .await
        .expect("refresh");
    assert!(r.status().is_success());
    sim.sim.revoke_access_tokens();
    client
        .create_group(&command("U-2"), None)
        .await
        .expect("created after a new login");
    let stats = sim.sim.stats();
    assert_eq!(stats.logins, 2);
    assert_eq!(
        stats.refresh_reuse, 1,
        "exactly the one refused refresh, then login"
    );
    delete_redis_prefix(&prefix).await;
}

//! The Convirza client against convirza-sim: every classification the pipeline relies on.

use std::time::{Duration, SystemTime};

use backon::Retryable;
use group_provisioner::command::CreateGroup;
use group_provisioner::convirza::ApiError;
use group_provisioner::retry::RetryPolicy;
use group_provisioner::sim::{FailNext, Faults, IdKey, SimConfig};
use group_provisioner::traceparent::Traceparent;
use serde_json::json;

use crate::helpers::*;

const TIMEOUT: Duration = Duration::from_secs(5);

fn command(ext: &str, name: &str, parent: i64) -> CreateGroup {
    CreateGroup::parse(
        json!({"org_unit_ext_id": ext, "org_unit_name": name, "org_unit_parent_id": parent, "x_custom": {"a": [1, 2]}})
            .to_string()
            .as_bytes(),
    )
    .expect("valid command")
}

#[tokio::test]
async fn create_returns_the_new_id_in_both_shapes() {
    let sim = spawn_sim().await;
    let client = client_for(&sim, TIMEOUT);
    let created = client
        .create_group(&command("E-1", "Sales", 1000), None)
        .await
        .expect("created");
    assert_eq!(created.http_status, 201);
    assert!(created.request_id.is_some());
    let groups = sim.sim.groups_for("E-1");
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].org_unit_id, created.org_unit_id);
    // Unknown fields reached the API unchanged.
    assert_eq!(groups[0].body["x_custom"], json!({"a": [1, 2]}));

    sim.sim.update_faults(|f| f.id_key = IdKey::SnakeCase);
    let second = client
        .create_group(&command("E-2", "Support", 1000), None)
        .await
        .expect("created with org_unit_id");
    assert_eq!(sim.sim.groups_for("E-2")[0].org_unit_id, second.org_unit_id);
    assert_ne!(second.org_unit_id, created.org_unit_id);
}

#[tokio::test]
async fn unknown_parent_is_rejected() {
    let sim = spawn_sim().await;
    let err = client_for(&sim, TIMEOUT)
        .create_group(&command("E-1", "Sales", 4242), None)
        .await
        .expect_err("bad parent");
    match &err {
        ApiError::Rejected {
            status: 400,
            message,
            request_id,
        } => {
            assert!(message.contains("4242"), "{message}");
            assert!(request_id.is_some());
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(!err.is_transient());
    assert_eq!(sim.sim.stats().groups_created, 0);
}

#[tokio::test]
async fn sibling_name_taken_is_a_duplicate_name() {
    let sim = spawn_sim().await;
    sim.sim.seed_group(1000, "Sales", Some("OTHER"));
    let err = client_for(&sim, TIMEOUT)
        .create_group(&command("E-1", "  sales ", 1000), None)
        .await
        .expect_err("name taken");
    assert!(matches!(err, ApiError::DuplicateName { .. }), "{err:?}");
    assert_eq!(err.http_status(), Some(400));
}

#[tokio::test]
async fn wrong_token_is_unauthorized() {
    let sim = spawn_sim().await;
    let err = client_with_token(&sim.base_url(), "wrong", TIMEOUT)
        .create_group(&command("E-1", "Sales", 1000), None)
        .await
        .expect_err("401");
    assert!(
        matches!(err, ApiError::Unauthorized { status: 401, .. }),
        "{err:?}"
    );
    assert!(
        !err.to_string().contains("wrong"),
        "token leaked into the error: {err}"
    );
    assert_eq!(sim.sim.stats().groups_created, 0);
}

#[tokio::test]
async fn rate_limit_with_delta_seconds_and_http_date() {
    let sim = spawn_sim().await;
    let client = client_for(&sim, TIMEOUT);
    sim.sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(1, 429).retry_after("7")));
    let err = client
        .create_group(&command("E-1", "A", 1000), None)
        .await
        .expect_err("429");
    assert_eq!(
        err,
        ApiError::RateLimited {
            retry_after: Some(Duration::from_secs(7))
        }
    );

    let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
    sim.sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(1, 429).retry_after(at)));
    let err = client
        .create_group(&command("E-1", "A", 1000), None)
        .await
        .expect_err("429");
    let wait = err.retry_after().expect("retry-after parsed");
    assert!(
        wait > Duration::from_secs(27) && wait <= Duration::from_secs(30),
        "{wait:?}"
    );
    assert_eq!(sim.sim.stats().groups_created, 0, "a 429 creates nothing");
}

#[tokio::test]
async fn server_errors_with_html_then_success_under_the_retry_policy() {
    let sim = spawn_sim().await;
    let client = client_for(&sim, TIMEOUT);
    sim.sim.set_faults(Faults {
        fail_next: Some(FailNext::new(1, 500).body("<html><h1>Internal Server Error</h1></html>")),
        ..Faults::default()
    });
    let first = client
        .create_group(&command("E-1", "A", 1000), None)
        .await
        .expect_err("500");
    assert!(
        matches!(
            first,
            ApiError::Transient {
                status: Some(500),
                ..
            }
        ),
        "{first:?}"
    );
    assert!(first.message().contains("Internal Server Error"));

    sim.sim.update_faults(|f| {
        f.fail_next = Some(FailNext::new(2, 502).body("<html>Bad Gateway</html>"))
    });
    let policy = RetryPolicy {
        initial: Duration::from_millis(5),
        multiplier: 2.0,
        max_interval: Duration::from_secs(10),
        max_tries: 4,
        max_retry_after: Duration::from_secs(120),
    };
    let mut seen = Vec::new();
    let cmd = command("E-2", "B", 1000);
    let created = (|| client.create_group(&cmd, None))
        .retry(policy)
        .when(ApiError::is_transient)
        .notify(|e, _| seen.push(e.http_status()))
        .await
        .expect("third try succeeds");
    assert_eq!(seen, [Some(502), Some(502)]);
    assert_eq!(
        sim.sim.groups_for("E-2")[0].org_unit_id,
        created.org_unit_id
    );
}

#[tokio::test]
async fn commit_then_drop_is_an_unknown_outcome_and_the_group_exists() {
    let sim = spawn_sim().await;
    sim.sim.update_faults(|f| f.drop_after_commit = 1);
    let err = client_for(&sim, TIMEOUT)
        .create_group(&command("E-1", "A", 1000), None)
        .await
        .expect_err("dropped");
    assert!(matches!(err, ApiError::UnknownOutcome { .. }), "{err:?}");
    assert!(err.may_have_created());
    assert_eq!(
        sim.sim.groups_for("E-1").len(),
        1,
        "the API committed before dropping"
    );
    let log = sim.sim.requests();
    assert_eq!(
        log.last().and_then(|r| r.fault.as_deref()),
        Some("drop_after_commit")
    );
}

#[tokio::test]
async fn commit_then_stall_past_the_timeout_is_an_unknown_outcome() {
    let sim = spawn_sim().await;
    sim.sim.update_faults(|f| {
        f.stall_after_commit = 1;
        f.stall_ms = 5_000;
    });
    let started = std::time::Instant::now();
    let err = client_for(&sim, Duration::from_millis(300))
        .create_group(&command("E-1", "A", 1000), None)
        .await
        .expect_err("timed out");
    assert!(matches!(err, ApiError::UnknownOutcome { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the client timeout applied"
    );
    assert_eq!(sim.sim.groups_for("E-1").len(), 1);
}

#[tokio::test]
async fn list_children_by_name_pages_through_everything() {
    let sim = spawn_sim_with(SimConfig {
        max_page: 3,
        ..SimConfig::default()
    })
    .await;
    for i in 0..7 {
        sim.sim
            .seed_group(1000, &format!("Team {i}"), Some(&format!("T{i}")));
    }
    sim.sim.seed_group(1000, " team 5 ", Some("T5-bis"));
    sim.sim.seed_group(1001, "Team 5", Some("elsewhere"));
    let client = client_for(&sim, TIMEOUT);

    let page = client
        .list_child_groups(Some(1000), Some("team"), 100, 0, None)
        .await
        .expect("page");
    assert_eq!(page.total, Some(8));
    assert_eq!(page.groups.len(), 3, "the sim caps pages at 3");

    let named = client
        .find_children_named(1000, "TEAM 5", None)
        .await
        .expect("found");
    let mut exts: Vec<_> = named
        .iter()
        .filter_map(|g| g.org_unit_ext_id.clone())
        .collect();
    exts.sort();
    assert_eq!(
        exts,
        ["T5", "T5-bis"],
        "exact name match ignoring case and spaces, one parent only"
    );

    // "Ops" partially matches ten siblings; the exact match sits on the last page, so it is
    // only found by paging (3 per page → 4 pages).
    for i in 1..=9 {
        sim.sim
            .seed_group(1001, &format!("Ops {i}"), Some(&format!("O{i}")));
    }
    sim.sim.seed_group(1001, " ops ", Some("OPS"));
    let before = sim.sim.stats().list_requests;
    let ops = client
        .find_children_named(1001, "Ops", None)
        .await
        .expect("found");
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].org_unit_ext_id.as_deref(), Some("OPS"));
    assert_eq!(
        sim.sim.stats().list_requests - before,
        4,
        "10 matches at 3 per page"
    );

    let root = client
        .list_child_groups(None, None, 1, 0, None)
        .await
        .expect("own org unit");
    assert_eq!(
        root.total,
        Some(2),
        "the account root holds the two seed parents"
    );
}

#[tokio::test]
async fn traceparent_is_propagated_with_the_same_trace_id() {
    let sim = spawn_sim().await;
    let incoming =
        Traceparent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("tp");
    let ours = incoming.child();
    client_for(&sim, TIMEOUT)
        .create_group(&command("E-1", "A", 1000), Some(&ours))
        .await
        .expect("created");
    let sent = sim.sim.requests()[0]
        .traceparent
        .clone()
        .expect("header sent");
    assert_eq!(sent, ours.to_string());
    assert!(sent.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
}

#[tokio::test]
async fn missing_endpoint_and_refused_connection() {
    let sim = spawn_sim().await;
    let wrong_base = format!("http://{}/v2", sim.addr);
    let err = client_with_token(&wrong_base, SIM_TOKEN, TIMEOUT)
        .create_group(&command("E-1", "A", 1000), None)
        .await
        .expect_err("404");
    assert!(matches!(err, ApiError::EndpointNotFound { .. }), "{err:?}");

    let addr = sim.addr;
    drop(sim);
    // Nothing listens any more: a connect error, known not to have reached the API.
    let err = wait_for(
        "the simulator port to close",
        Duration::from_secs(5),
        || async {
            let e = client_with_token(&format!("http://{addr}/v3"), SIM_TOKEN, TIMEOUT)
                .create_group(&command("E-1", "A", 1000), None)
                .await
                .err()?;
            matches!(e, ApiError::Transient { status: None, .. }).then_some(e)
        },
    )
    .await;
    assert!(!err.may_have_created());
}

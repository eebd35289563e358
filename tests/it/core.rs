//! The core decision step by step, without a broker: real Redis (own key prefix),
//! convirza-sim in process, `Processor::process` called directly.

use std::time::Duration;

use group_provisioner::command::{CreateGroup, ExtId};
use group_provisioner::dedup::{RedisStore, StoredRecord};
use group_provisioner::pipeline::{
    Claim, ClaimRequest, Decision, DedupStore, DelayReason, FailureKind, Inbound, LastOutcome,
    Processed, Processor, ProcessorConfig, SystemFault,
};
use group_provisioner::retry::RetryPolicy;
use group_provisioner::sim::{FailNext, SimHandle};
use serde_json::{Value, json};

use crate::helpers::*;

struct Core {
    sim: SimHandle,
    prefix: String,
    processor: Processor<RedisStore, group_provisioner::convirza::ConvirzaClient>,
}

impl Core {
    async fn new() -> Core {
        Core::with(Duration::from_secs(10), REDIS_URL).await
    }

    async fn with(lease: Duration, redis_url: &str) -> Core {
        let sim = spawn_sim().await;
        let prefix = unique("gp-core");
        let store = RedisStore::new(redis_url, &prefix).expect("store");
        let processor = Processor::new(
            store,
            client_for(&sim, Duration::from_secs(2)),
            ProcessorConfig {
                policy: RetryPolicy {
                    initial: Duration::from_millis(5),
                    max_interval: Duration::from_millis(20),
                    max_tries: 3,
                    multiplier: 2.0,
                    max_retry_after: Duration::from_secs(120),
                },
                tiers: 2,
                lease,
                ttl: Duration::from_secs(600),
                worker_id: "test:1".into(),
                failure_threshold: 100,
                api_timeout: Duration::from_secs(2),
                takeover_margin: Duration::from_millis(500),
                verify_unknown: false,
            },
        );
        Core {
            sim,
            prefix,
            processor,
        }
    }

    async fn run(&self, body: Value) -> Processed {
        self.run_msg(Inbound {
            body: body.to_string().into_bytes(),
            ..Inbound::default()
        })
        .await
    }

    async fn run_msg(&self, msg: Inbound) -> Processed {
        self.processor.process(&msg).await
    }

    async fn done(self) {
        delete_redis_prefix(&self.prefix).await;
    }
}

/// Once our claim appears in Redis, replace it with `new_owner`'s, as if our lease had
/// expired and another worker had claimed the ext id.
async fn take_over_claim(key: &str, new_owner: &str) {
    let mut conn = redis_conn().await;
    wait_for("the claim", Duration::from_secs(5), || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut conn)
                .await
                .ok()
                .flatten()
        }
    })
    .await;
    let newer = serde_json::to_string(&StoredRecord::Claimed {
        owner: new_owner.into(),
        claimed_at: "now".into(),
    })
    .expect("json");
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(newer)
        .arg("PX")
        .arg(30_000)
        .query_async(&mut conn)
        .await
        .expect("set");
}

fn body(ext: &str) -> Value {
    json!({"org_unit_ext_id": ext, "org_unit_name": format!("Group {ext}"), "org_unit_parent_id": 1000})
}

fn ext(s: &str) -> ExtId {
    ExtId::parse(s).expect("ext id")
}

#[tokio::test]
async fn created_then_duplicate_from_redis_without_api_call() {
    let core = Core::new().await;
    let first = core.run(body("C-1")).await;
    let Decision::Created { event } = &first.decision else {
        panic!("{first:?}")
    };
    assert!(!event.duplicate);
    assert_eq!(event.attempts, 1);
    assert_eq!(first.http_status, Some(201));

    let calls = core.sim.sim.stats();
    let second = core
        .run_msg(Inbound {
            body: body("C-1").to_string().into_bytes(),
            attempts: 3,
            ..Inbound::default()
        })
        .await;
    let Decision::Created { event: dup } = &second.decision else {
        panic!("{second:?}")
    };
    assert!(dup.duplicate);
    assert_eq!(dup.org_unit_id, event.org_unit_id);
    assert_eq!(dup.attempts, 3, "x-attempts carried, no new POST");
    assert_eq!(
        dup.api_request_id, event.api_request_id,
        "the original request id is remembered"
    );
    assert_eq!(core.sim.sim.stats(), calls, "no API call at all");

    match core
        .processor
        .store()
        .status(&ext("C-1"))
        .await
        .expect("status")
        .record
    {
        Some(StoredRecord::Created(r)) => {
            assert_eq!(r.org_unit_id, event.org_unit_id);
            assert!(r.fingerprint.contains_key("org_unit_name"));
            assert!(
                !r.fingerprint.values().any(|v| v.contains("Group")),
                "values are hashed"
            );
        }
        other => panic!("{other:?}"),
    }
    core.done().await;
}

#[tokio::test]
async fn invalid_command_names_the_ext_id_when_it_was_valid() {
    let core = Core::new().await;
    let v = core
        .run(json!({"org_unit_ext_id": "I-1", "org_unit_name": "x", "org_unit_parent_id": 0}))
        .await;
    let Decision::DeadLetter {
        failure,
        event,
        attempts,
    } = &v.decision
    else {
        panic!("{v:?}")
    };
    assert_eq!(failure.kind, FailureKind::InvalidCommand);
    assert!(
        failure.message.contains("org_unit_parent_id"),
        "{}",
        failure.message
    );
    assert_eq!(event.ext_id.as_deref(), Some("I-1"));
    assert_eq!(*attempts, 0);
    let v = core
        .run_msg(Inbound {
            body: b"[]".to_vec(),
            message_id: Some("m-9".into()),
            ..Inbound::default()
        })
        .await;
    let Decision::DeadLetter { event, .. } = &v.decision else {
        panic!("{v:?}")
    };
    assert_eq!(event.ext_id, None);
    assert_eq!(
        event.correlation_id.as_deref(),
        Some("m-9"),
        "correlation falls back to message_id"
    );
    assert_eq!(core.sim.sim.stats().create_requests, 0);
    core.done().await;
}

#[tokio::test]
async fn a_claim_held_elsewhere_defers_without_calling_the_api() {
    let core = Core::new().await;
    let store = core.processor.store();
    assert_eq!(
        store
            .claim(
                &ext("H-1"),
                &ClaimRequest {
                    owner: "other-worker/abc",
                    lease: Duration::from_secs(30),
                    ttl: Duration::from_secs(60),
                    duplicate: &LastOutcome::duplicate(&Inbound::default(), "H-1"),
                    mark: None,
                },
            )
            .await
            .expect("claim"),
        Claim::Acquired {
            marker: None,
            marked: false
        }
    );
    let v = core
        .run_msg(Inbound {
            body: body("H-1").to_string().into_bytes(),
            deferrals: 2,
            attempts: 1,
            ..Inbound::default()
        })
        .await;
    assert_eq!(
        v.decision,
        Decision::Delay {
            tier: 0,
            attempts: 1,
            retries: 0,
            deferrals: 3,
            reason: DelayReason::Claimed
        }
    );
    assert_eq!(core.sim.sim.stats().create_requests, 0);
    core.done().await;
}

#[tokio::test]
async fn credential_and_endpoint_faults_park_instead_of_dead_lettering() {
    let core = Core::new().await;
    core.sim.sim.set_token(Some("rotated"));
    let v = core.run(body("A-1")).await;
    let Decision::Delay {
        tier: 0,
        deferrals: 1,
        reason: DelayReason::Parked(SystemFault::Unauthorized(_)),
        attempts: 1,
        ..
    } = &v.decision
    else {
        panic!("{v:?}")
    };
    // The claim was released: the next delivery can go ahead at once.
    assert_eq!(
        core.processor
            .store()
            .status(&ext("A-1"))
            .await
            .expect("status")
            .record,
        None
    );

    core.sim.sim.set_token(Some(SIM_TOKEN));
    let wrong_base = format!("http://{}/nope", core.sim.addr);
    let other = Processor::new(
        RedisStore::new(REDIS_URL, &core.prefix).expect("store"),
        client_with_token(&wrong_base, SIM_TOKEN, Duration::from_secs(2)),
        core.processor.config().clone(),
    );
    let v = other
        .process(&Inbound {
            body: body("A-2").to_string().into_bytes(),
            ..Inbound::default()
        })
        .await;
    assert!(
        matches!(
            &v.decision,
            Decision::Delay {
                reason: DelayReason::Parked(SystemFault::EndpointNotFound(_)),
                ..
            }
        ),
        "{v:?}"
    );
    core.done().await;
}

#[tokio::test]
async fn redis_unreachable_parks_and_never_posts() {
    // Nothing listens on port 1.
    let core = Core::with(Duration::from_secs(10), "redis://127.0.0.1:1/0").await;
    let v = core.run(body("R-1")).await;
    assert!(
        matches!(
            &v.decision,
            Decision::Delay {
                tier: 0,
                deferrals: 1,
                reason: DelayReason::Parked(SystemFault::Store(_)),
                ..
            }
        ),
        "{v:?}"
    );
    assert_eq!(core.sim.sim.stats().create_requests, 0);
}

#[tokio::test]
async fn transient_failures_go_to_the_next_tier_then_exhaust() {
    let core = Core::new().await;
    core.sim
        .sim
        .update_faults(|f| f.fail_next = Some(FailNext::new(100, 503)));
    let first = core.run(body("T-1")).await;
    let Decision::Delay {
        tier,
        attempts,
        retries,
        deferrals,
        reason: DelayReason::Retry { http_status, .. },
    } = first.decision.clone()
    else {
        panic!("{first:?}")
    };
    assert_eq!(
        (tier, attempts, retries, deferrals, http_status),
        (0, 3, 1, 0, Some(503))
    );

    let second = core
        .run_msg(Inbound {
            body: body("T-1").to_string().into_bytes(),
            attempts,
            retries,
            ..Inbound::default()
        })
        .await;
    let Decision::Delay {
        tier: 1,
        attempts: 6,
        retries: 2,
        ..
    } = second.decision
    else {
        panic!("{second:?}")
    };

    let last = core
        .run_msg(Inbound {
            body: body("T-1").to_string().into_bytes(),
            attempts: 6,
            retries: 2,
            ..Inbound::default()
        })
        .await;
    let Decision::DeadLetter {
        failure, attempts, ..
    } = &last.decision
    else {
        panic!("{last:?}")
    };
    assert_eq!(failure.kind, FailureKind::RetriesExhausted);
    assert_eq!(failure.http_status, Some(503));
    assert_eq!(*attempts, 9);
    // After the first POST every re-POST was preceded by a List (a 5xx may have committed).
    let stats = core.sim.sim.stats();
    let (posts, lists) = (stats.create_requests, stats.list_requests);
    assert_eq!(posts, 9);
    assert_eq!(
        lists, 8,
        "every POST but the very first was preceded by a List"
    );
    core.done().await;
}

#[tokio::test]
async fn a_redelivered_message_lists_before_posting_and_finds_its_group() {
    let core = Core::new().await;
    let id = core.sim.sim.seed_group(1000, "Group RD-1", Some("RD-1"));
    let v = core
        .run_msg(Inbound {
            body: body("RD-1").to_string().into_bytes(),
            redelivered: true,
            ..Inbound::default()
        })
        .await;
    let Decision::Created { event } = &v.decision else {
        panic!("{v:?}")
    };
    assert_eq!(event.org_unit_id, id);
    assert!(event.duplicate);
    assert_eq!(event.attempts, 0, "found before any POST");
    assert_eq!(core.sim.sim.stats().create_requests, 0);
    core.done().await;
}

#[tokio::test]
async fn a_stalled_worker_that_lost_its_lease_does_not_overwrite_the_new_owner() {
    let core = Core::with(Duration::from_millis(600), REDIS_URL).await;
    core.sim.sim.update_faults(|f| f.latency_ms = 1_500);
    let store = core.processor.store();
    let key = store.group_key(&ext("L-1"));
    let work = core.run(body("L-1"));
    // Once the POST is on its way, another worker takes the ext id over.
    let steal = async {
        wait_for("the POST in the air", Duration::from_secs(5), || async {
            (core.sim.sim.stats().creates_received >= 1).then_some(())
        })
        .await;
        take_over_claim(&key, "newer/1").await;
    };
    let (v, ()) = tokio::join!(work, steal);
    // The POST that was in flight still created the group; its event says so, but the
    // newer owner's claim was not overwritten.
    let Decision::Created { event } = &v.decision else {
        panic!("{v:?}")
    };
    assert!(!event.duplicate);
    match store.status(&ext("L-1")).await.expect("status").record {
        Some(StoredRecord::Claimed { owner, .. }) => assert_eq!(owner, "newer/1"),
        other => panic!("the newer owner's claim was overwritten: {other:?}"),
    }
    core.done().await;
}

#[tokio::test]
async fn a_lost_lease_stops_further_posts() {
    let core = Core::with(Duration::from_millis(300), REDIS_URL).await;
    // Every POST fails slowly, so the loop would keep posting if it did not notice.
    core.sim.sim.update_faults(|f| {
        f.latency_ms = 400;
        f.fail_next = Some(FailNext::new(100, 503));
    });
    let store = core.processor.store();
    let key = store.group_key(&ext("L-2"));
    let work = core.run(body("L-2"));
    let steal = take_over_claim(&key, "newer/2");
    let (v, ()) = tokio::join!(work, steal);
    assert!(
        matches!(
            &v.decision,
            Decision::Delay {
                reason: DelayReason::Parked(SystemFault::LeaseLost),
                ..
            }
        ),
        "{v:?}"
    );
    let posts = core.sim.sim.stats().create_requests;
    assert!(
        posts < 3,
        "stopped posting once the lease was lost ({posts} POSTs)"
    );
    core.done().await;
}

#[tokio::test]
async fn a_duplicate_with_different_fields_names_them() {
    let core = Core::new().await;
    core.run(body("D-1")).await;
    let changed = CreateGroup::parse(
        json!({"org_unit_ext_id": "D-1", "org_unit_name": "Renamed", "org_unit_parent_id": 1000, "state": "TX", "city": "Austin"})
            .to_string()
            .as_bytes(),
    )
    .expect("valid");
    let record = match core
        .processor
        .store()
        .status(&ext("D-1"))
        .await
        .expect("status")
        .record
    {
        Some(StoredRecord::Created(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        group_provisioner::pipeline::differing_fields(&changed, &record),
        ["org_unit_name", "state"],
        "personal fields (city) are not fingerprinted, so not compared"
    );
    let same = CreateGroup::parse(body("D-1").to_string().as_bytes()).expect("valid");
    assert!(group_provisioner::pipeline::differing_fields(&same, &record).is_empty());
    core.done().await;
}

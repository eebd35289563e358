//! Every branch of [`Processor::process`], driven through the in-memory fakes with paused
//! tokio time: no broker, no Redis, no HTTP. (The same behaviour against real Redis and
//! convirza-sim is in the integration tests.)

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::command::ExtId;
use crate::retry::RetryPolicy;
use crate::traceparent::Traceparent;

use super::fakes::{Answer, CountingRecorder, FakeApi, FakeStore, StoreOp, When};
use super::*;

const PARENT: i64 = 1000;

fn config() -> ProcessorConfig {
    ProcessorConfig {
        policy: RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max_interval: Duration::from_secs(1),
            max_tries: 3,
            max_retry_after: Duration::from_secs(30),
        },
        tiers: 2,
        lease: Duration::from_secs(3),
        ttl: Duration::from_secs(3600),
        worker_id: "test:1".into(),
        failure_threshold: 100,
        api_timeout: Duration::from_secs(2),
        takeover_margin: Duration::from_secs(1),
        verify_unknown: false,
    }
}

struct Harness {
    p: Processor<FakeStore, FakeApi>,
    rec: Arc<CountingRecorder>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(config())
    }

    fn with(config: ProcessorConfig) -> Harness {
        let rec = Arc::new(CountingRecorder::default());
        let p = Processor::new(FakeStore::default(), FakeApi::default(), config)
            .with_recorder(rec.clone());
        Harness { p, rec }
    }

    fn store(&self) -> &FakeStore {
        self.p.store()
    }

    fn api(&self) -> &FakeApi {
        self.p.api()
    }

    async fn run(&self, msg: Inbound) -> Processed {
        self.p.process(&msg).await
    }
}

fn name(ext: &str) -> String {
    format!("Group {ext}")
}

fn msg(ext: &str) -> Inbound {
    Inbound {
        body: json!({"org_unit_ext_id": ext, "org_unit_name": name(ext), "org_unit_parent_id": PARENT})
            .to_string()
            .into_bytes(),
        ..Inbound::default()
    }
}

fn ext(s: &str) -> ExtId {
    ExtId::parse(s).expect("ext id")
}

fn created(v: &Processed) -> &CreatedEvent {
    match &v.decision {
        Decision::Created { event } => event,
        other => panic!("expected created, got {other:?}"),
    }
}

fn failure(v: &Processed) -> (&Failure, &FailedEvent, u32) {
    match &v.decision {
        Decision::DeadLetter {
            failure,
            event,
            attempts,
        } => (failure, event, *attempts),
        other => panic!("expected a dead letter, got {other:?}"),
    }
}

fn parked(v: &Processed) -> &SystemFault {
    match &v.decision {
        Decision::Delay {
            tier: 0,
            reason: DelayReason::Parked(fault),
            ..
        } => fault,
        other => panic!("expected parked in the first tier, got {other:?}"),
    }
}

fn transient(status: u16) -> ApiError {
    ApiError::Transient {
        status: Some(status),
        message: "unavailable".into(),
        retry_after: None,
        request_id: Some("r-5xx".into()),
    }
}

fn rejected(status: u16) -> ApiError {
    ApiError::Rejected {
        status,
        message: "bad zip".into(),
        request_id: Some("r-4xx".into()),
    }
}

// --- parsing -------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_invalid_command_is_dead_lettered_without_touching_store_or_api() {
    let h = Harness::new();
    let v = h
        .run(Inbound {
            body: json!({"org_unit_ext_id": "I-1", "org_unit_name": "x", "org_unit_parent_id": 0})
                .to_string()
                .into_bytes(),
            attempts: 2,
            ..Inbound::default()
        })
        .await;
    let (f, event, attempts) = failure(&v);
    assert_eq!(f.kind, FailureKind::InvalidCommand);
    assert!(f.message.contains("org_unit_parent_id"), "{}", f.message);
    assert_eq!(
        event.ext_id.as_deref(),
        Some("I-1"),
        "the valid ext id is named"
    );
    assert_eq!(event.error.kind, "invalid_command");
    assert_eq!(attempts, 2, "x-attempts carried unchanged");
    assert_eq!(v.correlation_id.as_deref(), Some("I-1"));

    let v = h
        .run(Inbound {
            body: b"[]".to_vec(),
            message_id: Some("m-9".into()),
            ..Inbound::default()
        })
        .await;
    let (_, event, _) = failure(&v);
    assert_eq!(event.ext_id, None);
    assert_eq!(
        event.correlation_id.as_deref(),
        Some("m-9"),
        "falls back to message_id"
    );
    assert_eq!(h.store().calls(StoreOp::Claim), 0);
    assert_eq!((h.api().posts(), h.api().lists()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn the_trace_id_is_kept_and_the_span_is_the_workers() {
    let h = Harness::new();
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let v = h
        .run(Inbound {
            traceparent: Some(incoming.into()),
            correlation_id: Some("c-1".into()),
            ..msg("T-1")
        })
        .await;
    assert_eq!(v.traceparent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(v.traceparent.to_string(), incoming);
    assert_eq!(v.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(created(&v).correlation_id.as_deref(), Some("c-1"));
    let v = h
        .run(Inbound {
            traceparent: Some("garbage".into()),
            ..msg("T-2")
        })
        .await;
    assert!(
        Traceparent::parse(&v.traceparent.to_string()).is_some(),
        "a new root"
    );
}

// --- the claim -----------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_new_ext_id_is_claimed_posted_recorded_and_released_into_the_record() {
    let h = Harness::new();
    let v = h.run(msg("N-1")).await;
    let event = created(&v);
    assert!(!event.duplicate);
    assert_eq!(event.attempts, 1);
    assert_eq!(event.api_request_id.as_deref(), Some("req-1"));
    assert_eq!(v.http_status, Some(201));
    assert_eq!(
        (h.api().posts(), h.api().lists()),
        (1, 0),
        "no List before a first POST"
    );
    let record = h.store().created(&ext("N-1")).expect("recorded");
    assert_eq!(record.org_unit_id, event.org_unit_id);
    assert_eq!(record.org_unit_name, "Group N-1");
    assert!(
        !record.fingerprint.values().any(|v| v.contains("Group")),
        "hashed"
    );
    assert_eq!(
        h.store().attempt_markers(&ext("N-1")),
        1,
        "marker before the POST"
    );
    assert_eq!(h.store().claimant(&ext("N-1")), None);
    let ttl = config().ttl;
    assert_eq!(
        h.store().created_ttl(&ext("N-1")),
        Some(ttl),
        "kept dedup.ttl"
    );
    assert_eq!(
        h.store().attempt_ttl(&ext("N-1")),
        Some(ttl),
        "kept dedup.ttl"
    );
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_is_answered_until_dedup_ttl_then_found_by_list() {
    let h = Harness::new();
    h.run(msg("E-1")).await;
    tokio::time::advance(config().ttl + Duration::from_secs(1)).await;
    assert_eq!(
        h.store().created(&ext("E-1")),
        None,
        "forgotten after dedup.ttl"
    );
    // Redis forgot, the API did not: the redelivered command finds its group by List.
    let v = h
        .run(Inbound {
            redelivered: true,
            ..msg("E-1")
        })
        .await;
    assert!(created(&v).duplicate);
    assert_eq!(h.api().groups_for("E-1"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_created_record_answers_without_the_api() {
    let h = Harness::new();
    h.run(msg("D-1")).await;
    let again = h
        .run(Inbound {
            attempts: 3,
            ..msg("D-1")
        })
        .await;
    let event = created(&again);
    assert!(event.duplicate);
    assert_eq!(event.attempts, 3, "x-attempts carried, no new POST");
    assert_eq!(
        event.api_request_id.as_deref(),
        Some("req-1"),
        "the original request id"
    );
    assert_eq!(h.api().posts(), 1);
    assert_eq!(h.rec.get("dedup_hit"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_claim_held_elsewhere_defers_to_the_first_tier_without_an_attempt() {
    let h = Harness::new();
    h.store()
        .claim_for(&ext("H-1"), "other/1", Duration::from_secs(30));
    let v = h
        .run(Inbound {
            deferrals: 2,
            attempts: 1,
            retries: 1,
            ..msg("H-1")
        })
        .await;
    assert_eq!(
        v.decision,
        Decision::Delay {
            tier: 0,
            attempts: 1,
            retries: 1,
            deferrals: 3,
            reason: DelayReason::Claimed,
        }
    );
    assert_eq!(h.api().posts(), 0);
    assert_eq!(h.store().claimant(&ext("H-1")).as_deref(), Some("other/1"));
}

#[tokio::test(start_paused = true)]
async fn a_store_that_cannot_claim_parks_and_opens_the_circuit() {
    let h = Harness::new();
    h.store().fail(StoreOp::Claim, 1);
    let v = h.run(msg("S-1")).await;
    assert!(matches!(parked(&v), SystemFault::Store(_)), "{v:?}");
    assert!(matches!(
        h.p.circuit().state(),
        CircuitState::Open {
            fault: SystemFault::Store(_)
        }
    ));
    assert_eq!(h.api().posts(), 0);
}

// --- an earlier attempt may have landed ----------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_attempt_marker_means_list_first_and_a_found_group_is_a_duplicate() {
    let h = Harness::new();
    h.store().put_attempt(&ext("M-1"));
    let id = h.api().seed(PARENT, " group m-1 ", Some("M-1"));
    let v = h.run(msg("M-1")).await;
    let event = created(&v);
    assert_eq!(
        event.org_unit_id, id,
        "matched ignoring case and surrounding spaces"
    );
    assert!(event.duplicate);
    assert_eq!(event.attempts, 0, "found before any POST");
    assert_eq!((h.api().posts(), h.api().lists()), (0, 1));
    assert_eq!(
        h.store().created(&ext("M-1")).map(|r| r.org_unit_id),
        Some(id)
    );
}

#[tokio::test(start_paused = true)]
async fn a_redelivery_lists_first_and_posts_when_nothing_is_found() {
    let h = Harness::new();
    for flag in [
        Inbound {
            redelivered: true,
            ..msg("R-1")
        },
        Inbound {
            attempts: 1,
            ..msg("R-2")
        },
        Inbound {
            replay_count: 1,
            ..msg("R-3")
        },
    ] {
        let v = h.run(flag).await;
        assert!(!created(&v).duplicate);
    }
    assert_eq!((h.api().posts(), h.api().lists()), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn a_name_taken_under_another_ext_id_is_a_name_conflict_without_a_post() {
    let h = Harness::new();
    let other = h.api().seed(PARENT, "Group C-1", Some("SOMEONE-ELSE"));
    let v = h
        .run(Inbound {
            redelivered: true,
            ..msg("C-1")
        })
        .await;
    let (f, event, attempts) = failure(&v);
    assert_eq!(f.kind, FailureKind::NameConflict);
    assert!(f.message.contains("SOMEONE-ELSE") && f.message.contains(&other.to_string()));
    assert_eq!(event.error.kind, "name_conflict");
    assert_eq!(attempts, 0);
    assert_eq!(h.api().posts(), 0);
    assert_eq!(
        h.store().claimant(&ext("C-1")),
        None,
        "the claim is released"
    );
}

#[tokio::test(start_paused = true)]
async fn store_failures_before_a_post_park_without_posting() {
    // A redelivery: the claim does not mark for it, the POST's own marker does.
    for op in [StoreOp::MarkAttempt] {
        let h = Harness::new();
        h.store().fail(op, 1);
        let v = h
            .run(Inbound {
                redelivered: true,
                ..msg("F-1")
            })
            .await;
        assert!(matches!(parked(&v), SystemFault::Store(_)), "{op:?}: {v:?}");
        assert_eq!(h.api().posts(), 0, "{op:?}");
        assert_eq!(h.store().claimant(&ext("F-1")), None, "{op:?}: released");
    }
}

// --- rejections are reconciled -------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_rejection_with_nothing_listed_is_rejected() {
    let h = Harness::new();
    h.api().script([Answer::Fail(rejected(422))]);
    let v = h.run(msg("X-1")).await;
    let (f, event, attempts) = failure(&v);
    assert_eq!(f.kind, FailureKind::Rejected);
    assert_eq!(f.http_status, Some(422));
    assert_eq!(f.api_request_id.as_deref(), Some("r-4xx"));
    assert_eq!(event.error.message, "bad zip");
    assert_eq!(attempts, 1);
    assert_eq!(
        h.api().lists(),
        1,
        "every rejection is checked against the listing"
    );
    assert!(
        !h.p.circuit().is_open(),
        "a rejection is the message's fault"
    );
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_name_under_another_ext_id_is_a_name_conflict() {
    let h = Harness::new();
    h.api().seed(PARENT, "Group X-2", None);
    h.api().script([Answer::Fail(ApiError::DuplicateName {
        message: "name already exists".into(),
        request_id: Some("r-dup".into()),
    })]);
    let v = h.run(msg("X-2")).await;
    let (f, _, _) = failure(&v);
    assert_eq!(f.kind, FailureKind::NameConflict);
    assert_eq!(f.http_status, Some(400));
    assert_eq!(f.api_request_id.as_deref(), Some("r-dup"));
    assert!(f.message.contains("ext id none"), "{}", f.message);
}

#[tokio::test(start_paused = true)]
async fn a_rejection_of_a_group_that_exists_with_our_ext_id_is_success() {
    let h = Harness::new();
    let id = h.api().seed(PARENT, "Group X-3", Some("X-3"));
    h.api().script([Answer::Fail(ApiError::DuplicateName {
        message: "name already exists".into(),
        request_id: None,
    })]);
    let v = h.run(msg("X-3")).await;
    let event = created(&v);
    assert_eq!(event.org_unit_id, id);
    assert!(event.duplicate, "it existed before this delivery posted");
    assert_eq!(event.attempts, 1);
    assert_eq!(h.api().groups_for("X-3"), 1);
}

// --- transient failures --------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn transient_failures_retry_in_process_with_jittered_backoff() {
    let h = Harness::new();
    h.api()
        .script([Answer::Fail(transient(503)), Answer::Create]);
    let started = Instant::now();
    let v = h.run(msg("B-1")).await;
    let event = created(&v);
    assert!(!event.duplicate);
    assert_eq!(event.attempts, 2);
    assert_eq!(h.rec.get("retry"), 1);
    assert!(
        started.elapsed() <= Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        h.api().lists(),
        1,
        "a 5xx may have committed: List before the second POST"
    );
}

#[tokio::test(start_paused = true)]
async fn transient_failures_walk_the_delay_tiers_then_exhaust() {
    let h = Harness::new();
    h.api().script((0..3).map(|_| Answer::Fail(transient(503))));
    let v = h.run(msg("B-2")).await;
    assert_eq!(
        v.decision,
        Decision::Delay {
            tier: 0,
            attempts: 3,
            retries: 1,
            deferrals: 0,
            reason: DelayReason::Retry {
                last_error: transient(503).to_string(),
                http_status: Some(503),
            },
        }
    );
    assert_eq!(
        h.store().claimant(&ext("B-2")),
        None,
        "released for the next delivery"
    );

    h.api().script((0..3).map(|_| Answer::Fail(transient(502))));
    let v = h
        .run(Inbound {
            attempts: 3,
            retries: 1,
            ..msg("B-2")
        })
        .await;
    assert!(
        matches!(
            v.decision,
            Decision::Delay {
                tier: 1,
                attempts: 6,
                retries: 2,
                ..
            }
        ),
        "{v:?}"
    );

    h.api().script((0..3).map(|_| Answer::Fail(transient(504))));
    let v = h
        .run(Inbound {
            attempts: 6,
            retries: 2,
            ..msg("B-2")
        })
        .await;
    let (f, _, attempts) = failure(&v);
    assert_eq!(f.kind, FailureKind::RetriesExhausted);
    assert_eq!(f.http_status, Some(504));
    assert_eq!(attempts, 9);
    assert_eq!(h.api().groups_for("B-2"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lost_answer_after_commit_is_found_by_list_and_is_not_a_duplicate() {
    let h = Harness::new();
    h.api()
        .script([Answer::CommitThen(ApiError::UnknownOutcome {
            message: "timed out".into(),
        })]);
    let v = h.run(msg("U-1")).await;
    let event = created(&v);
    assert!(!event.duplicate, "this delivery's own POST created it");
    assert_eq!(event.attempts, 1);
    assert_eq!(h.api().posts(), 1, "found by List instead of posting again");
    assert_eq!(h.api().groups_for("U-1"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_list_that_fails_transiently_is_retried_and_a_4xx_list_is_empty() {
    let h = Harness::new();
    h.store().put_attempt(&ext("L-1"));
    h.api().fail_lists([transient(503)]);
    let v = h.run(msg("L-1")).await;
    assert!(!created(&v).duplicate);
    assert_eq!(h.rec.get("retry"), 1);
    assert_eq!((h.api().posts(), h.api().lists()), (1, 2));

    h.api().fail_lists([rejected(404)]);
    let v = h
        .run(Inbound {
            redelivered: true,
            ..msg("L-2")
        })
        .await;
    assert!(
        !created(&v).duplicate,
        "nothing found under a parent List refuses"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_waits_out_retry_after_capped() {
    let h = Harness::new();
    h.api().script([
        Answer::Fail(ApiError::RateLimited {
            retry_after: Some(Duration::from_secs(5)),
        }),
        Answer::Create,
    ]);
    let started = Instant::now();
    let v = h.run(msg("Q-1")).await;
    assert!(!created(&v).duplicate);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_millis(5_100),
        "{waited:?}"
    );

    h.api().script([
        Answer::Fail(ApiError::RateLimited {
            retry_after: Some(Duration::from_secs(86_400)),
        }),
        Answer::Create,
    ]);
    let started = Instant::now();
    h.run(msg("Q-2")).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
        "capped at retry.max_retry_after: {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_holds_back_the_other_deliveries_too() {
    let h = Harness::new();
    h.api().script([Answer::Fail(ApiError::RateLimited {
        retry_after: Some(Duration::from_secs(5)),
    })]);
    let first = h.run(msg("Q-3"));
    let second = async {
        // Starts once the first delivery has hit the 429.
        while h.api().posts() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let started = Instant::now();
        let v = h.run(msg("Q-4")).await;
        (v, started.elapsed())
    };
    let (_, (v, waited)) = tokio::join!(first, second);
    assert!(!created(&v).duplicate);
    assert!(
        waited >= Duration::from_secs(4),
        "the account-wide pause: {waited:?}"
    );
}

// --- faults of the system ------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn credential_and_endpoint_faults_park_and_open_the_circuit() {
    for (error, expected) in [
        (
            ApiError::Unauthorized {
                status: 401,
                message: "token revoked".into(),
            },
            "unauthorized",
        ),
        (
            ApiError::EndpointNotFound {
                path: "POST /groups".into(),
            },
            "endpoint_not_found",
        ),
        (
            ApiError::Auth {
                message: "login refused".into(),
                transient: false,
            },
            "unauthorized",
        ),
    ] {
        let h = Harness::new();
        h.api().script([Answer::Fail(error.clone())]);
        let v = h
            .run(Inbound {
                deferrals: 4,
                ..msg("P-1")
            })
            .await;
        assert_eq!(parked(&v).label(), expected, "{error:?}");
        let Decision::Delay {
            attempts,
            deferrals,
            retries,
            ..
        } = v.decision
        else {
            unreachable!()
        };
        assert_eq!((attempts, deferrals, retries), (1, 5, 0), "{error:?}");
        assert!(h.p.circuit().is_open(), "{error:?}");
        assert_eq!(h.store().claimant(&ext("P-1")), None, "{error:?}: released");
    }
}

#[tokio::test(start_paused = true)]
async fn a_login_outage_is_retried_not_parked() {
    let h = Harness::new();
    h.api().script([
        Answer::Fail(ApiError::Auth {
            message: "login answered 503".into(),
            transient: true,
        }),
        Answer::Create,
    ]);
    let v = h.run(msg("P-2")).await;
    assert_eq!(created(&v).attempts, 2);
    assert!(!h.p.circuit().is_open());
}

#[tokio::test(start_paused = true)]
async fn a_run_of_transient_failures_opens_the_circuit_instead_of_a_tier() {
    let h = Harness::with(ProcessorConfig {
        failure_threshold: 3,
        ..config()
    });
    h.api().script((0..3).map(|_| Answer::Fail(transient(503))));
    let v = h.run(msg("P-3")).await;
    assert!(matches!(parked(&v), SystemFault::ApiDown(_)), "{v:?}");
    assert!(matches!(
        h.p.circuit().state(),
        CircuitState::Open {
            fault: SystemFault::ApiDown(_)
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_parks_without_calling_the_api() {
    let h = Harness::new();
    h.p.circuit().trip(SystemFault::Store("down".into()));
    let v = h.run(msg("P-4")).await;
    assert_eq!(parked(&v), &SystemFault::CircuitOpen);
    assert_eq!((h.api().posts(), h.api().lists()), (0, 0));
    assert_eq!(h.store().claimant(&ext("P-4")), None);
    assert_eq!(
        h.p.circuit().state(),
        CircuitState::Open {
            fault: SystemFault::Store("down".into())
        },
        "the first fault is kept"
    );
}

// --- leases and fencing --------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_lost_lease_stops_further_posts() {
    let h = Harness::new();
    h.api().set_post_latency(Duration::from_secs(2));
    h.api().script((0..3).map(|_| Answer::Fail(transient(503))));
    let work = h.run(msg("LL-1"));
    let steal = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.store()
            .claim_for(&ext("LL-1"), "newer/1", Duration::from_secs(30));
    };
    let (v, ()) = tokio::join!(work, steal);
    assert_eq!(parked(&v), &SystemFault::LeaseLost);
    assert_eq!(h.api().posts(), 1, "no POST after the lease was lost");
    assert!(
        !h.p.circuit().is_open(),
        "a lost lease concerns this message only"
    );
    assert_eq!(h.store().claimant(&ext("LL-1")).as_deref(), Some("newer/1"));
}

#[tokio::test(start_paused = true)]
async fn a_post_that_lands_after_a_takeover_does_not_overwrite_the_new_owner() {
    let h = Harness::new();
    h.api().set_post_latency(Duration::from_secs(2));
    let work = h.run(msg("LL-2"));
    let steal = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.store()
            .claim_for(&ext("LL-2"), "newer/2", Duration::from_secs(30));
    };
    let (v, ()) = tokio::join!(work, steal);
    assert!(
        !created(&v).duplicate,
        "the in-flight POST created the group"
    );
    assert_eq!(h.store().claimant(&ext("LL-2")).as_deref(), Some("newer/2"));
    assert_eq!(h.store().created(&ext("LL-2")), None);
}

#[tokio::test(start_paused = true)]
async fn a_group_created_after_another_was_recorded_is_an_orphan() {
    let h = Harness::new();
    h.api().set_post_latency(Duration::from_secs(2));
    let theirs = CreatedRecord {
        org_unit_id: 9999,
        created_at: "2026-11-26T00:00:00Z".into(),
        api_request_id: None,
        org_unit_name: "Group LL-3".into(),
        org_unit_parent_id: PARENT,
        fingerprint: Default::default(),
        message_id: None,
        found_at: None,
    };
    let work = h.run(msg("LL-3"));
    let record = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.store().put_created(&ext("LL-3"), theirs.clone());
    };
    let (v, ()) = tokio::join!(work, record);
    let event = created(&v);
    assert_eq!(
        event.org_unit_id, 9999,
        "the event names the recorded group"
    );
    assert!(
        event.duplicate,
        "this delivery did not create the recorded group"
    );
    assert_eq!(h.rec.get("orphan"), 1, "our group is reported as an orphan");
    assert_eq!(
        h.api().groups_for("LL-3"),
        1,
        "the orphan exists in the API"
    );
    assert_eq!(
        h.store().created(&ext("LL-3")),
        Some(theirs),
        "never overwritten"
    );
}

#[tokio::test(start_paused = true)]
async fn renewal_failures_do_not_stop_the_work() {
    let h = Harness::new();
    h.store().fail(StoreOp::Renew, u32::MAX);
    h.api().set_post_latency(Duration::from_secs(5));
    let v = h.run(msg("LL-4")).await;
    assert!(!created(&v).duplicate);
    assert!(
        h.store().calls(StoreOp::Renew) >= 4,
        "renewed every third of the lease"
    );
    assert!(
        h.store().created(&ext("LL-4")).is_some(),
        "no claim left: the record is written"
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_failing_after_the_post_still_reports_what_happened() {
    let h = Harness::new();
    h.store().fail(StoreOp::Record, 1);
    let v = h.run(msg("W-1")).await;
    assert!(
        !created(&v).duplicate,
        "the group exists; the event says so"
    );
    assert_eq!(h.store().created(&ext("W-1")), None);

    h.store().fail(StoreOp::Release, 1);
    h.api().script([Answer::Fail(rejected(400))]);
    let v = h.run(msg("W-2")).await;
    assert_eq!(failure(&v).0.kind, FailureKind::Rejected, "decided anyway");
}

// --- store calls whose reply is lost after they took effect --------------------------

#[tokio::test(start_paused = true)]
async fn a_claim_whose_reply_was_lost_parks_and_holds_the_ext_id_until_its_lease_ends() {
    let h = Harness::new();
    h.store().fail_when(StoreOp::Claim, 1, When::After);
    let v = h.run(msg("A-1")).await;
    assert!(matches!(parked(&v), SystemFault::Store(_)), "{v:?}");
    assert_eq!(h.api().posts(), 0);
    let holder = h
        .store()
        .claimant(&ext("A-1"))
        .expect("the claim was taken");
    assert!(holder.starts_with("test:1/"), "{holder}");
    h.p.circuit().close();
    let v = h.run(msg("A-1")).await;
    assert_eq!(
        v.decision,
        Decision::Delay {
            tier: 0,
            attempts: 0,
            retries: 0,
            deferrals: 1,
            reason: DelayReason::Claimed
        },
        "held by the lost claim until its lease ends"
    );
    tokio::time::advance(config().lease).await;
    assert!(!created(&h.run(msg("A-1")).await).duplicate);
    assert_eq!(h.api().groups_for("A-1"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_marker_whose_reply_was_lost_makes_the_next_delivery_list_first() {
    let h = Harness::new();
    h.store().fail_when(StoreOp::MarkAttempt, 1, When::After);
    let v = h
        .run(Inbound {
            redelivered: true,
            ..msg("A-2")
        })
        .await;
    assert!(matches!(parked(&v), SystemFault::Store(_)), "{v:?}");
    assert_eq!(h.api().posts(), 0, "no POST without a confirmed marker");
    h.p.circuit().close();
    let v = h.run(msg("A-2")).await;
    assert!(!created(&v).duplicate);
    assert_eq!(
        (h.api().posts(), h.api().lists()),
        (1, 2),
        "the redelivery listed; then the marker exists: List first again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fresh_command_is_claimed_and_marked_in_one_store_call() {
    let h = Harness::new();
    let v = h.run(msg("PM-1")).await;
    assert!(!created(&v).duplicate);
    assert_eq!(
        (
            h.store().calls(StoreOp::Claim),
            h.store().calls(StoreOp::HasAttempt),
            h.store().calls(StoreOp::MarkAttempt),
            h.store().calls(StoreOp::Record),
        ),
        (1, 0, 0, 1),
        "two store calls on the happy path"
    );
    assert_eq!((h.api().posts(), h.api().lists()), (1, 0));
    // A duplicate is one store call.
    let v = h.run(msg("PM-1")).await;
    assert!(created(&v).duplicate);
    assert_eq!(h.store().calls(StoreOp::Claim), 2);
    assert_eq!(h.store().calls(StoreOp::Record), 1);
    // A redelivery is not marked by its claim: it may look the group up first.
    let h = Harness::new();
    h.run(Inbound {
        redelivered: true,
        ..msg("PM-2")
    })
    .await;
    assert_eq!(h.store().calls(StoreOp::MarkAttempt), 1);
}

#[tokio::test(start_paused = true)]
async fn a_claim_that_marked_but_lost_its_reply_makes_the_next_delivery_wait_and_list() {
    let h = Harness::new();
    h.store().fail_when(StoreOp::Claim, 1, When::After);
    let v = h.run(msg("PM-3")).await;
    assert!(matches!(parked(&v), SystemFault::Store(_)), "{v:?}");
    assert_eq!(h.api().posts(), 0);
    assert!(h.store().marker_open(&ext("PM-3")), "the claim marked");
    h.p.circuit().close();
    tokio::time::advance(config().lease + Duration::from_millis(10)).await;
    let v = h.run(msg("PM-3")).await;
    assert!(!created(&v).duplicate);
    assert_eq!(
        (h.api().posts(), h.api().lists()),
        (1, 1),
        "the marker exists: List first, then POST"
    );
}

#[tokio::test(start_paused = true)]
async fn a_premark_that_went_stale_is_written_again_before_the_post() {
    let h = Harness::new();
    // A rate-limit pause between the claim and the POST: the claim's mark is too old.
    h.p.circuit().pause_for(Duration::from_secs(5));
    let v = h.run(msg("PM-4")).await;
    assert!(!created(&v).duplicate);
    assert_eq!(h.store().calls(StoreOp::MarkAttempt), 1, "marked again");
    assert_eq!(h.api().posts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_record_whose_reply_was_lost_still_reports_the_group_once() {
    let h = Harness::new();
    h.store().fail_when(StoreOp::Record, 1, When::After);
    let first = created(&h.run(msg("A-3")).await).clone();
    assert!(!first.duplicate);
    let again = h.run(msg("A-3")).await;
    assert_eq!(created(&again).org_unit_id, first.org_unit_id);
    assert!(
        created(&again).duplicate,
        "the record was written after all"
    );
    assert_eq!(h.api().posts(), 1);
}

// --- a record this version cannot read -----------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_unreadable_record_is_replaced_and_the_group_found_by_list() {
    let h = Harness::new();
    h.store()
        .put_unreadable(&ext("UR-1"), "{\"state\":\"from-the-future\"}");
    let id = h.api().seed(PARENT, "Group UR-1", Some("UR-1"));
    let v = h.run(msg("UR-1")).await;
    let event = created(&v);
    assert_eq!(event.org_unit_id, id);
    assert!(event.duplicate);
    assert_eq!(
        (h.api().posts(), h.api().lists()),
        (0, 1),
        "List first: no POST"
    );
    assert_eq!(
        h.store().created(&ext("UR-1")).map(|r| r.org_unit_id),
        Some(id),
        "repaired"
    );
    assert!(!h.p.circuit().is_open(), "it concerns this ext id only");

    h.store().put_unreadable(&ext("UR-2"), "garbage");
    let v = h.run(msg("UR-2")).await;
    assert!(
        !created(&v).duplicate,
        "nothing found: this delivery created it"
    );
    assert_eq!(h.api().groups_for("UR-2"), 1);
    assert!(!h.p.circuit().is_open());
}

// --- takeovers, names that changed, Redis that forgot ------------------------------

#[tokio::test(start_paused = true)]
async fn a_takeover_waits_out_a_post_that_may_still_be_in_the_air() {
    let h = Harness::new();
    // A delivery that never settled posted "Old name" just now; its group landed.
    h.store()
        .put_marker(&ext("TO-1"), true, &[(PARENT, "Old name")]);
    let id = h.api().seed(PARENT, "Old name", Some("TO-1"));
    let started = Instant::now();
    let v = h.run(msg("TO-1")).await;
    let must_end = config().api_timeout + config().takeover_margin;
    assert!(started.elapsed() >= must_end, "{:?}", started.elapsed());
    let event = created(&v);
    assert_eq!(
        event.org_unit_id, id,
        "found under the name that was posted"
    );
    assert_eq!(
        event.org_unit_name, "Old name",
        "the event names the group as it is"
    );
    assert!(event.duplicate);
    assert_eq!(h.api().posts(), 0);
    assert_eq!(h.api().groups_for("TO-1"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_settled_marker_is_not_waited_for_but_its_names_are_looked_up() {
    let h = Harness::new();
    h.store()
        .put_marker(&ext("TO-2"), false, &[(PARENT, "Old name")]);
    let started = Instant::now();
    let v = h.run(msg("TO-2")).await;
    assert!(started.elapsed() < Duration::from_millis(10), "no wait");
    assert!(
        !created(&v).duplicate,
        "nothing found: this delivery created it"
    );
    assert_eq!(
        (h.api().posts(), h.api().lists()),
        (1, 2),
        "both names looked up"
    );
}

#[tokio::test(start_paused = true)]
async fn a_renamed_command_finds_the_group_an_earlier_post_created() {
    let h = Harness::new();
    // The first delivery's POST commits, but its answer is lost and the retries fail.
    h.api()
        .script([Answer::CommitThen(ApiError::UnknownOutcome {
            message: "timed out".into(),
        })]);
    h.api().fail_lists((0..3).map(|_| transient(503)));
    let v = h.run(msg("RN-1")).await;
    assert!(
        matches!(v.decision, Decision::Delay { tier: 0, .. }),
        "{v:?}"
    );
    // Upstream renames the command before it comes back.
    let renamed = Inbound {
        body: json!({"org_unit_ext_id": "RN-1", "org_unit_name": "Renamed", "org_unit_parent_id": PARENT})
            .to_string()
            .into_bytes(),
        attempts: 1,
        retries: 1,
        ..Inbound::default()
    };
    let v = h.run(renamed).await;
    let event = created(&v);
    assert_eq!(
        event.org_unit_name, "Group RN-1",
        "found under the name that was posted"
    );
    assert_eq!(h.api().groups_for("RN-1"), 1, "no second group");
    assert_eq!(h.api().posts(), 1);
}

#[tokio::test(start_paused = true)]
async fn verify_unknown_finds_a_group_redis_forgot_under_any_name() {
    // Redis lost everything; upstream renamed the command meanwhile.
    let lost = |verify_unknown| async move {
        let h = Harness::with(ProcessorConfig {
            verify_unknown,
            ..config()
        });
        h.api().seed(PARENT, "Alpha", Some("CRM-42"));
        let renamed = Inbound {
            body: json!({"org_unit_ext_id": "CRM-42", "org_unit_name": "Alpha (renamed upstream)", "org_unit_parent_id": PARENT})
                .to_string()
                .into_bytes(),
            ..Inbound::default()
        };
        let v = h.run(renamed).await;
        (created(&v).clone(), h.api().groups_for("CRM-42"))
    };
    let (event, groups) = lost(true).await;
    assert!(event.duplicate);
    assert_eq!(event.org_unit_name, "Alpha");
    assert_eq!(groups, 1, "with dedup.verify_unknown: found by ext id");
    let (event, groups) = lost(false).await;
    assert!(!event.duplicate);
    assert_eq!(groups, 2, "without it, the documented gap: a second group");
}

#[tokio::test(start_paused = true)]
async fn a_post_is_never_sent_once_the_claim_is_gone() {
    let h = Harness::new();
    h.api().script([Answer::Fail(transient(503))]);
    h.api().set_post_latency(Duration::from_secs(1));
    let work = h.run(msg("GONE-1"));
    let steal = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.store()
            .claim_for(&ext("GONE-1"), "newer/1", Duration::from_secs(30));
    };
    let (v, ()) = tokio::join!(work, steal);
    assert_eq!(parked(&v), &SystemFault::LeaseLost);
    assert_eq!(
        h.api().posts(),
        1,
        "the retry found the claim gone before marking"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_hands_back_claims_but_keeps_the_marker_open() {
    let h = Harness::new();
    h.api().set_post_latency(Duration::from_secs(10));
    let work = h.run(msg("SD-1"));
    let cut = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(h.store().claimant(&ext("SD-1")).is_some());
        assert_eq!(h.p.release_held().await, 1);
    };
    tokio::select! {
        _ = work => panic!("the POST takes 10 s"),
        () = cut => {}
    }
    assert_eq!(
        h.store().claimant(&ext("SD-1")),
        None,
        "the claim is handed back"
    );
    assert!(
        h.store().marker_open(&ext("SD-1")),
        "the POST may be in the air"
    );
}

// --- the last outcome, for `status` ------------------------------------------------------

fn tier_places() -> Vec<TierPlace> {
    ["5s", "1m"]
        .iter()
        .zip([5, 60])
        .map(|(label, secs)| TierPlace {
            queue: format!("work.retry.{label}"),
            label: (*label).to_owned(),
            delay: Duration::from_secs(secs),
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn created_and_duplicate_are_kept_with_the_store_calls_that_decide_them() {
    let h = Harness::new();
    let first = Inbound {
        message_id: Some("m-1".into()),
        ..msg("LO-1")
    };
    let v = h.run(first.clone()).await;
    let id = created(&v).org_unit_id;
    let outcomes_written = || h.store().calls(StoreOp::Outcome);
    h.p.report(&first, &v, Outcome::Created, &tier_places(), "dlq")
        .await;
    assert_eq!(
        outcomes_written(),
        0,
        "no extra store call for a created group"
    );
    let last = h
        .store()
        .last_outcome(OutcomeKey::ExtId(&ext("LO-1")))
        .expect("kept");
    assert_eq!(
        (last.outcome.as_str(), last.org_unit_id, last.attempts),
        ("created", Some(id), 1)
    );
    assert_eq!(last.message_id.as_deref(), Some("m-1"));
    assert_eq!(
        h.store()
            .created(&ext("LO-1"))
            .and_then(|r| r.message_id)
            .as_deref(),
        Some("m-1")
    );

    let again = Inbound {
        message_id: Some("m-2".into()),
        ..msg("LO-1")
    };
    let v = h.run(again.clone()).await;
    h.p.report(&again, &v, Outcome::Duplicate, &tier_places(), "dlq")
        .await;
    assert_eq!(outcomes_written(), 0, "no extra store call for a duplicate");
    let last = h
        .store()
        .last_outcome(OutcomeKey::ExtId(&ext("LO-1")))
        .expect("kept");
    assert_eq!(
        (last.outcome.as_str(), last.message_id.as_deref()),
        ("duplicate", Some("m-2"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_rejection_and_an_invalid_command_are_kept_after_they_settle() {
    let h = Harness::new();
    h.api().script([Answer::Fail(rejected(422))]);
    let m = msg("LO-2");
    let v = h.run(m.clone()).await;
    h.p.report(&m, &v, Outcome::DeadLettered, &tier_places(), "the.dlq")
        .await;
    let last = h
        .store()
        .last_outcome(OutcomeKey::ExtId(&ext("LO-2")))
        .expect("kept");
    assert_eq!(
        (
            last.outcome.as_str(),
            last.error_kind.as_deref(),
            last.http_status
        ),
        ("dead_lettered", Some("rejected"), Some(422))
    );
    assert_eq!(
        last.place,
        Place::DeadLetterQueue {
            queue: "the.dlq".into()
        }
    );

    let invalid = Inbound {
        body: b"{not json".to_vec(),
        message_id: Some("m-bad".into()),
        ..Inbound::default()
    };
    let v = h.run(invalid.clone()).await;
    h.p.report(
        &invalid,
        &v,
        Outcome::DeadLettered,
        &tier_places(),
        "the.dlq",
    )
    .await;
    let last = h
        .store()
        .last_outcome(OutcomeKey::MessageId("m-bad"))
        .expect("kept by message id");
    assert_eq!(last.error_kind.as_deref(), Some("invalid_command"));
    assert_eq!(last.ext_id, None);
}

#[tokio::test(start_paused = true)]
async fn a_store_fault_is_not_reported_to_the_store_that_is_failing() {
    let h = Harness::new();
    h.store().fail(StoreOp::Claim, 1);
    let m = msg("LO-3");
    let v = h.run(m.clone()).await;
    assert_eq!(parked(&v).label(), "redis");
    h.p.report(&m, &v, Outcome::Deferred, &tier_places(), "dlq")
        .await;
    // The circuit is open for Redis now: a delivery parked by it is not reported either.
    let m = msg("LO-4");
    let v = h.run(m.clone()).await;
    h.p.report(&m, &v, Outcome::Deferred, &tier_places(), "dlq")
        .await;
    assert_eq!(h.store().calls(StoreOp::Outcome), 0);

    // A transient failure is reported, with the tier it waits in.
    let h = Harness::new();
    h.api()
        .script([transient(503), transient(503), transient(503)].map(Answer::Fail));
    let m = msg("LO-5");
    let v = h.run(m.clone()).await;
    h.p.report(&m, &v, Outcome::Deferred, &tier_places(), "dlq")
        .await;
    let last = h
        .store()
        .last_outcome(OutcomeKey::ExtId(&ext("LO-5")))
        .expect("kept");
    assert_eq!(
        (last.outcome.as_str(), last.reason.as_deref()),
        ("deferred", Some("transient"))
    );
    assert!(matches!(last.place, Place::DelayQueue { ref tier, .. } if tier == "5s"));
}

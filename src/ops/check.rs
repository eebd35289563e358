//! `check`: can this configuration run? Config, RabbitMQ (+ topology), Redis, the API
//! (authenticated, read-only). One line per item; the caller exits 0 only when all pass.

use std::fmt::Display;
use std::time::Duration;

use lapin::types::ShortString;

use crate::amqp::topology::{self, Topology};
use crate::amqp::verify::{self, EstablishError, Established};
use crate::app;
use crate::config::Declare;
use crate::config::Settings;
use crate::pipeline::DedupStore;

/// The items checked. As text, each line is printed as it is known; with `--json`, one
/// object at the end: `{"ok", "failed", "items": [{"status", "item", "detail"}]}`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub failed: usize,
    json: bool,
    items: Vec<(&'static str, String, String)>,
}

impl CheckReport {
    fn line(&mut self, item: &str, result: Result<String, impl Display>) {
        match result {
            Ok(detail) => self.push("ok", item, detail),
            Err(reason) => {
                self.failed += 1;
                self.push("FAIL", item, reason.to_string());
            }
        }
    }

    /// Worth knowing, not a failure.
    fn warn(&mut self, item: &str, detail: String) {
        self.push("WARN", item, detail);
    }

    fn push(&mut self, status: &'static str, item: &str, detail: String) {
        if !self.json {
            outln!("{status:<5} {item:<10} {detail}");
        }
        self.items.push((status, item.to_owned(), detail));
    }

    /// With `--json`: the one object, printed once everything is known.
    fn finish(&self) {
        if self.json {
            let items: Vec<serde_json::Value> = self
                .items
                .iter()
                .map(|(status, item, detail)| {
                    serde_json::json!({"status": status.to_ascii_lowercase(), "item": item, "detail": detail})
                })
                .collect();
            outln!(
                "{}",
                serde_json::json!({"ok": self.failed == 0, "failed": self.failed, "items": items})
            );
        }
    }
}

/// Whether a pass over the DLQ / the unrouted events runs now (`None`: cannot tell). A
/// note of a pass that is not running means it was killed.
type PassesRunning = (Option<bool>, Option<bool>);

pub async fn run(
    settings: &Settings,
    config_source: &str,
    declare: bool,
    json: bool,
) -> CheckReport {
    let mut report = CheckReport {
        json,
        ..CheckReport::default()
    };
    report.line("config", Ok::<_, String>(config_source.to_owned()));
    let passes = check_broker(&mut report, settings, declare).await;
    let store = app::dedup_store(settings);
    let redis_ok = check_redis(&mut report, settings, &store).await;
    if let (Ok(store), true) = (&store, redis_ok) {
        check_unfinished_passes(&mut report, settings, store, passes).await;
    }
    check_api(&mut report, settings, &store).await;
    report.finish();
    report
}

/// The broker's items of `check` (rabbitmq, topology, dlq, events) as (status, item,
/// detail), printed nowhere: what the console's overview shows. The topology is
/// established as the worker would (`topology.declare`).
pub async fn broker_items(settings: &Settings) -> Vec<(&'static str, String, String)> {
    let mut report = CheckReport {
        json: true,
        ..CheckReport::default()
    };
    let declare = settings.topology.declare == Declare::All;
    check_broker(&mut report, settings, declare).await;
    report.items
}

/// rabbitmq, topology, dlq, events.
async fn check_broker(
    report: &mut CheckReport,
    settings: &Settings,
    declare: bool,
) -> PassesRunning {
    let (conn, _channel, node) = match super::connect(settings, "check").await {
        Ok(c) => c,
        Err(e) => {
            report.line("rabbitmq", Err(e));
            report.line("topology", Err("skipped: no broker connection"));
            return (None, None);
        }
    };
    let urls = settings.amqp.url.urls();
    let reached = match urls.get(node) {
        Some(url) if urls.len() > 1 => {
            format!("{url} (node {} of {} answered)", node + 1, urls.len())
        }
        _ => settings.amqp.url.to_string(),
    };
    report.line(
        "rabbitmq",
        Ok::<_, String>(format!("{reached}; {}", app::amqp_tls_state(settings))),
    );
    let topology = Topology::new(&settings.topology, &settings.retry.delays);
    check_topology(report, settings, &topology, &conn, node, declare).await;
    check_unrouted(report, &topology, &conn).await;
    let passes = (
        crate::ops::dlq::pass_running(&conn, &topology.dead_letter_queue).await,
        crate::ops::dlq::pass_running(&conn, &topology.unrouted_events).await,
    );
    if let Some((holding, waiting)) = crate::ops::dlq::interrupted_migration(&conn, &topology).await
    {
        report.line(
            "dlq",
            Err(format!(
                "a dlq migrate was interrupted: {waiting} dead letters wait in {holding}; run `group-provisioner dlq migrate` again"
            )),
        );
    }
    let _ = conn.close(200, ShortString::from("check done")).await;
    passes
}

/// The topology as the worker establishes it: declared, or verified where this user may
/// not (or `--no-declare`, `topology.declare = "verify"`: must not) declare it.
async fn check_topology(
    report: &mut CheckReport,
    settings: &Settings,
    topology: &Topology,
    conn: &lapin::Connection,
    node: usize,
    declare: bool,
) {
    let mut settings = settings.clone();
    if !declare {
        settings.topology.declare = Declare::Verify;
    }
    let work = verify::establish(&settings, conn, node, topology, None);
    let established = match tokio::time::timeout(Duration::from_secs(60), work).await {
        Ok(Ok(established)) => established,
        // Without the management API, `--no-declare` still checks that everything exists.
        Ok(Err(EstablishError::Unusable {
            line,
            unreadable: true,
            ..
        })) if !declare => return check_existence(report, topology, conn, line).await,
        Ok(Err(e)) => return report.line("topology", Err(e.to_string())),
        Err(_) => return report.line("topology", Err("no answer within 60s")),
    };
    let counts = format!(
        "{} exchanges, {} queues",
        topology.exchanges.len(),
        topology.queues.len()
    );
    let how = match &established {
        Established::Declared(_) => format!("declared {counts}"),
        Established::Verified { refused: None, .. } => {
            format!("verified {counts} (read through the management API)")
        }
        Established::Verified {
            refused: Some(_), ..
        } => format!(
            "verified {counts} (this user may not declare them; read through the management API)"
        ),
    };
    let declared = established.declared();
    if declared.legacy_event_exchange.is_some() {
        report.warn(
            "events",
            topology::legacy_event_exchange_advice(
                &topology.event_exchange,
                &topology.unrouted_events,
            ),
        );
    }
    report.line("topology", Ok::<_, String>(how));
    report_dead_letter_queue(
        report,
        topology,
        declared.legacy_dead_letter_queue.is_some(),
    );
}

/// `--no-declare` where the management API cannot be read: every exchange and queue must
/// exist (passive declares, a channel each, since a missing one closes the channel); their
/// arguments are not compared, which is said.
async fn check_existence(
    report: &mut CheckReport,
    topology: &Topology,
    conn: &lapin::Connection,
    unread: String,
) {
    let mut missing = Vec::new();
    for e in &topology.exchanges {
        let present = match conn.create_channel().await {
            Ok(ch) => crate::amqp::passive_exchange(&ch, &e.name).await.is_ok(),
            Err(_) => false,
        };
        if !present {
            missing.push(format!("exchange {}", e.name));
        }
    }
    for q in &topology.queues {
        if !matches!(crate::ops::queue_depth(conn, &q.name).await, Ok(Some(_))) {
            missing.push(format!("queue {}", q.name));
        }
    }
    if !missing.is_empty() {
        return report.line("topology", Err(format!("missing: {}", missing.join(", "))));
    }
    report.warn(
        "topology",
        format!("{unread}; only the existence of each exchange and queue was checked"),
    );
    report.line(
        "topology",
        Ok::<_, String>(format!(
            "{} exchanges, {} queues present (arguments not compared)",
            topology.exchanges.len(),
            topology.queues.len()
        )),
    );
}

/// Events nobody is bound for: the worker goes on, but someone is missing them.
async fn check_unrouted(report: &mut CheckReport, topology: &Topology, conn: &lapin::Connection) {
    let Ok(Some(waiting)) = crate::ops::queue_depth(conn, &topology.unrouted_events).await else {
        return;
    };
    let unrouted = if waiting == 0 {
        Ok(format!(
            "no unrouted events in {}",
            topology.unrouted_events
        ))
    } else {
        Err(format!(
            "{} nobody is bound for {} in {}: bind a queue to {} for both routing keys, then run `group-provisioner events replay-unrouted`",
            crate::text::count(u64::from(waiting), "event", "events"),
            if waiting == 1 { "waits" } else { "wait" },
            topology.unrouted_events,
            topology.event_exchange
        ))
    };
    report.line("events", unrouted);
}

/// redis: whether it answered.
async fn check_redis(
    report: &mut CheckReport,
    settings: &Settings,
    store: &Result<crate::dedup::RedisStore, crate::pipeline::StoreError>,
) -> bool {
    let redis = match store {
        Ok(s) => match tokio::time::timeout(Duration::from_secs(5), s.ping()).await {
            Ok(Ok(())) => Ok(format!(
                "{}; {}",
                settings.redis.describe(),
                app::redis_tls_state(settings)
            )),
            Ok(Err(e)) => Err(format!("{}: {e}", settings.redis.describe())),
            Err(_) => Err(format!(
                "{}: no answer within 5s",
                settings.redis.describe()
            )),
        },
        Err(e) => Err(e.to_string()),
    };
    let ok = redis.is_ok();
    report.line("redis", redis);
    if let (true, Ok(store)) = (ok, store) {
        check_eviction(report, store).await;
    }
    ok
}

/// A Redis that may evict the dedup records fails (or, with no limit set yet, warns).
async fn check_eviction(report: &mut CheckReport, store: &crate::dedup::RedisStore) {
    let eviction = match tokio::time::timeout(Duration::from_secs(5), store.eviction()).await {
        Ok(Ok(eviction)) => eviction,
        Ok(Err(e)) => crate::dedup::Eviction::Unknown(e.to_string()),
        Err(_) => crate::dedup::Eviction::Unknown("no answer within 5s".into()),
    };
    match eviction.advice() {
        Some(text) if eviction.fails_check() => report.line("redis", Err(text)),
        Some(text) => report.warn("redis", text),
        None => {}
    }
}

/// The notes of passes killed before they gave their queue back in order.
async fn check_unfinished_passes(
    report: &mut CheckReport,
    settings: &Settings,
    store: &crate::dedup::RedisStore,
    passes: PassesRunning,
) {
    let topology = &settings.topology;
    for (item, queue, running) in [
        ("dlq", &topology.dead_letter_queue, passes.0),
        ("events", &topology.unrouted_events, passes.1),
    ] {
        let Some(running) = running else { continue };
        if let Some(text) = crate::ops::dlq::marker::unfinished(store, queue, running).await {
            report.warn(item, text);
        }
    }
}

/// api: an authenticated call that creates nothing.
async fn check_api(
    report: &mut CheckReport,
    settings: &Settings,
    store: &Result<crate::dedup::RedisStore, crate::pipeline::StoreError>,
) {
    let api = match store {
        Ok(s) => match app::api_client(settings, s, &format!("{}/check", app::worker_id())) {
            Ok(client) => client
                .list_child_groups(None, None, 1, 0, None)
                .await
                .map(|page| {
                    format!(
                        "{} (authenticated; {} child groups visible)",
                        settings.api.base_url,
                        page.total.unwrap_or(0)
                    )
                })
                .map_err(|e| format!("{}: {e}", settings.api.base_url)),
            Err(e) => Err(e.to_string()),
        },
        Err(_) => Err("skipped: the login session needs Redis".into()),
    };
    report.line("api", api);
    for warning in settings.api.cleartext_warnings() {
        report.warn("api", warning);
    }
}

/// A DLQ of an earlier version fails the check: dead letters are at risk on RabbitMQ 4.x.
fn report_dead_letter_queue(report: &mut CheckReport, topology: &Topology, legacy: bool) {
    let result = if legacy {
        Err(topology::legacy_dead_letter_queue_advice(
            &topology.dead_letter_queue,
        ))
    } else {
        Ok(format!(
            "{} keeps dead letters however often they are inspected",
            topology.dead_letter_queue
        ))
    };
    report.line("dlq", result);
}

//! `check`: can this configuration run? Config, RabbitMQ (+ topology), Redis, the API
//! (authenticated, read-only). One line per item; exit 0 only when all pass.

use std::process::ExitCode;
use std::time::Duration;

use lapin::ExchangeKind;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::{FieldTable, ShortString};

use crate::amqp::topology::Topology;
use crate::config::Settings;
use crate::dedup::RedisStore;

use super::connect;

struct Report {
    failed: usize,
}

impl Report {
    fn line(&mut self, item: &str, result: Result<String, String>) {
        match result {
            Ok(detail) => println!("ok    {item:<10} {detail}"),
            Err(reason) => {
                self.failed += 1;
                println!("FAIL  {item:<10} {reason}");
            }
        }
    }
}

pub async fn run(settings: &Settings, config_source: &str, declare: bool) -> ExitCode {
    let mut report = Report { failed: 0 };
    report.line("config", Ok(config_source.to_owned()));

    match connect(settings, "check").await {
        Err(e) => {
            report.line("rabbitmq", Err(e));
            report.line("topology", Err("skipped: no broker connection".into()));
        }
        Ok((conn, channel)) => {
            report.line("rabbitmq", Ok(settings.amqp.url.to_string()));
            let topology = Topology::new(&settings.topology, &settings.retry.delays);
            let result = if declare {
                topology
                    .declare(&channel)
                    .await
                    .map(|()| {
                        format!(
                            "declared {} exchanges, {} queues",
                            topology.exchanges.len(),
                            topology.queues.len()
                        )
                    })
                    .map_err(|e| e.to_string())
            } else {
                verify(&conn, &topology).await
            };
            report.line("topology", result);
            let _ = conn.close(200, ShortString::from("check done")).await;
        }
    }

    let store = RedisStore::new(settings.redis.url.expose(), &settings.redis.key_prefix);
    let redis = match &store {
        Ok(s) => match tokio::time::timeout(Duration::from_secs(5), s.ping()).await {
            Ok(Ok(())) => Ok(settings.redis.url.to_string()),
            Ok(Err(e)) => Err(format!("{}: {e}", settings.redis.url)),
            Err(_) => Err(format!("{}: no answer within 5s", settings.redis.url)),
        },
        Err(e) => Err(e.to_string()),
    };
    report.line("redis", redis);

    let api = match &store {
        Ok(s) => match crate::worker::build_client(
            settings,
            s,
            &format!("{}/check", crate::worker::worker_id()),
        ) {
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

    if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `--no-declare`: every exchange and queue must already exist (passive declares, one
/// channel each, since a missing one closes the channel).
async fn verify(conn: &lapin::Connection, topology: &Topology) -> Result<String, String> {
    let mut missing = Vec::new();
    for e in &topology.exchanges {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        let kind = if e.kind == "topic" {
            ExchangeKind::Topic
        } else {
            ExchangeKind::Direct
        };
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        if ch
            .exchange_declare(
                ShortString::from(e.name.as_str()),
                kind,
                passive,
                FieldTable::default(),
            )
            .await
            .is_err()
        {
            missing.push(format!("exchange {}", e.name));
        }
    }
    for q in &topology.queues {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        if crate::amqp::ready_count(&ch, &q.name).await.is_err() {
            missing.push(format!("queue {}", q.name));
        }
    }
    if missing.is_empty() {
        Ok(format!(
            "{} exchanges, {} queues present (not declared)",
            topology.exchanges.len(),
            topology.queues.len()
        ))
    } else {
        Err(format!("missing: {}", missing.join(", ")))
    }
}

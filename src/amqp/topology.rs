//! The topology, declared idempotently at start (re-declaring is a no-op; a queue that
//! exists with different arguments makes the broker refuse, which stops start-up with the
//! broker's reason rather than running against a half-matching topology).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::{DelayTier, TopologySettings};

/// One queue as the code declares it: the single source for declaring it and for
/// comparing with `deploy/rabbitmq/definitions.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    pub arguments: Vec<(&'static str, ArgValue)>,
    /// (exchange, routing key) bindings.
    pub bindings: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    Str(String),
    Int(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    pub name: String,
    /// `topic` or `direct`.
    pub kind: &'static str,
}

/// Everything the worker declares, in declaration order.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub exchanges: Vec<ExchangeSpec>,
    pub queues: Vec<QueueSpec>,
}

fn s(v: &str) -> ArgValue {
    ArgValue::Str(v.to_owned())
}

impl Topology {
    pub fn new(t: &TopologySettings, tiers: &[DelayTier]) -> Topology {
        let exchanges = vec![
            ExchangeSpec {
                name: t.command_exchange.clone(),
                kind: "topic",
            },
            ExchangeSpec {
                name: t.dead_letter_exchange.clone(),
                kind: "direct",
            },
            ExchangeSpec {
                name: t.event_exchange.clone(),
                kind: "topic",
            },
        ];
        let mut queues = vec![
            QueueSpec {
                name: t.work_queue.clone(),
                arguments: vec![
                    ("x-queue-type", s("quorum")),
                    ("x-dead-letter-exchange", s(&t.dead_letter_exchange)),
                    ("x-dead-letter-routing-key", s(&t.dead_letter_queue)),
                    // Broker-side dead-lettering (delivery limit) must not lose messages.
                    ("x-dead-letter-strategy", s("at-least-once")),
                    ("x-overflow", s("reject-publish")),
                    (
                        "x-delivery-limit",
                        ArgValue::Int(i64::from(t.delivery_limit)),
                    ),
                ],
                bindings: vec![(t.command_exchange.clone(), t.command_routing_key.clone())],
            },
            QueueSpec {
                name: t.dead_letter_queue.clone(),
                arguments: vec![("x-queue-type", s("quorum"))],
                bindings: vec![(t.dead_letter_exchange.clone(), t.dead_letter_queue.clone())],
            },
        ];
        for tier in tiers {
            queues.push(QueueSpec {
                name: t.delay_queue(tier),
                arguments: vec![
                    ("x-queue-type", s("quorum")),
                    (
                        "x-message-ttl",
                        ArgValue::Int(i64::try_from(tier.delay.as_millis()).unwrap_or(i64::MAX)),
                    ),
                    ("x-dead-letter-exchange", s(&t.command_exchange)),
                    ("x-dead-letter-routing-key", s(&t.command_routing_key)),
                    // Expiry back into the command exchange is a move, not a copy: it must
                    // be confirmed, or a broker failure could drop the command.
                    ("x-dead-letter-strategy", s("at-least-once")),
                    ("x-overflow", s("reject-publish")),
                ],
                bindings: Vec::new(),
            });
        }
        Topology { exchanges, queues }
    }

    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for exchange in &self.exchanges {
            let kind = match exchange.kind {
                "topic" => ExchangeKind::Topic,
                _ => ExchangeKind::Direct,
            };
            channel
                .exchange_declare(
                    ShortString::from(exchange.name.as_str()),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }
        for queue in &self.queues {
            channel
                .queue_declare(
                    ShortString::from(queue.name.as_str()),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    queue.field_table(),
                )
                .await?;
            for (exchange, key) in &queue.bindings {
                channel
                    .queue_bind(
                        ShortString::from(queue.name.as_str()),
                        ShortString::from(exchange.as_str()),
                        ShortString::from(key.as_str()),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

impl Topology {
    /// The topology as a RabbitMQ definitions document (management plugin format), for
    /// `deploy/rabbitmq/definitions.json`.
    pub fn to_definitions(&self, vhost: &str) -> serde_json::Value {
        use serde_json::{Map, Value, json};
        let exchanges: Vec<Value> = self
            .exchanges
            .iter()
            .map(|e| {
                json!({"name": e.name, "vhost": vhost, "type": e.kind, "durable": true,
                       "auto_delete": false, "internal": false, "arguments": {}})
            })
            .collect();
        let queues: Vec<Value> = self
            .queues
            .iter()
            .map(|q| {
                let args: Map<String, Value> = q
                    .arguments
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            ArgValue::Str(s) => Value::from(s.as_str()),
                            ArgValue::Int(n) => Value::from(*n),
                        };
                        ((*k).to_owned(), v)
                    })
                    .collect();
                json!({"name": q.name, "vhost": vhost, "durable": true, "auto_delete": false, "arguments": args})
            })
            .collect();
        let bindings: Vec<Value> = self
            .queues
            .iter()
            .flat_map(|q| {
                q.bindings.iter().map(move |(exchange, key)| {
                    json!({"source": exchange, "vhost": vhost, "destination": q.name,
                           "destination_type": "queue", "routing_key": key, "arguments": {}})
                })
            })
            .collect();
        json!({"exchanges": exchanges, "queues": queues, "bindings": bindings})
    }
}

impl QueueSpec {
    pub fn field_table(&self) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in &self.arguments {
            let value = match v {
                ArgValue::Str(text) => AMQPValue::LongString(LongString::from(text.as_str())),
                ArgValue::Int(n) => AMQPValue::LongLongInt(*n),
            };
            table.insert(ShortString::from(*k), value);
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    /// `deploy/rabbitmq/definitions.json` must be exactly what the code declares, so the
    /// two never drift. On a mismatch the expected document is printed: replace the file
    /// with it.
    #[test]
    fn definitions_file_matches_the_code() {
        let settings = Settings::from_toml("[api]\ntoken = \"t\"\n").expect("defaults");
        let expected =
            Topology::new(&settings.topology, &settings.retry.delays).to_definitions("/");
        let file: serde_json::Value =
            serde_json::from_str(include_str!("../../deploy/rabbitmq/definitions.json"))
                .expect("definitions.json is JSON");
        for section in ["exchanges", "queues", "bindings"] {
            assert_eq!(
                file[section],
                expected[section],
                "deploy/rabbitmq/definitions.json {section} drifted from the code; expected:\n{}",
                serde_json::to_string_pretty(&expected).unwrap_or_default()
            );
        }
    }

    #[test]
    fn default_topology_names() {
        let settings = Settings::from_toml("[api]\ntoken = \"t\"\n").expect("defaults");
        let t = Topology::new(&settings.topology, &settings.retry.delays);
        let names: Vec<_> = t.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "provisioning.group.create",
                "provisioning.group.create.dlq",
                "provisioning.group.create.retry.5s",
                "provisioning.group.create.retry.30s",
                "provisioning.group.create.retry.2m",
                "provisioning.group.create.retry.10m",
                "provisioning.group.create.retry.30m",
            ]
        );
        let ttl = t.queues[4]
            .arguments
            .iter()
            .find(|(k, _)| *k == "x-message-ttl")
            .map(|(_, v)| v.clone());
        assert_eq!(ttl, Some(ArgValue::Int(120_000)));
        let limit = t.queues[0]
            .arguments
            .iter()
            .find(|(k, _)| *k == "x-delivery-limit")
            .map(|(_, v)| v.clone());
        assert_eq!(limit, Some(ArgValue::Int(10)));
    }
}

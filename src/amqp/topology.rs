//! The topology, declared idempotently at start (re-declaring is a no-op; a queue that
//! exists with different arguments makes the broker refuse, which stops start-up with the
//! broker's reason rather than running against a half-matching topology).
//!
//! One exception: a DLQ declared by an earlier version without its delivery limit
//! ([`DLQ_DELIVERY_LIMIT`]) is used as it is and reported ([`Declared::legacy_dead_letter_queue`]),
//! because the worker only ever publishes to it; what it puts at risk is inspection, which
//! the `dlq` tools guard themselves (see `ops::dlq::reader`).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};

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
    /// `topic`, `direct` or `fanout`.
    pub kind: &'static str,
    pub arguments: Vec<(&'static str, ArgValue)>,
}

/// Everything the worker declares, in declaration order.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub exchanges: Vec<ExchangeSpec>,
    pub queues: Vec<QueueSpec>,
    /// Which of `queues` is the DLQ.
    pub dead_letter_queue: String,
    /// Which of `exchanges` carries the events, and the name of its alternate exchange
    /// and queue.
    pub event_exchange: String,
    pub unrouted_events: String,
}

/// The DLQ's own delivery limit. RabbitMQ 4.x gives every quorum queue a delivery limit of
/// 20 when it has none, and counts every message a consumer hands back, which is how the
/// `dlq` tools read without removing: without a limit of its own the DLQ would drop a dead
/// letter after about 20 inspections. `-1` ("no limit" on 4.x) makes RabbitMQ 3.x drop every
/// message at its first return, so the largest limit both read the same way.
pub const DLQ_DELIVERY_LIMIT: i64 = 2_147_483_647;

/// What a declaration found that it tolerated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Declared {
    /// The broker's words when the DLQ exists with other arguments than this version
    /// declares (an earlier version declared it without [`DLQ_DELIVERY_LIMIT`]).
    pub legacy_dead_letter_queue: Option<String>,
    /// The broker's words when the event exchange exists without the alternate exchange
    /// (an earlier version declared it): unless a policy sets one, an event no queue is
    /// bound for comes back to the worker.
    pub legacy_event_exchange: Option<String>,
}

/// How the DLQ's arguments compare with this version's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterQueueState {
    /// Declared with this version's arguments (or just created with them).
    Current,
    /// Exists exactly as an earlier version declared it (no delivery limit); the broker's
    /// words.
    Legacy(String),
    /// Could not be compared (the user may not declare it); why.
    Unknown(String),
}

/// What to tell an operator about a DLQ declared by an earlier version, in plain words.
pub fn legacy_dead_letter_queue_advice(queue: &str) -> String {
    format!(
        "dead-letter queue {queue:?} was declared by an earlier version without its own \
         delivery limit: on RabbitMQ 4.x each `dlq` inspection spends one of the 20 \
         deliveries the broker allows, after which it drops the dead letter; run \
         `group-provisioner dlq migrate` (docs/operations.md \"Migrating the DLQ\")"
    )
}

/// What to tell an operator about an event exchange without the alternate exchange: an
/// earlier version declared it so, or a consumer that started before any worker declared
/// it itself. Whether a policy sets one cannot be seen from a client.
pub fn legacy_event_exchange_advice(exchange: &str, unrouted: &str) -> String {
    format!(
        "event exchange {exchange:?} has no alternate exchange (declared by an earlier version, \
         or by a consumer that started before any worker and declared it without \
         `alternate-exchange`): unless a policy sets `alternate-exchange` to {unrouted:?}, an \
         event no queue is bound for stalls the worker (it keeps that command and opens the \
         circuit, pausing all consumption, until a queue is bound); re-declare it with the \
         argument or add the policy: docs/operations.md \"Events nobody is bound for\""
    )
}

fn s(v: &str) -> ArgValue {
    ArgValue::Str(v.to_owned())
}

/// The exchanges, in declaration order.
fn exchanges(t: &TopologySettings) -> Vec<ExchangeSpec> {
    let exchange = |name: &String, kind, arguments| ExchangeSpec {
        name: name.clone(),
        kind,
        arguments,
    };
    vec![
        exchange(&t.command_exchange, "topic", Vec::new()),
        exchange(&t.dead_letter_exchange, "direct", Vec::new()),
        // An event no queue is bound for goes to the alternate exchange and waits in
        // its queue, instead of coming back to the worker (which would have to stop).
        exchange(&t.unrouted_events, "fanout", Vec::new()),
        exchange(
            &t.event_exchange,
            "topic",
            vec![("alternate-exchange", s(&t.unrouted_events))],
        ),
    ]
}

/// The delay queue of one tier: its messages expire back into the command exchange.
fn delay_queue(t: &TopologySettings, tier: &DelayTier) -> QueueSpec {
    QueueSpec {
        name: t.delay_queue(tier),
        arguments: vec![
            ("x-queue-type", s("quorum")),
            (
                "x-message-ttl",
                ArgValue::Int(i64::try_from(tier.delay.as_millis()).unwrap_or(i64::MAX)),
            ),
            ("x-dead-letter-exchange", s(&t.command_exchange)),
            ("x-dead-letter-routing-key", s(&t.command_routing_key)),
            // Expiry back into the command exchange is a move, not a copy: it must be
            // confirmed, or a broker failure could drop the command.
            ("x-dead-letter-strategy", s("at-least-once")),
            ("x-overflow", s("reject-publish")),
        ],
        bindings: Vec::new(),
    }
}

impl Topology {
    pub fn new(t: &TopologySettings, tiers: &[DelayTier]) -> Topology {
        let exchanges = exchanges(t);
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
                arguments: vec![
                    ("x-queue-type", s("quorum")),
                    ("x-delivery-limit", ArgValue::Int(DLQ_DELIVERY_LIMIT)),
                ],
                bindings: vec![(t.dead_letter_exchange.clone(), t.dead_letter_queue.clone())],
            },
        ];
        queues.extend(tiers.iter().map(|tier| delay_queue(t, tier)));
        queues.push(QueueSpec {
            name: t.unrouted_events.clone(),
            arguments: vec![("x-queue-type", s("quorum"))],
            bindings: vec![(t.unrouted_events.clone(), String::new())],
        });
        Topology {
            exchanges,
            queues,
            dead_letter_queue: t.dead_letter_queue.clone(),
            event_exchange: t.event_exchange.clone(),
            unrouted_events: t.unrouted_events.clone(),
        }
    }

    fn dead_letter_spec(&self) -> Option<&QueueSpec> {
        self.queues
            .iter()
            .find(|q| q.name == self.dead_letter_queue)
    }

    /// Declare the DLQ alone, on a channel of its own (a refused declare closes its
    /// channel), and say whether it has this version's arguments. A refusal for any other
    /// reason than differing arguments is an error.
    pub async fn dead_letter_queue_state(
        &self,
        conn: &Connection,
    ) -> Result<DeadLetterQueueState, lapin::Error> {
        let Some(spec) = self.dead_letter_spec() else {
            return Ok(DeadLetterQueueState::Current);
        };
        let side = conn.create_channel().await?;
        let first = match spec.declare(&side).await {
            Ok(()) => {
                let _ = side.close(200, ShortString::from("declared")).await;
                return Ok(DeadLetterQueueState::Current);
            }
            Err(e) if super::is_soft(&e, AMQPSoftError::ACCESSREFUSED) => {
                return Ok(DeadLetterQueueState::Unknown(e.to_string()));
            }
            Err(e) => e,
        };
        // Only another delivery limit is compared (`PRECONDITION_FAILED - inequivalent arg
        // 'x-delivery-limit' ...`); any other difference (a classic DLQ, say) still stops
        // start-up.
        let Some(words) = differing_argument(&first, "x-delivery-limit") else {
            return Err(first);
        };
        // The broker names only the first argument that differs. The DLQ is an earlier
        // version's only if it is exactly what that version declared: the same arguments
        // without the delivery limit. Anything else (a TTL, a limit someone set) is a
        // mismatch that stops start-up, as before.
        let earlier = QueueSpec {
            arguments: spec
                .arguments
                .iter()
                .filter(|(k, _)| *k != "x-delivery-limit")
                .cloned()
                .collect(),
            ..spec.clone()
        };
        let side = conn.create_channel().await?;
        match earlier.declare(&side).await {
            Ok(()) => {
                let _ = side.close(200, ShortString::from("declared")).await;
                Ok(DeadLetterQueueState::Legacy(words))
            }
            Err(_) => Err(first),
        }
    }

    pub async fn declare(
        &self,
        conn: &Connection,
        channel: &Channel,
    ) -> Result<Declared, lapin::Error> {
        let mut declared = Declared::default();
        for exchange in &self.exchanges {
            if exchange.name == self.event_exchange && !exchange.arguments.is_empty() {
                // On a channel of its own: an earlier version's exchange (no alternate
                // exchange) is refused, and the refusal closes the channel.
                let side = conn.create_channel().await?;
                match declare_exchange(&side, exchange).await {
                    Ok(()) => {
                        let _ = side.close(200, ShortString::from("declared")).await;
                    }
                    Err(e) => match differing_argument(&e, "alternate-exchange") {
                        Some(words) => declared.legacy_event_exchange = Some(words),
                        None => return Err(e),
                    },
                }
                continue;
            }
            declare_exchange(channel, exchange).await?;
        }
        for queue in &self.queues {
            if queue.name == self.dead_letter_queue {
                match self.dead_letter_queue_state(conn).await? {
                    DeadLetterQueueState::Legacy(words) => {
                        declared.legacy_dead_letter_queue = Some(words);
                    }
                    DeadLetterQueueState::Current => {}
                    // Declaring is what the worker does; it needs the permission anyway.
                    DeadLetterQueueState::Unknown(_) => queue.declare(channel).await?,
                }
            } else {
                queue.declare(channel).await?;
            }
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
        Ok(declared)
    }
}

impl ExchangeSpec {
    pub fn exchange_kind(&self) -> ExchangeKind {
        match self.kind {
            "topic" => ExchangeKind::Topic,
            "fanout" => ExchangeKind::Fanout,
            _ => ExchangeKind::Direct,
        }
    }
}

async fn declare_exchange(channel: &Channel, exchange: &ExchangeSpec) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            ShortString::from(exchange.name.as_str()),
            exchange.exchange_kind(),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            args_table(&exchange.arguments),
        )
        .await
}

/// The broker's words when it refused a declaration because argument `name` differs.
fn differing_argument(e: &lapin::Error, name: &str) -> Option<String> {
    let ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    let precondition = matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    );
    let words = amqp.get_message().as_str();
    (precondition && words.contains(&format!("inequivalent arg '{name}'")))
        .then(|| words.to_owned())
}

fn args_table(arguments: &[(&'static str, ArgValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in arguments {
        let value = match v {
            ArgValue::Str(text) => AMQPValue::LongString(LongString::from(text.as_str())),
            ArgValue::Int(n) => AMQPValue::LongLongInt(*n),
        };
        table.insert(ShortString::from(*k), value);
    }
    table
}

impl QueueSpec {
    /// Declare this queue (durable, with its arguments); its bindings are not declared.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        channel
            .queue_declare(
                ShortString::from(self.name.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args_table(&self.arguments),
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn args_json(arguments: &[(&'static str, ArgValue)]) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = arguments
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    ArgValue::Str(s) => serde_json::Value::from(s.as_str()),
                    ArgValue::Int(n) => serde_json::Value::from(*n),
                };
                ((*k).to_owned(), v)
            })
            .collect();
        serde_json::Value::Object(map)
    }

    impl Topology {
        /// The topology as a RabbitMQ definitions document (management plugin format), for
        /// `deploy/rabbitmq/definitions.json`.
        fn to_definitions(&self, vhost: &str) -> serde_json::Value {
            use serde_json::{Value, json};
            let exchanges: Vec<Value> = self
                .exchanges
                .iter()
                .map(|e| {
                    json!({"name": e.name, "vhost": vhost, "type": e.kind, "durable": true,
                       "auto_delete": false, "internal": false,
                       "arguments": args_json(&e.arguments)})
                })
                .collect();
            let queues: Vec<Value> = self
                .queues
                .iter()
                .map(|q| {
                    json!({"name": q.name, "vhost": vhost, "durable": true, "auto_delete": false,
                       "arguments": args_json(&q.arguments)})
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
                "provisioning.events.unrouted",
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

//! A topology someone else declared (`topology.declare = "verify"`, or a user the broker
//! refuses `configure`): read through RabbitMQ's management HTTP API and compared with
//! what the worker would declare — each exchange's kind and arguments, each queue's type
//! and arguments (an argument may also come from a policy), the bindings, and no argument
//! or policy that would drop or expire messages where the worker declares none. The worker
//! runs on it only when nothing it relies on differs; every difference is named.
//!
//! Invariants:
//! - nothing is created or changed: only GETs, so a user without `configure` can do it,
//!   and no AMQP channel is closed by the broker on the way (lapin logs such a close as an
//!   error, and a verification that passes must be quiet);
//! - the two differences an earlier version's declaration leaves (a DLQ without its own
//!   delivery limit, an event exchange without the alternate exchange) are reported as
//!   declaring reports them ([`Declared`]), not as failures: the worker ran on them before;
//! - the comparison is a pure function of what was read ([`compare`]).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use lapin::protocol::AMQPSoftError;
use lapin::types::ShortString;

use super::topology::{ArgValue, Declared, ExchangeSpec, QueueSpec, Topology};
use crate::config::{AmqpSettings, Declare, Settings};

/// How the topology came to be there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Established {
    Declared(Declared),
    /// Verified: declared by someone else. `refused`: the broker's words when declaring
    /// was tried and refused for want of `configure`.
    Verified {
        declared: Declared,
        refused: Option<String>,
    },
}

impl Established {
    pub fn declared(&self) -> &Declared {
        match self {
            Established::Declared(d) | Established::Verified { declared: d, .. } => d,
        }
    }
}

/// Why the worker cannot run on this broker's topology.
#[derive(Debug, thiserror::Error)]
pub enum EstablishError {
    /// Declaring failed for another reason than a permission (a broker fault, or an
    /// object that exists with other arguments): the broker's words.
    #[error("cannot declare the topology: {0}")]
    Declare(String),
    /// The topology differs from what the worker relies on (`unreadable`: false), or could
    /// not be read at all (true). `line` names what, the permission and the fix;
    /// `refused`: the broker's words if declaring was refused.
    #[error("{line}")]
    Unusable {
        line: String,
        unreadable: bool,
        refused: Option<String>,
    },
}

/// Declare the topology (`topology.declare = "all"`), or verify it where this user may not
/// or must not declare it. `refused`: the broker's words from an earlier refusal to
/// declare (then it is not asked again). The caller bounds how long it may take.
pub async fn establish(
    settings: &Settings,
    conn: &lapin::Connection,
    node: usize,
    topology: &Topology,
    mut refused: Option<String>,
) -> Result<Established, EstablishError> {
    if settings.topology.declare == Declare::All && refused.is_none() {
        match declare(conn, topology).await {
            Ok(declared) => return Ok(Established::Declared(declared)),
            Err(e) if super::is_soft(&e, AMQPSoftError::ACCESSREFUSED) => {
                refused = Some(super::broker_words(&e));
            }
            Err(e) => return Err(EstablishError::Declare(e.to_string())),
        }
    }
    let urls = settings.amqp.url.urls();
    let vhost = super::vhost(urls[node % urls.len()].expose());
    let declare_fix = match &refused {
        Some(words) => format!(
            "this user may not declare it ({words}): import deploy/rabbitmq/definitions.json \
             into vhost {vhost:?}, or grant the user `configure` on the topology's names"
        ),
        None => format!(
            "declare it as deploy/rabbitmq/definitions.json does (or import that file into \
             vhost {vhost:?}), or set topology.declare = \"all\" for a user with `configure`"
        ),
    };
    let seen = match Management::for_node(&settings.amqp, node) {
        Ok(api) => api.observe(topology).await,
        Err(e) => Err(e),
    };
    let seen = seen.map_err(|e| {
        let declare = match &refused {
            Some(words) => format!("; declaring it is refused too ({words})"),
            None => String::new(),
        };
        EstablishError::Unusable {
            line: format!("cannot verify the topology: {e}{declare}"),
            unreadable: true,
            refused: refused.clone(),
        }
    })?;
    let (problems, declared) = compare(topology, &seen);
    if problems.is_empty() {
        return Ok(Established::Verified { declared, refused });
    }
    Err(EstablishError::Unusable {
        line: format!(
            "the topology in vhost {vhost:?} is not what the worker relies on: {}; {declare_fix}",
            problems.join("; ")
        ),
        unreadable: false,
        refused,
    })
}

/// Declare on a channel of its own (a refusal closes the channel it happens on).
async fn declare(conn: &lapin::Connection, topology: &Topology) -> Result<Declared, lapin::Error> {
    let side = conn.create_channel().await?;
    let declared = topology.declare(conn, &side).await?;
    let _ = side.close(200, ShortString::from("declared")).await;
    Ok(declared)
}

/// The management API of one broker node, read with the AMQP user's credentials.
pub struct Management {
    client: reqwest::Client,
    base: reqwest::Url,
    user: String,
    password: String,
    vhost: String,
}

/// What the management API said of each object (`None`: it does not exist).
#[derive(Debug, Default)]
pub struct Observed {
    pub exchanges: HashMap<String, Option<Value>>,
    pub queues: HashMap<String, Option<Value>>,
    /// Per queue: its (exchange, routing key) bindings.
    pub bindings: HashMap<String, Vec<(String, String)>>,
}

/// Why the topology could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("the management API at {url} (amqp.management_url): {why}")]
pub struct ReadError {
    pub url: String,
    pub why: String,
}

impl Management {
    /// For the node `amqp.url` names at `node`: `amqp.management_url` if set, otherwise
    /// that node's host on port 15672 (15671 for `amqps`).
    pub fn for_node(settings: &AmqpSettings, node: usize) -> Result<Management, ReadError> {
        let urls = settings.url.urls();
        let raw = urls[node % urls.len()].expose();
        let fail = |why: String| ReadError {
            url: settings
                .management_url
                .clone()
                .unwrap_or_else(|| "(from amqp.url)".into()),
            why,
        };
        let uri: lapin::uri::AMQPUri = raw.parse().map_err(|e: String| fail(e))?;
        let tls = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
        let base = match &settings.management_url {
            Some(url) => url.clone(),
            // Guessed only beside a default AMQP port: another port says another broker
            // (or a proxy) whose management port cannot be guessed.
            None if [5672, 5671].contains(&uri.authority.port) => {
                let (scheme, port) = if tls {
                    ("https", 15671)
                } else {
                    ("http", 15672)
                };
                let host = &uri.authority.host;
                if host.contains(':') {
                    format!("{scheme}://[{host}]:{port}")
                } else {
                    format!("{scheme}://{host}:{port}")
                }
            }
            None => {
                return Err(fail(format!(
                    "not set, and AMQP port {} is not a default one, so the management API's \
                     address cannot be guessed: set amqp.management_url",
                    uri.authority.port
                )));
            }
        };
        let base = reqwest::Url::parse(&base).map_err(|e| fail(e.to_string()))?;
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &settings.tls.ca_pem {
            for cert in
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| fail(e.to_string()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Management {
            client: builder.build().map_err(|e| fail(e.to_string()))?,
            base,
            user: uri.authority.userinfo.username,
            password: uri.authority.userinfo.password,
            vhost: uri.vhost,
        })
    }

    fn url(&self, kind: &str, name: &str, tail: Option<&str>) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["api", kind, &self.vhost, name]);
            path.extend(tail);
        }
        url
    }

    /// GET one object; `None` when it does not exist.
    async fn get(&self, url: reqwest::Url) -> Result<Option<Value>, ReadError> {
        let shown = url.to_string();
        let fail = |why: String| ReadError {
            url: self.base.to_string(),
            why,
        };
        let response = self
            .client
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| fail(crate::text::error_chain(&e)))?;
        match response.status() {
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => response
                .json()
                .await
                .map(Some)
                .map_err(|e| fail(format!("{shown}: {e}"))),
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
                Err(fail(format!(
                    "{} for user {:?}: it needs the `management` tag (read-only; `rabbitmqctl \
                 set_user_tags {} management`)",
                    response.status(),
                    self.user,
                    self.user
                )))
            }
            s => Err(fail(format!("{shown}: HTTP {s}"))),
        }
    }

    /// Read every object of `topology`.
    pub async fn observe(&self, topology: &Topology) -> Result<Observed, ReadError> {
        let mut seen = Observed::default();
        for e in &topology.exchanges {
            let found = self.get(self.url("exchanges", &e.name, None)).await?;
            seen.exchanges.insert(e.name.clone(), found);
        }
        for q in &topology.queues {
            let found = self.get(self.url("queues", &q.name, None)).await?;
            if found.is_some() && !q.bindings.is_empty() {
                let list = self
                    .get(self.url("queues", &q.name, Some("bindings")))
                    .await?
                    .unwrap_or_default();
                let pairs = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| (text(&b["source"]), text(&b["routing_key"])))
                    .collect();
                seen.bindings.insert(q.name.clone(), pairs);
            }
            seen.queues.insert(q.name.clone(), found);
        }
        Ok(seen)
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn matches(want: &ArgValue, got: &Value) -> bool {
    match want {
        ArgValue::Str(s) => got.as_str() == Some(s.as_str()),
        ArgValue::Int(i) => got.as_i64() == Some(*i),
    }
}

fn show(v: &ArgValue) -> String {
    match v {
        ArgValue::Str(s) => format!("{s:?}"),
        ArgValue::Int(i) => i.to_string(),
    }
}

/// An argument's value as the broker applies it, from the object's own arguments and its
/// effective policy (`x-foo` is `foo` there; it includes the operator policy): a limit is
/// the smaller of the two, `overflow` is the policy's first, anything else the argument's
/// first (RabbitMQ's quorum queue rules).
fn effective(object: &Value, key: &str) -> Option<Value> {
    let own = object["arguments"].get(key);
    let policy = object["effective_policy_definition"].get(key.strip_prefix("x-").unwrap_or(key));
    let smaller = |a: &Value, b: &Value| match (a.as_i64(), b.as_i64()) {
        (Some(x), Some(y)) if y < x => b.clone(),
        _ => a.clone(),
    };
    match (own, policy) {
        // A limit's effective value is the smaller of the queue's and its policy's.
        (Some(a), Some(p)) if key == "x-delivery-limit" || LOSSY.contains(&key) => {
            Some(smaller(a, p))
        }
        (Some(_), Some(p)) if key == "x-overflow" => Some(p.clone()),
        (own, policy) => own.or(policy).cloned(),
    }
}

/// What differs between `topology` and what was read: the problems (empty: the worker
/// can run on it), and the tolerated differences of an earlier version.
pub fn compare(topology: &Topology, seen: &Observed) -> (Vec<String>, Declared) {
    let mut problems = Vec::new();
    let mut declared = Declared::default();
    for e in &topology.exchanges {
        match seen.exchanges.get(&e.name).and_then(Option::as_ref) {
            None => problems.push(format!("exchange {} is missing", e.name)),
            Some(found) => compare_exchange(topology, e, found, &mut problems, &mut declared),
        }
    }
    for q in &topology.queues {
        match seen.queues.get(&q.name).and_then(Option::as_ref) {
            None => problems.push(format!("queue {} is missing", q.name)),
            Some(found) => {
                compare_queue(topology, q, found, &mut problems, &mut declared);
                let bound = seen.bindings.get(&q.name);
                for (exchange, key) in &q.bindings {
                    let has = |b: &Vec<(String, String)>| {
                        b.iter().any(|(e, k)| e == exchange && k == key)
                    };
                    if !bound.is_some_and(has) {
                        problems.push(format!(
                            "queue {} is not bound to exchange {exchange} with routing key {key:?}",
                            q.name
                        ));
                    }
                }
            }
        }
    }
    (problems, declared)
}

fn compare_exchange(
    topology: &Topology,
    e: &ExchangeSpec,
    found: &Value,
    problems: &mut Vec<String>,
    declared: &mut Declared,
) {
    let kind = text(&found["type"]);
    if kind != e.kind {
        problems.push(format!(
            "exchange {} is {kind}, expected {}",
            e.name, e.kind
        ));
    }
    // A transient or auto-deleted exchange disappears (with its bindings) when the broker
    // restarts or the last binding goes; an internal one refuses the worker's publishes.
    for (flag, want) in [
        ("durable", true),
        ("auto_delete", false),
        ("internal", false),
    ] {
        if found[flag].as_bool().is_some_and(|v| v != want) {
            problems.push(format!(
                "exchange {}: {flag} is {}, expected {want}",
                e.name, !want
            ));
        }
    }
    for (key, want) in &e.arguments {
        match effective(found, key).as_ref() {
            Some(got) if matches(want, got) => {}
            None if e.name == topology.event_exchange && *key == "alternate-exchange" => {
                declared.legacy_event_exchange = Some(format!("no {key} on {}", e.name));
            }
            got => problems.push(differs("exchange", &e.name, key, want, got)),
        }
    }
}

fn compare_queue(
    topology: &Topology,
    q: &QueueSpec,
    found: &Value,
    problems: &mut Vec<String>,
    declared: &mut Declared,
) {
    for (key, want) in &q.arguments {
        let got = if *key == "x-queue-type" {
            found.get("type").cloned()
        } else {
            effective(found, key)
        };
        match got.as_ref() {
            Some(got) if matches(want, got) => {}
            None if q.name == topology.dead_letter_queue && *key == "x-delivery-limit" => {
                declared.legacy_dead_letter_queue = Some(format!("no {key} on {}", q.name));
            }
            got => problems.push(differs("queue", &q.name, key, want, got)),
        }
    }
    // Only what could drop or expire a message the worker relies on; other arguments
    // (a leader locator, an initial group size) are the platform's business.
    for key in LOSSY {
        if q.arguments.iter().any(|(k, _)| *k == key) {
            continue;
        }
        if let Some(value) = effective(found, key) {
            problems.push(format!(
                "queue {} has {key} = {value}, which could drop or expire its messages",
                q.name
            ));
        }
    }
}

/// Queue arguments (or policy keys) that make a queue drop or expire messages.
const LOSSY: [&str; 4] = [
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
];

fn differs(what: &str, name: &str, key: &str, want: &ArgValue, got: Option<&Value>) -> String {
    match got {
        Some(got) => format!("{what} {name}: {key} is {got}, expected {}", show(want)),
        None => format!("{what} {name}: {key} is not set, expected {}", show(want)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use serde_json::json;

    fn topology() -> Topology {
        let s = Settings::from_toml("[api]\ntoken = \"t\"\n").expect("defaults");
        Topology::new(&s.topology, &s.retry.delays)
    }

    /// What the management API shows for a topology the worker declared itself.
    fn as_declared(t: &Topology) -> Observed {
        let args = |a: &[(&'static str, ArgValue)]| -> Value {
            a.iter()
                .map(|(k, v)| {
                    let v = match v {
                        ArgValue::Str(s) => json!(s),
                        ArgValue::Int(i) => json!(i),
                    };
                    ((*k).to_owned(), v)
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let mut seen = Observed::default();
        for e in &t.exchanges {
            seen.exchanges.insert(
                e.name.clone(),
                Some(
                    json!({"type": e.kind, "durable": true, "auto_delete": false,
                    "internal": false, "arguments": args(&e.arguments)}),
                ),
            );
        }
        for q in &t.queues {
            seen.queues.insert(
                q.name.clone(),
                Some(json!({"type": "quorum", "arguments": args(&q.arguments)})),
            );
            seen.bindings.insert(q.name.clone(), q.bindings.clone());
        }
        seen
    }

    /// The observed queue `name` (it must be there), to change what the broker "said".
    fn queue<'a>(seen: &'a mut Observed, name: &str) -> &'a mut Value {
        seen.queues
            .get_mut(name)
            .and_then(Option::as_mut)
            .unwrap_or_else(|| panic!("queue {name} observed"))
    }

    #[test]
    fn the_worker_s_own_declaration_verifies() {
        let t = topology();
        let (problems, declared) = compare(&t, &as_declared(&t));
        assert_eq!(problems, Vec::<String>::new());
        assert_eq!(declared, Declared::default());
    }

    #[test]
    fn each_difference_is_named() {
        let t = topology();
        let mut seen = as_declared(&t);
        let delay = t.queues[2].name.clone();
        seen.queues.insert(delay.clone(), None);
        let work = &t.queues[0].name;
        let q = queue(&mut seen, work);
        q["type"] = json!("classic");
        q["arguments"]
            .as_object_mut()
            .expect("args")
            .remove("x-dead-letter-exchange");
        q["arguments"]["x-message-ttl"] = json!(60000);
        q["arguments"]["x-quorum-initial-group-size"] = json!(3);
        seen.bindings.insert(work.clone(), Vec::new());
        let (problems, _) = compare(&t, &seen);
        assert_eq!(
            problems,
            vec![
                format!("queue {work}: x-queue-type is \"classic\", expected \"quorum\""),
                format!(
                    "queue {work}: x-dead-letter-exchange is not set, expected \"provisioning.dlx\""
                ),
                format!(
                    "queue {work} has x-message-ttl = 60000, which could drop or expire its messages"
                ),
                format!(
                    "queue {work} is not bound to exchange provisioning with routing key \"group.create\""
                ),
                format!("queue {delay} is missing"),
            ]
        );
    }

    #[test]
    fn a_policy_may_supply_an_argument() {
        let t = topology();
        let mut seen = as_declared(&t);
        let work = &t.queues[0].name;
        let q = queue(&mut seen, work);
        q["arguments"]
            .as_object_mut()
            .expect("args")
            .remove("x-delivery-limit");
        q["effective_policy_definition"] = json!({"delivery-limit": 10});
        assert_eq!(compare(&t, &seen).0, Vec::<String>::new());
        // A smaller limit in a policy wins over the argument, as in the broker.
        let dlq = t.dead_letter_queue.clone();
        let q = queue(&mut seen, &dlq);
        q["effective_policy_definition"] = json!({"delivery-limit": 20});
        assert_eq!(
            compare(&t, &seen).0,
            vec![format!(
                "queue {dlq}: x-delivery-limit is 20, expected 2147483647"
            )]
        );
        queue(&mut seen, &dlq)["effective_policy_definition"] = json!({});
        // A policy's overflow wins over the argument (drop-head would downgrade the
        // at-least-once dead-lettering).
        let q = queue(&mut seen, work);
        q["effective_policy_definition"]["overflow"] = json!("drop-head");
        assert_eq!(
            compare(&t, &seen).0,
            vec![format!(
                "queue {work}: x-overflow is \"drop-head\", expected \"reject-publish\""
            )]
        );
        // A policy that would expire commands is named as a queue argument would be.
        queue(&mut seen, work)["effective_policy_definition"] =
            json!({"delivery-limit": 10, "max-length": 1000});
        assert_eq!(
            compare(&t, &seen).0,
            vec![format!(
                "queue {work} has x-max-length = 1000, which could drop or expire its messages"
            )]
        );
    }

    #[test]
    fn an_earlier_version_s_objects_are_tolerated_as_when_declaring() {
        let t = topology();
        let mut seen = as_declared(&t);
        for (map, name, key) in [
            (
                &mut seen.exchanges,
                t.event_exchange.clone(),
                "alternate-exchange",
            ),
            (
                &mut seen.queues,
                t.dead_letter_queue.clone(),
                "x-delivery-limit",
            ),
        ] {
            let o = map.get_mut(&name).and_then(Option::as_mut).expect("object");
            o["arguments"].as_object_mut().expect("args").remove(key);
        }
        let (problems, declared) = compare(&t, &seen);
        assert_eq!(problems, Vec::<String>::new());
        assert!(declared.legacy_event_exchange.is_some());
        assert!(declared.legacy_dead_letter_queue.is_some());
    }

    #[test]
    fn the_management_api_is_the_node_s_host_unless_configured() {
        let mut s = Settings::from_toml(
            "[api]\ntoken = \"t\"\n[amqp]\nurl = [\"amqp://u:p@a:5672/v\", \"amqps://u:p@b/%2f\", \"amqp://u:p@c:5673/v\"]\n",
        )
        .expect("settings");
        let at = |s: &Settings, node| {
            let m = Management::for_node(&s.amqp, node).expect("management");
            (m.url("queues", "q x", Some("bindings")).to_string(), m.user)
        };
        assert_eq!(
            at(&s, 0),
            (
                "http://a:15672/api/queues/v/q%20x/bindings".into(),
                "u".into()
            )
        );
        assert_eq!(at(&s, 1).0, "https://b:15671/api/queues/%2F/q%20x/bindings");
        // Another AMQP port: no guess.
        let e = Management::for_node(&s.amqp, 2).err().expect("no guess");
        assert!(e.to_string().contains("set amqp.management_url"), "{e}");
        s.amqp.management_url = Some("http://mgmt:8080/rabbit".into());
        assert_eq!(
            at(&s, 1).0,
            "http://mgmt:8080/rabbit/api/queues/%2F/q%20x/bindings"
        );
    }
}

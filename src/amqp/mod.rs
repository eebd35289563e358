//! The RabbitMQ boundary (lapin 4 on tokio): topology, reading deliveries into the core's
//! [`Inbound`](crate::pipeline::Inbound), and confirmed publishing.
//!
//! Invariants:
//! - every publish the worker makes is confirmed by the broker before the delivery it
//!   belongs to is acked; an unroutable (returned) or nacked publish is a failure;
//! - values from outside that must fit an AMQP short string are cut to 255 bytes at a
//!   character boundary instead of panicking.

/// `$p` with every listed property of `$o` that is set: `copy!(p, o; content_type =>
/// with_content_type, …)`.
macro_rules! copy_properties {
    ($p:ident, $o:expr; $($get:ident => $with:ident),* $(,)?) => {
        $(if let Some(v) = $o.$get() {
            $p = $p.$with(v.clone());
        })*
    };
}

pub mod deep;
pub mod headers;
pub mod publisher;
pub mod topology;
pub mod verify;

use lapin::types::ShortString;
use lapin::{Connection, ConnectionProperties};

pub use publisher::{PublishError, PublishProbe, Publisher};

/// Stack for the threads spawned without a size of their own, the broker client's I/O
/// thread among them: it parses header tables recursively, and one frame can nest them as
/// deep as its size allows (about 21,000 tables or 26,000 arrays in RabbitMQ's default
/// 128 KiB frame). A hostile header must cost its own message, not abort the process — and
/// then every restart, since it is redelivered. Only the pages a thread touches are
/// committed; the address space it reserves is what `ulimit -v` counts. Everything after
/// the parse works on shallow headers (`deep.rs`), so the runtime's threads need only
/// [`RUNTIME_STACK_BYTES`]. A release build parses the deepest 128 KiB frame in under
/// 64 MiB; a debug build (the tests) takes several times that.
pub const THREAD_STACK_BYTES: usize = if cfg!(debug_assertions) {
    256 << 20
} else {
    128 << 20
};

/// Stack for each of the async runtime's threads (workers and blocking pool).
pub const RUNTIME_STACK_BYTES: usize = 4 << 20;

/// At most this many blocking-pool threads (DNS lookups): the default, 512, would reserve
/// 2 GiB of stacks if a burst ever asked for them.
pub const MAX_BLOCKING_THREADS: usize = 16;

/// Measured on the release build: the most deeply nested headers a frame can hold take at
/// most this many bytes of stack per byte of frame to parse (under 64 MiB for 128 KiB).
const STACK_BYTES_PER_FRAME_BYTE: u64 = 512;

/// The largest `frame_max` whose most deeply nested headers this process's threads can
/// parse: `RUST_MIN_STACK` (which the binary sets to [`THREAD_STACK_BYTES`] unless given).
pub fn frame_max_covered() -> u64 {
    let stack = std::env::var("RUST_MIN_STACK")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(THREAD_STACK_BYTES as u64);
    stack / STACK_BYTES_PER_FRAME_BYTE
}

/// Open a connection named after the worker (visible in the management UI) with
/// `amqp.tls`: a private CA is trusted beside the system's roots, and a client certificate
/// is offered for mutual TLS (`amqps://` only). The frame size is the broker's: anything
/// the broker accepted must be readable here.
pub async fn connect_tls(
    url: &str,
    name: &str,
    tls: &crate::config::TlsSettings,
) -> Result<Connection, lapin::Error> {
    connect_inner(url, name, tls)
        .await
        .inspect_err(refused_thread)
}

/// The client starts a thread per connection. The OS refusing it (EAGAIN: `ulimit -v` or
/// the thread limit reached) is no broker fault to retry for ever: the process stops with
/// one line (`crate::fatal`).
fn refused_thread(e: &lapin::Error) {
    if let lapin::ErrorKind::IOError(io) = e.kind()
        && io.raw_os_error() == Some(libc::EAGAIN)
    {
        crate::fatal::exit(&format!(
            "cannot start the broker client's thread ({io}): the address space or thread limit is too small; see docs/deployment.md, \"Resource limits\""
        ));
    }
}

async fn connect_inner(
    url: &str,
    name: &str,
    tls: &crate::config::TlsSettings,
) -> Result<Connection, lapin::Error> {
    use secrecy::ExposeSecret;
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    if tls.is_default() {
        return Connection::connect(url, props).await;
    }
    let config = lapin::tcp::OwnedTLSConfig {
        identity: tls
            .client
            .as_ref()
            .map(|c| lapin::tcp::OwnedIdentity::PKCS8 {
                pem: c.cert_pem.clone(),
                key: c.key_pem.expose_secret().to_vec(),
            }),
        cert_chain: tls
            .ca_pem
            .as_ref()
            .map(|pem| String::from_utf8_lossy(pem).into_owned()),
    };
    lapin::DefaultConnectionBuilder::new()?
        .with_uri_str(url.to_owned())
        .with_properties(props)
        .with_tls_config(config)
        .connect()
        .await
}

/// How long one node of several may take to accept a connection before the next is tried.
pub const NODE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why no node of `amqp.url` took a connection: each node (password masked) and its error.
#[derive(Debug, thiserror::Error)]
#[error("no broker node answered: {}", .0.iter().map(|(node, e)| format!("{node}: {e}")).collect::<Vec<_>>().join("; "))]
pub struct NodesError(pub Vec<(String, String)>);

/// Connect to one node of `nodes`, trying them in turn from `start` (wrapping round); the
/// index of the node that answered comes back with the connection, so a caller can start
/// after it next time.
pub async fn connect_nodes(
    nodes: &crate::config::AmqpNodes,
    tls: &crate::config::TlsSettings,
    start: usize,
    name: &str,
) -> Result<(Connection, usize), NodesError> {
    let urls = nodes.urls();
    let mut failures = Vec::new();
    for k in 0..urls.len() {
        let i = (start + k) % urls.len();
        let url = &urls[i];
        match tokio::time::timeout(NODE_CONNECT_TIMEOUT, connect_tls(url.expose(), name, tls)).await
        {
            Ok(Ok(conn)) => {
                if urls.len() > 1 {
                    tracing::info!(node = %url, "connected to broker node {} of {}", i + 1, urls.len());
                }
                return Ok((conn, i));
            }
            Ok(Err(e)) => failures.push((url.to_string(), e.to_string())),
            Err(_) => failures.push((
                url.to_string(),
                format!("no answer within {NODE_CONNECT_TIMEOUT:?}"),
            )),
        }
    }
    Err(NodesError(failures))
}

/// A node to start from: replicas spread over the nodes instead of all taking the first.
pub fn random_start(nodes: &crate::config::AmqpNodes) -> usize {
    rand::random_range(0..nodes.urls().len())
}

/// Publish one command to the command exchange: mandatory (it must reach the work queue)
/// and persistent. The returned future resolves to the broker's confirm.
pub async fn publish_command(
    channel: &lapin::Channel,
    topology: &crate::config::TopologySettings,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> Result<lapin::PublisherConfirm, lapin::Error> {
    channel
        .basic_publish(
            ShortString::from(topology.command_exchange.as_str()),
            ShortString::from(topology.command_routing_key.as_str()),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..lapin::options::BasicPublishOptions::default()
            },
            body,
            properties.with_delivery_mode(2),
        )
        .await
}

/// Messages ready in `queue`, by a passive declare (an error if the queue does not exist,
/// which also closes `channel`, as AMQP does).
pub async fn ready_count(channel: &lapin::Channel, queue: &str) -> Result<u32, lapin::Error> {
    let declared = channel
        .queue_declare(
            ShortString::from(queue),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}

/// That `exchange` exists, by a passive declare (an error if it does not, which also
/// closes `channel`, as AMQP does; the kind is not compared).
pub async fn passive_exchange(
    channel: &lapin::Channel,
    exchange: &str,
) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            ShortString::from(exchange),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..lapin::options::ExchangeDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
}

/// The broker said the queue or exchange does not exist.
pub fn is_not_found(e: &lapin::Error) -> bool {
    is_soft(e, lapin::protocol::AMQPSoftError::NOTFOUND)
}

/// The broker refused the operation with this channel-level (soft) error.
pub fn is_soft(e: &lapin::Error, which: lapin::protocol::AMQPSoftError) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(s) if *s == which)
    )
}

/// What the broker said when it closed a channel or connection (`ACCESS_REFUSED - access
/// to exchange …`), or the client's error when the broker said nothing.
pub fn broker_words(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
        _ => e.to_string(),
    }
}

/// The virtual host an AMQP URL names (`/` when it names none, as the client reads it).
pub fn vhost(url: &str) -> String {
    url.parse::<lapin::uri::AMQPUri>()
        .map(|u| u.vhost)
        .unwrap_or_else(|_| "?".to_owned())
}

/// A short string from any text: at most 255 bytes, cut at a character boundary.
pub fn short(text: &str) -> ShortString {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vhost_is_read_as_the_client_reads_it() {
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
        assert_eq!(vhost("amqp://h:5672/sandbox"), "sandbox");
        assert_eq!(vhost("amqp://h"), "/");
    }

    #[test]
    fn short_strings_never_panic() {
        assert_eq!(short("abc").as_str(), "abc");
        let long = "é".repeat(200);
        let s = short(&long);
        assert_eq!(s.as_str().len(), 254);
        assert!(long.starts_with(s.as_str()));
    }
}

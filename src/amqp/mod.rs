//! The RabbitMQ boundary (lapin 4 on tokio): topology, reading deliveries into the core's
//! [`Inbound`](crate::pipeline::Inbound), and confirmed publishing.
//!
//! Invariants:
//! - every publish the worker makes is confirmed by the broker before the delivery it
//!   belongs to is acked; an unroutable (returned) or nacked publish is a failure;
//! - values from outside that must fit an AMQP short string are cut to 255 bytes at a
//!   character boundary instead of panicking.

pub mod headers;
pub mod publisher;
pub mod topology;

use lapin::types::ShortString;
use lapin::{Connection, ConnectionProperties};

pub use publisher::{PublishError, PublishProbe, Publisher};

/// The largest frame the worker agrees to (RabbitMQ's default). Whatever the broker is
/// configured to allow, it bounds one message's properties, and so how deeply a hostile
/// publisher can nest header tables (the client parses them recursively; the binary's
/// thread stacks are sized for this bound).
pub const MAX_FRAME_BYTES: u32 = 131_072;

/// Open a connection named after the worker (visible in the management UI), with frames
/// of at most [`MAX_FRAME_BYTES`] (or less if the URL's `frame_max` asks for less).
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    let Ok(mut uri) = url.parse::<lapin::uri::AMQPUri>() else {
        // Let the client say what is wrong with the URL, in its own error type.
        return Connection::connect(url, props).await;
    };
    uri.query.frame_max = Some(
        uri.query
            .frame_max
            .filter(|f| *f > 0)
            .map_or(MAX_FRAME_BYTES, |f| f.min(MAX_FRAME_BYTES)),
    );
    Connection::connect_uri(uri, props).await
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
    fn short_strings_never_panic() {
        assert_eq!(short("abc").as_str(), "abc");
        let long = "é".repeat(200);
        let s = short(&long);
        assert_eq!(s.as_str().len(), 254);
        assert!(long.starts_with(s.as_str()));
    }
}

//! Confirmed publishing. One confirm-mode channel is shared by every delivery task; each
//! publish waits for its own confirm.

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};

#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection is gone: nothing more can be published or settled on it.
    #[error("broker connection/channel error: {0}")]
    Channel(#[source] lapin::Error),
    /// The channel is not in confirm mode (a wiring bug, not a broker fault).
    #[error("publisher confirms are not enabled on this channel")]
    NoConfirms,
    #[error("broker refused the message (nack) for {exchange:?}/{routing_key:?}")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error("message unroutable at {exchange:?}/{routing_key:?}: {reply}")]
    Unroutable {
        exchange: String,
        routing_key: String,
        reply: String,
    },
}

#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// `channel` must already be in confirm mode.
    pub fn new(channel: Channel) -> Publisher {
        Publisher { channel }
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publish and wait for the broker's confirm. With `mandatory`, a message that reaches
    /// no queue is an error even though the broker acks it.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(exchange),
                super::short(routing_key),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .map_err(PublishError::Channel)?;
        match confirm.await.map_err(PublishError::Channel)? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(PublishError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                reply: format!("{} {}", returned.reply_code, returned.reply_text),
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }),
            Confirmation::NotRequested => Err(PublishError::NoConfirms),
        }
    }
}

//! Confirmed publishing. One confirm-mode channel is shared by every delivery task; each
//! publish waits for its own confirm.
//!
//! Invariant: nothing is sent whose content header would exceed the negotiated frame size
//! (the broker would close the whole connection for it): [`Publisher::fits`] says so first.
//! A confirm is waited for at most the publisher's confirm timeout: a broker may hold
//! confirms for as long as a queue has no quorum or a memory alarm lasts, and a delivery
//! must not wait on that in silence. A publish not confirmed in time may still have been
//! routed; callers treat it like a nack that may have been delivered (at least once).

use std::time::Duration;

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
    /// The message's properties would not fit one frame; it was not sent.
    #[error("the message's properties do not fit the broker's frame size")]
    TooLarge,
    #[error("broker refused the message (nack) for {exchange:?}/{routing_key:?}")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error(
        "the broker did not confirm the message for {exchange:?}/{routing_key:?} within {}",
        crate::config::format_duration(*after)
    )]
    Unconfirmed {
        exchange: String,
        routing_key: String,
        after: Duration,
    },
    #[error("message unroutable at {exchange:?}/{routing_key:?}: {reply}")]
    Unroutable {
        exchange: String,
        routing_key: String,
        reply: String,
    },
}

impl PublishError {
    /// A short, closed name of the failure (a trace's `error.type`).
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::Channel(_) => "channel_closed",
            PublishError::NoConfirms => "no_confirms",
            PublishError::TooLarge => "too_large",
            PublishError::Nacked { .. } => "nacked",
            PublishError::Unconfirmed { .. } => "unconfirmed",
            PublishError::Unroutable { .. } => "unroutable",
        }
    }
}

/// One publish, kept so it can be made again (the circuit's probe for a publish fault).
#[derive(Debug, Clone)]
pub struct PublishProbe {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    /// The negotiated frame size (0: unknown, nothing is checked).
    frame_max: u32,
    confirm_timeout: Duration,
}

/// Where no timeout is configured (the CLI's own publishes): the worker's default.
const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

impl Publisher {
    /// `channel` must already be in confirm mode.
    pub fn new(channel: Channel) -> Publisher {
        Publisher {
            channel,
            frame_max: 0,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
        }
    }

    /// Check every publish against `frame_max`, the connection's negotiated frame size.
    pub fn with_frame_max(mut self, frame_max: u32) -> Publisher {
        self.frame_max = frame_max;
        self
    }

    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Publisher {
        self.confirm_timeout = timeout;
        self
    }

    /// Whether a message with `properties` fits the negotiated frame size.
    pub fn fits(&self, properties: &BasicProperties) -> bool {
        self.frame_max == 0
            || super::headers::content_header_len(properties) <= self.frame_max as usize
    }

    /// Publish `probe` (mandatory) and wait for the confirm.
    pub async fn publish_probe(&self, probe: &PublishProbe) -> Result<(), PublishError> {
        self.publish(
            &probe.exchange,
            &probe.routing_key,
            &probe.body,
            probe.properties.clone(),
            true,
        )
        .await
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
        if !self.fits(&properties) {
            return Err(PublishError::TooLarge);
        }
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
        let confirmed = tokio::time::timeout(self.confirm_timeout, confirm)
            .await
            .map_err(|_| PublishError::Unconfirmed {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                after: self.confirm_timeout,
            })?;
        match confirmed.map_err(PublishError::Channel)? {
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

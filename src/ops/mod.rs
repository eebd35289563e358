//! Operator commands (SPEC §7): `check`, `dlq …`, `send`, `status`.
//!
//! Invariants: nothing here loses or reorders a message. Reading the DLQ holds messages
//! unacked and lets the broker return them in order; moving one is a confirmed publish
//! followed by the ack of the dead letter, so an interruption leaves at worst a copy in
//! both places, which the worker's deduplication makes harmless.

pub mod check;
pub mod dlq;
pub mod send;
pub mod status;

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};

use crate::config::Settings;

/// How long an operator command waits on the broker before giving up with a message.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// A short-lived broker connection for one operator command.
pub async fn connect(settings: &Settings, purpose: &str) -> Result<(Connection, Channel), String> {
    let url = settings.amqp.url.expose();
    let conn = tokio::time::timeout(
        BROKER_TIMEOUT,
        crate::amqp::connect(url, &format!("group-provisioner {purpose}")),
    )
    .await
    .map_err(|_| format!("{}: no answer within {BROKER_TIMEOUT:?}", settings.amqp.url))?
    .map_err(|e| format!("{}: {e}", settings.amqp.url))?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok((conn, channel))
}

//! `dlq migrate`: give a DLQ declared by an earlier version this version's arguments.
//!
//! A queue's arguments cannot change, so the DLQ is emptied into a holding queue
//! (`<dlq>.migrating`, declared with the new arguments), deleted only if empty, declared
//! anew, and filled back from the holding queue.
//!
//! Invariants:
//! - a dead letter is acked where it was only after its copy is confirmed where it goes,
//!   so a crash at any point loses nothing (at worst one message is there twice);
//! - messages are moved one at a time by one reader, so the order is kept, and taken with
//!   `basic.get` and acked, never handed back, so no delivery count is spent;
//! - running it again resumes: a holding queue left by an interrupted run is emptied back;
//! - dead letters that arrive meanwhile are kept: the old DLQ is deleted only when empty
//!   (otherwise they are moved too), and while the DLQ does not exist the worker's dead
//!   letters are unroutable, which it answers by parking the command and trying later.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeleteOptions};
use lapin::types::ShortString;
use lapin::{Channel, Connection};

use crate::amqp::Publisher;
use crate::amqp::topology::{DeadLetterQueueState, Topology};
use crate::config::Settings;
use crate::ops::{OpsError, connect};

/// What a migration did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The DLQ already had this version's arguments (and no holding queue was left).
    pub already_current: bool,
    /// Dead letters that went through the holding queue.
    pub moved: u64,
}

pub async fn migrate(settings: &Settings) -> Result<Migration, OpsError> {
    let (conn, channel) = connect(settings, "dlq migrate").await?;
    let topology = Topology::new(&settings.topology, &settings.retry.delays);
    let dlq = topology.dead_letter_queue.clone();
    let holding = format!("{dlq}.migrating");
    let holding_spec = topology
        .queues
        .iter()
        .find(|q| q.name == dlq)
        .map(|q| crate::amqp::topology::QueueSpec {
            name: holding.clone(),
            arguments: q.arguments.clone(),
            bindings: Vec::new(),
        })
        .ok_or_else(|| OpsError::BadArgument(format!("no dead-letter queue named {dlq:?}")))?;

    let mut migration = Migration::default();
    let mut channel = channel;
    if let DeadLetterQueueState::Legacy(_) = topology.dead_letter_queue_state(&conn).await? {
        holding_spec.declare(&channel).await?;
        loop {
            migration.moved += move_all(&channel, &dlq, &holding).await?;
            match channel
                .queue_delete(
                    ShortString::from(dlq.as_str()),
                    QueueDeleteOptions {
                        if_empty: true,
                        ..QueueDeleteOptions::default()
                    },
                )
                .await
            {
                Ok(_) => break,
                // A dead letter arrived after the last move: the refusal closed the
                // channel; move it too.
                Err(_) => channel = confirm_channel(&conn).await?,
            }
        }
    } else if !exists(&conn, &holding).await? {
        let _ = conn.close(200, ShortString::from("done")).await;
        migration.already_current = true;
        return Ok(migration);
    }
    // The DLQ anew (and everything else, as the worker declares it), then back.
    topology.declare(&conn, &channel).await?;
    let back = move_all(&channel, &holding, &dlq).await?;
    if migration.moved == 0 {
        // Resuming an interrupted run: what is coming back is what it had moved.
        migration.moved = back;
    }
    channel
        .queue_delete(
            ShortString::from(holding.as_str()),
            QueueDeleteOptions {
                if_empty: true,
                ..QueueDeleteOptions::default()
            },
        )
        .await?;
    let _ = conn.close(200, ShortString::from("done")).await;
    Ok(migration)
}

/// Move every message of `from` to `to`, one at a time, in order.
async fn move_all(channel: &Channel, from: &str, to: &str) -> Result<u64, OpsError> {
    let publisher = Publisher::new(channel.clone());
    let mut moved = 0;
    while let Some(message) = channel
        .basic_get(ShortString::from(from), BasicGetOptions { no_ack: false })
        .await?
    {
        let d = &message.delivery;
        // Mandatory: a copy that reaches no queue is an error, and the original stays.
        publisher
            .publish("", to, &d.data, d.properties.clone(), true)
            .await?;
        d.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    Ok(moved)
}

async fn confirm_channel(conn: &Connection) -> Result<Channel, OpsError> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Whether `queue` exists (a passive declare on a channel of its own).
async fn exists(conn: &Connection, queue: &str) -> Result<bool, OpsError> {
    let side = conn.create_channel().await?;
    match crate::amqp::ready_count(&side, queue).await {
        Ok(_) => {
            let _ = side.close(200, ShortString::from("ok")).await;
            Ok(true)
        }
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
            )
    )
}

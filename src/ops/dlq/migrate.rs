//! `dlq migrate`: give a DLQ declared by an earlier version this version's arguments.
//!
//! A queue's arguments cannot change, so the DLQ is unbound (no new dead letter reaches
//! it), emptied into a holding queue (`<dlq>.migrating`, declared with the new arguments),
//! deleted once it is empty, declared anew with its binding, and filled back from the
//! holding queue, which is then deleted once empty.
//!
//! Invariants:
//! - a copy keeps every header but `CC`/`BCC` (which would route it to other queues) and
//!   those nested deeper than `amqp::deep::MAX_DEPTH` (named in `x-dropped-headers`), and
//!   keeps `expiration`/`user_id` only as headers (see `headers::republishable`);
//! - a dead letter is acked where it was only after its copy is confirmed where it goes
//!   (published mandatory), so a crash at any point loses nothing (at worst one message is
//!   in both queues);
//! - messages are moved one at a time by one reader, so their order is kept, and taken
//!   with `basic.get` and acked, never handed back, so no delivery count is spent;
//! - a queue is deleted only when the broker shows it empty, with no consumer and while
//!   nothing can route to it (quorum queues do not support `if-empty`);
//! - one migration at a time, and no other pass over the DLQ meanwhile: it holds the lock
//!   every pass takes (the exclusive queue `<dlq>.lock`, see `reader.rs`);
//! - running it again resumes: a holding queue left by an interrupted run is emptied back
//!   (`check` reports one);
//! - dead letters written while the DLQ is unbound or missing are not lost: a worker's
//!   copy is unroutable, so the worker parks the command and dead-letters it later; the
//!   broker's own dead-lettering is at-least-once and retries. Such dead letters may end
//!   up before the moved ones.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};

use crate::amqp::topology::{DeadLetterQueueState, QueueSpec, Topology};
use crate::amqp::{Publisher, headers};
use crate::config::Settings;
use crate::ops::{OpsError, connect, queue_counts};

/// What a migration did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The DLQ already had this version's arguments (and no holding queue was left).
    pub already_current: bool,
    /// Dead letters that went through the holding queue.
    pub moved: u64,
}

fn holding_name(topology: &Topology) -> String {
    format!("{}.migrating", topology.dead_letter_queue)
}

/// A holding queue an interrupted migration left, and how many dead letters wait in it.
pub async fn interrupted_migration(
    conn: &Connection,
    topology: &Topology,
) -> Option<(String, u32)> {
    let holding = holding_name(topology);
    let (ready, _) = queue_counts(conn, &holding).await.ok().flatten()?;
    Some((holding, ready))
}

/// `dlq migrate`: migrate, then say what was done.
pub async fn migrate_command(settings: &Settings) -> Result<Migration, OpsError> {
    let m = migrate(settings).await?;
    if m.already_current {
        outln!("the DLQ already has this version's arguments; nothing to do");
    } else {
        outln!("migrated: {} dead letters kept, in order", m.moved);
    }
    Ok(m)
}

pub async fn migrate(settings: &Settings) -> Result<Migration, OpsError> {
    let (conn, channel, _) = connect(settings, "dlq migrate").await?;
    let result = run(settings, &conn, channel).await;
    let _ = conn.close(200, ShortString::from("done")).await;
    result
}

async fn run(
    settings: &Settings,
    conn: &Connection,
    channel: Channel,
) -> Result<Migration, OpsError> {
    let topology = Topology::new(&settings.topology, &settings.retry.delays);
    let dlq = topology.dead_letter_queue.clone();
    let holding = holding_name(&topology);
    let spec = topology
        .queues
        .iter()
        .find(|q| q.name == dlq)
        .cloned()
        .ok_or_else(|| OpsError::BadArgument(format!("no dead-letter queue named {dlq:?}")))?;
    // The same lock as every pass over the DLQ: a reader in the middle of a migration
    // would hold letters the migration must move.
    super::reader::take_lock(
        conn,
        &dlq,
        &tokio_util::sync::CancellationToken::new(),
        super::reader::LOCK_WAIT,
    )
    .await?;

    let mut migration = Migration::default();
    // Passive first: the comparing declaration would create a DLQ that an interrupted run
    // deleted, and it must be created with its binding, below.
    let dlq_exists = queue_counts(conn, &dlq).await?.is_some();
    let legacy = dlq_exists
        && match topology.dead_letter_queue_state(conn).await? {
            DeadLetterQueueState::Current => false,
            DeadLetterQueueState::Legacy(_) => true,
            DeadLetterQueueState::Unknown(why) => {
                return Err(OpsError::BadArgument(format!(
                    "cannot compare the arguments of {dlq:?} ({why}): run it with a user that may configure the DLQ"
                )));
            }
        };
    if !legacy && dlq_exists && queue_counts(conn, &holding).await?.is_none() {
        migration.already_current = true;
        return Ok(migration);
    }
    if legacy {
        QueueSpec {
            name: holding.clone(),
            arguments: spec.arguments.clone(),
            bindings: Vec::new(),
        }
        .declare(&channel)
        .await?;
        for (exchange, key) in &spec.bindings {
            channel
                .queue_unbind(
                    ShortString::from(dlq.as_str()),
                    ShortString::from(exchange.as_str()),
                    ShortString::from(key.as_str()),
                    FieldTable::default(),
                )
                .await?;
        }
        migration.moved += move_all(&channel, &dlq, &holding).await?;
        delete_when_empty(conn, &channel, &dlq).await?;
    }
    // The DLQ anew, bound (and the rest of the topology, as the worker declares it).
    topology.declare(conn, &channel).await?;
    let back = move_all(&channel, &holding, &dlq).await?;
    if migration.moved == 0 {
        // Resuming an interrupted run: what comes back is what it had moved.
        migration.moved = back;
    }
    delete_when_empty(conn, &channel, &holding).await?;
    Ok(migration)
}

/// Delete `queue`, which nothing routes to any more, once it is empty and unconsumed.
async fn delete_when_empty(
    conn: &Connection,
    channel: &Channel,
    queue: &str,
) -> Result<(), OpsError> {
    match queue_counts(conn, queue).await? {
        None => Ok(()),
        Some((0, 0)) => {
            channel
                .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
                .await?;
            Ok(())
        }
        Some((ready, consumers)) => Err(OpsError::BadArgument(format!(
            "{queue:?} still holds {ready} ready messages and has {consumers} consumers (is something reading it?); nothing was deleted: stop that reader and run `dlq migrate` again"
        ))),
    }
}

/// Move every message of `from` to `to`, one at a time, in order.
async fn move_all(channel: &Channel, from: &str, to: &str) -> Result<u64, OpsError> {
    let publisher = Publisher::new(channel.clone());
    let mut moved = 0;
    while let Some(message) = channel
        .basic_get(ShortString::from(from), BasicGetOptions { no_ack: false })
        .await?
    {
        // Headers nested too deep to copy here are left out and named (amqp::deep).
        let d = &crate::amqp::deep::shallow(message.delivery);
        // Mandatory: a copy that reaches no queue is an error, and the original stays.
        publisher
            .publish("", to, &d.data, headers::republishable(&d.properties), true)
            .await?;
        d.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    Ok(moved)
}

//! Operator commands: `check`, `dlq …`, `send`, `status`. Each returns a `Result`; the CLI
//! prints the error and chooses the exit code.
//!
//! Invariants: nothing here loses or reorders a message. Reading the DLQ holds messages
//! unacked and lets the broker return them in order; moving one is a confirmed publish,
//! and the dead letter is acked at the end of the pass, so an interruption leaves at worst
//! a copy in both places, which the worker's deduplication makes harmless.

pub mod check;
pub mod dlq;
pub mod events;
pub mod send;
pub mod status;

use std::path::PathBuf;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};

use crate::amqp::PublishError;
use crate::config::Settings;
use crate::pipeline::StoreError;

/// How long an operator command waits on the broker before giving up with a message.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an operator command could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The invocation is wrong (an argument the command cannot use).
    #[error("{0}")]
    BadArgument(String),
    /// An input file cannot be read.
    #[error("cannot read {path}: {source}", path = .path.display())]
    Input {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The input holds no command.
    #[error("nothing to send in {input}")]
    NothingToSend { input: String },
    /// An output file cannot be written.
    #[error("{path}: {source}", path = .path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    BrokerConnect(crate::amqp::NodesError),
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// A queue or exchange the command needs is missing or refused.
    #[error("{what}: {source}{hint}")]
    Topology {
        what: String,
        #[source]
        source: lapin::Error,
        hint: &'static str,
    },
    /// The DLQ was declared by an earlier version: reading it could cost dead letters on
    /// RabbitMQ 4.x (see `dlq::reader`), so nothing was read.
    #[error("nothing was read: {advice}")]
    LegacyDeadLetterQueue { advice: String },
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Publishing line `line` of the input failed on the channel.
    #[error("line {line}: {source}")]
    Line {
        line: usize,
        #[source]
        source: lapin::Error,
    },
    /// The dedup store cannot be reached (`url` has its password masked).
    #[error("redis ({url}): {source}")]
    Store {
        url: String,
        #[source]
        source: StoreError,
    },
    /// The letters a pass moved or removed could not be acked when it ended: they are
    /// back in the DLQ as well, in order.
    #[error(
        "the broker refused to remove the {acked} letters moved or removed ({source}): they are back in the queue too (a replayed one is deduplicated by the worker; a discarded one is also in the export)"
    )]
    Unacked {
        acked: usize,
        #[source]
        source: lapin::Error,
    },
    /// Letters a pass moved or removed kept coming back to the queue after their acks.
    #[error(
        "about {back} letters moved or removed came back to {queue:?} (the broker did not apply their acks before the pass closed), and removing them again failed three times: they are in the queue as well (a replayed one is deduplicated by the worker; a discarded one is also in the export)"
    )]
    NotRemoved { queue: String, back: usize },
    /// SIGINT or SIGTERM stopped the command; what it held went back, in order.
    #[error("interrupted by a signal: {done}")]
    Interrupted { done: String },
    /// Standard output was closed (a pipe whose reader went away): the pass stopped.
    #[error("standard output was closed: {done}")]
    StdoutClosed { done: String },
    /// A pass saw fewer messages than the queue held when it started.
    #[error(
        "read {seen} of the {total} messages of {queue:?}: the DLQ changed during the {purpose} (something else consumed from it, or it was deleted); {done}"
    )]
    Incomplete {
        queue: String,
        purpose: &'static str,
        seen: usize,
        total: usize,
        done: String,
    },
    /// `dlq discard` exported letters that its second pass could not find to remove.
    #[error(
        "removed {removed} of the {exported} dead letters written to {file}: the DLQ changed during the discard (something else consumed or moved some); the others stay in the DLQ, and the file holds them too"
    )]
    NotAllRemoved {
        removed: usize,
        exported: usize,
        file: String,
    },
    /// Another pass holds the queue's lock.
    #[error(
        "another DLQ command held {lock:?} for {waited:?} (only one pass over a queue at a time keeps its order); nothing was read: try again once it ends"
    )]
    Busy {
        lock: String,
        waited: std::time::Duration,
    },
    /// A dead letter could not be published back; it stays in the DLQ.
    #[error("publishing {letter} back failed ({source}); it stays in the DLQ")]
    ReplayPublish {
        letter: String,
        #[source]
        source: PublishError,
    },
}

impl OpsError {
    /// `map_err` for a failed write to `path`.
    pub(crate) fn output(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> OpsError {
        let path = path.into();
        move |source| OpsError::Output { path, source }
    }
}

/// The operator command's stop signal: cancelled by the first SIGINT or SIGTERM of the
/// process, and never reset, so a signal between two passes (a discard's export and its
/// removal) is still seen by the second. The handlers are installed at the first call.
pub fn stop() -> tokio_util::sync::CancellationToken {
    static STOP: std::sync::OnceLock<tokio_util::sync::CancellationToken> =
        std::sync::OnceLock::new();
    STOP.get_or_init(|| {
        let stop = tokio_util::sync::CancellationToken::new();
        let cancel = stop.clone();
        let signal = crate::shutdown::listen();
        tokio::spawn(async move {
            signal.await;
            cancel.cancel();
        });
        stop
    })
    .clone()
}

/// Messages ready in `queue`, or `None` if it does not exist.
pub async fn queue_depth(conn: &Connection, queue: &str) -> Result<Option<u32>, OpsError> {
    Ok(queue_counts(conn, queue).await?.map(|(ready, _)| ready))
}

/// (ready, consumers) of `queue`, or `None` if it does not exist (a passive declare on a
/// channel of its own: the refusal closes it).
pub async fn queue_counts(conn: &Connection, queue: &str) -> Result<Option<(u32, u32)>, OpsError> {
    let side = conn.create_channel().await?;
    let declared = side
        .queue_declare(
            lapin::types::ShortString::from(queue),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    match declared {
        Ok(q) => {
            let _ = side.close(200, lapin::types::ShortString::from("ok")).await;
            Ok(Some((q.message_count(), q.consumer_count())))
        }
        Err(e) if crate::amqp::is_not_found(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A short-lived broker connection for one operator command, and which node of `amqp.url`
/// answered (its index).
pub async fn connect(
    settings: &Settings,
    purpose: &str,
) -> Result<(Connection, Channel, usize), OpsError> {
    let nodes = &settings.amqp.url;
    let (conn, node) = crate::amqp::connect_nodes(
        nodes,
        &settings.amqp.tls,
        crate::amqp::random_start(nodes),
        &format!("group-provisioner {purpose}"),
    )
    .await
    .map_err(OpsError::BrokerConnect)?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((conn, channel, node))
}

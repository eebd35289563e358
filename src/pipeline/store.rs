//! The dedup store port: claims with leases, created records and attempt markers. The
//! Redis store in `dedup/` implements it; an in-memory fake in tests does too.
//!
//! Invariants every implementation keeps:
//! - `claim` is atomic: it returns the created record, or another owner's live claim, or
//!   makes the caller the owner — never two owners at once;
//! - a created record is only written by the owner of the current claim, or when no claim
//!   exists; it is never overwritten;
//! - an error means the outcome of that call is unknown: it may have taken effect (a reply
//!   lost to a timeout after the script ran), so callers never assume it did not.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::ExtId;

use super::last_outcome::LastOutcome;

/// What the dedup store remembers of a created group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedRecord {
    pub org_unit_id: i64,
    pub created_at: String,
    pub api_request_id: Option<String>,
    pub org_unit_name: String,
    pub org_unit_parent_id: i64,
    /// Field name → short hash of its value, to name the fields of a later duplicate that
    /// differ without storing personal data in Redis.
    #[serde(default)]
    pub fingerprint: BTreeMap<String, String>,
    /// The `message_id` of the command that created it, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// When a delivery found the group already existing by List (its record was lost):
    /// `created_at` is then the original time if an earlier outcome still said it, else
    /// this same time (the group was created at or before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found_at: Option<String>,
}

/// Under which name a last outcome is kept: the ext id, or — for an invalid command — its
/// message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKey<'a> {
    ExtId(&'a ExtId),
    MessageId(&'a str),
}

/// Result of trying to claim an ext id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// We hold the lease now. `marker` is the ext id's attempt marker as the claim found
    /// it; `marked` says the claim found none and marked the requested posting itself.
    Acquired {
        marker: Option<AttemptMarker>,
        marked: bool,
    },
    /// The group was created already.
    Created(CreatedRecord),
    /// Another owner holds a live lease.
    HeldByOther { owner: String },
    /// The record exists but cannot be read (written by another version, or damaged):
    /// what was found, for [`DedupStore::replace_unreadable`].
    Unreadable(Unreadable),
}

/// An unreadable record, exactly as found, so that replacing it is a compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreadable {
    /// A value this version cannot parse: any bytes, not necessarily UTF-8.
    Value(Vec<u8>),
    /// A key of another type (a hash, a list…), named as Redis names it.
    WrongType(String),
}

impl Unreadable {
    /// For the log: what kind of thing was found and how big, never its content.
    pub fn describe(&self) -> String {
        match self {
            Unreadable::Value(bytes) => format!("a value of {} bytes", bytes.len()),
            Unreadable::WrongType(kind) => {
                format!("a Redis {}", crate::text::printable(kind, 64))
            }
        }
    }
}

/// The attempt marker of an ext id: written right before every POST (kept `dedup.ttl`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptMarker {
    /// POSTs ever about to be sent.
    pub count: u32,
    /// Since the last one was about to be sent, by the store's clock (the same for every
    /// worker).
    pub age: Duration,
    /// The delivery that last posted never settled (it crashed, froze, or was cut off at
    /// shutdown): its POST may still be in the air.
    pub open: bool,
    /// `(parent, name)` actually posted, oldest first (the most recent few): a command
    /// re-sent with another name or parent is still looked up where it was created.
    pub posted: Vec<(i64, String)>,
}

/// What a POST is about to send, for the attempt marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posting<'a> {
    pub parent: i64,
    pub name: &'a str,
}

/// Result of recording a created group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordResult {
    Written,
    /// Someone else's record stands (a newer lease, or a created record): ours was not
    /// written. Carries the created record when that is what stands.
    Fenced(Option<CreatedRecord>),
}

/// A failure of the store. The cause is kept (a Redis error, a JSON error) without its
/// type reaching the core.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or refused the command.
    #[error("{message}")]
    Unavailable {
        message: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A record exists but cannot be read.
    #[error("unreadable record at {key}: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be encoded for storing (nothing was written).
    #[error("cannot encode a record: {0}")]
    Encode(#[source] serde_json::Error),
    /// The store answered something no script of ours returns (another server in its place?).
    #[error("unexpected answer from the store: {0}")]
    Protocol(String),
}

impl StoreError {
    pub fn unavailable(source: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        StoreError::Unavailable {
            message: source.to_string(),
            source: Box::new(source),
        }
    }
}

/// What a claim asks for besides the lease.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    pub owner: &'a str,
    pub lease: Duration,
    /// How long records, markers and outcomes are kept (`dedup.ttl`).
    pub ttl: Duration,
    /// The last outcome to keep if the group was created already (this delivery is a
    /// duplicate).
    pub duplicate: &'a LastOutcome,
    /// If the claim is acquired and no attempt marker exists, mark this posting as about
    /// to be sent, in the same atomic step (one round trip fewer on the happy path).
    pub mark: Option<Posting<'a>>,
}

pub trait DedupStore: Send + Sync {
    /// Atomically: the created record if there is one (then `request.duplicate` becomes
    /// the last outcome), else claim for `request.owner` unless another live lease exists,
    /// reading the attempt marker (and writing `request.mark` when there is none).
    fn claim(
        &self,
        ext_id: &ExtId,
        request: &ClaimRequest<'_>,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;
    /// Replace the unreadable record `found` with a claim for `owner`, if it is still what
    /// is stored (compare-and-set); `false` when it changed meanwhile.
    fn replace_unreadable(
        &self,
        ext_id: &ExtId,
        found: &Unreadable,
        owner: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Extend our lease; `false` when it is no longer ours.
    fn renew(
        &self,
        ext_id: &ExtId,
        owner: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Compare-and-set claimed(owner) → created, closing the attempt marker and writing
    /// `outcome` as the last outcome. Never overwrites another owner's lease or an
    /// existing created record (and then writes no outcome either).
    fn record_created(
        &self,
        ext_id: &ExtId,
        owner: &str,
        record: &CreatedRecord,
        outcome: &LastOutcome,
        ttl: Duration,
    ) -> impl Future<Output = Result<RecordResult, StoreError>> + Send;
    /// The last outcome kept for `ext_id` (`None`: none, or not readable). A report only.
    fn outcome(
        &self,
        ext_id: &ExtId,
    ) -> impl Future<Output = Result<Option<LastOutcome>, StoreError>> + Send;
    /// Keep `outcome` as the last outcome under `key` for `ttl` (a report only: nothing
    /// decides on it).
    fn record_outcome(
        &self,
        key: OutcomeKey<'_>,
        outcome: &LastOutcome,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Drop our claim (if still ours) so a later delivery can claim at once. With
    /// `settled`, our POSTs have all ended and the attempt marker is closed; without
    /// (shutdown cut the work off), it stays open, so the next owner waits out a POST that
    /// may still be in the air.
    fn release(
        &self,
        ext_id: &ExtId,
        owner: &str,
        settled: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Atomically, only while `owner` holds the claim: note that a POST of `posting` is
    /// about to be sent (the marker is kept `ttl`, open until the delivery settles).
    /// `false` when the claim is no longer ours: nothing was marked and nothing may be
    /// posted.
    fn mark_attempt(
        &self,
        ext_id: &ExtId,
        owner: &str,
        posting: Posting<'_>,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// The attempt marker, if any POST was ever about to be sent for this ext id.
    fn attempt(
        &self,
        ext_id: &ExtId,
    ) -> impl Future<Output = Result<Option<AttemptMarker>, StoreError>> + Send;
    /// Whether the store answers at all: the circuit's probe.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

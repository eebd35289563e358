//! The dedup store port: claims with leases, created records and attempt markers. The
//! Redis store in `dedup.rs` implements it; an in-memory fake in tests does too.
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
}

/// Result of trying to claim an ext id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// We hold the lease now.
    Acquired,
    /// The group was created already.
    Created(CreatedRecord),
    /// Another owner holds a live lease.
    HeldByOther { owner: String },
    /// The record exists but cannot be read (written by another version, or damaged).
    /// `raw` is what was found, for [`DedupStore::replace_unreadable`].
    Unreadable { raw: String },
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
}

impl StoreError {
    pub fn unavailable(source: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        StoreError::Unavailable {
            message: source.to_string(),
            source: Box::new(source),
        }
    }
}

pub trait DedupStore: Send + Sync {
    /// Atomically: the created record if there is one, else claim for `owner` unless
    /// another live lease exists.
    fn claim(
        &self,
        ext_id: &ExtId,
        owner: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;
    /// Replace the unreadable record `raw` with a claim for `owner`, if it is still what is
    /// stored (compare-and-set); `false` when it changed meanwhile.
    fn replace_unreadable(
        &self,
        ext_id: &ExtId,
        raw: &str,
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
    /// Compare-and-set claimed(owner) → created. Never overwrites another owner's lease or
    /// an existing created record.
    fn record_created(
        &self,
        ext_id: &ExtId,
        owner: &str,
        record: &CreatedRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<RecordResult, StoreError>> + Send;
    /// Drop our claim (if still ours) so a later delivery can claim at once.
    fn release(
        &self,
        ext_id: &ExtId,
        owner: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Note that a POST is about to be sent (kept `ttl`).
    fn mark_attempt(
        &self,
        ext_id: &ExtId,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Whether any POST was ever about to be sent for this ext id.
    fn has_attempt(&self, ext_id: &ExtId) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Whether the store answers at all: the circuit's probe.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

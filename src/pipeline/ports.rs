//! The two outside systems the core talks to, as traits. Production implementations are
//! `dedup::RedisStore` and `convirza::ConvirzaClient`.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::{CreateGroup, ExtId};
use crate::convirza::{ApiError, ConvirzaClient, Created, GroupSummary};
use crate::traceparent::Traceparent;

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
}

/// Result of recording a created group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordResult {
    Written,
    /// Someone else's record stands (a newer lease, or a created record): ours was not
    /// written. Carries the created record when that is what stands.
    Fenced(Option<CreatedRecord>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

pub trait DedupStore: Send + Sync {
    /// Atomically: the created record if there is one, else claim for `owner` unless
    /// another live lease exists.
    fn claim(
        &self,
        ext_id: &ExtId,
        owner: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;
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
}

pub trait GroupApi: Send + Sync {
    fn create_group(
        &self,
        command: &CreateGroup,
        trace: Option<&Traceparent>,
    ) -> impl Future<Output = Result<Created, ApiError>> + Send;
    fn find_children_named(
        &self,
        parent: i64,
        name: &str,
        trace: Option<&Traceparent>,
    ) -> impl Future<Output = Result<Vec<GroupSummary>, ApiError>> + Send;
}

impl GroupApi for ConvirzaClient {
    fn create_group(
        &self,
        command: &CreateGroup,
        trace: Option<&Traceparent>,
    ) -> impl Future<Output = Result<Created, ApiError>> + Send {
        ConvirzaClient::create_group(self, command, trace)
    }

    fn find_children_named(
        &self,
        parent: i64,
        name: &str,
        trace: Option<&Traceparent>,
    ) -> impl Future<Output = Result<Vec<GroupSummary>, ApiError>> + Send {
        ConvirzaClient::find_children_named(self, parent, name, trace)
    }
}

//! In-memory stand-ins for the ports, for driving the core step by step in unit tests
//! with paused tokio time: a store whose calls can be made to fail, and an API whose
//! answers are scripted. They keep the ports' invariants (atomic claims, fencing), so a
//! test exercises the processor, not a looser world.

use crate::lock;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::command::{CreateGroup, ExtId};
use crate::traceparent::Traceparent;

use super::api::{ApiError, Created, GroupApi, GroupSummary, names_match};
use super::decision::{DeferReason, Outcome};
use super::failure::FailureKind;
use super::last_outcome::LastOutcome;
use super::recorder::Recorder;
use super::store::{
    AttemptMarker, Claim, ClaimRequest, CreatedRecord, DedupStore, OutcomeKey, Posting,
    RecordResult, StoreError, Unreadable,
};

/// The store operations a test can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    Claim,
    Renew,
    Record,
    Release,
    MarkAttempt,
    HasAttempt,
    Outcome,
    Ping,
}

#[derive(Debug, Clone)]
enum Entry {
    Claimed {
        owner: String,
        until: Instant,
    },
    Created {
        record: CreatedRecord,
        until: Instant,
    },
    /// A value this version cannot read.
    Unreadable(Unreadable),
}

#[derive(Debug, Clone)]
struct Marker {
    count: u32,
    at: Instant,
    until: Instant,
    open: bool,
    posted: Vec<(i64, String)>,
}

/// When an injected failure strikes: before the call has any effect, or after it took
/// effect (as a Redis reply lost to a timeout after the script ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Before,
    After,
}

#[derive(Debug, thiserror::Error)]
#[error("injected {0:?} failure")]
struct Injected(StoreOp);

/// A store with Redis's semantics (atomic claims, leases and TTLs that expire, fencing),
/// in memory, on tokio's clock.
#[derive(Default)]
pub struct FakeStore {
    entries: Mutex<HashMap<ExtId, Entry>>,
    /// Attempt markers (each mark renews the expiry, as the script's `SET … PX` does).
    attempts: Mutex<HashMap<ExtId, Marker>>,
    /// Operation → how many of its next calls fail (`u32::MAX`: all of them), and when.
    failing: Mutex<HashMap<StoreOp, (u32, When)>>,
    calls: Mutex<HashMap<StoreOp, u32>>,
    /// Last outcomes by ext id (`ext:<id>`) or message id (`msg:<id>`).
    outcomes: Mutex<HashMap<String, LastOutcome>>,
}

impl FakeStore {
    /// The next `n` calls of `op` fail before having any effect.
    pub fn fail(&self, op: StoreOp, n: u32) {
        self.fail_when(op, n, When::Before);
    }

    /// The next `n` calls of `op` fail `when`.
    pub fn fail_when(&self, op: StoreOp, n: u32, when: When) {
        lock(&self.failing).insert(op, (n, when));
    }

    pub fn calls(&self, op: StoreOp) -> u32 {
        lock(&self.calls).get(&op).copied().unwrap_or(0)
    }

    /// Count the call; the injected failure for it, if any, and when it strikes.
    fn enter(&self, op: StoreOp) -> Option<When> {
        *lock(&self.calls).entry(op).or_insert(0) += 1;
        let mut failing = lock(&self.failing);
        match failing.get_mut(&op) {
            Some((n, when)) if *n > 0 => {
                if *n != u32::MAX {
                    *n -= 1;
                }
                Some(*when)
            }
            _ => None,
        }
    }

    /// Run `effect` under the injected failure of `op`, if any.
    fn call<T>(&self, op: StoreOp, effect: impl FnOnce() -> T) -> Result<T, StoreError> {
        let failure = self.enter(op);
        if failure == Some(When::Before) {
            return Err(StoreError::unavailable(Injected(op)));
        }
        let value = effect();
        match failure {
            Some(_) => Err(StoreError::unavailable(Injected(op))),
            None => Ok(value),
        }
    }

    /// Another worker's claim, live for `lease` (as if ours had expired and it took over).
    pub fn claim_for(&self, ext_id: &ExtId, owner: &str, lease: Duration) {
        lock(&self.entries).insert(
            ext_id.clone(),
            Entry::Claimed {
                owner: owner.to_owned(),
                until: Instant::now() + lease,
            },
        );
    }

    /// A record this version cannot read (another version's, or damaged).
    pub fn put_unreadable(&self, ext_id: &ExtId, raw: &str) {
        lock(&self.entries).insert(
            ext_id.clone(),
            Entry::Unreadable(Unreadable::Value(raw.as_bytes().to_vec())),
        );
    }

    /// A created record kept an hour.
    pub fn put_created(&self, ext_id: &ExtId, record: CreatedRecord) {
        self.put_created_for(ext_id, record, Duration::from_secs(3600));
    }

    fn put_created_for(&self, ext_id: &ExtId, record: CreatedRecord, ttl: Duration) {
        lock(&self.entries).insert(
            ext_id.clone(),
            Entry::Created {
                record,
                until: Instant::now() + ttl,
            },
        );
    }

    /// A settled attempt marker kept an hour (an earlier delivery posted and ended).
    pub fn put_attempt(&self, ext_id: &ExtId) {
        self.put_marker(ext_id, false, &[]);
    }

    /// An attempt marker written just now, `open` if its delivery never settled, for the
    /// `(parent, name)` pairs `posted`.
    pub fn put_marker(&self, ext_id: &ExtId, open: bool, posted: &[(i64, &str)]) {
        let now = Instant::now();
        lock(&self.attempts).insert(
            ext_id.clone(),
            Marker {
                count: 1,
                at: now,
                until: now + Duration::from_secs(3600),
                open,
                posted: posted.iter().map(|(p, n)| (*p, (*n).to_owned())).collect(),
            },
        );
    }

    fn mark_for(&self, ext_id: &ExtId, posting: Posting<'_>, ttl: Duration) {
        let now = Instant::now();
        let mut attempts = lock(&self.attempts);
        let live = attempts.get(ext_id).filter(|m| m.until > now).cloned();
        let mut m = live.unwrap_or(Marker {
            count: 0,
            at: now,
            until: now,
            open: true,
            posted: Vec::new(),
        });
        m.count += 1;
        m.at = now;
        m.until = now + ttl;
        m.open = true;
        let pair = (posting.parent, posting.name.to_owned());
        if !m.posted.contains(&pair) {
            m.posted.push(pair);
            if m.posted.len() > 5 {
                m.posted.remove(0);
            }
        }
        attempts.insert(ext_id.clone(), m);
    }

    /// The live attempt marker, as the port reports it.
    fn marker(&self, ext_id: &ExtId) -> Option<AttemptMarker> {
        let now = Instant::now();
        lock(&self.attempts)
            .get(ext_id)
            .filter(|m| m.until > now)
            .map(|m| AttemptMarker {
                count: m.count,
                age: now - m.at,
                open: m.open,
                posted: m.posted.clone(),
            })
    }

    fn close_marker(&self, ext_id: &ExtId) {
        if let Some(m) = lock(&self.attempts).get_mut(ext_id) {
            m.open = false;
        }
    }

    /// Whether the marker says a delivery may still be posting.
    pub fn marker_open(&self, ext_id: &ExtId) -> bool {
        lock(&self.attempts).get(ext_id).is_some_and(|m| m.open)
    }

    pub fn created(&self, ext_id: &ExtId) -> Option<CreatedRecord> {
        match self.live(ext_id) {
            Some(Entry::Created { record, .. }) => Some(record),
            _ => None,
        }
    }

    /// How long the created record still lives.
    pub fn created_ttl(&self, ext_id: &ExtId) -> Option<Duration> {
        match self.live(ext_id) {
            Some(Entry::Created { until, .. }) => Some(until - Instant::now()),
            _ => None,
        }
    }

    /// How long the attempt marker still lives.
    pub fn attempt_ttl(&self, ext_id: &ExtId) -> Option<Duration> {
        lock(&self.attempts)
            .get(ext_id)
            .map(|m| m.until.saturating_duration_since(Instant::now()))
            .filter(|left| !left.is_zero())
    }

    /// The last outcome kept for `key`.
    pub fn last_outcome(&self, key: OutcomeKey<'_>) -> Option<LastOutcome> {
        lock(&self.outcomes).get(&outcome_key(key)).cloned()
    }

    fn put_outcome(&self, key: OutcomeKey<'_>, outcome: &LastOutcome) {
        lock(&self.outcomes).insert(outcome_key(key), outcome.clone());
    }

    /// The live claim's owner, if any.
    pub fn claimant(&self, ext_id: &ExtId) -> Option<String> {
        match lock(&self.entries).get(ext_id) {
            Some(Entry::Claimed { owner, until }) if *until > Instant::now() => Some(owner.clone()),
            _ => None,
        }
    }

    pub fn attempt_markers(&self, ext_id: &ExtId) -> u32 {
        match lock(&self.attempts).get(ext_id) {
            Some(m) if m.until > Instant::now() => m.count,
            _ => 0,
        }
    }

    /// The entry, with an expired claim or record treated as absent (and removed).
    fn live(&self, ext_id: &ExtId) -> Option<Entry> {
        let mut entries = lock(&self.entries);
        let expired = match entries.get(ext_id) {
            Some(Entry::Claimed { until, .. } | Entry::Created { until, .. }) => {
                *until <= Instant::now()
            }
            Some(Entry::Unreadable(_)) | None => false,
        };
        if expired {
            entries.remove(ext_id);
        }
        entries.get(ext_id).cloned()
    }
}

impl DedupStore for FakeStore {
    async fn claim(&self, ext_id: &ExtId, request: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
        self.call(StoreOp::Claim, || match self.live(ext_id) {
            Some(Entry::Created { record, .. }) => {
                let duplicate = LastOutcome {
                    org_unit_id: Some(record.org_unit_id),
                    ..request.duplicate.clone()
                };
                self.put_outcome(OutcomeKey::ExtId(ext_id), &duplicate);
                Claim::Created(record)
            }
            Some(Entry::Claimed { owner, .. }) => Claim::HeldByOther { owner },
            Some(Entry::Unreadable(found)) => Claim::Unreadable(found),
            None => {
                self.claim_for(ext_id, request.owner, request.lease);
                let marker = self.marker(ext_id);
                let marked = match (&marker, request.mark) {
                    (None, Some(posting)) => {
                        self.mark_for(ext_id, posting, request.ttl);
                        true
                    }
                    _ => false,
                };
                Claim::Acquired { marker, marked }
            }
        })
    }

    async fn replace_unreadable(
        &self,
        ext_id: &ExtId,
        found: &Unreadable,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.call(StoreOp::Claim, || match self.live(ext_id) {
            Some(Entry::Unreadable(seen)) if seen == *found => {
                self.claim_for(ext_id, owner, lease);
                true
            }
            _ => false,
        })
    }

    async fn renew(
        &self,
        ext_id: &ExtId,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.call(StoreOp::Renew, || match self.live(ext_id) {
            Some(Entry::Claimed { owner: o, .. }) if o == owner => {
                self.claim_for(ext_id, owner, lease);
                true
            }
            _ => false,
        })
    }

    async fn record_created(
        &self,
        ext_id: &ExtId,
        owner: &str,
        record: &CreatedRecord,
        outcome: &LastOutcome,
        ttl: Duration,
    ) -> Result<RecordResult, StoreError> {
        self.call(StoreOp::Record, || match self.live(ext_id) {
            Some(Entry::Created { record, .. }) => RecordResult::Fenced(Some(record)),
            Some(Entry::Claimed { owner: o, .. }) if o != owner => RecordResult::Fenced(None),
            Some(Entry::Unreadable(_)) => RecordResult::Fenced(None),
            _ => {
                self.put_created_for(ext_id, record.clone(), ttl);
                self.close_marker(ext_id);
                self.put_outcome(OutcomeKey::ExtId(ext_id), outcome);
                RecordResult::Written
            }
        })
    }

    async fn release(&self, ext_id: &ExtId, owner: &str, settled: bool) -> Result<(), StoreError> {
        self.call(StoreOp::Release, || {
            let mut entries = lock(&self.entries);
            if matches!(entries.get(ext_id), Some(Entry::Claimed { owner: o, .. }) if o == owner) {
                entries.remove(ext_id);
                drop(entries);
                if settled {
                    self.close_marker(ext_id);
                }
            }
        })
    }

    async fn mark_attempt(
        &self,
        ext_id: &ExtId,
        owner: &str,
        posting: Posting<'_>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.call(StoreOp::MarkAttempt, || match self.live(ext_id) {
            Some(Entry::Claimed { owner: o, .. }) if o == owner => {
                self.mark_for(ext_id, posting, ttl);
                true
            }
            _ => false,
        })
    }

    async fn attempt(&self, ext_id: &ExtId) -> Result<Option<AttemptMarker>, StoreError> {
        self.call(StoreOp::HasAttempt, || self.marker(ext_id))
    }

    async fn outcome(&self, ext_id: &ExtId) -> Result<Option<LastOutcome>, StoreError> {
        self.call(StoreOp::Outcome, || {
            lock(&self.outcomes)
                .get(&outcome_key(OutcomeKey::ExtId(ext_id)))
                .cloned()
        })
    }

    async fn record_outcome(
        &self,
        key: OutcomeKey<'_>,
        outcome: &LastOutcome,
        _ttl: Duration,
    ) -> Result<(), StoreError> {
        self.call(StoreOp::Outcome, || self.put_outcome(key, outcome))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(StoreOp::Ping, || ())
    }
}

fn outcome_key(key: OutcomeKey<'_>) -> String {
    match key {
        OutcomeKey::ExtId(e) => format!("ext:{e}"),
        OutcomeKey::MessageId(m) => format!("msg:{m}"),
    }
}

/// One scripted answer to a create POST.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Create the group and answer 201.
    Create,
    /// Answer with this error, creating nothing.
    Fail(ApiError),
    /// Create the group, then answer with this error (a lost or failed answer after commit).
    CommitThen(ApiError),
}

#[derive(Debug, Clone)]
struct Group {
    id: i64,
    ext_id: Option<String>,
    name: String,
    parent: i64,
}

/// The API as a script: create POSTs take the next [`Answer`] (default: create; a sibling
/// with the same name answers 400 as the real API does), lists take the next scripted
/// error or answer from the groups created so far.
pub struct FakeApi {
    groups: Mutex<Vec<Group>>,
    creates: Mutex<VecDeque<Answer>>,
    lists: Mutex<VecDeque<ApiError>>,
    /// How long each create POST takes (virtual time under `start_paused`).
    pub post_latency: Mutex<Duration>,
    next_id: AtomicU64,
    posts: AtomicU64,
    list_calls: AtomicU64,
}

impl Default for FakeApi {
    fn default() -> Self {
        FakeApi {
            groups: Mutex::default(),
            creates: Mutex::default(),
            lists: Mutex::default(),
            post_latency: Mutex::new(Duration::ZERO),
            next_id: AtomicU64::new(5001),
            posts: AtomicU64::new(0),
            list_calls: AtomicU64::new(0),
        }
    }
}

impl FakeApi {
    /// Answer the next create POSTs with `answers`, in order.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        lock(&self.creates).extend(answers);
    }

    /// Fail the next list calls with `errors`, in order.
    pub fn fail_lists(&self, errors: impl IntoIterator<Item = ApiError>) {
        lock(&self.lists).extend(errors);
    }

    pub fn set_post_latency(&self, latency: Duration) {
        *lock(&self.post_latency) = latency;
    }

    /// A group that exists already (made by another system, or an earlier POST).
    pub fn seed(&self, parent: i64, name: &str, ext_id: Option<&str>) -> i64 {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst) as i64;
        lock(&self.groups).push(Group {
            id,
            ext_id: ext_id.map(str::to_owned),
            name: name.to_owned(),
            parent,
        });
        id
    }

    pub fn posts(&self) -> u64 {
        self.posts.load(Ordering::SeqCst)
    }

    pub fn lists(&self) -> u64 {
        self.list_calls.load(Ordering::SeqCst)
    }

    /// Groups carrying `ext_id`.
    pub fn groups_for(&self, ext_id: &str) -> usize {
        lock(&self.groups)
            .iter()
            .filter(|g| g.ext_id.as_deref() == Some(ext_id))
            .count()
    }
}

impl GroupApi for FakeApi {
    async fn create_group(
        &self,
        command: &CreateGroup,
        _trace: Option<&Traceparent>,
    ) -> Result<Created, ApiError> {
        self.posts.fetch_add(1, Ordering::SeqCst);
        let latency = *lock(&self.post_latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let answer = lock(&self.creates).pop_front().unwrap_or(Answer::Create);
        // The API's sibling rule: names are unique under one parent.
        let taken = lock(&self.groups)
            .iter()
            .any(|g| g.parent == command.parent_id && names_match(&g.name, &command.name));
        if taken && !matches!(answer, Answer::Fail(_)) {
            return Err(ApiError::DuplicateName {
                message: "a group with this name already exists".into(),
                request_id: None,
            });
        }
        let create = || {
            self.seed(
                command.parent_id,
                &command.name,
                Some(command.ext_id.as_str()),
            )
        };
        match answer {
            Answer::Create => Ok(Created {
                org_unit_id: create(),
                request_id: Some(format!("req-{}", self.posts())),
                http_status: 201,
            }),
            Answer::Fail(e) => Err(e),
            Answer::CommitThen(e) => {
                create();
                Err(e)
            }
        }
    }

    async fn find_children_named(
        &self,
        parent: i64,
        name: &str,
        _trace: Option<&Traceparent>,
    ) -> Result<Vec<GroupSummary>, ApiError> {
        self.list_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(e) = lock(&self.lists).pop_front() {
            return Err(e);
        }
        Ok(lock(&self.groups)
            .iter()
            .filter(|g| g.parent == parent && names_match(&g.name, name))
            .map(|g| GroupSummary {
                org_unit_id: g.id,
                org_unit_ext_id: g.ext_id.clone(),
                org_unit_name: g.name.clone(),
                org_unit_parent_id: Some(g.parent),
                org_unit_status: Some("active".into()),
            })
            .collect())
    }

    async fn find_child_with_ext_id(
        &self,
        parent: i64,
        ext_id: &str,
        _trace: Option<&Traceparent>,
    ) -> Result<Option<GroupSummary>, ApiError> {
        self.list_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(e) = lock(&self.lists).pop_front() {
            return Err(e);
        }
        Ok(lock(&self.groups)
            .iter()
            .find(|g| g.parent == parent && g.ext_id.as_deref() == Some(ext_id))
            .map(|g| GroupSummary {
                org_unit_id: g.id,
                org_unit_ext_id: g.ext_id.clone(),
                org_unit_name: g.name.clone(),
                org_unit_parent_id: Some(g.parent),
                org_unit_status: Some("active".into()),
            }))
    }

    async fn probe(&self) -> Result<(), ApiError> {
        Ok(())
    }
}

/// Counts what the core reports.
#[derive(Default)]
pub struct CountingRecorder {
    counts: Mutex<HashMap<String, i64>>,
}

impl CountingRecorder {
    pub fn get(&self, what: &str) -> i64 {
        lock(&self.counts).get(what).copied().unwrap_or(0)
    }

    fn add(&self, what: String, n: i64) {
        *lock(&self.counts).entry(what).or_insert(0) += n;
    }
}

impl Recorder for CountingRecorder {
    fn command(&self, outcome: Outcome) {
        self.add(format!("command:{}", outcome.as_str()), 1);
    }
    fn dead_letter(&self, kind: FailureKind) {
        self.add(format!("dead_letter:{}", kind.as_str()), 1);
    }
    fn deferral(&self, reason: DeferReason) {
        self.add(format!("deferral:{}", reason.as_str()), 1);
    }
    fn retry(&self) {
        self.add("retry".into(), 1);
    }
    fn dedup_hit(&self) {
        self.add("dedup_hit".into(), 1);
    }
    fn in_flight(&self, delta: i64) {
        self.add("in_flight".into(), delta);
    }
    fn orphan(&self) {
        self.add("orphan".into(), 1);
    }
}

//! `convirza-sim`: a local stand-in for the Convirza Platform API v3.
//!
//! It enforces the rules the worker must cope with (bearer token, parent must exist,
//! sibling names unique ignoring case and surrounding spaces) and can be told to misbehave
//! (latency, failing the next N calls with any status and `Retry-After`, committing a
//! group and then dropping the connection or stalling past the client's timeout).
//!
//! Invariants:
//! - groups are only ever created by a valid `POST /v3/groups` or an explicit seed, and the
//!   inspection endpoint counts them per ext id, so tests can assert "exactly one group";
//! - "commit-then-drop" and "commit-then-stall" create the group *before* misbehaving, as
//!   a real API that timed out after committing would.

mod faults;
mod server;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use faults::{FailNext, Faults, IdKey};

pub use server::{SimHandle, spawn};

/// The org unit that owns the simulated account; seed parents are its children.
pub const ROOT_ORG_UNIT_ID: i64 = 1;
/// Request log entries kept (oldest dropped first).
const REQUEST_LOG_LIMIT: usize = 10_000;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    /// Bearer token accepted for static-token auth.
    pub token: String,
    /// Active groups that exist at start, as children of the account root.
    pub parents: Vec<i64>,
    /// First id handed out to a created group.
    pub first_id: i64,
    /// Largest page `GET /v3/groups/list` returns, whatever `limit` asks for.
    pub max_page: u32,
    pub faults: Faults,
    pub auth: SimAuth,
}

/// The login side of the API (`POST /oauth/token`, `POST /oauth/refresh-token`).
#[derive(Debug, Clone)]
pub struct SimAuth {
    pub email: String,
    pub password: String,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// Logins allowed per minute (the real limit is 10 per IP); more answer 429.
    pub logins_per_minute: u32,
    /// Wrap token responses in the API envelope (the docs show both shapes).
    pub enveloped: bool,
}

impl Default for SimAuth {
    fn default() -> Self {
        SimAuth {
            email: "admin@example.com".into(),
            password: "sim-password".into(),
            access_ttl: Duration::from_secs(7 * 86_400),
            refresh_ttl: Duration::from_secs(180 * 86_400),
            logins_per_minute: 10,
            enveloped: false,
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: "sim-token".into(),
            parents: vec![1000, 1001],
            first_id: 5001,
            max_page: 100,
            faults: Faults::default(),
            auth: SimAuth::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimGroup {
    pub org_unit_id: i64,
    pub org_unit_ext_id: Option<String>,
    pub org_unit_name: String,
    pub org_unit_parent_id: Option<i64>,
    pub org_unit_status: String,
    /// The full request body that created it (seeded groups: `null`).
    #[serde(default)]
    pub body: serde_json::Value,
}

impl SimGroup {
    /// An active group without an ext id or a body.
    fn seeded(id: i64, name: String, parent: Option<i64>) -> SimGroup {
        SimGroup {
            org_unit_id: id,
            org_unit_ext_id: None,
            org_unit_name: name,
            org_unit_parent_id: parent,
            org_unit_status: "active".into(),
            body: serde_json::Value::Null,
        }
    }

    /// A parent commands may use: the account's child.
    fn parent(id: i64) -> SimGroup {
        SimGroup::seeded(id, format!("Parent {id}"), Some(ROOT_ORG_UNIT_ID))
    }
}

/// One request the simulator answered (or dropped), for the inspection endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestRecord {
    pub seq: u64,
    pub method: String,
    pub path: String,
    /// Status sent, or `null` when the connection was dropped.
    pub status: Option<u16>,
    pub ext_id: Option<String>,
    pub traceparent: Option<String>,
    pub fault: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Groups created through `POST /v3/groups` (seeds excluded).
    pub groups_created: u64,
    /// Create requests answered (or dropped) so far.
    pub create_requests: u64,
    /// Create requests received so far, answered or not (latency still running).
    #[serde(default)]
    pub creates_received: u64,
    pub list_requests: u64,
    /// Groups per ext id, over created and seeded groups.
    pub per_ext_id: BTreeMap<String, u64>,
    pub logins: u64,
    pub refreshes: u64,
    /// Refresh tokens presented a second time: must always be 0 for the worker.
    pub refresh_reuse: u64,
    /// Ext ids with more than one group: must always be empty for the worker.
    pub duplicated_ext_ids: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub config: SimConfig,
    /// Every group, in creation order. Added to only through [`State::push_group`], which
    /// keeps the indexes below (so a create is not a scan of every group).
    pub groups: Vec<SimGroup>,
    /// org_unit_id → position in `groups`.
    by_id: HashMap<i64, usize>,
    /// (parent, trimmed lower-case name) of every group: the sibling-name rule.
    sibling_names: HashSet<(i64, String)>,
    pub next_id: i64,
    pub token: Option<String>,
    pub faults: Faults,
    pub log: VecDeque<RequestRecord>,
    pub seq: u64,
    pub created: u64,
    pub create_requests: u64,
    pub creates_received: u64,
    pub list_requests: u64,
    /// Issued access tokens and when they expire.
    pub access_tokens: HashMap<String, SystemTime>,
    /// Issued refresh tokens: expiry, and whether already used (they are single-use).
    pub refresh_tokens: HashMap<String, (SystemTime, bool)>,
    pub login_times: VecDeque<SystemTime>,
    pub logins: u64,
    pub refreshes: u64,
    pub refresh_reuse: u64,
}

impl State {
    fn new(config: SimConfig) -> State {
        let mut groups = vec![SimGroup::seeded(
            ROOT_ORG_UNIT_ID,
            "Simulated Account".into(),
            None,
        )];
        groups.extend(config.parents.iter().map(|p| SimGroup::parent(*p)));
        let highest = groups.iter().map(|g| g.org_unit_id).max().unwrap_or(0);
        let mut state = State {
            next_id: config.first_id.max(highest + 1),
            token: Some(config.token.clone()),
            faults: config.faults.clone(),
            config,
            ..State::default()
        };
        for g in groups {
            state.push_group(g);
        }
        state
    }

    /// Add a group, keeping the indexes.
    pub fn push_group(&mut self, group: SimGroup) {
        if let Some(parent) = group.org_unit_parent_id {
            self.sibling_names
                .insert((parent, sibling_key(&group.org_unit_name)));
        }
        self.by_id.insert(group.org_unit_id, self.groups.len());
        self.groups.push(group);
    }

    /// The group with this id.
    pub fn group(&self, id: i64) -> Option<&SimGroup> {
        self.by_id.get(&id).and_then(|i| self.groups.get(*i))
    }

    /// Whether `parent` has a child named `name` (trimmed, case-insensitive: the rule of
    /// [`crate::pipeline::names_match`]).
    pub fn sibling_named(&self, parent: i64, name: &str) -> bool {
        self.sibling_names.contains(&(parent, sibling_key(name)))
    }

    /// Whether `token` is the static token or a live issued access token.
    pub fn token_ok(&self, token: &str) -> bool {
        self.token.as_deref() == Some(token)
            || self
                .access_tokens
                .get(token)
                .is_some_and(|exp| *exp > SystemTime::now())
    }

    /// Issue a new pair.
    pub fn issue(&mut self) -> (String, String, SystemTime, SystemTime) {
        let now = SystemTime::now();
        let access = format!("at-{}", uuid::Uuid::new_v4().simple());
        let refresh = format!("rt-{}", uuid::Uuid::new_v4().simple());
        let (a_exp, r_exp) = (
            now + self.config.auth.access_ttl,
            now + self.config.auth.refresh_ttl,
        );
        self.access_tokens.insert(access.clone(), a_exp);
        self.refresh_tokens.insert(refresh.clone(), (r_exp, false));
        (access, refresh, a_exp, r_exp)
    }

    pub fn record(&mut self, mut r: RequestRecord) {
        self.seq += 1;
        r.seq = self.seq;
        if self.log.len() >= REQUEST_LOG_LIMIT {
            self.log.pop_front();
        }
        self.log.push_back(r);
    }

    pub fn insert_group(
        &mut self,
        parent: i64,
        name: &str,
        ext_id: Option<&str>,
        body: serde_json::Value,
    ) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.push_group(SimGroup {
            org_unit_ext_id: ext_id.map(str::to_owned),
            body,
            ..SimGroup::seeded(id, name.to_owned(), Some(parent))
        });
        id
    }

    fn stats(&self) -> SimStats {
        let mut per_ext_id = BTreeMap::new();
        for g in &self.groups {
            if let Some(e) = &g.org_unit_ext_id {
                *per_ext_id.entry(e.clone()).or_insert(0u64) += 1;
            }
        }
        let duplicated_ext_ids = per_ext_id
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(e, _)| e.clone())
            .collect();
        SimStats {
            logins: self.logins,
            refreshes: self.refreshes,
            refresh_reuse: self.refresh_reuse,
            groups_created: self.created,
            create_requests: self.create_requests,
            creates_received: self.creates_received,
            list_requests: self.list_requests,
            per_ext_id,
            duplicated_ext_ids,
        }
    }
}

/// Shared handle on the simulator's state: what tests and the admin endpoints use.
#[derive(Clone, Debug)]
pub struct Sim {
    state: Arc<Mutex<State>>,
}

impl Sim {
    pub fn new(config: SimConfig) -> Sim {
        Sim {
            state: Arc::new(Mutex::new(State::new(config))),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written in a way that
        // matters for a simulator; keep serving.
        crate::lock(&self.state)
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.lock().faults);
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    /// Accept `token` from now on (`None`: accept nothing, i.e. every token is revoked).
    pub fn set_token(&self, token: Option<&str>) {
        self.lock().token = token.map(str::to_owned);
    }

    /// Invalidate every issued access token (refresh tokens stay valid), as a password
    /// change or a security event would.
    pub fn revoke_access_tokens(&self) {
        self.lock().access_tokens.clear();
    }

    pub fn stats(&self) -> SimStats {
        self.lock().stats()
    }

    /// Groups carrying `ext_id`.
    pub fn groups_for(&self, ext_id: &str) -> Vec<SimGroup> {
        self.lock()
            .groups
            .iter()
            .filter(|g| g.org_unit_ext_id.as_deref() == Some(ext_id))
            .cloned()
            .collect()
    }

    pub fn groups(&self) -> Vec<SimGroup> {
        self.lock().groups.clone()
    }

    /// Make `id` an active group (a parent commands may use), as the account's child.
    pub fn add_parent(&self, id: i64) {
        let mut s = self.lock();
        if s.group(id).is_none() {
            s.push_group(SimGroup::parent(id));
        }
    }

    /// Create a group directly, as if another system had made it.
    pub fn seed_group(&self, parent: i64, name: &str, ext_id: Option<&str>) -> i64 {
        self.lock()
            .insert_group(parent, name, ext_id, serde_json::Value::Null)
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().log.iter().cloned().collect()
    }

    /// Forget every created group, fault and logged request.
    pub fn reset(&self) {
        let mut s = self.lock();
        let config = s.config.clone();
        *s = State::new(config);
    }
}

/// The sibling-name rule's key: names equal after trimming, ignoring case.
fn sibling_key(name: &str) -> String {
    name.trim().to_lowercase()
}

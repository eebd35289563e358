//! The simulator's HTTP side: the API routes (create, list, login, refresh), the admin
//! routes under `/_sim`, and a connection layer that lets a handler drop its connection
//! unanswered (commit-then-drop).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceExt;

use super::faults::{FailNext, Faults, take, take_count};
use super::{ROOT_ORG_UNIT_ID, RequestRecord, Sim, SimConfig};

/// A running simulator. Dropping it stops the server.
#[derive(Debug)]
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: Sim,
    task: tokio::task::JoinHandle<()>,
}

impl SimHandle {
    /// The `/v3` base URL to configure as `api.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v3", self.addr)
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind `config.listen` (port 0 picks a free port) and serve until the handle is dropped.
pub async fn spawn(config: SimConfig) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let sim = Sim::new(config);
    let router = router(sim.clone());
    let task = tokio::spawn(serve(listener, router));
    Ok(SimHandle { addr, sim, task })
}

/// Lets a handler kill the TCP connection it is answering on (commit-then-drop).
#[derive(Clone)]
struct ConnKill(Arc<Notify>);

async fn serve(listener: TcpListener, router: Router) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let kill = Arc::new(Notify::new());
            let conn_kill = ConnKill(kill.clone());
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(conn_kill.clone());
                    router.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                // Dropping the connection future closes the socket without a response.
                _ = kill.notified() => {}
            }
        });
    }
}

pub(crate) fn router(sim: Sim) -> Router {
    Router::new()
        .route("/v3/groups", post(create_group))
        .route("/v3/groups/list", get(list_groups))
        .route("/oauth/token", post(login))
        .route("/oauth/refresh-token", post(refresh))
        .route("/_sim/revoke", post(revoke))
        .route("/_sim/stats", get(stats))
        .route("/_sim/groups", get(all_groups).post(seed_group))
        .route("/_sim/faults", get(get_faults).put(put_faults))
        .route("/_sim/token", put(put_token))
        .route("/_sim/requests", get(requests))
        .route("/_sim/reset", post(reset))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(sim)
}

fn envelope(status: StatusCode, message: &str, data: Value) -> Response {
    let body = json!({
        "code": status.as_u16(),
        "message": message,
        "data": data,
        "request_id": uuid::Uuid::new_v4().to_string(),
        "timestamp": crate::clock::now_rfc3339(),
    });
    (status, Json(body)).into_response()
}

/// An envelope without data: every refusal.
fn refuse(status: StatusCode, message: &str) -> Response {
    envelope(status, message, Value::Null)
}

fn fail_response(spec: &FailNext) -> Response {
    let status = StatusCode::from_u16(spec.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match &spec.body {
        Some(body) => (status, [("content-type", "text/html")], body.clone()).into_response(),
        None => envelope(
            status,
            status.canonical_reason().unwrap_or("Error"),
            Value::Null,
        ),
    };
    if let Some(ra) = spec
        .retry_after
        .as_ref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        response.headers_mut().insert("retry-after", ra);
    }
    response
}

fn bearer_ok(sim: &Sim, headers: &HeaderMap) -> bool {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    presented.is_some_and(|p| sim.lock().token_ok(p))
}

impl RequestRecord {
    fn new(method: &str, path: &str, ext_id: Option<String>, headers: &HeaderMap) -> Self {
        let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
        RequestRecord {
            seq: 0,
            method: method.into(),
            path: path.into(),
            status: None,
            ext_id,
            traceparent: traceparent.map(str::to_owned),
            fault: None,
        }
    }
}

async fn apply_latency(sim: &Sim) {
    let ms = sim.lock().faults.latency_ms;
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

struct Reply {
    status: Option<u16>,
    fault: Option<String>,
    response: Option<Response>,
}

async fn create_group(
    AxumState(sim): AxumState<Sim>,
    kill: Option<Extension<ConnKill>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    sim.lock().creates_received += 1;
    apply_latency(&sim).await;
    let parsed: Option<serde_json::Map<String, Value>> = serde_json::from_slice(&body).ok();
    let ext_id = parsed
        .as_ref()
        .and_then(|b| b.get("org_unit_ext_id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut record = RequestRecord::new("POST", "/v3/groups", ext_id.clone(), &headers);
    let authorized = bearer_ok(&sim, &headers);
    let reply = decide_create(&sim, authorized, parsed, ext_id.as_deref());
    record.status = reply.status;
    record.fault = reply.fault.clone();
    let stall = {
        let mut s = sim.lock();
        s.create_requests += 1;
        s.record(record);
        let ms = s.faults.stall_ms;
        (reply.fault.as_deref() == Some("stall_after_commit")).then_some(ms)
    };
    match (reply.response, stall) {
        (None, _) => {
            tracing::info!(ext_id = ?ext_id, "fault: committed, dropping the connection");
            if let Some(Extension(ConnKill(k))) = kill {
                k.notify_one();
            }
            std::future::pending::<Response>().await
        }
        (Some(response), Some(ms)) => {
            tracing::info!(ext_id = ?ext_id, stall_ms = ms, "fault: committed, stalling");
            tokio::time::sleep(Duration::from_millis(ms)).await;
            response
        }
        (Some(response), None) => response,
    }
}

fn decide_create(
    sim: &Sim,
    authorized: bool,
    body: Option<serde_json::Map<String, Value>>,
    ext_id: Option<&str>,
) -> Reply {
    let mut s = sim.lock();
    if !authorized {
        return refused(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: invalid or expired token",
        );
    }
    if let Some(failed) = injected_failure(&mut s) {
        return failed;
    }
    let Some(body) = body else {
        return refused(
            StatusCode::BAD_REQUEST,
            "Request body must be a JSON object",
        );
    };
    let (name, parent) = match name_and_parent(&body) {
        Ok(np) => np,
        Err(why) => return refused(StatusCode::BAD_REQUEST, why),
    };
    let parent_ok = s
        .group(parent)
        .is_some_and(|g| g.org_unit_status == "active");
    if !parent_ok {
        return refused(
            StatusCode::BAD_REQUEST,
            &format!("Parent org unit {parent} does not exist or is not active"),
        );
    }
    let clash = s.sibling_named(parent, &name);
    if clash {
        return refused(
            StatusCode::BAD_REQUEST,
            &format!(
                "A group with the name '{}' already exists under parent {parent}",
                name.trim()
            ),
        );
    }
    let id = s.insert_group(parent, &name, ext_id, Value::Object(body));
    s.created += 1;
    let data = json!({ s.faults.id_key.as_str(): id, "org_unit_name": name, "org_unit_parent_id": parent });
    if take_count(&mut s.faults.drop_after_commit) {
        return Reply {
            status: None,
            fault: Some("drop_after_commit".into()),
            response: None,
        };
    }
    let fault =
        take_count(&mut s.faults.stall_after_commit).then(|| "stall_after_commit".to_owned());
    reply(StatusCode::CREATED, "Group created", data, fault)
}

/// The request's name and parent, or why the 400 refuses it.
fn name_and_parent(body: &serde_json::Map<String, Value>) -> Result<(String, i64), &'static str> {
    let name = match body.get("org_unit_name").and_then(Value::as_str) {
        Some(n) if !n.trim().is_empty() => n.to_owned(),
        _ => return Err("org_unit_name is required"),
    };
    let Some(parent) = body.get("org_unit_parent_id").and_then(Value::as_i64) else {
        return Err("org_unit_parent_id is required and must be an integer");
    };
    Ok((name, parent))
}

/// A failure the faults ask for, before the request is even read.
fn injected_failure(s: &mut super::State) -> Option<Reply> {
    let (spec, fault) = match take(&mut s.faults.fail_next) {
        Some(spec) => (spec, "fail_next"),
        None if s.faults.error_rate > 0.0 && rand::random::<f64>() < s.faults.error_rate => (
            FailNext::new(1, s.faults.error_status.unwrap_or(503)),
            "error_rate",
        ),
        None => return None,
    };
    Some(Reply {
        status: Some(spec.status),
        fault: Some(fault.into()),
        response: Some(fail_response(&spec)),
    })
}

fn refused(status: StatusCode, message: &str) -> Reply {
    reply(status, message, Value::Null, None)
}

fn reply(status: StatusCode, message: &str, data: Value, fault: Option<String>) -> Reply {
    Reply {
        status: Some(status.as_u16()),
        fault,
        response: Some(envelope(status, message, data)),
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    org_unit_id: Option<i64>,
    group_name: Option<String>,
    limit: Option<u32>,
    offset: Option<u32>,
}

async fn list_groups(
    AxumState(sim): AxumState<Sim>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    apply_latency(&sim).await;
    let authorized = bearer_ok(&sim, &headers);
    let mut s = sim.lock();
    s.list_requests += 1;
    let mut record = RequestRecord::new("GET", "/v3/groups/list", None, &headers);
    let response = if !authorized {
        refuse(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: invalid or expired token",
        )
    } else if let Some(spec) = take(&mut s.faults.fail_next_list) {
        record.fault = Some("fail_next_list".into());
        fail_response(&spec)
    } else {
        match query {
            Err(e) => refuse(StatusCode::BAD_REQUEST, &format!("invalid query: {e}")),
            Ok(Query(q)) => {
                let parent = q.org_unit_id.unwrap_or(ROOT_ORG_UNIT_ID);
                let needle = q.group_name.as_deref().map(|n| n.trim().to_lowercase());
                let limit = q.limit.unwrap_or(50).clamp(1, s.config.max_page) as usize;
                let offset = q.offset.unwrap_or(0) as usize;
                let matched: Vec<_> = s
                    .groups
                    .iter()
                    .filter(|g| g.org_unit_parent_id == Some(parent))
                    .filter(|g| {
                        needle
                            .as_ref()
                            .is_none_or(|n| g.org_unit_name.to_lowercase().contains(n.as_str()))
                    })
                    .collect();
                let total = matched.len();
                let groups: Vec<Value> = matched
                    .into_iter()
                    .skip(offset)
                    .take(limit)
                    .map(|g| {
                        json!({
                            "org_unit_id": g.org_unit_id,
                            "org_unit_ext_id": g.org_unit_ext_id,
                            "org_unit_name": g.org_unit_name,
                            "org_unit_parent_id": g.org_unit_parent_id,
                            "org_unit_status": g.org_unit_status,
                        })
                    })
                    .collect();
                envelope(
                    StatusCode::OK,
                    "Success",
                    json!({"groups": groups, "total": total}),
                )
            }
        }
    };
    record.status = Some(response.status().as_u16());
    s.record(record);
    response
}

async fn stats(AxumState(sim): AxumState<Sim>) -> Response {
    Json(sim.stats()).into_response()
}

#[derive(Debug, Deserialize)]
struct GroupsQuery {
    ext_id: Option<String>,
}

async fn all_groups(AxumState(sim): AxumState<Sim>, Query(q): Query<GroupsQuery>) -> Response {
    let groups = match q.ext_id {
        Some(e) => sim.groups_for(&e),
        None => sim.groups(),
    };
    Json(groups).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedGroup {
    org_unit_parent_id: i64,
    org_unit_name: String,
    org_unit_ext_id: Option<String>,
}

async fn seed_group(AxumState(sim): AxumState<Sim>, Json(seed): Json<SeedGroup>) -> Response {
    let id = sim.seed_group(
        seed.org_unit_parent_id,
        &seed.org_unit_name,
        seed.org_unit_ext_id.as_deref(),
    );
    (StatusCode::CREATED, Json(json!({"org_unit_id": id}))).into_response()
}

async fn get_faults(AxumState(sim): AxumState<Sim>) -> Response {
    Json(sim.faults()).into_response()
}

async fn put_faults(AxumState(sim): AxumState<Sim>, Json(faults): Json<Faults>) -> Response {
    tracing::info!(faults = ?faults, "faults replaced");
    sim.set_faults(faults.clone());
    Json(faults).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    token: Option<String>,
}

async fn put_token(AxumState(sim): AxumState<Sim>, Json(body): Json<TokenBody>) -> Response {
    tracing::info!(revoked = body.token.is_none(), "accepted token changed");
    sim.set_token(body.token.as_deref());
    StatusCode::NO_CONTENT.into_response()
}

async fn requests(AxumState(sim): AxumState<Sim>) -> Response {
    Json(sim.requests()).into_response()
}

async fn reset(AxumState(sim): AxumState<Sim>) -> Response {
    sim.reset();
    StatusCode::NO_CONTENT.into_response()
}

fn token_response(state: &mut super::State) -> Response {
    let (access, refresh, a_exp, r_exp) = state.issue();
    let body = json!({
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "Bearer",
        "expires_in": crate::clock::rfc3339(a_exp),
        "refresh_expires_in": crate::clock::rfc3339(r_exp),
        "user": {"id": 1, "email": state.config.auth.email, "role": "admin"},
    });
    if state.config.auth.enveloped {
        envelope(StatusCode::OK, "Success", body)
    } else {
        (StatusCode::OK, Json(body)).into_response()
    }
}

#[derive(Debug, Deserialize)]
struct LoginBody {
    email: Option<String>,
    password: Option<String>,
}

async fn login(AxumState(sim): AxumState<Sim>, body: Option<Json<LoginBody>>) -> Response {
    let mut s = sim.lock();
    let now = std::time::SystemTime::now();
    while s
        .login_times
        .front()
        .is_some_and(|t| now.duration_since(*t).unwrap_or_default() > Duration::from_secs(60))
    {
        s.login_times.pop_front();
    }
    if s.login_times.len() >= s.config.auth.logins_per_minute as usize {
        let mut r = refuse(StatusCode::TOO_MANY_REQUESTS, "Too many login attempts");
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("60"));
        return r;
    }
    s.login_times.push_back(now);
    let Some(Json(body)) = body else {
        return refuse(StatusCode::BAD_REQUEST, "email and password are required");
    };
    if body.email.as_deref() != Some(s.config.auth.email.as_str())
        || body.password.as_deref() != Some(s.config.auth.password.as_str())
    {
        return refuse(StatusCode::UNAUTHORIZED, "Invalid email or password");
    }
    s.logins += 1;
    tracing::info!(logins = s.logins, "login");
    token_response(&mut s)
}

#[derive(Debug, Deserialize)]
struct RefreshBody {
    refresh_token: Option<String>,
}

async fn refresh(AxumState(sim): AxumState<Sim>, body: Option<Json<RefreshBody>>) -> Response {
    let mut s = sim.lock();
    let token = body.and_then(|Json(b)| b.refresh_token).unwrap_or_default();
    match s.refresh_tokens.get(&token).copied() {
        None => refuse(StatusCode::UNAUTHORIZED, "Invalid refresh token"),
        Some((_, true)) => {
            s.refresh_reuse += 1;
            tracing::warn!(
                refresh_reuse = s.refresh_reuse,
                "refresh token presented twice"
            );
            refuse(StatusCode::UNAUTHORIZED, "Refresh token already used")
        }
        Some((expiry, false)) if expiry <= std::time::SystemTime::now() => {
            refuse(StatusCode::UNAUTHORIZED, "Refresh token expired")
        }
        Some((expiry, false)) => {
            s.refresh_tokens.insert(token, (expiry, true));
            s.refreshes += 1;
            tracing::info!(refreshes = s.refreshes, "token refreshed");
            token_response(&mut s)
        }
    }
}

async fn revoke(AxumState(sim): AxumState<Sim>) -> Response {
    sim.revoke_access_tokens();
    tracing::info!("all access tokens revoked");
    StatusCode::NO_CONTENT.into_response()
}

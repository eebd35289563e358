//! The HTTP client: one try per call (plus one after a token refresh), every answer
//! classified into the port's [`ApiError`] by the pure [`classify`].

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};

use crate::command::CreateGroup;
use crate::pipeline::{ApiError, Created, GroupSummary, names_match};
use crate::retry::parse_retry_after;
use crate::traceparent::Traceparent;
use tracing::Instrument as _;

use super::Auth;
use super::model::{Envelope, GroupPage};
use crate::secret::ExposeSecret;

/// Page size used when listing children for reconciliation.
pub const LIST_PAGE_SIZE: u32 = 100;
/// A listing longer than this many pages is treated as a broken API rather than looped on.
const MAX_LIST_PAGES: u32 = 1_000;
/// Error messages from bodies are cut here: HTML error pages are not log lines.
const MAX_MESSAGE_CHARS: usize = 300;

/// The HTTP client could not be built (TLS back-end, system configuration).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct BuildError(#[source] pub reqwest::Error);

/// The HTTP client every API call goes through, with the worker's timeouts.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, BuildError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("group-provisioner/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(BuildError)
}

/// One observed HTTP exchange (operation, HTTP status or `None`, duration), for metrics.
pub type Observer = std::sync::Arc<dyn Fn(Operation, Option<u16>, Duration) + Send + Sync>;

#[derive(Clone)]
pub struct ConvirzaClient {
    http: reqwest::Client,
    base_url: String,
    /// `POST /groups`, parsed once: parsing a URL (IDNA included) on every request was a
    /// visible share of the worker's CPU.
    groups_url: Result<reqwest::Url, String>,
    auth: Auth,
    observer: Option<Observer>,
}

impl std::fmt::Debug for ConvirzaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvirzaClient")
            .field("base_url", &self.base_url)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

closed_set! {
    /// The API calls the client makes.
    pub enum Operation {
        CreateGroup = "create_group",
        ListChildGroups = "list_child_groups",
    }
}

impl ConvirzaClient {
    /// `base_url` is the `/v3` root, e.g. `https://platform-api.convirza.com/v3`.
    pub fn new(
        base_url: &str,
        auth: Auth,
        timeout: Duration,
    ) -> Result<ConvirzaClient, BuildError> {
        let base_url = base_url.trim_end_matches('/').to_owned();
        let groups_url = reqwest::Url::parse(&format!("{base_url}/groups"))
            .map_err(|e| format!("{base_url}/groups ({e})"));
        Ok(ConvirzaClient {
            http: http_client(timeout)?,
            groups_url,
            base_url,
            auth,
            observer: None,
        })
    }

    /// Report every exchange (operation, HTTP status or `None`, duration) to `observer`.
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `POST /v3/groups`. One try (plus one after a token refresh); retrying is the
    /// caller's policy.
    pub async fn create_group(
        &self,
        command: &CreateGroup,
        trace: Option<&Traceparent>,
    ) -> Result<Created, ApiError> {
        let body = serde_json::to_vec(&command.api_body()).map_err(|e| ApiError::Rejected {
            status: 0,
            message: format!("cannot encode request body: {e}"),
            request_id: None,
        })?;
        let url = self
            .groups_url
            .clone()
            .map_err(|path| ApiError::EndpointNotFound { path })?;
        let (status, envelope) = self
            .send(Operation::CreateGroup, Method::POST, url, Some(body), trace)
            .await?;
        match envelope.created_id() {
            Some(org_unit_id) => Ok(Created {
                org_unit_id,
                request_id: envelope.request_id(),
                http_status: status.as_u16(),
            }),
            // The API says it succeeded but we cannot tell which group: the group exists,
            // its id must be recovered by listing.
            None => Err(ApiError::UnknownOutcome {
                message: format!(
                    "HTTP {} without data.orgUnitId / data.org_unit_id",
                    status.as_u16()
                ),
            }),
        }
    }

    /// `GET /v3/groups/list`: one page of direct children of `parent` (the caller's own org
    /// unit when `None`), optionally filtered by a case-insensitive partial name.
    pub async fn list_child_groups(
        &self,
        parent: Option<i64>,
        name: Option<&str>,
        limit: u32,
        offset: u32,
        trace: Option<&Traceparent>,
    ) -> Result<GroupPage, ApiError> {
        let mut url =
            reqwest::Url::parse(&format!("{}/groups/list", self.base_url)).map_err(|e| {
                ApiError::EndpointNotFound {
                    path: format!("{}/groups/list ({e})", self.base_url),
                }
            })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(p) = parent {
                q.append_pair("org_unit_id", &p.to_string());
            }
            if let Some(n) = name {
                q.append_pair("group_name", n);
            }
            q.append_pair("limit", &limit.to_string());
            q.append_pair("offset", &offset.to_string());
        }
        let (_, envelope) = self
            .send(Operation::ListChildGroups, Method::GET, url, None, trace)
            .await?;
        envelope.page().ok_or_else(|| ApiError::Transient {
            status: None,
            message: "list response without data.groups".into(),
            retry_after: None,
            request_id: envelope.request_id(),
        })
    }

    /// Every direct child of `parent` whose name equals `name` ignoring case and
    /// surrounding spaces, paging through all results.
    pub async fn find_children_named(
        &self,
        parent: i64,
        name: &str,
        trace: Option<&Traceparent>,
    ) -> Result<Vec<GroupSummary>, ApiError> {
        let mut found = Vec::new();
        self.each_child(parent, Some(name.trim()), trace, |g| {
            if names_match(&g.org_unit_name, name) {
                found.push(g);
            }
            false
        })
        .await?;
        Ok(found)
    }

    /// The direct child of `parent` carrying `ext_id`, among all its children.
    pub async fn find_child_with_ext_id(
        &self,
        parent: i64,
        ext_id: &str,
        trace: Option<&Traceparent>,
    ) -> Result<Option<GroupSummary>, ApiError> {
        let mut found = None;
        self.each_child(parent, None, trace, |g| {
            if g.org_unit_ext_id.as_deref() == Some(ext_id) {
                found = Some(g);
                return true;
            }
            false
        })
        .await?;
        Ok(found)
    }

    /// Page through the children of `parent` (optionally filtered by a partial name),
    /// handing each to `visit` until it returns true or the listing ends.
    async fn each_child(
        &self,
        parent: i64,
        name: Option<&str>,
        trace: Option<&Traceparent>,
        mut visit: impl FnMut(GroupSummary) -> bool,
    ) -> Result<(), ApiError> {
        let mut offset = 0u32;
        for _ in 0..MAX_LIST_PAGES {
            let page = self
                .list_child_groups(Some(parent), name, LIST_PAGE_SIZE, offset, trace)
                .await?;
            let n = page.groups.len() as u32;
            for g in page.groups {
                if visit(g) {
                    return Ok(());
                }
            }
            offset += n;
            let done = n == 0
                || page.total.is_some_and(|t| u64::from(offset) >= t)
                || (page.total.is_none() && n < LIST_PAGE_SIZE);
            if done {
                return Ok(());
            }
        }
        Err(transient(
            None,
            format!("listing children of {parent} did not end after {MAX_LIST_PAGES} pages"),
        ))
    }

    async fn send(
        &self,
        op: Operation,
        method: Method,
        url: reqwest::Url,
        body: Option<Vec<u8>>,
        trace: Option<&Traceparent>,
    ) -> Result<(StatusCode, Envelope), ApiError> {
        let mut token = self.auth.bearer().await?;
        let mut refreshed = false;
        loop {
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(token.expose_secret())
                .header(reqwest::header::ACCEPT, "application/json");
            // With traces exported, the request's own span is the API's parent.
            let span = crate::otel::http_client_span(method.as_str(), &url);
            let tp = crate::otel::traceparent_of(&span).or_else(|| trace.map(|t| t.to_string()));
            if let Some(tp) = tp {
                req = req.header("traceparent", tp);
            }
            if let Some(b) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            let started = Instant::now();
            let result = self.exchange(op, req).instrument(span.clone()).await;
            let elapsed = started.elapsed();
            let status = result.as_ref().map(|(s, _, _)| s.as_u16()).ok();
            crate::otel::record_http_result(&span, status);
            if let Some(observe) = &self.observer {
                observe(op, status, elapsed);
            }
            tracing::debug!(
                op = op.as_str(),
                http_status = status,
                duration_ms = elapsed.as_millis() as u64,
                "convirza call"
            );
            let (status, headers, bytes) = result?;
            match classify(op, status, &headers, &bytes, SystemTime::now()) {
                Err(ApiError::Unauthorized { .. })
                    if !refreshed && self.auth.after_unauthorized(&token).await? =>
                {
                    refreshed = true;
                    token = self.auth.bearer().await?;
                }
                other => return other.map(|env| (status, env)),
            }
        }
    }

    async fn exchange(
        &self,
        op: Operation,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, HeaderMap, bytes::Bytes), ApiError> {
        let response = req.send().await.map_err(|e| transport_error(op, &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        match response.bytes().await {
            Ok(bytes) => Ok((status, headers, bytes)),
            // Status arrived but the body did not: for a success the group exists and we
            // do not know its id; for an error the status alone still classifies it.
            Err(e) if status.is_success() => Err(match op {
                Operation::CreateGroup => ApiError::UnknownOutcome {
                    message: format!(
                        "HTTP {} but the body was lost: {}",
                        status.as_u16(),
                        crate::text::error_chain(&e)
                    ),
                },
                Operation::ListChildGroups => transient(
                    None,
                    format!("list body lost: {}", crate::text::error_chain(&e)),
                ),
            }),
            Err(_) => Ok((status, headers, bytes::Bytes::new())),
        }
    }
}

fn transient(status: Option<u16>, message: String) -> ApiError {
    ApiError::Transient {
        status,
        message,
        retry_after: None,
        request_id: None,
    }
}

/// A transport failure: before the request could be sent it is a clean transient error;
/// once it may have been sent, a create is an unknown outcome. (A list is read-only, so
/// its failures are always just transient.)
fn transport_error(op: Operation, e: &reqwest::Error) -> ApiError {
    let message = crate::text::error_chain(e);
    if e.is_connect() || op == Operation::ListChildGroups {
        return transient(None, message);
    }
    ApiError::UnknownOutcome {
        message: if e.is_timeout() {
            format!("timed out waiting for the API: {message}")
        } else {
            message
        },
    }
}

/// Turn one HTTP answer into success or a classified error. Pure, so every branch is
/// unit-tested.
fn classify(
    op: Operation,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<Envelope, ApiError> {
    let envelope: Option<Envelope> = serde_json::from_slice(body).ok();
    let request_id = envelope
        .as_ref()
        .and_then(Envelope::request_id)
        .or_else(|| {
            headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
    let message = envelope
        .as_ref()
        .and_then(Envelope::message)
        .unwrap_or_else(|| body_snippet(status, body));
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now));
    let code = status.as_u16();
    match code {
        200..=299 => match envelope {
            Some(env) => Ok(env),
            None if op == Operation::CreateGroup => Err(ApiError::UnknownOutcome {
                message: format!(
                    "HTTP {code} with a body that is not JSON: {}",
                    body_snippet(status, body)
                ),
            }),
            None => Err(transient(
                Some(code),
                format!("HTTP {code} with a body that is not JSON"),
            )),
        },
        401 | 403 => Err(ApiError::Unauthorized {
            status: code,
            message,
        }),
        404 => Err(ApiError::EndpointNotFound {
            path: match op {
                Operation::CreateGroup => "POST /groups".into(),
                Operation::ListChildGroups => "GET /groups/list".into(),
            },
        }),
        429 => Err(ApiError::RateLimited { retry_after }),
        408 | 500..=599 => Err(ApiError::Transient {
            status: Some(code),
            message,
            retry_after,
            request_id,
        }),
        400 if is_duplicate_name(&message) => Err(ApiError::DuplicateName {
            message,
            request_id,
        }),
        _ => Err(ApiError::Rejected {
            status: code,
            message,
            request_id,
        }),
    }
}

/// The API's 400 messages are prose; these are the phrasings a name clash uses.
fn is_duplicate_name(message: &str) -> bool {
    let m = message.to_lowercase();
    m.contains("name")
        && [
            "already exist",
            "already in use",
            "already taken",
            "duplicate",
            "not unique",
        ]
        .iter()
        .any(|p| m.contains(p))
}

fn body_snippet(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let flat: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if flat.is_empty() {
        status
            .canonical_reason()
            .map(|r| format!("{} {r}", status.as_u16()))
            .unwrap_or_else(|| status.as_u16().to_string())
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn now() -> SystemTime {
        httpdate::parse_http_date("Thu, 26 Nov 2026 12:00:00 GMT").expect("date")
    }

    fn run(
        op: Operation,
        code: u16,
        headers: &[(&'static str, &str)],
        body: &str,
    ) -> Result<Envelope, ApiError> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_str(v).expect("header"));
        }
        classify(
            op,
            StatusCode::from_u16(code).expect("status"),
            &h,
            body.as_bytes(),
            now(),
        )
    }

    #[test]
    fn success_envelope() {
        let env = run(
            Operation::CreateGroup,
            201,
            &[],
            r#"{"code":201,"data":{"orgUnitId":9},"request_id":"r1"}"#,
        )
        .expect("ok");
        assert_eq!(env.created_id(), Some(9));
        assert_eq!(env.request_id().as_deref(), Some("r1"));
    }

    #[test]
    fn success_with_garbage_body_is_unknown_for_create() {
        assert!(matches!(
            run(Operation::CreateGroup, 201, &[], "<html>"),
            Err(ApiError::UnknownOutcome { .. })
        ));
        assert!(matches!(
            run(Operation::ListChildGroups, 200, &[], "<html>"),
            Err(ApiError::Transient { .. })
        ));
    }

    #[test]
    fn client_errors() {
        let e = run(
            Operation::CreateGroup,
            400,
            &[],
            r#"{"code":400,"message":"Parent org unit not found","request_id":"r2"}"#,
        )
        .expect_err("400");
        assert_eq!(
            e,
            ApiError::Rejected {
                status: 400,
                message: "Parent org unit not found".into(),
                request_id: Some("r2".into())
            }
        );
        let e = run(
            Operation::CreateGroup,
            400,
            &[],
            r#"{"message":"A group with the name 'X' already exists"}"#,
        )
        .expect_err("dup");
        assert!(matches!(e, ApiError::DuplicateName { .. }), "{e:?}");
        assert_eq!(e.http_status(), Some(400));
        let e = run(Operation::CreateGroup, 422, &[], r#"{"message":"bad"}"#).expect_err("422");
        assert!(matches!(e, ApiError::Rejected { status: 422, .. }));
        assert!(!e.is_transient());
    }

    #[test]
    fn auth_and_missing_endpoint() {
        assert!(matches!(
            run(Operation::CreateGroup, 401, &[], "{}"),
            Err(ApiError::Unauthorized { status: 401, .. })
        ));
        assert!(matches!(
            run(Operation::CreateGroup, 403, &[], ""),
            Err(ApiError::Unauthorized { status: 403, .. })
        ));
        assert!(matches!(
            run(Operation::CreateGroup, 404, &[], ""),
            Err(ApiError::EndpointNotFound { .. })
        ));
    }

    #[test]
    fn rate_limit_both_retry_after_forms() {
        let e = run(Operation::CreateGroup, 429, &[("retry-after", "7")], "").expect_err("429");
        assert_eq!(
            e,
            ApiError::RateLimited {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let e = run(
            Operation::CreateGroup,
            429,
            &[("retry-after", "Thu, 26 Nov 2026 12:00:20 GMT")],
            "",
        )
        .expect_err("429");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(20)));
        let e = run(Operation::CreateGroup, 429, &[], "").expect_err("429");
        assert_eq!(e.retry_after(), None);
        assert!(e.is_transient() && !e.may_have_created());
    }

    #[test]
    fn server_errors_with_html() {
        let e = run(
            Operation::CreateGroup,
            502,
            &[("x-request-id", "edge-1")],
            "<html>\n<body>Bad   Gateway</body></html>",
        )
        .expect_err("502");
        match &e {
            ApiError::Transient {
                status,
                message,
                request_id,
                ..
            } => {
                assert_eq!(*status, Some(502));
                assert_eq!(message, "<html> <body>Bad Gateway</body></html>");
                assert_eq!(request_id.as_deref(), Some("edge-1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(e.is_transient() && e.may_have_created());
        let e = run(Operation::CreateGroup, 500, &[], "").expect_err("500");
        assert_eq!(e.message(), "500 Internal Server Error");
        let long = "x".repeat(5000);
        let e = run(Operation::CreateGroup, 503, &[], &long).expect_err("503");
        assert_eq!(e.message().len(), MAX_MESSAGE_CHARS);
    }

    #[test]
    fn duplicate_name_phrasings() {
        assert!(is_duplicate_name(
            "Group name already exists under this parent"
        ));
        assert!(is_duplicate_name("org_unit_name must be unique: duplicate"));
        assert!(!is_duplicate_name("Parent org unit does not exist"));
        assert!(!is_duplicate_name("org_unit_name is required"));
    }
}

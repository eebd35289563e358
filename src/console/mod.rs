//! `group-provisioner console`: a web console for the dead-letter queue, on its own
//! listener (`console.listen`, default `127.0.0.1:9465`).
//!
//! Invariants:
//! - It reads and acts only through the operator commands' library code (`ops::dlq`,
//!   `ops::events`, `ops::status`): the same passes, so the DLQ keeps its order and loses
//!   nothing, and the same replay limit ([`crate::ops::dlq::DEFAULT_MAX_REPLAYS`]).
//! - An action is previewed, then confirmed: the preview fixes the letters it will touch
//!   (a [`crate::ops::dlq::Selection`]) and shows how many; the confirmation runs that
//!   plan once. A plan confirmed twice, or letters another plan already moved, are acted
//!   on at most once. An action runs to its end even if the browser goes away.
//! - Nobody sees a page without logging in, unless it was started with `--no-auth` on a
//!   loopback address; a viewer may look, only an operator may act (`auth`). Every POST
//!   carries the session's CSRF token, and a POST from another origin is refused.
//! - Everything from a message is made printable (`text::printable`) and escaped (maud)
//!   before it reaches a page; no page holds a secret. Every response carries a CSP that
//!   allows no inline script, `X-Frame-Options: DENY` and `Referrer-Policy: same-origin`.
//! - Every action, refusal and login is a log line naming the user: the audit trail.
//!
//! - `auth.rs` — users, sessions, CSRF, the role extractors;
//! - `view.rs` — the DLQ read into bounded summaries, the filter, the overview's figures;
//! - `actions.rs` — preview, confirm, run once, the export download, the audit lines;
//! - `plan.rs` — an action between its preview and its run (plain data);
//! - `pages.rs` — the HTML (typed maud templates).

mod actions;
mod auth;
mod pages;
mod plan;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::config::{ConfigError, Settings};
use crate::ops::OpsError;

/// A list view read within this long is reused (a failure too): a page with several
/// requests, or several people at once, costs one pass over the DLQ.
const VIEW_REUSE: Duration = Duration::from_secs(3);
/// How long a page waits for another pass over the queue (a `dlq` command, an action) to
/// end before it says the DLQ is busy; commands wait longer (`ops::dlq::LOCK_WAIT`).
pub const VIEW_LOCK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("console.export_dir {dir}: {source}", dir = .dir.display())]
    ExportDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the console stopped: {0}")]
    Serve(std::io::Error),
}

/// What every request shares.
pub struct Console {
    settings: Arc<Settings>,
    users: auth::Users,
    sessions: auth::Sessions,
    /// The CSRF token of every request with `--no-auth` (there are no sessions then).
    open_csrf: String,
    plans: plan::Plans,
    view: tokio::sync::Mutex<Option<(Instant, View)>>,
    /// Host headers this console answers to (module documentation).
    hosts: Hosts,
    /// Refused logins wait here one after the other: guessing stays slow however many
    /// requests come at once, and so does the log they write.
    refused_logins: tokio::sync::Mutex<()>,
}

pub type Shared = Arc<Console>;

/// A read of the DLQ for the pages, or why it failed.
type View = Result<Arc<view::Snapshot>, String>;

impl Console {
    /// The DLQ as of at most [`VIEW_REUSE`] ago (one pass for requests that come together).
    async fn snapshot(&self) -> View {
        let mut cached = self.view.lock().await;
        if let Some((at, s)) = cached.as_ref()
            && at.elapsed() < VIEW_REUSE
        {
            return s.clone();
        }
        let fresh = whole(&self.settings, |s| async move { view::read(&s).await })
            .await
            .map(Arc::new);
        *cached = Some((Instant::now(), fresh.clone()));
        fresh
    }

    /// The DLQ now, for an action's preview (and for the pages after it).
    async fn fresh_snapshot(&self) -> View {
        self.forget_view().await;
        self.snapshot().await
    }

    async fn forget_view(&self) {
        *self.view.lock().await = None;
    }
}

/// Run a pass to its end even if the request future that asked for it is dropped (the
/// server drops a request's future when its connection fails): a pass cut short gives
/// back what it read behind what it had not read yet, which rotates the queue
/// (`ops::dlq::reader`). Its error, as text for a page.
async fn whole<T, F>(
    settings: &Arc<Settings>,
    pass: impl FnOnce(Arc<Settings>) -> F,
) -> Result<T, String>
where
    F: Future<Output = Result<T, OpsError>> + Send + 'static,
    T: Send + 'static,
{
    let outcome = match tokio::spawn(contained(pass(settings.clone()))).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the pass stopped: {e}")),
    };
    if let Err(e) = &outcome {
        tracing::warn!(error = %e, "console: a queue could not be read");
    }
    outcome
}

/// `work`, whose panic costs only itself (its request, or its task), never the console
/// (`crate::fatal`: any other panic ends the process).
pub(crate) fn contained<F: Future>(work: F) -> crate::fatal::DeliveryWork<F, fn()> {
    crate::fatal::DeliveryWork::new(work, || {})
}

/// The `Host` values the console answers to: its listen address (and `localhost` on
/// loopback), and `console.public_url`'s host. Any other name that resolves to it (DNS
/// rebinding: a web page of another site making the browser talk to the console as to
/// itself) gets a 421. A console listening on every address without `public_url` cannot
/// know its names and answers to any.
#[derive(Debug, Clone)]
struct Hosts {
    names: Vec<String>,
    any: bool,
    /// `console.public_url`, an origin (`https://dlq.example.com`).
    public_origin: Option<String>,
}

impl Hosts {
    fn new(bound: SocketAddr, public_url: Option<&str>) -> Hosts {
        let port = bound.port();
        let mut names = vec![bound.to_string()];
        if bound.ip().is_loopback() {
            names.extend([
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
            ]);
        }
        if let Some(url) = public_url.and_then(|u| reqwest::Url::parse(u).ok()) {
            let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
            match url.port() {
                Some(p) => names.push(format!("{host}:{p}")),
                None => {
                    names.push(host.clone());
                    if let Some(p) = url.port_or_known_default() {
                        names.push(format!("{host}:{p}"));
                    }
                }
            }
        }
        Hosts {
            names,
            any: bound.ip().is_unspecified() && public_url.is_none(),
            public_origin: public_url.map(str::to_owned),
        }
    }

    fn allows_host(&self, host: &str) -> bool {
        self.any || self.names.iter().any(|n| n.eq_ignore_ascii_case(host))
    }

    /// A form posted from `origin` to `host` (already allowed) comes from this console.
    fn allows_origin(&self, origin: &str, host: &str) -> bool {
        let same = ["http://", "https://"]
            .iter()
            .any(|scheme| origin.eq_ignore_ascii_case(&format!("{scheme}{host}")));
        same || self.public_origin.as_deref() == Some(origin)
    }
}

/// The console's logging: the worker's, without the broker client's own lines. The
/// console's passes refuse and close channels on purpose (a passive declare of a queue
/// that is not there), which that client logs as errors; the audit trail stays readable.
pub fn log_settings(log: &crate::config::LogSettings) -> crate::config::LogSettings {
    let mut log = log.clone();
    log.level = format!("{},lapin=off,amq_protocol=off", log.level.trim());
    log
}

/// The console's users from the settings, or the refusal to start without any
/// (`no_auth` is accepted on a loopback address only).
fn users(settings: &Settings, no_auth: bool) -> Result<auth::Users, ConfigError> {
    let c = &settings.console;
    match (auth::Users::from_settings(c), no_auth) {
        (Some(_), true) => Err(ConfigError::new(
            "console.operator_password",
            "--no-auth was given, but passwords are configured: drop one or the other",
        )),
        (Some(users), false) => Ok(users),
        (None, true) if c.listen.ip().is_loopback() => Ok(auth::Users::Open),
        (None, true) => Err(ConfigError::new(
            "console.listen",
            format!(
                "{} is not a loopback address: --no-auth is refused there (set console.operator_password and console.viewer_password)",
                c.listen
            ),
        )),
        (None, false) => Err(ConfigError::new(
            "console.operator_password",
            "the console does not start without credentials: set console.operator_password and/or console.viewer_password (e.g. PROVISIONER__CONSOLE__OPERATOR_PASSWORD, at least 12 characters), or give --no-auth on a loopback address",
        )),
    }
}

/// Run the console until SIGTERM or SIGINT.
pub async fn run(settings: Settings, no_auth: bool) -> Result<(), ConsoleError> {
    let users = users(&settings, no_auth)?;
    actions::prepare_export_dir(&settings.console.export_dir).map_err(|source| {
        ConsoleError::ExportDir {
            dir: settings.console.export_dir.clone(),
            source,
        }
    })?;
    let addr = settings.console.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ConsoleError::Listen { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let open = users.open();
    let hosts = Hosts::new(bound, settings.console.public_url.as_deref());
    let console = Arc::new(Console {
        settings: Arc::new(settings),
        users,
        sessions: auth::Sessions::default(),
        open_csrf: auth::random_token(),
        plans: plan::Plans::default(),
        view: tokio::sync::Mutex::new(None),
        hosts,
        refused_logins: tokio::sync::Mutex::new(()),
    });
    if open {
        tracing::warn!(
            listen = %bound,
            "console: --no-auth: anyone who reaches this loopback address may replay and discard dead letters"
        );
    }
    // Said now rather than on the first page: the on-call person reads the log first.
    match crate::ops::connect(&console.settings, "console").await {
        Ok((conn, ..)) => {
            let _ = conn.close(200, "ok".into()).await;
        }
        Err(e) => tracing::warn!(
            error = %e,
            "console: the broker cannot be reached now; its pages say so until it can"
        ),
    }
    tracing::info!(
        listen = %bound,
        version = crate::VERSION,
        commit = crate::COMMIT,
        dead_letter_queue = %console.settings.topology.dead_letter_queue,
        "console: listening on http://{bound}/"
    );
    axum::serve(listener, router(console))
        .with_graceful_shutdown(crate::shutdown::listen())
        .await
        .map_err(ConsoleError::Serve)?;
    tracing::info!("console: stopped");
    Ok(())
}

fn router(console: Shared) -> Router {
    let router = Router::new()
        .route("/", get(pages::overview))
        .route("/letters", get(pages::letters))
        .route("/letters/{id}", get(pages::letter))
        .route("/story", get(pages::story))
        .route("/actions/preview", post(actions::preview))
        .route("/actions/run", post(actions::run))
        .route("/exports", get(actions::exports))
        .route("/exports/{name}", get(actions::download))
        .route("/login", get(pages::login).post(actions::login))
        .route("/logout", post(actions::logout))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .fallback(pages::not_found)
        .layer(DefaultBodyLimit::max(256 * 1024))
        .layer(middleware::from_fn_with_state(console.clone(), same_origin))
        .layer(middleware::from_fn(|request: Request, next: Next| {
            contained(next.run(request))
        }))
        .with_state(console);
    SECURITY_HEADERS
        .into_iter()
        .fold(router, |router, (name, value)| {
            router.layer(SetResponseHeaderLayer::overriding(
                name,
                HeaderValue::from_static(value),
            ))
        })
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
}

/// A request for another host name is refused (DNS rebinding: [`Hosts`]); so is a POST
/// whose `Origin` is not this console (the CSRF token is the main guard; this one costs
/// nothing). A browser sends `Origin` with every POST.
async fn same_origin(State(c): State<Shared>, request: Request, next: Next) -> Response {
    // Owned before any await: a request body is not `Sync`.
    let (host, origin) = {
        let text = |name| {
            request
                .headers()
                .get(name)
                .and_then(|h: &HeaderValue| h.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        (text(header::HOST), text(header::ORIGIN))
    };
    if !c.hosts.allows_host(&host) {
        tracing::warn!(
            audit = "refused",
            host = %crate::text::printable(&host, 100),
            path = %request.uri().path(),
            "console: a request for another host name was refused"
        );
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "this console does not answer to that host name (console.public_url)",
        )
            .into_response();
    }
    if request.method() == Method::POST
        && !origin.is_empty()
        && !c.hosts.allows_origin(&origin, &host)
    {
        tracing::warn!(
            audit = "refused",
            origin = %crate::text::printable(&origin, 100),
            path = %request.uri().path(),
            "console: a POST from another origin was refused"
        );
        return (StatusCode::FORBIDDEN, "cross-origin request refused").into_response();
    }
    next.run(request).await
}

/// On every response.
const SECURITY_HEADERS: [(header::HeaderName, &str); 5] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    // Not `no-referrer`: with it a browser sends `Origin: null` on its own form posts,
    // and `same_origin` could not tell them from a sandboxed page's.
    (header::REFERRER_POLICY, "same-origin"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::CACHE_CONTROL, "no-store"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretString;

    fn settings(listen: &str, password: Option<&str>) -> Settings {
        let mut s = Settings::from_sources(crate::config::Sources {
            env: Some(std::collections::HashMap::new()),
            credentials: crate::config::Credentials::Optional,
            ..crate::config::Sources::default()
        })
        .expect("defaults");
        s.console.listen = listen.parse().expect("address");
        s.console.operator_password = password.map(SecretString::from);
        s
    }

    #[test]
    fn no_credentials_no_console_except_loopback_with_the_flag() {
        let refused = users(&settings("127.0.0.1:9465", None), false)
            .err()
            .expect("refused");
        assert_eq!(refused.key, "console.operator_password");
        assert!(users(&settings("127.0.0.1:9465", None), true).is_ok_and(|u| u.open()));
        assert!(users(&settings("[::1]:9465", None), true).is_ok_and(|u| u.open()));
        let remote = users(&settings("0.0.0.0:9465", None), true)
            .err()
            .expect("refused");
        assert_eq!(remote.key, "console.listen");
        let with = users(&settings("0.0.0.0:9465", Some("a-long-password")), false);
        assert!(with.is_ok_and(|u| !u.open()));
        assert!(users(&settings("127.0.0.1:9465", Some("a-long-password")), true).is_err());
    }
}

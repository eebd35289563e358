//! What the console does, as opposed to what it shows: log in and out, preview an action,
//! run it once confirmed, hand out a discard's export. Each is an audit line.
//!
//! Invariants:
//! - a preview fixes the letters an action touches as a [`Selection`] and keeps it as a
//!   plan of the operator who asked; confirming takes the plan out before it runs, so a
//!   plan runs at most once, and the DLQ tools act only on letters still in it (a letter
//!   another plan moved first is not found again);
//! - an action runs in a task of its own: a browser that goes away does not cut a pass in
//!   half;
//! - a discard always writes its export first (`dlq discard --export`), into
//!   `console.export_dir` (owner-only), under a name the console chose.

use std::path::Path;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{self, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::ops::dlq::{
    self, DEFAULT_MAX_REPLAYS, DiscardFilter, DlqReader, ReplayFilter, Selection,
};
use crate::ops::events::{UnroutedFilter, replay_unrouted};
use crate::text::printable;

use super::Shared;
use super::auth::{self, Operator, Session};
use super::pages;
use super::plan::{Action, Done, PLAN_TTL, Plan};
use super::view::{Filter, LetterView};

/// A form body's fields (a name may repeat: the selected letters' `id`).
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Form {
        Form(form_urlencoded::parse(body).into_owned().collect())
    }

    fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn filter(&self) -> Filter {
        Filter {
            kind: self.get("kind").to_owned(),
            ext_id: self.get("ext_id").to_owned(),
            older_than: self.get("older_than").to_owned(),
        }
    }
}

fn bad_csrf(session: &Session, path: &str) -> Response {
    tracing::warn!(
        audit = "refused",
        user = %session.user,
        path,
        "console: a POST without this session's CSRF token was refused"
    );
    pages::error_page(
        StatusCode::FORBIDDEN,
        Some(session),
        "This form is out of date or did not come from this console (CSRF token missing or wrong). Go back, reload the page and try again.",
    )
}

/// `POST /login`.
pub async fn login(State(c): State<Shared>, body: Bytes) -> Response {
    if c.users.open() {
        // Nobody logs in with --no-auth: no session is made for whatever name was sent.
        return Redirect::to("/").into_response();
    }
    let form = Form::parse(&body);
    let user = form.get("user");
    let Some(role) = c.users.check(user, form.get("password")) else {
        // One refused login at a time, each taking REFUSED_DELAY.
        let _turn = c.refused_logins.lock().await;
        tracing::warn!(
            audit = "login_refused",
            user = %printable(user, 64),
            "console: login refused"
        );
        tokio::time::sleep(auth::REFUSED_DELAY).await;
        return (
            StatusCode::UNAUTHORIZED,
            pages::login_page(Some("Wrong user name or password."), false),
        )
            .into_response();
    };
    let ttl = c.settings.console.session_ttl;
    let id = c.sessions.start(user, role, ttl);
    let secure = c
        .settings
        .console
        .public_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"));
    tracing::info!(
        audit = "login",
        user,
        role = role.as_str(),
        "console: logged in"
    );
    (
        [(header::SET_COOKIE, auth::set_cookie(&id, ttl, secure))],
        Redirect::to("/"),
    )
        .into_response()
}

/// `POST /logout`.
pub async fn logout(
    State(c): State<Shared>,
    super::auth::Viewer(session): super::auth::Viewer,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    if !session.csrf_ok(Form::parse(&body).get("csrf")) {
        return bad_csrf(&session, "/logout");
    }
    if let Some(id) = auth::cookie(&headers) {
        c.sessions.end(&id);
    }
    tracing::info!(audit = "logout", user = %session.user, "console: logged out");
    (
        [(header::SET_COOKIE, auth::clear_cookie())],
        Redirect::to("/login"),
    )
        .into_response()
}

/// `POST /actions/preview`: what an action would touch, and the button that confirms it.
pub async fn preview(
    State(c): State<Shared>,
    Operator(session): Operator,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if !session.csrf_ok(form.get("csrf")) {
        return bad_csrf(&session, "/actions/preview");
    }
    let Some((action, selected)) = Action::parse(form.get("do")) else {
        return pages::error_page(StatusCode::BAD_REQUEST, Some(&session), "Unknown action.");
    };
    let planned = match action {
        Action::ReplayUnrouted => plan_unrouted(&c).await,
        Action::Replay | Action::Discard => plan_letters(&c, &form, selected).await,
    };
    let (selection, letters, scope) = match planned {
        Ok(p) => p,
        Err(message) => return pages::error_page(StatusCode::CONFLICT, Some(&session), &message),
    };
    let at_limit = match action {
        Action::Replay => letters
            .iter()
            .filter(|l| l.replay_count >= u64::from(DEFAULT_MAX_REPLAYS))
            .count(),
        _ => 0,
    };
    let count = selection.len();
    let plan = Plan {
        action,
        user: session.user.clone(),
        selection,
        scope,
        letters: letters.into_iter().take(pages::CONFIRM_LIST).collect(),
        at_limit,
        expires: Instant::now() + PLAN_TTL,
    };
    let id = (count > 0).then(|| c.plans.keep(plan.clone()));
    pages::confirm(&session, &plan, count, id.as_deref()).into_response()
}

type Planned = Result<(Selection, Vec<LetterView>, String), String>;

/// The selected letters (by id) or every letter the filter lets through, as they are now.
async fn plan_letters(c: &Shared, form: &Form, selected: bool) -> Planned {
    let snapshot = c.fresh_snapshot().await?;
    let (letters, scope): (Vec<LetterView>, String) = if selected {
        let mut asked = Selection::default();
        for id in form.all("id") {
            asked.insert(id.to_owned());
        }
        let scope = format!("{} selected", asked.len());
        let picked = snapshot
            .letters
            .iter()
            .filter(|l| asked.take_id(&l.id))
            .cloned()
            .collect();
        (picked, scope)
    } else {
        let filter = form.filter();
        let letters = filter.apply(&snapshot)?;
        (letters.into_iter().cloned().collect(), filter.describe())
    };
    let mut selection = Selection::default();
    for l in &letters {
        selection.insert(l.id.clone());
    }
    Ok((selection, letters, scope))
}

/// Every event waiting in the unrouted-events queue, as it is now.
async fn plan_unrouted(c: &Shared) -> Planned {
    let read = |settings: std::sync::Arc<crate::config::Settings>| async move {
        let queue = settings.topology.unrouted_events.clone();
        let wait = super::VIEW_LOCK_WAIT;
        let reader = DlqReader::open_waiting(&settings, &queue, "console view", None, wait).await?;
        let mut views = Vec::new();
        reader
            .each(|_, e| {
                let mut v = LetterView::new(&e);
                v.kind = printable(e.delivery.routing_key.as_str(), 64);
                views.push(v);
            })
            .await
            .map(|()| views)
    };
    let views = super::whole(&c.settings, read).await?;
    let mut selection = Selection::default();
    for v in &views {
        selection.insert(v.id.clone());
    }
    Ok((selection, views, "all unrouted events".into()))
}

/// `POST /actions/run`: run a previewed plan, once.
pub async fn run(State(c): State<Shared>, Operator(session): Operator, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if !session.csrf_ok(form.get("csrf")) {
        return bad_csrf(&session, "/actions/run");
    }
    let Some(plan) = c.plans.take(form.get("plan")) else {
        return pages::error_page(
            StatusCode::CONFLICT,
            Some(&session),
            "This action already ran, or its confirmation expired: nothing was done now. The overview shows the DLQ as it is.",
        );
    };
    if plan.user != session.user {
        return pages::error_page(
            StatusCode::FORBIDDEN,
            Some(&session),
            "This action was previewed by another user.",
        );
    }
    let planned = plan.selection.len();
    // In a task of its own, audit line included: the action ends as it should, and is
    // written down, even if the browser goes away.
    let task = tokio::spawn(super::contained(execute_and_audit(
        c.clone(),
        plan.clone(),
        session.role.as_str(),
    )));
    let done = task.await.unwrap_or_else(|e| Done {
        error: Some(format!("the action stopped: {e}")),
        ..Done::default()
    });
    pages::result(&session, &plan, planned, &done).into_response()
}

/// Run the plan, then write its audit line and forget the list view it changed.
async fn execute_and_audit(c: Shared, plan: Plan, role: &'static str) -> Done {
    let planned = plan.selection.len();
    let done = execute(c.clone(), plan.clone()).await;
    c.forget_view().await;
    let (user, action, filter) = (
        plan.user.as_str(),
        plan.action.as_str(),
        plan.scope.as_str(),
    );
    // One set of fields, at the level the outcome calls for.
    macro_rules! audit {
        ($level:ident, $($outcome:tt)*) => {
            tracing::$level!(
                audit = "action",
                user,
                role,
                action,
                filter,
                planned,
                count = done.done,
                left = done.left,
                export = done.export.as_deref(),
                $($outcome)*
            )
        };
    }
    match &done.error {
        None => audit!(info, "console: {action} done"),
        Some(error) => audit!(error, error = %error, "console: {action} failed"),
    }
    done
}

async fn execute(c: Shared, plan: Plan) -> Done {
    let settings = &c.settings;
    let planned = plan.selection.len();
    let only = Some(plan.selection);
    let (result, export) = match plan.action {
        Action::Replay => {
            let filter = ReplayFilter {
                max_replays: DEFAULT_MAX_REPLAYS,
                only,
                ..ReplayFilter::default()
            };
            (dlq::replay(settings, &filter).await.map(|s| s.moved), None)
        }
        Action::Discard => {
            let name = export_name(&plan.user);
            let path = settings.console.export_dir.join(&name);
            let filter = DiscardFilter {
                export: Some(path.clone()),
                only,
                ..DiscardFilter::default()
            };
            let result = dlq::discard(settings, &filter).await.map(|s| s.discarded);
            (result, path.exists().then_some(name))
        }
        Action::ReplayUnrouted => {
            let filter = UnroutedFilter {
                only,
                ..UnroutedFilter::default()
            };
            (
                replay_unrouted(settings, &filter).await.map(|s| s.moved),
                None,
            )
        }
    };
    match result {
        Ok(done) => Done {
            done,
            left: planned.saturating_sub(done),
            export,
            error: None,
        },
        Err(e) => Done {
            export,
            error: Some(e.to_string()),
            ..Done::default()
        },
    }
}

/// `discard-20261206T031500Z-operator-1a2b3c.jsonl`: when, by whom, and unique.
fn export_name(user: &str) -> String {
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    let user: String = user
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect();
    let suffix = &auth::random_token()[..6];
    format!("discard-{stamp}-{user}-{suffix}.jsonl")
}

/// A name [`export_name`] could have made: nothing else is served.
fn is_export_name(name: &str) -> bool {
    name.starts_with("discard-")
        && name.ends_with(".jsonl")
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.contains("..")
}

/// `GET /exports/{name}`: a discard's export, for an operator.
pub async fn download(
    State(c): State<Shared>,
    Operator(session): Operator,
    extract::Path(name): extract::Path<String>,
) -> Response {
    if !is_export_name(&name) {
        return pages::error_page(StatusCode::NOT_FOUND, Some(&session), "No such export.");
    }
    let path = c.settings.console.export_dir.join(&name);
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            tracing::info!(
                audit = "download",
                user = %session.user,
                role = session.role.as_str(),
                export = %name,
                bytes = bytes.len(),
                "console: export downloaded"
            );
            (
                [
                    (header::CONTENT_TYPE, "application/x-ndjson".to_owned()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{name}\""),
                    ),
                ],
                bytes,
            )
                .into_response()
        }
        Err(_) => pages::error_page(StatusCode::NOT_FOUND, Some(&session), "No such export."),
    }
}

/// `GET /exports`: the discards' exports, newest first, for an operator.
pub async fn exports(State(c): State<Shared>, Operator(session): Operator) -> Response {
    let dir = c.settings.console.export_dir.clone();
    let listed = tokio::task::spawn_blocking(move || list_exports(&dir))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match listed {
        Ok(files) => pages::exports(&session, &files).into_response(),
        Err(e) => pages::error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(&session),
            &format!("console.export_dir cannot be read: {e}"),
        ),
    }
}

/// An export file: its name, size in bytes, and when it was written (RFC 3339).
pub type ExportEntry = (String, u64, String);

fn list_exports(dir: &Path) -> std::io::Result<Vec<ExportEntry>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry.metadata()?;
        if !is_export_name(&name) || !meta.is_file() {
            continue;
        }
        let written = meta
            .modified()
            .ok()
            .map(crate::clock::rfc3339)
            .unwrap_or_default();
        files.push((name, meta.len(), written));
    }
    files.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| b.0.cmp(&a.0)));
    Ok(files)
}

/// The export directory exists and only its owner may read it.
pub fn prepare_export_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("is not a directory"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            "console: the export directory may be read by others (exports hold the dead letters' personal data)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_console_s_own_export_names_are_served() {
        let name = export_name("operator");
        assert!(is_export_name(&name), "{name}");
        for bad in [
            "../etc/passwd",
            "discard-..jsonl",
            "discard-a/../../b.jsonl",
            "other.jsonl",
            "discard-a.json",
            "discard-%2e%2e.jsonl",
        ] {
            assert!(!is_export_name(bad), "{bad}");
        }
    }

    #[test]
    fn forms_keep_repeated_fields() {
        let f = Form::parse(b"csrf=t&id=a&id=b&kind=rejected&ext_id=A%26B");
        assert_eq!(f.all("id").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(f.get("csrf"), "t");
        assert_eq!(f.filter().ext_id, "A&B");
        assert_eq!(f.get("missing"), "");
    }
}

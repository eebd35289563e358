//! The console's pages: typed maud templates, which escape every value they are given.
//!
//! Invariant: text from a message or from Redis reaches a template only through
//! `text::printable` (done in `view.rs` or here), so control characters and invisible
//! formatting show as `\u{…}` escapes and every value is bounded; maud then escapes HTML.
//! No page holds a secret, an inline script or an inline style.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use serde_json::Value;

use crate::command::ExtId;
use crate::text::printable;

use super::Shared;
use super::auth::{Denied, Role, Session, Viewer};
use super::plan::{Action, Done, Plan};
use super::view::{self, Filter, LetterView, Overview};

/// Letters per page of the list.
pub const PAGE: usize = 50;
/// Letters the confirmation page lists.
pub const CONFIRM_LIST: usize = 50;

fn layout(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · group-provisioner console" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "group-provisioner" }
                    @if let Some(s) = session {
                        nav aria-label="Main" {
                            a href="/" { "Overview" }
                            a href="/letters" { "Dead letters" }
                            a href="/story" { "Ext id story" }
                            @if may_act(s) { a href="/exports" { "Exports" } }
                        }
                        form.user method="post" action="/logout" {
                            span { (s.user) " (" (s.role.as_str()) ")" }
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main #main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page that says what went wrong, with a way back.
fn alert(status: StatusCode, title: &str, session: Option<&Session>, message: Markup) -> Response {
    let body = html! {
        p.error role="alert" { (message) }
        p { a href="/" { "Back to the overview" } }
    };
    (status, layout(title, session, body)).into_response()
}

pub fn error_page(status: StatusCode, session: Option<&Session>, message: &str) -> Response {
    let message = html! { (printable(message, 2_000)) };
    alert(status, "Not done", session, message)
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Login { expired: true } => Redirect::to("/login?expired=1").into_response(),
            Denied::Login { expired: false } => Redirect::to("/login").into_response(),
            Denied::NotOperator(session) => {
                let message = html! {
                    "You are logged in as " (session.user) ", a " (session.role.as_str())
                    ": you may look at everything, but only an operator may replay, discard or download an export."
                };
                let status = StatusCode::FORBIDDEN;
                alert(status, "Not allowed", Some(&session), message)
            }
        }
    }
}

pub async fn not_found() -> Response {
    let message = html! { "There is no such page." };
    alert(StatusCode::NOT_FOUND, "Not found", None, message)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LoginQuery {
    expired: Option<String>,
}

pub async fn login(State(c): State<Shared>, Query(q): Query<LoginQuery>) -> Response {
    if c.users.open() {
        return Redirect::to("/").into_response();
    }
    login_page(None, q.expired.is_some()).into_response()
}

pub fn login_page(error: Option<&str>, expired: bool) -> Markup {
    layout(
        "Log in",
        None,
        html! {
            @if expired { p.note role="status" { "Your session ended. Log in again." } }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form.login method="post" action="/login" {
                label for="user" { "User name" }
                input #user name="user" type="text" autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input #password name="password" type="password" autocomplete="current-password" required;
                button type="submit" { "Log in" }
            }
        },
    )
}

fn may_act(session: &Session) -> bool {
    session.role == Role::Operator
}

/// Hidden fields every operator form carries: the CSRF token and the filter it acts on.
fn hidden(session: &Session, filter: &Filter) -> Markup {
    html! {
        input type="hidden" name="csrf" value=(session.csrf);
        input type="hidden" name="kind" value=(filter.kind);
        input type="hidden" name="ext_id" value=(filter.ext_id);
        input type="hidden" name="older_than" value=(filter.older_than);
    }
}

fn letters_link(filter: &Filter, page: usize) -> String {
    match filter.query(page) {
        q if q.is_empty() => "/letters".to_owned(),
        q => format!("/letters?{q}"),
    }
}

fn story_link(ext_id: &str) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("ext_id", ext_id);
    format!("/story?{}", q.finish())
}

fn ext_id_cell(l: &LetterView) -> Markup {
    html! {
        @match &l.ext_id {
            Some(x) if !x.is_empty() => a href=(story_link(x)) { (printable(x, 80)) },
            _ => span.muted { (printable(&l.ext_id_text, 80)) },
        }
    }
}

/// `GET /`.
pub async fn overview(State(c): State<Shared>, Viewer(session): Viewer) -> Response {
    let settings = &c.settings;
    let unrouted = async {
        let (conn, ..) = crate::ops::connect(settings, "console").await.ok()?;
        let depth = crate::ops::queue_depth(&conn, &settings.topology.unrouted_events).await;
        let _ = conn.close(200, "done".into()).await;
        depth.ok().flatten()
    };
    // The topology first: where the worker would declare it, so does this.
    let checks = crate::ops::check::broker_items(settings).await;
    let (snapshot, unrouted) = tokio::join!(c.snapshot(), unrouted);
    let dlq = &settings.topology.dead_letter_queue;
    let body = html! {
        section aria-labelledby="dlq-h" {
            h2 #dlq-h { "Dead-letter queue " code { (dlq) } }
            @match &snapshot {
                Err(e) => p.error role="alert" { "The DLQ could not be read: " (printable(&e.to_string(), 1_000)) },
                Ok(s) => {
                    @let o = Overview::of(s);
                    p.big { strong { (s.letters.len()) } " dead letters" }
                    @if let Some(t) = &o.oldest_first_failed { p { "Oldest first failure: " time { (t) } } }
                    table {
                        caption { "By error kind" }
                        thead { tr { th scope="col" { "Kind" } th scope="col" { "Dead letters" } } }
                        tbody {
                            @for (kind, n) in &o.by_kind {
                                @let f = Filter { kind: kind.clone(), ..Filter::default() };
                                tr { td { a href=(letters_link(&f, 1)) { (printable(kind, 64)) } } td.num { (n) } }
                            }
                        }
                    }
                    @let max = o.per_hour.iter().copied().max().unwrap_or(0).max(1);
                    table.hours {
                        caption { "New dead letters per hour, last 24 hours (by x-last-failed-at)" }
                        thead { tr { th scope="col" { "Hours ago" } th scope="col" { "Dead letters" } th scope="col" { span.sr { "Bar" } } } }
                        tbody {
                            @for (h, n) in o.per_hour.iter().enumerate() {
                                tr { td { (h) "–" (h + 1) } td.num { (n) } td { meter min="0" max=(max) value=(n) { (n) } } }
                            }
                        }
                    }
                    @if o.older > 0 { p { (o.older) " dead letters failed more than a day ago (or carry no time)." } }
                }
            }
        }
        section aria-labelledby="unrouted-h" {
            h2 #unrouted-h { "Unrouted events " code { (settings.topology.unrouted_events) } }
            @match unrouted {
                None => p.error { "Its depth could not be read." },
                Some(0) => p { "No event is waiting: every event had a queue bound for it." },
                Some(n) => {
                    p { strong { (n) } " events wait: nobody was bound for them. Bind a queue to "
                        code { (settings.topology.event_exchange) } " for both routing keys, then replay them." }
                    @if may_act(&session) {
                        form method="post" action="/actions/preview" {
                            input type="hidden" name="csrf" value=(session.csrf);
                            button type="submit" name="do" value="replay-unrouted" { "Replay unrouted events…" }
                        }
                    }
                }
            }
        }
        section aria-labelledby="topology-h" {
            h2 #topology-h { "Topology (as " code { "check" } " sees it)" }
            ul.checks {
                @for (status, item, detail) in &checks {
                    li class=(format!("check-{}", status.to_ascii_lowercase())) {
                        strong { (status) } " " (item) ": " (printable(detail, 1_000))
                    }
                }
            }
        }
    };
    layout("Overview", Some(&session), body).into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ListQuery {
    #[serde(flatten)]
    filter: Filter,
    page: String,
}

/// `GET /letters`.
pub async fn letters(
    State(c): State<Shared>,
    Viewer(session): Viewer,
    Query(q): Query<ListQuery>,
) -> Response {
    let filter = q.filter;
    let asked = q.page.parse::<usize>().unwrap_or(1).max(1);
    let snapshot = match c.snapshot().await {
        Ok(s) => s,
        Err(e) => {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(&session),
                &format!("The DLQ could not be read: {e}"),
            );
        }
    };
    let kinds: std::collections::BTreeSet<&str> =
        snapshot.letters.iter().map(|l| l.kind.as_str()).collect();
    let matching = filter.apply(&snapshot);
    let act = may_act(&session);
    let body = html! {
        (filter_form(&filter, &kinds))
        @match &matching {
            Err(e) => p.error role="alert" { (e) },
            Ok(list) => {
                @let pages = list.len().div_ceil(PAGE).max(1);
                @let page = asked.min(pages);
                @let shown: Vec<&&LetterView> = list.iter().skip((page - 1) * PAGE).take(PAGE).collect();
                p role="status" { (list.len()) " of " (snapshot.letters.len()) " dead letters match (" (filter.describe()) "). Page " (page) " of " (pages) "." }
                form method="post" action="/actions/preview" {
                    @if act { (hidden(&session, &filter)) }
                    (letters_table(&shown, act))
                    @if act && !list.is_empty() {
                        fieldset.actions {
                            legend { "Act on these dead letters (you confirm on the next page)" }
                            button type="submit" name="do" value="replay-selected" { "Replay selected…" }
                            button type="submit" name="do" value="discard-selected" { "Discard selected…" }
                            button type="submit" name="do" value="replay-all" { "Replay all " (list.len()) " matching…" }
                            button type="submit" name="do" value="discard-all" { "Discard all " (list.len()) " matching…" }
                        }
                    }
                }
                @if pages > 1 {
                    nav.pages aria-label="Pages" {
                        @if page > 1 { a href=(letters_link(&filter, page - 1)) rel="prev" { "← Previous" } }
                        @if page < pages { a href=(letters_link(&filter, page + 1)) rel="next" { "Next →" } }
                    }
                }
            }
        }
    };
    layout("Dead letters", Some(&session), body).into_response()
}

fn filter_form(filter: &Filter, kinds: &std::collections::BTreeSet<&str>) -> Markup {
    html! {
        form.filter method="get" action="/letters" role="search" {
            label for="kind" { "Kind" }
            select #kind name="kind" {
                option value="" selected[filter.kind.is_empty()] { "any" }
                @for k in kinds {
                    option value=(k) selected[filter.kind == *k] { (printable(k, 64)) }
                }
            }
            label for="ext_id" { "Ext id" }
            input #ext_id name="ext_id" type="text" value=(filter.ext_id);
            label for="older_than" { "Older than" }
            input #older_than name="older_than" type="text" placeholder="e.g. 2h, 7d" value=(filter.older_than);
            button type="submit" { "Filter" }
            @if !filter.is_empty() { a href="/letters" { "Clear" } }
        }
    }
}

fn letters_table(shown: &[&&LetterView], act: bool) -> Markup {
    html! {
        div.scroll {
            table.letters {
                thead { tr {
                    @if act { th scope="col" { input #select-all type="checkbox" aria-label="Select every letter on this page"; } }
                    th scope="col" { "#" } th scope="col" { "Kind" } th scope="col" { "Ext id" }
                    th scope="col" { "Attempts" } th scope="col" { "HTTP" } th scope="col" { "Replays" }
                    th scope="col" { "Last failed" } th scope="col" { "Error" }
                } }
                tbody {
                    @for l in shown {
                        tr {
                            @if act { td { input type="checkbox" name="id" value=(l.id) id=(format!("pick-{}", l.position)) aria-label=(format!("Select dead letter #{}", l.position)); } }
                            td { a href=(format!("/letters/{}", l.id)) { "#" (l.position) } }
                            td { (printable(&l.kind, 64)) }
                            td { (ext_id_cell(l)) }
                            td.num { (l.attempts) }
                            td.num { @if let Some(h) = l.http_status { (h) } @else { "–" } }
                            td.num { (l.replay_count) }
                            td { (l.last_failed_at.as_deref().unwrap_or("–")) }
                            td.error-text { (l.error.as_deref().map(|e| printable(e, 120)).unwrap_or_default()) }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /letters/{id}`.
pub async fn letter(
    State(c): State<Shared>,
    Viewer(session): Viewer,
    Path(id): Path<String>,
) -> Response {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return error_page(
            StatusCode::NOT_FOUND,
            Some(&session),
            "No such dead letter.",
        );
    }
    let wanted = id.clone();
    let found = match super::whole(
        &c.settings,
        |s| async move { view::find(&s, &wanted).await },
    )
    .await
    {
        Ok(Some(letter)) => letter,
        Ok(None) => {
            return error_page(
                StatusCode::NOT_FOUND,
                Some(&session),
                "This dead letter is no longer in the DLQ (replayed or discarded since).",
            );
        }
        Err(e) => {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(&session),
                &format!("The DLQ could not be read: {e}"),
            );
        }
    };
    let title = format!("Dead letter #{}", found["position"]);
    let body = html! {
        (letter_fields(&found))
        @if may_act(&session) {
            form method="post" action="/actions/preview" {
                input type="hidden" name="csrf" value=(session.csrf);
                input type="hidden" name="id" value=(id);
                button type="submit" name="do" value="replay-selected" { "Replay this letter…" }
                button type="submit" name="do" value="discard-selected" { "Discard this letter…" }
            }
        }
        h2 { "Body" }
        pre.body { (view::body_text(&found)) }
        h2 { "Headers" }
        div.scroll {
            table.headers {
                thead { tr { th scope="col" { "Name" } th scope="col" { "Value" } } }
                tbody {
                    @for (k, v) in view::header_rows(&found) {
                        tr { td { code { (k) } } td { code { (v) } } }
                    }
                }
            }
        }
    };
    layout(&title, Some(&session), body).into_response()
}

/// The summary of one letter (its `dlq peek --json` object), each value printable.
fn letter_fields(found: &Value) -> Markup {
    let text = |key: &str, max: usize| -> String {
        match &found[key] {
            Value::Null => "–".to_owned(),
            Value::String(s) => printable(s, max),
            other => printable(&other.to_string(), max),
        }
    };
    let ext_id = found["ext_id"].as_str().filter(|x| x.len() <= 255);
    html! {
    dl.fields {
        dt { "Kind" } dd { (text("kind", 64)) }
        dt { "Ext id" } dd {
            @match ext_id {
                Some(x) => a href=(story_link(x)) { (printable(x, 160)) },
                None => (text("ext_id", 160)),
            }
        }
        dt { "Error" } dd { (text("error_message", 2_000)) }
        dt { "Attempts" } dd { (text("attempts", 20)) }
        dt { "HTTP status" } dd { (text("http_status", 20)) }
        dt { "Replays" } dd { (text("replay_count", 20)) }
        dt { "First failed" } dd { (text("first_failed_at", 64)) }
        dt { "Last failed" } dd { (text("last_failed_at", 64)) }
        dt { "Worker version" } dd { (text("worker_version", 64)) }
        dt { "Message id" } dd { (text("message_id", 255)) }
        dt { "Correlation id" } dd { (text("correlation_id", 255)) }
        dt { "Content type" } dd { (text("content_type", 255)) }
    }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StoryQuery {
    ext_id: String,
}

/// `GET /story?ext_id=…`: what `status` says of one ext id.
pub async fn story(
    State(c): State<Shared>,
    Viewer(session): Viewer,
    Query(q): Query<StoryQuery>,
) -> Response {
    let form = html! {
        form.filter method="get" action="/story" role="search" {
            label for="story-ext-id" { "Ext id" }
            input #story-ext-id name="ext_id" type="text" value=(q.ext_id) required;
            button type="submit" { "Look up" }
        }
    };
    if q.ext_id.is_empty() {
        return layout("Ext id story", Some(&session), form).into_response();
    }
    let story = match ExtId::parse(&q.ext_id) {
        Err(e) => Err(format!("Not a valid ext id: {e}")),
        Ok(ext_id) => crate::ops::status::story(&c.settings, &ext_id, "group-provisioner")
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "console: the dedup store could not be read");
                e.to_string()
            }),
    };
    let letters = Filter {
        ext_id: q.ext_id.clone(),
        ..Filter::default()
    };
    let body = html! {
        (form)
        @match &story {
            Err(e) => p.error role="alert" { (printable(e, 1_000)) },
            Ok(s) => {
                p.big { "State: " strong { (s.json["state"].as_str().unwrap_or("unknown")) } }
                @if !s.known { p { "The store knows nothing of it: never seen, or forgotten after dedup.ttl." } }
                @if let Some(now) = &s.now { p { "Now: " (printable(now, 2_000)) } }
                (fields_table("Record", &s.json["record"]))
                dl.fields {
                    dt { "POSTs made (attempt markers)" } dd { (s.json["post_attempts"]) }
                    @if let Some(ms) = s.json["ttl_ms"].as_i64() { dt { "Kept for" } dd { (crate::ops::status::human(ms)) " more" } }
                    @if let Some(u) = s.json["unreadable"].as_str() { dt { "Unreadable record" } dd { (printable(u, 300)) } }
                }
                (fields_table("Last outcome", &s.json["last_outcome"]))
            }
        }
        p { a href=(letters_link(&letters, 1)) { "Dead letters of this ext id" } }
    };
    layout("Ext id story", Some(&session), body).into_response()
}

/// A JSON object from the store as a table of its fields (nested values as JSON text).
fn fields_table(caption: &str, value: &Value) -> Markup {
    html! {
        @if let Some(map) = value.as_object() {
            table.fields {
                caption { (caption) }
                tbody {
                    @for (k, v) in map {
                        tr { th scope="row" { (printable(k, 64)) } td { (view::header_text(v)) } }
                    }
                }
            }
        }
    }
}

/// The confirmation of a previewed action: how many, which, and the one button.
pub fn confirm(session: &Session, plan: &Plan, count: usize, plan_id: Option<&str>) -> Markup {
    let what = plan.action.describe(count);
    let body = html! {
        @if count == 0 {
            p role="status" { "Nothing matches (" (plan.scope) "): there is nothing to do." }
            p { a href="/letters" { "Back to the dead letters" } }
        } @else {
            p.big role="status" { (what) " (" (plan.scope) ")?" }
            @match plan.action {
                Action::Replay => p {
                    "Each goes back to the command exchange with its attempts reset; the worker deduplicates, so a group already created is not created again."
                    @if plan.at_limit > 0 {
                        " " strong { (plan.at_limit) } " of them were replayed "
                        (crate::ops::dlq::DEFAULT_MAX_REPLAYS) " times already and stay in the DLQ (the replay limit)."
                    }
                },
                Action::Discard => p {
                    "They are written to an export file first, which you can download afterwards; only the letters written to it are removed from the DLQ."
                },
                Action::ReplayUnrouted => p {
                    "Each is published to the event exchange again; one that still has no queue comes back to the unrouted queue."
                },
            }
            form method="post" action="/actions/run" {
                input type="hidden" name="csrf" value=(session.csrf);
                @if let Some(id) = plan_id { input type="hidden" name="plan" value=(id); }
                button.danger type="submit" { (what) }
                " "
                a href="/letters" { "Cancel" }
            }
            (plan_list(plan, count))
        }
    };
    layout("Confirm", Some(session), body)
}

fn plan_list(plan: &Plan, count: usize) -> Markup {
    html! {
        div.scroll {
            table.letters {
                caption {
                    @if count > plan.letters.len() { "The first " (plan.letters.len()) " of " (count) } @else { "All " (count) }
                }
                thead { tr { th scope="col" { "#" } th scope="col" { "Kind" } th scope="col" { "Ext id" } th scope="col" { "Replays" } } }
                tbody {
                    @for l in &plan.letters {
                        tr { td { (l.position) } td { (printable(&l.kind, 64)) } td { (ext_id_cell(l)) } td.num { (l.replay_count) } }
                    }
                }
            }
        }
    }
}

/// `GET /exports`: each file's name, size in bytes, and when it was written.
pub fn exports(session: &Session, files: &[(String, u64, String)]) -> Markup {
    let body = html! {
        p { "Each discard from the console writes what it removes to a file here first (console.export_dir). They hold the dead letters' data: download what you need, and remove the files on the host when you no longer do." }
        @if files.is_empty() {
            p role="status" { "No export yet." }
        } @else {
            div.scroll {
                table {
                    thead { tr { th scope="col" { "File" } th scope="col" { "Bytes" } th scope="col" { "Written" } } }
                    tbody {
                        @for (name, bytes, written) in files {
                            tr {
                                td { a href=(format!("/exports/{name}")) download { (name) } }
                                td.num { (bytes) }
                                td { (written) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout("Exports", Some(session), body)
}

/// What an action did.
pub fn result(session: &Session, plan: &Plan, planned: usize, done: &Done) -> Markup {
    let verb = match plan.action {
        Action::Replay => "Replayed",
        Action::Discard => "Discarded",
        Action::ReplayUnrouted => "Replayed",
    };
    let body = html! {
        @if let Some(e) = &done.error {
            p.error role="alert" { "The action stopped: " (printable(e, 2_000)) }
            p { "What was not moved stays where it was, in order. " (verb) " before it stopped: see the overview." }
        } @else {
            p.big role="status" { (verb) " " strong { (done.done) } " of " (planned) "." }
            @if done.left > 0 {
                p { (done.left) " stayed: at the replay limit, or no longer there (another action, or a person, moved them first)." }
            }
        }
        @if let Some(name) = &done.export {
            p { "The export of what was discarded: " a href=(format!("/exports/{name}")) download { (name) } }
        }
        p { a href="/" { "Overview" } " · " a href="/letters" { "Dead letters" } }
    };
    layout("Done", Some(session), body)
}

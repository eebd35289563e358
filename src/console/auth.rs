//! Who is on the console: logins, sessions and the CSRF token of each session.
//!
//! Invariants:
//! - a password is compared in constant time, as a SHA-256 digest (so its length does not
//!   show either), and the user name with it; a refused login says nothing of which was
//!   wrong, costs the caller [`REFUSED_DELAY`], and is logged;
//! - a session is a random 256-bit id in an `HttpOnly`, `SameSite=Strict` cookie, kept in
//!   memory only (a restart logs everyone out) and ended after `console.session_ttl`;
//! - every POST but the login carries the session's CSRF token, compared in constant time;
//! - a viewer may read every page; only an operator may act or download an export.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ConsoleSettings;
use crate::secret::{ExposeSecret, SecretString};

use super::Shared;

pub const COOKIE: &str = "gp_console";
/// What a refused login costs the caller: guessing stays slow.
pub const REFUSED_DELAY: Duration = Duration::from_millis(500);
/// At most this many sessions per user at once; a new login ends that user's oldest
/// beyond it (never another user's: a viewer cannot log an operator out).
const MAX_SESSIONS_PER_USER: usize = 100;

closed_set! {
    pub enum Role {
        Viewer = "viewer",
        Operator = "operator",
    }
}

/// The users who may log in, or nobody needs to (`--no-auth` on loopback).
pub enum Users {
    Open,
    Passwords(Vec<(String, [u8; 32], Role)>),
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

impl Users {
    /// The configured users; `None` when no role has a password.
    pub fn from_settings(c: &ConsoleSettings) -> Option<Users> {
        let users: Vec<_> = [
            (&c.operator_user, &c.operator_password, Role::Operator),
            (&c.viewer_user, &c.viewer_password, Role::Viewer),
        ]
        .into_iter()
        .filter_map(|(user, password, role)| {
            password
                .as_ref()
                .map(|p: &SecretString| (user.clone(), digest(p.expose_secret()), role))
        })
        .collect();
        (!users.is_empty()).then_some(Users::Passwords(users))
    }

    /// The role of `user` if `password` is theirs. Every configured user is compared,
    /// whatever matched before, so the time taken says nothing.
    pub fn check(&self, user: &str, password: &str) -> Option<Role> {
        let Users::Passwords(users) = self else {
            return Some(Role::Operator);
        };
        let (user_digest, password_digest) = (digest(user), digest(password));
        let mut found = None;
        for (name, secret, role) in users {
            let name_ok = digest(name).ct_eq(&user_digest);
            let password_ok = secret.ct_eq(&password_digest);
            if bool::from(name_ok & password_ok) {
                found = Some(*role);
            }
        }
        found
    }

    pub fn open(&self) -> bool {
        matches!(self, Users::Open)
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub role: Role,
    pub csrf: String,
    expires: Instant,
}

impl Session {
    pub fn csrf_ok(&self, token: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(token.as_bytes()))
    }
}

/// The sessions of this process.
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// A new session for `user`: its id, for the cookie.
    pub fn start(&self, user: &str, role: Role, ttl: Duration) -> String {
        let id = random_token();
        let now = Instant::now();
        let mut sessions = crate::lock(&self.0);
        sessions.retain(|_, s| s.expires > now);
        let theirs = sessions.values().filter(|s| s.user == user).count();
        if theirs >= MAX_SESSIONS_PER_USER
            && let Some(oldest) = sessions
                .iter()
                .filter(|(_, s)| s.user == user)
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                user: user.to_owned(),
                role,
                csrf: random_token(),
                expires: now + ttl,
            },
        );
        id
    }

    /// The live session of `id`; an expired one is ended.
    fn get(&self, id: &str) -> Lookup {
        let mut sessions = crate::lock(&self.0);
        match sessions.get(id) {
            Some(s) if s.expires > Instant::now() => Lookup::Live(s.clone()),
            Some(_) => {
                sessions.remove(id);
                Lookup::Expired
            }
            None => Lookup::None,
        }
    }

    pub fn end(&self, id: &str) {
        crate::lock(&self.0).remove(id);
    }
}

enum Lookup {
    Live(Session),
    Expired,
    None,
}

/// The session id the request's cookie names.
pub fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_owned())
}

/// The session cookie; `Secure` when people reach the console over https
/// (`console.public_url`).
pub fn set_cookie(id: &str, ttl: Duration, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        ttl.as_secs()
    )
}

pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Why a request does not reach its page: no live session (to the login page), or a
/// viewer where an operator is needed (`pages.rs` renders it).
pub enum Denied {
    Login { expired: bool },
    NotOperator(Session),
}

/// Anyone logged in (or anyone, with `--no-auth`).
pub struct Viewer(pub Session);

/// A logged-in operator.
pub struct Operator(pub Session);

impl FromRequestParts<Shared> for Viewer {
    type Rejection = Denied;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Denied> {
        if state.users.open() {
            return Ok(Viewer(Session {
                user: "local (no auth)".into(),
                role: Role::Operator,
                csrf: state.open_csrf.clone(),
                expires: Instant::now() + Duration::from_secs(3600),
            }));
        }
        let lookup = cookie(&parts.headers).map_or(Lookup::None, |id| state.sessions.get(&id));
        match lookup {
            Lookup::Live(s) => Ok(Viewer(s)),
            Lookup::Expired => Err(Denied::Login { expired: true }),
            Lookup::None => Err(Denied::Login { expired: false }),
        }
    }
}

impl FromRequestParts<Shared> for Operator {
    type Rejection = Denied;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Denied> {
        let Viewer(session) = Viewer::from_request_parts(parts, state).await?;
        if session.role != Role::Operator {
            tracing::warn!(
                audit = "refused",
                user = %session.user,
                role = session.role.as_str(),
                path = %parts.uri.path(),
                "console: a viewer tried to act; refused"
            );
            return Err(Denied::NotOperator(session));
        }
        Ok(Operator(session))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(operator: Option<&str>, viewer: Option<&str>) -> ConsoleSettings {
        ConsoleSettings {
            listen: "127.0.0.1:0".parse().expect("address"),
            public_url: None,
            session_ttl: Duration::from_secs(60),
            export_dir: "x".into(),
            operator_user: "op".into(),
            operator_password: operator.map(SecretString::from),
            viewer_user: "view".into(),
            viewer_password: viewer.map(SecretString::from),
        }
    }

    #[test]
    fn each_user_logs_in_with_their_own_password_only() {
        let users = Users::from_settings(&settings(
            Some("operator-secret-1"),
            Some("viewer-secret-1"),
        ))
        .expect("users");
        assert_eq!(users.check("op", "operator-secret-1"), Some(Role::Operator));
        assert_eq!(users.check("view", "viewer-secret-1"), Some(Role::Viewer));
        assert_eq!(users.check("op", "viewer-secret-1"), None);
        assert_eq!(users.check("view", "operator-secret-1"), None);
        assert_eq!(users.check("op", "operator-secret-"), None);
        assert_eq!(users.check("", ""), None);
        assert!(Users::from_settings(&settings(None, None)).is_none());
        let viewer_only =
            Users::from_settings(&settings(None, Some("viewer-secret-1"))).expect("users");
        assert_eq!(viewer_only.check("op", ""), None);
    }

    #[test]
    fn sessions_expire_and_end() {
        let sessions = Sessions::default();
        let id = sessions.start("op", Role::Operator, Duration::from_secs(60));
        assert!(
            matches!(sessions.get(&id), Lookup::Live(s) if s.user == "op" && s.csrf.len() == 64)
        );
        sessions.end(&id);
        assert!(matches!(sessions.get(&id), Lookup::None));
        let short = sessions.start("op", Role::Operator, Duration::ZERO);
        assert!(matches!(sessions.get(&short), Lookup::Expired));
        assert!(matches!(sessions.get(&short), Lookup::None));
    }

    #[test]
    fn one_user_s_logins_never_end_another_user_s_session() {
        let sessions = Sessions::default();
        let ttl = Duration::from_secs(60);
        let operator = sessions.start("op", Role::Operator, ttl);
        for _ in 0..MAX_SESSIONS_PER_USER + 5 {
            sessions.start("view", Role::Viewer, ttl);
        }
        assert!(matches!(sessions.get(&operator), Lookup::Live(_)));
        let viewers = sessions.0.lock().expect("sessions").len() - 1;
        assert_eq!(viewers, MAX_SESSIONS_PER_USER);
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; gp_console=abc; b=2".parse().expect("header"),
        );
        assert_eq!(cookie(&h).as_deref(), Some("abc"));
        assert_eq!(cookie(&HeaderMap::new()), None);
    }
}

//! Values that must never reach a log line, an error message or an event.
//!
//! Invariants:
//! - tokens and passwords are [`SecretString`]s (the `secrecy` crate): `Debug` prints
//!   `[REDACTED]`, there is no `Display`, and the only way to the plaintext is
//!   `expose_secret()`, so every use of a secret is greppable;
//! - a connection URL is a [`SecretUrl`]: printed with its password replaced by `***`, so
//!   operators still see which host and vhost a worker talks to.

use std::fmt;

pub use secrecy::{ExposeSecret, SecretString};

#[derive(Clone)]
pub struct SecretUrl(SecretString);

impl SecretUrl {
    pub fn new(value: impl Into<String>) -> Self {
        SecretUrl(SecretString::from(value.into()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The URL with the userinfo password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(self.expose())
    }
}

/// `s` with the password of its userinfo (if any) replaced by `***`, and the values of
/// password-like query parameters (`pass=`, `password=`, …) too; text that is not a URL
/// at all is replaced entirely. Written for URLs that may not even parse: a password may
/// hold `@`, `/` or `?`, so the userinfo runs to the *last* `@` of the whole string.
pub fn redact_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return "[redacted]".to_owned();
    };
    let scheme = &s[..scheme_end + 3];
    let rest = &s[scheme_end + 3..];
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let mut out = String::from(scheme);
    if let Some(info) = userinfo {
        match info.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@")),
            // Only a user: still unknown whether it is one (`redis://secret@host`).
            None => out.push_str(&format!("{info}@")),
        }
    }
    out.push_str(&redact_query(after));
    out
}

/// `host/path?db=0&pass=x` → `host/path?db=0&pass=***`.
fn redact_query(text: &str) -> String {
    let Some((head, query)) = text.split_once('?') else {
        return text.to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if is_secret_param(k) => format!("{k}=***"),
            _ => p.to_owned(),
        })
        .collect();
    format!("{head}?{}", params.join("&"))
}

fn is_secret_param(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "pass", "password", "passwd", "pwd", "secret", "token", "auth",
    ]
    .iter()
    .any(|s| k == *s || k.ends_with(&format!("_{s}")))
}

impl PartialEq for SecretUrl {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for SecretUrl {}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = SecretString::from("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose_secret(), "hunter2");
    }

    #[test]
    fn url_password_is_masked() {
        let u = SecretUrl::new("amqp://guest:pa@ss@127.0.0.1:5672/%2f");
        assert_eq!(u.redacted(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert!(!format!("{u:?}").contains("pa@ss"));
        let plain = SecretUrl::new("redis://127.0.0.1:6379/0");
        assert_eq!(plain.redacted(), "redis://127.0.0.1:6379/0");
        let user_only = SecretUrl::new("redis://default@host/0");
        assert_eq!(user_only.redacted(), "redis://default@host/0");
        assert_eq!(redact_url("not a url"), "[redacted]");
        // Passwords holding the characters that end an authority, in URLs that may not
        // parse at all.
        assert_eq!(
            redact_url("amqp://guest:SEC?RET@127.0.0.1:notaport/%2f"),
            "amqp://guest:***@127.0.0.1:notaport/%2f"
        );
        assert_eq!(redact_url("redis://:SEC/RET@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(
            redact_url("amqp://guest:pw@SEC/RET@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("redis+unix:///tmp/r.sock?db=0&pass=s3cr3t"),
            "redis+unix:///tmp/r.sock?db=0&pass=***"
        );
    }
}

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

/// `s` with the password of its userinfo (if any) replaced by `***`; text that is not a
/// URL at all is replaced entirely.
pub fn redact_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return "[redacted]".to_owned();
    };
    let rest = &s[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{}{}@{}", &s[..scheme_end + 3], masked, &rest[at + 1..])
        }
        None => s.to_owned(),
    }
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
    }
}

//! How the client gets a bearer token (SPEC §6).
//!
//! Invariant: a token is only ever read through [`Auth::bearer`], and after a 401/403 the
//! client asks [`Auth::after_unauthorized`] once whether a *different* token exists; a
//! static token never changes, so the second 401 is final and opens the circuit upstream.

use crate::secret::Secret;

use super::ApiError;

#[derive(Clone)]
pub enum Auth {
    /// `api.auth = "token"`.
    Static(Secret),
}

/// Failures of the login flow, kept apart from API call failures so a bad password is
/// never mistaken for a bad command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

impl Auth {
    pub async fn bearer(&self) -> Result<Secret, ApiError> {
        match self {
            Auth::Static(token) => Ok(token.clone()),
        }
    }

    /// The API refused `refused`. Returns true when another token is now available and one
    /// more try is worthwhile.
    pub async fn after_unauthorized(&self, refused: &Secret) -> Result<bool, ApiError> {
        match self {
            Auth::Static(token) => Ok(token != refused),
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Static(_) => f.write_str("Auth::Static([redacted])"),
        }
    }
}

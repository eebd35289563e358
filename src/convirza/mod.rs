//! The Convirza Platform API v3 boundary (SPEC §1).
//!
//! Invariants:
//! - every HTTP outcome is classified into [`ApiError`] (or success) here and nowhere else;
//!   callers never look at status codes;
//! - a request that may have reached the API but whose answer was lost is
//!   [`ApiError::UnknownOutcome`], never "failed": the group may exist;
//! - the bearer token, the request body, phone numbers and addresses are never logged.

mod auth;
mod client;
mod error;
mod model;

pub use auth::{Auth, AuthError, LoginSession, TokenPair, TokenStore, parse_token_response};
pub use client::{ConvirzaClient, Created, LIST_PAGE_SIZE};
pub use error::ApiError;
pub use model::{GroupPage, GroupSummary, names_match};

//! The Convirza Platform API v3 adapter: the HTTP client, login sessions, wire shapes, and
//! the implementation of the core's [`GroupApi`](crate::pipeline::GroupApi) port.
//!
//! Invariants:
//! - every HTTP outcome is classified into the port's [`ApiError`] (or success) here and
//!   nowhere else; callers never look at status codes;
//! - a request that may have reached the API but whose answer was lost is
//!   [`ApiError::UnknownOutcome`], never "failed": the group may exist;
//! - the bearer token, the request body, phone numbers and addresses are never logged.

mod auth;
mod client;
mod model;
mod port;

pub use auth::{
    Auth, LoginSession, TokenPair, TokenResponseError, TokenStore, parse_token_response,
};
pub use client::{BuildError, ConvirzaClient, LIST_PAGE_SIZE, Observer, Operation, http_client};
pub use model::GroupPage;

pub use crate::pipeline::{ApiError, Created, GroupSummary};

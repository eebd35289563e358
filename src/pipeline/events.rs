//! Event bodies (SPEC §4). Field names and order are the contract; `schema_version` is 1.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedEvent {
    pub event: String,
    pub schema_version: u32,
    pub ext_id: String,
    pub org_unit_id: i64,
    pub org_unit_name: String,
    pub org_unit_parent_id: i64,
    pub duplicate: bool,
    pub attempts: u32,
    pub api_request_id: Option<String>,
    pub command_message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub occurred_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub kind: String,
    pub http_status: Option<u16>,
    pub message: String,
    pub api_request_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedEvent {
    pub event: String,
    pub schema_version: u32,
    pub ext_id: Option<String>,
    pub error: ErrorInfo,
    pub attempts: u32,
    pub dead_lettered: bool,
    pub command_message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub occurred_at: String,
}

pub const CREATED: &str = "group.created";
pub const FAILED: &str = "group.create.failed";
pub const SCHEMA_VERSION: u32 = 1;

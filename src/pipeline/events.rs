//! The events a delivery ends with, and how they are built from the delivery and its
//! outcome. Field names and order are the contract consumers rely on; `schema_version`
//! is 1.

use serde::{Deserialize, Serialize};

use crate::command::CreateGroup;

use super::failure::Failure;
use super::inbound::Inbound;
use super::store::CreatedRecord;
use crate::text::truncate;

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

/// `error.message` of a failure event is cut to this many bytes.
pub const MAX_EVENT_MESSAGE_BYTES: usize = 1024;

impl CreatedEvent {
    /// The `group.created` of `msg`, for the group `record` describes.
    pub fn new(
        msg: &Inbound,
        command: &CreateGroup,
        record: &CreatedRecord,
        duplicate: bool,
        attempts: u32,
    ) -> CreatedEvent {
        CreatedEvent {
            event: CREATED.into(),
            schema_version: SCHEMA_VERSION,
            ext_id: command.ext_id.to_string(),
            org_unit_id: record.org_unit_id,
            org_unit_name: record.org_unit_name.clone(),
            org_unit_parent_id: record.org_unit_parent_id,
            duplicate,
            attempts,
            api_request_id: record.api_request_id.clone(),
            command_message_id: msg.message_id.clone(),
            correlation_id: msg.correlation_id_or(Some(command.ext_id.as_str())),
            occurred_at: crate::clock::now_rfc3339(),
        }
    }
}

impl FailedEvent {
    /// The `group.create.failed` of `msg`, dead-lettered for `failure`.
    pub fn new(msg: &Inbound, ext_id: Option<&str>, failure: &Failure, attempts: u32) -> Self {
        FailedEvent {
            event: FAILED.into(),
            schema_version: SCHEMA_VERSION,
            ext_id: ext_id.map(str::to_owned),
            error: ErrorInfo {
                kind: failure.kind.as_str().into(),
                http_status: failure.http_status,
                message: truncate(&failure.message, MAX_EVENT_MESSAGE_BYTES),
                api_request_id: failure.api_request_id.clone(),
            },
            attempts,
            dead_lettered: true,
            command_message_id: msg.message_id.clone(),
            correlation_id: msg.correlation_id_or(ext_id),
            occurred_at: crate::clock::now_rfc3339(),
        }
    }
}

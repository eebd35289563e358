//! The HTTP client as the core's [`GroupApi`] port.

use crate::command::CreateGroup;
use crate::pipeline::{ApiError, Created, GroupApi, GroupSummary};
use crate::traceparent::Traceparent;

use super::ConvirzaClient;

impl GroupApi for ConvirzaClient {
    async fn create_group(
        &self,
        command: &CreateGroup,
        trace: Option<&Traceparent>,
    ) -> Result<Created, ApiError> {
        ConvirzaClient::create_group(self, command, trace).await
    }

    async fn find_children_named(
        &self,
        parent: i64,
        name: &str,
        trace: Option<&Traceparent>,
    ) -> Result<Vec<GroupSummary>, ApiError> {
        ConvirzaClient::find_children_named(self, parent, name, trace).await
    }

    async fn find_child_with_ext_id(
        &self,
        parent: i64,
        ext_id: &str,
        trace: Option<&Traceparent>,
    ) -> Result<Option<GroupSummary>, ApiError> {
        ConvirzaClient::find_child_with_ext_id(self, parent, ext_id, trace).await
    }

    /// `GET /v3/groups/list?limit=1`: authenticated, read-only.
    async fn probe(&self) -> Result<(), ApiError> {
        self.list_child_groups(None, None, 1, 0, None)
            .await
            .map(|_| ())
    }
}

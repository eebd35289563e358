//! Reconciliation: what List Child Groups says about a command. The API's messages are
//! prose, its listing is data, so every "did our group get created?" question is answered
//! here, from the listing.
//!
//! Invariant: our ext id decides wherever it is found — under the command's name, under a
//! name an earlier POST used, or anywhere among the parent's children; a name taken by
//! another ext id only matters under the name the command asks for now.

use crate::command::CreateGroup;

use super::api::GroupSummary;

/// What the lookups say about a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// A child with our ext id: the group exists.
    Found(GroupSummary),
    /// A child with the command's name under another (or no) ext id.
    NameTaken(GroupSummary),
    NotFound,
}

/// `named` are the parent's children matched by the command's name (ignoring case and
/// surrounding spaces); `elsewhere` are children found by other lookups (names earlier
/// POSTs used, or the ext id among all children).
pub fn reconcile(
    command: &CreateGroup,
    named: Vec<GroupSummary>,
    elsewhere: Vec<GroupSummary>,
) -> Reconciled {
    let ours = |g: &GroupSummary| g.org_unit_ext_id.as_deref() == Some(command.ext_id.as_str());
    if let Some(found) = named.iter().chain(elsewhere.iter()).find(|g| ours(g)) {
        return Reconciled::Found(found.clone());
    }
    named
        .into_iter()
        .next()
        .map_or(Reconciled::NotFound, Reconciled::NameTaken)
}

//! Reconciliation: what a List Child Groups lookup says about a command. The API's
//! messages are prose, its listing is data, so every "did our group get created?" question
//! is answered here, from the listing.

use crate::command::CreateGroup;

use super::api::GroupSummary;

/// What a List Child Groups lookup says about a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// A child with this name and our ext id: the group exists.
    Found(GroupSummary),
    /// A child with this name under another (or no) ext id.
    NameTaken(GroupSummary),
    NotFound,
}

/// `children` are the parent's children already matched by name (ignoring case and
/// surrounding spaces); the ext id decides.
pub fn reconcile(command: &CreateGroup, children: Vec<GroupSummary>) -> Reconciled {
    let mut taken = None;
    for child in children {
        if child.org_unit_ext_id.as_deref() == Some(command.ext_id.as_str()) {
            return Reconciled::Found(child);
        }
        taken.get_or_insert(child);
    }
    taken.map_or(Reconciled::NotFound, Reconciled::NameTaken)
}

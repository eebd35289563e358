//! Fingerprints: which fields of a later duplicate differ from the command that created
//! the group, without keeping the values.
//!
//! Invariant: personal fields (address, city, zip, phone number) are not fingerprinted at
//! all, and unknown fields only by name: what is stored are FNV-1a hashes (stable across
//! builds) of the group's own, non-personal fields. A hash of a low-entropy value can be
//! reversed by trying values, which is why nothing personal is hashed.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::CreateGroup;

use super::store::CreatedRecord;

/// Field → hash of its value.
pub fn fingerprint(command: &CreateGroup) -> BTreeMap<String, String> {
    command
        .fingerprint_fields()
        .into_iter()
        .map(|(field, value)| (field.to_owned(), crate::hash::short_hash(value.as_bytes())))
        .collect()
}

/// The fields of `command` that differ from the command that created `record`. Fields an
/// older version fingerprinted and this one does not (personal ones) are not compared.
pub fn differing_fields(command: &CreateGroup, record: &CreatedRecord) -> Vec<String> {
    let ours = fingerprint(command);
    ours.keys()
        .chain(record.fingerprint.keys().filter(|k| !is_personal(k)))
        .filter(|k| ours.get(*k) != record.fingerprint.get(*k))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn is_personal(field: &str) -> bool {
    crate::command::PII_FIELDS.contains(&field)
}

/// Log the differing fields of a duplicate, if any: the group is not changed, and whoever
/// sent the changed command should know.
pub fn warn_if_different(command: &CreateGroup, record: &CreatedRecord) {
    if record.fingerprint.is_empty() {
        return;
    }
    let differing = differing_fields(command, record);
    if !differing.is_empty() {
        tracing::warn!(
            differing_fields = ?differing,
            org_unit_id = record.org_unit_id,
            "duplicate command differs from the one that created the group; the group is not changed"
        );
    }
}

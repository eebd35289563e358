//! Wire shapes of the API: the response envelope and group listings. Lenient on purpose:
//! ids may come as numbers or numeric strings, and `data.orgUnitId` / `data.org_unit_id`
//! are both accepted (the docs use both).

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::pipeline::GroupSummary;

/// A child group as List Child Groups sends it; read leniently, straight into the core's
/// own [`GroupSummary`].
#[derive(Deserialize)]
#[serde(remote = "GroupSummary")]
struct WireGroup {
    #[serde(deserialize_with = "lenient_i64")]
    org_unit_id: i64,
    #[serde(default, deserialize_with = "lenient_opt_string")]
    org_unit_ext_id: Option<String>,
    #[serde(default)]
    org_unit_name: String,
    #[serde(default, deserialize_with = "lenient_opt_i64")]
    org_unit_parent_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient_opt_string")]
    org_unit_status: Option<String>,
}

/// One page of List Child Groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPage {
    pub groups: Vec<GroupSummary>,
    pub total: Option<u64>,
}

/// The envelope fields we use. Everything is optional: error bodies are often not
/// enveloped at all (proxies, HTML error pages).
#[derive(Debug, Default, Deserialize)]
pub(super) struct Envelope {
    #[serde(default)]
    pub message: Option<Value>,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub request_id: Option<Value>,
}

impl Envelope {
    pub fn request_id(&self) -> Option<String> {
        self.request_id.as_ref().and_then(value_to_string)
    }

    pub fn message(&self) -> Option<String> {
        self.message.as_ref().and_then(value_to_string)
    }

    /// `data.orgUnitId` or `data.org_unit_id`, as a number or numeric string.
    pub fn created_id(&self) -> Option<i64> {
        let data = self.data.as_ref()?;
        ["orgUnitId", "org_unit_id"]
            .iter()
            .find_map(|k| data.get(*k).and_then(value_to_i64))
    }

    pub fn page(&self) -> Option<GroupPage> {
        let data = self.data.as_ref()?;
        let groups = data.get("groups")?.as_array()?;
        let groups = groups
            .iter()
            .filter_map(|g| WireGroup::deserialize(g).ok())
            .collect();
        Some(GroupPage {
            groups,
            total: data
                .get("total")
                .and_then(value_to_i64)
                .and_then(|t| u64::try_from(t).ok()),
        })
    }
}

fn value_to_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn value_to_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn lenient_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = Value::deserialize(d)?;
    value_to_i64(&v).ok_or_else(|| serde::de::Error::custom(format!("not an integer id: {v}")))
}

fn lenient_opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(value_to_i64(&Value::deserialize(d)?))
}

fn lenient_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(value_to_string(&Value::deserialize(d)?).filter(|s| !s.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(v: Value) -> Envelope {
        serde_json::from_value(v).expect("envelope")
    }

    #[test]
    fn both_id_shapes() {
        assert_eq!(env(json!({"data": {"orgUnitId": 5}})).created_id(), Some(5));
        assert_eq!(
            env(json!({"data": {"org_unit_id": "6"}})).created_id(),
            Some(6)
        );
        assert_eq!(env(json!({"data": {}})).created_id(), None);
        assert_eq!(env(json!({})).created_id(), None);
    }

    #[test]
    fn page_is_lenient() {
        let e = env(json!({"data": {"total": "2", "groups": [
            {"org_unit_id": "10", "org_unit_ext_id": "A", "org_unit_name": "x", "org_unit_parent_id": 1, "org_unit_status": "active"},
            {"org_unit_id": 11, "org_unit_ext_id": null, "org_unit_name": "y"},
            {"no_id": true}
        ]}}));
        let page = e.page().expect("page");
        assert_eq!(page.total, Some(2));
        assert_eq!(page.groups.len(), 2, "unparseable items are skipped");
        assert_eq!(page.groups[0].org_unit_id, 10);
        assert_eq!(page.groups[1].org_unit_ext_id, None);
    }
}

//! The "create group" command, parsed once into typed values.
//!
//! Invariants:
//! - a [`CreateGroup`] only exists if every rule of docs/contract.md §2 held, so nothing downstream
//!   re-validates;
//! - fields the worker does not know are kept as the exact JSON text they arrived in and
//!   are sent to the API unchanged (the API has undocumented settings fields);
//! - `parent_org_unit_id` is an alias: it is renamed to `org_unit_parent_id` for the POST,
//!   and both at once is an error;
//! - lengths count Unicode scalar values, not bytes; the size limit counts bytes;
//! - no string carries a NUL character, the ext id is not blank, the body is not
//!   content-encoded, and unknown fields are JSON the API can read back: nested at most
//!   [`MAX_PASSTHROUGH_DEPTH`] deep, every number representable, every string valid.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub const MAX_BODY_BYTES: usize = 65_536;
pub const MAX_EXT_ID_CHARS: usize = 128;
pub const MAX_NAME_CHARS: usize = 255;
/// How deep an unknown field's value may nest arrays and objects.
pub const MAX_PASSTHROUGH_DEPTH: usize = 32;

/// The caller's external id: the deduplication key. 1–128 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ExtId(String);

impl ExtId {
    pub fn parse(value: &str) -> Result<ExtId, CommandError> {
        let chars = value.chars().count();
        if chars == 0 {
            return Err(CommandError::field("org_unit_ext_id", "must not be empty"));
        }
        if crate::text::is_blank(value) {
            return Err(CommandError::field("org_unit_ext_id", "must not be blank"));
        }
        if chars > MAX_EXT_ID_CHARS {
            return Err(CommandError::field(
                "org_unit_ext_id",
                format!("is {chars} characters long, the limit is {MAX_EXT_ID_CHARS}"),
            ));
        }
        if let Some(pos) = value.chars().position(char::is_control) {
            return Err(CommandError::field(
                "org_unit_ext_id",
                format!("contains a control character at position {pos}"),
            ));
        }
        Ok(ExtId(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExtId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a delivery is not a valid command. The message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("body is {0} bytes, the limit is {MAX_BODY_BYTES}")]
    TooLarge(usize),
    #[error("content_type {0:?} is not application/json")]
    ContentType(String),
    #[error("content_encoding {0:?} is not supported (send uncompressed UTF-8 JSON)")]
    ContentEncoding(String),
    #[error("body is not valid UTF-8 JSON: {0}")]
    NotJson(String),
    #[error("body is JSON but not an object (got {0})")]
    NotAnObject(&'static str),
    #[error("field \"{}\" appears more than once", shown_name(.0))]
    DuplicateField(String),
    #[error("{field}: {reason}")]
    Field { field: &'static str, reason: String },
    /// An unknown field (passed through to the API) that the API could not read.
    #[error("{}: {reason}", shown_name(.field))]
    Passthrough { field: String, reason: String },
}

/// A field name from the body as an error message shows it: escaped and bounded, since
/// the message goes to logs, the failure event and the dead letter.
fn shown_name(name: &str) -> String {
    crate::text::printable(name, MAX_SHOWN_NAME_CHARS)
}

const MAX_SHOWN_NAME_CHARS: usize = 128;

impl CommandError {
    fn field(field: &'static str, reason: impl Into<String>) -> Self {
        CommandError::Field {
            field,
            reason: reason.into(),
        }
    }
}

/// A command that failed validation, with its ext id when that part was valid (the failure
/// event reports it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct InvalidCommand {
    pub ext_id: Option<ExtId>,
    pub error: CommandError,
}

/// Found before the ext id was read.
impl From<CommandError> for InvalidCommand {
    fn from(error: CommandError) -> Self {
        InvalidCommand {
            ext_id: None,
            error,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CreateGroup {
    pub ext_id: ExtId,
    pub name: String,
    pub parent_id: i64,
    pub top_ou_id: Option<i64>,
    pub billing_id: Option<i64>,
    pub industry_id: Option<i64>,
    pub address: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub zip: Option<String>,
    pub phone_number: Option<String>,
    pub timezone: Option<String>,
    /// Unknown fields, verbatim and in arrival order.
    pub passthrough: Passthrough,
}

/// Unknown fields as raw JSON text. Equality compares the text.
#[derive(Debug, Clone, Default)]
pub struct Passthrough(pub Vec<(String, Box<RawValue>)>);

impl PartialEq for Passthrough {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((ka, va), (kb, vb))| ka == kb && va.get() == vb.get())
    }
}

impl Passthrough {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, Box<RawValue>)> {
        self.0.iter()
    }
}

const INT_FIELDS: [&str; 3] = ["top_ou_id", "billing_id", "industry_id"];
const STRING_FIELDS: [&str; 6] = [
    "address",
    "city",
    "state",
    "zip",
    "phone_number",
    "timezone",
];

/// Fields whose values are personal data and must not reach logs.
pub const PII_FIELDS: [&str; 4] = ["address", "phone_number", "zip", "city"];

impl CreateGroup {
    /// Parse an AMQP delivery: its `content_type` property and body.
    pub fn from_delivery(
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: &[u8],
    ) -> Result<CreateGroup, InvalidCommand> {
        // Before anything reads the body (the ext id hint parses it).
        if body.len() > MAX_BODY_BYTES {
            return Err(CommandError::TooLarge(body.len()).into());
        }
        if let Some(enc) = content_encoding
            && !enc.trim().is_empty()
            && !enc.trim().eq_ignore_ascii_case("identity")
        {
            return Err(InvalidCommand {
                ext_id: ext_id_hint(body),
                error: CommandError::ContentEncoding(enc.to_owned()),
            });
        }
        if let Some(ct) = content_type {
            let mime = ct.split(';').next().unwrap_or("").trim();
            if !mime.is_empty() && !mime.eq_ignore_ascii_case("application/json") {
                return Err(InvalidCommand {
                    ext_id: ext_id_hint(body),
                    error: CommandError::ContentType(ct.to_owned()),
                });
            }
        }
        CreateGroup::parse(body)
    }

    /// Parse a JSON body by the rules in the module documentation.
    pub fn parse(body: &[u8]) -> Result<CreateGroup, InvalidCommand> {
        if body.len() > MAX_BODY_BYTES {
            return Err(CommandError::TooLarge(body.len()).into());
        }
        let fields = parse_object(body)?;
        let ext_id = match fields.get("org_unit_ext_id") {
            None => Err(CommandError::field("org_unit_ext_id", "is required")),
            Some(raw) => string_field("org_unit_ext_id", raw).and_then(|s| ExtId::parse(&s)),
        };
        let ext_id = ext_id?;
        build(ext_id.clone(), fields).map_err(|error| InvalidCommand {
            ext_id: Some(ext_id),
            error,
        })
    }

    /// The POST /v3/groups body: known fields (the parent id under its canonical name) then
    /// unknown fields as received.
    pub fn api_body(&self) -> ApiBody<'_> {
        ApiBody(self)
    }

    /// The fields that identify "the same command", for spotting a duplicate ext id whose
    /// content differs. Personal data is left out entirely — not even a hash of it is
    /// kept, since a phone number is found from its hash in a fraction of a second — and
    /// of fields passed through unread only the names count (their values may be personal).
    pub fn fingerprint_fields(&self) -> Vec<(&str, String)> {
        let mut out = vec![
            ("org_unit_name", self.name.clone()),
            ("org_unit_parent_id", self.parent_id.to_string()),
        ];
        for (name, value) in self.int_fields() {
            if let Some(v) = value {
                out.push((name, v.to_string()));
            }
        }
        for (name, value) in [("state", &self.state), ("timezone", &self.timezone)] {
            if let Some(v) = value {
                out.push((name, v.clone()));
            }
        }
        for (name, _) in self.passthrough.iter() {
            out.push((name.as_str(), "present".to_owned()));
        }
        out
    }

    fn int_fields(&self) -> [(&'static str, Option<i64>); 3] {
        [
            ("top_ou_id", self.top_ou_id),
            ("billing_id", self.billing_id),
            ("industry_id", self.industry_id),
        ]
    }

    fn string_fields(&self) -> [(&'static str, &Option<String>); 6] {
        [
            ("address", &self.address),
            ("city", &self.city),
            ("state", &self.state),
            ("zip", &self.zip),
            ("phone_number", &self.phone_number),
            ("timezone", &self.timezone),
        ]
    }
}

/// Serializes to the API request body without copying the command.
pub struct ApiBody<'a>(&'a CreateGroup);

impl Serialize for ApiBody<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let c = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("org_unit_name", &c.name)?;
        map.serialize_entry("org_unit_parent_id", &c.parent_id)?;
        map.serialize_entry("org_unit_ext_id", &c.ext_id)?;
        for (name, value) in c.int_fields() {
            if let Some(v) = value {
                map.serialize_entry(name, &v)?;
            }
        }
        for (name, value) in c.string_fields() {
            if let Some(v) = value {
                map.serialize_entry(name, v)?;
            }
        }
        for (name, raw) in c.passthrough.iter() {
            map.serialize_entry(name, raw)?;
        }
        map.end()
    }
}

/// The top-level members of a JSON object, values kept as raw text, duplicates rejected.
struct Fields(Vec<(String, Box<RawValue>)>);

impl Fields {
    fn get(&self, name: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }
}

fn parse_object(body: &[u8]) -> Result<Fields, CommandError> {
    let text = std::str::from_utf8(body).map_err(|e| CommandError::NotJson(e.to_string()))?;
    // First a cheap look at the top-level kind so that arrays and scalars get a precise
    // message instead of serde's "invalid type".
    let value: &RawValue =
        serde_json::from_str(text).map_err(|e| CommandError::NotJson(e.to_string()))?;
    let kind = json_kind(value);
    if kind != "object" {
        return Err(CommandError::NotAnObject(kind));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(FieldsVisitor).map_err(|e| {
        let msg = e.to_string();
        match msg.strip_prefix("duplicate field ") {
            Some(rest) => CommandError::DuplicateField(
                rest.split(" at line")
                    .next()
                    .unwrap_or(rest)
                    .trim_matches('`')
                    .to_owned(),
            ),
            None => CommandError::NotJson(msg),
        }
    })
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Fields, A::Error> {
        let mut out: Vec<(String, Box<RawValue>)> = Vec::new();
        while let Some(key) = access.next_key::<String>()? {
            let value: Box<RawValue> = access.next_value()?;
            if out.iter().any(|(k, _)| *k == key) {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
            out.push((key, value));
        }
        Ok(Fields(out))
    }
}

fn json_kind(raw: &RawValue) -> &'static str {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        _ => "a number",
    }
}

fn string_field(field: &'static str, raw: &RawValue) -> Result<String, CommandError> {
    let kind = json_kind(raw);
    let text =
        String::deserialize(&mut serde_json::Deserializer::from_str(raw.get())).map_err(|e| {
            match kind {
                // A string the JSON parser cannot decode: an unpaired surrogate escape, say.
                "a string" => CommandError::field(
                    field,
                    format!("is not valid Unicode: {}", without_position(&e)),
                ),
                _ => CommandError::field(field, format!("must be a string, got {kind}")),
            }
        })?;
    if text.contains('\0') {
        return Err(CommandError::field(field, "contains a NUL character"));
    }
    Ok(text)
}

/// serde_json's message without its "at line 1 column 9" suffix.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// An unknown field's value must be JSON the API can read back: decodable strings
/// without NUL, representable numbers, bounded nesting.
fn check_passthrough(field: &str, raw: &RawValue) -> Result<(), CommandError> {
    let reject = |reason: String| CommandError::Passthrough {
        field: field.to_owned(),
        reason,
    };
    // The name goes to the API as a key and to logs as a field name: no control
    // characters (NUL included; no legitimate field has one).
    if field.chars().any(char::is_control) {
        return Err(reject(
            "the field name contains a control character".to_owned(),
        ));
    }
    let value: serde_json::Value = serde_json::from_str(raw.get()).map_err(|e| {
        let text = without_position(&e);
        reject(if text.contains("recursion limit") {
            format!("nested deeper than {MAX_PASSTHROUGH_DEPTH} levels")
        } else if text.contains("number out of range") {
            "contains a number JSON cannot represent (out of range)".to_owned()
        } else {
            format!("is not valid JSON: {text}")
        })
    })?;
    fn walk(v: &serde_json::Value, depth: usize) -> Result<(), String> {
        match v {
            _ if depth > MAX_PASSTHROUGH_DEPTH => {
                Err(format!("nested deeper than {MAX_PASSTHROUGH_DEPTH} levels"))
            }
            serde_json::Value::String(s) if s.contains('\0') => {
                Err("contains a NUL character".to_owned())
            }
            serde_json::Value::Array(items) => items.iter().try_for_each(|i| walk(i, depth + 1)),
            serde_json::Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                if k.contains('\0') {
                    return Err("contains a NUL character".to_owned());
                }
                walk(v, depth + 1)
            }),
            _ => Ok(()),
        }
    }
    walk(&value, 0).map_err(reject)
}

fn integer_field(field: &'static str, raw: &RawValue) -> Result<i64, CommandError> {
    let text = raw.get();
    // Integers only: 7.0 and "7" are refused rather than guessed at.
    let is_integer_literal = text
        .strip_prefix('-')
        .unwrap_or(text)
        .bytes()
        .all(|b| b.is_ascii_digit())
        && !text.is_empty();
    if !is_integer_literal {
        return Err(CommandError::field(
            field,
            format!("must be an integer, got {}", describe(raw)),
        ));
    }
    text.parse::<i64>().map_err(|_| {
        CommandError::field(field, format!("{text} is out of the 64-bit integer range"))
    })
}

fn describe(raw: &RawValue) -> String {
    match json_kind(raw) {
        "a number" => raw.get().to_owned(),
        kind => kind.to_owned(),
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

fn build(ext_id: ExtId, fields: Fields) -> Result<CreateGroup, CommandError> {
    let name = match fields.get("org_unit_name") {
        None => return Err(CommandError::field("org_unit_name", "is required")),
        Some(raw) => string_field("org_unit_name", raw)?,
    };
    if crate::text::is_blank(&name) {
        return Err(CommandError::field("org_unit_name", "must not be blank"));
    }
    let name_chars = name.chars().count();
    if name_chars > MAX_NAME_CHARS {
        return Err(CommandError::field(
            "org_unit_name",
            format!("is {name_chars} characters long, the limit is {MAX_NAME_CHARS}"),
        ));
    }

    let parent_raw = match (
        fields.get("org_unit_parent_id"),
        fields.get("parent_org_unit_id"),
    ) {
        (Some(_), Some(_)) => {
            return Err(CommandError::field(
                "org_unit_parent_id",
                "given together with its alias parent_org_unit_id; send only one",
            ));
        }
        (Some(raw), None) => ("org_unit_parent_id", raw),
        (None, Some(raw)) => ("parent_org_unit_id", raw),
        (None, None) => return Err(CommandError::field("org_unit_parent_id", "is required")),
    };
    let parent_id = integer_field(parent_raw.0, parent_raw.1)?;
    if parent_id <= 0 {
        return Err(CommandError::field(
            parent_raw.0,
            format!("must be a positive integer, got {parent_id}"),
        ));
    }

    let mut ints = [None; 3];
    for (slot, field) in ints.iter_mut().zip(INT_FIELDS) {
        if let Some(raw) = fields.get(field).filter(|r| !is_null(r)) {
            *slot = Some(integer_field(field, raw)?);
        }
    }
    let mut strings: [Option<String>; 6] = Default::default();
    for (slot, field) in strings.iter_mut().zip(STRING_FIELDS) {
        if let Some(raw) = fields.get(field).filter(|r| !is_null(r)) {
            *slot = Some(string_field(field, raw)?);
        }
    }

    let known = |k: &str| {
        matches!(
            k,
            "org_unit_ext_id" | "org_unit_name" | "org_unit_parent_id" | "parent_org_unit_id"
        ) || INT_FIELDS.contains(&k)
            || STRING_FIELDS.contains(&k)
    };
    let passthrough = Passthrough(fields.0.into_iter().filter(|(k, _)| !known(k)).collect());
    for (field, raw) in passthrough.iter() {
        check_passthrough(field, raw)?;
    }
    let [top_ou_id, billing_id, industry_id] = ints;
    let [address, city, state, zip, phone_number, timezone] = strings;
    Ok(CreateGroup {
        ext_id,
        name,
        parent_id,
        top_ou_id,
        billing_id,
        industry_id,
        address,
        city,
        state,
        zip,
        phone_number,
        timezone,
        passthrough,
    })
}

/// Best effort: the ext id of a body that failed an envelope-level check.
fn ext_id_hint(body: &[u8]) -> Option<ExtId> {
    let fields = parse_object(body).ok()?;
    let raw = fields.get("org_unit_ext_id")?;
    ExtId::parse(&string_field("org_unit_ext_id", raw).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<CreateGroup, InvalidCommand> {
        CreateGroup::parse(v.to_string().as_bytes())
    }

    fn field_error(v: serde_json::Value) -> (Option<String>, String, String) {
        match parse(v).expect_err("invalid") {
            InvalidCommand {
                ext_id,
                error: CommandError::Field { field, reason },
            } => (ext_id.map(|e| e.to_string()), field.to_owned(), reason),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    fn valid() -> serde_json::Value {
        json!({"org_unit_ext_id": "ORG-1", "org_unit_name": "Sales", "org_unit_parent_id": 1000})
    }

    #[test]
    fn minimal_command_parses() {
        let c = parse(valid()).expect("valid");
        assert_eq!(c.ext_id.as_str(), "ORG-1");
        assert_eq!(c.name, "Sales");
        assert_eq!(c.parent_id, 1000);
        assert!(c.passthrough.is_empty());
    }

    #[test]
    fn full_command_and_passthrough_is_verbatim() {
        let body = r#"{"org_unit_ext_id":"E","org_unit_name":"N","parent_org_unit_id":7,
            "top_ou_id":1,"billing_id":2,"industry_id":3,"address":"1 Main","city":"Austin",
            "state":"TX","zip":"78701","phone_number":"555","timezone":"America/Chicago",
            "spam_guard":{"enabled":true,"level":1.50},"big":123456789012345678901234567890}"#;
        let c = CreateGroup::parse(body.as_bytes()).expect("valid");
        assert_eq!(c.parent_id, 7);
        assert_eq!(c.top_ou_id, Some(1));
        assert_eq!(c.timezone.as_deref(), Some("America/Chicago"));
        let out = serde_json::to_string(&c.api_body()).expect("serializes");
        // The alias is renamed, unknown fields keep their exact text (1.50 stays 1.50, the
        // 30-digit number is not rounded).
        assert!(out.contains(r#""org_unit_parent_id":7"#), "{out}");
        assert!(!out.contains("parent_org_unit_id"), "{out}");
        assert!(
            out.contains(r#""spam_guard":{"enabled":true,"level":1.50}"#),
            "{out}"
        );
        assert!(
            out.contains(r#""big":123456789012345678901234567890"#),
            "{out}"
        );
    }

    #[test]
    fn nulls_for_optional_fields_mean_absent() {
        let mut v = valid();
        v["top_ou_id"] = json!(null);
        v["city"] = json!(null);
        let c = parse(v).expect("valid");
        assert_eq!(c.top_ou_id, None);
        let out = serde_json::to_string(&c.api_body()).expect("serializes");
        assert!(!out.contains("top_ou_id") && !out.contains("city"), "{out}");
    }

    #[test]
    fn ext_id_rules() {
        let mut v = valid();
        v.as_object_mut().expect("object").remove("org_unit_ext_id");
        assert_eq!(field_error(v).1, "org_unit_ext_id");

        for (bad, why) in [
            (json!(""), "must not be empty"),
            (json!("x".repeat(129)), "129 characters"),
            (json!("a\u{0007}b"), "control character at position 1"),
            (json!("line\nbreak"), "control character"),
            (json!(42), "must be a string, got a number"),
            (json!(null), "must be a string, got null"),
        ] {
            let mut v = valid();
            v["org_unit_ext_id"] = bad;
            let (ext, field, reason) = field_error(v);
            assert_eq!(ext, None);
            assert_eq!(field, "org_unit_ext_id");
            assert!(reason.contains(why), "{reason}");
        }
        // 128 multi-byte characters are fine: the limit counts characters.
        let mut v = valid();
        v["org_unit_ext_id"] = json!("é".repeat(128));
        assert!(parse(v).is_ok());
    }

    #[test]
    fn name_rules() {
        for (bad, why) in [
            (json!("   "), "must not be blank"),
            (json!(""), "must not be blank"),
            (json!("n".repeat(256)), "256 characters"),
            (json!(["a"]), "must be a string, got an array"),
        ] {
            let mut v = valid();
            v["org_unit_name"] = bad;
            let (ext, field, reason) = field_error(v);
            assert_eq!(ext.as_deref(), Some("ORG-1"), "ext id reported when valid");
            assert_eq!(field, "org_unit_name");
            assert!(reason.contains(why), "{reason}");
        }
        let mut v = valid();
        v["org_unit_name"] = json!("ü".repeat(255));
        assert!(
            parse(v).is_ok(),
            "255 two-byte characters are within the limit"
        );
        let mut v = valid();
        v.as_object_mut().expect("object").remove("org_unit_name");
        assert_eq!(field_error(v).2, "is required");
    }

    #[test]
    fn parent_rules() {
        for (bad, why) in [
            (json!(0), "positive"),
            (json!(-3), "positive"),
            (json!("1000"), "must be an integer, got a string"),
            (json!(10.5), "must be an integer, got 10.5"),
            (json!(1000.0), "must be an integer, got 1000.0"),
            (json!(null), "got null"),
        ] {
            let mut v = valid();
            v["org_unit_parent_id"] = bad;
            let (_, field, reason) = field_error(v);
            assert_eq!(field, "org_unit_parent_id");
            assert!(reason.contains(why), "{reason}");
        }
        let mut v = valid();
        v["parent_org_unit_id"] = json!(1001);
        let (_, _, reason) = field_error(v);
        assert!(reason.contains("alias"), "{reason}");

        let mut v = valid();
        v.as_object_mut()
            .expect("object")
            .remove("org_unit_parent_id");
        assert_eq!(field_error(v.clone()).2, "is required");
        v["parent_org_unit_id"] = json!(1001);
        assert_eq!(parse(v).expect("alias accepted").parent_id, 1001);

        let body = br#"{"org_unit_ext_id":"E","org_unit_name":"N","org_unit_parent_id":99999999999999999999}"#;
        let e = CreateGroup::parse(body).expect_err("overflow");
        assert!(e.to_string().contains("64-bit"), "{e}");
    }

    #[test]
    fn optional_field_types() {
        for (field, bad) in [
            ("top_ou_id", json!("1")),
            ("billing_id", json!(1.5)),
            ("industry_id", json!(true)),
            ("address", json!(5)),
            ("timezone", json!({"tz": "UTC"})),
            ("phone_number", json!(5551234)),
        ] {
            let mut v = valid();
            v[field] = bad;
            let (_, f, _) = field_error(v);
            assert_eq!(f, field);
        }
    }

    #[test]
    fn envelope_rules() {
        let e = |body: &[u8]| CreateGroup::parse(body).expect_err("invalid").error;
        assert!(matches!(e(b"not json"), CommandError::NotJson(_)));
        assert!(matches!(e(b""), CommandError::NotJson(_)));
        assert!(matches!(e(b"\xff\xfe"), CommandError::NotJson(_)));
        assert_eq!(e(b"[1,2]"), CommandError::NotAnObject("an array"));
        assert_eq!(e(b"\"s\""), CommandError::NotAnObject("a string"));
        assert_eq!(e(b"null"), CommandError::NotAnObject("null"));
        assert!(matches!(e(b"{\"a\":1} trailing"), CommandError::NotJson(_)));
        assert_eq!(
            e(br#"{"org_unit_ext_id":"a","org_unit_ext_id":"b"}"#),
            CommandError::DuplicateField("org_unit_ext_id".into())
        );

        let mut big = valid();
        big["padding"] = json!("x".repeat(70 * 1024));
        let body = big.to_string();
        assert!(matches!(
            CreateGroup::parse(body.as_bytes()).expect_err("too big").error,
            CommandError::TooLarge(n) if n == body.len()
        ));
        // Exactly at the limit is accepted.
        let mut edge = valid();
        edge["padding"] = json!("");
        let base = edge.to_string().len();
        edge["padding"] = json!("x".repeat(MAX_BODY_BYTES - base));
        assert_eq!(edge.to_string().len(), MAX_BODY_BYTES);
        assert!(CreateGroup::parse(edge.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn content_type_rules() {
        let body = valid().to_string();
        for ok in [
            None,
            Some("application/json"),
            Some("application/json; charset=utf-8"),
            Some(""),
        ] {
            assert!(
                CreateGroup::from_delivery(ok, None, body.as_bytes()).is_ok(),
                "{ok:?}"
            );
        }
        let e = CreateGroup::from_delivery(Some("text/plain"), None, body.as_bytes())
            .expect_err("wrong type");
        assert_eq!(e.ext_id.map(|x| x.to_string()).as_deref(), Some("ORG-1"));
        assert!(matches!(e.error, CommandError::ContentType(_)));
    }

    #[test]
    fn an_ext_id_or_name_that_shows_nothing_is_blank() {
        for invisible in ["\u{200b}", " \u{feff}\u{2060} ", "\u{202e}\u{200d}"] {
            let (_, field, reason) = field_error(
                json!({"org_unit_ext_id": invisible, "org_unit_name": "n", "org_unit_parent_id": 1}),
            );
            assert_eq!(
                (field.as_str(), reason.as_str()),
                ("org_unit_ext_id", "must not be blank")
            );
            let (_, field, _) = field_error(
                json!({"org_unit_ext_id": "E", "org_unit_name": invisible, "org_unit_parent_id": 1}),
            );
            assert_eq!(field, "org_unit_name");
        }
        // Visible text around a zero-width character is a real id.
        assert!(parse(json!({"org_unit_ext_id": "a\u{200b}b", "org_unit_name": "n", "org_unit_parent_id": 1})).is_ok());
    }

    #[test]
    fn unknown_field_names_with_control_characters_are_refused_and_shown_escaped() {
        for name in ["a\u{0}b", "\u{1b}]0;owned\u{7}"] {
            let mut v =
                json!({"org_unit_ext_id": "E", "org_unit_name": "n", "org_unit_parent_id": 1});
            v[name] = json!(1);
            let e = parse(v).expect_err("refused");
            assert_eq!(e.ext_id.as_ref().map(ExtId::as_str), Some("E"));
            let text = e.to_string();
            assert!(text.contains("control character"), "{text}");
            assert!(!text.chars().any(char::is_control), "escaped: {text:?}");
        }
    }

    #[test]
    fn field_names_in_messages_are_bounded() {
        let long = "k".repeat(30_000);
        let body = format!(r#"{{"{long}": 1, "{long}": 2}}"#);
        let text = CreateGroup::parse(body.as_bytes())
            .expect_err("duplicate")
            .to_string();
        assert!(text.contains("appears more than once"), "{text}");
        assert!(text.len() < 300, "{} bytes", text.len());
    }

    #[test]
    fn an_oversized_body_is_refused_before_it_is_read() {
        let body = vec![b'['; MAX_BODY_BYTES + 1];
        let e = CreateGroup::from_delivery(Some("text/plain"), Some("gzip"), &body)
            .expect_err("too large");
        assert_eq!(
            e.error,
            CommandError::TooLarge(MAX_BODY_BYTES + 1),
            "the size is the first check"
        );
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_error_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = CreateGroup::parse(&body);
        }

        #[test]
        fn any_json_object_parses_or_errors(
            ext in ".{0,140}",
            name in ".{0,260}",
            parent in any::<i64>(),
            extra in proptest::collection::btree_map("[a-z_]{1,12}", any::<i32>(), 0..5),
        ) {
            let mut v = json!({"org_unit_ext_id": ext, "org_unit_name": name, "org_unit_parent_id": parent});
            for (k, n) in &extra {
                v[k.as_str()] = json!(n);
            }
            match parse(v) {
                Ok(c) => {
                    prop_assert!(c.parent_id > 0);
                    prop_assert!(!c.name.trim().is_empty());
                    // The POST body re-parses to the same command.
                    let again = CreateGroup::parse(serde_json::to_string(&c.api_body()).expect("ser").as_bytes());
                    prop_assert_eq!(again.ok(), Some(c));
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}

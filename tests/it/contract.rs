//! The contract in `docs/` and the code are one truth: the JSON Schemas accept every
//! example command and every event the integration tests capture (checked in
//! `helpers::EventTap`), reject the invalid commands the worker rejects wherever JSON
//! Schema can say so, the AsyncAPI document parses and points only at files that exist,
//! and the publishers the contract shows work against a real broker and worker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::process::{cli, stdout};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A validator for one of `docs/schemas/`.
pub fn validator(file: &str) -> jsonschema::Validator {
    schema_validator(file)
}

fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance).map(|e| e.to_string()).collect()
}

#[test]
fn every_example_command_fits_the_schema() {
    let v = validator("command.schema.json");
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("examples")).expect("examples/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let bodies: Vec<&str> = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => vec![text.as_str()],
            Some("jsonl") => text.lines().filter(|l| !l.trim().is_empty()).collect(),
            _ => continue,
        };
        for body in bodies {
            let value: Value = serde_json::from_str(body).expect("example is JSON");
            assert!(
                v.is_valid(&value),
                "{}: {:?}",
                path.display(),
                errors(&v, &value)
            );
            // And the worker takes it.
            group_provisioner::command::CreateGroup::parse(body.as_bytes())
                .unwrap_or_else(|e| panic!("{}: the worker refuses it: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} examples");
}

/// The invalid-command corpus: the worker refuses every one; the schema refuses those it
/// can express (the rest are named in the schema's description).
#[test]
fn invalid_commands_are_refused_by_the_worker_and_where_expressible_by_the_schema() {
    let v = validator("command.schema.json");
    let ok = json!({"org_unit_ext_id": "E-1", "org_unit_name": "Team", "org_unit_parent_id": 1000});
    let with = |field: &str, value: Value| {
        let mut c = ok.clone();
        c[field] = value;
        c.to_string()
    };
    let without = |field: &str| {
        let mut c = ok.clone();
        c.as_object_mut().map(|o| o.remove(field));
        c.to_string()
    };
    // (label, body, expressible in JSON Schema)
    let corpus: Vec<(&str, String, bool)> = vec![
        ("array", "[1,2,3]".into(), true),
        ("missing ext id", without("org_unit_ext_id"), true),
        ("missing name", without("org_unit_name"), true),
        ("missing parent", without("org_unit_parent_id"), true),
        ("empty ext id", with("org_unit_ext_id", json!("")), true),
        ("129-character ext id", with("org_unit_ext_id", json!("x".repeat(129))), true),
        ("control character in ext id", with("org_unit_ext_id", json!("a\u{1}b")), true),
        ("blank ext id", with("org_unit_ext_id", json!("   ")), true),
        ("tab-only ext id", with("org_unit_ext_id", json!("\t")), true),
        ("blank name", with("org_unit_name", json!("   ")), true),
        ("256-character name", with("org_unit_name", json!("n".repeat(256))), true),
        ("string parent", with("org_unit_parent_id", json!("1000")), true),
        ("negative parent", with("org_unit_parent_id", json!(-5)), true),
        ("string billing id", with("billing_id", json!("12")), true),
        ("number city", with("city", json!(5)), true),
        (
            "parent and its alias",
            with("parent_org_unit_id", json!(1000)),
            true,
        ),
        ("null ext id", with("org_unit_ext_id", json!(null)), true),
        // Not expressible in JSON Schema: the worker alone refuses these.
        ("not JSON", "this is not json".into(), false),
        (
            "duplicate key",
            r#"{"org_unit_ext_id":"E-1","org_unit_ext_id":"E-2","org_unit_name":"T","org_unit_parent_id":1}"#.into(),
            false,
        ),
        ("invisible-only ext id", with("org_unit_ext_id", json!("\u{200b}\u{feff}")), false),
        ("NUL in city", with("city", json!("a\u{0}b")), false),
        ("1000.0 as the parent", with("org_unit_parent_id", json!(1000.0)), false),
        ("zero-width-space name", with("org_unit_name", json!("\u{200b}")), false),
        (
            "70 KiB body",
            with("pad", json!("x".repeat(70 * 1024))),
            false,
        ),
    ];
    for (label, body, expressible) in &corpus {
        assert!(
            group_provisioner::command::CreateGroup::parse(body.as_bytes()).is_err(),
            "the worker accepted {label}"
        );
        if *expressible {
            let value: Value = serde_json::from_str(body).expect("expressible cases are JSON");
            assert!(!v.is_valid(&value), "the schema accepted {label}");
        }
    }
    assert!(v.is_valid(&ok));
    // The alias alone is fine; nulls for optional fields mean absent.
    let alias = json!({"org_unit_ext_id": "E-1", "org_unit_name": "T", "parent_org_unit_id": 7, "city": null});
    assert!(v.is_valid(&alias), "{:?}", errors(&v, &alias));
    assert!(group_provisioner::command::CreateGroup::parse(alias.to_string().as_bytes()).is_ok());
}

/// Every `$ref` of a document: (where it is, the reference).
fn refs(y: &yaml_rust2::Yaml, at: &str, out: &mut Vec<(String, String)>) {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Hash(h) => {
            for (k, v) in h {
                let key = k.as_str().unwrap_or("?");
                if key == "$ref" {
                    out.push((at.to_owned(), v.as_str().unwrap_or("").to_owned()));
                } else {
                    refs(v, &format!("{at}/{key}"), out);
                }
            }
        }
        Yaml::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                refs(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn resolve<'a>(doc: &'a yaml_rust2::Yaml, pointer: &str) -> Option<&'a yaml_rust2::Yaml> {
    pointer
        .trim_start_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .try_fold(doc, |node, part| {
            let part = part.replace("~1", "/").replace("~0", "~");
            let next = &node[part.as_str()];
            (!next.is_badvalue()).then_some(next)
        })
}

#[test]
fn the_asyncapi_document_parses_and_points_only_at_what_exists() {
    let path = root().join("docs/asyncapi.yaml");
    let text = std::fs::read_to_string(&path).expect("docs/asyncapi.yaml");
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("asyncapi.yaml parses");
    let doc = &docs[0];
    assert_eq!(doc["asyncapi"].as_str(), Some("3.1.0"));
    for channel in ["commands", "events", "workQueue", "replyTo"] {
        assert!(!doc["channels"][channel].is_badvalue(), "channel {channel}");
    }
    assert_eq!(
        doc["channels"]["commands"]["address"].as_str(),
        Some("provisioning")
    );
    assert_eq!(
        doc["channels"]["events"]["address"].as_str(),
        Some("provisioning.events")
    );
    let mut found = Vec::new();
    refs(doc, "", &mut found);
    assert!(found.len() >= 10, "{found:?}");
    let mut files = 0;
    for (at, reference) in &found {
        if let Some(pointer) = reference.strip_prefix('#') {
            assert!(
                resolve(doc, pointer).is_some(),
                "{at}: {reference} resolves to nothing"
            );
        } else {
            let file = path.parent().unwrap_or(Path::new(".")).join(reference);
            let schema: Value = serde_json::from_str(
                &std::fs::read_to_string(&file)
                    .unwrap_or_else(|e| panic!("{at}: {reference}: {e}")),
            )
            .unwrap_or_else(|e| panic!("{at}: {reference} is not JSON: {e}"));
            assert!(
                jsonschema::meta::is_valid(&schema),
                "{reference} is not a valid schema"
            );
            files += 1;
        }
    }
    assert_eq!(files, 3, "the command and both events");

    // Every message has examples, and each fits its payload schema.
    let messages = doc["components"]["messages"]
        .as_hash()
        .expect("components.messages");
    for (name, message) in messages {
        let name = name.as_str().unwrap_or("?");
        let schema_file = message["payload"]["$ref"].as_str().expect("payload $ref");
        let schema = validator(schema_file.trim_start_matches("./schemas/"));
        let examples = message["examples"]
            .as_vec()
            .unwrap_or_else(|| panic!("{name}: no examples"));
        assert!(!examples.is_empty(), "{name}: no examples");
        for example in examples {
            let payload = yaml_to_json(&example["payload"]);
            assert!(
                schema.is_valid(&payload),
                "{name}: example {:?} does not fit {schema_file}: {:?}",
                example["name"].as_str(),
                errors(&schema, &payload)
            );
        }
    }
}

/// A YAML value as JSON (what the examples mean).
fn yaml_to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_owned(), yaml_to_json(v)))
                .collect(),
        ),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => r.parse::<f64>().map(|f| json!(f)).unwrap_or(Value::Null),
        Yaml::Boolean(b) => Value::Bool(*b),
        _ => Value::Null,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_command_prints_the_files() {
    let env = TestEnv::new().await;
    for (which, file) in [
        ("command", "command.schema.json"),
        ("created", "group.created.schema.json"),
        ("failed", "group.create.failed.schema.json"),
    ] {
        let o = cli(&env, &["schema", which], &[]).await;
        assert_eq!(o.status.code(), Some(0));
        let on_disk =
            std::fs::read_to_string(root().join("docs/schemas").join(file)).expect("schema file");
        assert_eq!(stdout(&o), on_disk, "{which}");
    }
    env.cleanup().await;
}

/// The minimal publishers of docs/contract.md §7, run as a newcomer would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_publishers_get_a_group_created() {
    let env = TestEnv::new().await;
    let mut events = env.event_tap().await;
    let worker = env.spawn_worker().await;
    let url = amqp_env(&env.settings.amqp.url);

    let python = tokio::process::Command::new("python3")
        .arg(root().join("examples/publish.py"))
        .args(["PY-1", "From Python", "1000"])
        .env("AMQP_URL", &url)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        python.status.success(),
        "examples/publish.py (pika installed? scripts/test.sh installs it): {}",
        String::from_utf8_lossy(&python.stderr)
    );

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let rust = tokio::process::Command::new(cargo)
        .args([
            "run",
            "--quiet",
            "--example",
            "publish",
            "--",
            "RS-1",
            "From Rust",
            "1000",
        ])
        .current_dir(root())
        .env("AMQP_URL", &url)
        .output()
        .await
        .expect("cargo runs");
    assert!(
        rust.status.success(),
        "examples/publish.rs: {}",
        String::from_utf8_lossy(&rust.stderr)
    );

    let mut created: Vec<String> = events
        .take(2, Duration::from_secs(60))
        .await
        .iter()
        .map(|e| {
            assert_eq!(e.routing_key, "group.created", "{}", e.body);
            e.body["ext_id"].as_str().unwrap_or("?").to_owned()
        })
        .collect();
    created.sort();
    assert_eq!(created, ["PY-1", "RS-1"]);

    // A wrong routing key is reported, not lost silently.
    let wrong = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, pika\n\
             c = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))\n\
             ch = c.channel(); ch.confirm_delivery()\n\
             try:\n    ch.basic_publish('provisioning', 'group.crate', b'{}', mandatory=True)\n\
             except pika.exceptions.UnroutableError:\n    sys.exit(3)\n",
        )
        .arg(&url)
        .output()
        .await
        .expect("python3 runs");
    assert_eq!(
        wrong.status.code(),
        Some(3),
        "mandatory + confirms catch a typo"
    );
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

//! Deployment artefacts (deploy/, Dockerfile, docker-compose.yml): they must load and must
//! only name things that exist. Docker is not available here, so images are not built;
//! everything else is checked.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use group_provisioner::config::{Credentials, KEYS_WITHOUT_DEFAULT, Settings, Sources, defaults};
use serde_json::{Value, json};
use yaml_rust2::{Yaml, YamlLoader};

use crate::helpers::*;
use crate::process::help;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn yaml_files() -> Vec<String> {
    let mut out = vec!["docker-compose.yml".to_owned()];
    for dir in [
        "deploy/kubernetes",
        "deploy/kubernetes/examples",
        "deploy/kubernetes/with-operators",
        "deploy/compose",
        "deploy/prometheus",
    ] {
        for entry in std::fs::read_dir(root().join(dir)).expect("dir") {
            let path = entry.expect("entry").path();
            if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(format!(
                    "{dir}/{}",
                    path.file_name().and_then(|n| n.to_str()).expect("name")
                ));
            }
        }
    }
    out
}

/// `PROVISIONER__API__TOKEN` → is `api.token` a real key?
fn assert_env_key(var: &str, origin: &str) {
    let Some(rest) = var.strip_prefix("PROVISIONER__") else {
        return;
    };
    let key = rest.to_lowercase().replace("__", ".");
    assert!(
        defaults().iter().any(|(k, _)| *k == key) || KEYS_WITHOUT_DEFAULT.contains(&key.as_str()),
        "{origin}: {var} is not a configuration key ({key})"
    );
}

/// A command line for one of our binaries: the binary, its subcommand and flags exist.
fn assert_command(bin: &str, args: &[String], origin: &str) {
    match bin {
        "group-provisioner" => {
            let sub = args
                .first()
                .unwrap_or_else(|| panic!("{origin}: no subcommand"));
            let text = help(bin, &[sub]);
            for flag in args.iter().filter(|a| a.starts_with("--")) {
                assert!(
                    text.contains(flag.as_str()) || flag == "--config",
                    "{origin}: {bin} {sub} has no {flag}"
                );
            }
        }
        "convirza-sim" => {
            let text = help(bin, &[]);
            for flag in args.iter().filter(|a| a.starts_with("--")) {
                assert!(
                    text.contains(flag.as_str()),
                    "{origin}: convirza-sim has no {flag}"
                );
            }
        }
        other => panic!("{origin}: {other} is not one of our binaries"),
    }
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_yaml_file_parses() {
    let files = yaml_files();
    assert!(files.len() >= 7, "{files:?}");
    for f in files {
        let docs = yaml(&f);
        assert!(
            !docs.is_empty() && docs.iter().all(|d| !d.is_badvalue()),
            "{f} is empty"
        );
    }
}

#[test]
fn compose_names_only_real_binaries_keys_and_files() {
    let doc = &yaml("docker-compose.yml")[0];
    let services = doc["services"].as_hash().expect("services");
    for want in ["rabbitmq", "redis", "convirza-sim", "worker"] {
        assert!(
            services.contains_key(&Yaml::from_str(want)),
            "compose lacks {want}"
        );
    }
    let mut ours = 0;
    for (name, svc) in services {
        let name = name.as_str().expect("name");
        if let Some(env) = svc["environment"].as_hash() {
            for (k, _) in env {
                assert_env_key(k.as_str().expect("env key"), &format!("compose {name}"));
            }
        }
        for vol in strings(&svc["volumes"]) {
            if let Some(local) = vol.strip_prefix("./") {
                let local = local.split(':').next().expect("path");
                assert!(
                    root().join(local).exists(),
                    "compose {name}: {local} does not exist"
                );
            }
        }
        if svc["image"].as_str() == Some("group-provisioner:local") {
            ours += 1;
            let bin = strings(&svc["entrypoint"])
                .first()
                .cloned()
                .unwrap_or_else(|| "group-provisioner".into());
            assert_command(&bin, &strings(&svc["command"]), &format!("compose {name}"));
            assert!(
                svc["healthcheck"]["test"].as_vec().is_some(),
                "compose {name}: no healthcheck"
            );
        }
    }
    assert_eq!(ours, 2, "the worker and the simulator run our image");
    let broker = doc["services"]["rabbitmq"]["image"].as_str().unwrap_or("");
    assert!(
        broker.starts_with("rabbitmq:4."),
        "a supported RabbitMQ (4.x), not {broker:?}"
    );
    let worker = &doc["services"]["worker"];
    assert_eq!(worker["deploy"]["replicas"].as_i64(), Some(2));
    for dep in ["rabbitmq", "redis", "convirza-sim"] {
        assert_eq!(
            worker["depends_on"][dep]["condition"].as_str(),
            Some("service_healthy"),
            "worker waits for {dep}"
        );
    }
    assert!(
        read("deploy/compose/rabbitmq.conf")
            .contains("definitions.local.path = /etc/rabbitmq/definitions.d")
    );
    assert!(
        doc["services"]["redis"]["command"]
            .as_vec()
            .expect("redis command")
            .iter()
            .any(|a| a.as_str() == Some("--appendonly"))
    );
}

#[test]
fn dockerfile_ships_both_binaries_non_root_without_secrets() {
    let text = read("Dockerfile");
    assert!(
        text.contains("target/release/group-provisioner")
            && text.contains("target/release/convirza-sim")
    );
    assert!(text.contains("USER 10001"));
    assert!(text.contains("HEALTHCHECK"));
    for line in text.lines().filter(|l| l.trim_start().starts_with("ENV ")) {
        for var in line.split_whitespace().skip(1) {
            assert_env_key(var.split('=').next().expect("name"), "Dockerfile");
            assert!(
                !var.contains("TOKEN") && !var.contains("PASSWORD"),
                "secret baked into the image: {var}"
            );
        }
    }
}

fn by_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// `kubectl apply -k deploy/kubernetes` applies the worker's objects and nothing that needs
/// an operator's CRDs or a secret value; `with-operators/` adds the KEDA and Prometheus
/// objects; every manifest belongs to one of them (the secret is an example only).
#[test]
fn kustomizations_apply_everything_but_the_example_secret() {
    let base = &yaml("deploy/kubernetes/kustomization.yaml")[0];
    let listed = |k: &Yaml| -> Vec<String> {
        k["resources"]
            .as_vec()
            .expect("resources")
            .iter()
            .map(|r| r.as_str().expect("a path").to_owned())
            .collect()
    };
    let base_files = listed(base);
    let mut kinds = Vec::new();
    for file in &base_files {
        assert!(
            root().join("deploy/kubernetes").join(file).is_file(),
            "{file}"
        );
        for doc in yaml(&format!("deploy/kubernetes/{file}")) {
            kinds.push(doc["kind"].as_str().expect("kind").to_owned());
        }
    }
    for kind in [
        "Secret",
        "ScaledObject",
        "TriggerAuthentication",
        "PrometheusRule",
    ] {
        assert!(
            !kinds.iter().any(|k| k == kind),
            "the base applies a {kind}"
        );
    }
    let with = listed(&yaml("deploy/kubernetes/with-operators/kustomization.yaml")[0]);
    assert!(with.contains(&"..".to_owned()));
    for file in &with {
        assert!(
            root()
                .join("deploy/kubernetes/with-operators")
                .join(file)
                .exists(),
            "{file}"
        );
    }
    let mut covered: Vec<String> = base_files.clone();
    covered.extend(
        with.iter()
            .filter_map(|f| f.strip_prefix("../").map(str::to_owned)),
    );
    for entry in std::fs::read_dir(root().join("deploy/kubernetes")).expect("dir") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(covered.contains(&name), "{name} is in no kustomization");
        }
    }
    // The image every manifest names is the one the kustomization replaces.
    let image = base["images"][0]["name"].as_str().expect("image name");
    assert!(read("deploy/kubernetes/deployment.yaml").contains(&format!("image: {image}:")));
}

#[test]
fn kubernetes_manifests_fit_the_worker() {
    // ConfigMap: the TOML is a valid configuration (credentials come from the Secret).
    let cm = yaml("deploy/kubernetes/configmap.yaml");
    let toml = cm[0]["data"]["provisioner.toml"]
        .as_str()
        .expect("provisioner.toml");
    let settings = Settings::from_sources(Sources {
        toml: Some(toml.to_owned()),
        env: Some(Default::default()),
        credentials: Credentials::Optional,
        ..Sources::default()
    })
    .unwrap_or_else(|e| panic!("configmap TOML: {e}"));

    for doc in yaml("deploy/kubernetes/examples/secret.example.yaml") {
        if let Some(data) = doc["stringData"].as_hash() {
            for (k, _) in data {
                assert_env_key(k.as_str().expect("key"), "secret.example.yaml");
            }
        }
    }

    let dep = &yaml("deploy/kubernetes/deployment.yaml")[0];
    let spec = &dep["spec"];
    assert!(spec["replicas"].as_i64().expect("replicas") >= 2);
    let pod = &spec["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace period");
    assert!(
        Duration::from_secs(grace as u64)
            > settings.shutdown.drain_timeout + Duration::from_secs(5),
        "grace {grace}s vs drain"
    );
    for c in pod["containers"]
        .as_vec()
        .expect("containers")
        .iter()
        .chain(pod["initContainers"].as_vec().expect("init"))
    {
        assert_command("group-provisioner", &strings(&c["args"]), "deployment");
    }
    let worker = &pod["containers"][0];
    assert_eq!(
        worker["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        worker["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        worker["ports"][0]["containerPort"].as_i64(),
        Some(i64::from(settings.metrics.listen.port()))
    );
    let res = &worker["resources"];
    for v in [
        &res["requests"]["cpu"],
        &res["requests"]["memory"],
        &res["limits"]["memory"],
    ] {
        let s = v
            .as_str()
            .map(str::to_owned)
            .or_else(|| v.as_i64().map(|n| n.to_string()))
            .expect("resource set");
        assert!(
            s.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "resource placeholder left: {s}"
        );
    }

    let keda = yaml("deploy/kubernetes/keda-scaledobject.yaml");
    let so = by_kind(&keda, "ScaledObject");
    assert_eq!(
        so["spec"]["scaleTargetRef"]["name"].as_str(),
        dep["metadata"]["name"].as_str()
    );
    assert_eq!(
        so["spec"]["triggers"][0]["metadata"]["queueName"].as_str(),
        Some(settings.topology.work_queue.as_str())
    );
    assert!(so["spec"]["minReplicaCount"].as_i64().expect("min") >= 2);

    let pdb = &yaml("deploy/kubernetes/pdb.yaml")[0];
    assert_eq!(pdb["spec"]["minAvailable"].as_i64(), Some(1));

    // Alert rules only use metrics the worker exports.
    // Every family observed once, so each exports its samples (OpenMetrics names a
    // counter `x` in `# TYPE` and `x_total` in its samples: alerts use the samples).
    let names = exported_metric_names();
    let rules = &yaml("deploy/kubernetes/prometheus-rules.yaml")[0];
    let mut used = BTreeSet::new();
    for rule in rules["spec"]["groups"][0]["rules"].as_vec().expect("rules") {
        let expr = rule["expr"].as_str().expect("expr");
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("provisioner_") {
                assert!(names.contains(word), "alert uses unknown metric {word}");
                used.insert(word.to_owned());
            }
        }
    }
    for needed in [
        "provisioner_dead_letters_total",
        "provisioner_circuit_open",
        "provisioner_commands_total",
    ] {
        assert!(used.contains(needed), "no alert on {needed}");
    }
}

/// Every alert says what happened and what to do (summary, description), and links its
/// own section of the runbook, which exists.
#[test]
fn every_alert_has_its_texts_and_its_runbook_section() {
    let rules = &yaml("deploy/kubernetes/prometheus-rules.yaml")[0];
    let runbook = read("docs/operations.md");
    for rule in rules["spec"]["groups"][0]["rules"].as_vec().expect("rules") {
        let name = rule["alert"].as_str().expect("alert");
        let a = &rule["annotations"];
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                a[key].as_str().is_some_and(|t| !t.trim().is_empty()),
                "{name} has no {key}"
            );
        }
        let url = a["runbook_url"].as_str().unwrap_or_default();
        let anchor = url
            .strip_prefix("https://group-provisioner.example/docs/operations.md#")
            .unwrap_or_else(|| panic!("{name}: {url} is not a section of docs/operations.md"));
        assert_eq!(anchor, format!("alert-{}", name.to_lowercase()));
        assert!(
            runbook.contains(&format!("<a id=\"{anchor}\"></a>\n#### {name} (")),
            "docs/operations.md has no section for {name}"
        );
    }
}

/// Every metric name the worker's `/metrics` exports (histograms with a sample, so their
/// `_bucket`/`_sum`/`_count` series appear).
fn exported_metric_names() -> HashSet<String> {
    let metrics = group_provisioner::metrics::Metrics::new();
    metrics.set_redis_policy("noeviction");
    metrics.api_request(
        group_provisioner::convirza::Operation::CreateGroup,
        Some(201),
        Duration::from_millis(5),
    );
    metrics
        .render(false)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// RabbitMQ's documented Prometheus metric names the dashboard may use (rabbitmq_prometheus,
/// per-object metrics).
const RABBITMQ_METRICS: [&str; 3] = [
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
];

#[test]
fn the_grafana_dashboard_parses_and_uses_only_metrics_that_exist() {
    let names = exported_metric_names();
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/group-provisioner.json")).expect("JSON");
    assert_eq!(dashboard["uid"], "group-provisioner");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut used = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("provisioner_") {
                    assert!(names.contains(word), "dashboard uses unknown metric {word}");
                    used.insert(word.to_owned());
                } else if word.starts_with("rabbitmq_") {
                    assert!(
                        RABBITMQ_METRICS.contains(&word),
                        "not a documented RabbitMQ metric: {word}"
                    );
                    used.insert(word.to_owned());
                }
            }
        }
    }
    for needed in [
        "provisioner_commands_total",
        "provisioner_api_request_duration_seconds_bucket",
        "provisioner_api_requests_total",
        "provisioner_circuit_open",
        "provisioner_in_flight",
        "provisioner_retries_total",
        "provisioner_deferrals_total",
        "provisioner_unrouted_events",
        "rabbitmq_queue_messages",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

async fn import_definitions(vhost: &str, definitions: &Value) {
    let r = reqwest::Client::new()
        .post(format!("{MANAGEMENT}/api/definitions/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .json(definitions)
        .send()
        .await
        .expect("management API");
    assert!(
        r.status().is_success(),
        "import definitions: {} {}",
        r.status(),
        r.text().await.unwrap_or_default()
    );
}

async fn queue_names(vhost: &str) -> BTreeSet<String> {
    let list: Vec<Value> = reqwest::Client::new()
        .get(format!("{MANAGEMENT}/api/queues/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API")
        .json()
        .await
        .expect("json");
    list.iter()
        .filter_map(|q| q["name"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_load_into_a_fresh_vhost_and_the_worker_runs_on_them() {
    let mut env = TestEnv::new().await;
    let definitions: Value =
        serde_json::from_str(&read("deploy/rabbitmq/definitions.json")).expect("JSON");
    import_definitions(&env.vhost, &definitions).await;
    let defined: BTreeSet<String> = definitions["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .filter_map(|q| q["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(queue_names(&env.vhost).await, defined);

    // The worker, with the default tiers, declares over the imported topology: any
    // difference in arguments would make the broker refuse and the worker never consume.
    env.settings.retry.delays = Settings::from_toml("[api]\ntoken = \"t\"\n")
        .expect("defaults")
        .retry
        .delays;
    let worker = env.spawn_worker().await;
    let mut events = env.event_tap().await;
    env.send(&json!({"org_unit_ext_id": "DEF-1", "org_unit_name": "From definitions", "org_unit_parent_id": 1000})).await;
    let e = events.next(Duration::from_secs(20)).await;
    assert_eq!(e.routing_key, "group.created");
    let mut after = queue_names(&env.vhost).await;
    after.retain(|q| !q.starts_with("events-"));
    assert_eq!(
        after, defined,
        "the worker declared nothing beyond the definitions"
    );
    worker.shutdown();
    worker.join().await;
    env.cleanup().await;
}

#[test]
fn paths_in_docs_exist() {
    for doc in ["README.md", "docs/deployment.md", "docs/operations.md"] {
        let text = read(doc);
        for path in [
            "deploy/rabbitmq/definitions.json",
            "deploy/kubernetes/",
            "docker-compose.yml",
            "scripts/bench-resources.sh",
        ] {
            if text.contains(path) {
                assert!(
                    Path::new(&root().join(path.trim_end_matches('/'))).exists(),
                    "{doc} names {path}"
                );
            }
        }
    }
}

/// The commit this checkout is at, as `build.rs` finds it (`unknown` without git).
fn head_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[test]
fn version_prints_the_version_and_the_commit() {
    let out = std::process::Command::new(crate::process::BIN)
        .arg("--version")
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "group-provisioner {} (commit {})",
            env!("CARGO_PKG_VERSION"),
            head_commit()
        )
    );
}

/// Backticked spans of a Markdown text.
fn code_spans(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The changelog only names config keys, metrics, alerts, subcommands and flags that exist,
/// and its newest release (below an `Unreleased` section, if any) is the crate's version,
/// which the image labels and the Kubernetes manifests use too.
#[test]
fn the_changelog_names_only_what_exists_and_the_version_is_one_everywhere() {
    let changelog = read("CHANGELOG.md");
    let version = env!("CARGO_PKG_VERSION");
    let newest = changelog
        .lines()
        .filter_map(|l| l.strip_prefix("## ["))
        .filter_map(|l| l.split(']').next())
        .find(|v| *v != "Unreleased");
    assert_eq!(newest, Some(version), "CHANGELOG.md's newest release");
    assert!(
        read("Dockerfile").contains(&format!("org.opencontainers.image.version=\"{version}\"")),
        "the Dockerfile's version label"
    );
    for label in ["revision", "source"] {
        assert!(read("Dockerfile").contains(&format!("org.opencontainers.image.{label}=")));
    }
    assert!(
        read("deploy/kubernetes/kustomization.yaml").contains(&format!("newTag: \"{version}\""))
    );

    let keys: HashSet<String> = defaults()
        .into_iter()
        .map(|(k, _)| k)
        .chain(KEYS_WITHOUT_DEFAULT.iter().map(|k| (*k).to_owned()))
        .collect();
    let sections: HashSet<&str> = keys.iter().filter_map(|k| k.split('.').next()).collect();
    let metrics = exported_metric_names();
    let rules = read("deploy/kubernetes/prometheus-rules.yaml");
    let top_help = help("group-provisioner", &[]);
    let (mut named_keys, mut named_metrics) = (0, 0);
    for span in code_spans(&changelog) {
        let first = span.split([' ', '{']).next().unwrap_or_default();
        if first
            .split('.')
            .next()
            .is_some_and(|s| sections.contains(s))
            && first.contains('.')
            && first
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
        {
            assert!(
                keys.contains(first),
                "CHANGELOG.md names config key {first}: unknown"
            );
            named_keys += 1;
        }
        if first.starts_with("provisioner_") {
            assert!(
                metrics.contains(first),
                "CHANGELOG.md names metric {first}: unknown"
            );
            named_metrics += 1;
        }
        // A subcommand and its flags, e.g. `check --no-declare`, `dlq discard --export`.
        let words: Vec<&str> = span.split(' ').collect();
        let path: Vec<&str> = words
            .iter()
            .take_while(|w| {
                w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-')
            })
            .copied()
            .collect();
        if path.first().is_some_and(|w| {
            top_help
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{w} ")))
        }) {
            let sub_help = help("group-provisioner", &path);
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                assert!(
                    sub_help.contains(*flag),
                    "CHANGELOG.md: `{span}`: no {flag}"
                );
            }
        }
    }
    for word in changelog.split(|c: char| !c.is_ascii_alphanumeric()) {
        if word.starts_with("Provisioner") && word.len() > "Provisioner".len() {
            assert!(
                rules.contains(&format!("alert: {word}")),
                "CHANGELOG.md names alert {word}: unknown"
            );
        }
    }
    assert!(
        named_keys >= 4 && named_metrics >= 4,
        "the check found the names"
    );
}

//! Configuration loading: defaults, layering, every error message, documentation.

use super::*;
use crate::secret::ExposeSecret;

const TOKEN: &str = "[api]\ntoken = \"t\"\n";

fn with_env(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::from_sources(Sources {
        toml: Some(TOKEN.into()),
        env: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Sources::default()
    })
}

fn err(toml: &str) -> ConfigError {
    Settings::from_sources(Sources {
        toml: Some(toml.into()),
        env: Some(HashMap::from([(
            "PROVISIONER__API__TOKEN".to_string(),
            "t".to_string(),
        )])),
        ..Sources::default()
    })
    .expect_err("should be rejected")
}

#[test]
fn defaults_match_the_spec() {
    let s = Settings::from_toml(TOKEN).expect("defaults load");
    assert_eq!(
        s.amqp.url.first().expose(),
        "amqp://guest:guest@127.0.0.1:5672/%2f"
    );
    assert_eq!(s.amqp.url.urls().len(), 1);
    assert_eq!(s.amqp.prefetch, 64);
    assert_eq!(s.redis.url.expose(), "redis://127.0.0.1:6379/0");
    assert_eq!(s.redis.key_prefix, "provisioner");
    assert_eq!(s.api.base_url, "https://platform-api.convirza.com/v3");
    assert!(matches!(&s.api.auth, Some(ApiAuth::Token(t)) if t.expose_secret() == "t"));
    assert_eq!(s.api.auth_url, "https://platform-oauth.convirza.com");
    assert_eq!(s.api.timeout, Duration::from_secs(15));
    assert_eq!(s.retry.initial, Duration::from_millis(250));
    assert_eq!(s.retry.multiplier, 2.0);
    assert_eq!(s.retry.max_interval, Duration::from_secs(10));
    assert_eq!(s.retry.max_tries, 4);
    let labels: Vec<_> = s.retry.delays.iter().map(|t| t.label.as_str()).collect();
    assert_eq!(labels, ["5s", "30s", "2m", "10m", "30m"]);
    assert_eq!(s.retry.delays[4].delay, Duration::from_secs(1800));
    assert_eq!(s.circuit.failure_threshold, 10);
    assert_eq!(s.circuit.cooldown, Duration::from_secs(30));
    assert_eq!(s.dedup.ttl, Duration::from_secs(30 * 86_400));
    assert_eq!(s.dedup.lease, Duration::from_secs(60));
    assert_eq!(s.shutdown.drain_timeout, Duration::from_secs(30));
    assert_eq!(s.metrics.listen.to_string(), "127.0.0.1:9464");
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.log.level, "info");
    assert_eq!(s.topology.command_exchange, "provisioning");
    assert_eq!(s.topology.command_routing_key, "group.create");
    assert_eq!(s.topology.work_queue, "provisioning.group.create");
    assert_eq!(s.topology.dead_letter_exchange, "provisioning.dlx");
    assert_eq!(
        s.topology.dead_letter_queue,
        "provisioning.group.create.dlq"
    );
    assert_eq!(s.topology.event_exchange, "provisioning.events");
    assert_eq!(s.topology.created_routing_key, "group.created");
    assert_eq!(s.topology.failed_routing_key, "group.create.failed");
    assert_eq!(s.topology.delivery_limit, 10);
    assert_eq!(
        s.topology.delay_queue(&s.retry.delays[0]),
        "provisioning.group.create.retry.5s"
    );
}

#[test]
fn toml_then_env_layering() {
    let s = Settings::from_sources(Sources {
        toml: Some(
            "[api]\ntoken = \"file\"\n[amqp]\nprefetch = 8\n[retry]\ndelays = [\"1s\", \"2s\"]\n"
                .into(),
        ),
        env: Some(HashMap::from([
            ("PROVISIONER__AMQP__PREFETCH".to_string(), "16".to_string()),
            (
                "PROVISIONER__REDIS__KEY_PREFIX".to_string(),
                "t1".to_string(),
            ),
        ])),
        ..Sources::default()
    })
    .expect("loads");
    assert_eq!(s.amqp.prefetch, 16, "env wins over the file");
    assert_eq!(s.redis.key_prefix, "t1");
    assert!(matches!(&s.api.auth, Some(ApiAuth::Token(t)) if t.expose_secret() == "file"));
    let labels: Vec<_> = s.retry.delays.iter().map(|t| t.label.clone()).collect();
    assert_eq!(labels, ["1s", "2s"]);
}

#[test]
fn amqp_url_is_one_node_or_several() {
    let nodes = |s: &Settings| -> Vec<String> {
        s.amqp
            .url
            .urls()
            .iter()
            .map(|u| u.expose().to_owned())
            .collect()
    };
    // The environment form: commas split where the next URL starts, not inside a password.
    let s = with_env(&[(
        "PROVISIONER__AMQP__URL",
        "amqp://u:p,w@a:5672/v, amqps://u:p@b:5671/v,amqp://c/v",
    )])
    .expect("loads");
    assert_eq!(
        nodes(&s),
        [
            "amqp://u:p,w@a:5672/v",
            "amqps://u:p@b:5671/v",
            "amqp://c/v"
        ]
    );
    // Shown without a password.
    assert_eq!(
        s.amqp.url.to_string(),
        "amqp://u:***@a:5672/v, amqps://u:***@b:5671/v, amqp://c/v"
    );
    let s = Settings::from_toml(
        "[amqp]\nurl = [\"amqp://a/v\", \"amqp://b/v\"]\n[api]\ntoken = \"t\"\n",
    )
    .expect("loads");
    assert_eq!(nodes(&s), ["amqp://a/v", "amqp://b/v"]);
    // A stray comma, or one inside an unencoded password: refused, never quoted.
    for (value, reason) in [
        ("amqp://h1/%2f,", "entry 2 of 2 is empty"),
        ("amqp://h1/%2f,,amqp://h2/%2f", "entry 2 of 3 is empty"),
        ("amqp://u:p,w://x@h/v", "entry 1 of 2 is not a valid URL"),
    ] {
        let e = with_env(&[("PROVISIONER__AMQP__URL", value)]).expect_err(value);
        assert_eq!(e.key, "amqp.url", "{e}");
        assert!(e.to_string().contains(reason), "{value}: {e}");
        assert!(!e.to_string().contains("u:p"), "{e}");
    }
    for (toml, reason) in [
        ("[amqp]\nurl = []\n", "at least one"),
        (
            "[amqp]\nurl = [\"amqp://a/v\", \"http://b\"]\n",
            "scheme amqp or amqps",
        ),
    ] {
        let e = Settings::from_toml(&format!("{toml}[api]\ntoken = \"t\"\n")).expect_err(toml);
        assert_eq!(e.key, "amqp.url", "{e}");
        assert!(e.to_string().contains(reason), "{e}");
    }
}

#[test]
fn lists_from_env_are_comma_separated() {
    let s = with_env(&[("PROVISIONER__RETRY__DELAYS", "5s,30s,2m")]).expect("loads");
    let labels: Vec<_> = s.retry.delays.iter().map(|t| t.label.clone()).collect();
    assert_eq!(labels, ["5s", "30s", "2m"]);
    let one = with_env(&[("PROVISIONER__RETRY__DELAYS", "1s")]).expect("loads");
    assert_eq!(one.retry.delays.len(), 1);
    assert_eq!(
        one.topology.delay_queue(&one.retry.delays[0]),
        "provisioning.group.create.retry.1s"
    );
}

#[test]
fn bad_values_name_the_key_and_value() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[api]\ntimeout = \"5 parsecs\"\n",
            "api.timeout",
            "\"5 parsecs\" is not a duration",
        ),
        ("[amqp]\nprefetch = 0\n", "amqp.prefetch", "out of range"),
        (
            "[amqp]\nprefetch = \"many\"\n",
            "amqp.prefetch",
            "\"many\" is not an integer",
        ),
        (
            "[amqp]\nurl = \"http://x\"\n",
            "amqp.url",
            "scheme amqp or amqps",
        ),
        ("[redis]\nurl = \"nope\"\n", "redis.url", "not a URL"),
        (
            "[redis]\nurl = \"redis://h:6379/db\"\n",
            "redis.url",
            "not a Redis URL",
        ),
        (
            "[amqp]\nurl = \"amqp://h:notaport/x\"\n",
            "amqp.url",
            "not a",
        ),
        (
            "[retry]\ndelays = [\"5s\", \"soon\"]\n",
            "retry.delays",
            "\"soon\" is not a duration",
        ),
        ("[retry]\ndelays = []\n", "retry.delays", "at least one"),
        (
            "[retry]\ndelays = [\"5s\", \"5s\"]\n",
            "retry.delays",
            "twice",
        ),
        (
            "[retry]\nmax_tries = 0\n",
            "retry.max_tries",
            "out of range",
        ),
        (
            "[retry]\ninitial = \"20s\"\n",
            "retry.max_interval",
            "shorter than retry.initial",
        ),
        (
            "[metrics]\nlisten = \"localhost\"\n",
            "metrics.listen",
            "not a socket address",
        ),
        (
            "[log]\nformat = \"xml\"\n",
            "log.format",
            "\"xml\" is not one of json, pretty",
        ),
        ("[log]\nlevel = \"[[[\"\n", "log.level", "is not a level"),
        (
            "[api]\nauth = \"oauth\"\n",
            "api.auth",
            "\"oauth\" is not one of token, login",
        ),
        (
            "[dedup]\nttl = \"30s\"\nlease = \"60s\"\n",
            "dedup.ttl",
            "longer than dedup.lease",
        ),
        (
            "[topology]\nwork_queue = \"  \"\n",
            "topology.work_queue",
            "must not be empty",
        ),
        (
            "[retry]\ndelay = [\"5s\"]\n",
            "retry.delay",
            "unknown key (did you mean retry.delays?)",
        ),
        (
            "[circuit]\ncooldown = \"-1s\"\n",
            "circuit.cooldown",
            "not a duration",
        ),
        (
            "retry = 5\n",
            "retry",
            "is integer `5`, expected a section of keys",
        ),
        ("[retry.extra]\nx = 1\n", "retry.extra", "unknown key"),
        (
            "[amqp]\nkey_prefix = \"p\"\n",
            "amqp.key_prefix",
            "unknown key (did you mean redis.key_prefix?)",
        ),
        (
            "[retry]\ndelays = [5]\n",
            "retry.delays",
            "\"5\" is not a duration",
        ),
        (
            "[amqp]\nprefetch = 7.5\n",
            "amqp.prefetch",
            "7.5 is not an integer",
        ),
        ("[foo]\nx = 1\n", "foo", "unknown key"),
        (
            "[log]\nqueue_lines = 0\n",
            "log.queue_lines",
            "out of range",
        ),
        ("[foo]\nx = 1\n", "foo", "unknown key"),
        (
            "[amqp]\nperfetch = 1\n",
            "amqp.perfetch",
            "unknown key (did you mean amqp.prefetch?)",
        ),
    ];
    let long_dlq = format!("[topology]\ndead_letter_queue = \"{}\"\n", "q".repeat(250));
    let cases: Vec<(&str, &str, &str)> = cases
        .iter()
        .copied()
        .chain([(
            long_dlq.as_str(),
            "topology.dead_letter_queue",
            "at most 245",
        )])
        .collect();
    for (toml, key, reason) in &cases {
        let e = err(toml);
        assert_eq!(e.key, *key, "for {toml:?}: {e}");
        assert!(e.reason.contains(reason), "for {toml:?}: got {e}");
        assert!(e.to_string().starts_with(&format!("config error: {key}: ")));
    }
}

#[test]
fn bad_env_value_names_the_dotted_key() {
    let e = with_env(&[("PROVISIONER__API__TIMEOUT", "5 parsecs")]).expect_err("rejected");
    assert_eq!(
        e.to_string(),
        "config error: api.timeout: \"5 parsecs\" is not a duration (use e.g. 250ms, 5s, 2m, 1h, 30d)"
    );
    let e = with_env(&[("PROVISIONER__AMQP__PREFTECH", "5")]).expect_err("rejected");
    assert_eq!(e.key, "amqp.preftech");
}

#[test]
fn auth_mode_requirements() {
    let e = Settings::from_toml("").expect_err("token required");
    assert_eq!(e.key, "api.token");
    let e =
        Settings::from_toml("[api]\nauth = \"login\"\nemail = \"a@b.c\"\n").expect_err("password");
    assert_eq!(e.key, "api.password");
    let s = Settings::from_toml("[api]\nauth = \"login\"\nemail = \"a@b.c\"\npassword = \"pw\"\n")
        .expect("login config");
    match &s.api.auth {
        Some(ApiAuth::Login { email, password }) => {
            assert_eq!(email, "a@b.c");
            assert_eq!(password.expose_secret(), "pw");
        }
        other => panic!("{other:?}"),
    }
    // Commands that never call the API load without credentials.
    let s = Settings::from_sources(Sources {
        toml: Some("[api]\nauth = \"login\"\n".into()),
        env: Some(HashMap::new()),
        credentials: Credentials::Optional,
        ..Sources::default()
    })
    .expect("no credentials needed");
    assert!(s.api.auth.is_none());
}

#[test]
fn a_token_is_trimmed_and_a_blank_one_is_missing() {
    let s = with_env(&[("PROVISIONER__API__TOKEN", "tok-1\n")]).expect("loads");
    assert!(matches!(&s.api.auth, Some(ApiAuth::Token(t)) if t.expose_secret() == "tok-1"));
    let e = Settings::from_toml("[api]\ntoken = \"  \"\n").expect_err("blank token");
    assert_eq!(e.key, "api.token");
    let s =
        Settings::from_toml("[api]\nauth = \"login\"\nemail = \" a@b.c \"\npassword = \" pw \"\n")
            .expect("login");
    match &s.api.auth {
        Some(ApiAuth::Login { email, password }) => {
            assert_eq!(email, "a@b.c");
            assert_eq!(
                password.expose_secret(),
                " pw ",
                "a password is kept as given"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_whole_float_is_an_integer() {
    let s = Settings::from_toml("[api]\ntoken = \"t\"\n[amqp]\nprefetch = 8.0\n").expect("loads");
    assert_eq!(s.amqp.prefetch, 8);
}

#[test]
fn keys_are_case_insensitive_in_files_too() {
    let s = Settings::from_toml("[API]\nToken = \"t\"\n[Amqp]\nPREFETCH = 8\n").expect("loads");
    assert_eq!(s.amqp.prefetch, 8);
    assert!(s.api.auth.is_some());
}

#[test]
fn secrets_do_not_print() {
    let s = Settings::from_toml(
        "[api]\ntoken = \"tok-123\"\npassword = \"pw-456\"\n[amqp]\nurl = \"amqp://u:pw-789@h/%2f\"\n",
    )
    .expect("loads");
    let printed = format!("{s:?}");
    for secret in ["tok-123", "pw-456", "pw-789"] {
        assert!(!printed.contains(secret), "{secret} leaked: {printed}");
    }
}

#[test]
fn missing_explicit_file_is_an_error() {
    let e = Settings::from_sources(Sources {
        file: Some(PathBuf::from("/nonexistent/provisioner.toml")),
        env: Some(HashMap::new()),
        ..Sources::default()
    })
    .expect_err("missing file");
    assert_eq!(e.key, "--config");
}

/// A CA certificate and a key as PEM files in a fresh owner-only directory, removed
/// (with anything else put there) when the test ends, passed or failed.
struct PemFiles {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Drop for PemFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pem_files() -> PemFiles {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = std::env::temp_dir().join(format!("gp-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("dir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).expect("write cert");
    let mut key_file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&k)
        .expect("key file");
    std::io::Write::write_all(&mut key_file, key.serialize_pem().as_bytes()).expect("write key");
    PemFiles {
        dir,
        cert: c,
        key: k,
    }
}

/// Every key, with a value it accepts: its default, or a sample for keys without one (the
/// files it names live as long as the returned [`PemFiles`]).
fn every_key() -> (Vec<(String, String)>, PemFiles) {
    let mut keys = defaults();
    let pem = pem_files();
    let (cert, key) = (&pem.cert, &pem.key);
    keys.extend(KEYS_WITHOUT_DEFAULT.iter().map(|k| {
        let sample = if k.ends_with("nodes") {
            "redis://127.0.0.1:26379".to_owned()
        } else if k.ends_with("_url") {
            "http://127.0.0.1:15672".to_owned()
        } else if k.ends_with("key_file") {
            key.display().to_string()
        } else if k.ends_with("_file") {
            cert.display().to_string()
        } else {
            "ops@example.com".to_owned()
        };
        ((*k).to_owned(), sample)
    }));
    (keys, pem)
}

#[test]
fn redis_modes_need_their_nodes() {
    let load =
        |redis: &str| Settings::from_toml(&format!("[api]\ntoken = \"t\"\n[redis]\n{redis}"));
    let s = load("mode = \"sentinel\"\nnodes = \"redis://:sp@a:26379,redis://b:26379\"\nsentinel_master = \"mymaster\"\n")
        .expect("sentinel");
    assert_eq!(s.redis.mode, RedisMode::Sentinel);
    assert_eq!(s.redis.nodes.len(), 2);
    assert_eq!(
        s.redis.describe(),
        "master \"mymaster\" via sentinels redis://:***@a:26379, redis://b:26379"
    );
    let c = load("mode = \"cluster\"\nnodes = [\"redis://a:7000\", \"redis://b:7001\"]\n")
        .expect("cluster");
    assert_eq!(
        c.redis.describe(),
        "cluster via redis://a:7000, redis://b:7001"
    );
    for (redis, key, reason) in [
        ("mode = \"sentinel\"\n", "redis.nodes", "sentinels"),
        (
            "mode = \"sentinel\"\nnodes = \"redis://a:26379\"\n",
            "redis.sentinel_master",
            "is required",
        ),
        ("mode = \"cluster\"\n", "redis.nodes", "cluster nodes"),
        (
            "mode = \"cluster\"\nnodes = [\"http://a\"]\n",
            "redis.nodes",
            "scheme",
        ),
        (
            "mode = \"replicated\"\n",
            "redis.mode",
            "not one of standalone, sentinel, cluster",
        ),
    ] {
        let e = load(redis).expect_err(redis);
        assert_eq!(e.key, key, "{e}");
        assert!(e.to_string().contains(reason), "{e}");
    }
}

#[test]
fn tls_files_are_read_at_start_and_never_quoted() {
    let pem = pem_files();
    let (cert, key) = (pem.cert.clone(), pem.key.clone());
    let load = |extra: &str| {
        Settings::from_toml(&format!(
            "[api]\ntoken = \"t\"\n[amqp]\nurl = \"amqps://u:p@h/v\"\n[amqp.tls]\n{extra}"
        ))
    };
    let s = load(&format!(
        "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        cert, cert, key
    ))
    .expect("loads");
    assert!(s.amqp.tls.ca_pem.is_some() && s.amqp.tls.client.is_some());
    assert!(s.redis.tls.is_default());
    let shown = format!("{s:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(
        s.amqp
            .tls
            .state("amqps", ["amqps://h/v"])
            .starts_with("TLS: CA "),
        "{}",
        s.amqp.tls.state("amqps", ["amqps://h/v"])
    );
    assert!(
        s.amqp
            .tls
            .state("amqps", ["amqp://h/v"])
            .contains("amqps:// is needed")
    );

    let other = pem_files();
    let other_key = other.key.clone();
    // A secret that is not a certificate: named, never shown.
    let secret = pem.dir.join("secret.txt");
    std::fs::write(&secret, "hunter2-not-a-pem").expect("write");
    for (extra, key_name, reason) in [
        (
            format!("ca_file = {secret:?}\n"),
            "amqp.tls.ca_file",
            "holds no PEM certificate",
        ),
        (
            "ca_file = \"/nonexistent/ca.pem\"\n".to_owned(),
            "amqp.tls.ca_file",
            "cannot read",
        ),
        (
            format!("cert_file = {cert:?}\n"),
            "amqp.tls.key_file",
            "is required with amqp.tls.cert_file",
        ),
        (
            format!("key_file = {key:?}\n"),
            "amqp.tls.cert_file",
            "is required with amqp.tls.key_file",
        ),
        (
            format!("cert_file = {cert:?}\nkey_file = {secret:?}\n"),
            "amqp.tls.key_file",
            "holds no PEM private key",
        ),
        (format!("ca = {cert:?}\n"), "amqp.tls.ca", "unknown"),
        (
            format!("cert_file = {cert:?}\nkey_file = {other_key:?}\n"),
            "amqp.tls.key_file",
            "is not the key of",
        ),
    ] {
        let e = load(&extra).expect_err(&extra);
        assert_eq!(e.key, key_name, "{e}");
        assert!(e.to_string().contains(reason), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}

#[test]
fn every_key_has_a_reader() {
    // Setting each key to its default through the environment (lists comma-separated)
    // must load without "unknown key".
    let (keys, _pem) = every_key();
    let env = keys
        .into_iter()
        .map(|(k, v)| {
            let v = v
                .trim_start_matches('[')
                .trim_end_matches(']')
                .replace('"', "");
            (
                format!("PROVISIONER__{}", k.replace('.', "__").to_uppercase()),
                v,
            )
        })
        .collect();
    let s = Settings::from_sources(Sources {
        env: Some(env),
        toml: Some(String::new()),
        ..Sources::default()
    })
    .expect("every documented key is known");
    assert_eq!(s.retry.delays.len(), 5);
    assert_eq!(defaults().len(), 42, "a key was added or lost: document it");
}

/// The README table must list every key with its default, and `config/example.toml`
/// (which is the built-in default layer) must mention the keys without a default, so a
/// new key cannot ship undocumented.
#[test]
fn every_key_is_documented() {
    let readme = include_str!("../../README.md");
    for (key, default) in defaults() {
        let row = format!("| `{key}` | `{default}` |");
        assert!(readme.contains(&row), "README lacks the row {row}");
    }
    for key in KEYS_WITHOUT_DEFAULT {
        assert!(
            readme.contains(&format!("| `{key}` | — |")),
            "README lacks {key}"
        );
        let leaf = key.rsplit_once('.').map_or(key, |(_, l)| l);
        assert!(
            DEFAULTS_TOML.contains(&format!("# {leaf} =")),
            "example.toml lacks {key}"
        );
    }
}

#[test]
fn credentials_sent_in_clear_are_named() {
    let local =
        Settings::from_toml("[api]\ntoken = \"t\"\nbase_url = \"http://127.0.0.1:8080/v3\"\n")
            .expect("loads");
    assert!(
        local.api.cleartext_warnings().is_empty(),
        "loopback is fine"
    );
    let remote = Settings::from_toml(
        "[api]\nauth = \"login\"\nemail = \"a@b.c\"\npassword = \"p\"\nbase_url = \"http://api.example.com/v3\"\nauth_url = \"http://auth.example.com\"\n",
    )
    .expect("loads");
    let warnings = remote.api.cleartext_warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("bearer token is sent in clear"));
    assert!(warnings[1].contains("password is sent in clear"));
    let default = Settings::from_toml(TOKEN).expect("loads");
    assert!(default.api.cleartext_warnings().is_empty());
}

#[test]
fn topology_declare_and_the_management_url_are_checked() {
    let e = err("[topology]\ndeclare = \"maybe\"\n");
    assert_eq!(
        e.to_string(),
        "config error: topology.declare: \"maybe\" is not one of all, verify"
    );
    let e = err("[amqp]\nmanagement_url = \"http://ops:hunter2@rabbit:15672\"\n");
    assert_eq!(e.key, "amqp.management_url");
    assert!(e.reason.contains("carries credentials"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = err("[amqp]\nmanagement_url = \"amqp://rabbit\"\n");
    assert_eq!(e.key, "amqp.management_url");
    let s = Settings::from_toml(
        "[api]\ntoken = \"t\"\n[amqp]\nmanagement_url = \"https://rabbit:15671/\"\n[topology]\ndeclare = \"verify\"\n",
    )
    .expect("valid");
    assert_eq!(
        s.amqp.management_url.as_deref(),
        Some("https://rabbit:15671")
    );
    assert_eq!(s.topology.declare, Declare::Verify);
    assert_eq!(
        Settings::from_toml(TOKEN)
            .expect("defaults")
            .topology
            .declare,
        Declare::All
    );
}

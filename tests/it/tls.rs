//! TLS with a private CA and client certificates, all generated here: a real
//! `redis-server` TLS listener (client certificates required), and a TLS terminator written
//! here in front of the broker (client certificates required). Commands flow through both;
//! without the client certificate, neither lets the worker in.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;
use crate::process::{cli, stderr, stdout};

/// A private CA, a server certificate for 127.0.0.1/localhost and a client certificate,
/// as PEM files in a directory of their own.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(unique("gp-pki"));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "group-provisioner test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("ca");
        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca).expect("signed");
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = leaf("server", ExtendedKeyUsagePurpose::ServerAuth);
        let (client, client_key) = leaf("client", ExtendedKeyUsagePurpose::ClientAuth);
        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server),
            ("server-key.pem", server_key),
            ("client.pem", client),
            ("client-key.pem", client_key),
        ] {
            std::fs::write(dir.join(name), pem).expect("write pem");
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS terminator on loopback in front of `upstream`, requiring a client certificate
/// signed by the test CA. Counts completed handshakes.
struct TlsTerminator {
    addr: std::net::SocketAddr,
    handshakes: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
}

impl TlsTerminator {
    async fn start(pki: &Pki, upstream: &str) -> TlsTerminator {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.path("ca.pem"))
            .expect("ca")
            .collect::<Result<_, _>>()
            .expect("ca pem");
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(ca);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("client verifier");
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(pki.path("server.pem"))
                .expect("server cert")
                .collect::<Result<_, _>>()
                .expect("server pem");
        let key = PrivateKeyDer::from_pem_file(pki.path("server-key.pem")).expect("server key");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (h, s, upstream) = (handshakes.clone(), stop.clone(), upstream.to_owned());
        tokio::spawn(async move {
            loop {
                let (socket, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    () = s.cancelled() => return,
                };
                let (acceptor, h, s, upstream) =
                    (acceptor.clone(), h.clone(), s.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut tls, &mut server) => {}
                        () = s.cancelled() => {}
                    }
                });
            }
        });
        TlsTerminator {
            addr,
            handshakes,
            stop,
        }
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn as_refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, x)| (k.as_str(), x.as_str())).collect()
}

fn commands(prefix: &str, n: usize) -> (Vec<serde_json::Value>, HashSet<String>) {
    let bodies = (0..n)
        .map(|i| json!({"org_unit_ext_id": format!("{prefix}-{i}"), "org_unit_name": format!("{prefix} team {i}"), "org_unit_parent_id": 1000}))
        .collect();
    (bodies, (0..n).map(|i| format!("{prefix}-{i}")).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_speaks_tls_to_both_with_a_private_ca_and_client_certificates() {
    let pki = Pki::new();
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;

    let tls_port = free_port();
    let redis = RedisServer::start_with(
        free_port(),
        &[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &pki.path("server.pem"),
            "--tls-key-file",
            &pki.path("server-key.pem"),
            "--tls-ca-cert-file",
            &pki.path("ca.pem"),
            "--tls-auth-clients",
            "yes",
        ],
    )
    .await;
    let terminator = TlsTerminator::start(&pki, AMQP_HOST.get()).await;
    let amqps = format!(
        "amqps://guest:guest@127.0.0.1:{}/{}",
        terminator.addr.port(),
        env.vhost
    );
    let rediss = format!("rediss://127.0.0.1:{tls_port}/0");
    let tls_env = |with_client: bool| {
        let mut v = vec![
            ("PROVISIONER__AMQP__URL".to_owned(), amqps.clone()),
            ("PROVISIONER__REDIS__URL".to_owned(), rediss.clone()),
            (
                "PROVISIONER__AMQP__TLS__CA_FILE".to_owned(),
                pki.path("ca.pem"),
            ),
            (
                "PROVISIONER__REDIS__TLS__CA_FILE".to_owned(),
                pki.path("ca.pem"),
            ),
        ];
        if with_client {
            for section in ["AMQP", "REDIS"] {
                v.push((
                    format!("PROVISIONER__{section}__TLS__CERT_FILE"),
                    pki.path("client.pem"),
                ));
                v.push((
                    format!("PROVISIONER__{section}__TLS__KEY_FILE"),
                    pki.path("client-key.pem"),
                ));
            }
        }
        v
    };

    // `check` says how each connection is protected.
    let full = tls_env(true);
    let o = cli(&env, &["check"], &as_refs(&full)).await;
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    for item in ["rabbitmq", "redis"] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("ok    {item}"))
                && l.contains("TLS: CA ")
                && l.contains("client certificate")),
            "{item}:\n{out}"
        );
    }
    assert!(!out.contains("guest:guest"), "{out}");

    // Without the client certificate, both refuse.
    let o = cli(&env, &["check"], &as_refs(&tls_env(false))).await;
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    for item in ["rabbitmq", "redis"] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("FAIL  {item}"))),
            "{item} let a client without a certificate in:\n{out}"
        );
    }

    // The worker, in process, with the same settings: commands flow through both.
    let mut settings = env.settings.clone();
    settings.amqp.url = amqp_nodes(std::slice::from_ref(&amqps));
    settings.redis.url = group_provisioner::secret::SecretUrl::new(rediss.clone());
    let loaded =
        group_provisioner::config::Settings::from_sources(group_provisioner::config::Sources {
            toml: Some(format!(
                "[api]\ntoken = \"t\"\n[amqp]\nurl = {amqps:?}\n[redis]\nurl = {rediss:?}\n"
            )),
            env: Some(full.iter().cloned().collect()),
            ..Default::default()
        })
        .expect("TLS settings load");
    settings.amqp.tls = loaded.amqp.tls.clone();
    settings.redis.tls = loaded.redis.tls.clone();
    let before = terminator.handshakes();
    let worker = env.spawn_worker_with(settings).await;
    let (bodies, exts) = commands("TLS", 20);
    env.send_many(&bodies).await;
    collect_created(&mut tap, &exts, Duration::from_secs(30)).await;
    assert!(
        terminator.handshakes() > before,
        "the worker came through TLS"
    );
    // The records are in the TLS-only Redis (the plain port of this server is separate).
    let client = group_provisioner::dedup::client(&rediss, &loaded.redis.tls).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("TLS connection to Redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:group:TLS-*", env.prefix))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert_eq!(keys.len(), 20, "{keys:?}");
    worker.shutdown();
    worker.join().await;
    drop(redis);
    env.cleanup().await;
}

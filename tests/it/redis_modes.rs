//! Redis beyond one server: Sentinel (a failover in the middle of a load) and Redis Cluster
//! (three masters with replicas, one killed mid-run), with real `redis-server` processes on
//! loopback ports. Every command exactly once, the worker never restarted.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use group_provisioner::config::RedisMode;
use group_provisioner::pipeline::CircuitState;
use group_provisioner::secret::SecretUrl;

use crate::faults::{all_done_exactly_once, commands, wait_events};
use crate::helpers::*;
use crate::process::{cli, stderr, stdout};

/// A `redis-server` (or sentinel) process started from a config file in its own directory,
/// killed when dropped.
struct Node {
    port: u16,
    child: Option<std::process::Child>,
}

impl Node {
    async fn start(dir: &std::path::Path, name: &str, config: &str, sentinel: bool) -> Node {
        // Below the ephemeral range: a cluster node also listens on a bus port, and the
        // default (port + 10,000) is invalid above 55,535.
        let port = stable_port();
        let file = dir.join(format!("{name}.conf"));
        std::fs::write(
            &file,
            format!(
                "port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {}\n{config}",
                dir.display()
            ),
        )
        .expect("config file");
        let mut cmd = std::process::Command::new("redis-server");
        cmd.arg(&file);
        if sentinel {
            cmd.arg("--sentinel");
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let node = Node {
            port,
            child: Some(child),
        };
        wait_for(
            &format!("{name} on {port}"),
            Duration::from_secs(10),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        node
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn query(url: &str, cmd: &mut redis::Cmd) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    cmd.query_async(&mut conn).await
}

/// The login session's token pair and refresh lock, through `settings`' store.
async fn token_store_works(settings: &group_provisioner::config::RedisSettings) {
    use group_provisioner::convirza::{TokenPair, TokenStore};
    let store = group_provisioner::dedup::RedisStore::from_settings(settings).expect("store");
    let pair = TokenPair {
        access_token: "a".into(),
        refresh_token: "r".into(),
        access_expires_at: 1,
        refresh_expires_at: 2,
        obtained_at: 0,
    };
    store
        .save("ops@example.com", &pair, Duration::from_secs(60))
        .await
        .expect("save");
    let loaded = store.load("ops@example.com").await.expect("load");
    assert_eq!(loaded.map(|p| p.refresh_token), Some("r".to_owned()));
    let ttl = Duration::from_secs(20);
    assert!(
        store
            .try_lock("ops@example.com", "w1", ttl)
            .await
            .expect("lock")
    );
    assert!(
        !store
            .try_lock("ops@example.com", "w2", ttl)
            .await
            .expect("held")
    );
    store.unlock("ops@example.com", "w1").await.expect("unlock");
    assert!(
        store
            .try_lock("ops@example.com", "w2", ttl)
            .await
            .expect("free")
    );
}

fn scratch(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_mid_load_is_followed_and_costs_nothing() {
    let dir = scratch("gp-sentinel");
    let master = Node::start(&dir, "master", "", false).await;
    let replica = Node::start(
        &dir,
        "replica",
        &format!("replicaof 127.0.0.1 {}\n", master.port),
        false,
    )
    .await;
    wait_for("the replica in sync", Duration::from_secs(20), || async {
        let info = query(&replica.url(), redis::cmd("INFO").arg("replication")).await;
        matches!(info, Ok(redis::Value::VerbatimString { ref text, .. }) if text.contains("master_link_status:up"))
            .then_some(())
            .or_else(|| {
                matches!(info, Ok(redis::Value::BulkString(ref b)) if String::from_utf8_lossy(b).contains("master_link_status:up"))
                    .then_some(())
            })
    })
    .await;
    let mut sentinels = Vec::new();
    for i in 0..3 {
        sentinels.push(
            Node::start(
                &dir,
                &format!("sentinel-{i}"),
                &format!(
                    "sentinel monitor gp 127.0.0.1 {} 2\nsentinel down-after-milliseconds gp 2000\nsentinel failover-timeout gp 10000\n",
                    master.port
                ),
                true,
            )
            .await,
        );
    }
    wait_for(
        "the sentinels see the replica",
        Duration::from_secs(30),
        || async {
            let replicas = query(
                &sentinels[0].url(),
                redis::cmd("SENTINEL").arg("REPLICAS").arg("gp"),
            )
            .await;
            matches!(replicas, Ok(redis::Value::Array(ref r)) if !r.is_empty()).then_some(())
        },
    )
    .await;

    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 30);
    let mut tap = env.event_tap().await;
    let mut settings = env.settings.clone();
    settings.redis.mode = RedisMode::Sentinel;
    settings.redis.nodes = sentinels.iter().map(|s| SecretUrl::new(s.url())).collect();
    settings.redis.sentinel_master = Some("gp".to_owned());
    settings.redis.url = SecretUrl::new("redis://sentinel-named-master/0");
    token_store_works(&settings.redis).await;

    // `check` finds the master through the sentinels.
    let sentinel_env: Vec<(String, String)> = vec![
        ("PROVISIONER__REDIS__MODE".into(), "sentinel".into()),
        (
            "PROVISIONER__REDIS__NODES".into(),
            sentinels
                .iter()
                .map(Node::url)
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("PROVISIONER__REDIS__SENTINEL_MASTER".into(), "gp".into()),
    ];
    let refs: Vec<(&str, &str)> = sentinel_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let o = cli(&env, &["check"], &refs).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("master \"gp\" via sentinels"),
        "{}",
        stdout(&o)
    );

    // The redis crate's own Sentinel client, beside the store: a connection to the master
    // the sentinels named when it was made (see the end of the test).
    let mut theirs = redis::sentinel::SentinelClient::build(
        sentinels.iter().map(Node::url).collect(),
        "gp",
        None,
        redis::sentinel::SentinelServerType::Master,
    )
    .expect("the crate's sentinel client");
    let mut their_connection = theirs
        .get_async_connection()
        .await
        .expect("the crate's connection to the master");
    let probe_key = format!("{}:crate-probe", env.settings.redis.key_prefix);
    let written: redis::RedisResult<()> = redis::cmd("SET")
        .arg(&probe_key)
        .arg(1)
        .query_async(&mut their_connection)
        .await;
    assert!(written.is_ok(), "before the failover: {written:?}");

    let worker = env.spawn_worker_with(settings).await;
    let (bodies, exts) = commands("SENT", 300);
    env.send_many(&bodies).await;
    let rest = wait_events(&mut tap, 60, &exts).await;
    let forced = query(
        &sentinels[0].url(),
        redis::cmd("SENTINEL").arg("FAILOVER").arg("gp"),
    )
    .await;
    assert!(forced.is_ok(), "{forced:?}");
    let replica_port = replica.port.to_string();
    wait_for("the replica promoted", Duration::from_secs(30), || async {
        let addr = query(
            &sentinels[0].url(),
            redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg("gp"),
        )
        .await;
        matches!(addr, Ok(redis::Value::Array(ref a)) if a.get(1) == Some(&redis::Value::BulkString(replica_port.clone().into_bytes())))
            .then_some(())
    })
    .await;
    all_done_exactly_once(&env, &mut tap, &rest, &exts, Duration::from_secs(90)).await;
    assert!(worker.is_consuming(), "the same worker, still consuming");
    // The sentinels demote the old master (it answers READONLY from then on).
    wait_for(
        "the old master demoted",
        Duration::from_secs(60),
        || async {
            let info = query(&master.url(), redis::cmd("INFO").arg("replication")).await;
            let text = match info {
                Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
                Ok(redis::Value::VerbatimString { text, .. }) => text,
                _ => String::new(),
            };
            text.contains("role:slave").then_some(())
        },
    )
    .await;

    // Why `src/dedup/conn.rs` keeps its own connection: the crate's stays with the old
    // master, which closed it when it was demoted (or refuses the write as a replica), and
    // never finds the new one; the store followed the failover.
    let refused: redis::RedisResult<()> = redis::cmd("SET")
        .arg(&probe_key)
        .arg(2)
        .query_async(&mut their_connection)
        .await;
    assert!(
        refused.is_err(),
        "the crate's connection followed the failover"
    );

    // Now on the new master: the next commands are recorded there.
    let (bodies, after) = commands("AFTER", 50);
    env.send_many(&bodies).await;
    all_done_exactly_once(&env, &mut tap, &after, &after, Duration::from_secs(60)).await;
    let keys = query(
        &replica.url(),
        redis::cmd("KEYS").arg(format!("{}:group:AFTER-*", env.prefix)),
    )
    .await;
    assert!(
        matches!(keys, Ok(redis::Value::Array(ref k)) if k.len() == 50),
        "{keys:?}"
    );
    wait_for("the circuit closed", Duration::from_secs(30), || async {
        (worker.circuit() == CircuitState::Closed).then_some(())
    })
    .await;
    worker.shutdown();
    worker.join().await;
    drop(sentinels);
    drop((master, replica));
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_loses_a_master_mid_load_and_costs_nothing() {
    let dir = scratch("gp-cluster");
    let mut nodes = Vec::new();
    for i in 0..6 {
        nodes.push(
            Node::start(
                &dir,
                &format!("node-{i}"),
                &format!(
                    "cluster-enabled yes\ncluster-port {}\ncluster-config-file nodes-{i}.conf\ncluster-node-timeout 2000\ncluster-replica-validity-factor 0\n",
                    stable_port()
                ),
                false,
            )
            .await,
        );
    }
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let created = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    wait_for("the cluster ok", Duration::from_secs(30), || async {
        let info = query(
            &nodes[0].url(),
            &mut redis::cmd("CLUSTER").arg("INFO").to_owned(),
        )
        .await;
        let text = match info {
            Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            Ok(redis::Value::VerbatimString { text, .. }) => text,
            _ => String::new(),
        };
        text.contains("cluster_state:ok").then_some(())
    })
    .await;

    // Every replica in sync, so that one can take over.
    for node in &nodes {
        wait_for("replicas in sync", Duration::from_secs(30), || async {
            let info = query(&node.url(), redis::cmd("INFO").arg("replication")).await;
            let text = match info {
                Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
                Ok(redis::Value::VerbatimString { text, .. }) => text,
                _ => String::new(),
            };
            (text.contains("role:master") || text.contains("master_link_status:up")).then_some(())
        })
        .await;
    }
    // The master to kill: one `CLUSTER NODES` names as master, other than the first.
    let layout = query(&nodes[0].url(), redis::cmd("CLUSTER").arg("NODES")).await;
    let layout = match layout {
        Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        Ok(redis::Value::VerbatimString { text, .. }) => text,
        other => panic!("CLUSTER NODES: {other:?}"),
    };
    let victim = nodes
        .iter()
        .position(|n| {
            layout.lines().any(|l| {
                l.contains(&format!("127.0.0.1:{}@", n.port))
                    && l.contains("master")
                    && !l.contains("myself")
            })
        })
        .expect("a second master");

    let env = TestEnv::new().await;
    env.sim.sim.update_faults(|f| f.latency_ms = 30);
    let mut tap = env.event_tap().await;
    let mut settings = env.settings.clone();
    settings.redis.mode = RedisMode::Cluster;
    settings.redis.nodes = nodes
        .iter()
        .take(3)
        .map(|n| SecretUrl::new(n.url()))
        .collect();

    let worker = env.spawn_worker_with(settings).await;
    let (bodies, exts) = commands("CLU", 1000);
    env.send_many(&bodies).await;
    let rest = wait_events(&mut tap, 200, &exts).await;
    nodes[victim].kill();
    all_done_exactly_once(&env, &mut tap, &rest, &exts, Duration::from_secs(120)).await;
    assert!(worker.is_consuming(), "the same worker, still consuming");

    // `status` reads a record through the cluster.
    let cluster_env = [
        ("PROVISIONER__REDIS__MODE", "cluster"),
        (
            "PROVISIONER__REDIS__NODES",
            &*format!("{},{}", nodes[0].url(), nodes[2].url()),
        ),
    ];
    let o = cli(&env, &["status", "CLU-7"], &cluster_env).await;
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("created"), "{}", stdout(&o));
    worker.shutdown();
    worker.join().await;
    let seen: HashSet<String> = exts.iter().cloned().collect();
    assert_eq!(seen.len(), 1000);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
}

//! Each Lua script of the dedup store (`src/dedup/scripts/*.lua`), run on its own against a
//! real Redis under a key prefix of its own: what it answers and what it leaves behind,
//! including keys of another type and records of another version.

use group_provisioner::dedup::scripts;
use redis::{Script, Value};
use serde_json::{Value as Json, json};

use crate::helpers::*;

struct Keys {
    prefix: String,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            prefix: unique("gp-script"),
        }
    }
    fn k(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        // Best effort, on a runtime of its own (a drop cannot await).
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Runtime::new() {
                rt.block_on(delete_redis_prefix(&prefix));
            }
        })
        .join();
    }
}

async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET")
}

fn bulk(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        other => panic!("not an array: {other:?}"),
    }
}

fn claim_json(owner: &str) -> String {
    json!({"state": "claimed", "owner": owner, "claimed_at": "2026-12-06T00:00:00Z"}).to_string()
}

#[tokio::test]
async fn claim_acquires_marks_finds_and_names_the_duplicate() {
    let keys = Keys::new();
    let mut c = redis_conn().await;
    let script = Script::new(scripts::CLAIM);
    let duplicate = json!({"outcome": "duplicate", "org_unit_id": null}).to_string();
    let claim = |c: &mut redis::aio::MultiplexedConnection| {
        let mut inv = script.key(keys.k("group"));
        inv.key(keys.k("outcome"))
            .key(keys.k("attempt"))
            .arg(claim_json("w1"))
            .arg(10_000)
            .arg(&duplicate)
            .arg(60_000)
            .arg("1")
            .arg(1000)
            .arg("Team");
        let c = c.clone();
        async move {
            let mut c = c;
            items(inv.invoke_async(&mut c).await.expect("claim"))
        }
    };
    // Absent: acquired, and the first POST marked in the same step.
    let first = claim(&mut c).await;
    assert_eq!(bulk(&first[0]).as_deref(), Some("acquired"));
    assert_eq!(first[1], Value::Int(1), "marked");
    let marker: Json =
        serde_json::from_str(&get(&mut c, &keys.k("attempt")).await.expect("marker"))
            .expect("json");
    assert_eq!(marker["count"], 1);
    assert_eq!(marker["posted"], json!([["1000", "Team"]]));
    // Claimed: found, the claim as stored.
    let again = claim(&mut c).await;
    assert_eq!(bulk(&again[0]).as_deref(), Some("found"));
    assert!(bulk(&again[1]).is_some_and(|v| v.contains("\"w1\"")));
    // Created: found, and the duplicate outcome names the group.
    let record = json!({"state": "created", "org_unit_id": 5001, "created_at": "t", "api_request_id": null, "org_unit_name": "Team", "org_unit_parent_id": 1000}).to_string();
    let _: () = redis::cmd("SET")
        .arg(keys.k("group"))
        .arg(&record)
        .query_async(&mut c)
        .await
        .expect("SET");
    let found = claim(&mut c).await;
    assert_eq!(bulk(&found[0]).as_deref(), Some("found"));
    let outcome: Json =
        serde_json::from_str(&get(&mut c, &keys.k("outcome")).await.expect("outcome"))
            .expect("json");
    assert_eq!(outcome["org_unit_id"], 5001);
    // Another type: said, never an error.
    let _: () = redis::cmd("DEL")
        .arg(keys.k("group"))
        .query_async(&mut c)
        .await
        .expect("DEL");
    let _: () = redis::cmd("HSET")
        .arg(keys.k("group"))
        .arg("a")
        .arg("b")
        .query_async(&mut c)
        .await
        .expect("HSET");
    let typed = claim(&mut c).await;
    assert_eq!(bulk(&typed[0]).as_deref(), Some("type"));
    assert_eq!(bulk(&typed[1]).as_deref(), Some("hash"));
}

#[tokio::test]
async fn renew_and_release_only_for_the_owner_and_release_closes_the_marker() {
    let keys = Keys::new();
    let mut c = redis_conn().await;
    let _: () = redis::cmd("SET")
        .arg(keys.k("group"))
        .arg(claim_json("w1"))
        .arg("PX")
        .arg(5_000)
        .query_async(&mut c)
        .await
        .expect("SET");
    let marker = json!({"count": 1, "at": 1, "open": true, "posted": []}).to_string();
    let _: () = redis::cmd("SET")
        .arg(keys.k("attempt"))
        .arg(&marker)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut c)
        .await
        .expect("SET");
    let renew = Script::new(scripts::RENEW);
    let renewed: i64 = renew
        .key(keys.k("group"))
        .arg("w2")
        .arg(50_000)
        .invoke_async(&mut c)
        .await
        .expect("renew");
    assert_eq!(renewed, 0, "not the owner");
    let renewed: i64 = renew
        .key(keys.k("group"))
        .arg("w1")
        .arg(50_000)
        .invoke_async(&mut c)
        .await
        .expect("renew");
    assert_eq!(renewed, 1);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys.k("group"))
        .query_async(&mut c)
        .await
        .expect("PTTL");
    assert!(ttl > 5_000, "{ttl}");
    let release = Script::new(&format!("{}{}", scripts::CLOSE_MARKER, scripts::RELEASE));
    let released: i64 = release
        .key(keys.k("group"))
        .key(keys.k("attempt"))
        .arg("w2")
        .arg("1")
        .invoke_async(&mut c)
        .await
        .expect("release");
    assert_eq!(released, 0, "not the owner");
    let released: i64 = release
        .key(keys.k("group"))
        .key(keys.k("attempt"))
        .arg("w1")
        .arg("1")
        .invoke_async(&mut c)
        .await
        .expect("release");
    assert_eq!(released, 1);
    assert_eq!(get(&mut c, &keys.k("group")).await, None);
    let closed: Json =
        serde_json::from_str(&get(&mut c, &keys.k("attempt")).await.expect("marker"))
            .expect("json");
    assert_eq!(closed["open"], false, "closed, kept");
}

#[tokio::test]
async fn record_created_is_fenced_for_a_lost_claim_and_returns_an_existing_record() {
    let keys = Keys::new();
    let mut c = redis_conn().await;
    let script = Script::new(&format!(
        "{}{}",
        scripts::CLOSE_MARKER,
        scripts::RECORD_CREATED
    ));
    let record = json!({"state": "created", "org_unit_id": 7}).to_string();
    let shared = c.clone();
    let run = |owner: &'static str| {
        let mut inv = script.key(keys.k("group"));
        inv.key(keys.k("attempt"))
            .key(keys.k("outcome"))
            .arg(owner)
            .arg(&record)
            .arg(60_000)
            .arg("{\"outcome\":\"created\"}");
        let c = shared.clone();
        async move {
            let mut c = c;
            let answer: String = inv.invoke_async(&mut c).await.expect("record");
            answer
        }
    };
    let _: () = redis::cmd("SET")
        .arg(keys.k("group"))
        .arg(claim_json("w1"))
        .query_async(&mut c)
        .await
        .expect("SET");
    assert_eq!(run("w2").await, "fenced");
    assert_eq!(run("w1").await, "ok");
    assert_eq!(
        get(&mut c, &keys.k("group")).await.as_deref(),
        Some(record.as_str())
    );
    assert!(get(&mut c, &keys.k("outcome")).await.is_some());
    // A record already there is handed back, never overwritten.
    assert_eq!(run("w1").await, record);
    let _: () = redis::cmd("DEL")
        .arg(keys.k("group"))
        .query_async(&mut c)
        .await
        .expect("DEL");
    let _: () = redis::cmd("LPUSH")
        .arg(keys.k("group"))
        .arg("x")
        .query_async(&mut c)
        .await
        .expect("LPUSH");
    assert_eq!(run("w1").await, "fenced", "a key of another type");
}

#[tokio::test]
async fn mark_attempt_counts_only_for_the_owner_and_reads_old_markers() {
    let keys = Keys::new();
    let mut c = redis_conn().await;
    let script = Script::new(scripts::MARK_ATTEMPT);
    let shared = c.clone();
    let mark = |owner: &'static str, name: &'static str| {
        let mut inv = script.key(keys.k("group"));
        inv.key(keys.k("attempt"))
            .arg(owner)
            .arg(60_000)
            .arg("1000")
            .arg(name);
        let c = shared.clone();
        async move {
            let mut c = c;
            let n: i64 = inv.invoke_async(&mut c).await.expect("mark");
            n
        }
    };
    assert_eq!(mark("w1", "A").await, 0, "no claim held");
    let _: () = redis::cmd("SET")
        .arg(keys.k("group"))
        .arg(claim_json("w1"))
        .query_async(&mut c)
        .await
        .expect("SET");
    // An earlier version's marker: a plain count.
    let _: () = redis::cmd("SET")
        .arg(keys.k("attempt"))
        .arg("2")
        .query_async(&mut c)
        .await
        .expect("SET");
    assert_eq!(mark("w1", "A").await, 1);
    assert_eq!(mark("w1", "B").await, 1);
    let m: Json = serde_json::from_str(&get(&mut c, &keys.k("attempt")).await.expect("marker"))
        .expect("json");
    assert_eq!(m["count"], 4);
    assert_eq!(m["open"], true);
    assert_eq!(m["posted"], json!([["1000", "A"], ["1000", "B"]]));
}

#[tokio::test]
async fn the_read_scripts_answer_in_one_step_and_never_fail_on_another_type() {
    let keys = Keys::new();
    let mut c = redis_conn().await;
    let _: () = redis::cmd("HSET")
        .arg(keys.k("attempt"))
        .arg("a")
        .arg("b")
        .query_async(&mut c)
        .await
        .expect("HSET");
    let read: Vec<Value> = items(
        Script::new(scripts::READ_ATTEMPT)
            .key(keys.k("attempt"))
            .invoke_async(&mut c)
            .await
            .expect("read"),
    );
    assert_eq!(bulk(&read[0]).as_deref(), Some("\0unreadable"));
    assert!(
        matches!(read[1], Value::Int(n) if n > 0),
        "the server's clock"
    );
    let _: () = redis::cmd("SET")
        .arg(keys.k("group"))
        .arg("v")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut c)
        .await
        .expect("SET");
    let all = items(
        Script::new(scripts::READ_KEYS)
            .key(keys.k("group"))
            .key(keys.k("attempt"))
            .key(keys.k("none"))
            .invoke_async(&mut c)
            .await
            .expect("read keys"),
    );
    let kinds: Vec<Option<String>> = all.iter().step_by(2).take(3).map(bulk).collect();
    assert_eq!(
        kinds,
        [
            Some("string".into()),
            Some("hash".into()),
            Some("none".into())
        ]
    );
    assert_eq!(bulk(&all[1]).as_deref(), Some("v"));
    assert!(matches!(all[6], Value::Int(ttl) if ttl > 0), "{:?}", all[6]);
}

#[tokio::test]
async fn replace_unreadable_and_unlock_touch_only_what_was_seen() {
    let keys = Keys::new();
    let mut c = redis_conn().await;
    let replace = Script::new(scripts::REPLACE_UNREADABLE);
    let _: () = redis::cmd("SET")
        .arg(keys.k("group"))
        .arg("garbage")
        .query_async(&mut c)
        .await
        .expect("SET");
    let n: i64 = replace
        .key(keys.k("group"))
        .arg("value")
        .arg("other")
        .arg(claim_json("w1"))
        .arg(10_000)
        .invoke_async(&mut c)
        .await
        .expect("replace");
    assert_eq!(n, 0, "not what was seen");
    let n: i64 = replace
        .key(keys.k("group"))
        .arg("value")
        .arg("garbage")
        .arg(claim_json("w1"))
        .arg(10_000)
        .invoke_async(&mut c)
        .await
        .expect("replace");
    assert_eq!(n, 1);
    assert!(
        get(&mut c, &keys.k("group"))
            .await
            .is_some_and(|v| v.contains("w1"))
    );

    let unlock = Script::new(scripts::UNLOCK);
    let _: () = redis::cmd("SET")
        .arg(keys.k("lock"))
        .arg("me")
        .query_async(&mut c)
        .await
        .expect("SET");
    let n: i64 = unlock
        .key(keys.k("lock"))
        .arg("you")
        .invoke_async(&mut c)
        .await
        .expect("unlock");
    assert_eq!(n, 0);
    let n: i64 = unlock
        .key(keys.k("lock"))
        .arg("me")
        .invoke_async(&mut c)
        .await
        .expect("unlock");
    assert_eq!(n, 1);
}

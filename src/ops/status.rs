//! `status <ext_id>`: what the dedup store knows of one ext id.

use serde_json::json;

use crate::app;
use crate::command::ExtId;
use crate::config::Settings;
use crate::dedup::StoredRecord;
use crate::text::printable;

use super::OpsError;

/// Prints what is known of `ext_id`; returns whether anything is.
pub async fn run(settings: &Settings, ext_id: &str, as_json: bool) -> Result<bool, OpsError> {
    let ext_id = ExtId::parse(ext_id)
        .map_err(|e| OpsError::BadArgument(format!("not a valid ext id: {e}")))?;
    let store_error = |source| OpsError::Store {
        url: settings.redis.url.to_string(),
        source,
    };
    let store = app::dedup_store(settings).map_err(store_error)?;
    let status = store.status(&ext_id).await.map_err(store_error)?;
    let known =
        status.record.is_some() || status.unreadable.is_some() || status.attempt_markers > 0;
    if as_json {
        let state = match &status.record {
            Some(StoredRecord::Created(_)) => "created",
            Some(StoredRecord::Claimed { .. }) => "claimed",
            None if status.unreadable.is_some() => "unreadable",
            None if known => "attempted",
            None => "unknown",
        };
        let out = json!({
            "ext_id": ext_id.as_str(),
            "state": state,
            "record": status.record,
            "ttl_ms": status.ttl_ms,
            "post_attempts": status.attempt_markers,
            "unreadable": status.unreadable,
        });
        println!("{out}");
    } else {
        println!("ext_id:        {}", printable(ext_id.as_str(), 160));
        match &status.record {
            Some(StoredRecord::Created(r)) => {
                println!("state:         created");
                println!("org_unit_id:   {}", r.org_unit_id);
                println!("name:          {}", printable(&r.org_unit_name, 300));
                println!("parent:        {}", r.org_unit_parent_id);
                println!("created_at:    {}", printable(&r.created_at, 64));
                println!(
                    "api_request:   {}",
                    printable(r.api_request_id.as_deref().unwrap_or("-"), 128)
                );
                if let Some(ms) = status.ttl_ms {
                    println!("forgotten in:  {}", human(ms));
                }
            }
            Some(StoredRecord::Claimed { owner, claimed_at }) => {
                println!("state:         claimed (a worker is creating it now)");
                println!("owner:         {}", printable(owner, 300));
                println!("claimed_at:    {}", printable(claimed_at, 64));
                if let Some(ms) = status.ttl_ms {
                    println!("lease left:    {}", human(ms));
                }
            }
            None if status.unreadable.is_some() => {
                println!(
                    "state:         unreadable ({}; the worker replaces it on the next delivery)",
                    printable(status.unreadable.as_deref().unwrap_or_default(), 300)
                );
            }
            None if known => println!(
                "state:         attempted (no claim or record now: it failed or is waiting for a retry)"
            ),
            None => println!("state:         unknown (never seen, or forgotten after dedup.ttl)"),
        }
        println!("post_attempts: {}", status.attempt_markers);
    }
    Ok(known)
}

fn human(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{}.{:03}s", s, ms % 1000),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_durations() {
        assert_eq!(super::human(1_500), "1.500s");
        assert_eq!(super::human(61_000), "1m1s");
        assert_eq!(super::human(7_260_000), "2h1m");
        assert_eq!(super::human(30 * 86_400_000), "30d0h");
    }
}

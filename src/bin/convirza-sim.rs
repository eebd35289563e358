//! Thin entry point of the Convirza API simulator; see `convirza-sim --help`.

use std::net::SocketAddr;

use clap::Parser;
use group_provisioner::sim::{self, Faults, IdKey, SimConfig};

const ABOUT: &str =
    "A local stand-in for the Convirza Platform API v3, for tests, benchmarks and sandboxes.";

const AFTER_HELP: &str = "\
API (as the real one):
  POST /v3/groups                 create a group (Bearer token; 201 with data.orgUnitId)
  GET  /v3/groups/list            children of ?org_unit_id= (default: the account root 1),
                                  ?group_name= partial case-insensitive, &limit= &offset=
Rules: org_unit_parent_id must be an active group (seed parents, or any created group);
       sibling names are unique ignoring case and surrounding spaces (else 400).

Login (api.auth = \"login\"):
  POST /oauth/token               {\"email\",\"password\"} -> access/refresh pair, expiries as RFC 3339
  POST /oauth/refresh-token       {\"refresh_token\"} -> a new pair; refresh tokens are single-use
                                  (a reused one answers 401 and counts as refresh_reuse in stats)

Admin (no auth):
  GET  /_sim/stats                groups created, requests, groups per ext id, duplicates
  GET  /_sim/groups[?ext_id=X]    groups, with the body that created them
  POST /_sim/groups               seed a group: {\"org_unit_parent_id\":1000,\"org_unit_name\":\"X\",\"org_unit_ext_id\":\"E\"}
  GET|PUT /_sim/faults            show or replace faults, e.g.
        {\"latency_ms\": 50}
        {\"fail_next\": {\"count\": 2, \"status\": 429, \"retry_after\": \"3\"}}
        {\"fail_next\": {\"count\": 1, \"status\": 502, \"body\": \"<html>Bad Gateway</html>\"}}
        {\"error_rate\": 0.1, \"error_status\": 503}
        {\"drop_after_commit\": 1}      create, then drop the connection unanswered
        {\"stall_after_commit\": 1, \"stall_ms\": 30000}
        {\"id_key\": \"org_unit_id\"}   answer with data.org_unit_id instead of orgUnitId
        {}                              clear all faults
  PUT  /_sim/token                {\"token\": \"new\"} or {\"token\": null} to revoke the static token
  POST /_sim/revoke               invalidate every issued access token (refresh tokens stay valid)
  GET  /_sim/requests             the request log (status null = connection dropped)
  POST /_sim/reset                forget groups, faults and the log

Example:
  convirza-sim --listen 127.0.0.1:8080
  curl -s -X PUT localhost:8080/_sim/faults -d '{\"latency_ms\": 20}' -H 'content-type: application/json'";

#[derive(Debug, Parser)]
#[command(name = "convirza-sim", version, about = ABOUT, after_help = AFTER_HELP)]
struct Args {
    /// Address to listen on (port 0 picks a free port and prints it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Bearer token the API accepts.
    #[arg(long, default_value = "sim-token")]
    token: String,
    /// Active parent groups that exist at start (comma-separated ids).
    #[arg(long, value_delimiter = ',', default_value = "1000,1001")]
    parents: Vec<i64>,
    /// First id handed to a created group.
    #[arg(long, default_value_t = 5001)]
    first_id: i64,
    /// Latency added to every API call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Key of the new id in a 201: orgUnitId or org_unit_id.
    #[arg(long, default_value = "orgUnitId", value_parser = ["orgUnitId", "org_unit_id"])]
    id_key: String,
    /// Login email accepted by POST /oauth/token.
    #[arg(long, default_value = "admin@example.com")]
    email: String,
    /// Login password accepted by POST /oauth/token.
    #[arg(long, default_value = "sim-password")]
    password: String,
    /// Lifetime of issued access tokens, in seconds (the real API: 7 days).
    #[arg(long, default_value_t = 7 * 86_400)]
    access_ttl_secs: u64,
    /// Answer logins wrapped in the API envelope instead of flat.
    #[arg(long)]
    enveloped_login: bool,
    /// Log format: pretty or json.
    #[arg(long, default_value = "pretty", value_parser = ["pretty", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let format = if args.log_format == "json" {
        group_provisioner::config::LogFormat::Json
    } else {
        group_provisioner::config::LogFormat::Pretty
    };
    let _ = group_provisioner::telemetry::init(&group_provisioner::config::LogSettings {
        format,
        level: "info".into(),
        queue_lines: 8192,
    });
    let config = SimConfig {
        listen: args.listen,
        token: args.token,
        parents: args.parents,
        first_id: args.first_id,
        faults: Faults {
            latency_ms: args.latency_ms,
            id_key: if args.id_key == "org_unit_id" {
                IdKey::SnakeCase
            } else {
                IdKey::CamelCase
            },
            ..Faults::default()
        },
        auth: sim::SimAuth {
            email: args.email,
            password: args.password,
            access_ttl: std::time::Duration::from_secs(args.access_ttl_secs),
            enveloped: args.enveloped_login,
            ..sim::SimAuth::default()
        },
        ..SimConfig::default()
    };
    let handle = sim::spawn(config.clone()).await?;
    tracing::info!(
        listen = %handle.addr,
        base_url = %handle.base_url(),
        parents = ?config.parents,
        "convirza-sim ready (token accepted: see --token; admin under /_sim)"
    );
    group_provisioner::shutdown::signal().await;
    tracing::info!("convirza-sim stopping");
    group_provisioner::telemetry::flush();
    Ok(())
}

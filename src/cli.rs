//! Command-line interface of the `group-provisioner` binary (SPEC §7).
//!
//! Invariant: `--config` is global (accepted before or after the subcommand); a config
//! error exits 2 with one line `config error: <key>: <reason>` on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::ops;

#[derive(Debug, Parser)]
#[command(
    name = "group-provisioner",
    version,
    about = "Creates Convirza groups from RabbitMQ commands, effectively once per external id.",
    after_help = "Configuration: defaults, then the TOML file, then PROVISIONER__SECTION__KEY \
environment variables (e.g. PROVISIONER__API__TOKEN). See README.md for every key."
)]
pub struct Cli {
    /// TOML configuration file (default: config/default.toml if it exists).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker until SIGTERM/SIGINT.
    #[command(
        after_help = "Example:\n  PROVISIONER__API__TOKEN=... group-provisioner run --config /etc/provisioner.toml"
    )]
    Run,
    /// Validate the configuration and reach RabbitMQ, Redis and the API; exit 0 only if all pass.
    #[command(
        after_help = "Checks, one line each (ok / FAIL with the reason):\n  config, rabbitmq, topology (declared, or only verified with --no-declare),\n  redis, api (an authenticated GET /v3/groups/list?limit=1 that creates nothing).\n\nExample (Kubernetes init step):\n  group-provisioner check --config /etc/provisioner.toml --no-declare"
    )]
    Check {
        /// Only verify that the topology exists; declare nothing.
        #[arg(long)]
        no_declare: bool,
    },
    /// Inspect and replay the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Publish one JSON command, or JSON lines, to the command exchange (with confirms).
    #[command(
        after_help = "Each command is validated first; invalid ones are reported with their line number\nand not sent (unless --no-validate). A progress bar is shown when stderr is a terminal.\nExit code 0 only when every command was sent.\n\nExamples:\n  group-provisioner send examples/create-group.json\n  group-provisioner send backfill.jsonl\n  generate-commands | group-provisioner send -"
    )]
    Send {
        /// A JSON file (one object) or JSON lines; `-` or nothing reads stdin.
        file: Option<PathBuf>,
        /// Send lines even if they are not valid commands (the worker dead-letters them).
        #[arg(long)]
        no_validate: bool,
    },
    /// What the dedup store knows of one ext id (exit 0 when known, 1 when unknown).
    #[command(
        after_help = "States: created (org_unit_id, when, API request id), claimed (a worker is on it:\nowner and lease left), attempted (POSTs were made but nothing is recorded now),\nunknown.\n\nExample:\n  group-provisioner status ORG-2001 --json"
    )]
    Status {
        ext_id: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Count dead letters, by x-error-kind. Removes nothing.
    #[command(after_help = "Example:\n  group-provisioner dlq stats --json")]
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Show dead letters (body and reason headers) in queue order. Removes nothing.
    #[command(after_help = "Example:\n  group-provisioner dlq peek --limit 5")]
    Peek {
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// One JSON object per line (the export format).
        #[arg(long)]
        json: bool,
    },
    /// Write every dead letter to a JSON-lines file for audit. Removes nothing.
    #[command(after_help = "Example:\n  group-provisioner dlq export --out dlq-2026-11-26.jsonl")]
    Export {
        #[arg(long, value_name = "FILE.jsonl")]
        out: PathBuf,
    },
    /// Move matching dead letters back to the command exchange (confirmed publish, then ack).
    #[command(
        after_help = "Messages that do not match stay in the DLQ, in order. Each replay adds 1 to\nx-replay-count and resets x-attempts; a message replayed --max-replays times is\nskipped (kept). Ctrl-C stops after the current message and returns the rest.\nReplays are safe: the worker never creates a group twice for one ext id.\n\nExamples:\n  group-provisioner dlq replay --kind rejected --dry-run\n  group-provisioner dlq replay --kind retries_exhausted --rate 20\n  group-provisioner dlq replay --ext-id ORG-2001"
    )]
    Replay(ops::dlq::ReplayFilter),
}

/// Exit code for configuration errors (SPEC §9).
pub const EXIT_CONFIG: u8 = 2;

fn config_error(e: crate::config::ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(EXIT_CONFIG)
}

pub fn load_settings(cli: &Cli) -> Result<Settings, ExitCode> {
    let needs_api = matches!(cli.command, Command::Run | Command::Check { .. });
    let loaded = if needs_api {
        Settings::load(cli.config.as_deref())
    } else {
        Settings::load_without_credentials(cli.config.as_deref())
    };
    loaded.map_err(config_error)
}

/// Run an operator subcommand (everything but `run`).
pub async fn dispatch(cli: Cli, settings: Settings) -> ExitCode {
    match cli.command {
        Command::Run => crate::worker::run(settings).await,
        Command::Check { no_declare } => {
            let source = match &cli.config {
                Some(p) => p.display().to_string(),
                None if std::path::Path::new(crate::config::DEFAULT_CONFIG_PATH).is_file() => {
                    crate::config::DEFAULT_CONFIG_PATH.to_owned()
                }
                None => "defaults and environment".to_owned(),
            };
            ops::check::run(&settings, &source, !no_declare).await
        }
        Command::Dlq(DlqCommand::Stats { json }) => ops::dlq::stats(&settings, json).await,
        Command::Dlq(DlqCommand::Peek { limit, json }) => {
            ops::dlq::peek(&settings, limit, json).await
        }
        Command::Dlq(DlqCommand::Export { out }) => ops::dlq::export(&settings, &out).await,
        Command::Dlq(DlqCommand::Replay(filter)) => {
            ops::dlq::replay_command(&settings, &filter).await
        }
        Command::Send { file, no_validate } => {
            ops::send::run(&settings, file.as_deref(), !no_validate).await
        }
        Command::Status { ext_id, json } => ops::status::run(&settings, &ext_id, json).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_global() {
        let a = Cli::try_parse_from(["gp", "--config", "x.toml", "dlq", "stats"]).expect("before");
        let b = Cli::try_parse_from(["gp", "dlq", "stats", "--config", "x.toml"]).expect("after");
        assert_eq!(a.config, b.config);
    }
}

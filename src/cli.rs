//! Command-line interface of the `group-provisioner` binary: the one way in. It parses the
//! arguments, loads the settings, runs the subcommand, and maps every result to an
//! [`Exit`] code in one place.
//!
//! Invariants: `--config` is global (accepted before or after the subcommand); a config
//! error exits 2 with one line `config error: <key>: <reason>` on stderr; an operator
//! command's error is one line `<command>: <error>` on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, Settings};
use crate::ops::{self, OpsError};
use crate::worker::StartError;

#[derive(Debug, Parser)]
#[command(
    name = "group-provisioner",
    version = crate::LONG_VERSION,
    about = "Creates Convirza groups from RabbitMQ commands, effectively once per external id.",
    after_help = "Configuration: defaults, then the TOML file, then PROVISIONER__SECTION__KEY \
environment variables (e.g. PROVISIONER__API__TOKEN). See README.md for every key.\n\n\
Exit codes (every subcommand):\n  \
0    done (check: every item passed; status: the ext id is known)\n  \
1    the command ran and something failed (a check item, a send, the broker); status: unknown ext id\n  \
2    usage: a configuration error, a bad argument, an unreadable input file\n  \
3    status: the dedup store cannot be reached\n  \
130  interrupted by SIGINT or SIGTERM before the end (dlq, events: what was read goes back, in order)"
)]
pub struct Cli {
    /// TOML configuration file (default: $PROVISIONER_CONFIG, else config/default.toml if
    /// it exists).
    #[arg(long, global = true, value_name = "PATH", env = "PROVISIONER_CONFIG")]
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
        after_help = "Checks, one line each (ok / WARN / FAIL with the reason):\n  config    where the settings came from\n  rabbitmq  the broker answers (which node, TLS)\n  topology  declared, or verified through the management API (--no-declare,\n            topology.declare = \"verify\", or a user the broker refuses configure)\n  dlq       the DLQ keeps dead letters however often it is read; an interrupted\n            dlq migrate; a DLQ pass that was killed (the order it may have changed)\n  events    events nobody is bound for, waiting in the unrouted-events queue\n  redis     the dedup store answers (TLS); its maxmemory-policy cannot evict\n  api       an authenticated GET /v3/groups/list?limit=1 that creates nothing\n\nExample (Kubernetes init step):\n  group-provisioner check --config /etc/provisioner.toml --no-declare"
    )]
    Check {
        /// Declare nothing: verify the topology through the management API (as
        /// `topology.declare = "verify"` does).
        #[arg(long)]
        no_declare: bool,
        /// One JSON object: {"ok", "failed", "items": [{"status", "item", "detail"}]}.
        #[arg(long)]
        json: bool,
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
        /// The summary as one JSON object: {"sent", "invalid", "failed"}.
        #[arg(long)]
        json: bool,
    },
    /// Events nobody was bound for (kept in the unrouted-events queue).
    #[command(subcommand)]
    Events(EventsCommand),
    /// Print the JSON Schema (2020-12) of the command or of an event (docs/contract.md).
    #[command(
        after_help = "Examples:\n  group-provisioner schema command > command.schema.json\n  group-provisioner schema created\n  group-provisioner schema failed"
    )]
    Schema {
        /// Which body: command, created or failed.
        #[arg(value_enum)]
        which: SchemaKind,
    },
    /// The DLQ web console on its own listener (console.listen, default 127.0.0.1:9465):
    /// overview, dead letters, ext id stories, replay and discard with a confirmation.
    #[command(
        after_help = "Logins: console.operator_user / console.operator_password (may replay, discard and\ndownload exports) and console.viewer_user / console.viewer_password (may only look);\nit refuses to start without a password for at least one of them, except on a loopback\naddress with --no-auth. Every action and login is a log line (JSON, like the worker's).\n\nExample:\n  PROVISIONER__CONSOLE__OPERATOR_PASSWORD=... group-provisioner console --config /etc/provisioner.toml"
    )]
    Console {
        /// Let anyone who reaches the listener act, without a login: only on a loopback
        /// address, and only when no password is configured.
        #[arg(long)]
        no_auth: bool,
    },
    /// What happened to one ext id: the dedup record, the POSTs made, and the last outcome
    /// with where the message is now (exit 0 known, 1 unknown, 3 store unreachable).
    #[command(
        after_help = "States: created (org_unit_id, when, API request id), claimed (a worker is on it:\nowner and lease left), dead_lettered, deferred (a transient failure or a claim held\nelsewhere: waiting in a delay tier), parked (a fault of the system: waiting in a delay\ntier, not charged), requeued, failed (not settled: the broker delivers it again),\nattempted (POSTs were made; nothing else kept), unreadable, unknown.\nThe last outcome says where the message is now: done, in delay queue Q until about T,\nin the dead-letter queue, back in the work queue.\nAn invalid command without a valid ext id is kept by its message id instead.\nEverything is kept dedup.ttl.\n\nExit codes: 0 known, 1 unknown, 2 bad argument or configuration, 3 the dedup store\ncannot be reached.\n\nExamples:\n  group-provisioner status ORG-2001\n  group-provisioner status ORG-2001 --json\n  group-provisioner status --message-id 7f6c1e9a-2b1d-4c55-9f0e-0d3c4a1b2e77"
    )]
    Status {
        /// The ext id (org_unit_ext_id) to look up.
        #[arg(required_unless_present = "message_id", conflicts_with = "message_id")]
        ext_id: Option<String>,
        /// Look up an invalid command by its AMQP message_id instead.
        #[arg(long, value_name = "ID")]
        message_id: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Publish the events kept in the unrouted-events queue to the event exchange again
    /// (confirmed, mandatory, then acked); the rest stay, in order.
    #[command(
        after_help = "Run it once a queue is bound to the event exchange for the events' routing keys.\nAn event that still has no queue comes back to the unrouted queue (counted as came_back).\n\nExamples:\n  group-provisioner events replay-unrouted --dry-run\n  group-provisioner events replay-unrouted --event group.create.failed\n  group-provisioner events replay-unrouted --ext-id ORG-2001"
    )]
    ReplayUnrouted(ops::events::UnroutedFilter),
}

/// Which schema `schema` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SchemaKind {
    /// The command body (published to provisioning / group.create).
    Command,
    /// The group.created event.
    Created,
    /// The group.create.failed event.
    Failed,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Count dead letters, by x-error-kind. Removes nothing.
    #[command(after_help = "Example:\n  group-provisioner dlq stats --json")]
    Stats {
        /// One JSON object: count, by_kind, oldest.
        #[arg(long)]
        json: bool,
    },
    /// Show dead letters (body and reason headers) in queue order. Removes nothing.
    #[command(after_help = "Example:\n  group-provisioner dlq peek --limit 5")]
    Peek {
        /// How many to show: a positive number, or all.
        #[arg(long, default_value = "10", value_parser = ops::dlq::kinds::parse_limit)]
        limit: ops::dlq::kinds::Limit,
        /// One JSON object per line (the export format).
        #[arg(long)]
        json: bool,
    },
    /// Write every dead letter to a JSON-lines file for audit. Removes nothing.
    #[command(
        after_help = "The file is written beside its target (owner-only) and renamed over it when complete.\nOnly a regular file or a new path is accepted; - writes to standard output.\n\nExamples:\n  group-provisioner dlq export --out dlq-2026-11-26.jsonl\n  group-provisioner dlq export --out - | gzip > dlq.jsonl.gz"
    )]
    Export {
        /// Where to write: a regular file (replaced when complete), a new path, or -.
        #[arg(long, value_name = "FILE.jsonl|-")]
        out: PathBuf,
    },
    /// Move matching dead letters back to the command exchange (confirmed publish, then ack).
    #[command(
        after_help = "Messages that do not match stay in the DLQ, in order. Each replay adds 1 to\nx-replay-count and resets x-attempts; a message replayed --max-replays times is\nskipped (kept). Ctrl-C stops after the current message and returns the rest.\nReplays are safe: the worker never creates a group twice for one ext id.\n\nExamples:\n  group-provisioner dlq replay --kind rejected --dry-run\n  group-provisioner dlq replay --kind retries_exhausted --rate 20\n  group-provisioner dlq replay --ext-id ORG-2001"
    )]
    Replay(ops::dlq::ReplayFilter),
    /// Remove dead letters that will never succeed (e.g. an invalid command already resent
    /// fixed), after writing them to --export FILE (or with --yes).
    #[command(
        after_help = "Only matching dead letters are removed; the rest stay, in order. With --export, the\nfile is written (owner-only, synced) before anything is removed, and only the dead\nletters written to it are removed.\n\nExamples:\n  group-provisioner dlq discard --kind invalid_command --older-than 7d --dry-run\n  group-provisioner dlq discard --ext-id ORG-2001 --export discarded-ORG-2001.jsonl\n  group-provisioner dlq discard --kind name_conflict --yes"
    )]
    Discard(ops::dlq::DiscardFilter),
    /// Give a DLQ declared by an earlier version this version's arguments, keeping every
    /// dead letter and its order.
    #[command(
        after_help = "Needed once when `check` reports the DLQ as declared by an earlier version (the\ndlq tools refuse to read it: on RabbitMQ 4.x reading it could cost dead letters).\nThe dead letters are moved to <dlq>.migrating, the DLQ is deleted (only when empty)\nand declared anew, and they are moved back, in order. Workers may keep running: a\ndead letter they write meanwhile is parked and retried. If interrupted, run it again.\n\nExample:\n  group-provisioner dlq migrate"
    )]
    Migrate,
}

/// How the process ends. The codes are part of the operator interface (scripts and
/// Kubernetes read them), so they are chosen here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done; for `check`, every item passed; for `status`, the ext id is known.
    Success,
    /// 1: the command ran and something failed (a check item, a send, the broker).
    Failure,
    /// 1: `status`: nothing is known of the ext id.
    Unknown,
    /// 2: the invocation is wrong: a configuration error, a bad argument, an unreadable
    /// input file.
    Usage,
    /// 3: `status`: the dedup store cannot be reached, so nothing can be said.
    Unavailable,
    /// 130: stopped by SIGINT or SIGTERM before the end (a pass over the DLQ).
    Interrupted,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure | Exit::Unknown => 1,
            Exit::Usage => 2,
            Exit::Unavailable => 3,
            Exit::Interrupted => 130,
        }
    }

    fn for_ops_error(e: &OpsError) -> Exit {
        match e {
            OpsError::BadArgument(_) | OpsError::Input { .. } => Exit::Usage,
            OpsError::Store { .. } => Exit::Unavailable,
            OpsError::Interrupted { .. } => Exit::Interrupted,
            _ => Exit::Failure,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

fn config_error(e: &ConfigError) -> Exit {
    errln!("{e}");
    Exit::Usage
}

fn success_if(ok: bool) -> Exit {
    if ok { Exit::Success } else { Exit::Failure }
}

/// Print an operator command's error as one line and choose its exit code.
fn ops_result<T>(command: &str, result: Result<T, OpsError>, exit: impl FnOnce(T) -> Exit) -> Exit {
    match result {
        Ok(value) => exit(value),
        Err(e) => {
            errln!("{command}: {e}");
            Exit::for_ops_error(&e)
        }
    }
}

pub fn load_settings(cli: &Cli) -> Result<Settings, Exit> {
    let needs_api = matches!(cli.command, Command::Run | Command::Check { .. });
    let loaded = if needs_api {
        Settings::load(cli.config.as_deref())
    } else {
        Settings::load_without_credentials(cli.config.as_deref())
    };
    loaded.map_err(|e| config_error(&e))
}

async fn run_worker(settings: Settings) -> Exit {
    match crate::worker::run(settings).await {
        Ok(()) => Exit::Success,
        Err(StartError::App(crate::app::AppError::Config(e))) => config_error(&e),
        Err(e) => {
            tracing::error!(error = %e, "worker cannot start");
            Exit::Failure
        }
    }
}

/// Where the settings came from, in words.
fn config_source(cli: &Cli) -> String {
    match &cli.config {
        Some(p) => p.display().to_string(),
        None if std::path::Path::new(crate::config::DEFAULT_CONFIG_PATH).is_file() => {
            crate::config::DEFAULT_CONFIG_PATH.to_owned()
        }
        None => "defaults and environment".to_owned(),
    }
}

/// What an operator command reads: (the broker, Redis); `None` for the others, and for
/// one asked for JSON (scripts read that).
fn reads(command: &Command) -> Option<(bool, bool)> {
    let text = |json: bool, reads: (bool, bool)| (!json).then_some(reads);
    match command {
        Command::Dlq(DlqCommand::Stats { json } | DlqCommand::Peek { json, .. }) => {
            text(*json, (true, true))
        }
        Command::Dlq(DlqCommand::Export { .. }) => Some((true, true)),
        Command::Dlq(DlqCommand::Migrate) => Some((true, false)),
        Command::Dlq(DlqCommand::Discard(f)) => text(f.json, (true, true)),
        Command::Dlq(DlqCommand::Replay(f)) => text(f.json, (true, true)),
        Command::Events(EventsCommand::ReplayUnrouted(f)) => text(f.json, (true, true)),
        Command::Send { json, .. } => text(*json, (true, false)),
        Command::Status { json, .. } => text(*json, (false, true)),
        _ => None,
    }
}

/// One line on stderr before an operator command's text output: which broker vhost,
/// Redis and key prefix it reads, and where those settings came from — so that a command
/// run without the intended configuration says so at once.
fn say_what_is_read(cli: &Cli, settings: &Settings) {
    let Some((broker, redis)) = reads(&cli.command) else {
        return;
    };
    let mut parts = Vec::new();
    if broker {
        parts.push(format!(
            "broker {} (vhost {:?})",
            settings.amqp.url,
            crate::amqp::vhost(settings.amqp.url.first().expose())
        ));
    }
    if redis {
        parts.push(format!(
            "redis {} (key prefix {:?})",
            settings.redis.describe(),
            settings.redis.key_prefix
        ));
    }
    errln!(
        "using {}; settings from {}",
        parts.join(", "),
        config_source(cli)
    );
}

/// How to call this binary again with the same configuration, for a command `status`
/// suggests (shell-quoted).
fn invocation(cli: &Cli) -> String {
    match &cli.config {
        Some(p) => format!(
            "group-provisioner --config {}",
            crate::text::shell_quote(&p.display().to_string())
        ),
        None => "group-provisioner".to_owned(),
    }
}

/// A command whose every success exits 0.
fn done<T>(what: &str, result: Result<T, OpsError>) -> Exit {
    ops_result(what, result, |_| Exit::Success)
}

/// The `dlq` subcommands.
async fn dispatch_dlq(command: DlqCommand, settings: &Settings) -> Exit {
    match command {
        DlqCommand::Stats { json } => done("dlq stats", ops::dlq::stats(settings, json).await),
        DlqCommand::Peek { limit, json } => done(
            "dlq peek",
            ops::dlq::peek(settings, limit.max(), json).await,
        ),
        DlqCommand::Export { out } => done("dlq export", ops::dlq::export(settings, &out).await),
        DlqCommand::Migrate => done("dlq migrate", ops::dlq::migrate_command(settings).await),
        DlqCommand::Discard(filter) => done(
            "dlq discard",
            ops::dlq::discard_command(settings, &filter).await,
        ),
        DlqCommand::Replay(filter) => ops_result(
            "dlq replay",
            ops::dlq::replay_command(settings, &filter).await,
            |summary| {
                if summary.interrupted {
                    Exit::Interrupted
                } else {
                    Exit::Success
                }
            },
        ),
    }
}

/// Run the subcommand to its end.
pub async fn dispatch(cli: Cli, settings: Settings) -> Exit {
    say_what_is_read(&cli, &settings);
    let again = invocation(&cli);
    match cli.command {
        Command::Run => run_worker(settings).await,
        Command::Console { no_auth } => match crate::console::run(settings, no_auth).await {
            Ok(()) => Exit::Success,
            Err(crate::console::ConsoleError::Config(e)) => config_error(&e),
            Err(e) => {
                tracing::error!(error = %e, "console cannot run");
                Exit::Failure
            }
        },
        Command::Check { no_declare, json } => {
            let report = ops::check::run(&settings, &config_source(&cli), !no_declare, json).await;
            success_if(report.failed == 0)
        }
        Command::Dlq(command) => dispatch_dlq(command, &settings).await,
        Command::Send {
            file,
            no_validate,
            json,
        } => ops_result(
            "send",
            ops::send::command(&settings, file.as_deref(), !no_validate, json).await,
            |s| success_if(s.all_sent()),
        ),
        Command::Events(EventsCommand::ReplayUnrouted(filter)) => ops_result(
            "events replay-unrouted",
            ops::events::replay_unrouted_command(&settings, &filter).await,
            |_| Exit::Success,
        ),
        Command::Schema { which } => {
            let schema = match which {
                SchemaKind::Command => crate::contract::COMMAND_SCHEMA,
                SchemaKind::Created => crate::contract::CREATED_SCHEMA,
                SchemaKind::Failed => crate::contract::FAILED_SCHEMA,
            };
            match crate::output::verbatim(schema) {
                // A reader that stopped early (`| head`) had what it wanted.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    errln!("schema: cannot write to standard output: {e}");
                    Exit::Failure
                }
                _ => Exit::Success,
            }
        }
        Command::Status {
            ext_id,
            message_id,
            json,
        } => {
            let lookup = match (&ext_id, &message_id) {
                (_, Some(id)) => ops::status::Lookup::MessageId(id),
                (Some(e), None) => ops::status::Lookup::ExtId(e),
                // clap requires one of them.
                (None, None) => ops::status::Lookup::ExtId(""),
            };
            let known = ops::status::run(&settings, lookup, json, &again).await;
            ops_result("status", known, |known| {
                if known { Exit::Success } else { Exit::Unknown }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand and every option says what it is for in `--help`.
    /// The exit-code table in `--help` names every code `Exit` can return.
    #[test]
    fn help_lists_every_exit_code() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for exit in [
            Exit::Success,
            Exit::Failure,
            Exit::Unknown,
            Exit::Usage,
            Exit::Unavailable,
            Exit::Interrupted,
        ] {
            let code = exit.code();
            assert!(
                help.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{code} "))),
                "exit code {code} is not in --help:\n{help}"
            );
        }
        let readme = include_str!("../README.md");
        for code in ["| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"] {
            assert!(
                readme.contains(code),
                "README lacks the exit code row {code}"
            );
        }
    }

    #[test]
    fn every_option_has_help() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && path.contains(' ') && !path.ends_with(" help") {
                missing.push(format!("{path}: no description"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let codes: Vec<u8> = [
            Exit::Success,
            Exit::Failure,
            Exit::Unknown,
            Exit::Usage,
            Exit::Unavailable,
            Exit::Interrupted,
        ]
        .iter()
        .map(|e| e.code())
        .collect();
        assert_eq!(codes, [0, 1, 1, 2, 3, 130]);
        assert_eq!(
            Exit::for_ops_error(&OpsError::BadArgument("x".into())),
            Exit::Usage
        );
    }

    #[test]
    fn config_is_global() {
        let a = Cli::try_parse_from(["gp", "--config", "x.toml", "dlq", "stats"]).expect("before");
        let b = Cli::try_parse_from(["gp", "dlq", "stats", "--config", "x.toml"]).expect("after");
        assert_eq!(a.config, b.config);
    }
}

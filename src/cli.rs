//! Command-line interface of the `group-provisioner` binary (SPEC §7).
//!
//! Invariant: `--config` is global (accepted before or after the subcommand); a config
//! error exits 2 with one line `config error: <key>: <reason>` on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;

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
}

/// Exit code for configuration errors (SPEC §9).
pub const EXIT_CONFIG: u8 = 2;

pub fn load_settings(cli: &Cli) -> Result<Settings, ExitCode> {
    Settings::load(cli.config.as_deref()).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

//! Thin entry point: parse the CLI, load configuration, set up telemetry, dispatch.

use std::process::ExitCode;

use clap::Parser;
use group_provisioner::cli::{self, Cli, Command};
use group_provisioner::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match cli::load_settings(&cli) {
        Ok(s) => s,
        Err(exit) => return exit.into(),
    };
    // Operator commands print for humans; only the worker logs JSON lines to stdout.
    if matches!(cli.command, Command::Run) {
        telemetry::init(&settings.log);
    } else {
        telemetry::init_for_cli();
    }
    cli::dispatch(cli, settings).await.into()
}

//! Thin entry point: parse the CLI, load configuration, set up telemetry, dispatch.

use std::process::ExitCode;

use clap::Parser;
use group_provisioner::cli::{Cli, Command, load_settings};
use group_provisioner::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match load_settings(&cli) {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init(&settings.log);
    match cli.command {
        Command::Run => group_provisioner::worker::run(settings).await,
    }
}

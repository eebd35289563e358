//! Thin entry point: parse the CLI, load configuration, set up telemetry, dispatch.

use std::process::ExitCode;

use clap::Parser;
use group_provisioner::cli::{self, Cli, Command};
use group_provisioner::telemetry;

/// Stack for every thread: the broker client parses (and the worker copies and drops)
/// message headers recursively, and one frame can nest tables some 20,000 levels deep. A
/// hostile header must cost its message, not abort the process (and then every restart,
/// since it is redelivered). Only the pages a thread touches are ever committed.
const THREAD_STACK_BYTES: usize = 256 << 20;

fn main() -> ExitCode {
    // Before any thread exists, so that every thread spawned later (the broker client's
    // I/O thread among them) gets this stack size.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: single-threaded here; nothing reads the environment concurrently.
        unsafe { std::env::set_var("RUST_MIN_STACK", THREAD_STACK_BYTES.to_string()) };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(THREAD_STACK_BYTES)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async_main())
}

async fn async_main() -> ExitCode {
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

//! Thin entry point: parse the CLI, load configuration, set up telemetry, dispatch.

use std::process::ExitCode;

use clap::Parser;
use group_provisioner::amqp::THREAD_STACK_BYTES;
use group_provisioner::cli::{self, Cli, Command};
use group_provisioner::telemetry;

fn main() -> ExitCode {
    // Before any thread exists, so that every thread spawned later (the broker client's
    // I/O thread among them) gets this stack size: deeply nested headers are parsed, copied
    // and dropped recursively (see `THREAD_STACK_BYTES`).
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: single-threaded here; nothing reads the environment concurrently.
        unsafe { std::env::set_var("RUST_MIN_STACK", THREAD_STACK_BYTES.to_string()) };
    }
    // Two malloc arenas instead of eight per core: the worker's threads share a few, which
    // keeps its resident memory small (measured in docs/performance.md).
    // SAFETY: mallopt only tunes glibc's allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
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
    let code = runtime.block_on(async_main());
    // Tasks still running (a lost session's, past the drain) may log as they are dropped.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // Log lines are written in batches: the last ones go out before the process ends.
    telemetry::flush();
    code
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

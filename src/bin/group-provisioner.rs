//! Thin entry point: parse the CLI, load configuration, set up telemetry, dispatch.

use std::process::ExitCode;

use clap::Parser;
use group_provisioner::amqp::{MAX_BLOCKING_THREADS, RUNTIME_STACK_BYTES, THREAD_STACK_BYTES};
use group_provisioner::cli::{self, Cli, Command};
use group_provisioner::telemetry;

fn main() -> ExitCode {
    // First: from here on a panic outside one delivery's work, or a thread that cannot be
    // started, ends the process in one line instead of leaving it half alive.
    group_provisioner::fatal::install();
    // Before any thread exists, so that threads spawned without a size of their own (the
    // broker client's I/O thread among them) get this stack: deeply nested headers are
    // parsed recursively there (see `THREAD_STACK_BYTES`).
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
    // Worker threads: one per core unless TOKIO_WORKER_THREADS says otherwise.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(RUNTIME_STACK_BYTES)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => group_provisioner::fatal::exit(&format!(
            "cannot start the async runtime ({e}): see docs/deployment.md, \"Resource limits\""
        )),
    };
    let code = runtime.block_on(async_main());
    group_provisioner::fatal::exiting();
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

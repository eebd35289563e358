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
    // Before any thread exists (`sys`): threads spawned without a size of their own (the
    // broker client's I/O thread among them) get a deep stack, and malloc keeps two arenas.
    group_provisioner::sys::set_min_stack(THREAD_STACK_BYTES);
    group_provisioner::sys::limit_malloc_arenas();
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
    // Spans still queued go out while the runtime (the gRPC client's) still runs.
    group_provisioner::otel::shutdown(std::time::Duration::from_secs(2));
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
    // Operator commands print for humans; the worker and the console log JSON lines to
    // stdout (the console's are its audit trail).
    let log = match cli.command {
        Command::Console { .. } => Some(group_provisioner::console::log_settings(&settings.log)),
        Command::Run => Some(settings.log.clone()),
        _ => None,
    };
    if let Some(log) = log {
        if let Err(e) = telemetry::init(&log) {
            group_provisioner::output::eprint(format_args!("config error: {e}"));
            return ExitCode::from(2);
        }
    } else {
        telemetry::init_for_cli();
    }
    cli::dispatch(cli, settings).await.into()
}

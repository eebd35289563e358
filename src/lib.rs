//! group-provisioner: takes "create group" commands from RabbitMQ, deduplicates them by
//! external id in Redis, creates the group through the Convirza Platform API v3 and
//! publishes the outcome as an event. The README maps the contract to the code.
//!
//! Layout (dependencies point downwards only):
//! - `cli` — the one way in: arguments, settings, exit codes;
//! - `worker`, `ops` — the long-running worker and the operator commands;
//! - `app` — wiring: settings → the clients both of them use;
//! - adapters, one per outside system: `amqp` (RabbitMQ), `dedup` (Redis), `convirza`
//!   (the HTTP API), `metrics` + `http` (Prometheus, probes), `telemetry` (logs),
//!   `config` (TOML and environment);
//! - `pipeline` — the core, which decides what to do with one delivery and sees the
//!   outside only through its ports;
//! - pure building blocks: `command` (parsing), `retry` (the retry policy), `traceparent`,
//!   `clock`, `hash`, `secret`, `text` (untrusted text made printable);
//! - `output` — standard output, for every command's report;
//! - `sim` — `convirza-sim`, the API stand-in (feature `sim`, on by default).

// First: its `outln!` is used by the modules below.
#[macro_use]
pub mod output;

/// A closed set of labels (logs, metrics, events): the enum, `ALL` in declaration order and
/// `as_str`, from one list of variants and their labels.
macro_rules! closed_set {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $variant:ident = $label:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $variant,)* }

        impl $name {
            // Metrics start every label at 0 from it; not every set is a metric's label.
            #[allow(dead_code)]
            pub const ALL: [$name; [$($label),*].len()] = [$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $label,)* }
            }
        }
    };
}

/// A mutex's guard, even when a panicking holder poisoned it. Every value behind these
/// mutexes is replaced whole in one statement, so a panic cannot leave one half-written, and
/// one task's panic must not become a panic in every later task that takes the lock.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub mod amqp;
pub mod app;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod console;
pub mod contract;
pub mod convirza;
pub mod dedup;
pub mod fatal;
pub mod hash;
pub mod http;
pub mod id;
pub mod metrics;
pub mod ops;
pub mod otel;
pub mod pipeline;
pub mod retry;
pub mod secret;
pub mod shutdown;
#[cfg(feature = "sim")]
pub mod sim;
pub mod sys;
pub mod telemetry;
pub mod text;
pub mod traceparent;
pub mod worker;

/// The version stamped on dead letters and logs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit this binary was built from (`build.rs`), or `unknown`.
pub const COMMIT: &str = env!("GP_COMMIT");

/// What `--version` prints after the program's name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("GP_COMMIT"),
    ")"
);

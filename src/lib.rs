//! group-provisioner: takes "create group" commands from RabbitMQ, deduplicates them by
//! external id in Redis, creates the group through the Convirza Platform API v3 and
//! publishes the outcome as an event. The contract is SPEC.md; the README maps it to code.
//!
//! Layout: one module per outside system (`config`, `convirza`, and later `amqp`, `dedup`),
//! the pure policies (`command`, `retry`), and `sim`, the API simulator.

pub mod amqp;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod convirza;
pub mod dedup;
pub mod hash;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod retry;
pub mod secret;
pub mod shutdown;
pub mod sim;
pub mod telemetry;
pub mod traceparent;
pub mod worker;

/// The version stamped on dead letters and logs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

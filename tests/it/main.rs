//! Integration tests: one binary, shared helpers. Real RabbitMQ and Redis on loopback,
//! convirza-sim in process on port 0. Every test isolates itself (own vhost or prefixed
//! names, own Redis key prefix) so the suite runs in parallel and twice in a row.

mod auth;
mod browser;
mod cli;
mod client;
mod cluster;
mod console;
mod contract;
mod core;
mod deploy;
mod docs;
mod endpoint;
mod events;
mod faults;
mod guarantees;
mod helpers;
mod hostile;
mod layout;
mod limits;
mod logs;
mod ops;
mod passes;
mod pipeline;
mod privilege;
mod process;
mod redis_modes;
mod redis_scripts;
mod secrets;
mod tls;
mod traces;

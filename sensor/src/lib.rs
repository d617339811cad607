//! `sensor`: the agent, the collector and the command-line views, as a library; the `sensor`
//! binary (`main.rs`) only parses the command line and dispatches here.
//!
//! The modules are the architecture (docs/architecture.md draws them and the data's path). Each
//! imports only modules listed before it:
//!
//! 1. `stdout`, `pace`: standard output for one-shot commands (quiet on a closed pipe);
//!    yielding the CPU to the host's own work during long loops.
//! 2. `model`: keys, per-client counters in bounded memory, the connection table, rows as views
//!    show them, saved state.
//! 3. `detect`: the rule engine, alert state, baselines.
//! 4. `ship`: the agent -> collector wire format, shared by the agent's sink and the collector.
//! 5. `formats`: the alert event model and its SIEM renderings (CEF, LEEF, ECS, OCSF).
//! 6. `net`: the network stack (hyper, rustls): server plumbing, the Prometheus exposition,
//!    the HTTP client, TLS material and secret files.
//! 7. `sinks`: delivery of events (syslog, HEC, file, webhook, the collector) with spool and retry.
//! 8. `config`: the agent's configuration (with the sinks' and shipping sections).
//! 9. `alerting`, `kernel`, `cli`: detection setup and the alert log; the kernel programs (one
//!    bpf syscall chokepoint, probing, decoding); every command's arguments.
//! 10. `benchagg`: the aggregation benchmark (hidden command).
//! 11. `agent`: `sensor run` (capture loop, state, identities, the local API, Prometheus).
//! 12. `service`, `views`: the systemd service and its checks; the one-shot views and `top`.
//! 13. `collector`: `sensor collector`, the fleet tier.

mod stdout;

mod pace;

mod model;

mod detect;

mod ship;

mod formats;

mod net;

mod sinks;

mod config;

mod alerting;
pub mod cli;
mod kernel;

pub mod benchagg;

pub mod agent;

pub mod service;
pub mod views;

pub mod collector;

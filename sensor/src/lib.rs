//! `sensor`: the agent, the collector and the command-line views, as a library; the `sensor`
//! binary (`main.rs`) only parses the command line and dispatches here.
//!
//! Modules import only downward, in this order (each may use those listed before it):
//!
//! 1. `keys`, `stdout`: key kinds; standard output for one-shot commands.
//! 2. `aggregate`: per-client counters in bounded memory.
//! 3. `conntable`, `detect`, `report`: connections, the rule engine, rows as views show them.
//! 4. `state`, `wire`: saved state; the agent -> collector wire format.
//! 5. `outputs`: SIEM outputs and the agent's shipping sink.
//! 6. `config`: the agent's configuration (with the outputs' and the sink's sections).
//! 7. `alerting`, `capture`, `cli`, `identity`: detection setup and the alert log, the kernel
//!    programs, every command's arguments, API-key identities.
//! 8. `api`, `benchagg`: the local API; the aggregation benchmark.
//! 9. `metrics`, `service`, `views`: Prometheus, the systemd service, the one-shot views.
//! 10. `agent`, `collector`, `top`: `sensor run`, `sensor collector`, `sensor top`.

mod keys;
mod stdout;

mod aggregate;

mod conntable;
mod detect;
mod report;

mod state;
mod wire;

mod outputs;

mod config;

mod alerting;
mod capture;
pub mod cli;
mod identity;

mod api;
pub mod benchagg;

mod metrics;
pub mod service;
pub mod views;

pub mod agent;
pub mod collector;
pub mod top;

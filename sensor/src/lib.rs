//! `sensor`: the agent, the collector and the command-line views, as a library; the `sensor`
//! binary (`main.rs`) only parses the command line and dispatches here.

pub mod agent;
mod aggregate;
mod alerting;
mod api;
pub mod benchagg;
mod capture;
pub mod cli;
pub mod collector;
mod config;
mod conntable;
mod detect;
mod identity;
mod keys;
mod metrics;
mod outputs;
mod report;
pub mod service;
mod state;
mod stdout;
pub mod top;
pub mod views;
mod wire;

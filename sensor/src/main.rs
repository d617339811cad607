//! `sensor`: the agent and its command line.

mod agent;
mod aggregate;
mod api;
mod benchagg;
mod capture;
mod cli;
mod config;
mod conntable;
mod metrics;
mod report;
mod state;
mod views;

use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(agent::run(args)),
        cli::Command::Conns(args) => views::conns(&args),
        cli::Command::Clients(args) => views::clients(&args),
        cli::Command::BenchAggregate(args) => benchagg::run(&args),
    }
}

//! `sensor`: parses the command line and dispatches to the library.

use clap::Parser as _;
use sensor::{agent, benchagg, cli, collector, service, views, views::top};

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run(args) => {
            agent::tune_allocator();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(args))
        }
        cli::Command::Collector(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(collector::run(args)),
        cli::Command::Conns(args) => views::conns(&args),
        cli::Command::Clients(args) => views::clients(&args),
        cli::Command::Identity(args) => views::identity(&args),
        cli::Command::Alerts(args) => views::alerts(&args),
        cli::Command::Top(args) => top::run(&args),
        // systemd service (sensor/src/service).
        cli::Command::Install(args) => service::install::install(&args),
        cli::Command::Uninstall(args) => service::install::uninstall(&args),
        cli::Command::CheckConfig(args) => service::check::check_config(&args),
        cli::Command::Status(args) => service::status::status(&args),
        cli::Command::Doctor(args) => service::doctor::doctor(&args),
        cli::Command::BenchAggregate(args) => benchagg::run(&args),
        cli::Command::BenchCollector(args) => collector::bench::run(&args),
    }
}

//! ployz-guard: the admission webhook that holds each agent to its own Migrations' workloads
//! and volumes (one Deployment per cluster).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "ployz admission webhook: each node's agent writes only the workloads and volumes of its own Migrations"
)]
struct Cli {
    #[command(flatten)]
    config: ployz::guard::Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ployz::entry::run(ployz::guard::run(cli.config))
}

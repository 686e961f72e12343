//! ployz-controller: the per-node agent (one per machine, as a DaemonSet).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "ployz per-node agent: moves workloads and their ZFS volumes between machines"
)]
struct Cli {
    #[command(flatten)]
    config: ployz::agent::Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Crash points of the fault tests, set by FAILPOINTS (built with `--features failpoints`).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    ployz::entry::run(ployz::agent::run(cli.config))
}

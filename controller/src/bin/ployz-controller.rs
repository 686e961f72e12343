//! ployz-controller: the per-node agent. The reconciler lands with issue 5; until then this
//! binary only reports its version, and refuses to run rather than pretend to.

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("ployz-controller {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!("error: the ployz agent is not implemented yet in this build");
    ExitCode::FAILURE
}

//! ployzctl: the ployz command line.

mod cli;
mod error;
mod migrate;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use ployz::manifest::Format;

use crate::cli::{Cli, Command, MigrateCommand};
use crate::error::CliError;

fn run(cli: &Cli) -> Result<String, CliError> {
    let format = if cli.global.json {
        Format::Json
    } else {
        Format::Yaml
    };
    match &cli.command {
        Command::Migrate(MigrateCommand::RenderManifest(args)) => {
            migrate::render_manifest(args, format)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                // `ployzctl ... | head` closing the pipe is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing output: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

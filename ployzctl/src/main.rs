//! ployzctl: the ployz command line.

mod cli;
mod cluster;
mod error;
mod machine;
mod migrate;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use ployz::manifest::Format;

use crate::cli::{Cli, Command, MachineCommand, MigrateCommand};
use crate::error::CliError;

fn run(cli: &Cli) -> Result<String, CliError> {
    let format = if cli.global.json {
        Format::Json
    } else {
        Format::Yaml
    };
    // Only commands that talk to the cluster need a runtime and a client.
    let cluster = || -> Result<(tokio::runtime::Runtime, kube::Client), CliError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let client = rt.block_on(cluster::client(&cli.global))?;
        Ok((rt, client))
    };
    match &cli.command {
        Command::Migrate(MigrateCommand::RenderManifest(args)) => {
            migrate::render_manifest(args, format)
        }
        Command::Migrate(MigrateCommand::Preview(args)) => {
            migrate::build(args)?;
            let (rt, client) = cluster()?;
            rt.block_on(migrate::preview(client, args, format))
        }
        Command::Migrate(MigrateCommand::Apply { args, no_wait }) => {
            migrate::build(args)?;
            let (rt, client) = cluster()?;
            rt.block_on(migrate::apply(client, args, *no_wait, format))
        }
        Command::Migrate(MigrateCommand::Watch { migration }) => {
            let (rt, client) = cluster()?;
            let api = kube::Api::namespaced(client, &migration.namespace);
            rt.block_on(migrate::follow(api, &migration.service, format))
        }
        Command::Migrate(MigrateCommand::Abandon(args)) => {
            let (rt, client) = cluster()?;
            rt.block_on(migrate::resolve(
                client,
                args,
                migrate::Decision::Abandon,
                format,
            ))
        }
        Command::Migrate(MigrateCommand::Complete(args)) => {
            let (rt, client) = cluster()?;
            rt.block_on(migrate::resolve(
                client,
                args,
                migrate::Decision::Complete,
                format,
            ))
        }
        Command::Machine(MachineCommand::Ls) => {
            let (rt, client) = cluster()?;
            rt.block_on(machine::ls(client, format))
        }
        Command::Machine(MachineCommand::Drain { machine, undo }) => {
            let (rt, client) = cluster()?;
            rt.block_on(machine::drain(client, machine, *undo, format))
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

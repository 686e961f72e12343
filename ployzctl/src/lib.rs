//! ployzctl: the ployz command line, also installed as the kubectl plugin `kubectl ployz`.

mod cli;
mod cluster;
mod error;
mod machine;
mod migrate;
mod output;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use ployz::names::{Ref, ServiceRef};

use crate::cli::{Cli, Command, GlobalArgs, MachineCommand, MigrateCommand};
use crate::error::CliError;

/// A cluster connection, made only by the commands that need one.
struct Session {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

impl Session {
    fn connect(global: &GlobalArgs) -> Result<Self, CliError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let client = rt.block_on(cluster::client(global))?;
        Ok(Self { rt, client })
    }

    /// `r` in its namespace: its own, `-n`, or the kubeconfig context's.
    fn resolve(&self, global: &GlobalArgs, r: &Ref) -> Result<ServiceRef, CliError> {
        r.resolve(global.namespace.as_deref(), self.client.default_namespace())
            .map_err(CliError::usage)
    }
}

fn run(cli: &Cli, bin: &str) -> Result<String, CliError> {
    let g = &cli.global;
    let out = g.output();
    match &cli.command {
        Command::Completion { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), bin, &mut buf);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        Command::Migrate(MigrateCommand::RenderManifest(args)) => {
            let w = args
                .workload
                .resolve(g.namespace.as_deref(), &cluster::context_namespace(g))
                .map_err(CliError::usage)?;
            migrate::render_manifest(args, &w, out)
        }
        Command::Migrate(MigrateCommand::Preview(args)) => {
            // Bad input fails before any cluster is needed.
            precheck(args)?;
            let s = Session::connect(g)?;
            let w = s.resolve(g, &args.workload)?;
            s.rt.block_on(migrate::preview(s.client.clone(), args, &w, out))
        }
        Command::Migrate(MigrateCommand::Apply { args, no_wait }) => {
            precheck(args)?;
            let s = Session::connect(g)?;
            let w = s.resolve(g, &args.workload)?;
            s.rt.block_on(migrate::apply(s.client.clone(), args, &w, *no_wait, out))
        }
        Command::Migrate(MigrateCommand::Watch { migration }) => {
            let s = Session::connect(g)?;
            let m = s.resolve(g, migration)?;
            s.rt.block_on(migrate::watch(s.client.clone(), &m, out))
        }
        Command::Migrate(MigrateCommand::Ls { all_namespaces }) => {
            let s = Session::connect(g)?;
            let ns = if *all_namespaces {
                None
            } else {
                Some(
                    g.namespace
                        .clone()
                        .unwrap_or_else(|| s.client.default_namespace().to_string()),
                )
            };
            s.rt.block_on(migrate::ls(s.client.clone(), ns.as_deref(), out))
        }
        Command::Migrate(MigrateCommand::Describe { migration }) => {
            let s = Session::connect(g)?;
            let m = s.resolve(g, migration)?;
            s.rt.block_on(migrate::describe(s.client.clone(), &m, out))
        }
        Command::Migrate(MigrateCommand::Cancel(args)) => {
            let s = Session::connect(g)?;
            let m = s.resolve(g, &args.migration)?;
            s.rt.block_on(migrate::cancel(s.client.clone(), &m, args.no_wait, out))
        }
        Command::Migrate(c @ (MigrateCommand::Abandon(args) | MigrateCommand::Complete(args))) => {
            let decision = match c {
                MigrateCommand::Abandon(_) => migrate::Decision::Abandon,
                _ => migrate::Decision::Complete,
            };
            let s = Session::connect(g)?;
            let m = s.resolve(g, &args.migration)?;
            s.rt.block_on(migrate::resolve(
                s.client.clone(),
                &m,
                args.no_wait,
                decision,
                out,
            ))
        }
        Command::Machine(MachineCommand::Ls) => {
            let s = Session::connect(g)?;
            s.rt.block_on(machine::ls(s.client.clone(), out))
        }
        Command::Machine(MachineCommand::Drain {
            machine,
            to,
            evacuate,
            undo,
        }) => {
            let s = Session::connect(g)?;
            let to = match (to, evacuate) {
                (Some(t), _) => machine::MoveTo::Machine(t.clone()),
                (None, true) => machine::MoveTo::Roomiest,
                (None, false) => machine::MoveTo::Nowhere,
            };
            s.rt.block_on(machine::drain(s.client.clone(), machine, to, *undo, out))
        }
    }
}

/// Checks a request as far as it can without a cluster: the namespace and an address given
/// to --to are resolved later.
fn precheck(args: &cli::MigrationArgs) -> Result<(), CliError> {
    let r = &args.workload;
    let workload = ServiceRef {
        namespace: r.namespace.clone().unwrap_or_else(|| "default".into()),
        service: r.name.clone(),
    };
    match &args.to {
        cli::Target::Name(to) => migrate::build(args, &workload, to).map(drop),
        cli::Target::Address(_) => Ok(()),
    }
}

/// Runs the command line as `bin` (`ployzctl`, or `kubectl ployz` for the plugin).
pub fn main(bin: &'static str) -> ExitCode {
    let matches = Cli::command().name(bin).bin_name(bin).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(&cli, bin) {
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

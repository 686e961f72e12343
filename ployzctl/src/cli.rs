//! Command-line definition. Parsing turns raw arguments into validated values once (names,
//! references, enums), so commands work with types that cannot be wrong.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ployz::api::{Compression, SourceCopy};
use ployz::names::{MachineName, NameKind, Ref, RefError};

/// ployzctl: move stateful workloads and their ZFS volumes between machines.
#[derive(Debug, Parser)]
#[command(name = "ployzctl", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes, spelled as kubectl spells them.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Output format instead of the human one: json, yaml, wide (tables with more columns) or
    /// name (`kind.group/name` only). `apply` and `watch` print one JSON object per event.
    #[arg(short, long, global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputArg>,
    /// Same as `-o json`.
    #[arg(long, global = true, conflicts_with = "output")]
    pub json: bool,
    /// The namespace of a NAME given without one (default: the kubeconfig context's namespace,
    /// else "default").
    #[arg(short, long, global = true, value_name = "NAMESPACE", value_parser = namespace)]
    pub namespace: Option<String>,
    /// Path to a kubeconfig file (default: the files $KUBECONFIG lists, merged, then
    /// ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
}

impl GlobalArgs {
    /// The output asked for, `--json` being `-o json`.
    pub fn output(&self) -> Option<OutputArg> {
        if self.json {
            Some(OutputArg::Json)
        } else {
            self.output
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputArg {
    Json,
    Yaml,
    Wide,
    Name,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Move workloads between machines.
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// The machines ployz agents publish.
    #[command(subcommand)]
    Machine(MachineCommand),
    /// Print a shell completion script: `source <(ployzctl completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `--to`: a machine's name, or one of its addresses (resolved against the cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Name(MachineName),
    Address(std::net::IpAddr),
}

impl std::str::FromStr for Target {
    type Err = ployz::names::InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(Target::Address(ip));
        }
        if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
            return Ok(Target::Address(addr.ip()));
        }
        s.parse().map(Target::Name)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Name(n) => write!(f, "{n}"),
            Target::Address(a) => write!(f, "{a}"),
        }
    }
}

fn namespace(s: &str) -> Result<String, ployz::names::InvalidName> {
    ployz::names::validate(NameKind::Namespace, s)?;
    Ok(s.to_string())
}

fn workload(s: &str) -> Result<Ref, RefError> {
    Ref::parse(NameKind::Service, s)
}

fn migration(s: &str) -> Result<Ref, RefError> {
    Ref::parse(NameKind::Migration, s)
}

#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// List machines: readiness, drain state, pool, free space, ZFS.
    Ls,
    /// Empty a machine: cordon its node, mark it draining (no incoming migrations), find
    /// every workload with a ZFS volume on it and, with --to or --evacuate, move each away
    /// (one Migration per workload, each result reported); without them, list what is there.
    Drain {
        machine: MachineName,
        /// Move every workload found to this machine.
        #[arg(long, value_name = "MACHINE", conflicts_with_all = ["undo", "evacuate"])]
        to: Option<MachineName>,
        /// Move every workload found to the Ready machine with the most free space.
        #[arg(long, conflicts_with = "undo")]
        evacuate: bool,
        /// Undo a drain: uncordon the node, accept migrations again.
        #[arg(long)]
        undo: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Print a Migration manifest for `kubectl apply -f` or a GitOps repository. Needs no cluster.
    #[command(
        after_help = "Example:\n  ployzctl migrate render-manifest production/web --to machine-b | kubectl apply -f -"
    )]
    RenderManifest(MigrationArgs),
    /// Dry run: resolve the workload and its volumes and check the move the way the controller
    /// will, without changing anything.
    Preview(MigrationArgs),
    /// Create the Migration and follow it until it ends (exit 0 when the workload runs on
    /// the target).
    Apply {
        #[command(flatten)]
        args: MigrationArgs,
        /// Create the Migration and return without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Follow an existing Migration until it ends.
    Watch {
        #[arg(value_name = "MIGRATION", value_parser = migration)]
        migration: Ref,
    },
    /// List Migrations, in flight and ended, newest last.
    #[command(visible_alias = "list")]
    Ls {
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Show one Migration: its plan, volumes, passes, bytes, downtime, events and what to do
    /// next.
    Describe {
        #[arg(value_name = "MIGRATION", value_parser = migration)]
        migration: Ref,
    },
    /// Stop a Migration in flight and move the workload back to the source; the Migration
    /// stays, ended Cancelled. One that has not started is deleted.
    Cancel(ResolveArgs),
    /// End a Migration in flight with the workload on the source, for when no automatic
    /// choice is safe (docs/runbook.md): a rollback stops waiting for pods on the target.
    /// Run it only once the target machine is off or its pods are gone.
    Abandon(ResolveArgs),
    /// Finish a Migration on the target however long it takes: once the target holds the
    /// final delta, the cutover no longer rolls back on a timeout or an unreachable target.
    Complete(ResolveArgs),
}

/// A Migration the operator decides about.
#[derive(Debug, Args)]
pub struct ResolveArgs {
    #[arg(value_name = "MIGRATION", value_parser = migration)]
    pub migration: Ref,
    /// Record the decision and return without following the Migration to its end.
    #[arg(long)]
    pub no_wait: bool,
}

/// What to migrate, where, and how.
#[derive(Debug, Args)]
pub struct MigrationArgs {
    /// The workload to move: a Deployment, StatefulSet, or a Service selecting one, as SERVICE
    /// or NAMESPACE/SERVICE.
    #[arg(value_name = "SERVICE", value_parser = workload)]
    pub workload: Ref,
    /// Machine to move it to: its name, or an address it publishes (its agent's endpoint or
    /// one of its node's addresses).
    #[arg(long, value_name = "MACHINE")]
    pub to: Target,
    /// Machine it is expected to run on now; the migration fails instead of moving it from
    /// anywhere else.
    #[arg(long, value_name = "MACHINE")]
    pub from: Option<MachineName>,
    /// Name of the Migration object. render-manifest's default is SERVICE-to-MACHINE (the same
    /// every time, for GitOps); apply's is SERVICE-to-MACHINE-xxxxx, new at each move.
    #[arg(long)]
    pub name: Option<String>,
    /// Transfer rate limit in bytes per second, as a Kubernetes quantity (e.g. 100Mi).
    #[arg(long, value_name = "QUANTITY")]
    pub bandwidth_limit: Option<String>,
    /// Compression on the wire.
    #[arg(long, value_enum)]
    pub compression: Option<CompressionArg>,
    /// What to keep on the source after the move.
    #[arg(long, value_enum)]
    pub source_copy: Option<SourceCopyArg>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompressionArg {
    None,
    Zstd,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::None => Compression::None,
            CompressionArg::Zstd => Compression::Zstd,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SourceCopyArg {
    /// Keep a read-only replica (moving back sends only the delta).
    Replica,
    /// Destroy the source's data after a successful move.
    Delete,
}

impl From<SourceCopyArg> for SourceCopy {
    fn from(c: SourceCopyArg) -> Self {
        match c {
            SourceCopyArg::Replica => SourceCopy::Replica,
            SourceCopyArg::Delete => SourceCopy::Delete,
        }
    }
}

//! The whole local environment: control plane, the cluster network, and the ZFS machines
//! `machine-a` and `machine-b`, each a kwok-managed node. Built once per suite; dropping it
//! (or a signal) tears everything down.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, PostParams};

use crate::controlplane::ControlPlane;
use crate::machine::ZfsMachine;
use crate::network;
use crate::reaper::{self, Resource};
use crate::wait::until;

/// The machines every environment has.
pub const MACHINES: [(&str, Ipv4Addr); 2] = [
    ("machine-a", Ipv4Addr::new(198, 18, 0, 11)),
    ("machine-b", Ipv4Addr::new(198, 18, 0, 12)),
];

/// Name of the ZFS pool on every machine.
pub const POOL: &str = "tank";

#[derive(Debug, Clone)]
pub struct Options {
    /// Names this environment's log directory.
    pub name: String,
    /// Size of each machine's (sparse) pool file.
    pub pool_size: u64,
}

impl Options {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            pool_size: 2 << 30,
        }
    }
}

/// A running environment.
pub struct Env {
    pub rt: tokio::runtime::Runtime,
    pub client: Client,
    pub machines: Vec<ZfsMachine>,
    /// Repository root.
    pub root: PathBuf,
    /// Where component logs go (kept after the run, for post-mortems).
    pub logs: PathBuf,
    /// Scratch files of this run (removed at teardown).
    pub state: PathBuf,
    control_plane: Option<ControlPlane>,
    _lock: File,
}

/// The directory the binaries were built into (`PLOYZ_BIN_DIR`, set by `make`), or the result
/// of running the build script, which is a no-op when they are cached.
pub fn bin_dir(root: &Path) -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PLOYZ_BIN_DIR") {
        return Ok(dir.into());
    }
    let out = crate::process::run(&mut std::process::Command::new(
        root.join("tests/env/build-bins.sh"),
    ))?;
    Ok(PathBuf::from(out.trim()))
}

/// The repository's root directory.
pub fn repo_root() -> Result<PathBuf> {
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("tests/ has no parent")?
        .to_path_buf())
}

/// Where runs keep their journal and scratch files (`PLOYZ_RUN_DIR`); its `.lock` sibling
/// keeps two runs apart.
pub fn run_dir() -> PathBuf {
    PathBuf::from(std::env::var("PLOYZ_RUN_DIR").unwrap_or_else(|_| "/var/tmp/ployz-e2e".into()))
}

impl Env {
    pub fn start(opts: Options) -> Result<Self> {
        let started = Instant::now();
        let root = repo_root()?;
        let run_dir = run_dir();
        let logs = root.join("target/e2e-logs").join(&opts.name);
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs)?;
        let lock = reaper::begin(&run_dir)?;
        let bins = bin_dir(&root)?;
        // The run directory's contents go at teardown; the lock file next to it stays.
        reaper::register(Resource::Dir(run_dir.join("state")));
        let state = run_dir.join("state");
        std::fs::create_dir_all(&state)?;

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        network::create_bridge()?;
        let control_plane = rt.block_on(ControlPlane::start(&bins, &state, &logs))?;
        let client = rt.block_on(control_plane.client())?;
        let mut machines = vec![];
        for (name, ip) in MACHINES {
            machines.push(ZfsMachine::create(name, ip, POOL, opts.pool_size, &state)?);
        }
        let env = Self {
            rt,
            client,
            machines,
            root,
            logs,
            state,
            control_plane: Some(control_plane),
            _lock: lock,
        };
        env.rt.block_on(env.create_nodes())?;
        eprintln!(
            "[harness] environment {:?} ready in {:.1}s (logs in {})",
            opts.name,
            started.elapsed().as_secs_f64(),
            env.logs.display()
        );
        Ok(env)
    }

    pub fn kubeconfig(&self) -> Result<&Path> {
        Ok(&self.control_plane()?.kubeconfig)
    }

    fn control_plane(&self) -> Result<&ControlPlane> {
        self.control_plane.as_ref().context("control plane stopped")
    }

    pub fn machine(&self, name: &str) -> Result<&ZfsMachine> {
        self.machines
            .iter()
            .find(|m| m.name == name)
            .with_context(|| format!("no machine {name}"))
    }

    /// Runs a future on the environment's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// One kwok-managed node per machine, waited on until Ready.
    async fn create_nodes(&self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        for m in &self.machines {
            let node: Node = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": m.name,
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                    "labels": {
                        "kubernetes.io/hostname": m.name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        // The topology key OpenEBS zfs-localpv pins its volumes with.
                        "openebs.io/nodeid": m.name,
                        "type": "kwok",
                    },
                },
                "status": {
                    "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                    "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                    "addresses": [{"type": "InternalIP", "address": m.ip().to_string()}],
                },
            }))?;
            nodes.create(&PostParams::default(), &node).await?;
        }
        for m in &self.machines {
            let nodes = nodes.clone();
            until(
                &format!("node {} Ready", m.name),
                Duration::from_secs(60),
                || {
                    let nodes = nodes.clone();
                    let name = m.name.clone();
                    async move { Ok(node_ready(&nodes.get(&name).await?).then_some(())) }
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Fails with the component's log when part of the control plane has died.
    pub fn check_control_plane(&mut self) -> Result<()> {
        match self.control_plane.as_mut() {
            Some(cp) => cp.check_running(),
            None => bail!("control plane stopped"),
        }
    }
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("machines", &self.machines)
            .field("logs", &self.logs)
            .finish_non_exhaustive()
    }
}

pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Drop for Env {
    fn drop(&mut self) {
        // Machines first (their pools), then the control plane, then whatever else was made.
        self.machines.clear();
        self.control_plane.take();
        reaper::release_all();
    }
}

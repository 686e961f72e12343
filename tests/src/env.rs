//! The whole local environment: control plane, the cluster network, and the ZFS machines
//! `machine-a` and `machine-b`, each a real Kubernetes node (kubelet, containerd, runc) unless
//! fake kwok nodes are asked for. Built once per suite; dropping it (or a signal) tears
//! everything down.

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
use crate::node::{self, KubeNode};
use crate::reaper::{self, Resource};
use crate::wait::wait_for;

/// The machines every environment has.
pub const MACHINES: [(&str, Ipv4Addr); 2] = [
    ("machine-a", Ipv4Addr::new(198, 18, 0, 11)),
    ("machine-b", Ipv4Addr::new(198, 18, 0, 12)),
];

/// Name of the ZFS pool on every machine.
pub const POOL: &str = "tank";

/// What plays the machines' nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nodes {
    /// A real kubelet with containerd and runc on every machine: pods run, volumes mount.
    Real,
    /// kwok fakes the kubelets: placement is real, no container runs. For scale tests only.
    Kwok,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Names this environment's log directory.
    pub name: String,
    /// Size of each machine's (sparse) pool file.
    pub pool_size: u64,
    pub nodes: Nodes,
}

impl Options {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            pool_size: 2 << 30,
            nodes: Nodes::Real,
        }
    }
}

/// A running environment.
pub struct Env {
    pub rt: tokio::runtime::Runtime,
    pub client: Client,
    pub machines: Vec<ZfsMachine>,
    /// The machines' real nodes (empty with kwok).
    pub nodes: Vec<KubeNode>,
    /// Repository root.
    pub root: PathBuf,
    /// Where component logs go (kept after the run, for post-mortems).
    pub logs: PathBuf,
    /// Scratch files of this run (removed at teardown).
    pub state: PathBuf,
    control_plane: Option<ControlPlane>,
    _lock: File,
}

/// The directory the binaries were built into (`PLOYZ_BIN_DIR`, set by `make`), or the
/// result of running the build script, which is a no-op when they are cached.
pub fn bin_dir(root: &Path) -> Result<PathBuf> {
    built_dir(root, "PLOYZ_BIN_DIR", "tests/env/build-bins.sh")
}

/// The directory of the locally built images (`PLOYZ_IMAGES_DIR`, set by `make`), or the
/// result of running their build script, which is a no-op when they are cached.
pub fn images_dir(root: &Path) -> Result<PathBuf> {
    built_dir(root, "PLOYZ_IMAGES_DIR", "tests/images/build-images.sh")
}

/// The directory of the test machines' CSI node plugin (`PLOYZ_CSI_NODE_DIR`, set by `make`),
/// or the result of running its build script, a no-op when it is cached.
pub fn csi_node_dir(root: &Path) -> Result<PathBuf> {
    built_dir(root, "PLOYZ_CSI_NODE_DIR", "tests/csi-node/build.sh")
}

/// The helm binary (`PLOYZ_HELM`, set by `make`), or the result of running its build script,
/// a no-op when it is cached.
pub fn helm(root: &Path) -> Result<PathBuf> {
    built_dir(root, "PLOYZ_HELM", "tests/env/build-helm.sh")
}

/// `$var`, or what `script` (which builds into a cache and prints the directory) prints.
fn built_dir(root: &Path, var: &str, script: &str) -> Result<PathBuf> {
    if let Ok(dir) = std::env::var(var) {
        return Ok(dir.into());
    }
    let out = crate::process::run(&mut std::process::Command::new(root.join(script)))?;
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
        let images = match opts.nodes {
            Nodes::Real => Some(images_dir(&root)?),
            Nodes::Kwok => None,
        };
        // The run directory's contents go at teardown; the lock file next to it stays.
        reaper::register(Resource::Dir(run_dir.join("state")));
        let state = run_dir.join("state");
        std::fs::create_dir_all(&state)?;

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        network::create_bridge()?;
        let control_plane = rt.block_on(ControlPlane::start(
            &bins,
            &state,
            &logs,
            opts.nodes == Nodes::Kwok,
        ))?;
        let client = rt.block_on(control_plane.client())?;
        let mut env = Self {
            rt,
            client,
            machines: vec![],
            nodes: vec![],
            root,
            logs,
            state,
            control_plane: Some(control_plane),
            _lock: lock,
        };
        for (name, ip) in MACHINES {
            env.machines.push(ZfsMachine::create(
                name,
                ip,
                POOL,
                opts.pool_size,
                &env.state,
            )?);
        }
        match &images {
            Some(images) => env.start_nodes(&bins, images)?,
            None => env.rt.block_on(env.create_kwok_nodes())?,
        }
        env.wait_nodes_ready()?;
        eprintln!(
            "[harness] environment {:?} ready in {:.1}s (logs in {})",
            opts.name,
            started.elapsed().as_secs_f64(),
            env.logs.display()
        );
        Ok(env)
    }

    /// A client of the API as `user` in `groups`, with the node name a pod-bound
    /// service-account token carries when `node` is given (impersonated by the admin, as the
    /// API server would authenticate a pod on that node).
    pub fn client_as(&self, user: &str, groups: &[&str], node: Option<&str>) -> Result<Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig()?)?;
        let mut config = self.block_on(kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        ))?;
        config.auth_info.impersonate = Some(user.into());
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        config.auth_info.impersonate_user_extra = node.map(|n| {
            [(
                "authentication.kubernetes.io/node-name".to_string(),
                vec![n.to_string()],
            )]
            .into()
        });
        // The client's service is spawned on the environment's runtime.
        let _runtime = self.rt.enter();
        Ok(Client::try_from(config)?)
    }

    /// The chart's agent service account, as the agent pod on `node` authenticates.
    pub fn agent_client(&self, node: Option<&str>) -> Result<Client> {
        self.client_as(
            "system:serviceaccount:ployz-system:ployz-agent",
            &[
                "system:serviceaccounts",
                "system:serviceaccounts:ployz-system",
                "system:authenticated",
            ],
            node,
        )
    }

    pub fn kubeconfig(&self) -> Result<&Path> {
        Ok(&self.control_plane()?.kubeconfig)
    }

    fn control_plane(&self) -> Result<&ControlPlane> {
        self.control_plane.as_ref().context("control plane stopped")
    }

    pub fn machine(&self, name: &str) -> Result<&ZfsMachine> {
        Ok(&self.machines[self.machine_index(name)?])
    }

    /// Runs a future on the environment's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// A kubelet and containerd on every machine, and the routes between their pod networks.
    fn start_nodes(&mut self, bins: &Path, images: &Path) -> Result<()> {
        node::record_sysctls()?;
        let csi = csi_node_dir(&self.root)?.join("ployz-csi-node");
        self.rt.block_on(node::create_csi_driver(&self.client))?;
        let cp = self
            .control_plane
            .as_ref()
            .context("control plane stopped")?;
        for (i, m) in self.machines.iter().enumerate() {
            let index = u8::try_from(i + 1)?;
            self.nodes.push(KubeNode::start(
                m,
                index,
                cp,
                (bins, images, &csi),
                &self.logs,
            )?);
        }
        // Each machine routes the others' pod networks to them over the shared link.
        for m in &self.machines {
            for (other, n) in self.machines.iter().zip(&self.nodes) {
                if other.name != m.name {
                    m.sh(&format!(
                        "ip route replace {} via {}",
                        n.pod_subnet,
                        other.ip()
                    ))?;
                }
            }
        }
        Ok(())
    }

    /// Waits until every machine's node is Ready (a kubelet that dies fails it at once).
    fn wait_nodes_ready(&mut self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        for i in 0..self.machines.len() {
            let name = self.machines[i].name.clone();
            let rt = &self.rt;
            let mut node = self.nodes.get_mut(i);
            wait_for(
                &format!(
                    "node {name} Ready (its kubelet logs to {})",
                    self.logs.display()
                ),
                Duration::from_secs(90),
                || {
                    if let Some(n) = node.as_mut() {
                        n.check_running()?;
                    }
                    let got = rt.block_on(nodes.get_opt(&name))?;
                    Ok(got.as_ref().is_some_and(node_ready))
                },
            )?;
        }
        Ok(())
    }

    /// One kwok-managed node per machine.
    async fn create_kwok_nodes(&self) -> Result<()> {
        for m in &self.machines {
            create_kwok_node(&self.client, &m.name, m.ip(), &m.zfs_node_id()).await?;
        }
        Ok(())
    }

    /// Switches `name` off as a power cut would: its kubelet, CSI plugin, containers and
    /// containerd are killed and its cable is pulled, so nothing on it (its agent included,
    /// which the suite stops itself) can be reached; its pool, the disk, stays as it was.
    pub fn power_off(&mut self, name: &str) -> Result<()> {
        let i = self.machine_index(name)?;
        if let Some(node) = self.nodes.get_mut(i) {
            node.power_off();
        }
        self.machines[i].net.set_link(false)
    }

    /// Switches `name` on again: cable in, its node booted from the state on its disk, and
    /// Ready.
    pub fn power_on(&mut self, name: &str) -> Result<()> {
        let i = self.machine_index(name)?;
        self.machines[i].net.set_link(true)?;
        let paths = (
            bin_dir(&self.root)?,
            images_dir(&self.root)?,
            csi_node_dir(&self.root)?.join("ployz-csi-node"),
        );
        let cp = self
            .control_plane
            .as_ref()
            .context("control plane stopped")?;
        if let Some(node) = self.nodes.get_mut(i) {
            node.power_on(
                &self.machines[i],
                cp,
                (&paths.0, &paths.1, &paths.2),
                &self.logs,
            )?;
        }
        self.wait_nodes_ready()
    }

    fn machine_index(&self, name: &str) -> Result<usize> {
        self.machines
            .iter()
            .position(|m| m.name == name)
            .with_context(|| format!("no machine {name}"))
    }

    /// Kills the API server and starts it again (see [`ControlPlane::restart_apiserver`]).
    pub fn restart_apiserver(&mut self) -> Result<()> {
        let cp = self
            .control_plane
            .as_mut()
            .context("control plane stopped")?;
        self.rt.block_on(cp.restart_apiserver())
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

/// A node `name` at `ip` that kwok plays (its pods turn Ready, no container runs); `zfs_node_id`
/// is the topology value OpenEBS zfs-localpv pins its volumes with.
pub async fn create_kwok_node(
    client: &Client,
    name: &str,
    ip: Ipv4Addr,
    zfs_node_id: &str,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "openebs.io/nodeid": zfs_node_id,
                "type": "kwok",
            },
        },
        "status": {
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
            "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
            "addresses": [{"type": "InternalIP", "address": ip.to_string()}],
        },
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    Ok(())
}

pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Drop for Env {
    fn drop(&mut self) {
        // Nodes first (their containers use the pools), then the machines, then the control
        // plane, then whatever else was made.
        self.nodes.clear();
        self.machines.clear();
        self.control_plane.take();
        reaper::release_all();
    }
}

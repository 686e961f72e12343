//! A real Kubernetes node on a test machine: containerd (with runc and the CNI bridge plugin,
//! from the distribution) and a kubelet (built from Go modules with the control plane), both
//! running inside the machine's network and mount namespaces, so the pods they run mount the
//! machine's ZFS datasets and their traffic crosses the machine's link.
//!
//! What made it work on these hosts is measured in shared/notes/real-nodes/: runc, not crun;
//! `restrict_oom_score_adj` (CAP_SYS_RESOURCE is not in the bounding set); cgroup v1 with
//! `failCgroupV1: false` and a cgroup root per kubelet (two kubelets sharing one treat each
//! other's pods as orphans); a CNI bridge with host-local addresses; locally built images.
//!
//! Each node's processes are tracked three ways, so a killed run leaves nothing behind: the
//! kubelet and containerd by PID; containers under the kubelet's cgroup root `/pz-NAME`; the
//! containerd shims (which outlive containerd) under `/pz-NAME.runtime`, where containerd is
//! started. Teardown kills each tree and removes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::controlplane::ControlPlane;
use crate::machine::ZfsMachine;
use crate::network::pod_subnet;
use crate::process::{Proc, command, run};
use crate::reaper::{self, Resource};
use crate::wait::wait_for;

/// The sandbox image every pod starts with (imported, never pulled).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// The test app (see tests/images/ledger.c).
pub const LEDGER_IMAGE: &str = "ployz.dev/e2e/ledger:1";

/// Host sysctls kubelet sets at start (`setupKernelTunables`); recorded before the first
/// kubelet starts and restored at teardown, also after a killed run.
const KUBELET_SYSCTLS: [&str; 6] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
];

/// The CSIDriver object of zfs-localpv, as its chart installs it: no attach step, so the
/// kubelet publishes its volumes through the node plugin alone.
pub async fn create_csi_driver(client: &kube::Client) -> Result<()> {
    use k8s_openapi::api::storage::v1::CSIDriver;
    let api: kube::Api<CSIDriver> = kube::Api::all(client.clone());
    let driver: CSIDriver = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "zfs.csi.openebs.io"},
        "spec": {"attachRequired": false, "podInfoOnMount": false},
    }))?;
    api.create(&kube::api::PostParams::default(), &driver)
        .await?;
    Ok(())
}

/// Records the host sysctls kubelet changes, so teardown restores them.
pub fn record_sysctls() -> Result<()> {
    for key in KUBELET_SYSCTLS {
        reaper::register(Resource::Sysctl {
            key: key.into(),
            value: reaper::sysctl(key)?,
        });
    }
    Ok(())
}

/// The running node of one machine.
#[derive(Debug)]
pub struct KubeNode {
    pub name: String,
    /// The machine's pod network.
    pub pod_subnet: String,
    /// The kubelet's kubeconfig: its own node identity, `system:node:NAME`.
    pub kubeconfig: PathBuf,
    kubelet: Option<Proc>,
    /// The CSI node plugin for zfs-localpv volumes (tests/csi-node).
    csi: Option<Proc>,
    containerd: Option<Proc>,
    /// containerd's socket.
    socket: PathBuf,
    cgroups: [Resource; 2],
}

/// Where a machine's node keeps its state.
struct Dirs {
    containerd: PathBuf,
    kubelet: PathBuf,
}

impl KubeNode {
    /// Imports the docker-archive `tar` into this node's containerd (`machine` is its
    /// machine), where the kubelet finds it: no registry is reachable.
    pub fn import_image(&self, machine: &ZfsMachine, tar: &Path) -> Result<()> {
        run(machine
            .command("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(tar))
        .with_context(|| format!("importing {} on {}", tar.display(), self.name))
        .map(drop)
    }

    /// Starts containerd, the kubelet and the CSI node plugin `csi_plugin` of `machine` (its
    /// `index`, from 1, picks its pod network) and imports the images of `images` into
    /// containerd. The node registers itself; wait for it with the API.
    pub fn start(
        machine: &ZfsMachine,
        index: u8,
        cp: &ControlPlane,
        paths: (&Path, &Path, &Path),
        logs: &Path,
    ) -> Result<Self> {
        let name = machine.name.clone();
        let base = machine.dir.join("node");
        let kube_root = format!("pz-{name}");
        let runtime = format!("pz-{name}.runtime");
        let mut node = Self {
            name,
            pod_subnet: pod_subnet(index),
            kubeconfig: base.join("kubelet.kubeconfig"),
            kubelet: None,
            csi: None,
            containerd: None,
            socket: base.join("containerd/containerd.sock"),
            cgroups: [Resource::Cgroup(kube_root), Resource::Cgroup(runtime)],
        };
        node.power_on(machine, cp, paths, logs)?;
        Ok(node)
    }

    /// Switches the node off: the kubelet, the CSI plugin, every container and containerd
    /// are killed at once, as at a power cut (the machine's pool, its disk, stays). Its state
    /// directories stay for [`KubeNode::power_on`].
    pub fn power_off(&mut self) {
        self.halt(|p| p.kill());
    }

    /// Stops the processes with `stop`: the kubelet first (it would restart what is killed),
    /// then the containers, then containerd, then the shims it leaves behind.
    fn halt(&mut self, stop: impl Fn(Proc)) {
        if let Some(k) = self.kubelet.take() {
            stop(k);
        }
        if let Some(c) = self.csi.take() {
            stop(c);
        }
        reaper::release(&self.cgroups[0]);
        if let Some(c) = self.containerd.take() {
            stop(c);
        }
        reaper::release(&self.cgroups[1]);
    }

    /// Boots the node: at start, and again after [`KubeNode::power_off`] from the state it
    /// left on its disk.
    pub fn power_on(
        &mut self,
        machine: &ZfsMachine,
        cp: &ControlPlane,
        (bins, images, csi_plugin): (&Path, &Path, &Path),
        logs: &Path,
    ) -> Result<()> {
        let name = self.name.clone();
        let base = machine.dir.join("node");
        let dirs = Dirs {
            containerd: base.join("containerd"),
            kubelet: base.join("kubelet"),
        };
        for d in ["root", "state", "cni", "opt"] {
            std::fs::create_dir_all(dirs.containerd.join(d))?;
        }
        std::fs::create_dir_all(&dirs.kubelet)?;
        let (kube_root, runtime) = (format!("pz-{name}"), format!("pz-{name}.runtime"));
        for (r, n) in self.cgroups.iter().zip([&kube_root, &runtime]) {
            reaper::register(r.clone());
            create_cgroup(n)?;
        }
        let subnet = self.pod_subnet.clone();
        let kubeconfig = self.kubeconfig.clone();

        // containerd, in the runtime cgroup, so the shims it starts are found there.
        let config = dirs.containerd.join("config.toml");
        std::fs::write(&config, containerd_config(&dirs.containerd))?;
        std::fs::write(
            dirs.containerd.join("cni/10-ployz.conflist"),
            cni_config(&subnet),
        )?;
        let procs = format!("/sys/fs/cgroup/pids/{runtime}/cgroup.procs");
        let mut cmd = command(
            "sh",
            [
                "-c",
                &format!(
                    "echo $$ > {procs} && exec nsenter --target {} --mount --net -- /usr/bin/containerd --config {}",
                    machine.pid(),
                    config.display()
                ),
            ],
        );
        cmd.env_remove("NOTIFY_SOCKET");
        // A socket left by a containerd that was killed (switched off) is not one that listens.
        let _ = std::fs::remove_file(&self.socket);
        self.containerd = Some(Proc::spawn(
            &format!("containerd-{name}"),
            cmd,
            "/usr/bin/containerd",
            logs,
        )?);
        let socket = self.socket.clone();
        wait_for(
            &format!("containerd on {name}"),
            Duration::from_secs(30),
            || {
                if let Some(p) = self.containerd.as_mut() {
                    p.check_running()?;
                }
                Ok(std::os::unix::net::UnixStream::connect(&socket).is_ok())
            },
        )?;
        for tar in ["pause.tar", "ledger.tar"] {
            self.import_image(machine, &images.join(tar))?;
        }

        // The pod network: forwarding on the machine, routes from the host.
        machine.sh("sysctl -qw net.ipv4.ip_forward=1")?;
        run(&mut command(
            "ip",
            [
                "route",
                "replace",
                &subnet,
                "via",
                &machine.ip().to_string(),
            ],
        ))?;

        // The kubelet, with its own node identity.
        let (cert, key) = cp
            .pki
            .client(&format!("system:node:{name}"), "system:nodes")?;
        cp.write_kubeconfig(&kubeconfig, &cert, &key)?;
        let kubelet_config = base.join("kubelet-config.yaml");
        std::fs::write(
            &kubelet_config,
            kubelet_config_yaml(&kube_root, &socket, machine, &cp.pki.ca_cert),
        )?;
        let kubelet = bins.join("kubelet");
        let mut cmd = machine.command(&kubelet.to_string_lossy());
        cmd.arg(format!("--config={}", kubelet_config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", dirs.kubelet.display()))
            .arg(format!("--cert-dir={}", dirs.kubelet.join("pki").display()))
            .arg(format!("--hostname-override={name}"))
            .arg(format!("--node-ip={}", machine.ip()))
            .arg(format!(
                "--node-labels=openebs.io/nodeid={}",
                machine.zfs_node_id()
            ))
            .arg("--v=2");
        self.kubelet = Some(Proc::spawn(
            &format!("kubelet-{name}"),
            cmd,
            &kubelet.to_string_lossy(),
            logs,
        )?);
        // Registers itself through the kubelet's plugins_registry directory.
        let mut cmd = machine.command(&csi_plugin.to_string_lossy());
        cmd.arg(&dirs.kubelet).arg(machine.zfs_node_id());
        self.csi = Some(Proc::spawn(
            &format!("csi-node-{name}"),
            cmd,
            &csi_plugin.to_string_lossy(),
            logs,
        )?);
        Ok(())
    }

    /// Fails with the end of its log when the kubelet or containerd has exited.
    pub fn check_running(&mut self) -> Result<()> {
        for p in [
            self.kubelet.as_mut(),
            self.csi.as_mut(),
            self.containerd.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            p.check_running()?;
        }
        Ok(())
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        self.halt(|mut p| p.stop());
    }
}

/// Creates `/NAME` in every cgroup v1 hierarchy; cpuset needs its CPUs and memory nodes set
/// before anything can join.
fn create_cgroup(name: &str) -> Result<()> {
    for h in reaper::cgroup_hierarchies() {
        let dir = h.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if h.ends_with("cpuset") {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                std::fs::write(dir.join(f), std::fs::read(h.join(f))?)?;
            }
        }
    }
    Ok(())
}

fn containerd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # CAP_SYS_RESOURCE is not in this host's bounding set: a negative oom_score_adj is refused.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#
    )
}

/// A bridge `cni0` on the machine with host-local addresses from its subnet; pods route
/// everything through the machine, which routes the other machines' pod networks.
fn cni_config(subnet: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "ployz-e2e",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": "/run/cni-ipam",
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }],
    })
    .to_string()
}

fn kubelet_config_yaml(cgroup_root: &str, socket: &Path, m: &ZfsMachine, ca: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
containerRuntimeEndpoint: unix://{socket}
imageServiceEndpoint: unix://{socket}
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
rotateCertificates: false
serverTLSBootstrap: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
"#,
        socket = socket.display(),
        ip = m.ip(),
        ca = ca.display(),
    )
}

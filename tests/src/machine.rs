//! A test machine: a network namespace, and a zfs-fuse daemon in a private mount namespace
//! inside it, with a file-backed pool. Everything the machine's agent, kubelet, container
//! runtime or a test does "on the machine" runs through [`ZfsMachine::command`], which enters
//! both namespaces.
//!
//! zfs-fuse uses fixed paths (/run/zfs socket, /run/lock/zfs, /var/lib/zfs), and kubelet,
//! containerd and CNI write to /run, /var/log and /var/lib/cni, so each machine gets private
//! tmpfs mounts over them; see shared/notes/zfs-fuse.md and shared/notes/real-nodes/.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::network::MachineNet;
use crate::process::{Proc, command, run};
use crate::reaper::{self, Resource};
use crate::wait::wait_for;

/// Where pools mount inside each machine's mount namespace (the same path on every machine,
/// as on real nodes).
pub const POOL_ROOT: &str = "/tank";

#[derive(Debug)]
pub struct ZfsMachine {
    pub name: String,
    pub net: MachineNet,
    pub pool: String,
    pub pool_file: PathBuf,
    /// The machine's scratch directory on the host.
    pub dir: PathBuf,
    daemon: Proc,
}

impl ZfsMachine {
    /// Creates the machine: namespace, daemon, pool of `pool_size` bytes named `pool`.
    pub fn create(
        name: &str,
        ip: Ipv4Addr,
        pool: &str,
        pool_size: u64,
        run_dir: &Path,
    ) -> Result<Self> {
        let net = MachineNet::create(name, ip)?;
        let dir = run_dir.join(name);
        std::fs::create_dir_all(&dir)?;
        // Each machine gets private tmpfs mounts over the fixed paths its daemons write to and
        // over the pool's mountpoint, so nothing they create (sockets, caches, pod logs, CNI
        // state, mountpoint directories) can land on the host's filesystem, even when a run is
        // killed half-way; it all goes with the mount namespace. Only the empty mountpoint
        // directories are made on the host, and removed again if they were ours.
        let private_dirs = [
            "/run",
            "/var/log",
            "/var/lib/zfs",
            "/var/lib/cni",
            POOL_ROOT,
        ];
        for d in private_dirs {
            if !Path::new(d).exists() {
                reaper::register(Resource::EmptyDir(d.into()));
                std::fs::create_dir_all(d).with_context(|| format!("creating {d}"))?;
            }
        }
        let script = dir.join("zfs-fuse.sh");
        std::fs::write(
            &script,
            format!(
                "set -e\nmount --make-rprivate /\nfor d in {}; do mount -t tmpfs -o mode=755 tmpfs \"$d\"; done\n\
                 mkdir -p /run/zfs /run/lock/zfs /var/log/pods /var/log/containers\n{}\
                 ulimit -s unlimited\nexec /sbin/zfs-fuse -n --no-kstat-mount\n",
                private_dirs.join(" "),
                cgroup_mounts()?,
            ),
        )?;
        let cmd = command(
            "ip",
            [
                "netns".as_ref(),
                "exec".as_ref(),
                net.netns.as_str().as_ref(),
                "unshare".as_ref(),
                "-m".as_ref(),
                "--propagation".as_ref(),
                "private".as_ref(),
                "sh".as_ref(),
                script.as_os_str(),
            ],
        );
        let daemon = Proc::spawn(&format!("zfs-fuse-{name}"), cmd, "/sbin/zfs-fuse", &dir)?;
        let mut m = Self {
            name: name.to_string(),
            net,
            pool: pool.to_string(),
            pool_file: dir.join("pool.img"),
            dir: dir.clone(),
            daemon,
        };
        wait_for(
            &format!("zfs-fuse on {name}"),
            Duration::from_secs(20),
            || {
                m.daemon.check_running()?;
                Ok(m.zfs(&["list"]).is_ok())
            },
        )?;
        let f = std::fs::File::create(&m.pool_file)?;
        f.set_len(pool_size)?;
        let file = m.pool_file.to_string_lossy().into_owned();
        m.zpool(&["create", "-m", POOL_ROOT, pool, &file])?;
        // Replica datasets are read by tests; atime updates would count as modifications.
        m.zfs(&["set", "atime=off", pool])?;
        Ok(m)
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.net.ip
    }

    /// The machine's OpenEBS zfs-localpv node ID (its node's `openebs.io/nodeid` label).
    /// Deliberately not the node's name, as in zfs-localpv's recipe for moving disks between
    /// nodes: ployz must resolve it through the label.
    pub fn zfs_node_id(&self) -> String {
        format!("{}-zfs", self.name)
    }

    /// PID of the zfs-fuse daemon (its namespaces are the machine's).
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// A command that runs on this machine: in its network and mount namespaces.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("--target")
            .arg(self.pid().to_string())
            .args(["--mount", "--net", "--"])
            .arg(program);
        c
    }

    /// Runs `sh -c SCRIPT` on the machine and returns stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        run(self.command("sh").args(["-c", script]))
            .with_context(|| format!("on {}: {script}", self.name))
    }

    pub fn zfs(&self, args: &[&str]) -> Result<String> {
        run(self.command("/sbin/zfs").args(args))
    }

    pub fn zpool(&self, args: &[&str]) -> Result<String> {
        run(self.command("/sbin/zpool").args(args))
    }

    /// Creates a dataset (and parents) and returns its mountpoint.
    pub fn create_dataset(&self, dataset: &str) -> Result<String> {
        self.zfs(&["create", "-p", dataset])?;
        let mp = self.zfs(&["get", "-H", "-o", "value", "mountpoint", dataset])?;
        Ok(mp.trim().to_string())
    }

    /// SHA-256 of every regular file under `dir`, as `sha256sum` lines sorted by path
    /// relative to `dir`; the test app's live ledger is left out (its running copy grows; it
    /// is verified record by record instead, see `ledger.rs`).
    pub fn checksums(&self, dir: &str) -> Result<String> {
        if !dir.starts_with('/') || dir.contains('\'') {
            bail!("checksums: {dir:?} must be an absolute path without quotes");
        }
        self.sh(&format!(
            "cd '{dir}' && find . -type f ! -name {} -print0 | sort -z | xargs -0 -r sha256sum",
            crate::ledger::FILE
        ))
    }
}

/// Shell lines that mount the host's cgroup hierarchies again: `ip netns exec` gives the
/// machine a fresh /sys without them, and runc and kubelet need them (same hierarchies, so a
/// cgroup the host sees as `/sys/fs/cgroup/pids/pz-machine-a` is the machine's too).
fn cgroup_mounts() -> Result<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let mut out = String::from("mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup\n");
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, dir, kind, opts, ..] = f[..] else {
            continue;
        };
        if !dir.starts_with("/sys/fs/cgroup/") || !matches!(kind, "cgroup" | "cgroup2") {
            continue;
        }
        out += &format!("mkdir -p {dir}\nmount -t {kind} -o {opts} cgroup {dir}\n");
    }
    Ok(out)
}

impl Drop for ZfsMachine {
    fn drop(&mut self) {
        // Export so the daemon flushes and unmounts before it stops; the mount namespace goes
        // away with it. The pool file is removed with the run directory.
        let _ = self.zpool(&["export", "-f", &self.pool]);
        self.daemon.stop();
    }
}

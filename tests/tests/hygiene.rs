//! Hygiene suite: a test run killed outright (SIGKILL, no teardown) leaves everything behind:
//! the control plane, zfs-fuse daemons, kubelets, containerd, containers and their shims,
//! cgroups, network namespaces, changed sysctls. The next run must remove all of it. This
//! starts the environment in a child process (`ployz-env`), runs a pod in it, kills the child
//! with SIGKILL, starts and stops an environment here, and compares the host with how it was
//! before.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use libtest_mimic::{Arguments, Failed, Trial};
use ployz_e2e::agents::workspace_binary;
use ployz_e2e::env::{Env, Options, repo_root, run_dir};
use ployz_e2e::reaper;
use ployz_e2e::wait::until;

fn main() -> ExitCode {
    ployz_e2e::suite::init_logging();
    let args = Arguments::from_args();
    let trials = vec![Trial::test(
        "a_run_killed_with_sigkill_is_cleaned_up_by_the_next",
        || killed_run_is_cleaned_up().map_err(|e| Failed::from(format!("{e:#}"))),
    )];
    libtest_mimic::run(&args, trials).exit_code()
}

/// What a run can leave on the host.
#[derive(Debug, PartialEq, Eq)]
struct HostState {
    /// Programs of the environment that are running (by name).
    processes: BTreeSet<String>,
    cgroups: BTreeSet<String>,
    netns: BTreeSet<String>,
    mounts: BTreeSet<String>,
    sysctls: Vec<(String, String)>,
}

const PROGRAMS: [&str; 11] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "containerd",
    "containerd-shim-runc-v2",
    "zfs-fuse",
    "ployz-csi-node",
    "ledger",
    "pause",
];

const SYSCTLS: [&str; 4] = [
    "vm.overcommit_memory",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
];

fn host_state() -> Result<HostState> {
    let mut processes = BTreeSet::new();
    for e in std::fs::read_dir("/proc")?.filter_map(|e| e.ok()) {
        let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        // comm is cut at 15 bytes: compare on that.
        let comm = comm.trim();
        if let Some(p) = PROGRAMS
            .iter()
            .find(|p| p.starts_with(comm) && !comm.is_empty())
        {
            processes.insert((*p).to_string());
        }
    }
    let cgroups = std::fs::read_dir("/sys/fs/cgroup/pids")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pz-"))
        .collect();
    let netns = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("pz-"))
                .collect()
        })
        .unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .map(String::from)
        .collect();
    let sysctls = SYSCTLS
        .iter()
        .map(|k| Ok((k.to_string(), reaper::sysctl(k)?)))
        .collect::<Result<_>>()?;
    Ok(HostState {
        processes,
        cgroups,
        netns,
        mounts,
        sysctls,
    })
}

fn killed_run_is_cleaned_up() -> Result<()> {
    let before = host_state()?;
    let root = repo_root()?;
    let bin = workspace_binary(&root, "ployz-e2e", "ployz-env")?;
    let mut child = Command::new(bin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .spawn()
        .context("starting ployz-env")?;
    let outcome = (|| {
        let stdout = child.stdout.take().context("ployz-env stdout")?;
        let mut up = false;
        for line in BufReader::new(stdout).lines() {
            if line?.contains("Press Ctrl-C") {
                up = true;
                break;
            }
        }
        ensure!(up, "ployz-env ended before the environment was up");
        run_a_pod()
    })();
    // SIGKILL: no teardown, no signal handler.
    child.kill()?;
    child.wait()?;
    outcome?;
    let left = host_state()?;
    ensure!(
        left.processes.contains("kubelet")
            && left.processes.contains("containerd-shim-runc-v2")
            && left.processes.contains("ledger")
            && !left.cgroups.is_empty()
            && left.sysctls != before.sysctls,
        "the killed run left less than expected; the test proves nothing: {left:?}"
    );

    // The next run cleans up what the killed one left, and its own teardown leaves nothing.
    let env = Env::start(Options::new("hygiene"))?;
    drop(env);
    let after = host_state()?;
    let mut problems = vec![];
    let new = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
        a.difference(b).cloned().collect()
    };
    for (what, left) in [
        ("processes", new(&after.processes, &before.processes)),
        ("cgroups", new(&after.cgroups, &before.cgroups)),
        ("network namespaces", new(&after.netns, &before.netns)),
    ] {
        if !left.is_empty() {
            problems.push(format!("{what} left: {left:?}"));
        }
    }
    let new_mounts: Vec<_> = after.mounts.difference(&before.mounts).collect();
    if !new_mounts.is_empty() {
        problems.push(format!("mounts left: {new_mounts:?}"));
    }
    if after.sysctls != before.sysctls {
        problems.push(format!(
            "sysctls changed: {:?} -> {:?}",
            before.sysctls, after.sysctls
        ));
    }
    let journal = std::fs::read_to_string(run_dir().join("resources")).unwrap_or_default();
    if !journal.trim().is_empty() {
        problems.push(format!("journal not empty: {journal}"));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// Runs a pod of the ledger app on machine-a of the child's environment, until it is Ready.
fn run_a_pod() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let kc = Kubeconfig::read_from(run_dir().join("state/kubeconfig"))?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        let client = Client::try_from(config)?;
        let pods: Api<Pod> = Api::namespaced(client, "default");
        let pod = ployz_e2e::k8s::ledger_pod("doomed", "machine-a")?;
        until("pod doomed created", Duration::from_secs(60), || {
            let (pods, pod) = (pods.clone(), pod.clone());
            // The default service account may not exist yet.
            async move { Ok(pods.create(&PostParams::default(), &pod).await.ok()) }
        })
        .await?;
        until("pod doomed Running", Duration::from_secs(60), || {
            let pods = pods.clone();
            async move {
                let p = pods.get("doomed").await?;
                let running = p.status.and_then(|s| s.phase).as_deref() == Some("Running");
                Ok(running.then_some(()))
            }
        })
        .await
    })
}

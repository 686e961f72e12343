//! Transfer agents inside the test machines: keys pinned through Machines, a receiver
//! listening in a machine's network namespace and running `zfs` in its mount namespace, and a
//! sender connecting from another machine's namespace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use ployz::api::{Machine, ZfsInfo};
use ployz::api::{Migration, MigrationSpec};
use ployz::transfer::authz::KubeAuthorizer;
use ployz::transfer::client::Sender;
use ployz::transfer::gate::Limits;
use ployz::transfer::server::{Server, ServerConfig};
use ployz::transfer::tls::{Identity, Pin};
use ployz::zfs::{DatasetName, Zfs, ZfsCli};
use serde_json::json;

use crate::env::Env;
use crate::machine::ZfsMachine;
use crate::network::join;
use crate::process::Proc;
use crate::wait::until;

/// A new identity for `machine`, as its agent makes one at start.
pub fn identity(machine: &str) -> Result<Identity> {
    Ok(Identity::generate(machine)?)
}

/// Publishes `identity`'s key as `machine`'s, as its agent does (creating a Machine with a
/// placeholder spec when there is none): what a receiver checks a sender against.
pub async fn publish_identity(client: &Client, machine: &str, identity: &Identity) -> Result<()> {
    let api: Api<Machine> = Api::all(client.clone());
    if api.get_opt(machine).await?.is_none() {
        let m: Machine = serde_json::from_value(json!({
            "apiVersion": "ployz.dev/v1alpha1", "kind": "Machine",
            "metadata": {"name": machine},
            "spec": {"nodeName": machine, "pool": "tank", "parentDataset": "tank/ployz",
                     "endpoint": "unused:0"},
        }))?;
        api.create(&PostParams::default(), &m).await?;
    }
    api.patch_status(
        machine,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"tlsPin": identity.pin().as_str()}})),
    )
    .await?;
    Ok(())
}

/// The key `machine`'s agent publishes.
pub async fn published_pin(client: &Client, machine: &str) -> Result<Pin> {
    let api: Api<Machine> = Api::all(client.clone());
    let pin = api
        .get(machine)
        .await?
        .status
        .and_then(|s| s.tls_pin)
        .with_context(|| format!("Machine {machine} publishes no key"))?;
    Ok(pin.parse()?)
}

/// `zfs` of a test machine, run inside its namespaces.
pub fn machine_zfs(m: &ZfsMachine) -> ZfsCli {
    machine_program(m, Path::new("/sbin/zfs"))
}

/// `program` in place of `zfs`, run inside `m`'s namespaces (a wrapper that changes what
/// `zfs` is asked, for the hostile tests).
pub fn machine_program(m: &ZfsMachine, program: &Path) -> ZfsCli {
    ZfsCli::new(program).with_prefix(vec![
        "nsenter".into(),
        "--target".into(),
        m.pid().to_string(),
        "--mount".into(),
        "--net".into(),
        "--".into(),
    ])
}

pub type TestServer = Server<ZfsCli, KubeAuthorizer>;

/// A receiver on `machine`, listening on `port` of its address.
pub struct Receiver {
    pub server: Arc<TestServer>,
    pub addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Receiver {
    /// Stops the server and every connection it serves, as a killed agent would, and waits
    /// until they are gone (the port is free again).
    pub fn stop(mut self, env: &Env) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = env.block_on(task);
        }
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub fn start_receiver(
    env: &Env,
    client: Client,
    machine: &ZfsMachine,
    identity: &Identity,
    parent: &str,
    port: u16,
    no_progress: Duration,
) -> Result<Receiver> {
    let zfs = machine_zfs(machine);
    let info: ZfsInfo = env.block_on(zfs.info())?;
    let parent: DatasetName = parent.parse()?;
    let authz = KubeAuthorizer {
        client,
        machine: machine.name.clone(),
        parent: parent.clone(),
    };
    let server = Arc::new(Server::new(
        Arc::new(zfs),
        info,
        Arc::new(authz),
        identity.server_config()?,
        ServerConfig {
            parent,
            limits: Limits {
                frame: no_progress,
                ..Limits::default()
            },
        },
    ));
    let addr = SocketAddr::from((machine.ip(), port));
    let std_listener = join(machine.net.run_in(move || {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    }))?;
    let task = env.block_on(async {
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        anyhow::Ok(tokio::spawn(Arc::clone(&server).serve(listener)))
    })?;
    Ok(Receiver {
        server,
        addr,
        task: Some(task),
    })
}

/// A sender on `machine`.
pub fn sender(env: &Env, machine: &ZfsMachine, identity: &Identity) -> Result<Sender<ZfsCli>> {
    let zfs = machine_zfs(machine);
    let info = env.block_on(zfs.info())?;
    Ok(Sender::new(Arc::new(zfs), info, identity.clone()))
}

/// A TCP connection to `addr` made from `machine`'s network namespace.
pub async fn connect_from(
    machine_net: crate::network::MachineNet,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let handle = machine_net.run_in(move || {
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nonblocking(true)?;
        Ok(s)
    });
    let std_stream = tokio::task::spawn_blocking(move || join(handle))
        .await
        .map_err(std::io::Error::other)?
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    tokio::net::TcpStream::from_std(std_stream)
}

/// A Migration in phase Sending whose plan moves `claim` (PV `volume`) from `source` to
/// `target` into `target_dataset`: what the receiver's authorization checks against. The
/// claim and the PV it is bound to exist too (the receiver checks the plan's binding live);
/// they are made once, and kept when a later Migration names them again.
pub async fn sending_migration(
    client: &Client,
    namespace: &str,
    name: &str,
    (source, target): (&str, &str),
    (claim, volume, target_dataset): (&str, &str, &str),
) -> Result<()> {
    let vol = crate::k8s::LocalVolume {
        namespace: namespace.into(),
        claim: claim.into(),
        pv: volume.into(),
        dataset: format!("tank/ployz/{volume}"),
        path: format!("/tank/ployz/{volume}"),
    };
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client.clone());
    if pvs.get_opt(volume).await?.is_none() {
        pvs.create(
            &PostParams::default(),
            &crate::k8s::local_pv(&vol, source, None)?,
        )
        .await?;
    }
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), namespace);
    if claims.get_opt(claim).await?.is_none() {
        crate::k8s::create_claim_naming(client, namespace, claim, volume).await?;
    }
    let api: Api<Migration> = Api::namespaced(client.clone(), namespace);
    let m = Migration::new(
        name,
        MigrationSpec {
            service: "web".into(),
            to: target.into(),
            from: None,
            transfer: None,
            timeouts: None,
            source_copy: None,
        },
    );
    api.create(&PostParams::default(), &m).await?;
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Sending",
            "plan": {
                "source": source, "target": target,
                "workload": {"kind": "Deployment", "name": "web"},
                "volumes": [{"claim": claim, "volume": volume,
                             "sourceDataset": format!("tank/ployz/{volume}"), "targetDataset": target_dataset}],
            },
        }})),
    )
    .await?;
    Ok(())
}

/// A binary of the workspace, built (a no-op when fresh) by the cargo that runs the tests.
pub fn workspace_binary(root: &Path, package: &str, bin: &str) -> Result<PathBuf> {
    build_binary(root, package, bin, &[], false)
}

fn build_binary(
    root: &Path,
    package: &str,
    bin: &str,
    features: &[&str],
    release: bool,
) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .current_dir(root)
        .args(["build", "-q", "-p", package, "--bin", bin]);
    if !features.is_empty() {
        build.args(["--features", &features.join(",")]);
    }
    if release {
        build.arg("--release");
    }
    crate::process::run(&mut build)?;
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), PathBuf::from);
    let profile = if release { "release" } else { "debug" };
    Ok(target.join(profile).join(bin))
}

/// The agent as the image ships it (release build, no crash points), for the benchmarks that
/// measure its memory.
pub fn release_agent_binary(root: &Path) -> Result<PathBuf> {
    build_binary(root, "ployz", "ployz-controller", &[], true)
}

/// The agent binary, `ployz-controller`, with the crash points of the fault tests compiled
/// in (inert unless FAILPOINTS names one).
pub fn agent_binary(root: &Path) -> Result<PathBuf> {
    build_binary(root, "ployz", "ployz-controller", &["failpoints"], false)
}

/// Transfer port of every agent.
pub const AGENT_PORT: u16 = 7420;
/// Health and metrics port of every agent.
pub const AGENT_HTTP_PORT: u16 = 7421;

/// A `ployz-controller` process running on a machine: in its network and mount namespaces,
/// as the DaemonSet pod would.
#[derive(Debug)]
pub struct Agent {
    pub machine: String,
    proc: Proc,
}

impl Agent {
    /// Starts the agent of `machine` and waits until its Machine is Ready.
    pub fn start(env: &Env, machine: &str, extra: &[&str]) -> Result<Self> {
        Self::start_with(env, machine, extra, &[])
    }

    /// [`Agent::start`] with extra environment variables (FAILPOINTS of a fault test).
    pub fn start_with(
        env: &Env,
        machine: &str,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Result<Self> {
        let bin = agent_binary(&env.root)?;
        let mut cmd = Self::command(env, machine, (AGENT_PORT, AGENT_HTTP_PORT))?;
        cmd.envs(vars.iter().copied());
        cmd.args(["--heartbeat-seconds", "2"]).args(extra).env(
            "PLOYZ_LOG",
            std::env::var("PLOYZ_AGENT_LOG").unwrap_or_else(|_| "ployz=debug,info".into()),
        );
        let started = k8s_openapi::jiff::Timestamp::now();
        let mut proc = Proc::spawn(
            &format!("agent-{machine}"),
            cmd,
            &bin.to_string_lossy(),
            &env.logs,
        )?;
        let machines: Api<Machine> = Api::all(env.client.clone());
        let ready = env.block_on(until(
            &format!("Machine {machine} Ready"),
            Duration::from_secs(60),
            || {
                let machines = machines.clone();
                async move {
                    let Some(m) = machines.get_opt(machine).await? else {
                        return Ok(None);
                    };
                    let s = m.status.unwrap_or_default();
                    let fresh = s.heartbeat_time.is_some_and(|t| t.0 >= started);
                    let ready = s
                        .conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    Ok((fresh && ready).then_some(()))
                }
            },
        ));
        if let Err(e) = ready {
            let running = proc.check_running();
            return Err(match running {
                Err(exited) => exited,
                Ok(()) => e,
            });
        }
        Ok(Self {
            machine: machine.into(),
            proc,
        })
    }

    /// The agent's command line on `machine`: in its namespaces, listening on its address
    /// (transfer and health `ports`), with the environment's kubeconfig. It makes its own key.
    pub fn command(
        env: &Env,
        machine: &str,
        (port, http_port): (u16, u16),
    ) -> Result<std::process::Command> {
        let m = env.machine(machine)?;
        let bin = agent_binary(&env.root)?;
        let mut cmd = m.command(&bin.to_string_lossy());
        cmd.args(["--node-name", machine, "--pool", crate::env::POOL])
            .arg("--listen")
            .arg(SocketAddr::from((m.ip(), port)).to_string())
            .arg("--http-listen")
            .arg(SocketAddr::from((m.ip(), http_port)).to_string())
            .args(["--zfs", "/sbin/zfs"])
            .env("KUBECONFIG", env.kubeconfig()?);
        Ok(cmd)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Kills the agent with SIGKILL, as a crashed node agent, and reaps it.
    pub fn kill(mut self) {
        self.proc.stop();
    }

    /// Fails with the end of its log when the agent has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.proc.check_running()
    }
}

/// Installs ployz as users do: the agent image, built offline from the agent binary and the
/// machines' `zfs` (tests/images/build-agent-image.sh), imported into every node's
/// containerd, then `helm install` of charts/ployz with `values` (`key=value`) on top of what
/// the test machines need. Returns once every Machine is heart-beaten by its agent pod.
pub fn install_chart(env: &Env, values: &[&str]) -> Result<()> {
    let bin = agent_binary(&env.root)?;
    // The image carries the guard beside the agent (built with the same features, so the
    // library is compiled once).
    build_binary(&env.root, "ployz", "ployz-guard", &["failpoints"], false)?;
    let image = crate::process::run(
        std::process::Command::new(env.root.join("tests/images/build-agent-image.sh"))
            .arg(&bin)
            .arg("ployz.dev/agent:e2e"),
    )?;
    for (node, machine) in env.nodes.iter().zip(&env.machines) {
        node.import_image(machine, Path::new(image.trim()))?;
        // As on a systemd host, where / is shared: the agent pod's view of the pool follows
        // what zfs-fuse mounts there (Kubernetes allows the chart's Bidirectional propagation
        // only on a shared mount, and the pool's root dataset is stacked on the machine's
        // tmpfs at the same path, hence recursive from /). The machine's own mount namespace
        // only; its mounts stay private until now, so the earlier tests' pods do not see
        // nested datasets propagate into their volumes.
        machine.sh("mount --make-rshared /")?;
    }
    let server = kube::config::Kubeconfig::read_from(env.kubeconfig()?)?
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .context("no server in the kubeconfig")?;
    let (host, port) = server
        .trim_start_matches("https://")
        .rsplit_once(':')
        .context("no port in the API server's URL")?;
    let started = k8s_openapi::jiff::Timestamp::now();
    let mut install = std::process::Command::new(crate::env::helm(&env.root)?);
    install
        .env("KUBECONFIG", env.kubeconfig()?)
        .args(["install", "ployz"])
        .arg(env.root.join("charts/ployz"))
        .args(["--namespace", "ployz-system", "--create-namespace"])
        .args(["--wait", "--timeout", "3m"])
        .args([
            "--set",
            "image.repository=ployz.dev/agent,image.tag=e2e,image.pullPolicy=Never",
        ])
        // zfs-fuse's CLI talks to its daemon through the machine's /run/zfs.
        .args(["--set", "zfs.command=/sbin/zfs,zfs.hostPaths={/run/zfs}"])
        // No kube-proxy here: the pods reach the API server at its own address.
        .args([
            "--set",
            &format!("apiServer.host={host},apiServer.port={port}"),
        ])
        .args(["--set", "agent.heartbeatSeconds=2"]);
    for v in values {
        install.args(["--set", v]);
    }
    crate::process::run(&mut install).context("helm install")?;
    let machines: Api<Machine> = Api::all(env.client.clone());
    for m in &env.machines {
        let name = m.name.as_str();
        env.block_on(until(
            &format!("Machine {name} heart-beaten by its agent pod"),
            Duration::from_secs(60),
            || {
                let machines = machines.clone();
                async move {
                    let s = machines
                        .get_opt(name)
                        .await?
                        .and_then(|m| m.status)
                        .unwrap_or_default();
                    let fresh = s.heartbeat_time.is_some_and(|t| t.0 >= started);
                    Ok((fresh && s.tls_pin.is_some()).then_some(()))
                }
            },
        ))?;
    }
    Ok(())
}

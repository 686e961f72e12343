//! Smoke suite: the environment itself is real. A control plane that accepts the CRDs and
//! enforces their rules, real nodes (kubelet, containerd, runc) that run the ledger app on a
//! ZFS dataset and follow PV node affinity, two machines whose traffic crosses a real link,
//! and ZFS that sends between them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::ListParams;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use ployz::api::{Machine, Migration};
use ployz::manifest::{Format, MigrationRequest, render};
use ployz_e2e::env::{Env, Options};
use ployz_e2e::k8s;
use ployz_e2e::ledger::{self, AckWatch, Ledger};
use ployz_e2e::network::join;
use ployz_e2e::process::run;
use ployz_e2e::wait::wait_for;
use serde_json::json;
use sha2::{Digest, Sha256};

fn main() -> ExitCode {
    ployz_e2e::suite::run(
        Options::new("smoke"),
        &[
            (
                "control_plane_is_ready_with_two_real_nodes",
                control_plane_ready,
            ),
            ("crds_install_and_become_established", crds_install),
            (
                "rendered_migration_is_accepted",
                rendered_migration_is_accepted,
            ),
            (
                "invalid_migrations_are_rejected_by_the_schema",
                invalid_migrations_rejected,
            ),
            ("machine_columns_show_in_kubectl", machine_columns),
            (
                "chart_policies_hold_each_agent_to_its_own_node",
                chart_policies_hold_agents_to_their_node,
            ),
            (
                "real_pod_writes_to_zfs_and_moves_by_hand",
                real_pod_writes_to_zfs_and_moves_by_hand,
            ),
            (
                "pods_on_different_machines_reach_each_other",
                pods_reach_each_other,
            ),
            (
                "a_kubelet_cannot_change_another_node",
                kubelet_confined_to_its_node,
            ),
            (
                "byte_stream_crosses_between_machine_namespaces",
                byte_stream_crosses,
            ),
            (
                "zfs_send_over_tcp_arrives_with_matching_checksums",
                zfs_send_over_tcp,
            ),
        ],
    )
}

fn kubectl(env: &Env, args: &[&str]) -> Result<String> {
    let bins = ployz_e2e::env::bin_dir(&env.root)?;
    let mut cmd = std::process::Command::new(bins.join("kubectl"));
    cmd.arg("--kubeconfig").arg(env.kubeconfig()?).args(args);
    run(&mut cmd)
}

fn control_plane_ready(env: &mut Env) -> Result<()> {
    env.check_control_plane()?;
    let version = env.block_on(env.client.apiserver_version())?;
    ensure!(
        version.git_version == "v1.36.3",
        "apiserver reports {}",
        version.git_version
    );
    let out = kubectl(env, &["get", "nodes", "-o", "name"])?;
    ensure!(out == "node/machine-a\nnode/machine-b\n", "nodes: {out}");
    // Real kubelets on containerd, not kwok.
    let info = kubectl(
        env,
        &[
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.status.nodeInfo.kubeletVersion} {.status.nodeInfo.containerRuntimeVersion}{\"\\n\"}{end}",
        ],
    )?;
    for line in info.lines() {
        ensure!(
            line.starts_with("v1.36.3 containerd://"),
            "not a real kubelet on containerd: {info}"
        );
    }
    Ok(())
}

fn crds_install(env: &mut Env) -> Result<()> {
    let names = env.block_on(k8s::install_crds(&env.client, &env.root.join("crds")))?;
    ensure!(
        names == ["machines.ployz.dev", "migrations.ployz.dev"],
        "installed {names:?}"
    );
    Ok(())
}

fn rendered_migration_is_accepted(env: &mut Env) -> Result<()> {
    env.block_on(k8s::create_namespace(&env.client, "production"))?;
    // What ployzctl prints (examples/migration.yaml is checked to equal it), applied by kubectl.
    let out = kubectl(
        env,
        &[
            "apply",
            "-f",
            &env.root.join("examples/migration.yaml").to_string_lossy(),
        ],
    )?;
    ensure!(
        out.contains("migration.ployz.dev/web-to-machine-b created"),
        "{out}"
    );
    let api: Api<Migration> = Api::namespaced(env.client.clone(), "production");
    let m = env.block_on(api.get("web-to-machine-b"))?;
    ensure!(
        m.spec.service == "web" && m.spec.to == "machine-b",
        "{:?}",
        m.spec
    );

    // A richer manifest through the library, as JSON.
    let mut req = MigrationRequest::new("production/db".parse()?, "machine-a".parse()?);
    req.from = Some("machine-b".parse()?);
    req.bandwidth_limit = Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
        "50Mi".into(),
    ));
    let json = render(&req.to_migration()?, Format::Json)?;
    let obj: Migration = serde_json::from_str(&json)?;
    env.block_on(api.create(&PostParams::default(), &obj))?;

    // The selectable fields work: kubectl can select by target machine.
    let out = kubectl(
        env,
        &[
            "get",
            "migrations",
            "-n",
            "production",
            "--field-selector",
            "spec.to=machine-a",
            "-o",
            "name",
        ],
    )?;
    ensure!(
        out == "migration.ployz.dev/db-to-machine-a\n",
        "field selector: {out}"
    );
    Ok(())
}

/// Creates `spec` as a Migration and returns the API server's refusal message.
fn refusal(env: &Env, name: &str, spec: serde_json::Value) -> Result<String> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("ployz.dev", "v1alpha1", "Migration"));
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), "production", &ar);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "ployz.dev/v1alpha1", "kind": "Migration",
        "metadata": {"name": name}, "spec": spec,
    }))?;
    match env.block_on(api.create(&PostParams::default(), &obj)) {
        Ok(_) => bail!("{name}: accepted {spec}"),
        Err(kube::Error::Api(s)) => Ok(s.message),
        Err(e) => Err(e.into()),
    }
}

fn invalid_migrations_rejected(env: &mut Env) -> Result<()> {
    let cases = [
        (
            "bad-service",
            json!({"service": "Web", "to": "machine-b"}),
            "spec.service: Invalid value",
        ),
        (
            "bad-to",
            json!({"service": "web", "to": "machine_b"}),
            "spec.to: Invalid value",
        ),
        (
            "no-to",
            json!({"service": "web"}),
            "spec.to: Required value",
        ),
        (
            "same",
            json!({"service": "web", "to": "machine-a", "from": "machine-a"}),
            "spec.from and spec.to name the same machine",
        ),
        (
            "slow",
            json!({"service": "web", "to": "machine-b", "transfer": {"bandwidthLimit": "12"}}),
            "bandwidthLimit must be a quantity of bytes per second from 1Ki to 1Ei",
        ),
        (
            "huge",
            json!({"service": "web", "to": "machine-b", "transfer": {"bandwidthLimit": "16Ei"}}),
            "bandwidthLimit must be a quantity of bytes per second from 1Ki to 1Ei",
        ),
        (
            "infinite",
            json!({"service": "web", "to": "machine-b", "transfer": {"bandwidthLimit": "1e400"}}),
            "bandwidthLimit must be a quantity of bytes per second from 1Ki to 1Ei",
        ),
        (
            "long-machine",
            json!({"service": "web", "to": "m".repeat(70)}),
            "spec.to: Too long: may not be more than 63 bytes",
        ),
        (
            "bad-timeout",
            json!({"service": "web", "to": "machine-b", "timeouts": {"cutoverSeconds": 1}}),
            "spec.timeouts.cutoverSeconds: Invalid value",
        ),
        (
            "bad-copy",
            json!({"service": "web", "to": "machine-b", "sourceCopy": "Keep"}),
            "spec.sourceCopy: Unsupported value",
        ),
    ];
    for (name, spec, want) in cases {
        let msg = refusal(env, name, spec)?;
        ensure!(msg.contains(want), "{name}: expected {want:?} in {msg:?}");
    }
    // Kubernetes' own quantity forms pass: a thousandth of 1024000 is 1Ki.
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("ployz.dev", "v1alpha1", "Migration"));
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), "production", &ar);
    let milli: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "ployz.dev/v1alpha1", "kind": "Migration",
        "metadata": {"name": "milli"},
        "spec": {"service": "web", "to": "machine-b", "transfer": {"bandwidthLimit": "1024000m"}},
    }))?;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    env.block_on(api.create(&dry_run, &milli))
        .context("1024000m (1Ki) was refused")?;
    // The spec is immutable once created.
    let api: Api<Migration> = Api::namespaced(env.client.clone(), "production");
    let err = env.block_on(api.patch(
        "web-to-machine-b",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"to": "machine-c"}})),
    ));
    match err {
        Err(kube::Error::Api(s)) => {
            ensure!(s.message.contains("spec is immutable"), "{}", s.message)
        }
        other => bail!("changing spec.to was not refused: {other:?}"),
    }
    Ok(())
}

fn machine_columns(env: &mut Env) -> Result<()> {
    let api: Api<Machine> = Api::all(env.client.clone());
    let m: Machine = serde_json::from_value(json!({
        "apiVersion": "ployz.dev/v1alpha1", "kind": "Machine",
        "metadata": {"name": "machine-a"},
        "spec": {"nodeName": "machine-a", "pool": "tank", "parentDataset": "tank/ployz", "endpoint": "198.18.0.11:7443"},
    }))?;
    env.block_on(api.create(&PostParams::default(), &m))?;
    env.block_on(api.patch_status(
        "machine-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"free": "1.9GiB", "conditions": [{
            "type": "Ready", "status": "True", "reason": "AgentHeartbeat", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})),
    ))?;
    let out = kubectl(env, &["get", "machines.ployz.dev"])?;
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header == ["NAME", "READY", "DRAINING", "POOL", "FREE", "AGE"],
        "{out}"
    );
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        row[..5] == ["machine-a", "True", "false", "tank", "1.9GiB"],
        "{out}"
    );
    env.block_on(api.delete("machine-a", &Default::default()))?;
    Ok(())
}

/// A real pod of the ledger app on machine-a writes into a local PV on a ZFS dataset; moved by
/// hand the way a cutover does (stop, final snapshot, send, rebind, start), it carries on on
/// machine-b, where the kubelet mounts the received dataset, with no acknowledged write lost;
/// and machine-a reaches the pod's address on machine-b across the link.
fn real_pod_writes_to_zfs_and_moves_by_hand(env: &mut Env) -> Result<()> {
    let client = env.client.clone();
    env.block_on(k8s::create_namespace(&client, "smoke"))?;
    let (a, b) = (env.machine("machine-a")?, env.machine("machine-b")?);
    let vol = env.block_on(k8s::create_local_volume(&client, a, "smoke", "data"))?;
    ensure!(
        vol.path == "/tank/ployz/smoke-data",
        "mountpoint {}",
        vol.path
    );
    let watch = AckWatch::start(&env.rt, &client, "smoke", "app=web");
    env.block_on(k8s::create_deployment(&client, "smoke", "web", "data"))?;
    env.block_on(k8s::wait_ready_on(
        &client,
        "smoke",
        "app=web",
        "machine-a",
        1,
    ))?;
    wait_for("acknowledged writes", Duration::from_secs(30), || {
        Ok(watch.acks().by_writer.values().any(|&s| s > 10))
    })?;
    // The container writes into the dataset: the kubelet's bind mount is the ZFS mount.
    ensure!(Ledger::read(a, &vol.path)?.last_seq() > 10);

    env.block_on(async {
        k8s::scale_deployment(&client, "smoke", "web", 0).await?;
        k8s::wait_no_pods(&client, "smoke", "app=web").await
    })?;
    let snap = format!("{}@moved", vol.dataset);
    a.zfs(&["snapshot", &snap])?;
    b.zfs(&["create", "-p", &format!("{}/ployz", b.pool)])?;
    let mut send = a.command("/sbin/zfs");
    let mut sender = send.args(["send", &snap]).stdout(Stdio::piped()).spawn()?;
    let stream = sender.stdout.take().context("zfs send stdout")?;
    let received = b
        .command("/sbin/zfs")
        .args(["receive", &vol.dataset])
        .stdin(stream)
        .output()?;
    ensure!(
        sender.wait()?.success() && received.status.success(),
        "zfs send | zfs receive failed: {}",
        String::from_utf8_lossy(&received.stderr)
    );
    env.block_on(async {
        k8s::rebind_volume(&client, &vol, "machine-b").await?;
        k8s::scale_deployment(&client, "smoke", "web", 1).await?;
        k8s::wait_ready_on(&client, "smoke", "app=web", "machine-b", 1).await
    })?;
    watch.wait_acked_on("machine-b")?;
    let acks = watch.stop();
    let report = ledger::verify_move(&acks, (a, &vol.path), (b, &vol.path))?;
    eprintln!(
        "    {} records, none lost; the app was down {:.2}s",
        report.last_seq,
        report.app_downtime.as_secs_f64()
    );

    // The pod's address on machine-b answers machine-a, across the link.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "smoke");
    let ip: std::net::Ipv4Addr = env
        .block_on(pods.list(&ListParams::default().labels("app=web")))?
        .items
        .iter()
        .find_map(|p| p.status.as_ref()?.pod_ip.clone())
        .context("no pod IP")?
        .parse()?;
    let reply = join(a.net.run_in(move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((ip, ployz_e2e::ledger::PORT)),
            Duration::from_secs(5),
        )?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut r = String::new();
        s.read_to_string(&mut r)?;
        Ok(r)
    }))?;
    ensure!(
        reply.contains("\"seq\""),
        "pod on machine-b answered {reply:?}"
    );
    Ok(())
}

/// A pod of the app on each machine; the one on machine-a fetches the one on machine-b over
/// the pod network (`kubectl exec`, so the API server reaches the kubelet too).
fn pods_reach_each_other(env: &mut Env) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "default");
    for node in ["machine-a", "machine-b"] {
        let pod = k8s::ledger_pod(&format!("net-{node}"), node)?;
        env.block_on(pods.create(&PostParams::default(), &pod))?;
    }
    let ip_b = env.block_on(ployz_e2e::wait::until(
        "both pods Running",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let mut ips = vec![];
                for node in ["machine-a", "machine-b"] {
                    let s = pods.get(&format!("net-{node}")).await?.status;
                    let running = s.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    ips.push(s.and_then(|s| s.pod_ip).filter(|_| running));
                }
                Ok(ips[0].is_some().then(|| ips[1].clone()).flatten())
            }
        },
    ))?;
    ensure!(ip_b.starts_with("198.19.2."), "pod on machine-b has {ip_b}");
    let out = kubectl(
        env,
        &[
            "exec",
            "net-machine-a",
            "--",
            "wget",
            "-qO-",
            &format!("http://{ip_b}:{}/", ployz_e2e::ledger::PORT),
        ],
    )?;
    ensure!(
        out.contains("\"writer\":\"net-machine-b@machine-b\""),
        "the pod on machine-a got {out:?} from the pod on machine-b"
    );
    for node in ["machine-a", "machine-b"] {
        env.block_on(pods.delete(&format!("net-{node}"), &Default::default()))?;
    }
    Ok(())
}

/// Each kubelet has its own node identity, confined by the Node authorizer and
/// NodeRestriction: machine-a's may label its own Node, not machine-b's.
fn kubelet_confined_to_its_node(env: &mut Env) -> Result<()> {
    let kubeconfig = env.nodes[0].kubeconfig.clone();
    let as_node_a = |args: &[&str]| {
        let bins = ployz_e2e::env::bin_dir(&env.root)?;
        let mut cmd = std::process::Command::new(bins.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&kubeconfig).args(args);
        anyhow::Ok(cmd.output()?)
    };
    let own = as_node_a(&["label", "node", "machine-a", "smoke.ployz.dev/own=yes"])?;
    ensure!(
        own.status.success(),
        "machine-a's kubelet cannot label its own node: {}",
        String::from_utf8_lossy(&own.stderr)
    );
    let other = as_node_a(&["label", "node", "machine-b", "smoke.ployz.dev/other=yes"])?;
    let err = String::from_utf8_lossy(&other.stderr);
    ensure!(
        !other.status.success() && err.contains("forbidden"),
        "machine-a's kubelet changed machine-b: {err}"
    );
    Ok(())
}

fn byte_stream_crosses(env: &mut Env) -> Result<()> {
    let a = env.machine("machine-a")?;
    let b = env.machine("machine-b")?;
    let addr = SocketAddr::from((b.ip(), 7001));
    let payload: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let want = Sha256::digest(&payload);

    let listener = join(b.net.run_in(move || Ok(TcpListener::bind(addr)?)))?;
    let server = std::thread::spawn(move || -> Result<(Vec<u8>, SocketAddr)> {
        let (mut conn, peer) = listener.accept()?;
        let mut got = vec![];
        conn.read_to_end(&mut got)?;
        Ok((Sha256::digest(&got).to_vec(), peer))
    });
    join(a.net.run_in(move || {
        let mut s = TcpStream::connect(addr)?;
        s.write_all(&payload)?;
        Ok(())
    }))?;
    let (got, peer) = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    ensure!(got == want.to_vec(), "checksum mismatch");
    ensure!(
        peer.ip() == a.ip(),
        "connection came from {peer}, not machine-a"
    );
    // Not reachable from the host's loopback: the listener lives in machine-b's namespace.
    ensure!(
        TcpStream::connect(("127.0.0.1", 7001)).is_err(),
        "port 7001 open on the host"
    );
    Ok(())
}

fn zfs_send_over_tcp(env: &mut Env) -> Result<()> {
    let a = env.machine("machine-a")?;
    let b = env.machine("machine-b")?;
    let src = format!("{}/smoke-send", a.pool);
    let mp = a.create_dataset(&src)?;
    a.sh(&format!(
        "mkdir -p {mp}/dir && head -c 16777216 /dev/urandom > {mp}/big && echo hello > {mp}/dir/small"
    ))?;
    a.zfs(&["snapshot", &format!("{src}@s1")])?;
    let dst = format!("{}/smoke-recv", b.pool);

    let addr = SocketAddr::from((b.ip(), 7002));
    let listener = join(b.net.run_in(move || Ok(TcpListener::bind(addr)?)))?;
    let mut recv = b.command("/sbin/zfs");
    recv.args(["receive", "-u", &dst])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped());
    let receiver = std::thread::spawn(move || -> Result<()> {
        let (mut conn, _) = listener.accept()?;
        let mut child = recv.spawn()?;
        let mut stdin = child.stdin.take().context("receive stdin")?;
        std::io::copy(&mut conn, &mut stdin)?;
        drop(stdin);
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "zfs receive: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    });
    let mut send = a.command("/sbin/zfs");
    send.args(["send", &format!("{src}@s1")])
        .stdout(Stdio::piped());
    join(a.net.run_in(move || {
        let mut child = send.spawn()?;
        let mut stdout = child.stdout.take().context("send stdout")?;
        let mut s = TcpStream::connect(addr)?;
        std::io::copy(&mut stdout, &mut s)?;
        ensure!(child.wait()?.success(), "zfs send failed");
        Ok(())
    }))?;
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;

    b.zfs(&["mount", &dst])?;
    let want = a.checksums(&mp)?;
    let got = b.checksums("/tank/smoke-recv")?;
    ensure!(want.lines().count() == 2, "source files: {want}");
    ensure!(got == want, "checksums differ:\n{want}\nvs\n{got}");
    let guid = |m: &ployz_e2e::machine::ZfsMachine, ds: &str| {
        m.zfs(&[
            "get",
            "-H",
            "-p",
            "-o",
            "value",
            "guid",
            &format!("{ds}@s1"),
        ])
    };
    ensure!(guid(a, &src)? == guid(b, &dst)?, "snapshot GUIDs differ");
    Ok(())
}

const AGENT_NS: &str = "ployz-system";

fn agent_of(env: &Env, node: Option<&str>) -> Result<Client> {
    env.agent_client(node)
}

/// `Err(message)` of a refused request, `Ok(())` of an accepted one.
fn outcome<T>(r: kube::Result<T>) -> Result<Result<(), String>> {
    match r {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(e)) => Ok(Err(e.message)),
        Err(e) => Err(e.into()),
    }
}

/// Patch parameters of a real write, or of a server-side dry run (`dry`), which goes through
/// admission (the policies) and stores nothing.
fn params(dry: bool) -> PatchParams {
    PatchParams {
        dry_run: dry,
        ..PatchParams::default()
    }
}

fn set_pin(env: &Env, client: &Client, machine: &str) -> Result<Result<(), String>> {
    set_pin_dry(env, client, machine, false)
}

fn set_pin_dry(env: &Env, client: &Client, machine: &str, dry: bool) -> Result<Result<(), String>> {
    let api: Api<Machine> = Api::all(client.clone());
    let pin = format!("sha256:{}", "0".repeat(64));
    outcome(env.block_on(api.patch_status(
        machine,
        &params(dry),
        &Patch::Merge(json!({"status": {"tlsPin": pin}})),
    )))
}

fn set_phase_message(
    env: &Env,
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Result<(), String>> {
    set_phase_message_dry(env, client, ns, name, false)
}

fn set_phase_message_dry(
    env: &Env,
    client: &Client,
    ns: &str,
    name: &str,
    dry: bool,
) -> Result<Result<(), String>> {
    let api: Api<Migration> = Api::namespaced(client.clone(), ns);
    outcome(env.block_on(api.patch_status(
        name,
        &params(dry),
        &Patch::Merge(json!({"status": {"message": "written by a test"}})),
    )))
}

fn refused_with(r: Result<(), String>, words: &str, what: &str) -> Result<()> {
    match r {
        Err(message) if message.contains(words) => Ok(()),
        Err(message) => bail!("{what}: refused, but the message does not say {words:?}: {message}"),
        Ok(()) => bail!("{what}: accepted"),
    }
}

/// The chart's RBAC and admission policies, rendered by helm and applied to the cluster: an
/// agent (authenticated with its pod's token, which names its node) writes only its own
/// node's Machine (where it publishes the key peers pin) and only the Migrations its node is
/// the target or planned source of; a namespace user cannot write a Migration's status.
fn chart_policies_hold_agents_to_their_node(env: &mut Env) -> Result<()> {
    let helm = ployz_e2e::env::helm(&env.root)?;
    let chart = env.root.join("charts/ployz");
    let mut template = std::process::Command::new(helm);
    template
        .args(["template", "ployz"])
        .arg(&chart)
        .args(["--namespace", AGENT_NS]);
    for part in ["serviceaccount", "rbac", "admission-policies"] {
        template.args(["--show-only", &format!("templates/{part}.yaml")]);
    }
    let rendered = run(&mut template)?;
    // The chart's own copy of the CRDs, as `helm install` applies them.
    env.block_on(k8s::install_crds(&env.client, &chart.join("crds")))?;
    let file = env.state.join("chart-policies.yaml");
    std::fs::write(&file, rendered)?;
    env.block_on(k8s::create_namespace(&env.client, AGENT_NS))?;
    kubectl(env, &["apply", "-f", &file.to_string_lossy()])?;

    let machines: Api<Machine> = Api::all(env.client.clone());
    for name in ["policy-a", "policy-b"] {
        let m: Machine = serde_json::from_value(json!({
            "apiVersion": "ployz.dev/v1alpha1", "kind": "Machine",
            "metadata": {"name": name},
            "spec": {"nodeName": name, "pool": "tank", "parentDataset": "tank/ployz", "endpoint": "198.18.0.99:7420"},
        }))?;
        env.block_on(machines.create(&PostParams::default(), &m))?;
    }
    let ns = "policy";
    env.block_on(k8s::create_namespace(&env.client, ns))?;
    let migrations: Api<Migration> = Api::namespaced(env.client.clone(), ns);
    let req = MigrationRequest::new("policy/web".parse()?, "policy-a".parse()?);
    env.block_on(migrations.create(&PostParams::default(), &req.to_migration()?))?;
    // A cluster admin may still write status by hand (what the hostile tests do).
    env.block_on(migrations.patch_status(
        "web-to-policy-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Sending", "plan": {
            "source": "policy-c", "target": "policy-a",
            "workload": {"kind": "Deployment", "name": "web"}, "volumes": []}}})),
    ))?;

    let (agent_a, agent_b) = (
        agent_of(env, Some("policy-a"))?,
        agent_of(env, Some("policy-b"))?,
    );
    // PVs: only local PVs below the pool's mount root (or zfs-localpv volumes).
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(agent_b.clone());
    let pv_dry = |name: &str, source: serde_json::Value, dry: bool| -> Result<Result<(), String>> {
        let mut spec = json!({
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["policy-b"]}]}]}},
        });
        if let (Some(spec), Some(source)) = (spec.as_object_mut(), source.as_object()) {
            spec.extend(source.clone());
        }
        let pv = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?;
        let post = PostParams {
            dry_run: dry,
            ..PostParams::default()
        };
        outcome(env.block_on(pvs.create(&post, &pv)))
    };
    let pv = |name: &str, source: serde_json::Value| pv_dry(name, source, false);
    // Workloads: where they run, not what they run.
    env.block_on(k8s::create_deployment(
        &env.client,
        ns,
        "policy-web",
        "data",
    ))?;
    let deployments: Api<Deployment> = Api::namespaced(agent_b.clone(), ns);
    let patch_dry = |p: serde_json::Value, dry: bool| {
        outcome(env.block_on(deployments.patch("policy-web", &params(dry), &Patch::Strategic(p))))
    };
    let patch = |p: serde_json::Value| patch_dry(p, false);
    // A namespace user allowed by RBAC to write status (stopped by a policy).
    kubectl(
        env,
        &[
            "-n",
            ns,
            "create",
            "role",
            "status-writer",
            "--verb=patch",
            "--resource=migrations.ployz.dev/status",
        ],
    )?;
    kubectl(
        env,
        &[
            "-n",
            ns,
            "create",
            "rolebinding",
            "jane",
            "--role=status-writer",
            "--user=jane",
        ],
    )?;
    let jane = env.client_as("jane", &["system:authenticated"], None)?;
    // Each policy (and the RBAC applied with them) takes effect once the API server has
    // loaded it, one after the other: wait until a dry run of a request each policy must
    // refuse is refused by that policy, for all five.
    let says = |r: Result<(), String>, words: &str| r.is_err_and(|m| m.contains(words));
    wait_for(
        "the five admission policies to be enforced",
        Duration::from_secs(30),
        || {
            let other_account =
                json!({"spec": {"template": {"spec": {"serviceAccountName": "admin"}}}});
            Ok(says(
                set_pin_dry(env, &agent_b, "policy-a", true)?,
                "may write only Machine",
            ) && says(
                set_phase_message_dry(env, &agent_b, ns, "web-to-policy-a", true)?,
                "may write only Migrations whose target",
            ) && says(
                set_phase_message_dry(env, &jane, ns, "web-to-policy-a", true)?,
                "only the ployz agents write",
            ) && says(
                pv_dry("policy-probe", json!({"hostPath": {"path": "/"}}), true)?,
                "writes only local PVs",
            ) && says(patch_dry(other_account, true)?, "may not change"))
        },
    )?;
    refused_with(
        set_pin(env, &agent_b, "policy-a")?,
        "may write only Machine policy-b, not policy-a",
        "policy-b's agent publishing a key for policy-a",
    )?;
    set_pin(env, &agent_b, "policy-b")?
        .map_err(|e| anyhow::anyhow!("policy-b's agent could not write its own Machine: {e}"))?;
    refused_with(
        set_pin(env, &agent_of(env, None)?, "policy-b")?,
        "carries no node name",
        "an agent token without a node name",
    )?;
    ensure!(
        outcome(env.block_on(
            Api::<Machine>::all(agent_b.clone()).delete("policy-b", &Default::default())
        ))?
        .is_err(),
        "an agent deleted its Machine"
    );

    refused_with(
        set_phase_message(env, &agent_b, ns, "web-to-policy-a")?,
        "may write only Migrations whose target",
        "policy-b's agent writing the status of a Migration from policy-c to policy-a",
    )?;
    set_phase_message(env, &agent_a, ns, "web-to-policy-a")?
        .map_err(|e| anyhow::anyhow!("the target's agent could not write status: {e}"))?;

    refused_with(
        pv("policy-host-root", json!({"hostPath": {"path": "/"}}))?,
        "writes only local PVs below /tank",
        "an agent creating a hostPath PV",
    )?;
    refused_with(
        pv("policy-etc", json!({"local": {"path": "/etc"}}))?,
        "writes only local PVs below /tank",
        "an agent creating a local PV outside the pool",
    )?;
    pv(
        "policy-pool",
        json!({"local": {"path": "/tank/ployz/policy-pool"}}),
    )?
    .map_err(|e| anyhow::anyhow!("an agent could not create a local PV in the pool: {e}"))?;

    refused_with(
        patch(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "policy-web", "image": "attacker.example/shell:1"}]}}}}))?,
        "may not change spec.template.spec.containers",
        "an agent changing a workload's image",
    )?;
    refused_with(
        patch(json!({"spec": {"template": {"spec": {"serviceAccountName": "admin"}}}}))?,
        "may not change spec.template.spec.serviceAccountName",
        "an agent changing a workload's service account",
    )?;
    patch(
        json!({"spec": {"replicas": 0, "template": {"spec": {"nodeSelector": {
        "kubernetes.io/hostname": "policy-b"}}}}}),
    )?
    .map_err(|e| anyhow::anyhow!("an agent could not scale and pin a workload: {e}"))?;

    refused_with(
        set_phase_message(env, &jane, ns, "web-to-policy-a")?,
        "only the ployz agents write a Migration status (jane tried)",
        "a namespace user writing status",
    )?;
    set_phase_message(env, &env.client, ns, "web-to-policy-a")?
        .map_err(|e| anyhow::anyhow!("a cluster admin could not write status: {e}"))?;

    // A namespace editor (the built-in `edit` role, which the chart's role aggregates into)
    // creates Migrations in its namespace and nowhere else, and reads Machines.
    kubectl(
        env,
        &[
            "-n",
            ns,
            "create",
            "rolebinding",
            "editor",
            "--clusterrole=edit",
            "--user=editor",
        ],
    )?;
    env.block_on(k8s::create_namespace(&env.client, "policy-other"))?;
    let editor = env.client_as("editor", &["system:authenticated"], None)?;
    let create_in = |namespace: &str| -> Result<Result<(), String>> {
        let api: Api<Migration> = Api::namespaced(editor.clone(), namespace);
        let req = MigrationRequest::new(format!("{namespace}/db").parse()?, "policy-b".parse()?);
        outcome(env.block_on(api.create(&PostParams::default(), &req.to_migration()?)))
    };
    wait_for(
        "the edit role to aggregate ployz's rules",
        Duration::from_secs(30),
        || Ok(create_in(ns)?.is_ok()),
    )?;
    refused_with(
        create_in("policy-other")?,
        "forbidden",
        "a namespace editor creating a Migration in another namespace",
    )?;
    outcome(env.block_on(Api::<Machine>::all(editor.clone()).list(&ListParams::default())))?
        .map_err(|e| anyhow::anyhow!("a user could not list Machines: {e}"))?;
    Ok(())
}

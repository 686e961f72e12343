//! Migration suite: the agents (`ployz-controller` processes, one per machine, in the
//! machine's namespaces) move real workloads between the two zfs-fuse machines through the
//! real control plane. The workloads are real pods on real kubelets: the ledger app
//! (tests/images/ledger.c) writes a checksummed, fsync'd record every 20 ms into the volume the
//! kubelet mounted, also while the volume is pre-copied. Every test asserts where the pods run,
//! what the volumes hold, what the Migration's status says, and that no write the app
//! acknowledged is missing or torn; moves report the downtime the app itself saw.

use std::process::ExitCode;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use kube::api::ListParams;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use ployz::api::{Migration, Phase};
use ployz::manifest::MigrationRequest;
use ployz::names::{MachineName, ServiceRef};
use ployz::plan::rebind::pv_on_node;
use ployz_e2e::agents::{
    AGENT_HTTP_PORT, Agent, connect_from, identity, published_pin, workspace_binary,
};
use ployz_e2e::env::{Env, Options};
use ployz_e2e::k8s::{self, LocalVolume};
use ployz_e2e::ledger::{self, AckWatch, Ledger, MoveReport};
use ployz_e2e::machine::ZfsMachine;
use ployz_e2e::wait::{until, wait_for};

const A: &str = "machine-a";
const B: &str = "machine-b";
const OPENEBS: &str = "openebs";
const DONE: Duration = Duration::from_secs(180);

fn main() -> ExitCode {
    ployz_e2e::suite::run(
        Options::new("migrate"),
        &[
            ("agent_without_crds_fails_fast", agent_without_crds),
            // Early: it moves every ZFS-backed workload on machine-a, so only its own.
            (
                "machine_drain_moves_every_zfs_workload_away_and_cordons",
                drain_moves_everything,
            ),
            (
                "deployment_moves_to_b_and_back_with_only_the_delta",
                deployment_moves_and_back,
            ),
            ("statefulset_with_two_volumes_moves", statefulset_moves),
            ("zfs_localpv_volume_moves", zfs_localpv_moves),
            ("refusals_leave_the_workload_untouched", refusals),
            (
                "ployzctl_preview_machine_ls_and_drain",
                ployzctl_preview_and_drain,
            ),
            (
                "ployzctl_moves_there_back_and_there_again_then_cancels_one",
                ployzctl_back_and_forth,
            ),
            ("target_without_room_fails_cleanly", no_room),
            (
                "pods_not_ready_on_target_roll_back_to_the_source",
                not_ready_rolls_back,
            ),
            (
                "duplicate_refused_and_deleting_mid_send_cancels",
                duplicate_and_cancel,
            ),
            (
                "source_agent_killed_mid_send_resumes_and_completes",
                source_agent_killed,
            ),
            (
                "target_agent_killed_mid_send_is_retried_and_completes",
                target_agent_killed,
            ),
            (
                "rollback_after_scale_up_stops_the_target_s_pods_first",
                rollback_stops_target_first,
            ),
            (
                "crash_between_recorded_pinning_and_patch_still_pins_the_target",
                crash_before_pin,
            ),
            (
                "target_gone_during_cutover_rolls_back_within_seconds",
                target_gone_in_cutover,
            ),
            (
                "source_agent_gone_mid_send_target_takes_over_and_rolls_back",
                source_gone_mid_send,
            ),
            (
                "source_agent_gone_after_promotion_target_takes_over_and_completes",
                source_gone_after_promotion,
            ),
            (
                "source_machine_switched_off_mid_send_the_workload_stays_and_runs_there_again",
                source_switched_off,
            ),
            (
                "ployzctl_abandon_and_complete_decide_for_the_operator",
                abandon_and_complete,
            ),
            (
                "api_server_restart_mid_send_the_move_completes",
                apiserver_restart_mid_send,
            ),
            (
                "source_copy_delete_destroys_only_the_volume_and_says_when_it_cannot",
                source_copy_delete,
            ),
            (
                "hostile_claim_naming_another_namespace_s_volume_is_refused",
                cross_namespace_volume,
            ),
            ("hostile_plan_forged_in_status_moves_nothing", forged_plan),
            (
                "hostile_binding_forged_after_a_takeover_rebinds_nothing",
                forged_binding_after_takeover,
            ),
            (
                "hostile_out_of_file_descriptors_the_agent_pauses_and_serves_again",
                out_of_descriptors,
            ),
            // Last: it replaces the process agents with the chart's pods.
            (
                "installed_with_helm_agents_run_as_pods_and_move_a_workload",
                installed_with_helm,
            ),
        ],
    )
}

/// The agents, started once for the suite; a test may replace one.
struct Agents {
    running: Mutex<Vec<Agent>>,
}

fn agents(env: &Env) -> Result<&'static Agents> {
    static AGENTS: OnceLock<Agents> = OnceLock::new();
    if let Some(a) = AGENTS.get() {
        return Ok(a);
    }
    env.block_on(k8s::install_crds(&env.client, &env.root.join("crds")))?;
    env.block_on(k8s::install_crds(
        &env.client,
        &env.root.join("tests/fixtures/openebs"),
    ))?;
    env.block_on(k8s::create_namespace(&env.client, OPENEBS))?;
    let running = vec![start_agent(env, A)?, start_agent(env, B)?];
    Ok(AGENTS.get_or_init(|| Agents {
        running: Mutex::new(running),
    }))
}

fn start_agent(env: &Env, machine: &str) -> Result<Agent> {
    Agent::start(env, machine, &AGENT_ARGS)
}

/// Every agent of the suite: heartbeats every 2 s (the harness), takeover after 20 s (well
/// above the few seconds a killed agent takes to start again in the restart tests).
const AGENT_ARGS: [&str; 6] = [
    "--openebs-namespace",
    OPENEBS,
    "--precopy-threshold",
    "1048576",
    "--takeover-seconds",
    "20",
];

/// A namespace with a Deployment `web` of the ledger app on a local ZFS volume on machine-a,
/// Ready there, with `mib` MiB of files in it, and a watch on what the app acknowledges.
fn deployment_on_a(env: &Env, ns: &str, mib: u32) -> Result<(LocalVolume, AckWatch)> {
    deployment_on_a_with(env, ns, mib, &k8s::AppOptions::default())
}

/// [`deployment_on_a`] with a variation of the app for a fault test.
fn deployment_on_a_with(
    env: &Env,
    ns: &str,
    mib: u32,
    opts: &k8s::AppOptions<'_>,
) -> Result<(LocalVolume, AckWatch)> {
    agents(env)?;
    let a = env.machine(A)?;
    env.block_on(k8s::create_namespace(&env.client, ns))?;
    let vol = env.block_on(k8s::create_local_volume(&env.client, a, ns, "data"))?;
    write_files(a, &vol.path, "before", mib)?;
    env.block_on(k8s::create_deployment_with(
        &env.client,
        ns,
        "web",
        "data",
        opts,
    ))?;
    env.block_on(k8s::wait_ready_on(&env.client, ns, "app=web", A, 1))?;
    let app = watch_app(env, ns, "app=web", A)?;
    Ok((vol, app))
}

/// [`deployment_on_a`] with 32 MiB, and Migration `web-to-b` under way at 4 MiB/s until
/// `sent` bytes have crossed: a move a test can interrupt mid-send.
fn slow_move_under_way(env: &Env, ns: &str, sent: u64) -> Result<(LocalVolume, AckWatch)> {
    let (vol, app) = deployment_on_a(env, ns, 32)?;
    migrate(
        env,
        &Request {
            bandwidth: Some("4Mi"),
            ..Request::new(ns, "web-to-b", B)
        },
    )?;
    wait_sent(env, ns, "web-to-b", sent)?;
    Ok((vol, app))
}

/// Watches the ledger app of `selector` until a pod on `node` has acknowledged a write.
fn watch_app(env: &Env, ns: &str, selector: &str, node: &str) -> Result<AckWatch> {
    let app = AckWatch::start(&env.rt, &env.client, ns, selector);
    app.wait_acked_on(node)?;
    Ok(app)
}

/// After a move of the app from `from` to `to` by Migration `m`: the app writes on the
/// target, every write it acknowledged is in the target's ledger, the source's ledger is a
/// prefix of it, the app wrote during the pre-copy; prints the downtime the app saw beside
/// the one the Migration reports.
fn app_moved(
    app: &AckWatch,
    m: &Migration,
    from: (&ZfsMachine, &str),
    to: (&ZfsMachine, &str),
) -> Result<MoveReport> {
    app.wait_acked_on(&to.0.name)?;
    let report = ledger::verify_move(&app.acks(), from, to)?;
    let s = m.status.clone().unwrap_or_default();
    let sending = s
        .phase_transitions
        .iter()
        .find(|t| t.phase == Phase::Sending)
        .context("no Sending phase")?
        .time
        .0
        .as_nanosecond();
    ensure!(
        i128::from(report.handover.from.time_ns) > sending,
        "the app's last write on the source predates the pre-copy"
    );
    eprintln!(
        "    app: {} records, none lost; downtime seen by the app {:.2}s (last write on {} -> first on {}), status.downtime {:.2}s",
        report.last_seq,
        report.app_downtime.as_secs_f64(),
        from.0.name,
        to.0.name,
        s.downtime_milliseconds.unwrap_or_default() as f64 / 1000.0
    );
    Ok(report)
}

/// After a failed or cancelled move: the app writes on machine-a again and every write it
/// acknowledged is in its ledger there.
fn app_intact(app: &AckWatch, a: &ZfsMachine, path: &str) -> Result<()> {
    resumed_on_a(app)?;
    // The acknowledgements first, then the ledger: an ack seen after the read could be of a
    // record written after it.
    let acks = app.acks();
    Ledger::read(a, path)?.check_acks(&acks)
}

/// Waits until the app acknowledges a write on machine-a it had not acknowledged before.
fn resumed_on_a(app: &AckWatch) -> Result<()> {
    let before = app.acks();
    wait_for(
        "the app to acknowledge new writes on machine-a",
        Duration::from_secs(60),
        || {
            let now = app.acks();
            Ok(now.by_writer.iter().any(|(w, &seq)| {
                ledger::node_of(w) == Some(A) && before.by_writer.get(w).is_none_or(|&b| seq > b)
            }))
        },
    )
}

/// `count` files of 1 MiB of random data named PREFIX-N in `dir` on machine `m`.
fn write_files(m: &ZfsMachine, dir: &str, prefix: &str, count: u32) -> Result<()> {
    m.sh(&format!(
        "cd '{dir}' && for i in $(seq 1 {count}); do head -c 1048576 /dev/urandom > {prefix}-$i; done && sync"
    ))?;
    Ok(())
}

struct Request<'a> {
    ns: &'a str,
    name: &'a str,
    service: &'a str,
    to: &'a str,
    from: Option<&'a str>,
    bandwidth: Option<&'a str>,
    target_ready_seconds: Option<u32>,
    source_copy: Option<ployz::api::SourceCopy>,
}

impl<'a> Request<'a> {
    fn new(ns: &'a str, name: &'a str, to: &'a str) -> Self {
        Self {
            ns,
            name,
            service: "web",
            to,
            from: None,
            bandwidth: None,
            target_ready_seconds: None,
            source_copy: None,
        }
    }
}

/// Creates the Migration `ployzctl migrate render-manifest` would render for `r`.
fn migrate(env: &Env, r: &Request) -> Result<()> {
    let mut req = MigrationRequest::new(
        format!("{}/{}", r.ns, r.service).parse::<ServiceRef>()?,
        r.to.parse::<MachineName>()?,
    );
    req.name = Some(r.name.into());
    req.from = r.from.map(str::parse::<MachineName>).transpose()?;
    req.bandwidth_limit = r.bandwidth.map(|b| Quantity(b.into()));
    req.source_copy = r.source_copy;
    let mut m = req.to_migration()?;
    if let Some(secs) = r.target_ready_seconds {
        m.spec.timeouts = Some(ployz::api::Timeouts {
            target_ready_seconds: Some(secs),
            ..Default::default()
        });
    }
    let api: Api<Migration> = Api::namespaced(env.client.clone(), r.ns);
    env.block_on(api.create(&PostParams::default(), &m))?;
    Ok(())
}

fn get(env: &Env, ns: &str, name: &str) -> Result<Migration> {
    let api: Api<Migration> = Api::namespaced(env.client.clone(), ns);
    Ok(env.block_on(api.get(name))?)
}

fn phase(m: &Migration) -> Option<Phase> {
    m.status.as_ref().and_then(|s| s.phase)
}

/// Waits until the Migration satisfies `pred`; fails at once if it ends otherwise.
fn wait_migration(
    env: &Env,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Migration) -> bool,
) -> Result<Migration> {
    let api: Api<Migration> = Api::namespaced(env.client.clone(), ns);
    let m = env.block_on(until(
        &format!("Migration {ns}/{name} {what}"),
        timeout,
        || {
            let api = api.clone();
            let pred = &pred;
            async move {
                let m = api.get(name).await?;
                let ended = phase(&m).is_some_and(Phase::is_terminal);
                Ok((pred(&m) || ended).then_some(m))
            }
        },
    ))?;
    if !pred(&m) {
        let s = m.status.clone().unwrap_or_default();
        bail!(
            "Migration {ns}/{name} ended {:?} ({}) instead of {what}: {}",
            s.phase,
            s.reason.unwrap_or_default(),
            s.message.unwrap_or_default()
        );
    }
    Ok(m)
}

/// Waits until the Migration's progress shows more than `bytes` sent.
fn wait_sent(env: &Env, ns: &str, name: &str, bytes: u64) -> Result<Migration> {
    wait_migration(env, ns, name, &format!("{bytes} bytes sent"), DONE, |m| {
        m.status
            .as_ref()
            .and_then(|s| s.progress.as_ref())
            .is_some_and(|p| p.bytes_sent > bytes)
    })
}

fn wait_phase(env: &Env, ns: &str, name: &str, want: Phase) -> Result<Migration> {
    wait_migration(env, ns, name, &format!("{want:?}"), DONE, |m| {
        phase(m) == Some(want)
    })
}

/// Asserts a Migration that moved the workload: phases, downtime, bytes.
fn assert_succeeded(m: &Migration) -> Result<u64> {
    let s = m.status.clone().unwrap_or_default();
    let phases: Vec<Phase> = s.phase_transitions.iter().map(|t| t.phase).collect();
    for p in [
        Phase::Snapshotting,
        Phase::Sending,
        Phase::CuttingOver,
        Phase::Succeeded,
    ] {
        ensure!(phases.contains(&p), "phase {p:?} missing from {phases:?}");
    }
    let downtime = s.downtime_milliseconds.context("no downtime recorded")?;
    ensure!(downtime > 0, "downtime {downtime} ms");
    ensure!(
        s.conditions
            .iter()
            .any(|c| c.type_ == "Succeeded" && c.status == "True"),
        "Succeeded condition not True: {:?}",
        s.conditions
    );
    Ok(s.pre_copy.map_or(0, |p| p.pass_bytes.iter().sum()))
}

/// The PV is bound to `node` and the pods run Ready there.
fn assert_on(env: &Env, ns: &str, pv: &str, selector: &str, node: &str) -> Result<()> {
    let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
    let p = env.block_on(pvs.get(pv))?;
    ensure!(pv_on_node(&p, node), "PV {pv} is not pinned to {node}");
    env.block_on(k8s::wait_ready_on(&env.client, ns, selector, node, 1))
}

fn mountpoint(m: &ZfsMachine, dataset: &str) -> Result<String> {
    Ok(m.zfs(&["get", "-H", "-o", "value", "mountpoint", dataset])?
        .trim()
        .to_string())
}

fn prop(m: &ZfsMachine, dataset: &str, prop: &str) -> Result<String> {
    Ok(m.zfs(&["get", "-H", "-o", "value", prop, dataset])?
        .trim()
        .to_string())
}

/// Waits until no Migration locks the workload (released right after the phase is written).
fn wait_unlocked(env: &Env, ns: &str) -> Result<()> {
    wait_for(
        "the workload's lock to be released",
        Duration::from_secs(30),
        || Ok(lock_holder(env, ns)?.is_none()),
    )
}

fn lock_holder(env: &Env, ns: &str) -> Result<Option<String>> {
    let api: Api<Deployment> = Api::namespaced(env.client.clone(), ns);
    let d = env.block_on(api.get("web"))?;
    Ok(d.metadata
        .annotations
        .and_then(|a| a.get("ployz.dev/migration").cloned()))
}

fn deployment_moves_and_back(env: &mut Env) -> Result<()> {
    let ns = "mig-deploy";
    let (vol, app) = deployment_on_a(env, ns, 24)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    // Earlier tests may have moved workloads from machine-a: its counters go up by one here.
    let metrics = http_get(env, A, "/metrics")?;
    let (moved_before, downtimes_before) = (
        metric(&metrics, "ployz_migrations_total{result=\"Succeeded\"}"),
        metric(&metrics, "ployz_downtime_seconds_count"),
    );
    // Rate-limited, so that files written below land during pre-copy.
    migrate(
        env,
        &Request {
            bandwidth: Some("8Mi"),
            ..Request::new(ns, "web-to-b", B)
        },
    )?;
    wait_phase(env, ns, "web-to-b", Phase::Sending)?;
    write_files(a, &vol.path, "during", 2)?;
    let m = get(env, ns, "web-to-b")?;
    ensure!(
        phase(&m) == Some(Phase::Sending),
        "pre-copy ended before the writes: {:?}",
        phase(&m)
    );
    let m = wait_phase(env, ns, "web-to-b", Phase::Succeeded)?;
    let there = assert_succeeded(&m)?;
    ensure!(there > 24 << 20, "first move sent only {there} bytes");
    assert_on(env, ns, &vol.pv, "app=web", B)?;
    let on_b = mountpoint(b, &vol.dataset)?;
    app_moved(&app, &m, (a, &vol.path), (b, &on_b))?;
    ensure!(
        a.checksums(&vol.path)? == b.checksums(&on_b)?,
        "checksums differ after the move"
    );
    ensure!(
        a.checksums(&vol.path)?.lines().count() == 26,
        "not every file is there"
    );
    ensure!(prop(a, &vol.dataset, "ployz:replica")? == "true");
    ensure!(
        a.sh(&format!("touch '{}/x'", vol.path)).is_err(),
        "the source copy is still writable"
    );
    wait_unlocked(env, ns)?;

    // The app writes on b; moving back sends only that.
    write_files(b, &on_b, "on-b", 1)?;
    migrate(env, &Request::new(ns, "web-to-a", A))?;
    let back = wait_phase(env, ns, "web-to-a", Phase::Succeeded)?;
    let delta = assert_succeeded(&back)?;
    ensure!(
        delta > 1 << 20 && delta < 4 << 20,
        "moving back sent {delta} bytes, expected about the 1 MiB written on b (first move: {there})"
    );
    assert_on(env, ns, &vol.pv, "app=web", A)?;
    app_moved(&app, &back, (b, &on_b), (a, &vol.path))?;
    ensure!(
        a.checksums(&vol.path)? == b.checksums(&on_b)?,
        "checksums differ after moving back"
    );
    eprintln!("    moved there: {there} bytes; back: {delta} bytes");

    // Retention: on each machine the dataset keeps one ployz snapshot, the last common one
    // (the way back's final), and no hold; the first move's and the passes' are pruned.
    let last = ployz::plan::snapshot_name(&back.metadata.uid.clone().unwrap_or_default(), None);
    for m in [a, b] {
        wait_for(
            &format!("{}'s ployz snapshots pruned to {last}", m.name),
            Duration::from_secs(30),
            || {
                let list = m.zfs(&[
                    "list",
                    "-H",
                    "-r",
                    "-t",
                    "snapshot",
                    "-o",
                    "name,userrefs",
                    &vol.dataset,
                ])?;
                let ours: Vec<&str> = list.lines().filter(|l| l.contains("@ployz-")).collect();
                Ok(ours == [format!("{}@{last}\t0", vol.dataset).as_str()])
            },
        )?;
    }

    // Reported: an Event per phase change, and the agents' metrics.
    let events: Api<Event> = Api::namespaced(env.client.clone(), ns);
    let reasons: Vec<String> = env
        .block_on(events.list(&ListParams::default()))?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web-to-b"))
        .filter_map(|e| e.reason)
        .collect();
    for want in ["Planned", "PreCopyDone", "Succeeded"] {
        ensure!(
            reasons.iter().any(|r| r == want),
            "no {want} event in {reasons:?}"
        );
    }
    let metrics = http_get(env, A, "/metrics")?;
    let (moved, downtimes) = (
        metric(&metrics, "ployz_migrations_total{result=\"Succeeded\"}"),
        metric(&metrics, "ployz_downtime_seconds_count"),
    );
    ensure!(
        moved == moved_before + 1 && downtimes == downtimes_before + 1,
        "machine-a's metrics do not count the one migration it drove (before: {moved_before} moved, {downtimes_before} downtimes):\n{metrics}"
    );
    ensure!(http_get(env, B, "/readyz")?.ends_with("ready"));
    // The watches its waiting steps opened are closed once the moves ended.
    for machine in [A, B] {
        wait_for(
            &format!("{machine}'s agent to close its step watches"),
            Duration::from_secs(10),
            || Ok(metric(&http_get(env, machine, "/metrics")?, "ployz_step_watches") == 0),
        )?;
    }
    Ok(())
}

/// The value of the sample `name` (with its labels) in a Prometheus text exposition; 0 when
/// absent (a counter not yet incremented).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// An HTTP GET to an agent's health port, from inside the machine's network.
fn http_get(env: &Env, machine: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = env.machine(machine)?;
    let addr = std::net::SocketAddr::from((m.ip(), AGENT_HTTP_PORT));
    let net = m.net.clone();
    env.block_on(async move {
        let mut tcp = connect_from(net, addr).await?;
        tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        tcp.read_to_string(&mut body).await?;
        ensure!(
            body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
            "{body}"
        );
        Ok(body.trim_end().to_string())
    })
}

/// Without the CRDs the agent exits at once and says how to install them.
fn agent_without_crds(env: &mut Env) -> Result<()> {
    let mut cmd = Agent::command(env, A, (7498, 7499))?;
    let out = cmd.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "the agent ran without CRDs");
    ensure!(
        stderr.contains("CRDs are not installed") && stderr.contains("kubectl apply -f crds/"),
        "unclear error: {stderr}"
    );
    Ok(())
}

fn statefulset_moves(env: &mut Env) -> Result<()> {
    let ns = "mig-sts";
    agents(env)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    env.block_on(k8s::create_namespace(&env.client, ns))?;
    let mut vols = vec![];
    for claim in ["data-db-0", "logs-db-0"] {
        let v = env.block_on(k8s::create_local_volume(&env.client, a, ns, claim))?;
        write_files(a, &v.path, claim, 3)?;
        vols.push(v);
    }
    env.block_on(k8s::create_statefulset(
        &env.client,
        ns,
        "db",
        &["data", "logs"],
    ))?;
    // Pinned to its machine, as many stateful apps on local disks are.
    let sts: Api<k8s_openapi::api::apps::v1::StatefulSet> = Api::namespaced(env.client.clone(), ns);
    let pin = |node: &str| serde_json::json!({"spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/hostname": node}}}}});
    env.block_on(sts.patch(
        "db",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(pin(A)),
    ))?;
    env.block_on(k8s::wait_ready_on(&env.client, ns, "app=db", A, 1))?;
    let app = watch_app(env, ns, "app=db", A)?;
    migrate(
        env,
        &Request {
            service: "db",
            ..Request::new(ns, "db-to-b", B)
        },
    )?;
    let m = wait_phase(env, ns, "db-to-b", Phase::Succeeded)?;
    assert_succeeded(&m)?;
    // The app keeps its ledger in the first volume.
    app_moved(
        &app,
        &m,
        (a, &vols[0].path),
        (b, &mountpoint(b, &vols[0].dataset)?),
    )?;
    let plan = m.status.and_then(|s| s.plan).context("no plan")?;
    ensure!(plan.workload.kind == "StatefulSet");
    ensure!(plan.volumes.len() == 2, "{:?}", plan.volumes);
    let selector = env
        .block_on(sts.get("db"))?
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.node_selector)
        .unwrap_or_default();
    ensure!(
        selector.get("kubernetes.io/hostname").map(String::as_str) == Some(B),
        "the pod template is still pinned elsewhere: {selector:?}"
    );
    for v in &vols {
        assert_on(env, ns, &v.pv, "app=db", B)?;
        ensure!(
            a.checksums(&v.path)? == b.checksums(&mountpoint(b, &v.dataset)?)?,
            "{} differs",
            v.claim
        );
    }
    Ok(())
}

/// An OpenEBS zfs-localpv volume moves with its ZFSVolume, under the running app. The kubelet
/// mounts it through a CSI node plugin registered as `zfs.csi.openebs.io`: zfs-localpv's own
/// cannot run on zfs-fuse (it mounts datasets with `mount -t zfs`, which needs OpenZFS's
/// mount.zfs), so tests/csi-node stands in for its node side. The ZFSVolume is
/// the CRD fixture, as zfs-localpv's controller would have written it, and the machines' node
/// IDs differ from their node names.
fn zfs_localpv_moves(env: &mut Env) -> Result<()> {
    let ns = "mig-zfspv";
    agents(env)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    env.block_on(k8s::create_namespace(&env.client, ns))?;
    let vol = env.block_on(k8s::create_zfs_localpv_volume(
        &env.client,
        a,
        ns,
        "data",
        OPENEBS,
    ))?;
    write_files(a, &vol.path, "zv", 4)?;
    env.block_on(k8s::create_deployment(&env.client, ns, "web", "data"))?;
    env.block_on(k8s::wait_ready_on(&env.client, ns, "app=web", A, 1))?;
    let app = watch_app(env, ns, "app=web", A)?;
    // The PV is provisioner-managed with reclaim policy Delete: re-creating it must never
    // look like a deletion to the provisioner.
    let provisioner = k8s::ReclaimWatch::start(&env.rt, &env.client);
    migrate(env, &Request::new(ns, "web-to-b", B))?;
    let m = wait_phase(env, ns, "web-to-b", Phase::Succeeded)?;
    assert_succeeded(&m)?;
    ensure!(
        provisioner.destroyed().is_empty(),
        "PV(s) {:?} were deleted with reclaim policy Delete: a CSI provisioner would have destroyed their volume",
        provisioner.destroyed()
    );
    env.block_on(k8s::wait_ready_on(&env.client, ns, "app=web", B, 1))?;
    app_moved(&app, &m, (a, &vol.path), (b, &mountpoint(b, &vol.dataset)?))?;
    let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
    let pv = env.block_on(pvs.get(&vol.pv))?;
    ensure!(
        pv_on_node(&pv, &b.zfs_node_id()),
        "PV {} is not pinned to machine-b's zfs-localpv node ID",
        vol.pv
    );
    ensure!(
        ployz::plan::rebind::reclaim_policy(&pv) == "Delete",
        "PV {} did not get its reclaim policy back",
        vol.pv
    );
    let zvs: Api<ployz::openebs::ZFSVolume> = Api::namespaced(env.client.clone(), OPENEBS);
    let zv = env.block_on(zvs.get(&vol.pv))?;
    ensure!(
        zv.spec.owner_node_id == b.zfs_node_id(),
        "ZFSVolume owner is {}",
        zv.spec.owner_node_id
    );
    ensure!(
        a.checksums(&vol.path)? == b.checksums(&mountpoint(b, &vol.dataset)?)?,
        "checksums differ"
    );
    Ok(())
}

/// A failed Migration with `reason`; the workload still runs on machine-a, unlocked.
fn assert_failed_untouched(env: &Env, ns: &str, name: &str, reason: &str) -> Result<()> {
    let m = wait_phase(env, ns, name, Phase::Failed)?;
    let s = m.status.unwrap_or_default();
    ensure!(
        s.reason.as_deref() == Some(reason),
        "reason {:?} ({}), expected {reason}",
        s.reason,
        s.message.unwrap_or_default()
    );
    let message = s.message.unwrap_or_default();
    ensure!(message.len() > 20, "message too thin: {message:?}");
    eprintln!("    {reason}: {message}");
    env.block_on(k8s::wait_ready_on(&env.client, ns, "app=web", A, 1))?;
    // The lock is released right after the phase is written.
    wait_for(
        "the failed migration to release the workload",
        Duration::from_secs(30),
        || Ok(lock_holder(env, ns)? != Some(name.to_string())),
    )
}

fn refusals(env: &mut Env) -> Result<()> {
    let ns = "mig-refuse";
    let (vol, app) = deployment_on_a(env, ns, 1)?;
    let before = env.machine(A)?.checksums(&vol.path)?;
    // With two machines, a wrong `from` names the target (from = to is refused by the API).
    migrate(
        env,
        &Request {
            from: Some(B),
            ..Request::new(ns, "wrong-from", A)
        },
    )?;
    assert_failed_untouched(env, ns, "wrong-from", "SourceMismatch")?;
    migrate(
        env,
        &Request {
            service: "nothing",
            ..Request::new(ns, "no-workload", B)
        },
    )?;
    let m = wait_phase(env, ns, "no-workload", Phase::Failed)?;
    ensure!(
        m.status.and_then(|s| s.reason).as_deref() == Some("WorkloadNotFound"),
        "expected WorkloadNotFound"
    );
    ensure!(
        env.machine(A)?.checksums(&vol.path)? == before,
        "the volume changed"
    );
    app_intact(&app, env.machine(A)?, &vol.path)
}

fn no_room(env: &mut Env) -> Result<()> {
    let ns = "mig-room";
    let (vol, app) = deployment_on_a(env, ns, 48)?;
    let b = env.machine(B)?;
    // Leave machine-b less room than the volume holds. The apps running on machine-b write
    // meanwhile, so the room read may be gone by the time the filler is made: retry with a
    // wider margin, always well below the volume's 48 MiB.
    let mut made = Err(anyhow::anyhow!("not tried"));
    for margin in [16u64, 20, 24, 28] {
        let avail: u64 = b
            .zfs(&["get", "-H", "-p", "-o", "value", "available", "tank"])?
            .trim()
            .parse()?;
        let reserve = avail.saturating_sub(margin << 20);
        made = b
            .zfs(&[
                "create",
                "-o",
                "mountpoint=none",
                "-o",
                &format!("reservation={reserve}"),
                "tank/filler",
            ])
            .map(drop);
        if made.is_ok() {
            break;
        }
    }
    made?;
    let outcome = (|| {
        migrate(env, &Request::new(ns, "web-to-b", B))?;
        assert_failed_untouched(env, ns, "web-to-b", "InsufficientSpace")?;
        let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
        ensure!(pv_on_node(&env.block_on(pvs.get(&vol.pv))?, A));
        ensure!(
            b.zfs(&["list", "-H", "-o", "name", &vol.dataset]).is_err(),
            "a partial dataset was left on machine-b"
        );
        app_intact(&app, env.machine(A)?, &vol.path)
    })();
    b.zfs(&["destroy", "tank/filler"])?;
    outcome
}

fn duplicate_and_cancel(env: &mut Env) -> Result<()> {
    let ns = "mig-cancel";
    let (vol, app) = deployment_on_a(env, ns, 16)?;
    let a = env.machine(A)?;
    let before = a.checksums(&vol.path)?;
    migrate(
        env,
        &Request {
            bandwidth: Some("1Mi"),
            ..Request::new(ns, "slow", B)
        },
    )?;
    wait_sent(env, ns, "slow", 0)?;
    migrate(env, &Request::new(ns, "second", B))?;
    let second = wait_phase(env, ns, "second", Phase::Failed)?;
    let s = second.status.unwrap_or_default();
    ensure!(
        s.reason.as_deref() == Some("DuplicateMigration"),
        "{:?}",
        s.reason
    );
    ensure!(
        s.message.unwrap_or_default().contains("slow"),
        "the refusal does not name the active migration"
    );
    ensure!(lock_holder(env, ns)?.as_deref() == Some("slow"));

    // Deleting the active one mid-send cancels it: the finalizer holds the object until the
    // rollback is done.
    let api: Api<Migration> = Api::namespaced(env.client.clone(), ns);
    env.block_on(api.delete("slow", &DeleteParams::default()))?;
    env.block_on(until("Migration slow gone", DONE, || {
        let api = api.clone();
        async move { Ok(api.get_opt("slow").await?.is_none().then_some(())) }
    }))?;
    env.block_on(k8s::wait_ready_on(&env.client, ns, "app=web", A, 1))?;
    ensure!(lock_holder(env, ns)?.is_none(), "still locked");
    let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
    ensure!(pv_on_node(&env.block_on(pvs.get(&vol.pv))?, A));
    ensure!(a.checksums(&vol.path)? == before, "the source changed");
    a.sh(&format!(
        "touch '{}/still-writable' && rm '{0}/still-writable'",
        vol.path
    ))
    .context("the source copy is not writable after the cancel")?;
    app_intact(&app, a, &vol.path)
}

fn source_agent_killed(env: &mut Env) -> Result<()> {
    agent_killed_mid_send(env, "mig-kill", A)
}

fn target_agent_killed(env: &mut Env) -> Result<()> {
    agent_killed_mid_send(env, "mig-kill-target", B)
}

/// Kills `victim`'s agent (SIGKILL) while the volume is a quarter across, starts it again,
/// and expects the migration to complete with intact data.
fn agent_killed_mid_send(env: &mut Env, ns: &str, victim: &str) -> Result<()> {
    let (vol, app) = slow_move_under_way(env, ns, 8 << 20)?;
    let ag = agents(env)?;
    {
        let mut running = ag.running.lock().unwrap_or_else(|p| p.into_inner());
        let i = running
            .iter()
            .position(|x| x.machine == victim)
            .with_context(|| format!("no agent on {victim}"))?;
        let old = running.remove(i);
        old.kill();
        let m = get(env, ns, "web-to-b")?;
        ensure!(
            phase(&m) == Some(Phase::Sending),
            "killed in {:?}, not mid-send",
            phase(&m)
        );
        running.push(start_agent(env, victim)?);
    }
    let on_b = succeeded_on_b(env, ns, &vol, &app)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    ensure!(
        a.checksums(&vol.path)? == b.checksums(&on_b)?,
        "checksums differ"
    );
    Ok(())
}

/// `ployzctl` against the live cluster, as a user runs it.
fn ployzctl(env: &Env, args: &[&str]) -> Result<std::process::Output> {
    let bin = workspace_binary(&env.root, "ployzctl", "ployzctl")?;
    Ok(std::process::Command::new(bin)
        .args(args)
        .env("KUBECONFIG", env.kubeconfig()?)
        .output()?)
}

fn ployzctl_preview_and_drain(env: &mut Env) -> Result<()> {
    let ns = "mig-cli";
    let (vol, _app) = deployment_on_a(env, ns, 1)?;
    let out = ployzctl(
        env,
        &[
            "--json",
            "migrate",
            "preview",
            &format!("{ns}/web"),
            "--to",
            B,
        ],
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let preview: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        preview["plan"]["source"] == A && preview["plan"]["target"] == B,
        "{preview}"
    );
    ensure!(
        preview["plan"]["volumes"][0]["sourceDataset"] == vol.dataset.as_str(),
        "{preview}"
    );
    // A dry run changes nothing.
    let api: Api<Migration> = Api::namespaced(env.client.clone(), ns);
    ensure!(
        env.block_on(api.list(&ListParams::default()))?
            .items
            .is_empty()
    );

    let ls = ployzctl(env, &["machine", "ls"])?;
    let text = String::from_utf8_lossy(&ls.stdout);
    ensure!(
        ls.status.success() && text.contains(A) && text.contains(B),
        "{text}"
    );

    let drain = ployzctl(env, &["machine", "drain", B])?;
    ensure!(
        drain.status.success(),
        "{}",
        String::from_utf8_lossy(&drain.stderr)
    );
    ensure!(unschedulable(env, B)?, "drain left node {B} schedulable");
    let refused = ployzctl(
        env,
        &["migrate", "preview", &format!("{ns}/web"), "--to", B],
    )?;
    let err = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        refused.status.code() == Some(1) && err.contains("draining") && err.contains("--undo"),
        "preview of a move to a draining machine: {err}"
    );
    // Applied anyway: with -o json the failure still ends in a Result object on stdout.
    let applied = ployzctl(
        env,
        &[
            "-n",
            ns,
            "-o",
            "json",
            "migrate",
            "apply",
            "web",
            "--to",
            B,
            "--name",
            "to-drained",
        ],
    )?;
    let stdout = String::from_utf8_lossy(&applied.stdout);
    let last: serde_json::Value = stdout
        .lines()
        .last()
        .map(serde_json::from_str)
        .transpose()?
        .unwrap_or_default();
    ensure!(
        applied.status.code() == Some(1)
            && last["type"] == "Result"
            && last["succeeded"] == false
            && last["reason"] == "TargetDraining",
        "-o json apply to a draining machine: {:?}\n{stdout}{}",
        applied.status,
        String::from_utf8_lossy(&applied.stderr)
    );
    assert_failed_untouched(env, ns, "to-drained", "TargetDraining")?;
    let undo = ployzctl(env, &["machine", "drain", B, "--undo"])?;
    ensure!(
        undo.status.success(),
        "{}",
        String::from_utf8_lossy(&undo.stderr)
    );
    // The agent's heartbeat keeps its own fields and leaves `draining` to ployzctl.
    let machines: Api<ployz::api::Machine> = Api::all(env.client.clone());
    ensure!(!env.block_on(machines.get(B))?.spec.draining);
    ensure!(!unschedulable(env, B)?, "--undo left node {B} cordoned");

    let unknown = ployzctl(
        env,
        &[
            "migrate",
            "preview",
            &format!("{ns}/web"),
            "--to",
            "machine-z",
        ],
    )?;
    let err = String::from_utf8_lossy(&unknown.stderr);
    ensure!(
        err.contains("machine-z") && err.contains("machine ls"),
        "unknown machine: {err}"
    );
    Ok(())
}

/// `ployzctl` as a user runs it, checked to succeed; its stdout.
fn ployzctl_ok(env: &Env, args: &[&str]) -> Result<String> {
    let out = ployzctl(env, args)?;
    ensure!(
        out.status.success(),
        "ployzctl {}: {:?}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One workload moved A -> B -> A -> B by three `ployzctl migrate apply` calls (a new
/// Migration each time, the namespace from -n or the reference, three output forms); `migrate
/// ls` and `describe` show them; a fourth move is cancelled mid-send with `migrate cancel`
/// and stays listed, Cancelled, with the workload where it was.
fn ployzctl_back_and_forth(env: &mut Env) -> Result<()> {
    let ns = "mig-cli-moves";
    let (vol, app) = deployment_on_a(env, ns, 4)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);

    // 1: -o json, one object per event, the last one the result.
    let json = ployzctl_ok(
        env,
        &["-n", ns, "migrate", "apply", "web", "--to", B, "-o", "json"],
    )?;
    let events: Vec<serde_json::Value> = json
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("not one JSON object per line:\n{json}"))?;
    let phases: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "Phase")
        .filter_map(|e| e["phase"].as_str())
        .collect();
    ensure!(
        phases.contains(&"Sending") && phases.contains(&"CuttingOver"),
        "phases seen: {phases:?}"
    );
    let result = events.last().context("no events")?;
    ensure!(
        result["type"] == "Result" && result["succeeded"] == true && result["phase"] == "Succeeded",
        "{result}"
    );
    let on_b = mountpoint(b, &vol.dataset)?;
    assert_on(env, ns, &vol.pv, "app=web", B)?;

    // 2: back, human output, the namespace in the reference, machine-a given by the address
    // its agent publishes.
    let machines: Api<ployz::api::Machine> = Api::all(env.client.clone());
    let endpoint = env.block_on(machines.get(A))?.spec.endpoint;
    let address = endpoint
        .parse::<std::net::SocketAddr>()
        .with_context(|| format!("endpoint {endpoint}"))?
        .ip()
        .to_string();
    let human = ployzctl_ok(
        env,
        &["migrate", "apply", &format!("{ns}/web"), "--to", &address],
    )?;
    ensure!(human.contains(": Succeeded, downtime "), "{human}");
    assert_on(env, ns, &vol.pv, "app=web", A)?;

    // 3: there again, paced, on a terminal (a pty from script(1)): a progress bar with the
    // rate and the time left, redrawn in place.
    write_files(a, &vol.path, "paced", 8)?;
    let bin = workspace_binary(&env.root, "ployzctl", "ployzctl")?;
    let cmd = format!(
        "{} -n {ns} migrate apply web --to {B} --bandwidth-limit 1Mi",
        bin.display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("KUBECONFIG", env.kubeconfig()?)
        .env("TERM", "xterm")
        .output()?;
    let screen = String::from_utf8_lossy(&tty.stdout).into_owned();
    ensure!(tty.status.success(), "on a terminal: {screen}");
    ensure!(
        screen.contains("] pass 1: ") && screen.contains("/s, ") && screen.contains("s left"),
        "no progress bar with rate and time left:\n{screen}"
    );
    ensure!(screen.contains(": Succeeded, downtime "), "{screen}");
    let third = screen
        .split("migration.ployz.dev/web-to-machine-b-")
        .nth(1)
        .and_then(|rest| rest.get(..5))
        .with_context(|| format!("no generated name in:\n{screen}"))?;
    assert_on(env, ns, &vol.pv, "app=web", B)?;
    app.wait_acked_on(B)?;
    // The acknowledgements first, then the ledger (an ack taken after the read may be of a
    // record written after it).
    let acks = app.acks();
    Ledger::read(b, &on_b)?.check_acks(&acks)?;

    let api: Api<Migration> = Api::namespaced(env.client.clone(), ns);
    let all = env.block_on(api.list(&ListParams::default()))?.items;
    ensure!(all.len() == 3, "{} Migrations", all.len());
    ensure!(all.iter().all(|m| phase(m) == Some(Phase::Succeeded)));
    let ls = ployzctl_ok(env, &["migrate", "ls", "-n", ns])?;
    let rows: Vec<&str> = ls.lines().collect();
    ensure!(
        rows.len() == 4 && rows[0].starts_with("NAME") && rows[0].contains("DOWNTIME"),
        "{ls}"
    );
    let targets: Vec<&str> = rows[1..]
        .iter()
        .map(|r| r.split_whitespace().nth(3).unwrap_or_default())
        .collect();
    ensure!(targets == [B, A, B], "oldest first: {ls}");
    let every = ployzctl_ok(env, &["migrate", "ls", "-A"])?;
    ensure!(
        every.starts_with("NAMESPACE") && every.lines().filter(|l| l.starts_with(ns)).count() == 3,
        "{every}"
    );
    let third_name = format!("web-to-machine-b-{third}");
    let described = ployzctl_ok(env, &["migrate", "describe", &format!("{ns}/{third_name}")])?;
    for want in [
        "Phase:       Succeeded",
        &format!("From:        {A}"),
        "Volumes:",
        "Events:\n",
        "Succeeded",
        &format!("ployzctl migrate apply {ns}/web --to {A}"),
    ] {
        ensure!(described.contains(want), "{want:?} missing:\n{described}");
    }

    // 4: a slow move back, cancelled mid-send: the workload stays on B, the Migration stays.
    write_files(b, &on_b, "cancel", 12)?;
    let fourth = ployzctl_ok(
        env,
        &[
            "-n",
            ns,
            "migrate",
            "apply",
            "web",
            "--to",
            A,
            "--bandwidth-limit",
            "1Mi",
            "--no-wait",
            "-o",
            "name",
        ],
    )?;
    let fourth = fourth
        .trim()
        .strip_prefix("migration.ployz.dev/")
        .with_context(|| format!("-o name printed {fourth:?}"))?
        .to_string();
    wait_sent(env, ns, &fourth, 1 << 20)?;
    // Status carries the rate (and the summary kubectl prints shows it), near the 1 MiB/s limit.
    let m = wait_migration(env, ns, &fourth, "a transfer rate", DONE, |m| {
        m.status
            .as_ref()
            .and_then(|s| s.progress.as_ref()?.bytes_per_second)
            .is_some()
    })?;
    let p = m.status.and_then(|s| s.progress).unwrap_or_default();
    let rate = p.bytes_per_second.unwrap_or_default();
    ensure!(
        (256 << 10..4 << 20).contains(&rate)
            && p.summary.as_deref().is_some_and(|x| x.contains("/s")),
        "rate {rate} B/s, summary {:?}",
        p.summary
    );
    let cancel = ployzctl_ok(env, &["-n", ns, "migrate", "cancel", &fourth])?;
    ensure!(cancel.contains(": Cancelled"), "{cancel}");
    let m = get(env, ns, &fourth)?;
    ensure!(
        m.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("Cancelled"),
        "{:?}",
        m.status
    );
    assert_on(env, ns, &vol.pv, "app=web", B)?;
    let before = app.acks();
    wait_for(
        "the app to write on machine-b after the cancel",
        DONE,
        || {
            Ok(app.acks().by_writer.iter().any(|(w, &seq)| {
                ledger::node_of(w) == Some(B) && before.by_writer.get(w).is_none_or(|&s| seq > s)
            }))
        },
    )?;
    // The acknowledgements first, then the ledger (an ack taken after the read may be of a
    // record written after it).
    let acks = app.acks();
    Ledger::read(b, &on_b)?.check_acks(&acks)?;
    let again = ployzctl(env, &["-n", ns, "migrate", "cancel", &fourth])?;
    let err = String::from_utf8_lossy(&again.stderr);
    ensure!(
        again.status.code() == Some(1) && err.contains("already ended Cancelled"),
        "cancel after the end: {err}"
    );
    Ok(())
}

fn unschedulable(env: &Env, node: &str) -> Result<bool> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
    let n = env.block_on(nodes.get(node))?;
    Ok(n.spec.and_then(|s| s.unschedulable).unwrap_or(false))
}

/// `ployzctl machine drain machine-a --to machine-b` finds the two workloads with a ZFS
/// volume on machine-a (none of them moved there by ployz) and moves each with its own
/// Migration; the one without a volume is not touched; the node stays cordoned, the Machine
/// draining, until `--undo`.
fn drain_moves_everything(env: &mut Env) -> Result<()> {
    let ns = "mig-drain";
    let (vol, app) = deployment_on_a(env, ns, 2)?;
    let a = env.machine(A)?;
    let db = env.block_on(k8s::create_local_volume(&env.client, a, ns, "db-data"))?;
    env.block_on(k8s::create_deployment_with(
        &env.client,
        ns,
        "db",
        "db-data",
        &k8s::AppOptions::default(),
    ))?;
    env.block_on(k8s::wait_ready_on(&env.client, ns, "app=db", A, 1))?;

    // A target that cannot be used is refused before anything changes.
    for (to, code) in [("machine-z", 1), (A, 2)] {
        let refused = ployzctl(env, &["machine", "drain", A, "--to", to])?;
        ensure!(
            refused.status.code() == Some(code) && !unschedulable(env, A)?,
            "drain --to {to}: {:?} {}",
            refused.status,
            String::from_utf8_lossy(&refused.stderr)
        );
    }

    // Without a target: the list, and nothing moves.
    let listed = ployzctl_ok(env, &["machine", "drain", A])?;
    for want in [
        &format!("{ns}/web"),
        &format!("{ns}/db"),
        "Found",
        "cordoned",
    ] {
        ensure!(listed.contains(want), "{want:?} missing:\n{listed}");
    }
    ensure!(unschedulable(env, A)?, "node {A} not cordoned");
    let api: Api<Migration> = Api::namespaced(env.client.clone(), ns);
    ensure!(
        env.block_on(api.list(&ListParams::default()))?
            .items
            .is_empty()
    );

    let out = ployzctl_ok(env, &["-o", "json", "machine", "drain", A, "--to", B])?;
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let results: Vec<(String, String)> = report["workloads"]
        .as_array()
        .context("no workloads")?
        .iter()
        .map(|w| (w["workload"].to_string(), w["result"].to_string()))
        .collect();
    ensure!(results.len() == 2, "{report}");
    ensure!(results.iter().all(|(_, r)| r == "\"Moved\""), "{report}");
    assert_on(env, ns, &vol.pv, "app=web", B)?;
    assert_on(env, ns, &db.pv, "app=db", B)?;
    app.wait_acked_on(B)?;
    let b = env.machine(B)?;
    let acks = app.acks();
    Ledger::read(b, &mountpoint(b, &vol.dataset)?)?.check_acks(&acks)?;
    let migrations = env.block_on(api.list(&ListParams::default()))?.items;
    ensure!(
        migrations.len() == 2
            && migrations
                .iter()
                .all(|m| phase(m) == Some(Phase::Succeeded)),
        "one Succeeded Migration per workload: {:?}",
        migrations
            .iter()
            .map(|m| (m.name_any(), phase(m)))
            .collect::<Vec<_>>()
    );
    ensure!(unschedulable(env, A)?, "node {A} uncordoned by the moves");
    let machines: Api<ployz::api::Machine> = Api::all(env.client.clone());
    ensure!(env.block_on(machines.get(A))?.spec.draining);

    // Empty now: a second drain finds nothing.
    let again = ployzctl_ok(env, &["machine", "drain", A, "--evacuate"])?;
    ensure!(
        again.contains("no workload has a ZFS volume on it"),
        "{again}"
    );
    ployzctl_ok(env, &["machine", "drain", A, "--undo"])?;
    ensure!(
        !unschedulable(env, A)?,
        "node {A} still cordoned after --undo"
    );
    ensure!(!env.block_on(machines.get(A))?.spec.draining);
    Ok(())
}

fn taint(env: &Env, node: &str, on: bool) -> Result<()> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
    let taints = if on {
        serde_json::json!([{"key": "ployz.dev/test", "effect": "NoSchedule"}])
    } else {
        serde_json::Value::Null
    };
    env.block_on(nodes.patch(
        node,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"taints": taints}})),
    ))?;
    Ok(())
}

/// The cutover gets as far as starting the workload on the target, where it cannot run: the
/// migration undoes the rebind and the workload runs on the source again, data intact.
fn not_ready_rolls_back(env: &mut Env) -> Result<()> {
    let ns = "mig-rollback";
    let (vol, app) = deployment_on_a(env, ns, 4)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    let before = a.checksums(&vol.path)?;
    taint(env, B, true)?;
    let outcome = (|| {
        migrate(
            env,
            &Request {
                target_ready_seconds: Some(10),
                ..Request::new(ns, "web-to-b", B)
            },
        )?;
        assert_failed_untouched(env, ns, "web-to-b", "TargetNotReady")?;
        let m = get(env, ns, "web-to-b")?;
        let s = m.status.unwrap_or_default();
        let phases: Vec<Phase> = s.phase_transitions.iter().map(|t| t.phase).collect();
        ensure!(
            phases.ends_with(&[Phase::CuttingOver, Phase::RollingBack, Phase::Failed]),
            "{phases:?}"
        );
        ensure!(
            s.cutover
                .is_some_and(|c| c.step == ployz::api::CutoverStep::ScaledUp),
            "the cutover did not get as far as the target"
        );
        assert_on(env, ns, &vol.pv, "app=web", A)?;
        ensure!(a.checksums(&vol.path)? == before, "the source data changed");
        a.sh(&format!(
            "touch '{}/writable' && rm '{0}/writable'",
            vol.path
        ))
        .context("the source volume is not writable after the rollback")?;
        // The target keeps its copy as a read-only replica, ready for the next attempt.
        ensure!(prop(b, &vol.dataset, "ployz:replica")? == "true");
        app_intact(&app, a, &vol.path)
    })();
    taint(env, B, false)?;
    outcome
}

/// Replaces `machine`'s agent by one started with `vars` (FAILPOINTS), or a plain one.
fn restart_agent(env: &Env, machine: &str, vars: &[(&str, &str)]) -> Result<()> {
    let ag = agents(env)?;
    let mut running = ag.running.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = running.iter().position(|x| x.machine == machine) {
        running.remove(i).kill();
    }
    running.push(Agent::start_with(env, machine, &AGENT_ARGS, vars)?);
    Ok(())
}

/// Stops `machine`'s agent for good (until [`restart_agent`]).
fn stop_agent(env: &Env, machine: &str) -> Result<()> {
    let ag = agents(env)?;
    let mut running = ag.running.lock().unwrap_or_else(|p| p.into_inner());
    let i = running
        .iter()
        .position(|x| x.machine == machine)
        .with_context(|| format!("no agent on {machine}"))?;
    running.remove(i).kill();
    Ok(())
}

/// Waits until `machine`'s agent process has exited by itself (a crash point).
fn wait_agent_exit(env: &Env, machine: &str) -> Result<()> {
    let ag = agents(env)?;
    wait_for(
        &format!("the agent on {machine} to crash"),
        Duration::from_secs(120),
        || {
            let mut running = ag.running.lock().unwrap_or_else(|p| p.into_inner());
            let agent = running
                .iter_mut()
                .find(|x| x.machine == machine)
                .context("no agent")?;
            Ok(agent.check_running().is_err())
        },
    )
}

/// A Deployment whose pods run and write on machine-b but never turn Ready there: the
/// rollback stops them (scale to 0, wait until gone) before it rebinds the volume to the
/// source and starts the workload there, so two copies never run at once. What the pod
/// wrote on machine-b is kept there, read-only, under a name no Migration plans
/// (`DATASET-kept-TIMESTAMP`, a TargetWritesKept Event says where): as a replica, the next
/// move to machine-b would have rolled it back.
fn rollback_stops_target_first(env: &mut Env) -> Result<()> {
    let ns = "mig-stop-first";
    let opts = k8s::AppOptions {
        never_ready_on: Some(B),
        ..Default::default()
    };
    let (vol, app) = deployment_on_a_with(env, ns, 4, &opts)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    migrate(
        env,
        &Request {
            target_ready_seconds: Some(30),
            ..Request::new(ns, "web-to-b", B)
        },
    )?;
    // The fault: the app runs and writes on machine-b, never Ready there.
    app.wait_acked_on(B)?;
    assert_failed_untouched(env, ns, "web-to-b", "TargetNotReady")?;
    let s = get(env, ns, "web-to-b")?.status.unwrap_or_default();
    ensure!(
        s.cutover
            .as_ref()
            .is_some_and(|c| c.step == ployz::api::CutoverStep::ScaledUp),
        "the workload was never started on the target"
    );
    ensure!(
        s.rollback == Some(ployz::api::RollbackStep::Restarted),
        "rollback ended at {:?}",
        s.rollback
    );
    assert_on(env, ns, &vol.pv, "app=web", A)?;
    // The pod on machine-b ran and wrote; the pod that started on machine-a again wrote its
    // first record only after machine-b's pod had written its last.
    let prefix = format!("{}-kept-", vol.dataset);
    let listed = b.zfs(&["list", "-H", "-o", "name"])?;
    let kept: Vec<&str> = listed.lines().filter(|l| l.starts_with(&prefix)).collect();
    let [kept] = kept[..] else {
        bail!("machine-b kept no copy (or several) of what the pod wrote there: {listed}");
    };
    ensure!(
        !listed.lines().any(|l| l == vol.dataset),
        "{} is still there besides {kept}",
        vol.dataset
    );
    let on_b = mountpoint(b, kept)?;
    let there = Ledger::read(b, &on_b)?;
    let on_target: Vec<_> = there
        .records
        .iter()
        .filter(|r| ledger::node_of(&r.writer) == Some(B))
        .collect();
    let (Some(first_b), Some(last_b)) = (on_target.first(), on_target.last()) else {
        bail!("the app never ran on machine-b; the fault was not injected");
    };
    app_intact_on_a(&app, a, &vol.path)?;
    let here = Ledger::read(a, &vol.path)?;
    let overlap: Vec<_> = here
        .records
        .iter()
        .filter(|r| r.time_ns > first_b.time_ns && r.time_ns <= last_b.time_ns)
        .collect();
    ensure!(
        overlap.is_empty(),
        "{} record(s) written on machine-a while the pod on machine-b still ran, e.g. {:?}",
        overlap.len(),
        overlap.first()
    );
    eprintln!(
        "    the pod on machine-b wrote {} record(s), stopped; machine-a resumed after it",
        on_target.len()
    );
    ensure!(prop(b, kept, "ployz:replica")? == "false");
    ensure!(
        b.sh(&format!("touch '{on_b}/x'")).is_err(),
        "machine-b's kept copy is still writable"
    );
    let events: Api<Event> = Api::namespaced(env.client.clone(), ns);
    let notes: Vec<String> = env
        .block_on(events.list(&ListParams::default()))?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("TargetWritesKept"))
        .filter_map(|e| e.note)
        .collect();
    ensure!(
        notes.iter().any(|n| n.contains(kept)),
        "no TargetWritesKept event naming {kept}: {notes:?}"
    );
    Ok(())
}

/// Like [`app_intact`], for a test where pods on machine-b also acknowledged writes: only
/// machine-a's acknowledgements must be in machine-a's ledger.
fn app_intact_on_a(app: &AckWatch, a: &ZfsMachine, path: &str) -> Result<()> {
    resumed_on_a(app)?;
    // The acknowledgements before the ledger, as in `app_intact`.
    let mut on_a = app.acks();
    on_a.by_writer.retain(|w, _| ledger::node_of(w) == Some(A));
    Ledger::read(a, path)?.check_acks(&on_a)
}

/// The source's agent crashes after it recorded the pod template's original pinning and
/// before it pointed the template at the target. Restarted, it applies the pinning it
/// recorded and completes the move (before the fix it never re-applied it: a rollback).
fn crash_before_pin(env: &mut Env) -> Result<()> {
    let ns = "mig-crash-pin";
    let opts = k8s::AppOptions {
        pinned_to: Some(A),
        ..Default::default()
    };
    let (vol, app) = deployment_on_a_with(env, ns, 4, &opts)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    restart_agent(env, A, &[("FAILPOINTS", "before-pin-to-target=return")])?;
    let outcome = (|| {
        migrate(env, &Request::new(ns, "web-to-b", B))?;
        wait_agent_exit(env, A)?;
        let s = get(env, ns, "web-to-b")?.status.unwrap_or_default();
        let c = s.cutover.context("crashed before the cutover")?;
        ensure!(
            c.step == ployz::api::CutoverStep::Rebound && c.original_placement.is_some(),
            "crashed at {:?} (pinning recorded: {})",
            c.step,
            c.original_placement.is_some()
        );
        ensure!(
            selector_node(env, ns)? == A,
            "the template was pinned before the crash"
        );
        restart_agent(env, A, &[])?;
        let m = wait_phase(env, ns, "web-to-b", Phase::Succeeded)?;
        assert_succeeded(&m)?;
        ensure!(
            selector_node(env, ns)? == B,
            "the template is not pinned to machine-b"
        );
        assert_on(env, ns, &vol.pv, "app=web", B)?;
        let on_b = mountpoint(b, &vol.dataset)?;
        app_moved(&app, &m, (a, &vol.path), (b, &on_b))?;
        Ok(())
    })();
    if outcome.is_err() {
        restart_agent(env, A, &[])?;
    }
    outcome
}

fn selector_node(env: &Env, ns: &str) -> Result<String> {
    let api: Api<Deployment> = Api::namespaced(env.client.clone(), ns);
    let d = env.block_on(api.get("web"))?;
    d.spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.node_selector)
        .and_then(|s| s.get("kubernetes.io/hostname").cloned())
        .context("no hostname nodeSelector")
}

/// The target's agent disappears while the workload is down for the final delta: the source
/// notices within seconds, not when `cutoverSeconds` (600 s) runs out, and the workload runs
/// on the source again with nothing lost.
fn target_gone_in_cutover(env: &mut Env) -> Result<()> {
    let ns = "mig-target-gone";
    let (vol, app) = deployment_on_a(env, ns, 4)?;
    let a = env.machine(A)?;
    // The source pauses once, with the workload stopped, right before the final pass.
    restart_agent(env, A, &[("FAILPOINTS", "before-final-pass=1*sleep(5000)")])?;
    let outcome = (|| {
        migrate(env, &Request::new(ns, "web-to-b", B))?;
        wait_migration(
            env,
            ns,
            "web-to-b",
            "stopped for the final delta",
            DONE,
            |m| {
                m.status
                    .as_ref()
                    .and_then(|s| s.cutover.as_ref())
                    .is_some_and(|c| c.step == ployz::api::CutoverStep::ScaledDown)
            },
        )?;
        stop_agent(env, B)?;
        assert_failed_untouched(env, ns, "web-to-b", "TargetUnreachable")?;
        let s = get(env, ns, "web-to-b")?.status.unwrap_or_default();
        let at = |p: Phase| {
            s.phase_transitions
                .iter()
                .find(|t| t.phase == p)
                .map(|t| t.time.0)
                .context("phase missing")
        };
        let noticed = at(Phase::RollingBack)?.duration_since(at(Phase::CuttingOver)?);
        eprintln!("    noticed after {:.1}s of cutover", noticed.as_secs_f64());
        ensure!(
            noticed.as_secs() < 30,
            "the unreachable target was noticed only after {noticed:?}"
        );
        assert_on(env, ns, &vol.pv, "app=web", A)?;
        app_intact(&app, a, &vol.path)
    })();
    restart_agent(env, B, &[])?;
    restart_agent(env, A, &[])?;
    outcome
}

/// The source's agent dies mid-send, for good: after `--takeover-seconds` without its
/// heartbeat, the target's agent takes the Migration over. The target has no complete copy,
/// so the workload stays where its data is: Failed, SourceUnreachable, the workload untouched
/// on machine-a, lock and finalizer released by the target's agent.
fn source_gone_mid_send(env: &mut Env) -> Result<()> {
    let ns = "mig-source-gone";
    let (vol, app) = slow_move_under_way(env, ns, 8 << 20)?;
    let a = env.machine(A)?;
    stop_agent(env, A)?;
    let outcome = (|| {
        assert_failed_untouched(env, ns, "web-to-b", "SourceUnreachable")?;
        let s = get(env, ns, "web-to-b")?.status.unwrap_or_default();
        ensure!(
            s.taken_over_by.as_deref() == Some(B),
            "taken over by {:?}",
            s.taken_over_by
        );
        assert_on(env, ns, &vol.pv, "app=web", A)?;
        app_intact(&app, a, &vol.path)?;
        // The operator never edits an object: deleting the finished Migration just works.
        let api: Api<Migration> = Api::namespaced(env.client.clone(), ns);
        env.block_on(api.delete("web-to-b", &DeleteParams::default()))?;
        env.block_on(until("Migration web-to-b gone", DONE, || {
            let api = api.clone();
            async move { Ok(api.get_opt("web-to-b").await?.is_none().then_some(())) }
        }))
    })();
    restart_agent(env, A, &[])?;
    outcome
}

/// The source's agent dies for good right after the target promoted its copy (a crash
/// point): the target's agent takes over and completes the move on the target, where the
/// newest complete copy is; the source's copy stays as it was, and the message says so.
fn source_gone_after_promotion(env: &mut Env) -> Result<()> {
    let ns = "mig-source-gone-late";
    let (vol, app) = deployment_on_a(env, ns, 4)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    restart_agent(env, A, &[("FAILPOINTS", "before-rebind-to-target=return")])?;
    let outcome = (|| {
        migrate(env, &Request::new(ns, "web-to-b", B))?;
        wait_agent_exit(env, A)?;
        let m = wait_phase(env, ns, "web-to-b", Phase::Succeeded)?;
        assert_succeeded(&m)?;
        let s = m.status.clone().unwrap_or_default();
        ensure!(
            s.taken_over_by.as_deref() == Some(B),
            "taken over by {:?}",
            s.taken_over_by
        );
        let message = s.message.unwrap_or_default();
        ensure!(message.contains("unreachable"), "{message}");
        eprintln!("    {message}");
        assert_on(env, ns, &vol.pv, "app=web", B)?;
        let on_b = mountpoint(b, &vol.dataset)?;
        app_moved(&app, &m, (a, &vol.path), (b, &on_b))?;
        // Back, machine-a's agent retires its copy as the move would have; its first attempt
        // fails (a dataset busy, by a crash point) and is retried, not dropped.
        restart_agent(env, A, &[("FAILPOINTS", "before-retire-source=1*return")])?;
        // Marked first, remounted read-only after: wait for both, not only the first.
        wait_for(
            "machine-a's copy to become a read-only replica",
            Duration::from_secs(30),
            || {
                Ok(prop(a, &vol.dataset, "ployz:replica")? == "true"
                    && a.sh(&format!("touch '{}/x'", vol.path)).is_err())
            },
        )?;
        Ok(())
    })();
    if outcome.is_err() {
        restart_agent(env, A, &[])?;
    }
    outcome
}

/// The source machine is switched off mid-send, as at a power cut: its kubelet, containers,
/// containerd and agent die at once and its cable is pulled; only its pool, the disk, stays.
/// Its node goes NotReady; machine-b's agent takes the Migration over and ends it
/// `SourceUnreachable` with the volume still bound to machine-a, where the only complete copy
/// is. Switched on again, machine-a runs the workload with every write it acknowledged, and a
/// new move then succeeds. Nobody edits an object by hand.
fn source_switched_off(env: &mut Env) -> Result<()> {
    let ns = "mig-power-off";
    let (vol, app) = slow_move_under_way(env, ns, 8 << 20)?;
    stop_agent(env, A)?;
    env.power_off(A)?;
    let off = (|| {
        let m = wait_phase(env, ns, "web-to-b", Phase::Failed)?;
        let s = m.status.unwrap_or_default();
        let message = s.message.clone().unwrap_or_default();
        ensure!(
            s.reason.as_deref() == Some("SourceUnreachable")
                && s.taken_over_by.as_deref() == Some(B)
                && message.contains("once it is back"),
            "reason {:?}, taken over by {:?}: {}",
            s.reason,
            s.taken_over_by,
            s.message.unwrap_or_default()
        );
        eprintln!("    SourceUnreachable: {}", s.message.unwrap_or_default());
        wait_for(
            "the failed migration to release the workload",
            Duration::from_secs(30),
            || Ok(lock_holder(env, ns)?.is_none()),
        )?;
        let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
        ensure!(
            pv_on_node(&env.block_on(pvs.get(&vol.pv))?, A),
            "the volume left machine-a while it was off"
        );
        // Off from the cluster's point of view too, not only for ployz.
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
        wait_for(
            "machine-a's node NotReady",
            Duration::from_secs(120),
            || Ok(!ployz_e2e::env::node_ready(&env.block_on(nodes.get(A))?)),
        )
    })();
    env.power_on(A)?;
    restart_agent(env, A, &[])?;
    off?;
    let a = env.machine(A)?;
    app_intact(&app, a, &vol.path)?;
    assert_on(env, ns, &vol.pv, "app=web", A)?;
    // The next move, asked for the usual way, succeeds.
    migrate(env, &Request::new(ns, "web-to-b-again", B))?;
    let m = wait_phase(env, ns, "web-to-b-again", Phase::Succeeded)?;
    assert_succeeded(&m)?;
    assert_on(env, ns, &vol.pv, "app=web", B)?;
    let b = env.machine(B)?;
    let on_b = mountpoint(b, &vol.dataset)?;
    app_moved(&app, &m, (a, &vol.path), (b, &on_b))?;
    Ok(())
}

/// `ployzctl migrate complete` refuses while the target has nothing complete; `ployzctl
/// migrate abandon` ends a Migration mid-send with the workload on the source (exit 0), and
/// refuses a Migration that already ended.
fn abandon_and_complete(env: &mut Env) -> Result<()> {
    let ns = "mig-abandon";
    let (vol, app) = slow_move_under_way(env, ns, 4 << 20)?;
    let a = env.machine(A)?;
    let target = format!("{ns}/web-to-b");
    let complete = ployzctl(env, &["migrate", "complete", &target])?;
    let err = String::from_utf8_lossy(&complete.stderr);
    ensure!(
        complete.status.code() == Some(1) && err.contains("final delta") && err.contains("abandon"),
        "complete mid-send: {:?} {err}",
        complete.status
    );
    let abandon = ployzctl(env, &["migrate", "abandon", &target])?;
    ensure!(
        abandon.status.success(),
        "abandon: {:?} {}",
        abandon.status,
        String::from_utf8_lossy(&abandon.stderr)
    );
    assert_failed_untouched(env, ns, "web-to-b", "Abandoned")?;
    assert_on(env, ns, &vol.pv, "app=web", A)?;
    app_intact(&app, a, &vol.path)?;
    let again = ployzctl(env, &["migrate", "abandon", &target, "--json"])?;
    let err = String::from_utf8_lossy(&again.stderr);
    ensure!(
        again.status.code() == Some(1) && err.contains("already ended"),
        "abandon after the end: {:?} {err}",
        again.status
    );
    Ok(())
}

/// The API server is killed and started again while a volume is a quarter across: the
/// agents' watches reconnect, their reconciles read the Migration live (never a stale cache),
/// and the move completes without a rollback and without losing a write.
fn apiserver_restart_mid_send(env: &mut Env) -> Result<()> {
    let ns = "mig-apiserver";
    let (vol, app) = slow_move_under_way(env, ns, 8 << 20)?;
    env.restart_apiserver()?;
    eprintln!("    kube-apiserver restarted mid-send");
    let m = wait_phase(env, ns, "web-to-b", Phase::Succeeded)?;
    assert_succeeded(&m)?;
    let s = m.status.clone().unwrap_or_default();
    ensure!(
        !s.phase_transitions
            .iter()
            .any(|t| t.phase == Phase::RollingBack),
        "the restart caused a rollback: {:?}",
        s.phase_transitions
    );
    assert_on(env, ns, &vol.pv, "app=web", B)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    let on_b = mountpoint(b, &vol.dataset)?;
    app_moved(&app, &m, (a, &vol.path), (b, &on_b))?;
    Ok(())
}

/// `sourceCopy: Delete` destroys the source's dataset (checked gone) once the workload runs
/// on the target. A dataset with a child dataset is not destroyed: the move still succeeds,
/// and the message says what is left to do.
fn source_copy_delete(env: &mut Env) -> Result<()> {
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    for (ns, child) in [("mig-delete", false), ("mig-delete-child", true)] {
        let (vol, app) = deployment_on_a(env, ns, 4)?;
        if child {
            a.zfs(&["create", &format!("{}/not-ployz", vol.dataset)])?;
        }
        migrate(
            env,
            &Request {
                source_copy: Some(ployz::api::SourceCopy::Delete),
                ..Request::new(ns, "web-to-b", B)
            },
        )?;
        let m = wait_phase(env, ns, "web-to-b", Phase::Succeeded)?;
        assert_succeeded(&m)?;
        assert_on(env, ns, &vol.pv, "app=web", B)?;
        app.wait_acked_on(B)?;
        let acks = app.acks();
        Ledger::read(b, &mountpoint(b, &vol.dataset)?)?.check_acks(&acks)?;
        let message = m.status.and_then(|s| s.message).unwrap_or_default();
        eprintln!("    {message}");
        let left = a.zfs(&["list", "-H", "-o", "name", &vol.dataset]).is_ok();
        if child {
            ensure!(left, "a dataset with a child dataset was destroyed");
            ensure!(
                message.contains("could not be deleted") && message.contains("child"),
                "{message}"
            );
        } else {
            ensure!(!left, "the source dataset is still there");
            ensure!(message.contains("is deleted"), "{message}");
        }
    }
    Ok(())
}

/// A tenant's claim that names another namespace's PV (`spec.volumeName`), a Deployment
/// without replicas that mounts it, and a Migration: refused as ForeignVolume before anything
/// is touched; the victim's PV, data and app are as they were.
fn cross_namespace_volume(env: &mut Env) -> Result<()> {
    let victim = "mig-victim";
    let (vol, app) = deployment_on_a(env, victim, 1)?;
    let before = env.machine(A)?.checksums(&vol.path)?;
    let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
    let pv_before = env.block_on(pvs.get(&vol.pv))?;

    let tenant = "mig-tenant";
    env.block_on(k8s::create_namespace(&env.client, tenant))?;
    env.block_on(k8s::create_claim_naming(
        &env.client,
        tenant,
        "stolen",
        &vol.pv,
    ))?;
    env.block_on(k8s::create_deployment_with(
        &env.client,
        tenant,
        "web",
        "stolen",
        &k8s::AppOptions {
            replicas: Some(0),
            ..Default::default()
        },
    ))?;
    migrate(env, &Request::new(tenant, "steal", B))?;
    let m = wait_phase(env, tenant, "steal", Phase::Failed)?;
    let s = m.status.unwrap_or_default();
    let message = s.message.unwrap_or_default();
    ensure!(
        s.reason.as_deref() == Some("ForeignVolume")
            && message.contains(&format!("bound to claim {victim}/data")),
        "reason {:?}: {message}",
        s.reason
    );
    eprintln!("    ForeignVolume: {message}");
    ensure!(s.plan.is_none(), "a plan was recorded: {:?}", s.plan);

    let pv_after = env.block_on(pvs.get(&vol.pv))?;
    ensure!(
        pv_after.spec == pv_before.spec && pv_on_node(&pv_after, A),
        "the victim's PV changed"
    );
    let b = env.machine(B)?;
    ensure!(
        b.zfs(&["list", "-H", "-o", "name", &vol.dataset]).is_err(),
        "the victim's dataset reached machine-b"
    );
    ensure!(
        env.machine(A)?.checksums(&vol.path)? == before,
        "the victim's volume changed"
    );
    app_intact(&app, env.machine(A)?, &vol.path)
}

/// As cluster-admin (past any admission policy), the plan in status is rewritten mid-send to
/// send another dataset of machine-a instead of the volume. The agent checks the plan against
/// the live objects before it snapshots or sends again, and refuses: the other dataset gets
/// no snapshot and never reaches machine-b, and the workload stays on machine-a, intact.
fn forged_plan(env: &mut Env) -> Result<()> {
    let ns = "mig-forged";
    agents(env)?;
    let a = env.machine(A)?;
    let secret = "tank/ployz/not-in-any-plan";
    let secret_mp = a.create_dataset(secret)?;
    write_files(a, &secret_mp, "secret", 1)?;
    let (vol, app) = slow_move_under_way(env, ns, 4 << 20)?;
    let m = get(env, ns, "web-to-b")?;
    let mut plan = m
        .status
        .and_then(|s| s.plan)
        .context("no plan while sending")?;
    for v in &mut plan.volumes {
        v.source_dataset = secret.into();
    }
    let api: Api<Migration> = Api::namespaced(env.client.clone(), ns);
    env.block_on(api.patch_status(
        "web-to-b",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"plan": plan}})),
    ))?;
    eprintln!("    plan rewritten to send {secret}");
    let m = wait_phase(env, ns, "web-to-b", Phase::Failed)?;
    let s = m.status.unwrap_or_default();
    let message = s.message.unwrap_or_default();
    ensure!(
        s.reason.as_deref() == Some("PlanMismatch"),
        "reason {:?}: {message}",
        s.reason
    );
    eprintln!("    PlanMismatch: {message}");
    let a = env.machine(A)?;
    let snapshots = a.zfs(&["list", "-H", "-t", "snapshot", "-o", "name", "-r", secret])?;
    ensure!(
        snapshots.trim().is_empty(),
        "{secret} was snapshotted: {snapshots}"
    );
    ensure!(
        env.machine(B)?
            .zfs(&["list", "-H", "-o", "name", "tank/ployz/not-in-any-plan"])
            .is_err(),
        "{secret} reached machine-b"
    );
    env.block_on(k8s::wait_ready_on(&env.client, ns, "app=web", A, 1))?;
    wait_unlocked(env, ns)?;
    app_intact(&app, env.machine(A)?, &vol.path)
}

/// As cluster-admin (past any admission policy), while machine-b's agent is about to drive a
/// Migration it takes over (machine-a's agent died right after the target promoted its copy),
/// the binding recorded in status is rewritten to name the claim of another workload of the
/// namespace, with that claim's own PV as the recorded spec. machine-b's agent refuses to
/// rebind it (the workload being moved does not mount that claim): the other workload's PV is
/// untouched and it keeps running on machine-a. With the true binding written back, the move
/// completes on machine-b.
fn forged_binding_after_takeover(env: &mut Env) -> Result<()> {
    let ns = "mig-forged-binding";
    let (vol, app) = deployment_on_a(env, ns, 2)?;
    let a = env.machine(A)?;
    let other = env.block_on(k8s::create_local_volume(&env.client, a, ns, "other"))?;
    env.block_on(k8s::create_deployment(&env.client, ns, "other", "other"))?;
    env.block_on(k8s::wait_ready_on(&env.client, ns, "app=other", A, 1))?;
    let other_app = watch_app(env, ns, "app=other", A)?;
    let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
    let other_pv = env.block_on(pvs.get(&other.pv))?;

    restart_agent(env, A, &[("FAILPOINTS", "before-rebind-to-target=return")])?;
    let outcome = (|| {
        migrate(env, &Request::new(ns, "web-to-b", B))?;
        wait_agent_exit(env, A)?;
        // machine-b takes over only after 20 s of silence: forge before it does.
        let m = get(env, ns, "web-to-b")?;
        let cutover = m
            .status
            .and_then(|s| s.cutover)
            .context("no cutover recorded")?;
        let mut forged = cutover.clone();
        for b in &mut forged.volumes {
            b.claim = "other".into();
            b.volume = other.pv.clone();
            b.original_spec = serde_json::to_string(&other_pv)?;
        }
        let api: Api<Migration> = Api::namespaced(env.client.clone(), ns);
        let write = |c: &ployz::api::Cutover| {
            env.block_on(api.patch_status(
                "web-to-b",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"cutover": c}})),
            ))
        };
        write(&forged)?;
        eprintln!("    binding rewritten to claim other ({})", other.pv);
        // Refused, and said so, on every attempt.
        let events: Api<Event> = Api::namespaced(env.client.clone(), ns);
        let refusal = env.block_on(until(
            "machine-b's agent to refuse the forged binding",
            DONE,
            || {
                let events = events.clone();
                async move {
                    Ok(events
                        .list(&ListParams::default())
                        .await?
                        .items
                        .into_iter()
                        .filter_map(|e| e.note)
                        .find(|n| n.contains("does not mount it")))
                }
            },
        ))?;
        eprintln!("    {refusal}");
        let after = env.block_on(pvs.get(&other.pv))?;
        ensure!(
            after.spec == other_pv.spec && pv_on_node(&after, A),
            "the other workload's PV changed"
        );
        let s = get(env, ns, "web-to-b")?.status.unwrap_or_default();
        ensure!(
            s.taken_over_by.as_deref() == Some(B) && s.phase == Some(Phase::CuttingOver),
            "taken over by {:?}, phase {:?}",
            s.taken_over_by,
            s.phase
        );
        // The true binding back: the move goes on.
        let current = get(env, ns, "web-to-b")?
            .status
            .and_then(|s| s.cutover)
            .context("no cutover")?;
        write(&ployz::api::Cutover {
            volumes: cutover.volumes.clone(),
            ..current
        })?;
        let m = wait_phase(env, ns, "web-to-b", Phase::Succeeded)?;
        assert_on(env, ns, &vol.pv, "app=web", B)?;
        let b = env.machine(B)?;
        let on_b = mountpoint(b, &vol.dataset)?;
        app_moved(&app, &m, (a, &vol.path), (b, &on_b))?;
        let pv = env.block_on(pvs.get(&other.pv))?;
        ensure!(pv_on_node(&pv, A), "the other workload's PV left machine-a");
        env.block_on(k8s::wait_ready_on(&env.client, ns, "app=other", A, 1))?;
        let acks = other_app.acks();
        Ledger::read(a, &other.path)?.check_acks(&acks)
    })();
    restart_agent(env, A, &[])?;
    outcome
}

/// `prlimit` on a running process: `--nofile=SOFT:HARD`.
fn set_nofile(pid: u32, soft: &str, hard: &str) -> Result<()> {
    ployz_e2e::process::run(std::process::Command::new("prlimit").args([
        "--pid",
        &pid.to_string(),
        &format!("--nofile={soft}:{hard}"),
    ]))
    .map(drop)
}

/// machine-b's agent runs out of file descriptors while strangers hold connections to its
/// receive port: accept fails with EMFILE. The agent logs it, pauses and goes on (before,
/// the failed accept ended the agent); given descriptors again, it completes a TLS handshake
/// on the same port.
fn out_of_descriptors(env: &mut Env) -> Result<()> {
    const FAILED: &str = "accepting a transfer connection failed";
    let ag = agents(env)?;
    let pid = {
        let running = ag.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .iter()
            .find(|a| a.machine == B)
            .map(Agent::pid)
            .context("no agent on machine-b")?
    };
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let (soft, hard) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(3)?.to_string(), f.get(4)?.to_string()))
        })
        .context("no open-files limit")?;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let log = env.logs.join(format!("agent-{B}.log"));
    let failures =
        || -> Result<usize> { Ok(std::fs::read_to_string(&log)?.matches(FAILED).count()) };
    let before = failures()?;
    let tight = (open + 2).to_string();
    // The soft limit only: raising a hard limit again needs CAP_SYS_RESOURCE.
    set_nofile(pid, &tight, &hard)?;
    let addr = std::net::SocketAddr::from((env.machine(B)?.ip(), ployz_e2e::agents::AGENT_PORT));
    let net = env.machine(A)?.net.clone();
    let held = env.block_on(async {
        let mut held = vec![];
        for _ in 0..24 {
            held.push(connect_from(net.clone(), addr).await?);
        }
        anyhow::Ok(held)
    });
    let seen = match &held {
        Ok(_) => wait_for(
            "the agent to fail an accept",
            Duration::from_secs(30),
            || Ok(failures()? > before),
        ),
        Err(e) => Err(anyhow::anyhow!("connecting: {e:#}")),
    };
    let running = {
        let mut running = ag.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .iter_mut()
            .find(|a| a.machine == B)
            .map(Agent::check_running)
            .context("no agent on machine-b")?
    };
    drop(held);
    let restored = set_nofile(pid, &soft, &hard);
    // Before the fix the failed accept ended the agent: that is the error to report.
    running?;
    seen?;
    restored?;
    eprintln!(
        "    EMFILE logged {} time(s), the agent kept running",
        failures()? - before
    );
    // Any key completes the handshake; the pin is checked after it.
    let pin = env.block_on(published_pin(&env.client, B))?;
    let connector = tokio_rustls::TlsConnector::from(identity(A)?.client_config(&pin)?);
    env.block_on(until(
        "a TLS handshake on machine-b's receive port",
        Duration::from_secs(30),
        || {
            let (net, connector) = (net.clone(), connector.clone());
            async move {
                let tcp = connect_from(net, addr).await?;
                let name = ployz::transfer::tls::server_name(B)?;
                Ok(connector.connect(name, tcp).await.ok().map(drop))
            }
        },
    ))?;
    http_get(env, B, "/readyz").map(drop)
}

/// The agents as users install them: the agent image (built offline from the agent binary and
/// the machines' `zfs`), imported into each node's containerd, and `helm install` of
/// charts/ployz. The DaemonSet's pods authenticate with their bound service-account tokens,
/// so the chart's admission policies hold them to their nodes and ployz-guard to their own
/// Migrations' workloads and volumes; a Migration then runs through them, and an agent's
/// credentials cannot change a workload or a PV that none of its Migrations concerns.
fn installed_with_helm(env: &mut Env) -> Result<()> {
    let ag = agents(env)?;
    for old in ag
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
    {
        old.kill();
    }
    ployz_e2e::agents::install_chart(env, &["agent.openebsNamespace=openebs"])?;

    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(env.client.clone(), "ployz-system");
    let agent_pods = ListParams::default().labels("app.kubernetes.io/component=agent");
    let mut ready: Vec<(String, bool)> = env
        .block_on(pods.list(&agent_pods))?
        .items
        .into_iter()
        .map(|p| {
            let node = p.spec.and_then(|s| s.node_name).unwrap_or_default();
            let up = p
                .status
                .and_then(|s| s.container_statuses)
                .is_some_and(|c| c.iter().all(|c| c.ready));
            (node, up)
        })
        .collect();
    ready.sort();
    ensure!(
        ready == [(A.to_string(), true), (B.to_string(), true)],
        "agent pods (node, ready): {ready:?}"
    );

    let moved = move_through_pods(env).and_then(|()| agents_held_to_their_migrations(env));
    // The pods' logs live in the machines' private /var/log: keep them with the suite's.
    for p in env.block_on(pods.list(&ListParams::default()))?.items {
        let (name, node) = (
            p.metadata.name.clone().unwrap_or_default(),
            p.spec.and_then(|s| s.node_name).unwrap_or_default(),
        );
        if let Ok(log) = env.block_on(pods.logs(&name, &Default::default())) {
            std::fs::write(env.logs.join(format!("pod-{name}-{node}.log")), log)?;
        }
    }
    moved
}

/// With the chart's credentials, an agent (here machine-b's, impersonated with its node
/// name) writes no workload and no PV that a Migration of its node does not lock: ployz-guard
/// refuses, naming why. The workload just moved, now unlocked, is as untouchable as a
/// bystander.
fn agents_held_to_their_migrations(env: &Env) -> Result<()> {
    wait_unlocked(env, "mig-helm")?;
    let agent_b = env.agent_client(Some(B))?;
    let bystander = "mig-helm-bystander";
    env.block_on(k8s::create_namespace(&env.client, bystander))?;
    env.block_on(k8s::create_deployment(&env.client, bystander, "db", "data"))?;
    let refused = |what: &str, r: kube::Result<()>, words: &str| match r {
        Err(kube::Error::Api(e)) if e.message.contains(words) => Ok(()),
        Err(e) => bail!("{what}: refused, but not saying {words:?}: {e}"),
        Ok(()) => bail!("{what}: accepted"),
    };
    let pin = Patch::Merge(serde_json::json!({"spec": {"template": {"spec": {
        "nodeSelector": {"kubernetes.io/hostname": B}}}}}));
    let scale = Patch::Merge(serde_json::json!({"spec": {"replicas": 0}}));
    for (ns, name) in [(bystander, "db"), ("mig-helm", "web")] {
        let api: Api<Deployment> = Api::namespaced(agent_b.clone(), ns);
        refused(
            &format!("machine-b's agent pinning Deployment {ns}/{name}"),
            env.block_on(api.patch(name, &PatchParams::default(), &pin))
                .map(drop),
            "holds none",
        )?;
        refused(
            &format!("machine-b's agent scaling Deployment {ns}/{name}"),
            env.block_on(api.patch_scale(name, &PatchParams::default(), &scale))
                .map(drop),
            "holds none",
        )?;
    }
    let moved: Vec<PersistentVolume> = env
        .block_on(Api::<PersistentVolume>::all(env.client.clone()).list(&ListParams::default()))?
        .items
        .into_iter()
        .filter(|pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.namespace.as_deref())
                == Some("mig-helm")
        })
        .collect();
    ensure!(!moved.is_empty(), "no PV of mig-helm");
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(agent_b.clone(), "mig-helm");
    refused(
        "machine-b's agent annotating claim mig-helm/data",
        env.block_on(claims.patch(
            "data",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"x": "y"}}})),
        ))
        .map(drop),
        "none does",
    )?;
    let pvs: Api<PersistentVolume> = Api::all(agent_b);
    for pv in moved {
        let name = pv.name_any();
        refused(
            &format!("machine-b's agent changing PV {name}"),
            env.block_on(pvs.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"spec": {"persistentVolumeReclaimPolicy": "Delete"}}),
                ),
            ))
            .map(drop),
            "none does",
        )?;
        refused(
            &format!("machine-b's agent deleting PV {name}"),
            env.block_on(pvs.delete(&name, &DeleteParams::default()))
                .map(drop),
            "none does",
        )?;
    }
    Ok(())
}

/// machine-a to machine-b and back, through the agent pods.
fn move_through_pods(env: &Env) -> Result<()> {
    let ns = "mig-helm";
    let (vol, app) = deployment_on_a(env, ns, 8)?;
    migrate(env, &Request::new(ns, "web-to-b", B))?;
    let on_b = succeeded_on_b(env, ns, &vol, &app)?;
    wait_unlocked(env, ns)?;
    // And back: the replica left on machine-a is unmounted, received into and promoted by
    // its agent pod.
    migrate(env, &Request::new(ns, "web-to-a", A))?;
    let back = wait_phase(env, ns, "web-to-a", Phase::Succeeded)?;
    assert_succeeded(&back)?;
    assert_on(env, ns, &vol.pv, "app=web", A)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    app_moved(&app, &back, (b, &on_b), (a, &vol.path))?;
    Ok(())
}

/// Waits until `web-to-b` of `ns` succeeds, then checks it as a move of `vol`: the volume
/// and the app's pods on machine-b, every write the app acknowledged there. The volume's path
/// on machine-b.
fn succeeded_on_b(env: &Env, ns: &str, vol: &LocalVolume, app: &AckWatch) -> Result<String> {
    let m = wait_phase(env, ns, "web-to-b", Phase::Succeeded)?;
    assert_succeeded(&m)?;
    assert_on(env, ns, &vol.pv, "app=web", B)?;
    let (a, b) = (env.machine(A)?, env.machine(B)?);
    let on_b = mountpoint(b, &vol.dataset)?;
    app_moved(app, &m, (a, &vol.path), (b, &on_b))?;
    Ok(on_b)
}

//! `make bench`: the control loop at scale. A hundred machines, each a kwok node (placement is
//! real, no container runs) with its own network namespace and a real agent process; 250
//! one-volume workloads on 90 of them, moved to the next machine (250 Migrations at once),
//! then back (250 more, incremental from the common snapshot); the last 10 machines take no
//! part. ZFS is a stand-in (`ployz-fakezfs`: datasets, snapshots, GUIDs, holds and streams of a
//! few hundred KiB, in a file per machine): this measures the agents and the API, not ZFS.
//! Per agent, from its /metrics and /proc: objects its watches received, API requests, the
//! planner's time, memory. Writes the "scale" section of docs/BENCHMARKS.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use kube::api::{Api, ListParams, PostParams};
use ployz::api::{Machine, Migration, Phase};
use ployz::manifest::MigrationRequest;
use ployz_e2e::agents::{AGENT_HTTP_PORT, AGENT_PORT, release_agent_binary, workspace_binary};
use ployz_e2e::env::{Env, Nodes, Options, create_kwok_node};
use ployz_e2e::fakezfs;
use ployz_e2e::k8s::{self, LocalVolume};
use ployz_e2e::network::MachineNet;
use ployz_e2e::process::{Proc, command};
use ployz_e2e::wait::until;
use serde_json::json;

const MACHINES: usize = 100;
/// Machines that hold workloads; the others never take part.
const BUSY: usize = 90;
const WORKLOADS: usize = 250;
const NAMESPACES: usize = 10;
/// Target: every agent's resident memory at its peak.
const RSS_LIMIT_MIB: f64 = 64.0;
/// Budget: API requests both agents of one Migration make, together, from its creation to
/// Succeeded, when nothing but its own steps makes it wait. What its steps need: admission
/// (a live read, 8 lists to plan, lock the workload, label, status, event: 14); 8 lists to
/// check the plan before each of its two snapshots (16); about 15 status writes, each followed
/// by one reconcile of each agent (the source reads the workload, the target the Migration:
/// 45); the effects (scale down and up, pin, PV replaced and patched, claims, unlock,
/// finalizer, events: about 25); the pod and claim steps' reads as their watches wake them
/// (about 15). 115, rounded up.
const REQUEST_BUDGET: f64 = 120.0;
/// Target: the pure planner's time per Migration.
const PLAN_LIMIT_MS: f64 = 10.0;

fn main() -> ExitCode {
    let mut opts = Options::new("bench-scale");
    opts.nodes = Nodes::Kwok;
    ployz_e2e::report::run_bench(opts, bench)
}

/// A fake machine: a kwok node, a network namespace, a fake pool, an agent.
struct FakeMachine {
    name: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    _net: MachineNet,
    agent: Option<Proc>,
}

fn machine_name(i: usize) -> String {
    format!("kw-{:03}", i + 1)
}

fn bench(env: &Env) -> Result<String> {
    env.block_on(k8s::install_crds(&env.client, &env.root.join("crds")))?;
    let agent = release_agent_binary(&env.root)?;
    let zfs = workspace_binary(&env.root, "ployz-e2e", "ployz-fakezfs")?;
    let started = Instant::now();
    let mut machines = vec![];
    for i in 0..MACHINES {
        let name = machine_name(i);
        let ip = Ipv4Addr::new(198, 18, 0, u8::try_from(101 + i)?);
        let dir = env.state.join("fakezfs").join(&name);
        fakezfs::init(&dir, "tank", &format!("/fake/{name}"))?;
        let net = MachineNet::create(&name, ip)?;
        env.block_on(create_kwok_node(&env.client, &name, ip, &name))?;
        machines.push(FakeMachine {
            name,
            ip,
            dir,
            _net: net,
            agent: None,
        });
    }
    for m in &mut machines {
        m.agent = Some(start_agent(env, m, &agent, &zfs)?);
    }
    wait_machines_ready(env, &mut machines)?;
    eprintln!(
        "[bench] {MACHINES} machines and their agents ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    create_workloads(env, &machines)?;
    let quiet = quiet_moves(env, &mut machines)?;
    let mut waves = vec![];
    for wave in 1..=2 {
        let started = Instant::now();
        create_migrations(env, wave)?;
        let done = wait_migrations(env, &format!("-wave-{wave}"), WORKLOADS, &mut machines)?;
        waves.push((wave, done, started.elapsed().as_secs_f64()));
    }
    let mut samples = vec![];
    for m in &machines {
        let pid = m.agent.as_ref().context("agent not started")?.pid();
        samples.push(Sample {
            machine: m.name.clone(),
            metrics: scrape(m.ip)?,
            rss: proc_status(pid, "VmRSS")?,
            peak: proc_status(pid, "VmHWM")?,
        });
    }
    let migrations: Vec<Migration> = env
        .block_on(Api::<Migration>::all(env.client.clone()).list(&ListParams::default()))?
        .items;
    let report = render(&samples, &migrations, &waves, &quiet)?;
    let path = env.root.join("docs/BENCHMARKS.md");
    ployz_e2e::report::write_section(&path, "scale", &report)?;
    eprintln!("[bench] wrote the scale section of {}", path.display());
    drop(machines);
    Ok(report)
}

fn start_agent(env: &Env, m: &FakeMachine, agent: &Path, zfs: &Path) -> Result<Proc> {
    let agent_s = agent.to_string_lossy().into_owned();
    let mut cmd = command(
        "ip",
        [
            "netns".to_string(),
            "exec".into(),
            format!("pz-{}", m.name),
            agent_s.clone(),
            "--node-name".into(),
            m.name.clone(),
            "--pool".into(),
            "tank".into(),
            "--listen".into(),
            SocketAddr::from((m.ip, AGENT_PORT)).to_string(),
            "--http-listen".into(),
            SocketAddr::from((m.ip, AGENT_HTTP_PORT)).to_string(),
            "--zfs".into(),
            zfs.to_string_lossy().into_owned(),
        ],
    );
    cmd.env("PLOYZ_FAKEZFS_DIR", &m.dir)
        .env("KUBECONFIG", env.kubeconfig()?)
        .env("PLOYZ_LOG", "warn");
    Proc::spawn(&format!("agent-{}", m.name), cmd, &agent_s, &env.logs)
}

fn wait_machines_ready(env: &Env, machines: &mut [FakeMachine]) -> Result<()> {
    let api: Api<Machine> = Api::all(env.client.clone());
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        for m in machines.iter_mut() {
            if let Some(a) = m.agent.as_mut() {
                a.check_running()?;
            }
        }
        let ready = env
            .block_on(api.list(&ListParams::default()))?
            .items
            .iter()
            .filter(|m| {
                m.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("kw-"))
            })
            .filter(|m| {
                m.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == machines.len() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {ready} of {} Machines Ready after 180 s",
            machines.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn namespace(j: usize) -> String {
    format!("scale-{}", j % NAMESPACES)
}

/// Workload `j`'s machine in wave `wave` (0: where it starts).
fn home(j: usize, wave: usize) -> usize {
    if wave % 2 == 1 {
        (j + 1) % BUSY
    } else {
        j % BUSY
    }
}

/// Every workload: a dataset on its machine, a local PV and a claim bound to it, a
/// one-replica Deployment mounting it; returns once every pod is Ready where it belongs.
fn create_workloads(env: &Env, machines: &[FakeMachine]) -> Result<()> {
    for n in 0..NAMESPACES {
        env.block_on(k8s::create_namespace(&env.client, &format!("scale-{n}")))?;
    }
    let started = Instant::now();
    let client = env.client.clone();
    env.block_on(
        futures::stream::iter(0..WORKLOADS)
            .map(|j| {
                let client = client.clone();
                let m = &machines[home(j, 0)];
                async move {
                    let ns = namespace(j);
                    let claim = format!("data-{j}");
                    let pv = format!("{ns}-{claim}");
                    let dataset = format!("tank/ployz/{pv}");
                    fakezfs::run(
                        &m.dir,
                        &["create".into(), "-p".into(), dataset.clone()],
                        &mut std::io::empty(),
                        &mut std::io::sink(),
                    )?;
                    let vol = LocalVolume {
                        namespace: ns.clone(),
                        claim: claim.clone(),
                        path: format!("/fake/{}/{dataset}", m.name),
                        pv,
                        dataset,
                    };
                    Api::<PersistentVolume>::all(client.clone())
                        .create(&PostParams::default(), &k8s::local_pv(&vol, &m.name, None)?)
                        .await?;
                    k8s::create_claim_naming(&client, &ns, &claim, &vol.pv).await?;
                    Api::<Deployment>::namespaced(client.clone(), &ns)
                        .create(&PostParams::default(), &deployment(j)?)
                        .await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>(),
    )?;
    let pods: Api<Pod> = Api::all(env.client.clone());
    env.block_on(until(
        "every workload's pod Ready",
        Duration::from_secs(300),
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("ployz-scale"))
                    .await?;
                let ready = list.items.iter().filter(|p| k8s::pod_ready(p)).count();
                Ok((ready == WORKLOADS).then_some(()))
            }
        },
    ))?;
    eprintln!(
        "[bench] {WORKLOADS} workloads Ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn deployment(j: usize) -> Result<Deployment> {
    let app = format!("app-{j}");
    Ok(serde_json::from_value(json!({
        "metadata": {"name": app, "labels": {"app": app}},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app, "ployz-scale": "1"}},
                "spec": {
                    // kwok runs no container: the image is never pulled.
                    "containers": [{"name": "app", "image": "ployz.dev/scale-app:none",
                                    "imagePullPolicy": "Never",
                                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": format!("data-{j}")}}],
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                },
            },
        },
    }))?)
}

/// What moving workload 0 alone cost, there and back, while nothing else moved.
struct Quiet {
    /// Both agents' API requests (heartbeats left out), by (verb, resource), for the 2 moves.
    by_kind: BTreeMap<(String, String), f64>,
    /// Seconds from each Migration's creation to Succeeded.
    secs: Vec<f64>,
}

impl Quiet {
    const MOVES: usize = 2;

    fn per_migration(&self) -> f64 {
        total_of(self.by_kind.values().copied()) / Self::MOVES as f64
    }
}

/// Workload 0 moved to its wave-1 machine and back, one Migration at a time, before the
/// waves: what one Migration costs the API when it waits on nothing but itself.
fn quiet_moves(env: &Env, machines: &mut [FakeMachine]) -> Result<Quiet> {
    let ends = [home(0, 0), home(0, 1)];
    let requests = |machines: &[FakeMachine]| -> Result<BTreeMap<(String, String), f64>> {
        let mut by_kind = BTreeMap::new();
        for i in ends {
            for (name, l, v) in scrape(machines[i].ip)? {
                if name == "ployz_api_requests_total" && !housekeeping(&l) {
                    let kind = (
                        l.get("verb").cloned().unwrap_or_default(),
                        l.get("resource").cloned().unwrap_or_default(),
                    );
                    *by_kind.entry(kind).or_default() += v;
                }
            }
        }
        Ok(by_kind)
    };
    let before = requests(machines)?;
    let mut secs = vec![];
    for (k, to) in [(1, ends[1]), (2, ends[0])] {
        let name = format!("app-0-quiet-{k}");
        let started = Instant::now();
        env.block_on(create_migration(env.client.clone(), 0, to, name))?;
        wait_migrations(env, &format!("-quiet-{k}"), 1, machines)?;
        secs.push(started.elapsed().as_secs_f64());
    }
    let mut by_kind = requests(machines)?;
    for (kind, v) in before {
        *by_kind.entry(kind).or_default() -= v;
    }
    by_kind.retain(|_, v| *v > 0.0);
    Ok(Quiet { by_kind, secs })
}

async fn create_migration(client: kube::Client, j: usize, to: usize, name: String) -> Result<()> {
    let ns = namespace(j);
    let mut req =
        MigrationRequest::new(format!("{ns}/app-{j}").parse()?, machine_name(to).parse()?);
    req.name = Some(name);
    Api::<Migration>::namespaced(client, &ns)
        .create(&PostParams::default(), &req.to_migration()?)
        .await?;
    Ok(())
}

fn create_migrations(env: &Env, wave: usize) -> Result<()> {
    let client = env.client.clone();
    env.block_on(
        futures::stream::iter(0..WORKLOADS)
            .map(|j| {
                create_migration(
                    client.clone(),
                    j,
                    home(j, wave),
                    format!("app-{j}-wave-{wave}"),
                )
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>(),
    )?;
    Ok(())
}

/// Waits until the `count` Migrations named `*suffix` have ended; fails on any that did not
/// succeed.
fn wait_migrations(
    env: &Env,
    suffix: &str,
    count: usize,
    machines: &mut [FakeMachine],
) -> Result<usize> {
    let api: Api<Migration> = Api::all(env.client.clone());
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut last = String::new();
    loop {
        for m in machines.iter_mut() {
            if let Some(a) = m.agent.as_mut() {
                a.check_running()?;
            }
        }
        let list = env.block_on(api.list(&ListParams::default()))?.items;
        let mut phases: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed = vec![];
        for m in list.iter().filter(|m| {
            m.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.ends_with(&suffix))
        }) {
            let s = m.status.clone().unwrap_or_default();
            let phase = s.phase.map_or("New".to_string(), |p| format!("{p:?}"));
            if matches!(s.phase, Some(Phase::Failed | Phase::Cancelled)) {
                failed.push(format!(
                    "{}: {}",
                    m.metadata.name.clone().unwrap_or_default(),
                    s.message.unwrap_or_default()
                ));
            }
            *phases.entry(phase).or_default() += 1;
        }
        if !failed.is_empty() {
            bail!(
                "{} Migrations *{suffix} did not succeed, the first: {}",
                failed.len(),
                failed[0]
            );
        }
        let line = format!("{phases:?}");
        if line != last {
            eprintln!("[bench] *{suffix}: {line}");
            last = line.clone();
        }
        let succeeded = phases.get("Succeeded").copied().unwrap_or_default();
        if succeeded == count {
            return Ok(succeeded);
        }
        ensure!(
            Instant::now() < deadline,
            "*{suffix}: {succeeded} of {count} Migrations succeeded after 900 s: {last}"
        );
        // A quiet move takes seconds: look often enough not to add to it.
        std::thread::sleep(Duration::from_millis(if count == 1 { 100 } else { 1000 }));
    }
}

/// A metric series: name, labels, value.
type Series = (String, BTreeMap<String, String>, f64);

/// One agent's figures at the end.
struct Sample {
    machine: String,
    metrics: Vec<Series>,
    rss: f64,
    peak: f64,
}

impl Sample {
    /// The sum of metric `name`'s series whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn requests_where(&self, keep: impl Fn(&BTreeMap<String, String>) -> bool) -> f64 {
        self.metrics
            .iter()
            .filter(|(n, l, _)| n == "ployz_api_requests_total" && keep(l))
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// The agent's metrics at `ip`, as (name, labels, value).
fn scrape(ip: Ipv4Addr) -> Result<Vec<Series>> {
    let mut conn = TcpStream::connect_timeout(
        &SocketAddr::from((ip, AGENT_HTTP_PORT)),
        Duration::from_secs(5),
    )?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("no body in the /metrics answer")?;
    Ok(parse_metrics(body))
}

fn parse_metrics(body: &str) -> Vec<Series> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((name.to_string(), labels, value))
        })
        .collect()
}

/// A `/proc/PID/status` field in MiB.
fn proc_status(pid: u32, field: &str) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// A sum that starts at +0 (`Iterator::sum` of floats starts at -0, printed "-0").
fn total_of(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(0.0, |a, b| a + b)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// Requests that keep an agent alive whatever it does: the writes of its Machine's
/// registration and heartbeat (reading Machines, to plan or to reach a peer, is part of a
/// Migration's cost).
fn housekeeping(l: &BTreeMap<String, String>) -> bool {
    let resource = l.get("resource").map(String::as_str).unwrap_or_default();
    let verb = l.get("verb").map(String::as_str).unwrap_or_default();
    resource.starts_with("machines") && !matches!(verb, "get" | "list")
}

fn render(
    samples: &[Sample],
    migrations: &[Migration],
    waves: &[(usize, usize, f64)],
    quiet: &Quiet,
) -> Result<String> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    // The waves' Migrations; the quiet moves are accounted for apart.
    let total_migrations = (migrations.len() - Quiet::MOVES) as f64;
    // Each agent's own Migrations: those it is the target or the source of.
    let mut own: BTreeMap<&str, usize> = BTreeMap::new();
    for m in migrations {
        let to = m.spec.to.as_str();
        *own.entry(to).or_default() += 1;
        if let Some(from) = m
            .status
            .as_ref()
            .and_then(|s| s.plan.as_ref())
            .map(|p| p.source.as_str())
        {
            *own.entry(from).or_default() += 1;
        }
    }
    let (idle, busy): (Vec<&Sample>, Vec<&Sample>) = samples
        .iter()
        .partition(|s| own.get(s.machine.as_str()).copied().unwrap_or_default() == 0);
    ensure!(
        !idle.is_empty() && !busy.is_empty(),
        "no idle or no busy agents to compare"
    );

    let watched = |s: &Sample, w: &str| s.sum("ployz_watch_objects_total", &[("watch", w)]);
    let migration_objects =
        |s: &Sample| watched(s, "migrations_target") + watched(s, "migrations_source");
    let step_objects = |s: &Sample| watched(s, "step_pods") + watched(s, "step_claims");
    let idle_received = total_of(idle.iter().map(|s| migration_objects(s) + step_objects(s)));
    let per_own: Vec<f64> = busy
        .iter()
        .map(|s| migration_objects(s) / own.get(s.machine.as_str()).copied().unwrap_or(1) as f64)
        .collect();
    let steps_per_own: Vec<f64> = busy
        .iter()
        .map(|s| step_objects(s) / own.get(s.machine.as_str()).copied().unwrap_or(1) as f64)
        .collect();

    // Requests: what the idle agents made besides their heartbeats is what any agent costs
    // just by running (its watches); the rest, less the quiet moves, is what the waves cost.
    let idle_mean =
        idle.iter().map(|s| s.requests_where(|_| true)).sum::<f64>() / idle.len() as f64;
    let all = |s: &Sample| s.requests_where(|l| !housekeeping(l));
    let idle_watching = idle.iter().map(|s| all(s)).sum::<f64>() / idle.len() as f64;
    let total: f64 = samples.iter().map(all).sum();
    let quiet_total = total_of(quiet.by_kind.values().copied());
    let per_migration =
        (total - idle_watching * samples.len() as f64 - quiet_total) / total_migrations;
    let quiet_per_migration = quiet.per_migration();
    let mut by_kind: BTreeMap<(String, String), f64> =
        quiet.by_kind.iter().map(|(k, v)| (k.clone(), -v)).collect();
    for s in &busy {
        for (n, l, v) in &s.metrics {
            if n == "ployz_api_requests_total" && !housekeeping(l) {
                let key = (
                    l.get("verb").cloned().unwrap_or_default(),
                    l.get("resource").cloned().unwrap_or_default(),
                );
                *by_kind.entry(key).or_default() += v;
            }
        }
    }
    let housekeeping_per_agent = idle_mean;

    let hist = |name: &str| -> (f64, f64) {
        let sum: f64 = samples
            .iter()
            .map(|s| s.sum(&format!("{name}_sum"), &[]))
            .sum();
        let count: f64 = samples
            .iter()
            .map(|s| s.sum(&format!("{name}_count"), &[]))
            .sum();
        (sum, count)
    };
    let (plan_sum, plan_count) = hist("ployz_plan_seconds");
    let (obs_sum, obs_count) = hist("ployz_plan_observe_seconds");
    ensure!(plan_count > 0.0, "no agent planned a Migration");
    let plan_ms = plan_sum / plan_count * 1000.0;
    let observe_ms = obs_sum / obs_count.max(1.0) * 1000.0;

    let rss: Vec<f64> = samples.iter().map(|s| s.rss).collect();
    let peak: Vec<f64> = samples.iter().map(|s| s.peak).collect();

    let mut o = String::new();
    let _ = writeln!(
        o,
        "## Scale\n\n{MACHINES} machines, each a kwok node (placement is real, no container runs) with its own network\n\
         namespace and a real agent process (the release build the image ships), on {cpus} CPUs with the\n\
         control plane. {WORKLOADS} one-volume workloads in {NAMESPACES} namespaces on {BUSY} of the machines are moved to the\n\
         next machine ({WORKLOADS} Migrations created at once), then back ({WORKLOADS} more, incremental from the\n\
         common snapshot): {} Migrations, all Succeeded. The other {} machines take no part. ZFS is a\n\
         stand-in (`ployz-fakezfs`: datasets, snapshots with GUIDs, holds, properties, streams that\n\
         begin with a real BEGIN record, kept in a file per machine): this measures the agents and\n\
         the API, not ZFS.\n",
        migrations.len(),
        MACHINES - BUSY
    );
    let _ = writeln!(
        o,
        "| wave | Migrations | all Succeeded after |\n|---|---|---|"
    );
    for (wave, n, secs) in waves {
        let _ = writeln!(o, "| {wave} | {n} | {secs:.0} s |");
    }
    let _ = writeln!(
        o,
        "\n| per agent | median | max |\n|---|---|---|\n\
         | Migrations it is the source or target of (busy agents) | {:.0} | {:.0} |\n\
         | objects its Migration watches received, per own Migration | {:.1} | {:.1} |\n\
         | objects its step watches (pods, claims) received, per own Migration | {:.1} | {:.1} |\n\
         | objects received by the {} agents that took no part | {idle_received:.0} | |\n\
         | resident memory at the end (MiB) | {:.1} | {:.1} |\n\
         | resident memory at its peak (MiB) | {:.1} | {:.1} |\n\
         | API requests of an agent that took no part (heartbeats, watches), over the run | {:.0} | |",
        median(
            busy.iter()
                .map(|s| own.get(s.machine.as_str()).copied().unwrap_or_default() as f64)
                .collect()
        ),
        max(&busy
            .iter()
            .map(|s| own.get(s.machine.as_str()).copied().unwrap_or_default() as f64)
            .collect::<Vec<_>>()),
        median(per_own.clone()),
        max(&per_own),
        median(steps_per_own.clone()),
        max(&steps_per_own),
        idle.len(),
        median(rss.clone()),
        max(&rss),
        median(peak.clone()),
        max(&peak),
        housekeeping_per_agent,
    );
    // Seconds from creation to Succeeded, per wave Migration.
    let in_flight: Vec<f64> = migrations
        .iter()
        .filter(|m| {
            m.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.contains("-wave-"))
        })
        .filter_map(|m| {
            let created = m.metadata.creation_timestamp.as_ref()?.0;
            let done = m
                .status
                .as_ref()?
                .phase_transitions
                .iter()
                .find(|t| t.phase == Phase::Succeeded)?
                .time
                .0;
            Some(done.duration_since(created).as_secs_f64())
        })
        .collect();
    let _ = writeln!(
        o,
        "\n### API requests per Migration\n\nA Migration alone (workload 0 moved there and back before the waves, {:.1} s each from\n\
         creation to Succeeded) made {quiet_per_migration:.1} requests, both agents together. In the waves, {per_migration:.1} per Migration\n\
         (all agents' requests less their heartbeats and what an agent that took no part made, over the\n\
         {total_migrations:.0} Migrations), each in flight for {:.0} s (median): the controller-manager, the scheduler and kwok\n\
         serve 250 at once. A Migration that waits costs requests at fixed rates: a progress write at\n\
         most every 2 s while its bytes move (the write, then the source's read of the workload and\n\
         the target's of the Migration), and while a step waits for pods or claims a look every 5 s\n\
         at most (the workload and its pods) besides the looks its watches wake. By kind, per Migration:\n\n\
         | verb | resource | alone | in the waves (busy agents) |\n|---|---|---|---|",
        median(quiet.secs.clone()),
        median(in_flight.clone()),
    );
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    for ((verb, resource), n) in kinds {
        let alone = quiet
            .by_kind
            .get(&(verb.clone(), resource.clone()))
            .map_or(0.0, |v| v / Quiet::MOVES as f64);
        let _ = writeln!(
            o,
            "| {verb} | {resource} | {alone:.1} | {:.2} |",
            n / total_migrations
        );
    }
    let _ = writeln!(
        o,
        "\n### Planner\n\nThe target's agent plans each Migration once: {:.0} plans. Reading the objects it plans from\n\
         (lists of the namespace's workloads, claims and Migrations, and of every PV and Machine)\n\
         took {observe_ms:.1} ms on average; the pure planner {plan_ms:.3} ms.\n",
        plan_count
    );
    let _ = writeln!(o, "### Targets\n");
    let _ = writeln!(
        o,
        "- watches: the {} agents that took no part received {idle_received:.0} objects (target: only its own): {}",
        idle.len(),
        met(idle_received == 0.0)
    );
    let _ = writeln!(
        o,
        "- memory: the largest agent peaked at {:.1} MiB, {:.2} of the {RSS_LIMIT_MIB:.0} MiB target: {}",
        max(&peak),
        max(&peak) / RSS_LIMIT_MIB,
        met(max(&peak) < RSS_LIMIT_MIB)
    );
    let _ = writeln!(
        o,
        "- API requests: a Migration alone made {quiet_per_migration:.1}, {:.2} of the budget of {REQUEST_BUDGET:.0}: {}",
        quiet_per_migration / REQUEST_BUDGET,
        met(quiet_per_migration <= REQUEST_BUDGET)
    );
    if quiet_per_migration > REQUEST_BUDGET {
        let alone = |verb: &str, resource: &str| {
            quiet
                .by_kind
                .get(&(verb.to_string(), resource.to_string()))
                .map_or(0.0, |v| v / Quiet::MOVES as f64)
        };
        let _ = writeln!(
            o,
            "  - what limits it: every reconcile of the source reads the workload ({:.1} reads alone) and every effect first reads the Migration live ({:.1}); each connection to the target and each effect that names a machine reads Machines ({:.1}). What would change it: a watch of the migrating workload, opened for the Migration as the step watches are, so that waiting reconciles decide from it and only effects read live",
            alone("get", "deployments"),
            alone("get", "migrations"),
            alone("get", "machines")
        );
    }
    let _ = writeln!(
        o,
        "  - in the waves {per_migration:.1} per Migration ({:.2} of the budget), in flight {:.0}x as long as alone: the difference is the looks and progress writes of the time it waits on the cluster",
        per_migration / REQUEST_BUDGET,
        median(in_flight) / median(quiet.secs.clone()).max(0.001)
    );
    let _ = writeln!(
        o,
        "- planner: {plan_ms:.3} ms per Migration with {} PVs and {MACHINES} Machines in the cluster, {:.2} of the {PLAN_LIMIT_MS:.0} ms target: {}",
        WORKLOADS,
        plan_ms / PLAN_LIMIT_MS,
        met(plan_ms < PLAN_LIMIT_MS)
    );
    Ok(o)
}

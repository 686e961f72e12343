//! The planner: a pure function from observed cluster state to a plan (or a reason why not).
//! The agent that admits a Migration and `ployzctl migrate preview` run the same code, so a
//! preview shows exactly what the controller would do.
//!
//! Pipeline: resolve (service -> workload -> claims -> PVs -> datasets and nodes), validate
//! (machines, drain, readiness, ZFS, duplicates, `from`), build the [`MigrationPlan`].

pub mod observe;
pub mod rebind;
pub mod residents;
pub mod resolve;
#[cfg(test)]
mod tests;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Service};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::{Machine, Migration, MigrationPlan, Phase, VolumePlan, ZfsImplementation};
use crate::openebs::ZFSVolume;
use crate::transfer::authz::volume_dataset;
use crate::zfs::DatasetName;
pub use resolve::{Backend, FoundVolume, Workload};

/// A Machine whose agent has not heart-beaten for this long is not Ready.
pub const HEARTBEAT_STALE: SignedDuration = SignedDuration::from_secs(60);

/// Everything the planner looks at, read once by the caller.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The Migration's namespace.
    pub namespace: String,
    /// Where OpenEBS keeps its ZFSVolumes.
    pub openebs_namespace: String,
    pub deployments: Vec<Deployment>,
    pub statefulsets: Vec<StatefulSet>,
    pub services: Vec<Service>,
    pub claims: Vec<PersistentVolumeClaim>,
    pub volumes: Vec<PersistentVolume>,
    pub zfs_volumes: Vec<ZFSVolume>,
    pub machines: Vec<Machine>,
    /// Migrations of the namespace (including the one planned).
    pub migrations: Vec<Migration>,
    pub now: Option<Timestamp>,
}

pub use crate::api::Reason;

/// A planning failure: what is wrong and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PlanError {
    pub reason: Reason,
    pub message: String,
}

impl PlanError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// A plan and the facts behind it that the executor needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub plan: MigrationPlan,
    pub workload: Workload,
    pub volumes: Vec<FoundVolume>,
}

/// True when the Machine's agent is Ready and heart-beats.
pub fn machine_ready(m: &Machine, now: Option<Timestamp>) -> bool {
    let Some(status) = &m.status else {
        return false;
    };
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let fresh = match (now, &status.heartbeat_time) {
        (Some(now), Some(hb)) => now.duration_since(hb.0) < HEARTBEAT_STALE,
        (None, _) => true,
        (Some(_), None) => false,
    };
    ready && fresh
}

fn machine_names(machines: &[Machine]) -> String {
    let mut names: Vec<&str> = machines.iter().map(resolve::name_of).collect();
    names.sort();
    if names.is_empty() {
        "none; is the ployz agent DaemonSet running?".into()
    } else {
        names.join(", ")
    }
}

/// Plans `m` against the observed state.
pub fn plan(obs: &Observed, m: &Migration) -> Result<Planned, PlanError> {
    let spec = &m.spec;
    let target = obs
        .machines
        .iter()
        .find(|x| resolve::name_of(x) == spec.to)
        .ok_or_else(|| {
            PlanError::new(
                Reason::UnknownMachine,
                format!(
                    "there is no machine {:?}; known machines: {} (see `ployzctl machine ls`)",
                    spec.to,
                    machine_names(&obs.machines)
                ),
            )
        })?;
    let workload = resolve::workload(obs, &spec.service)?;
    let volumes = resolve::volumes(obs, &workload)?;
    let mut nodes: Vec<&str> = volumes.iter().map(|v| v.node.as_str()).collect();
    nodes.sort();
    nodes.dedup();
    let [node] = nodes.as_slice() else {
        return Err(PlanError::new(
            Reason::VolumesOnSeveralMachines,
            format!(
                "the volumes of {}/{} are on several nodes ({}); ployz moves a workload whose volumes share one machine",
                workload.reference.kind,
                workload.reference.name,
                nodes.join(", ")
            ),
        ));
    };
    let source = resolve::machine_of_node(&obs.machines, node).ok_or_else(|| {
        PlanError::new(
            Reason::UnknownMachine,
            format!("the volumes are on node {node}, which has no ployz Machine; is the ployz agent running there?"),
        )
    })?;
    let source_name = resolve::name_of(source);
    let target_name = resolve::name_of(target);
    if let Some(from) = &spec.from
        && from != source_name
    {
        return Err(PlanError::new(
            Reason::SourceMismatch,
            format!(
                "spec.from is {from}, but {} {} runs on {source_name}; nothing was moved. Fix or drop spec.from",
                workload.reference.kind, workload.reference.name
            ),
        ));
    }
    if source_name == target_name {
        return Err(PlanError::new(
            Reason::SameMachine,
            format!(
                "{} {} already runs on {target_name}; nothing to move",
                workload.reference.kind, workload.reference.name
            ),
        ));
    }
    if target.spec.draining {
        return Err(PlanError::new(
            Reason::TargetDraining,
            format!(
                "machine {target_name} is draining and accepts no workloads; pick another target, or undo the drain with `ployzctl machine drain {target_name} --undo`"
            ),
        ));
    }
    for (role, mach) in [("target", target), ("source", source)] {
        if !machine_ready(mach, obs.now) {
            return Err(PlanError::new(
                Reason::MachineNotReady,
                format!(
                    "{role} machine {} is not Ready (its agent does not heart-beat); check the ployz agent pod on node {}",
                    resolve::name_of(mach),
                    mach.spec.node_name
                ),
            ));
        }
    }
    let implementation =
        |mach: &Machine| mach.status.as_ref()?.zfs.as_ref().map(|z| z.implementation);
    if implementation(source) == Some(ZfsImplementation::OpenZfs)
        && implementation(target) == Some(ZfsImplementation::Legacy)
    {
        return Err(PlanError::new(
            Reason::IncompatibleZfs,
            format!(
                "{source_name} runs OpenZFS and {target_name} legacy ZFS, which cannot receive its streams; move to a machine with OpenZFS"
            ),
        ));
    }
    duplicates(obs, m, &workload, &volumes)?;
    let parent: DatasetName = target.spec.parent_dataset.parse().map_err(|e| {
        PlanError::new(
            Reason::InvalidDataset,
            format!("Machine {target_name} has an invalid parentDataset: {e}"),
        )
    })?;
    let mut planned = vec![];
    for v in &volumes {
        let target_dataset = volume_dataset(&parent, &v.volume)
            .map_err(|e| PlanError::new(Reason::InvalidDataset, e))?;
        planned.push(VolumePlan {
            claim: v.claim.clone(),
            volume: v.volume.clone(),
            source_dataset: v.dataset.clone(),
            target_dataset: target_dataset.to_string(),
            base: None,
            estimated_bytes: None,
        });
    }
    Ok(Planned {
        plan: MigrationPlan {
            source: source_name.into(),
            target: target_name.into(),
            workload: workload.reference.clone(),
            volumes: planned,
        },
        workload,
        volumes,
    })
}

/// Checks the plan in status against the live objects, as the planner would resolve them now:
/// the workload `spec.service` names, the claims it mounts, the PVs bound back to them, their
/// datasets, all on the plan's source machine. Status is writable by more than the agents, so
/// the executor runs this before it snapshots or sends anything named in the plan.
/// `scaled_from`: the replicas the cutover scaled the workload down from (a StatefulSet at
/// zero replicas names no claims of its own).
pub fn check_live(
    obs: &Observed,
    m: &Migration,
    plan: &MigrationPlan,
    scaled_from: Option<i32>,
) -> Result<(), PlanError> {
    let mismatch = |what: String| {
        PlanError::new(
            Reason::PlanMismatch,
            format!(
                "the plan in status {what}: status was changed by something other than the planner, or the workload changed since; nothing was snapshotted or sent"
            ),
        )
    };
    let mut w = resolve::workload(obs, &m.spec.service)?;
    if let Some(n) = scaled_from.filter(|n| *n > 0 && w.replicas == 0) {
        // A forged count only names claims that must exist and be bound back to this
        // namespace; the volumes found are compared with the plan all the same.
        let mut scaled = obs.clone();
        let named = |s: &&mut StatefulSet| s.metadata.name.as_deref() == Some(&w.reference.name);
        for s in scaled.statefulsets.iter_mut().filter(named) {
            if let Some(spec) = s.spec.as_mut() {
                spec.replicas = Some(n);
            }
        }
        w = resolve::workload(&scaled, &m.spec.service)?;
    }
    if w.reference != plan.workload {
        return Err(mismatch(format!(
            "moves {} {}, but spec.service {} is {} {}",
            plan.workload.kind,
            plan.workload.name,
            m.spec.service,
            w.reference.kind,
            w.reference.name
        )));
    }
    let found = resolve::volumes(obs, &w)?;
    let live: std::collections::BTreeSet<(&str, &str, &str)> = found
        .iter()
        .map(|v| (v.claim.as_str(), v.volume.as_str(), v.dataset.as_str()))
        .collect();
    let planned: std::collections::BTreeSet<(&str, &str, &str)> = plan
        .volumes
        .iter()
        .map(|v| {
            (
                v.claim.as_str(),
                v.volume.as_str(),
                v.source_dataset.as_str(),
            )
        })
        .collect();
    if live != planned {
        return Err(mismatch(format!(
            "names (claim, volume, dataset) {planned:?}, but the live objects say {live:?}"
        )));
    }
    if let Some(v) = found.iter().find(|v| {
        resolve::machine_of_node(&obs.machines, &v.node).map(resolve::name_of)
            != Some(plan.source.as_str())
    }) {
        return Err(mismatch(format!(
            "moves from {}, but volume {} is on node {}",
            plan.source, v.volume, v.node
        )));
    }
    Ok(())
}

/// One active Migration per workload, and per volume (two workloads of a namespace may share
/// a claim): an older one that is not finished wins. Claims bind a PV to one namespace, so
/// the namespace's Migrations are every Migration that could plan these volumes.
fn duplicates(
    obs: &Observed,
    m: &Migration,
    w: &Workload,
    volumes: &[FoundVolume],
) -> Result<(), PlanError> {
    let me = m.metadata.name.as_deref();
    let key = |x: &Migration| {
        (
            x.metadata.creation_timestamp.clone().map(|t| t.0),
            x.metadata.name.clone(),
        )
    };
    for other in &obs.migrations {
        if other.metadata.name.as_deref() == me {
            continue;
        }
        let phase = other.status.as_ref().and_then(|s| s.phase);
        if phase.is_some_and(Phase::is_terminal) {
            continue;
        }
        let same = match other.status.as_ref().and_then(|s| s.plan.as_ref()) {
            Some(p) => {
                p.workload == w.reference
                    || p.volumes
                        .iter()
                        .any(|pv| volumes.iter().any(|v| v.volume == pv.volume))
            }
            // Not planned yet: it names the same service and came first.
            None => other.spec.service == m.spec.service && key(other) < key(m),
        };
        if same {
            let name = other.metadata.name.as_deref().unwrap_or_default();
            return Err(PlanError::new(
                Reason::DuplicateMigration,
                format!(
                    "Migration {name} is already moving {} {} or its volumes (phase {}); wait for it to finish or delete it (`kubectl -n {} delete migration {name}`)",
                    w.reference.kind,
                    w.reference.name,
                    phase.map_or("Pending".into(), |p| format!("{p:?}")),
                    obs.namespace
                ),
            ));
        }
    }
    Ok(())
}

/// Pre-copy: another pass while the last one sent more than `threshold` bytes, the delta
/// still shrinks, and passes remain; otherwise cut over.
pub fn another_pass(pass_bytes: &[u64], threshold: u64, max_passes: u32) -> bool {
    let Some(&last) = pass_bytes.last() else {
        return true;
    };
    let shrinking = pass_bytes.len() < 2 || last < pass_bytes[pass_bytes.len() - 2];
    last > threshold && shrinking && (pass_bytes.len() as u32) < max_passes
}

/// Snapshot name of a pre-copy pass or of the final delta; unique per migration (by UID), so
/// a re-created Migration of the same name never reuses an old snapshot.
pub fn snapshot_name(uid: &str, pass: Option<u32>) -> String {
    let prefix = snapshot_prefix(uid);
    match pass {
        Some(n) => format!("{prefix}{n}"),
        None => format!("{prefix}final"),
    }
}

/// What every snapshot of the migration with `uid` starts with: `ployz-<8 of the uid>-`.
pub fn snapshot_prefix(uid: &str) -> String {
    let short: String = uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    format!("{}{short}-", crate::zfs::retention::PREFIX)
}

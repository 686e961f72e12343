//! The source machine's side: drives a planned Migration through pre-copy, cutover and, on
//! failure or cancellation, rollback. Each reconcile performs the next step of the phase and
//! records it in status, having recorded first whatever the step creates or changes (snapshot
//! names, replica count, PV specs, node pinning), so a restarted agent picks up where it was.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use tracing::{info, warn};

use super::metrics::ResultLabel;
use super::status::{self, key, transition};
use super::transfers::{PassResult, SendFn};
use super::workload::{Workload, pod_ready, replace_pv};
use super::{Ctx, Error, FINALIZER};
use crate::api::{
    Compression, Cutover, CutoverStep, Machine, Migration, MigrationPlan, MigrationStatus, Phase,
    SourceCopy, VolumeBinding, VolumeProgress,
};
use crate::openebs::{CSI_DRIVER, ZFSVolume};
use crate::plan::rebind::{move_pv, pinning, pv_on_node};
use crate::plan::{another_pass, snapshot_name};
use crate::transfer::client::{SendJob, TransferError};
use crate::transfer::protocol::{Action as PeerAction, MigrationKey, WireCompression};
use crate::zfs::{DatasetName, PROP_MIGRATION, PROP_REPLICA, Zfs, ZfsError};

/// Consecutive failed passes before a transfer problem fails the migration.
const MAX_TRANSFER_FAILURES: u32 = 5;
/// How often progress is written while a pass runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

fn requeue_now() -> Action {
    Action::requeue(Duration::from_millis(100))
}

pub async fn reconcile(m: Arc<Migration>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let s = m.status.clone().unwrap_or_default();
    let Some(plan) = s.plan.clone() else {
        return Ok(Action::await_change());
    };
    if plan.source != ctx.machine {
        return Ok(Action::await_change());
    }
    let phase = s.phase.unwrap_or(Phase::Pending);
    if m.metadata.deletion_timestamp.is_some() {
        if phase.is_terminal() {
            remove_finalizer(&ctx, &m).await?;
            return Ok(Action::await_change());
        }
        if phase != Phase::RollingBack {
            ctx.transfers.abort(&uid(&m));
            transition(
                &ctx,
                &m,
                s,
                Phase::RollingBack,
                "Cancelled",
                "the Migration was deleted in flight; moving the workload back to the source",
            )
            .await?;
            return Ok(requeue_now());
        }
    }
    let result = match phase {
        Phase::Snapshotting => snapshot(&ctx, &m, s.clone(), &plan).await,
        Phase::Sending => pre_copy(&ctx, &m, s.clone(), &plan).await,
        Phase::CuttingOver => cutover(&ctx, &m, s.clone(), &plan).await,
        Phase::RollingBack => rollback(&ctx, &m, s.clone(), &plan).await,
        _ => Ok(Action::await_change()),
    };
    match result {
        // The workload was deleted under a move: undo what can be undone and stop.
        Err(Error::WorkloadGone(what)) if phase != Phase::RollingBack => {
            let message = format!("{what} was deleted during the migration");
            fail(&ctx, &m, s, "WorkloadGone", &message).await
        }
        other => other,
    }
}

fn uid(m: &Migration) -> String {
    m.uid().unwrap_or_default()
}

fn migration_key(m: &Migration) -> MigrationKey {
    MigrationKey {
        namespace: m.namespace().unwrap_or_default(),
        name: m.name_any(),
    }
}

fn dataset(name: &str) -> Result<DatasetName, Error> {
    name.parse()
        .map_err(|e| Error::Other(format!("dataset {name:?}: {e}")))
}

/// Starts failing: rollback runs next and ends the Migration as Failed.
async fn fail(
    ctx: &Ctx,
    m: &Migration,
    s: MigrationStatus,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    ctx.transfers.abort(&uid(m));
    transition(ctx, m, s, Phase::RollingBack, reason, message).await?;
    Ok(requeue_now())
}

/// Takes `name` on every volume (idempotent: an existing snapshot of that name is ours).
async fn take_snapshots(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    name: &str,
) -> Result<(), Error> {
    let tag = key(m);
    for v in &plan.volumes {
        let snap = dataset(&v.source_dataset)?
            .snapshot(name)
            .map_err(|e| Error::Other(e.to_string()))?;
        match ctx.zfs.snapshot(&snap, &[(PROP_MIGRATION, &tag)]).await {
            Ok(()) | Err(ZfsError::TargetExists(_)) => {}
            Err(ZfsError::Failed { stderr, .. }) if stderr.contains("already exists") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn snapshot(
    ctx: &Ctx,
    m: &Migration,
    s: MigrationStatus,
    plan: &MigrationPlan,
) -> Result<Action, Error> {
    let Some(pc) = s.pre_copy.clone() else {
        return Err(Error::Other(
            "planned Migration without pre-copy state".into(),
        ));
    };
    if let Err(e) = take_snapshots(ctx, m, plan, &pc.snapshot).await {
        if let Error::Zfs(ZfsError::NotFound(what)) = &e {
            let message = format!(
                "dataset {what} is not on {}; the plan no longer matches this machine",
                ctx.machine
            );
            return fail(ctx, m, s, "VolumeNotFound", &message).await;
        }
        return Err(e);
    }
    let message = format!(
        "pass {}: sending snapshot {} of {} volume(s) while the workload runs",
        pc.pass,
        pc.snapshot,
        plan.volumes.len()
    );
    transition(ctx, m, s, Phase::Sending, "Snapshotted", &message).await?;
    Ok(requeue_now())
}

/// Where a pass stands.
enum PassState {
    Running,
    Done(Vec<u64>),
    Failed(TransferError),
}

/// Starts or follows the pass sending `snapshot`, writing progress while it runs.
async fn pass(
    ctx: &Ctx,
    m: &Migration,
    s: &mut MigrationStatus,
    plan: &MigrationPlan,
    snapshot: &str,
    label: &str,
) -> Result<PassState, Error> {
    let key = uid(m);
    match ctx.transfers.poll(&key, snapshot) {
        Some(Some(result)) => return Ok(finished(result)),
        Some(None) => {}
        None => {
            // Progress shows from the next look on; right now the pass is only starting.
            start_pass(ctx, m, plan, snapshot).await?;
            return Ok(PassState::Running);
        }
    }
    if let Some(view) = ctx.transfers.view(&key, snapshot) {
        let sent: u64 = view.sent.iter().sum();
        let estimated: Option<u64> = view.estimated.iter().map(|e| e.filter(|&x| x > 0)).sum();
        let summary = match estimated {
            _ if view.waiting == plan.volumes.len() => {
                format!("{label}: waiting for a transfer slot")
            }
            Some(est) => format!(
                "{label}: {}/{} {}%",
                super::machine::human_bytes(sent),
                super::machine::human_bytes(est),
                (sent.saturating_mul(100) / est.max(1)).min(99)
            ),
            None => format!("{label}: {}", super::machine::human_bytes(sent)),
        };
        let progress = crate::api::Progress {
            bytes_sent: sent,
            bytes_estimated: estimated,
            summary: Some(summary),
            volumes: plan
                .volumes
                .iter()
                .zip(view.sent.iter().zip(&view.estimated))
                .map(|(v, (sent, est))| VolumeProgress {
                    claim: v.claim.clone(),
                    bytes_sent: *sent,
                    bytes_estimated: est.filter(|&x| x > 0),
                })
                .collect(),
        };
        if s.progress.as_ref() != Some(&progress) {
            s.progress = Some(progress);
            status::write(ctx, m, s).await?;
        }
    }
    Ok(PassState::Running)
}

fn finished(result: PassResult) -> PassState {
    match result {
        Ok(bytes) => PassState::Done(bytes),
        Err(e) => PassState::Failed(e),
    }
}

async fn start_pass(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    snapshot: &str,
) -> Result<(), Error> {
    let endpoint = ends(ctx, plan).await?.target_endpoint;
    let transfer = m.spec.transfer.clone().unwrap_or_default();
    let rate_limit = match &transfer.bandwidth_limit {
        Some(q) => Some(crate::api::quantity_bytes(&q.0).ok_or_else(|| {
            Error::Other(format!(
                "spec.transfer.bandwidthLimit {:?} is not a quantity",
                q.0
            ))
        })?),
        None => None,
    };
    let no_progress = m.spec.no_progress_timeout();
    let mut jobs = vec![];
    for v in &plan.volumes {
        jobs.push(SendJob {
            migration: migration_key(m),
            claim: v.claim.clone(),
            target_machine: plan.target.clone(),
            dataset: dataset(&v.source_dataset)?,
            to: snapshot.to_string(),
            compression: match transfer.compression {
                Some(Compression::Zstd) => WireCompression::Zstd,
                _ => WireCompression::None,
            },
            rate_limit,
            no_progress,
        });
    }
    let jobs = Arc::new(jobs);
    let sender = Arc::clone(&ctx.sender);
    let send: SendFn = Arc::new(move |i, progress| {
        let (jobs, sender, endpoint) = (Arc::clone(&jobs), Arc::clone(&sender), endpoint.clone());
        Box::pin(async move {
            let job = &jobs[i];
            let connect = || tokio::net::TcpStream::connect(endpoint.clone());
            sender.send_with_retry(connect, job, &progress, 3).await
        })
    });
    info!(migration = %key(m), snapshot, target = %plan.target, "starting transfer pass");
    ctx.transfers
        .start(&uid(m), snapshot, plan.volumes.len(), send);
    Ok(())
}

/// Reason for a transfer failure, for status and Events.
fn transfer_reason(e: &TransferError) -> &'static str {
    match e {
        TransferError::NoRoom { .. } => "InsufficientSpace",
        TransferError::Refused { .. } => "TransferRefused",
        TransferError::Base { .. } => "TargetDiverged",
        TransferError::Remote { .. } => "ReceiveFailed",
        _ => "TransferFailed",
    }
}

/// A failed pass: retried (with the count in status) while the link may be at fault.
async fn pass_failed(
    ctx: &Ctx,
    m: &Migration,
    mut s: MigrationStatus,
    e: TransferError,
) -> Result<Action, Error> {
    let failures = s.transfer_failures.unwrap_or(0) + 1;
    let message = format!(
        "transfer to {} failed: {e}",
        s.plan.as_ref().map_or("", |p| p.target.as_str())
    );
    if e.is_retryable() && failures < MAX_TRANSFER_FAILURES {
        warn!(migration = %key(m), failures, error = %e, "transfer failed; retrying");
        s.transfer_failures = Some(failures);
        s.message = Some(format!(
            "{message}; retry {failures} of {}",
            MAX_TRANSFER_FAILURES - 1
        ));
        status::write(ctx, m, &s).await?;
        return Ok(Action::requeue(Duration::from_secs(
            2 * u64::from(failures),
        )));
    }
    fail(ctx, m, s, transfer_reason(&e), &message).await
}

async fn pre_copy(
    ctx: &Ctx,
    m: &Migration,
    mut s: MigrationStatus,
    plan: &MigrationPlan,
) -> Result<Action, Error> {
    let Some(mut pc) = s.pre_copy.clone() else {
        return Err(Error::Other(
            "planned Migration without pre-copy state".into(),
        ));
    };
    let label = format!("pass {}", pc.pass);
    match pass(ctx, m, &mut s, plan, &pc.snapshot, &label).await? {
        PassState::Running => Ok(Action::requeue(PROGRESS_EVERY)),
        PassState::Failed(e) => pass_failed(ctx, m, s, e).await,
        PassState::Done(bytes) => {
            let total: u64 = bytes.iter().sum();
            pc.pass_bytes.push(total);
            s.transfer_failures = Some(0);
            if another_pass(
                &pc.pass_bytes,
                ctx.config.precopy_threshold,
                ctx.config.precopy_passes,
            ) {
                pc.pass += 1;
                pc.snapshot = snapshot_name(&uid(m), Some(pc.pass));
                let message = format!(
                    "pass {} sent {total} bytes; another pass to shrink the final delta",
                    pc.pass - 1
                );
                s.pre_copy = Some(pc);
                transition(ctx, m, s, Phase::Snapshotting, "AnotherPass", &message).await?;
            } else {
                let message = format!(
                    "pre-copy done after {} pass(es), the last sent {total} bytes; stopping the workload for the final delta",
                    pc.pass
                );
                s.pre_copy = Some(pc);
                transition(ctx, m, s, Phase::CuttingOver, "PreCopyDone", &message).await?;
            }
            Ok(requeue_now())
        }
    }
}

/// What a step needs to know of the plan's two machines, read once per step.
struct Ends {
    source_node: String,
    target_node: String,
    /// zfs-localpv's IDs of the two machines (PV topology and ZFSVolume owner use them).
    source_zfs_node: String,
    target_zfs_node: String,
    target_parent: String,
    target_endpoint: String,
}

impl Ends {
    /// Source and target as the volume's PV names them: node IDs for zfs-localpv volumes,
    /// node names for local PVs.
    fn nodes_of(&self, b: &VolumeBinding) -> (&str, &str) {
        if b.original_zfs_volume.is_some() {
            (&self.source_zfs_node, &self.target_zfs_node)
        } else {
            (&self.source_node, &self.target_node)
        }
    }
}

async fn ends(ctx: &Ctx, plan: &MigrationPlan) -> Result<Ends, Error> {
    let machines: Api<Machine> = Api::all(ctx.client.clone());
    let source = machines.get(&plan.source).await?.spec;
    let target = machines.get(&plan.target).await?.spec;
    Ok(Ends {
        source_zfs_node: source.zfs_node_id().to_string(),
        target_zfs_node: target.zfs_node_id().to_string(),
        source_node: source.node_name,
        target_node: target.node_name,
        target_parent: target.parent_dataset,
        target_endpoint: target.endpoint,
    })
}

fn workload(ctx: &Ctx, m: &Migration, plan: &MigrationPlan) -> Workload {
    Workload::new(
        ctx.client.clone(),
        &m.namespace().unwrap_or_default(),
        plan.workload.clone(),
    )
}

/// Time since `since` (zero if the clock says it is in the future).
fn elapsed(since: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> Duration {
    let d = k8s_openapi::jiff::Timestamp::now().duration_since(since.0);
    Duration::from_millis(d.as_millis().max(0) as u64)
}

async fn cutover(
    ctx: &Ctx,
    m: &Migration,
    mut s: MigrationStatus,
    plan: &MigrationPlan,
) -> Result<Action, Error> {
    let w = workload(ctx, m, plan);
    let Some(mut c) = s.cutover.clone() else {
        // Recorded before anything is stopped: the replica count rollback restores.
        let observed = w.get().await?;
        s.cutover = Some(Cutover {
            step: CutoverStep::Started,
            original_replicas: observed.replicas,
            started: status::now(),
            final_snapshot: snapshot_name(&uid(m), None),
            scaled_up: None,
            volumes: vec![],
            original_placement: None,
        });
        status::write(ctx, m, &s).await?;
        return Ok(requeue_now());
    };
    let limit = m.spec.cutover_timeout().as_secs();
    if elapsed(&c.started).as_secs() > limit {
        let message = format!(
            "the cutover took longer than {limit}s (at step {:?}); moving the workload back to the source",
            c.step
        );
        return fail(ctx, m, s, "CutoverTimeout", &message).await;
    }
    let observed = w.get().await?;
    match c.step {
        CutoverStep::Started => {
            if observed.replicas != 0 {
                w.scale(0).await?;
            }
            if !w.pods(&observed.selector).await?.is_empty() {
                return Ok(Action::requeue(Duration::from_millis(500)));
            }
            c.step = CutoverStep::ScaledDown;
        }
        CutoverStep::ScaledDown => {
            if ctx.transfers.view(&uid(m), &c.final_snapshot).is_none() {
                take_snapshots(ctx, m, plan, &c.final_snapshot).await?;
            }
            match pass(ctx, m, &mut s, plan, &c.final_snapshot, "final delta").await? {
                PassState::Running => return Ok(Action::requeue(Duration::from_millis(500))),
                PassState::Failed(e) => return pass_failed(ctx, m, s, e).await,
                PassState::Done(bytes) => {
                    if let Some(pc) = s.pre_copy.as_mut() {
                        pc.pass_bytes.push(bytes.iter().sum());
                    }
                    c.step = CutoverStep::FinalSent;
                }
            }
        }
        CutoverStep::FinalSent => {
            if c.volumes.is_empty() {
                // Everything the rebind changes, recorded before it changes.
                c.volumes = bindings(ctx, plan).await?;
                s.cutover = Some(c);
                status::write(ctx, m, &s).await?;
                return Ok(requeue_now());
            }
            let endpoint = ends(ctx, plan).await?.target_endpoint;
            for (v, b) in plan.volumes.iter().zip(c.volumes.iter_mut()) {
                let mountpoint = peer(ctx, m, plan, &endpoint, &v.claim, PeerAction::Promote).await;
                match mountpoint {
                    Ok(path) => b.target_path = path,
                    Err(e) => {
                        let message =
                            format!("{} could not take over {}: {e}", plan.target, v.claim);
                        return fail(ctx, m, s, "PromoteFailed", &message).await;
                    }
                }
            }
            c.step = CutoverStep::Promoted;
        }
        CutoverStep::Promoted => {
            let e = ends(ctx, plan).await?;
            for b in &c.volumes {
                let (from, to) = e.nodes_of(b);
                rebind(ctx, b, from, to, Some(&e.target_parent)).await?;
            }
            if c.original_placement.is_none()
                && let Some(p) = pinning(&observed.template, &e.source_node, &e.target_node)
            {
                c.original_placement = Some(p.original.to_string());
                s.cutover = Some(c);
                status::write(ctx, m, &s).await?;
                w.patch_pod_spec(&p.to_target).await?;
                return Ok(requeue_now());
            }
            c.step = CutoverStep::Rebound;
        }
        CutoverStep::Rebound => {
            // A pod created while its claim is still re-binding is unschedulable and waits
            // out the scheduler's backoff: start it once every claim is Bound again.
            if !claims_bound(ctx, m, plan).await? {
                return Ok(Action::requeue(Duration::from_millis(300)));
            }
            w.scale(c.original_replicas).await?;
            c.scaled_up = Some(status::now());
            c.step = CutoverStep::ScaledUp;
        }
        CutoverStep::ScaledUp => {
            let target_node = ends(ctx, plan).await?.target_node;
            let pods = w.pods(&observed.selector).await?;
            let ready = pods
                .iter()
                .filter(|p| {
                    pod_ready(p)
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some(&target_node)
                })
                .count();
            if ready < c.original_replicas.max(0) as usize || pods.len() != ready {
                let limit = m.spec.target_ready_timeout().as_secs();
                if c.scaled_up
                    .as_ref()
                    .is_some_and(|t| elapsed(t).as_secs() > limit)
                {
                    let message = format!(
                        "{} of {} pod(s) of {} {} became Ready on {} within {limit}s; moving the workload back to the source (see `kubectl describe pod` on the target for why)",
                        ready,
                        c.original_replicas,
                        plan.workload.kind,
                        plan.workload.name,
                        plan.target
                    );
                    return fail(ctx, m, s, "TargetNotReady", &message).await;
                }
                return Ok(Action::requeue(Duration::from_millis(500)));
            }
            return succeed(ctx, m, s, plan, &c, &w).await;
        }
    }
    info!(migration = %key(m), step = ?c.step, elapsed_ms = elapsed(&c.started).as_millis() as u64, "cutover step done");
    s.cutover = Some(c);
    status::write(ctx, m, &s).await?;
    Ok(requeue_now())
}

async fn claims_bound(ctx: &Ctx, m: &Migration, plan: &MigrationPlan) -> Result<bool, Error> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    for v in &plan.volumes {
        let claim = claims.get(&v.claim).await?;
        let pv = pvs.get(&v.volume).await?;
        let claim_phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
        let pv_phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
        if claim_phase == Some("Lost") {
            // The claim was seen without its PV while the PV was re-created. The PV
            // controller re-binds a Lost claim only on its periodic resync (15 s by default)
            // or when the claim changes; touch it so that happens now.
            claims
                .patch(
                    &v.claim,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {
                        "ployz.dev/rebound": k8s_openapi::jiff::Timestamp::now().to_string(),
                    }}})),
                )
                .await?;
            return Ok(false);
        }
        if claim_phase != Some("Bound") || pv_phase != Some("Bound") {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The volumes as bound on the source: PV (and ZFSVolume) as JSON.
async fn bindings(ctx: &Ctx, plan: &MigrationPlan) -> Result<Vec<VolumeBinding>, Error> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let mut out = vec![];
    for v in &plan.volumes {
        let pv = pvs.get(&v.volume).await?;
        let zfs_volume = match pv.spec.as_ref().and_then(|s| s.csi.as_ref()) {
            Some(csi) if csi.driver == CSI_DRIVER => {
                let api: Api<ZFSVolume> =
                    Api::namespaced(ctx.client.clone(), &ctx.config.openebs_namespace);
                let zv = api.get(&csi.volume_handle).await?;
                Some(serde_json::to_string(&zv.spec).map_err(|e| Error::Other(e.to_string()))?)
            }
            _ => None,
        };
        out.push(VolumeBinding {
            claim: v.claim.clone(),
            volume: v.volume.clone(),
            original_spec: serde_json::to_string(&pv).map_err(|e| Error::Other(e.to_string()))?,
            original_zfs_volume: zfs_volume,
            target_path: None,
        });
    }
    Ok(out)
}

/// Points a volume at `to_node` (cutover), or back at the source (rollback: `to_parent`
/// unset, and the original objects restored as recorded).
async fn rebind(
    ctx: &Ctx,
    b: &VolumeBinding,
    from_node: &str,
    to_node: &str,
    to_parent: Option<&str>,
) -> Result<(), Error> {
    let original: PersistentVolume = serde_json::from_str(&b.original_spec)
        .map_err(|e| Error::Other(format!("recorded PV {}: {e}", b.volume)))?;
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let current = pvs.get_opt(&b.volume).await?;
    let wanted = match to_parent {
        Some(_) => move_pv(&original, from_node, to_node, b.target_path.as_deref()),
        None => move_pv(&original, "", "", None),
    };
    let wanted_spec = wanted.spec.clone();
    let done = current.as_ref().is_some_and(|pv| {
        pv_on_node(pv, to_node)
            && pv
                .spec
                .as_ref()
                .and_then(|s| s.local.as_ref())
                .map(|l| &l.path)
                == wanted_spec
                    .as_ref()
                    .and_then(|s| s.local.as_ref())
                    .map(|l| &l.path)
    });
    if !done {
        replace_pv(&ctx.client, &wanted).await?;
    }
    if let Some(original_zv) = &b.original_zfs_volume {
        let handle = original
            .spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .map(|c| c.volume_handle.clone())
            .unwrap_or_default();
        let patch = match to_parent {
            Some(parent) => json!({"spec": {"ownerNodeID": to_node, "poolName": parent}}),
            None => {
                let spec: serde_json::Value =
                    serde_json::from_str(original_zv).map_err(|e| Error::Other(e.to_string()))?;
                json!({"spec": {"ownerNodeID": spec["ownerNodeID"], "poolName": spec["poolName"]}})
            }
        };
        let api: Api<ZFSVolume> =
            Api::namespaced(ctx.client.clone(), &ctx.config.openebs_namespace);
        api.patch(&handle, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    Ok(())
}

/// Asks the target agent (at `endpoint`) to promote or demote its copy of `claim`.
async fn peer(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    endpoint: &str,
    claim: &str,
    action: PeerAction,
) -> Result<Option<String>, TransferError> {
    let v = plan
        .volumes
        .iter()
        .find(|v| v.claim == claim)
        .ok_or_else(|| TransferError::Zfs(ZfsError::NotFound(claim.into())))?;
    let job = SendJob {
        migration: migration_key(m),
        claim: claim.into(),
        target_machine: plan.target.clone(),
        dataset: v.source_dataset.parse().map_err(ZfsError::from)?,
        to: String::new(),
        compression: WireCompression::None,
        rate_limit: None,
        no_progress: Duration::from_secs(60),
    };
    let tcp = tokio::net::TcpStream::connect(endpoint)
        .await
        .map_err(|source| TransferError::Connect {
            machine: plan.target.clone(),
            source,
        })?;
    ctx.sender.request(tcp, &job, action).await
}

async fn succeed(
    ctx: &Ctx,
    m: &Migration,
    mut s: MigrationStatus,
    plan: &MigrationPlan,
    c: &Cutover,
    w: &Workload,
) -> Result<Action, Error> {
    let downtime_ms = elapsed(&c.started).as_millis() as u64;
    let delete = m.spec.source_copy == Some(SourceCopy::Delete);
    for v in &plan.volumes {
        let ds = dataset(&v.source_dataset)?;
        let result = if delete {
            ctx.zfs.destroy_dataset(&ds).await
        } else {
            // The old copy stays as a read-only replica: the way back sends only the delta.
            mark_replica(ctx, &ds, &key(m)).await
        };
        if let Err(e) = result {
            warn!(migration = %key(m), dataset = %ds, error = %e, "cannot retire the source copy");
        }
    }
    w.unlock(&m.name_any()).await?;
    s.downtime_milliseconds = Some(downtime_ms);
    let sent: u64 = s.pre_copy.as_ref().map_or(0, |p| p.pass_bytes.iter().sum());
    let message = format!(
        "{} {} runs on {}; {} sent, downtime {:.1}s; the copy on {} is {}",
        plan.workload.kind,
        plan.workload.name,
        plan.target,
        super::machine::human_bytes(sent),
        downtime_ms as f64 / 1000.0,
        plan.source,
        if delete {
            "deleted"
        } else {
            "kept as a read-only replica"
        }
    );
    let progress = s.progress.get_or_insert_with(Default::default);
    progress.bytes_sent = sent;
    progress.summary = Some(format!("done: {}", super::machine::human_bytes(sent)));
    let s = transition(ctx, m, s, Phase::Succeeded, "Succeeded", &message).await?;
    ctx.metrics
        .downtime_seconds
        .observe(downtime_ms as f64 / 1000.0);
    finish_metrics(ctx, &s, "Succeeded");
    Ok(Action::await_change())
}

async fn mark_replica(ctx: &Ctx, ds: &DatasetName, tag: &str) -> Result<(), ZfsError> {
    ctx.zfs.set(ds.as_str(), PROP_REPLICA, "true").await?;
    ctx.zfs.set(ds.as_str(), PROP_MIGRATION, tag).await?;
    ctx.zfs.set(ds.as_str(), "readonly", "on").await?;
    // zfs-fuse applies readonly only at mount time; the workload is gone, so remount.
    let _ = ctx.zfs.unmount(ds).await;
    ctx.zfs.mount(ds).await
}

fn finish_metrics(ctx: &Ctx, s: &MigrationStatus, result: &str) {
    ctx.metrics
        .migrations
        .get_or_create(&ResultLabel {
            result: result.into(),
        })
        .inc();
    if let Some(start) = &s.start_time {
        ctx.metrics
            .duration_seconds
            .observe(elapsed(start).as_secs_f64());
    }
}

/// Undoes whatever the cutover did, in reverse, then ends as Failed (or Cancelled). Nothing
/// on the source is destroyed; the target's copy stays as a read-only replica.
async fn rollback(
    ctx: &Ctx,
    m: &Migration,
    s: MigrationStatus,
    plan: &MigrationPlan,
) -> Result<Action, Error> {
    ctx.transfers.abort(&uid(m));
    let w = workload(ctx, m, plan);
    if let Some(c) = &s.cutover {
        let e = ends(ctx, plan).await?;
        for b in &c.volumes {
            rebind(ctx, b, "", e.nodes_of(b).0, None).await?;
        }
        if !claims_bound(ctx, m, plan).await? {
            return Ok(Action::requeue(Duration::from_millis(300)));
        }
        if let Some(original) = &c.original_placement {
            let patch: serde_json::Value =
                serde_json::from_str(original).map_err(|e| Error::Other(e.to_string()))?;
            w.patch_pod_spec(&patch).await?;
        }
        if c.step >= CutoverStep::FinalSent {
            for v in &plan.volumes {
                let demoted = peer(
                    ctx,
                    m,
                    plan,
                    &e.target_endpoint,
                    &v.claim,
                    PeerAction::Demote,
                );
                if let Err(e) = demoted.await {
                    warn!(migration = %key(m), claim = %v.claim, error = %e, "cannot demote the target's copy; it stays as it is");
                }
            }
        }
        match w.scale(c.original_replicas).await {
            // The workload was deleted: nothing left to start.
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => {}
            other => other?,
        }
    }
    w.unlock(&m.name_any()).await?;
    let reason = s.reason.clone().unwrap_or_else(|| "Failed".into());
    let cancelled = reason == "Cancelled";
    let cause = s.message.clone().unwrap_or_default();
    let message = format!(
        "{}. The workload runs on {}; nothing on it was changed or deleted.",
        cause.trim_end_matches('.'),
        plan.source
    );
    let phase = if cancelled {
        Phase::Cancelled
    } else {
        Phase::Failed
    };
    let s = transition(ctx, m, s, phase, &reason, &message).await?;
    finish_metrics(ctx, &s, if cancelled { "Cancelled" } else { "Failed" });
    if m.metadata.deletion_timestamp.is_some() {
        remove_finalizer(ctx, m).await?;
    }
    Ok(Action::await_change())
}

async fn remove_finalizer(ctx: &Ctx, m: &Migration) -> Result<(), Error> {
    let remaining: Vec<&String> = m.finalizers().iter().filter(|f| *f != FINALIZER).collect();
    if remaining.len() == m.finalizers().len() {
        return Ok(());
    }
    let api = status::api(ctx, m);
    match api
        .patch(
            &m.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": remaining}})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

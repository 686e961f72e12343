//! The source machine's side: the executor of a planned Migration. Each reconcile reads the
//! Migration live (or from the cache, confirmed live before it acts: fresh.rs), gathers the
//! facts its stage needs, asks [`crate::flow::decide`] for the
//! next effect, performs it and writes status once, on the condition that the Migration did
//! not change meanwhile. Whatever an effect creates or must undo was recorded by an earlier
//! write, and every effect is idempotent, so a restarted agent picks up where it was.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use serde_json::json;
use tracing::{info, warn};

use super::fresh::Read;
use super::metrics::ResultLabel;
use super::status::{self, key};
use super::transfers::{PassStatus, SendFn};
use super::wake::Wait;
use super::workload::{Observed, Workload, pod_ready, replace_pv};
use super::{Ctx, Error, FINALIZER, LOCK_ANNOTATION, RESOLVE_ANNOTATION};
use crate::api::{
    Compression, Cutover, CutoverStep, Machine, Migration, MigrationPlan, MigrationStatus, Phase,
    Reason, RollbackStep, SourceCopy, StepTime, VolumeBinding, VolumeProgress,
};
use crate::flow::{
    self, Claims, Decision, Effect, Facts, Failure, Limits, PassFacts, Pinning, Stage, Then,
};
use crate::openebs::{CSI_DRIVER, ZFSVolume};
use crate::plan::rebind::{
    RecordedPv, check_recorded_owner, check_recorded_pinning, check_recorded_pv, move_pv, pinning,
    pv_on_node, reclaim_policy, workload_mounts,
};
use crate::plan::snapshot_name;
use crate::transfer::client::{SendJob, TransferError};
use crate::transfer::protocol::{
    Action as PeerAction, MigrationKey, Outcome, RefusalReason, WireCompression,
};
use crate::transfer::tls::Pin;
use crate::zfs::{
    DatasetName, PROP_CLAIM, PROP_MIGRATION, PROP_PEERS, PROP_REPLICA, Zfs, ZfsError,
};

/// Longest wait for a TCP connection to a peer agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for a peer's answer to a promote or demote.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn reconcile(m: Arc<Migration>, ctx: Arc<Ctx>, read: Read) -> Result<Action, Error> {
    let s = m.status.clone().unwrap_or_default();
    let Some(plan) = s.plan.clone() else {
        return Ok(Action::await_change());
    };
    if s.phase.is_some_and(Phase::is_terminal) && super::retention::first_look(&ctx, &m) {
        // Back after a takeover that completed the move: retire the copy here, as the move
        // itself would have.
        if s.phase == Some(Phase::Succeeded) && s.taken_over_by.is_some() {
            let copy = m.spec.source_copy.unwrap_or_default();
            let retired = async {
                fail::fail_point!("before-retire-source", |_| Err(Error::Zfs(ZfsError::Busy(
                    "failpoint before-retire-source".into()
                ))));
                retire_source(&ctx, &m, &plan, &s, copy).await
            };
            match retired.await {
                Ok(()) => {}
                // A busy dataset or an API error passes: looked at again with backoff (and
                // reported), until the copy is retired.
                Err(e @ (Error::Zfs(_) | Error::Kube(_))) => {
                    super::retention::look_again(&ctx, &m);
                    return Err(e);
                }
                Err(e) => warn!(migration = %key(&m), error = %e, "cannot retire the source copy"),
            }
        }
        super::retention::prune(&ctx, &m, &plan).await;
    }
    // One driver: the source's agent, or the target's once it took the Migration over.
    let driver = s.taken_over_by.as_deref().unwrap_or(&plan.source);
    if driver != ctx.machine {
        // Taken over from this agent: a watch it opened while it drove is not its own now.
        ctx.wakeups.follow(&ctx.client, &m, None);
        return Ok(Action::await_change());
    }
    drive(m, ctx, s, plan, read).await
}

/// Runs one decision of the Migration this agent drives.
pub async fn drive(
    m: Arc<Migration>,
    ctx: Arc<Ctx>,
    s: MigrationStatus,
    plan: MigrationPlan,
    read: Read,
) -> Result<Action, Error> {
    let stage = Stage::of(&s);
    let w = workload(&ctx, &m, &plan);
    let facts = observe(&ctx, &m, &s, &plan, &stage, &w).await?;
    let decision = flow::decide(&s, &facts, &limits(&ctx, &m));
    // Waiting may be decided from the cache; acting only from what the API has now.
    if read == Read::Cached && decision.effect.acts() && super::confirm(&ctx, &m).await?.is_none() {
        return Ok(Action::requeue(Duration::ZERO));
    }
    let mut next = s.clone();
    let mut warning = None;
    let then = match perform(&ctx, &m, &plan, &w, &mut next, &decision.effect).await {
        Ok(()) => decision.then.clone(),
        Err(e) => {
            let failure = classify(&ctx, &e);
            match flow::on_error(&stage, &decision.effect, &failure) {
                Some(then) => {
                    warn!(migration = %key(&m), effect = ?decision.effect, error = %e, "effect failed");
                    warning = Some(failure.message);
                    then
                }
                None => return Err(e),
            }
        }
    };
    record(&ctx, &m, &plan, s, next, &decision, then, &facts, warning).await
}

fn uid(m: &Migration) -> String {
    m.uid().unwrap_or_default()
}

fn limits(ctx: &Ctx, m: &Migration) -> Limits {
    Limits {
        cutover: m.spec.cutover_timeout(),
        target_ready: m.spec.target_ready_timeout(),
        precopy_threshold: ctx.config.precopy_threshold,
        precopy_passes: ctx.config.precopy_passes,
        source_copy: m.spec.source_copy.unwrap_or_default(),
    }
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

fn workload(ctx: &Ctx, m: &Migration, plan: &MigrationPlan) -> Workload {
    Workload::new(
        ctx.client.clone(),
        &m.namespace().unwrap_or_default(),
        plan.workload.clone(),
    )
}

/// Time since `since` (zero if the clock says it is in the future).
pub(super) fn elapsed(since: &k8s_openapi::jiff::Timestamp) -> Duration {
    non_negative(k8s_openapi::jiff::Timestamp::now().duration_since(*since))
}

fn non_negative(d: k8s_openapi::jiff::SignedDuration) -> Duration {
    Duration::from_millis(d.as_millis().max(0) as u64)
}

/// The snapshot the current pass sends: the pre-copy pass's, or the final one.
fn pass_snapshot(s: &MigrationStatus, stage: &Stage) -> Option<String> {
    match stage {
        Stage::Sending | Stage::Snapshotting => s.pre_copy.as_ref().map(|p| p.snapshot.clone()),
        Stage::CuttingOver(Some(CutoverStep::ScaledDown)) => {
            s.cutover.as_ref().map(|c| c.final_snapshot.clone())
        }
        _ => None,
    }
}

/// Gathers what `stage` decides on, reading only what it needs.
async fn observe(
    ctx: &Ctx,
    m: &Migration,
    s: &MigrationStatus,
    plan: &MigrationPlan,
    stage: &Stage,
    w: &Workload,
) -> Result<Facts, Error> {
    let observed = match w.get().await {
        Ok(o) => Some(o),
        Err(Error::WorkloadGone(_)) => None,
        Err(e) => return Err(e),
    };
    let mut f = Facts {
        deleting: m.metadata.deletion_timestamp.is_some(),
        finalizer: m.finalizers().iter().any(|x| x == FINALIZER),
        locked_by_us: observed.as_ref().is_some_and(|o| {
            o.annotations.get(LOCK_ANNOTATION).map(String::as_str) == Some(&m.name_any())
        }),
        since_cutover: s.cutover.as_ref().map(|c| elapsed(&c.started.0)),
        since_scale_up: s
            .cutover
            .as_ref()
            .and_then(|c| c.scaled_up.as_ref())
            .map(|t| elapsed(&t.0)),
        resolve: match m.annotations().get(RESOLVE_ANNOTATION).map(String::as_str) {
            Some("cancel") => Some(flow::Resolve::Cancel),
            Some("abandon") => Some(flow::Resolve::Abandon),
            Some("complete") => Some(flow::Resolve::Complete),
            _ => None,
        },
        since_progress: ctx
            .progress_written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&uid(m))
            .map(Instant::elapsed),
        retry_in: s
            .retry_at
            .as_ref()
            .map(|t| non_negative(t.0.duration_since(k8s_openapi::jiff::Timestamp::now()))),
        ..Facts::default()
    };
    if let Some(snapshot) = pass_snapshot(s, stage) {
        f.pass = match ctx
            .transfers
            .peek(&uid(m), &snapshot, |e| transfer_failure(plan, e))
        {
            PassStatus::Idle => PassFacts::Idle,
            PassStatus::Running => PassFacts::Running,
            PassStatus::Done(bytes) => PassFacts::Done(bytes),
            PassStatus::Failed(failure) => PassFacts::Failed(failure),
        };
    }
    let needs_pods = matches!(
        stage,
        Stage::CuttingOver(Some(CutoverStep::Started | CutoverStep::ScaledUp))
            | Stage::RollingBack {
                step: Some(RollbackStep::Started),
                ..
            }
    );
    let needs_claims = matches!(
        stage,
        Stage::CuttingOver(Some(CutoverStep::Pinned))
            | Stage::RollingBack {
                step: Some(RollbackStep::Rebound),
                ..
            }
    );
    let needs_pinning = matches!(
        stage,
        Stage::CuttingOver(Some(CutoverStep::Started | CutoverStep::Rebound))
            | Stage::RollingBack {
                step: Some(RollbackStep::Rebound),
                ..
            }
    );
    // What this step waits for wakes it (wake.rs); the flow's requeue is only a fallback.
    let wait = match &observed {
        Some(o) if needs_pods => Some(Wait::Pods {
            selector: o.selector.clone(),
        }),
        _ if needs_claims => Some(Wait::Claims),
        _ => None,
    };
    ctx.wakeups.follow(&ctx.client, m, wait);
    let probe = matches!(stage, Stage::CuttingOver(Some(step)) if *step < CutoverStep::ScaledUp)
        && plan.target != ctx.machine;
    let ends = if needs_pods || needs_pinning || probe {
        // Read every few seconds while the step waits: recent reads serve.
        Some(ends(ctx, plan, Read::Cached).await?)
    } else {
        None
    };
    if let Some(o) = &observed {
        let mut wf = flow::WorkloadFacts {
            replicas: o.replicas,
            ..Default::default()
        };
        if needs_pods && let Some(e) = &ends {
            let pods = w.pods(&o.selector).await?;
            wf.pods = pods.len();
            wf.ready_on_target = pods
                .iter()
                .filter(|p| {
                    pod_ready(p)
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some(&e.target_node)
                })
                .count();
        }
        f.workload = Some(wf);
        if needs_pinning && let Some(e) = &ends {
            f.pinning = pinning_of(o, e);
        }
    }
    if needs_claims {
        f.claims = claims(ctx, m, s, plan).await?;
    }
    if probe && let Some(e) = &ends {
        f.target_unreachable_for = target_unreachable_for(ctx, m, &e.target_endpoint).await;
    }
    Ok(f)
}

fn pinning_of(o: &Observed, e: &Ends) -> Pinning {
    if pinning(&o.template, &e.source_node, &e.target_node).is_some() {
        Pinning::Source
    } else if pinning(&o.template, &e.target_node, &e.source_node).is_some() {
        Pinning::Target
    } else {
        Pinning::None
    }
}

/// How long the target's transfer endpoint has refused connections, by this agent's count
/// (a restarted agent counts afresh, which only delays the decision).
async fn target_unreachable_for(ctx: &Ctx, m: &Migration, endpoint: &str) -> Option<Duration> {
    let reachable = dial(endpoint).await.is_ok();
    let mut down = ctx.unreachable.lock().unwrap_or_else(|p| p.into_inner());
    if reachable {
        down.remove(&uid(m));
        return None;
    }
    let since = *down.entry(uid(m)).or_insert_with(Instant::now);
    Some(since.elapsed())
}

async fn dial(endpoint: &str) -> std::io::Result<tokio::net::TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(endpoint))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// A connection to `machine`'s agent, with the key its Machine publishes now: read at each
/// attempt, since an agent that restarts listens with a new key (and maybe a new address).
async fn dial_agent(
    client: &kube::Client,
    machine: &str,
) -> std::io::Result<(tokio::net::TcpStream, Pin)> {
    let machines: Api<Machine> = Api::all(client.clone());
    let m = machines
        .get(machine)
        .await
        .map_err(|e| std::io::Error::other(format!("reading Machine {machine}: {e}")))?;
    let pin = m
        .status
        .and_then(|s| s.tls_pin)
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "Machine {machine} publishes no TLS key (status.tlsPin); its agent is not running, or predates pinned keys"
            ))
        })?
        .parse::<Pin>()
        .map_err(std::io::Error::other)?;
    Ok((dial(&m.spec.endpoint).await?, pin))
}

/// Whether the workload's claims are all Bound to their PVs again, and the PVs have their
/// recorded reclaim policy back.
async fn claims(
    ctx: &Ctx,
    m: &Migration,
    s: &MigrationStatus,
    plan: &MigrationPlan,
) -> Result<Claims, Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let mut all = Claims::Bound;
    for v in &plan.volumes {
        let claim = api.get(&v.claim).await?;
        let pv = pvs.get_opt(&v.volume).await?;
        let claim_phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
        let pv_phase = pv
            .as_ref()
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref());
        if claim_phase == Some("Lost") {
            return Ok(Claims::Lost);
        }
        if claim_phase != Some("Bound") || pv_phase != Some("Bound") {
            all = Claims::Pending;
        } else if all == Claims::Bound
            && let (Some(pv), Some(want)) = (&pv, recorded_policy(s, &v.volume)?)
            && reclaim_policy(pv) != want
        {
            all = Claims::Retained;
        }
    }
    Ok(all)
}

/// The reclaim policy `volume` had on the source, as recorded before the rebind.
fn recorded_policy(s: &MigrationStatus, volume: &str) -> Result<Option<String>, Error> {
    let Some(b) = s
        .cutover
        .iter()
        .flat_map(|c| &c.volumes)
        .find(|b| b.volume == volume)
    else {
        return Ok(None);
    };
    let pv: PersistentVolume = serde_json::from_str(&b.original_spec)
        .map_err(|e| Error::Other(format!("recorded PV {volume}: {e}")))?;
    Ok(Some(reclaim_policy(&pv).to_string()))
}

async fn restore_reclaim_policies(ctx: &Ctx, s: &MigrationStatus) -> Result<(), Error> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    for b in s.cutover.iter().flat_map(|c| &c.volumes) {
        if let Some(want) = recorded_policy(s, &b.volume)? {
            pvs.patch(
                &b.volume,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"persistentVolumeReclaimPolicy": want}})),
            )
            .await?;
        }
    }
    Ok(())
}

/// Performs one effect; fills in `next` whatever status must record of it.
async fn perform(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    w: &Workload,
    next: &mut MigrationStatus,
    effect: &Effect,
) -> Result<(), Error> {
    match effect {
        Effect::Nothing => {}
        Effect::AbortTransfers => ctx.transfers.abort(&uid(m)),
        Effect::Snapshot => {
            check_live(ctx, m, plan, None).await?;
            let snapshot = next.pre_copy.as_ref().map(|p| p.snapshot.clone());
            take_snapshots(ctx, m, plan, &snapshot.unwrap_or_default()).await?;
        }
        Effect::StartPass => {
            check_live(ctx, m, plan, None).await?;
            let snapshot = next.pre_copy.as_ref().map(|p| p.snapshot.clone());
            start_pass(ctx, m, plan, &snapshot.unwrap_or_default()).await?;
        }
        Effect::StartFinalPass => {
            let snapshot = next.cutover.as_ref().map(|c| c.final_snapshot.clone());
            let snapshot = snapshot.unwrap_or_default();
            // The fault tests stop the target here, with the workload already down.
            fail::fail_point!("before-final-pass");
            let scaled_from = next.cutover.as_ref().map(|c| c.original_replicas);
            check_live(ctx, m, plan, scaled_from).await?;
            take_snapshots(ctx, m, plan, &snapshot).await?;
            start_pass(ctx, m, plan, &snapshot).await?;
        }
        Effect::ReportProgress => {
            if let Some(snapshot) = pass_snapshot(next, &Stage::of(next)) {
                report_progress(ctx, m, plan, next, &snapshot);
                ctx.progress_written
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(uid(m), Instant::now());
            }
        }
        Effect::Scale(n) => w.scale(*n).await?,
        Effect::RecordBindings => {
            let bindings = bindings(ctx, plan).await?;
            if let Some(c) = next.cutover.as_mut() {
                c.volumes = bindings;
            }
        }
        Effect::Promote => {
            let Some(c) = next.cutover.as_mut() else {
                return Ok(());
            };
            for b in c.volumes.iter_mut() {
                b.target_path = role_change(ctx, m, plan, &b.claim, PeerAction::Promote).await?;
            }
        }
        Effect::RebindToTarget => {
            fail::fail_point!("before-rebind-to-target", |_| crash(
                "before-rebind-to-target"
            ));
            let e = ends(ctx, plan, Read::Live).await?;
            let bindings: Vec<&VolumeBinding> =
                next.cutover.iter().flat_map(|c| &c.volumes).collect();
            check_mounted(w, &bindings, true).await?;
            for b in bindings {
                rebind(ctx, m, &e, b, true).await?;
            }
        }
        Effect::RecordPinning | Effect::PinToTarget => {
            // Recorded before the scale-down (or, for a cutover an older agent began, at
            // Rebound); applied at Rebound.
            let e = ends(ctx, plan, Read::Live).await?;
            let observed = w.get().await?;
            let Some(p) = pinning(&observed.template, &e.source_node, &e.target_node) else {
                return Ok(());
            };
            let Some(c) = next.cutover.as_mut() else {
                return Ok(());
            };
            if *effect == Effect::RecordPinning {
                c.original_placement = Some(p.original.to_string());
            } else {
                fail::fail_point!("before-pin-to-target", |_| crash("before-pin-to-target"));
                w.patch_pod_spec(&p.to_target).await?;
            }
        }
        Effect::TouchClaims => touch_lost_claims(ctx, m, plan).await?,
        Effect::RestoreReclaimPolicy => restore_reclaim_policies(ctx, next).await?,
        Effect::RetireSource(copy) => retire_source(ctx, m, plan, next, *copy).await?,
        Effect::RebindToSource => {
            let e = ends(ctx, plan, Read::Live).await?;
            let bindings: Vec<&VolumeBinding> =
                next.cutover.iter().flat_map(|c| &c.volumes).collect();
            check_mounted(w, &bindings, false).await?;
            for b in bindings {
                rebind(ctx, m, &e, b, false).await?;
            }
        }
        Effect::RestorePinning => {
            if let Some(original) = next
                .cutover
                .as_ref()
                .and_then(|c| c.original_placement.as_ref())
            {
                let patch: serde_json::Value =
                    serde_json::from_str(original).map_err(|e| Error::Other(e.to_string()))?;
                // Merged into the pod template: only ever node pinning back to the source.
                let source_node = ends(ctx, plan, Read::Live).await?.source_node;
                check_recorded_pinning(&patch, &source_node).map_err(|why| {
                    Error::PlanMismatch(format!(
                        "the original placement recorded in status is not restored: {why}"
                    ))
                })?;
                w.patch_pod_spec(&patch).await?;
            }
        }
        Effect::Demote => {
            for v in &plan.volumes {
                // A copy the workload wrote to on the target is kept there under another name.
                if let Some(kept) = role_change(ctx, m, plan, &v.claim, PeerAction::Demote).await? {
                    let note = format!(
                        "the workload wrote to claim {}'s volume on {} after the cutover; ployz does not carry that back: the copy is kept read-only there as {kept}. Copy what you need from it, then destroy it (zfs destroy -r {kept})",
                        v.claim, plan.target
                    );
                    warn!(migration = %key(m), %kept, "target copy kept");
                    status::event(ctx, m, EventType::Warning, "TargetWritesKept", &note).await;
                }
            }
        }
        Effect::Unlock => w.unlock(&m.name_any()).await?,
        Effect::RemoveFinalizer => remove_finalizer(ctx, m).await?,
    }
    Ok(())
}

/// A simulated crash for the fault tests (compiled in with the `failpoints` feature only).
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn crash(point: &str) -> Result<(), Error> {
    warn!(point, "crash point reached: exiting");
    std::process::exit(86)
}

/// Records the effect's outcome in status and returns when to look again.
#[allow(clippy::too_many_arguments)]
async fn record(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    before: MigrationStatus,
    mut s: MigrationStatus,
    decision: &Decision,
    then: Then,
    facts: &Facts,
    warning: Option<String>,
) -> Result<Action, Error> {
    let requeue_now = || Action::requeue(Duration::from_millis(50));
    let mut entered: Option<(Phase, Reason, String)> = None;
    let mut action = requeue_now();
    // The pass whose result this write records, dropped from memory once it is written.
    let mut consumed = None;
    match then {
        Then::Wait(after) => {
            action = after.map_or_else(Action::await_change, Action::requeue);
        }
        Then::Enter(phase, reason) => {
            let message = match (phase, &s.pre_copy) {
                (Phase::Sending, Some(pc)) => format!(
                    "pass {}: sending snapshot {} of {} volume(s) while the workload runs",
                    pc.pass,
                    pc.snapshot,
                    plan.volumes.len()
                ),
                _ => format!("{phase:?}"),
            };
            entered = Some((phase, reason, message));
        }
        Then::NextPass { bytes } | Then::PreCopyDone { bytes } => {
            let pc = s.pre_copy.get_or_insert_with(Default::default);
            consumed = Some(pc.snapshot.clone());
            pc.pass_bytes.push(bytes);
            s.transfer_failures = Some(0);
            s.retry_at = None;
            if matches!(then, Then::NextPass { .. }) {
                pc.pass += 1;
                pc.snapshot = snapshot_name(&uid(m), Some(pc.pass));
                let message = format!(
                    "pass {} sent {bytes} bytes; another pass to shrink the final delta",
                    pc.pass - 1
                );
                entered = Some((Phase::Snapshotting, Reason::AnotherPass, message));
            } else {
                let message = format!(
                    "pre-copy done after {} pass(es), the last sent {bytes} bytes; stopping the workload for the final delta",
                    pc.pass
                );
                entered = Some((Phase::CuttingOver, Reason::PreCopyDone, message));
            }
        }
        Then::StartCutover { replicas } => {
            let started = status::now_micro();
            s.cutover = Some(Cutover {
                step: CutoverStep::Started,
                original_replicas: replicas,
                started: started.clone(),
                final_snapshot: snapshot_name(&uid(m), None),
                scaled_up: None,
                volumes: vec![],
                original_placement: None,
                steps: vec![StepTime {
                    step: CutoverStep::Started,
                    at: started,
                }],
            });
        }
        // The downtime starts with the scale-down, not when the cutover was recorded (what
        // a rollback needs is read in between, while the workload still runs).
        Then::ScalingDown => {
            if let Some(c) = s.cutover.as_mut() {
                c.started = status::now_micro();
                for t in c
                    .steps
                    .iter_mut()
                    .filter(|t| t.step == CutoverStep::Started)
                {
                    t.at = c.started.clone();
                }
            }
            action = Action::requeue(flow::WATCHED);
        }
        Then::Step(step) => {
            if let Some(c) = s.cutover.as_mut() {
                if c.step != step {
                    info!(migration = %key(m), ?step, elapsed_ms = elapsed(&c.started.0).as_millis() as u64, "cutover step done");
                    c.steps.push(StepTime {
                        step,
                        at: status::now_micro(),
                    });
                }
                c.step = step;
                if step == CutoverStep::ScaledUp && c.scaled_up.is_none() {
                    c.scaled_up = Some(status::now_micro());
                }
            }
        }
        Then::FinalSent { bytes } => {
            if let Some(c) = s.cutover.as_mut() {
                consumed = Some(c.final_snapshot.clone());
                if c.step != CutoverStep::FinalSent {
                    c.steps.push(StepTime {
                        step: CutoverStep::FinalSent,
                        at: status::now_micro(),
                    });
                }
                c.step = CutoverStep::FinalSent;
            }
            if let Some(pc) = s.pre_copy.as_mut() {
                pc.pass_bytes.push(bytes);
            }
            s.transfer_failures = Some(0);
            s.retry_at = None;
        }
        Then::Retry { failures, after } => {
            consumed = pass_snapshot(&s, &Stage::of(&s));
            let cause = match &facts.pass {
                PassFacts::Failed(f) => f.message.clone(),
                _ => "transfer failed".into(),
            };
            warn!(migration = %key(m), failures, error = %cause, "transfer failed; retrying");
            s.transfer_failures = Some(failures);
            s.retry_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now()
                    + k8s_openapi::jiff::SignedDuration::from_millis(after.as_millis() as i64),
            ));
            s.message = Some(format!(
                "{cause}; retry {failures} of {} in {}s",
                flow::MAX_TRANSFER_FAILURES - 1,
                after.as_secs()
            ));
            action = Action::requeue(after);
        }
        Then::RollBack(reason, message) => {
            s.rollback = None;
            s.retry_at = None;
            entered = Some((Phase::RollingBack, reason, message));
        }
        Then::RollbackStep(step) => {
            s.rollback = Some(step);
        }
        Then::Succeed => {
            let c = s.cutover.clone();
            let downtime_ms = c
                .as_ref()
                .map_or(0, |c| elapsed(&c.started.0).as_millis() as u64);
            s.downtime_milliseconds = Some(downtime_ms);
            let sent: u64 = s.pre_copy.as_ref().map_or(0, |p| p.pass_bytes.iter().sum());
            let delete = m.spec.source_copy == Some(SourceCopy::Delete);
            let copy = match (&warning, delete) {
                (Some(w), true) => format!("could not be deleted ({w}); delete it by hand"),
                (Some(w), false) => format!("could not be made a read-only replica ({w})"),
                (None, true) => "is deleted".into(),
                (None, false) => "is kept as a read-only replica".into(),
            };
            let message = format!(
                "{} {} runs on {}; {} sent, downtime {:.1}s; the copy on {} {copy}",
                plan.workload.kind,
                plan.workload.name,
                plan.target,
                super::machine::human_bytes(sent),
                downtime_ms as f64 / 1000.0,
                plan.source,
            );
            let progress = s.progress.get_or_insert_with(Default::default);
            progress.bytes_sent = sent;
            progress.summary = Some(format!("done: {}", super::machine::human_bytes(sent)));
            ctx.metrics
                .downtime_seconds
                .observe(downtime_ms as f64 / 1000.0);
            entered = Some((Phase::Succeeded, Reason::Succeeded, message));
        }
        Then::Finish => {
            let reason = Reason::parse(s.reason.as_deref().unwrap_or_default());
            let cause = s.message.clone().unwrap_or_default();
            // The source may be switched off: say where the workload is, not that it runs.
            let where_ = if reason == Reason::SourceUnreachable {
                format!(
                    "The workload stays on {0} with its data: it runs there while {0} is up, and again once it is back",
                    plan.source
                )
            } else {
                format!("The workload runs on {}", plan.source)
            };
            let message = format!(
                "{}. {where_}; nothing on it was changed or deleted.",
                cause.trim_end_matches('.'),
            );
            entered = Some((flow::final_phase(reason), reason, message));
        }
    }
    if let Some(w) = &warning
        && decision.effect == Effect::Demote
    {
        status::event(
            ctx,
            m,
            EventType::Warning,
            "DemoteFailed",
            &format!("cannot make the target's copy a read-only replica again: {w}"),
        )
        .await;
    }
    let mut changed_phase = None;
    if let Some((phase, reason, message)) = &entered
        && status::enter(&mut s, m, *phase, reason.as_str(), message)
    {
        changed_phase = Some(*phase);
    }
    if s != before {
        status::write(ctx, m, &s).await?;
    }
    if let Some(snapshot) = consumed {
        ctx.transfers.forget(&uid(m), &snapshot);
    }
    if let (Some(phase), Some((_, reason, message))) = (changed_phase, &entered) {
        status::announce(ctx, m, phase, reason.as_str(), message).await;
        if phase.is_terminal() {
            finish_metrics(ctx, &s, &format!("{phase:?}"));
        }
        if phase.is_terminal() || phase == Phase::RollingBack {
            ctx.unreachable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&uid(m));
            ctx.progress_written
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&uid(m));
        }
    }
    if entered.is_some() {
        action = requeue_now();
    }
    Ok(action)
}

/// The plan in status, checked against the live objects before anything named in it is
/// snapshotted or sent ([`crate::plan::check_live`]).
async fn check_live(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    scaled_from: Option<i32>,
) -> Result<(), Error> {
    let ns = m.namespace().unwrap_or_default();
    let obs =
        crate::plan::observe::observe(&ctx.client, &ns, &ctx.config.openebs_namespace).await?;
    crate::plan::check_live(&obs, m, plan, scaled_from).map_err(|e| Error::PlanMismatch(e.message))
}

/// Maps an effect's error to a failure reason for [`flow::on_error`].
fn classify(ctx: &Ctx, e: &Error) -> Failure {
    match e {
        Error::Peer(reason, message) => Failure {
            reason: *reason,
            retryable: false,
            message: message.clone(),
        },
        Error::Zfs(ZfsError::NotFound(what)) => Failure {
            reason: Reason::VolumeNotFound,
            retryable: false,
            message: format!(
                "dataset {what} is not on {}; the plan no longer matches this machine",
                ctx.machine
            ),
        },
        Error::InvalidSpec(message) => Failure {
            reason: Reason::InvalidSpec,
            retryable: false,
            message: message.clone(),
        },
        Error::PlanMismatch(message) => Failure {
            reason: Reason::PlanMismatch,
            retryable: false,
            message: message.clone(),
        },
        e => Failure {
            reason: Reason::TransferFailed,
            retryable: true,
            message: e.to_string(),
        },
    }
}

/// Reason for a transfer failure, and whether another attempt may fix it.
fn transfer_failure(plan: &MigrationPlan, e: &TransferError) -> Failure {
    let reason = match e {
        TransferError::NoRoom { .. } => Reason::InsufficientSpace,
        TransferError::Refused { .. } => Reason::TransferRefused,
        TransferError::Base { .. } => Reason::TargetDiverged,
        TransferError::Remote { .. } => Reason::ReceiveFailed,
        _ => Reason::TransferFailed,
    };
    // A refusal that only means the target saw an older phase of the Migration (its read
    // lagged behind this agent's write) is worth another attempt.
    let stale_peer = matches!(
        e,
        TransferError::Refused {
            reason: RefusalReason::NotSending | RefusalReason::NotPlanned,
            ..
        }
    );
    Failure {
        reason,
        retryable: e.is_retryable() || stale_peer,
        message: format!("transfer to {} failed: {e}", plan.target),
    }
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

fn report_progress(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    s: &mut MigrationStatus,
    snapshot: &str,
) {
    let Some(view) = ctx.transfers.view(&uid(m), snapshot) else {
        return;
    };
    let label = match &s.cutover {
        Some(_) => "final delta".to_string(),
        None => format!("pass {}", s.pre_copy.as_ref().map_or(1, |p| p.pass)),
    };
    let sent: u64 = view.sent.iter().sum();
    let estimated: Option<u64> = view.estimated.iter().map(|e| e.filter(|&x| x > 0)).sum();
    // The rate since this agent's previous report of the same pass.
    let previous = s.progress.as_ref().filter(|p| {
        p.summary
            .as_deref()
            .is_some_and(|x| x.starts_with(&format!("{label}:")))
    });
    let last_written = ctx
        .progress_written
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&uid(m))
        .map(Instant::elapsed);
    let (rate, eta) = match (previous, last_written) {
        (Some(p), Some(dt)) => crate::api::rate_and_eta(p.bytes_sent, sent, dt, estimated),
        _ => (None, None),
    };
    let bytes = super::machine::human_bytes;
    let mut summary = match estimated {
        _ if view.waiting == plan.volumes.len() => {
            format!("{label}: waiting for a transfer slot")
        }
        Some(est) => format!(
            "{label}: {}/{} {}%",
            bytes(sent),
            bytes(est),
            (sent.saturating_mul(100) / est.max(1)).min(99)
        ),
        None => format!("{label}: {}", bytes(sent)),
    };
    if let Some(r) = rate {
        summary.push_str(&format!(", {}/s", bytes(r)));
    }
    if let Some(left) = eta {
        summary.push_str(&format!(", {left}s left"));
    }
    s.progress = Some(crate::api::Progress {
        bytes_sent: sent,
        bytes_estimated: estimated,
        bytes_per_second: rate,
        eta_seconds: eta,
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
    });
}

async fn start_pass(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    snapshot: &str,
) -> Result<(), Error> {
    let transfer = m.spec.transfer.clone().unwrap_or_default();
    let rate_limit = match &transfer.bandwidth_limit {
        Some(q) => Some(crate::api::quantity::bandwidth_limit(&q.0).map_err(Error::InvalidSpec)?),
        None => None,
    };
    let no_progress = m.spec.no_progress_timeout();
    let mut jobs = vec![];
    for v in &plan.volumes {
        jobs.push(SendJob {
            migration: migration_key(m),
            claim: v.claim.clone(),
            target_machine: plan.target.clone(),
            // Each attempt reads the key the target publishes then (see `dial_agent`).
            target_pin: None,
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
    let zfs = Arc::clone(&ctx.zfs);
    let client = ctx.client.clone();
    let send: SendFn = Arc::new(move |i, progress| {
        let (jobs, sender, client) = (Arc::clone(&jobs), Arc::clone(&sender), client.clone());
        let zfs = Arc::clone(&zfs);
        Box::pin(async move {
            let job = &jobs[i];
            let connect = || dial_agent(&client, &job.target_machine);
            let report = sender.send_with_retry(connect, job, &progress, 3).await?;
            // The target holds this snapshot now: retention keeps it as the common one. Best
            // effort (a missing mark only costs space), so not awaited: after the final pass
            // the workload is down, and a `zfs set` is tens of milliseconds on zfs-fuse.
            if let Ok(snap) = job.dataset.snapshot(&job.to) {
                let value = crate::zfs::retention::with_peer(None, &job.target_machine);
                tokio::spawn(async move {
                    if let Err(e) = zfs.set(&snap.to_string(), PROP_PEERS, &value).await {
                        warn!(%snap, error = %e, "cannot record the snapshot's peer");
                    }
                });
            }
            Ok(report)
        })
    });
    info!(migration = %key(m), snapshot, target = %plan.target, "starting transfer pass");
    let waker = ctx.wakeups.waker(m);
    ctx.transfers
        .start(&uid(m), snapshot, plan.volumes.len(), send, move || {
            waker.wake()
        });
    Ok(())
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
    source_pool: String,
    /// Mountpoints of the two pools, as the agents publish them: a local PV's path lies below.
    source_pool_mountpoint: Option<String>,
    target_pool_mountpoint: Option<String>,
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

/// The plan's two machines: read live for an effect, or as read recently for a fact.
async fn ends(ctx: &Ctx, plan: &MigrationPlan, read: Read) -> Result<Ends, Error> {
    let machine = async |name: &str| -> Result<Machine, Error> {
        if read == Read::Cached
            && let Some(m) = ctx.machines.get(name)
        {
            return Ok(m);
        }
        let m = Api::<Machine>::all(ctx.client.clone()).get(name).await?;
        ctx.machines.put(name, m.clone());
        Ok(m)
    };
    let source = machine(&plan.source).await?;
    let target = machine(&plan.target).await?;
    let pool_mountpoint = |m: &Machine| m.status.as_ref().and_then(|s| s.pool_mountpoint.clone());
    let (source_pool_mountpoint, target_pool_mountpoint) =
        (pool_mountpoint(&source), pool_mountpoint(&target));
    let (source, target) = (source.spec, target.spec);
    Ok(Ends {
        source_pool: source.pool.clone(),
        source_pool_mountpoint,
        target_pool_mountpoint,
        source_zfs_node: source.zfs_node_id().to_string(),
        target_zfs_node: target.zfs_node_id().to_string(),
        source_node: source.node_name,
        target_node: target.node_name,
        target_parent: target.parent_dataset,
        target_endpoint: target.endpoint,
    })
}

/// The PV controller re-binds a Lost claim (seen without its PV while the PV was re-created)
/// only on its periodic resync (15 s by default) or when the claim changes: touch it.
async fn touch_lost_claims(ctx: &Ctx, m: &Migration, plan: &MigrationPlan) -> Result<(), Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    for v in &plan.volumes {
        let claim = api.get(&v.claim).await?;
        if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Lost") {
            api.patch(
                &v.claim,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    "ployz.dev/rebound": k8s_openapi::jiff::Timestamp::now().to_string(),
                }}})),
            )
            .await?;
        }
    }
    Ok(())
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

/// Every recorded binding names a claim the locked workload's pods mount (bindings come from
/// status). A workload deleted meanwhile does not stop a rollback: its volumes still go back
/// to the source, each checked against its claim as `rebind` does.
async fn check_mounted(
    w: &Workload,
    bindings: &[&VolumeBinding],
    required: bool,
) -> Result<(), Error> {
    let o = match w.get().await {
        Ok(o) => o,
        Err(Error::WorkloadGone(_)) if !required => return Ok(()),
        Err(e) => return Err(e),
    };
    for b in bindings {
        if !workload_mounts(&w.reference.name, &o.template, &o.claim_templates, &b.claim) {
            return Err(Error::PlanMismatch(format!(
                "PersistentVolumeClaim {} as recorded in status is not rebound: {} {} does not mount it",
                b.claim, w.reference.kind, w.reference.name
            )));
        }
    }
    Ok(())
}

/// Points a volume at the target (cutover), or back at the source (rollback: the original
/// objects restored as recorded). The record comes from status, so it is checked first: the
/// claim's own PV, of a kind ployz moves, on the source, with a path below the source's pool;
/// the target path below the target's pool; a zfs-localpv owner on the source's pool.
async fn rebind(
    ctx: &Ctx,
    m: &Migration,
    e: &Ends,
    b: &VolumeBinding,
    to_target: bool,
) -> Result<(), Error> {
    let original: PersistentVolume = serde_json::from_str(&b.original_spec)
        .map_err(|e| Error::Other(format!("recorded PV {}: {e}", b.volume)))?;
    let ns = m.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let claim_uid = claims.get_opt(&b.claim).await?.and_then(|c| c.metadata.uid);
    let (from_node, to_node) = if to_target {
        e.nodes_of(b)
    } else {
        ("", e.nodes_of(b).0)
    };
    let untrusted = |why: String| {
        Error::PlanMismatch(format!(
            "PersistentVolume {} as recorded in status is not re-created: {why}",
            b.volume
        ))
    };
    check_recorded_pv(
        &original,
        &RecordedPv {
            volume: &b.volume,
            namespace: &ns,
            claim: &b.claim,
            claim_uid: claim_uid.as_deref(),
            node: e.nodes_of(b).0,
            pool_mountpoint: e.source_pool_mountpoint.as_deref(),
        },
    )
    .map_err(untrusted)?;
    let is_local = original.spec.as_ref().is_some_and(|s| s.local.is_some());
    if to_target && is_local {
        let path = b.target_path.as_deref().unwrap_or_default();
        let mp = e.target_pool_mountpoint.as_deref();
        if !mp.is_some_and(|mp| crate::plan::resolve::below(path, mp)) {
            return Err(untrusted(format!(
                "its target path {path:?} is not below the target pool's mountpoint {:?}",
                e.target_pool_mountpoint
            )));
        }
    }
    let to_parent = to_target.then_some(e.target_parent.as_str());
    // The ZFSVolume's owner, decided (and checked) before anything is written.
    let owner_patch = match (&b.original_zfs_volume, to_parent) {
        (None, _) => None,
        (Some(_), Some(parent)) => {
            Some(json!({"spec": {"ownerNodeID": to_node, "poolName": parent}}))
        }
        (Some(original_zv), None) => {
            let spec: serde_json::Value =
                serde_json::from_str(original_zv).map_err(|e| Error::Other(e.to_string()))?;
            check_recorded_owner(&spec, &e.source_zfs_node, &e.source_pool).map_err(untrusted)?;
            Some(
                json!({"spec": {"ownerNodeID": spec["ownerNodeID"], "poolName": spec["poolName"]}}),
            )
        }
    };
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
    if let Some(patch) = owner_patch {
        let handle = original
            .spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .map(|c| c.volume_handle.clone())
            .unwrap_or_default();
        let api: Api<ZFSVolume> =
            Api::namespaced(ctx.client.clone(), &ctx.config.openebs_namespace);
        api.patch(&handle, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    Ok(())
}

/// Promotes or demotes the target's copy of `claim`: asks the target's agent, or does it
/// here when this agent is the target's (it drives the Migration after a takeover).
async fn role_change(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    claim: &str,
    action: PeerAction,
) -> Result<Option<String>, Error> {
    let changed = if plan.target != ctx.machine {
        peer(ctx, m, plan, claim, action)
            .await
            .map_err(|e| e.to_string())
    } else {
        match plan.volumes.iter().find(|v| v.claim == claim) {
            None => Err(format!("claim {claim} is not in the plan")),
            // Computed here, as the receiver does for a peer; status only names the volume.
            Some(v) => match crate::transfer::authz::volume_dataset(&ctx.parent, &v.volume) {
                Ok(ds) if ds.as_str() == v.target_dataset => ctx
                    .server
                    .change_role(&ds, action, &claim_key(m, claim))
                    .await
                    .map(|outcome| match outcome {
                        Outcome::Promoted { mountpoint } => Some(mountpoint),
                        Outcome::Kept { dataset } => Some(dataset),
                        _ => None,
                    })
                    .map_err(|e| e.to_string()),
                Ok(ds) => Err(format!(
                    "the plan puts claim {claim} at {}; this machine keeps it at {ds}",
                    v.target_dataset
                )),
                Err(e) => Err(e),
            },
        }
    };
    changed.map_err(|e| {
        let verb = match action {
            PeerAction::Demote => "demote",
            _ => "take over",
        };
        Error::Peer(
            Reason::PromoteFailed,
            format!("{} could not {verb} {claim}: {e}", plan.target),
        )
    })
}

/// Asks the target agent to promote or demote its copy of `claim`, within
/// the connect and answer timeouts.
async fn peer(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    claim: &str,
    action: PeerAction,
) -> Result<Option<String>, TransferError> {
    let v = plan
        .volumes
        .iter()
        .find(|v| v.claim == claim)
        .ok_or_else(|| TransferError::Zfs(ZfsError::NotFound(claim.into())))?;
    let (tcp, target_pin) = dial_agent(&ctx.client, &plan.target)
        .await
        .map_err(|source| TransferError::Connect {
            machine: plan.target.clone(),
            source,
        })?;
    let job = SendJob {
        migration: migration_key(m),
        claim: claim.into(),
        target_machine: plan.target.clone(),
        target_pin: Some(target_pin),
        dataset: v.source_dataset.parse().map_err(ZfsError::from)?,
        to: String::new(),
        compression: WireCompression::None,
        rate_limit: None,
        no_progress: PEER_TIMEOUT,
    };
    ctx.sender.request(tcp, &job, action).await
}

/// The source's copy after a successful move: a read-only replica (the way back sends only
/// the delta), or destroyed. Only the planned dataset is destroyed, and only when it is what
/// the recorded PV mounted and has no child datasets.
async fn retire_source(
    ctx: &Ctx,
    m: &Migration,
    plan: &MigrationPlan,
    s: &MigrationStatus,
    copy: SourceCopy,
) -> Result<(), Error> {
    if plan.source != ctx.machine {
        return Err(Error::Other(format!(
            "the agent of {} is unreachable; its copy stays as it was until it is back",
            plan.source
        )));
    }
    // The plan comes from status: only a dataset that this Migration itself snapshotted for
    // its final pass (a name with its UID, taken only after the plan was checked against the
    // live objects) is retired.
    let final_snapshot = crate::plan::snapshot_name(&uid(m), None);
    for v in &plan.volumes {
        let ds = dataset(&v.source_dataset)?;
        let inv = ctx.zfs.inventory(&ds, &ctx.info).await?;
        let moved = inv
            .datasets
            .get(&ds)
            .is_some_and(|d| d.snapshots.iter().any(|s| s.name.short() == final_snapshot));
        if !moved {
            return Err(Error::PlanMismatch(format!(
                "{ds} has no snapshot @{final_snapshot}, so this Migration did not move it; its copy is left as it is"
            )));
        }
        match copy {
            SourceCopy::Replica => mark_replica(ctx, &ds, &key(m), &claim_key(m, &v.claim)).await?,
            SourceCopy::Delete => {
                let children: Vec<String> = inv
                    .datasets
                    .keys()
                    .filter(|d| **d != ds)
                    .map(ToString::to_string)
                    .collect();
                if !children.is_empty() {
                    return Err(Error::Other(format!(
                        "{ds} has child datasets ({}); ployz destroys only a volume's own dataset",
                        children.join(", ")
                    )));
                }
                let recorded = s
                    .cutover
                    .iter()
                    .flat_map(|c| &c.volumes)
                    .find(|b| b.claim == v.claim);
                if recorded.is_none() {
                    return Err(Error::Other(format!(
                        "no recorded binding of {}; not destroying {ds}",
                        v.claim
                    )));
                }
                ctx.zfs.destroy_dataset(&ds).await?;
                if ctx.zfs.inventory(&ds, &ctx.info).await.is_ok() {
                    return Err(Error::Other(format!(
                        "{ds} is still there after zfs destroy"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Claim `claim` of the Migration's namespace, as `ployz:claim` records it.
fn claim_key(m: &Migration, claim: &str) -> String {
    crate::zfs::claim_owner(&m.namespace().unwrap_or_default(), claim)
}

async fn mark_replica(ctx: &Ctx, ds: &DatasetName, tag: &str, claim: &str) -> Result<(), ZfsError> {
    ctx.zfs.set(ds.as_str(), PROP_REPLICA, "true").await?;
    ctx.zfs.set(ds.as_str(), PROP_MIGRATION, tag).await?;
    ctx.zfs.set(ds.as_str(), PROP_CLAIM, claim).await?;
    ctx.zfs.set(ds.as_str(), "readonly", "on").await?;
    // zfs-fuse applies readonly only at mount time; the workload is gone, so remount.
    if let Err(e) = ctx.zfs.unmount(ds).await {
        warn!(%ds, error = %e, "cannot unmount the source's copy to remount it read-only");
    }
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
            .observe(elapsed(&start.0).as_secs_f64());
    }
}

/// Drops the finalizer, on the condition that the Migration is still the version read (a
/// JSON patch that tests the list it replaces).
async fn remove_finalizer(ctx: &Ctx, m: &Migration) -> Result<(), Error> {
    let remaining: Vec<&String> = m.finalizers().iter().filter(|f| *f != FINALIZER).collect();
    if remaining.len() == m.finalizers().len() {
        return Ok(());
    }
    let api = status::api(ctx, m);
    let patch = json!({"metadata": {
        "finalizers": remaining,
        "resourceVersion": m.resource_version(),
    }});
    match api
        .patch(&m.name_any(), &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

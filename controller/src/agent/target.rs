//! The target machine's side of a Migration: admission. A new Migration to this machine is
//! planned (the same planner as `ployzctl migrate preview`), its workload locked, and handed
//! to the source machine's agent by a label; or it fails with the planner's reason.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use serde_json::json;
use tracing::warn;

use super::fresh::Read;
use super::source;
use super::status::{self, transition};
use super::workload::Workload;
use super::{Ctx, Error, FINALIZER, SOURCE_LABEL};
use crate::api::{Machine, Migration, Phase, PreCopy};
use crate::plan::{self, Reason, observe::observe};

/// Past admission this role only waits on a Migration (for the source's heartbeat to stop),
/// takes it over by a write conditional on the version it read, or drives it after a
/// takeover, confirming live before each effect: the watch cache serves (agent/fresh.rs).
pub fn only_waits(m: &Migration) -> bool {
    m.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p != Phase::Pending)
}

pub async fn reconcile(m: Arc<Migration>, ctx: Arc<Ctx>, read: Read) -> Result<Action, Error> {
    let phase = m.status.as_ref().and_then(|s| s.phase);
    if !matches!(phase, None | Some(Phase::Pending)) {
        return watch_source(m, ctx, read).await;
    }
    if m.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Admission plans and locks: only from what the API has now.
    let m = match read {
        Read::Live => m,
        Read::Cached => match super::confirm(&ctx, &m).await? {
            Some(m) => m,
            None => return Ok(Action::requeue(Duration::ZERO)),
        },
    };
    let ns = m.namespace().unwrap_or_default();
    let name = m.name_any();
    let started = std::time::Instant::now();
    let obs = observe(&ctx.client, &ns, &ctx.config.openebs_namespace).await?;
    ctx.metrics
        .observe_seconds
        .observe(started.elapsed().as_secs_f64());
    let s = m.status.clone().unwrap_or_default();
    let started = std::time::Instant::now();
    let planned = plan::plan(&obs, &m);
    ctx.metrics
        .plan_seconds
        .observe(started.elapsed().as_secs_f64());
    let planned = match planned {
        Ok(p) => p,
        // The source agent may just be starting: wait for it rather than fail.
        Err(e) if e.reason == Reason::MachineNotReady => {
            transition(&ctx, &m, s, Phase::Pending, e.reason.as_str(), &e.message).await?;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        Err(e) => {
            transition(&ctx, &m, s, Phase::Failed, e.reason.as_str(), &e.message).await?;
            return Ok(Action::await_change());
        }
    };
    let workload = Workload::new(ctx.client.clone(), &ns, planned.plan.workload.clone());
    let active = |holder: &str| {
        obs.migrations.iter().any(|x| {
            x.name_any() == holder
                && !x
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(Phase::is_terminal)
        })
    };
    if let Err(holder) = workload.lock(&name, active).await? {
        let message = format!(
            "Migration {holder} is already moving {} {}; wait for it to finish or delete it (`kubectl -n {ns} delete migration {holder}`)",
            planned.plan.workload.kind, planned.plan.workload.name
        );
        transition(
            &ctx,
            &m,
            s,
            Phase::Failed,
            Reason::DuplicateMigration.as_str(),
            &message,
        )
        .await?;
        return Ok(Action::await_change());
    }
    // The finalizer and the label first: from here on the source agent owns the Migration.
    let mut finalizers = m.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        finalizers.push(FINALIZER.into());
    }
    // Status is written on the condition of this new version.
    let m = status::api(&ctx, &m)
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {
                "labels": {SOURCE_LABEL: planned.plan.source},
                "finalizers": finalizers,
                // Only if nobody changed it since it was read (the finalizer list is replaced).
                "resourceVersion": m.resource_version(),
            }})),
        )
        .await?;
    let uid = m.uid().unwrap_or_default();
    let mut s = s;
    s.start_time = Some(status::now());
    s.pre_copy = Some(PreCopy {
        pass: 1,
        snapshot: plan::snapshot_name(&uid, Some(1)),
        pass_bytes: vec![],
    });
    let message = format!(
        "moving {} {} and {} volume(s) from {} to {}",
        planned.plan.workload.kind,
        planned.plan.workload.name,
        planned.plan.volumes.len(),
        planned.plan.source,
        planned.plan.target
    );
    s.plan = Some(planned.plan);
    status::set_condition(
        &mut s,
        "Accepted",
        "True",
        "Planned",
        &message,
        m.metadata.generation,
    );
    transition(&ctx, &m, s, Phase::Snapshotting, "Planned", &message).await?;
    Ok(Action::await_change())
}

/// A planned Migration to this machine: drives it once taken over; otherwise checks that the
/// source's agent still heart-beats, and takes the Migration over when it has not for
/// `--takeover-seconds`. The takeover is a status write conditional on the version read, so
/// a source agent that is merely slow and writes meanwhile keeps the Migration.
async fn watch_source(m: Arc<Migration>, ctx: Arc<Ctx>, read: Read) -> Result<Action, Error> {
    let s = m.status.clone().unwrap_or_default();
    let Some(plan) = s.plan.clone() else {
        return Ok(Action::await_change());
    };
    if plan.target != ctx.machine {
        return Ok(Action::await_change());
    }
    if s.phase.is_some_and(Phase::is_terminal) && super::retention::first_look(&ctx, &m) {
        super::retention::prune(&ctx, &m, &plan).await;
    }
    if s.taken_over_by.as_deref() == Some(&ctx.machine) {
        return source::drive(m, ctx, s, plan, read).await;
    }
    if s.phase.is_some_and(Phase::is_terminal) {
        return Ok(Action::await_change());
    }
    let deadline = Duration::from_secs(ctx.config.takeover_seconds);
    // Heartbeats only move forward: one already read that is recent enough proves the source
    // alive without reading its Machine again (each of its status writes wakes this role).
    let silent =
        |at: Option<k8s_openapi::jiff::Timestamp>| at.as_ref().map_or(deadline, source::elapsed);
    let known = silent(ctx.heartbeats.newest(&plan.source));
    if known < deadline {
        return Ok(Action::requeue(deadline - known + Duration::from_secs(1)));
    }
    let machines: Api<Machine> = Api::all(ctx.client.clone());
    let heartbeat = machines
        .get_opt(&plan.source)
        .await?
        .and_then(|x| x.status)
        .and_then(|x| x.heartbeat_time)
        .map(|t| t.0);
    if let Some(at) = heartbeat {
        ctx.heartbeats.saw(&plan.source, at);
    }
    let silent = silent(heartbeat);
    if silent < deadline {
        // Looked at again when the deadline could pass (or on any change).
        return Ok(Action::requeue(deadline - silent + Duration::from_secs(1)));
    }
    let mut next = s;
    next.taken_over_by = Some(ctx.machine.clone());
    status::write(&ctx, &m, &next).await?;
    let message = format!(
        "the agent of {} has not heart-beaten for {}s; {} takes the migration over",
        plan.source,
        silent.as_secs(),
        ctx.machine
    );
    warn!(migration = %status::key(&m), "{message}");
    status::event(&ctx, &m, EventType::Warning, "TakenOver", &message).await;
    Ok(Action::requeue(Duration::from_millis(50)))
}

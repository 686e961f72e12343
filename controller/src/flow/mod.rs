//! A migration's decisions, as a pure function: from the stage recorded in status and the
//! facts the executor observed (deletion, workload, pass, claims, peer, elapsed time) to the
//! one effect to perform next and what status records once it is done. No client, no ZFS, no
//! clock: `agent::source` gathers the facts, performs the effect and writes status once.
//!
//! The transition table (the README's "How a migration runs" shows it too):
//!
//! | stage                  | when                                   | effect           | then                      |
//! |------------------------|----------------------------------------|------------------|---------------------------|
//! | any in flight          | Migration deleted                      | abort transfers  | RollingBack(Cancelled)    |
//! | any in flight          | operator: cancel                       | abort transfers  | RollingBack(Cancelled)    |
//! | any in flight          | workload deleted                       | abort transfers  | RollingBack(WorkloadGone) |
//! | any in flight          | operator: abandon                      | abort transfers  | RollingBack(Abandoned)    |
//! | Snapshotting           |                                        | snapshot pass N  | Sending                   |
//! | Sending                | no pass, retry not due                 | -                | wait                      |
//! | Sending                | no pass                                | start pass N     | wait                      |
//! | Sending                | pass running, progress older than 2 s  | report progress  | wait                      |
//! | Sending                | pass running                           | -                | wait                      |
//! | Sending                | pass done, delta large and shrinking   | -                | Snapshotting pass N+1     |
//! | Sending                | pass done                              | -                | CuttingOver               |
//! | Sending, ScaledDown    | pass failed, retryable, under the cap  | -                | retry after backoff       |
//! | Sending, ScaledDown    | pass failed otherwise                  | abort transfers  | RollingBack(its reason)   |
//! | CuttingOver            | past `cutoverSeconds` (no "complete")  | abort transfers  | RollingBack(CutoverTimeout) |
//! | CuttingOver < ScaledUp | target unreachable 5 s (no "complete") | abort transfers  | RollingBack(TargetUnreachable) |
//! | taken over, < FinalSent| (the source's agent is gone)           | abort transfers  | RollingBack(SourceUnreachable) |
//! | CuttingOver (new)      |                                        | -                | record replicas: Started  |
//! | Started                | bindings not recorded                  | -                | record PV (and ZFSVolume) |
//! | Started                | pinned to the source, unrecorded       | -                | record original pinning   |
//! | Started                | replicas > 0 / pods left               | scale to 0 / -   | wait                      |
//! | Started                | no pod left                            | -                | ScaledDown                |
//! | ScaledDown             | final pass idle / running / done       | snapshot+send / progress / - | wait / wait / FinalSent |
//! | FinalSent              | bindings not recorded                  | -                | record PV (and ZFSVolume) |
//! | FinalSent              |                                        | promote target   | Promoted                  |
//! | Promoted               |                                        | rebind to target | Rebound                   |
//! | Rebound                | pinned elsewhere, original unrecorded  | -                | record original pinning   |
//! | Rebound                | pinned elsewhere                       | pin to target    | Pinned                    |
//! | Rebound                | not pinned / pinned to target          | -                | Pinned                    |
//! | Pinned                 | a claim Lost / not all Bound           | touch claims / - | wait                      |
//! | Pinned                 | Bound, a PV still on `Retain`          | restore policy   | wait                      |
//! | Pinned                 | claims Bound                           | scale up         | ScaledUp                  |
//! | ScaledUp               | all pods Ready on the target           | retire source    | Succeeded                 |
//! | ScaledUp               | past `targetReadySeconds` (no "complete") | abort transfers  | RollingBack(TargetNotReady) |
//! | RollingBack            | (entered)                              | abort transfers  | Started                   |
//! | Started                | no cutover                             | -                | Restarted                 |
//! | Started                | cut over < Pinned, or "abandon"        | -                | Stopped                   |
//! | Started                | replicas > 0 / pods left (any machine) | scale to 0 / -   | wait                      |
//! | Started                | no pod left                            | -                | Stopped                   |
//! | Stopped                |                                        | rebind to source | Rebound                   |
//! | Rebound (rollback)     | pinned to target                       | restore pinning  | wait                      |
//! | Rebound (rollback)     | a claim Lost / not all Bound           | touch claims / - | wait                      |
//! | Rebound (rollback)     | Bound, a PV still on `Retain`          | restore policy   | wait                      |
//! | Rebound (rollback)     | final delta was sent                   | demote target    | Demoted                   |
//! | Demoted                | workload exists                        | scale back       | Restarted                 |
//! | Restarted              |                                        | -                | Failed / Cancelled        |
//! | terminal               | our lock on the workload               | unlock           | -                         |
//! | terminal               | deleted                                | drop finalizer   | -                         |
//!
//! "complete" (`ployzctl migrate complete`) counts once the target holds the final delta.
//! An effect that fails is retried with backoff, except where [`on_error`] decides otherwise.

#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::api::{CutoverStep, MigrationStatus, Phase, Reason, RollbackStep, SourceCopy};

/// Consecutive failed transfer attempts before a transfer problem fails the migration.
pub const MAX_TRANSFER_FAILURES: u32 = 7;
/// How long the target may be unreachable during a cutover before the migration goes back.
pub const PEER_DEADLINE: Duration = Duration::from_secs(5);
/// How often progress is looked at while a pass runs.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long a waiting step sleeps at most: what it waits for wakes it (the pass it started
/// ends, the workload's pods or the claims change: agent/wake.rs), so this look is only a
/// fallback, and the pace of the source's probe of the target during a cutover. A deadline
/// the step checks is looked at when it passes ([`next_look`]), not up to this much later.
/// Each look reads the workload and its pods: a longer sleep means fewer API requests.
pub const WATCHED: Duration = Duration::from_secs(5);
/// The shortest sleep of a waiting step: a deadline at the edge is decided at the next look,
/// not in a loop.
const MIN_LOOK: Duration = Duration::from_millis(100);

/// Where a migration is, as its status records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Not planned yet (the target's agent admits it).
    Pending,
    Snapshotting,
    Sending,
    /// `None` until the replicas to restore are recorded.
    CuttingOver(Option<CutoverStep>),
    RollingBack {
        cause: Reason,
        step: Option<RollbackStep>,
    },
    Done(Phase),
}

impl Stage {
    pub fn of(s: &MigrationStatus) -> Stage {
        match s.phase.unwrap_or(Phase::Pending) {
            Phase::Pending => Stage::Pending,
            Phase::Snapshotting => Stage::Snapshotting,
            Phase::Sending => Stage::Sending,
            Phase::CuttingOver => Stage::CuttingOver(s.cutover.as_ref().map(|c| c.step)),
            Phase::RollingBack => Stage::RollingBack {
                cause: Reason::parse(s.reason.as_deref().unwrap_or_default()),
                step: s.rollback,
            },
            p => Stage::Done(p),
        }
    }
}

/// The workload as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkloadFacts {
    pub replicas: i32,
    /// Pods of the workload, anywhere, terminating included.
    pub pods: usize,
    /// Pods Ready on the target.
    pub ready_on_target: usize,
}

/// The transfer pass of the current snapshot, as the machine's transfer tasks know it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PassFacts {
    /// Not running (never started, or its result already recorded, or the agent restarted).
    #[default]
    Idle,
    Running,
    /// Finished; total stream bytes.
    Done(u64),
    Failed(Failure),
}

/// A classified failure, as the executor maps it from the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    /// Worth another attempt (the link or the peer may be at fault).
    pub retryable: bool,
    pub message: String,
}

/// The workload's claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Claims {
    #[default]
    Bound,
    /// Bound, but a PV still has the `Retain` policy it was re-created with.
    Retained,
    /// Seen without its PV while it was re-created; the PV controller needs a nudge.
    Lost,
    Pending,
}

/// Where the pod template's node pinning points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pinning {
    /// No nodeName/nodeSelector pinning to change.
    #[default]
    None,
    Source,
    Target,
}

/// The operator's word on a Migration in flight (`ployzctl migrate cancel|abandon|complete`,
/// the `ployz.dev/resolve` annotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Stop and go back to the source, as deleting the Migration does, but keep the
    /// Migration (it ends Cancelled) as the record of what happened.
    Cancel,
    /// End it with the workload on the source. The operator vouches that no pod of the
    /// workload runs on the target (its machine is off), so a rollback stops waiting for them.
    Abandon,
    /// Finish on the target, however long it takes: the cutover no longer rolls back on a
    /// timeout or an unreachable target once the target holds the final delta.
    Complete,
}

/// What the executor observed, right before deciding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    /// Deletion was requested (the finalizer holds the object).
    pub deleting: bool,
    /// The ployz finalizer is on the object.
    pub finalizer: bool,
    /// `None` when the workload was deleted.
    pub workload: Option<WorkloadFacts>,
    /// The workload's lock annotation names this Migration.
    pub locked_by_us: bool,
    pub pass: PassFacts,
    pub claims: Claims,
    pub pinning: Pinning,
    /// How long the target has been unreachable (`None`: it answers, or was not asked).
    pub target_unreachable_for: Option<Duration>,
    /// Since the cutover started (the scale-down).
    pub since_cutover: Option<Duration>,
    /// Since the workload was scaled up on the target.
    pub since_scale_up: Option<Duration>,
    /// Time left before a failed transfer may be retried.
    pub retry_in: Option<Duration>,
    /// Since this agent last wrote the pass's progress (`None`: not in this run).
    pub since_progress: Option<Duration>,
    pub resolve: Option<Resolve>,
}

/// Limits from the spec and the agent's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub cutover: Duration,
    pub target_ready: Duration,
    pub precopy_threshold: u64,
    pub precopy_passes: u32,
    pub source_copy: SourceCopy,
}

/// The one side effect of a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Nothing,
    /// Stop this Migration's transfer tasks.
    AbortTransfers,
    /// Snapshot every volume as the current pre-copy pass's snapshot.
    Snapshot,
    /// Start sending the current pre-copy pass.
    StartPass,
    /// Snapshot every volume as the final snapshot and start sending it.
    StartFinalPass,
    /// Write the running pass's counters into status.
    ReportProgress,
    Scale(i32),
    /// Record every volume's PV (and ZFSVolume) as bound on the source.
    RecordBindings,
    /// The target makes its copy the live volume.
    Promote,
    RebindToTarget,
    /// Record the pod template's node pinning before it changes.
    RecordPinning,
    PinToTarget,
    /// Nudge Lost claims so the PV controller binds them now.
    TouchClaims,
    /// Give re-created PVs back their recorded reclaim policy.
    RestoreReclaimPolicy,
    /// Keep the source's copy as a read-only replica, or destroy it.
    RetireSource(SourceCopy),
    RebindToSource,
    RestorePinning,
    /// The target's copy becomes a read-only replica again.
    Demote,
    /// Release the workload's lock.
    Unlock,
    RemoveFinalizer,
}

impl Effect {
    /// Changes something outside this Migration's status (ZFS, a workload, a PV, a peer, a
    /// transfer): decided only from a Migration read live (agent/fresh.rs).
    pub fn acts(&self) -> bool {
        !matches!(self, Effect::Nothing | Effect::ReportProgress)
    }
}

/// What status records after the effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Then {
    /// Nothing changes; look again after this long (`None`: on the next change only).
    Wait(Option<Duration>),
    /// Enter a pre-copy or cutover phase.
    Enter(Phase, Reason),
    /// Snapshot the next pre-copy pass.
    NextPass {
        bytes: u64,
    },
    /// The pre-copy is over.
    PreCopyDone {
        bytes: u64,
    },
    /// Record the cutover's start with the replicas to restore.
    StartCutover {
        replicas: i32,
    },
    Step(CutoverStep),
    /// The scale-down is written: the downtime starts now; look again after `WATCHED`.
    ScalingDown,
    /// The final pass is done.
    FinalSent {
        bytes: u64,
    },
    /// Schedule another attempt of the failed pass.
    Retry {
        failures: u32,
        after: Duration,
    },
    RollBack(Reason, String),
    RollbackStep(RollbackStep),
    Succeed,
    /// A rollback's end: Failed, or Cancelled.
    Finish,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub effect: Effect,
    pub then: Then,
}

fn d(effect: Effect, then: Then) -> Decision {
    Decision { effect, then }
}

fn wait(after: Duration) -> Decision {
    d(Effect::Nothing, Then::Wait(Some(after)))
}

/// When a watched wait looks again: at the first of what is `left` of its deadlines, and
/// after [`WATCHED`] at the latest.
fn next_look(left: impl IntoIterator<Item = Option<Duration>>) -> Duration {
    left.into_iter()
        .flatten()
        .fold(WATCHED, Duration::min)
        .max(MIN_LOOK)
}

fn roll_back(reason: Reason, message: impl Into<String>) -> Decision {
    d(
        Effect::AbortTransfers,
        Then::RollBack(reason, message.into()),
    )
}

/// `Kind name` of the planned workload, for messages.
fn workload_of(s: &MigrationStatus) -> String {
    s.plan.as_ref().map_or_else(
        || "the workload".into(),
        |p| format!("{} {}", p.workload.kind, p.workload.name),
    )
}

/// The planned source machine, for messages.
fn source_of(s: &MigrationStatus) -> String {
    s.plan.as_ref().map_or_else(
        || "the source machine".into(),
        |p| format!("machine {}", p.source),
    )
}

/// The planned target machine, for messages.
fn target_of(s: &MigrationStatus) -> String {
    s.plan.as_ref().map_or_else(
        || "the target machine".into(),
        |p| format!("machine {}", p.target),
    )
}

/// Retry delay after `failures` consecutive failed passes: 2 s doubling, to a minute.
pub fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(2u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(60))
}

/// The next effect and what follows it.
pub fn decide(s: &MigrationStatus, f: &Facts, l: &Limits) -> Decision {
    let stage = Stage::of(s);
    match &stage {
        Stage::Pending => d(Effect::Nothing, Then::Wait(None)),
        Stage::Done(_) => finished(f),
        Stage::RollingBack { step, .. } => rolling_back(s, *step, f),
        Stage::Snapshotting | Stage::Sending | Stage::CuttingOver(_) => {
            if f.deleting {
                return roll_back(
                    Reason::Cancelled,
                    "the Migration was deleted in flight; moving the workload back to the source",
                );
            }
            if f.resolve == Some(Resolve::Cancel) {
                return roll_back(
                    Reason::Cancelled,
                    "cancelled by the operator (ployzctl migrate cancel); moving the workload back to the source",
                );
            }
            let Some(w) = f.workload else {
                return roll_back(
                    Reason::WorkloadGone,
                    "the workload was deleted during the migration",
                );
            };
            if f.resolve == Some(Resolve::Abandon) {
                return roll_back(
                    Reason::Abandoned,
                    "abandoned by the operator (ployzctl migrate abandon); moving the workload back to the source",
                );
            }
            // Taken over by the target: without the source, only a complete copy on the
            // target (the final delta received) can go forward.
            let complete_on_target =
                matches!(stage, Stage::CuttingOver(Some(step)) if step >= CutoverStep::FinalSent);
            if s.taken_over_by.is_some() && !complete_on_target {
                return roll_back(
                    Reason::SourceUnreachable,
                    format!(
                        "the agent of {} stopped heart-beating before {} had a complete copy; the target's agent took the migration over and leaves the workload where its data is",
                        source_of(s),
                        target_of(s)
                    ),
                );
            }
            match stage {
                Stage::Snapshotting => d(
                    Effect::Snapshot,
                    Then::Enter(Phase::Sending, Reason::Snapshotted),
                ),
                Stage::CuttingOver(step) => cutting_over(s, step, w, f, l),
                _ => sending(s, f, l),
            }
        }
    }
}

fn finished(f: &Facts) -> Decision {
    if f.locked_by_us {
        // The unlock changes the workload, not the Migration: look again for the finalizer.
        d(Effect::Unlock, Then::Wait(Some(Duration::ZERO)))
    } else if f.deleting && f.finalizer {
        d(Effect::RemoveFinalizer, Then::Wait(None))
    } else {
        d(Effect::Nothing, Then::Wait(None))
    }
}

fn sending(s: &MigrationStatus, f: &Facts, l: &Limits) -> Decision {
    match &f.pass {
        PassFacts::Idle => match f.retry_in {
            Some(left) if !left.is_zero() => wait(left),
            _ => d(Effect::StartPass, Then::Wait(Some(PROGRESS_EVERY))),
        },
        PassFacts::Running => report_progress(f, PROGRESS_EVERY),
        PassFacts::Failed(e) => pass_failed(s, e),
        PassFacts::Done(bytes) => {
            let mut passes = s
                .pre_copy
                .as_ref()
                .map(|p| p.pass_bytes.clone())
                .unwrap_or_default();
            passes.push(*bytes);
            let then = if crate::plan::another_pass(&passes, l.precopy_threshold, l.precopy_passes)
            {
                Then::NextPass { bytes: *bytes }
            } else {
                Then::PreCopyDone { bytes: *bytes }
            };
            d(Effect::Nothing, then)
        }
    }
}

/// Progress goes to status at most every [`PROGRESS_EVERY`]: each write is a change that
/// triggers the next reconcile at once, which must not write again.
fn report_progress(f: &Facts, poll: Duration) -> Decision {
    match f.since_progress {
        Some(t) if t < PROGRESS_EVERY => wait((PROGRESS_EVERY - t).min(poll)),
        _ => d(Effect::ReportProgress, Then::Wait(Some(poll))),
    }
}

/// A failed pass is retried (paced by the backoff) while the link may be at fault.
fn pass_failed(s: &MigrationStatus, e: &Failure) -> Decision {
    let failures = s.transfer_failures.unwrap_or(0) + 1;
    if e.retryable && failures < MAX_TRANSFER_FAILURES {
        return d(
            Effect::Nothing,
            Then::Retry {
                failures,
                after: retry_delay(failures),
            },
        );
    }
    roll_back(e.reason, e.message.clone())
}

fn cutting_over(
    s: &MigrationStatus,
    step: Option<CutoverStep>,
    w: WorkloadFacts,
    f: &Facts,
    l: &Limits,
) -> Decision {
    let Some(step) = step else {
        return d(
            Effect::Nothing,
            Then::StartCutover {
                replicas: w.replicas,
            },
        );
    };
    // The operator chose to finish on the target whatever it takes.
    let forward = f.resolve == Some(Resolve::Complete) && step >= CutoverStep::FinalSent;
    if !forward && f.since_cutover.is_some_and(|t| t > l.cutover) {
        return roll_back(
            Reason::CutoverTimeout,
            format!(
                "the cutover took longer than {}s (at step {step:?}); moving the workload back to the source",
                l.cutover.as_secs()
            ),
        );
    }
    // Until the workload is started on the target, going back loses nothing: the source's
    // copy is complete and nothing has written to the target's.
    if !forward
        && step < CutoverStep::ScaledUp
        && f.target_unreachable_for.is_some_and(|t| t >= PEER_DEADLINE)
    {
        return roll_back(
            Reason::TargetUnreachable,
            format!(
                "{} stopped answering during the cutover (at step {step:?}) for {}s; moving the workload back to the source",
                target_of(s),
                PEER_DEADLINE.as_secs()
            ),
        );
    }
    // The deadlines checked above and at ScaledUp, so that a wait looks again when they pass.
    let look = next_look(
        [
            (!forward).then(|| f.since_cutover.map(|t| l.cutover.saturating_sub(t))),
            (!forward && step < CutoverStep::ScaledUp).then(|| {
                f.target_unreachable_for
                    .map(|t| PEER_DEADLINE.saturating_sub(t))
            }),
            (!forward && step == CutoverStep::ScaledUp)
                .then(|| f.since_scale_up.map(|t| l.target_ready.saturating_sub(t))),
        ]
        .map(Option::flatten),
    );
    let replicas = s.cutover.as_ref().map_or(0, |c| c.original_replicas);
    let bindings_recorded = s.cutover.as_ref().is_some_and(|c| !c.volumes.is_empty());
    let pinning_recorded = s
        .cutover
        .as_ref()
        .is_some_and(|c| c.original_placement.is_some());
    match step {
        // What the cutover may have to undo is read before the workload stops, so that the
        // downtime does not pay for it: the PVs as bound on the source, the original pinning.
        CutoverStep::Started if !bindings_recorded => {
            d(Effect::RecordBindings, Then::Step(CutoverStep::Started))
        }
        CutoverStep::Started if f.pinning == Pinning::Source && !pinning_recorded => {
            d(Effect::RecordPinning, Then::Step(CutoverStep::Started))
        }
        CutoverStep::Started if w.replicas != 0 => d(Effect::Scale(0), Then::ScalingDown),
        CutoverStep::Started if w.pods > 0 => wait(look),
        CutoverStep::Started => d(Effect::Nothing, Then::Step(CutoverStep::ScaledDown)),
        CutoverStep::ScaledDown => match &f.pass {
            PassFacts::Idle => match f.retry_in {
                Some(left) if !left.is_zero() => wait(left),
                _ => d(Effect::StartFinalPass, Then::Wait(Some(look))),
            },
            PassFacts::Running => report_progress(f, look.min(PROGRESS_EVERY)),
            PassFacts::Done(bytes) => d(Effect::Nothing, Then::FinalSent { bytes: *bytes }),
            PassFacts::Failed(e) => pass_failed(s, e),
        },
        // A cutover recorded by an agent that did not record them before the scale-down.
        CutoverStep::FinalSent if !bindings_recorded => {
            d(Effect::RecordBindings, Then::Step(CutoverStep::FinalSent))
        }
        CutoverStep::FinalSent => d(Effect::Promote, Then::Step(CutoverStep::Promoted)),
        CutoverStep::Promoted => d(Effect::RebindToTarget, Then::Step(CutoverStep::Rebound)),
        CutoverStep::Rebound => match f.pinning {
            Pinning::Source if !pinning_recorded => {
                d(Effect::RecordPinning, Then::Step(CutoverStep::Rebound))
            }
            Pinning::Source => d(Effect::PinToTarget, Then::Step(CutoverStep::Pinned)),
            Pinning::None | Pinning::Target => d(Effect::Nothing, Then::Step(CutoverStep::Pinned)),
        },
        // A pod created while its claim is still re-binding is unschedulable and waits out
        // the scheduler's backoff: start it once every claim is Bound again.
        CutoverStep::Pinned => match f.claims {
            Claims::Retained => d(
                Effect::RestoreReclaimPolicy,
                Then::Wait(Some(Duration::ZERO)),
            ),
            Claims::Lost => d(Effect::TouchClaims, Then::Wait(Some(look))),
            Claims::Pending => wait(look),
            Claims::Bound => d(Effect::Scale(replicas), Then::Step(CutoverStep::ScaledUp)),
        },
        CutoverStep::ScaledUp => {
            let want = replicas.max(0) as usize;
            if w.ready_on_target >= want && w.pods == w.ready_on_target {
                return d(Effect::RetireSource(l.source_copy), Then::Succeed);
            }
            if !forward && f.since_scale_up.is_some_and(|t| t > l.target_ready) {
                return roll_back(
                    Reason::TargetNotReady,
                    format!(
                        "{} of {want} pod(s) of {} became Ready on {} within {}s; stopping them and moving the workload back to the source (see `kubectl describe pod` on the target for why)",
                        w.ready_on_target,
                        workload_of(s),
                        target_of(s),
                        l.target_ready.as_secs()
                    ),
                );
            }
            wait(look)
        }
    }
}

fn rolling_back(s: &MigrationStatus, step: Option<RollbackStep>, f: &Facts) -> Decision {
    let Some(step) = step else {
        return d(
            Effect::AbortTransfers,
            Then::RollbackStep(RollbackStep::Started),
        );
    };
    let Some(c) = &s.cutover else {
        // Before the cutover the workload was never stopped and nothing was rebound.
        return d(Effect::Nothing, Then::Finish);
    };
    match step {
        // Once the workload may have been started on the target, stop every pod first, on
        // whichever machine: a copy on the target must not run beside the one about to start
        // on the source. Before that, only the source's pods were ever scaled down (and may
        // hang on a dead source node): nothing to wait for.
        RollbackStep::Started
            if c.step >= CutoverStep::Pinned && f.resolve != Some(Resolve::Abandon) =>
        {
            match f.workload {
                Some(w) if w.replicas != 0 => d(Effect::Scale(0), Then::Wait(Some(WATCHED))),
                Some(w) if w.pods > 0 => wait(WATCHED),
                _ => d(Effect::Nothing, Then::RollbackStep(RollbackStep::Stopped)),
            }
        }
        RollbackStep::Started => d(Effect::Nothing, Then::RollbackStep(RollbackStep::Stopped)),
        RollbackStep::Stopped => {
            if c.volumes.is_empty() {
                d(Effect::Nothing, Then::RollbackStep(RollbackStep::Rebound))
            } else {
                d(
                    Effect::RebindToSource,
                    Then::RollbackStep(RollbackStep::Rebound),
                )
            }
        }
        RollbackStep::Rebound => {
            if c.original_placement.is_some() && f.pinning == Pinning::Target {
                return d(Effect::RestorePinning, Then::Wait(Some(Duration::ZERO)));
            }
            match f.claims {
                Claims::Retained => d(
                    Effect::RestoreReclaimPolicy,
                    Then::Wait(Some(Duration::ZERO)),
                ),
                Claims::Lost => d(Effect::TouchClaims, Then::Wait(Some(WATCHED))),
                Claims::Pending => wait(WATCHED),
                Claims::Bound if c.step >= CutoverStep::FinalSent => {
                    d(Effect::Demote, Then::RollbackStep(RollbackStep::Demoted))
                }
                Claims::Bound => d(Effect::Nothing, Then::RollbackStep(RollbackStep::Demoted)),
            }
        }
        RollbackStep::Demoted => match f.workload {
            Some(_) => d(
                Effect::Scale(c.original_replicas),
                Then::RollbackStep(RollbackStep::Restarted),
            ),
            None => d(Effect::Nothing, Then::RollbackStep(RollbackStep::Restarted)),
        },
        RollbackStep::Restarted => d(Effect::Nothing, Then::Finish),
    }
}

/// The phase a rollback ends in: Cancelled when the user asked for it, Failed otherwise.
pub fn final_phase(cause: Reason) -> Phase {
    if cause == Reason::Cancelled {
        Phase::Cancelled
    } else {
        Phase::Failed
    }
}

/// What follows an effect that failed with `failure`: `None` retries the reconcile with
/// backoff (the default: every effect is idempotent).
pub fn on_error(stage: &Stage, effect: &Effect, failure: &Failure) -> Option<Then> {
    match (stage, effect) {
        // A rollback never gives up: it ends with the workload on the source.
        (Stage::RollingBack { .. }, Effect::Demote) => {
            Some(Then::RollbackStep(RollbackStep::Demoted))
        }
        (Stage::RollingBack { .. }, _) => None,
        // The workload already runs on the target; the source's copy is not in the way.
        (_, Effect::RetireSource(_)) => Some(Then::Succeed),
        (Stage::Snapshotting, Effect::Snapshot) | (_, Effect::Promote) if !failure.retryable => {
            Some(Then::RollBack(failure.reason, failure.message.clone()))
        }
        (_, Effect::StartPass | Effect::StartFinalPass) if !failure.retryable => {
            Some(Then::RollBack(failure.reason, failure.message.clone()))
        }
        _ => None,
    }
}

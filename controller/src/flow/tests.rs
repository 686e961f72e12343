//! One test per rule of the transition table and per reason a move can end with.

use std::time::Duration;

use super::*;
use crate::api::{Cutover, PreCopy, VolumeBinding};

const LIMITS: Limits = Limits {
    cutover: Duration::from_secs(600),
    target_ready: Duration::from_secs(300),
    precopy_threshold: 1000,
    precopy_passes: 5,
    source_copy: SourceCopy::Replica,
};

fn status(phase: Phase) -> MigrationStatus {
    MigrationStatus {
        phase: Some(phase),
        pre_copy: Some(PreCopy {
            pass: 1,
            snapshot: "ployz-x-1".into(),
            pass_bytes: vec![],
        }),
        ..Default::default()
    }
}

fn cutover(step: CutoverStep) -> MigrationStatus {
    let mut s = status(Phase::CuttingOver);
    s.cutover = Some(Cutover {
        step,
        original_replicas: 2,
        started: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ),
        final_snapshot: "ployz-x-final".into(),
        volumes: vec![VolumeBinding {
            claim: "data".into(),
            volume: "pv".into(),
            original_spec: "{}".into(),
            original_zfs_volume: None,
            target_path: None,
        }],
        scaled_up: None,
        original_placement: None,
        steps: vec![],
    });
    s
}

fn rolling_back(
    cause: Reason,
    step: Option<RollbackStep>,
    at: Option<CutoverStep>,
) -> MigrationStatus {
    let mut s = match at {
        Some(step) => cutover(step),
        None => status(Phase::Sending),
    };
    s.phase = Some(Phase::RollingBack);
    s.reason = Some(cause.as_str().into());
    s.rollback = step;
    s
}

/// A running workload of two replicas, nothing unusual.
fn facts() -> Facts {
    Facts {
        workload: Some(WorkloadFacts {
            replicas: 2,
            pods: 2,
            ready_on_target: 0,
        }),
        finalizer: true,
        locked_by_us: true,
        ..Facts::default()
    }
}

fn stopped() -> Facts {
    Facts {
        workload: Some(WorkloadFacts::default()),
        ..facts()
    }
}

fn failure(reason: Reason, retryable: bool) -> Failure {
    Failure {
        reason,
        retryable,
        message: format!("{reason} happened"),
    }
}

fn decide_(s: &MigrationStatus, f: &Facts) -> Decision {
    decide(s, f, &LIMITS)
}

fn rolled_back_with(decision: &Decision) -> Option<Reason> {
    match &decision.then {
        Then::RollBack(r, _) => Some(*r),
        _ => None,
    }
}

const IN_FLIGHT: [CutoverStep; 7] = [
    CutoverStep::Started,
    CutoverStep::ScaledDown,
    CutoverStep::FinalSent,
    CutoverStep::Promoted,
    CutoverStep::Rebound,
    CutoverStep::Pinned,
    CutoverStep::ScaledUp,
];

fn every_stage_in_flight() -> Vec<MigrationStatus> {
    let mut all = vec![status(Phase::Snapshotting), status(Phase::Sending)];
    all.extend(IN_FLIGHT.map(cutover));
    all
}

#[test]
fn deleting_in_flight_rolls_back_as_cancelled_and_stops_transfers() {
    for s in every_stage_in_flight() {
        let d = decide_(
            &s,
            &Facts {
                deleting: true,
                ..facts()
            },
        );
        assert_eq!(d.effect, Effect::AbortTransfers, "{:?}", s.phase);
        assert_eq!(rolled_back_with(&d), Some(Reason::Cancelled));
    }
}

#[test]
fn cancel_in_flight_rolls_back_as_cancelled_at_every_stage() {
    for s in every_stage_in_flight() {
        let d = decide_(
            &s,
            &Facts {
                resolve: Some(Resolve::Cancel),
                ..facts()
            },
        );
        assert_eq!(d.effect, Effect::AbortTransfers, "{:?}", s.phase);
        assert_eq!(rolled_back_with(&d), Some(Reason::Cancelled), "{:?}", s);
    }
    // A cancel recorded during a rollback changes nothing: the rollback goes on.
    let mut back = cutover(CutoverStep::ScaledDown);
    back.phase = Some(Phase::RollingBack);
    back.reason = Some(Reason::TargetNotReady.as_str().into());
    let cancelled = decide_(
        &back,
        &Facts {
            resolve: Some(Resolve::Cancel),
            ..facts()
        },
    );
    assert_eq!(cancelled, decide_(&back, &facts()));
}

#[test]
fn a_workload_deleted_in_flight_rolls_back_as_workload_gone() {
    for s in every_stage_in_flight() {
        let d = decide_(
            &s,
            &Facts {
                workload: None,
                ..facts()
            },
        );
        assert_eq!(rolled_back_with(&d), Some(Reason::WorkloadGone));
    }
}

#[test]
fn snapshotting_takes_the_pass_snapshot_then_sends() {
    let d = decide_(&status(Phase::Snapshotting), &facts());
    assert_eq!(
        d,
        Decision {
            effect: Effect::Snapshot,
            then: Then::Enter(Phase::Sending, Reason::Snapshotted)
        }
    );
}

#[test]
fn an_idle_pass_is_started_and_a_running_one_reports_progress() {
    let s = status(Phase::Sending);
    assert_eq!(decide_(&s, &facts()).effect, Effect::StartPass);
    let running = Facts {
        pass: PassFacts::Running,
        ..facts()
    };
    assert_eq!(
        decide_(&s, &running),
        Decision {
            effect: Effect::ReportProgress,
            then: Then::Wait(Some(PROGRESS_EVERY))
        }
    );
}

#[test]
fn progress_is_written_at_most_every_two_seconds() {
    // The write itself triggers the next reconcile at once: it must not write again.
    let s = status(Phase::Sending);
    let just_written = Facts {
        pass: PassFacts::Running,
        since_progress: Some(Duration::from_millis(500)),
        ..facts()
    };
    assert_eq!(
        decide_(&s, &just_written),
        wait(Duration::from_millis(1500))
    );
    let due = Facts {
        since_progress: Some(PROGRESS_EVERY),
        ..just_written.clone()
    };
    assert_eq!(decide_(&s, &due).effect, Effect::ReportProgress);
    // The final pass's end wakes its step; the look before it is the next progress report.
    let final_pass = cutover(CutoverStep::ScaledDown);
    assert_eq!(
        decide_(&final_pass, &just_written),
        wait(Duration::from_millis(1500))
    );
}

#[test]
fn a_watched_wait_looks_again_when_a_deadline_passes_not_later() {
    // Nothing due: the watches wake the step; the look is the fallback.
    let waiting = Facts {
        since_cutover: Some(Duration::from_secs(1)),
        ..facts()
    };
    let mut started = cutover(CutoverStep::Started);
    if let Some(c) = started.cutover.as_mut() {
        c.original_placement = Some("{}".into());
    }
    let stopping = Facts {
        workload: Some(WorkloadFacts {
            replicas: 0,
            pods: 1,
            ready_on_target: 0,
        }),
        ..waiting.clone()
    };
    assert_eq!(decide_(&started, &stopping), wait(WATCHED));
    // The cutover's deadline in 2 s.
    let late = Facts {
        since_cutover: Some(LIMITS.cutover - Duration::from_secs(2)),
        ..stopping.clone()
    };
    assert_eq!(decide_(&started, &late), wait(Duration::from_secs(2)));
    // The target unreachable for 4 s: the peer deadline in 1 s.
    let silent = Facts {
        target_unreachable_for: Some(PEER_DEADLINE - Duration::from_secs(1)),
        ..stopping.clone()
    };
    assert_eq!(decide_(&started, &silent), wait(Duration::from_secs(1)));
    // Started on the target: readiness has its own deadline; the peer's no longer counts.
    let scaled_up = cutover(CutoverStep::ScaledUp);
    let not_ready = Facts {
        since_scale_up: Some(LIMITS.target_ready - Duration::from_millis(300)),
        ..silent.clone()
    };
    assert_eq!(
        decide_(&scaled_up, &not_ready),
        wait(Duration::from_millis(300))
    );
    // A deadline at its edge: looked at again shortly, never in a loop.
    let edge = Facts {
        since_scale_up: Some(LIMITS.target_ready),
        ..not_ready
    };
    assert_eq!(decide_(&scaled_up, &edge), wait(MIN_LOOK));
}

#[test]
fn a_retry_waits_for_its_backoff_not_for_the_next_event() {
    let s = status(Phase::Sending);
    let early = Facts {
        retry_in: Some(Duration::from_secs(7)),
        ..facts()
    };
    assert_eq!(
        decide_(&s, &early),
        d(Effect::Nothing, Then::Wait(Some(Duration::from_secs(7))))
    );
    let due = Facts {
        retry_in: Some(Duration::ZERO),
        ..facts()
    };
    assert_eq!(decide_(&s, &due).effect, Effect::StartPass);
}

#[test]
fn a_large_shrinking_delta_takes_another_pass() {
    let mut s = status(Phase::Sending);
    s.pre_copy = Some(PreCopy {
        pass_bytes: vec![1_000_000],
        ..PreCopy::default()
    });
    let done = Facts {
        pass: PassFacts::Done(5000),
        ..facts()
    };
    assert_eq!(decide_(&s, &done).then, Then::NextPass { bytes: 5000 });
}

#[test]
fn a_small_or_growing_delta_ends_the_pre_copy() {
    let s = status(Phase::Sending);
    let small = Facts {
        pass: PassFacts::Done(10),
        ..facts()
    };
    assert_eq!(decide_(&s, &small).then, Then::PreCopyDone { bytes: 10 });
    let mut s = status(Phase::Sending);
    s.pre_copy = Some(PreCopy {
        pass_bytes: vec![5000],
        ..PreCopy::default()
    });
    let growing = Facts {
        pass: PassFacts::Done(6000),
        ..facts()
    };
    assert_eq!(
        decide_(&s, &growing).then,
        Then::PreCopyDone { bytes: 6000 }
    );
}

#[test]
fn a_retryable_transfer_failure_is_retried_with_growing_delay_up_to_the_cap() {
    let mut s = status(Phase::Sending);
    let failed = Facts {
        pass: PassFacts::Failed(failure(Reason::TransferFailed, true)),
        ..facts()
    };
    let mut delays = vec![];
    for n in 0..MAX_TRANSFER_FAILURES - 1 {
        s.transfer_failures = Some(n);
        match decide_(&s, &failed).then {
            Then::Retry { failures, after } => {
                assert_eq!(failures, n + 1);
                delays.push(after);
            }
            other => panic!("attempt {n}: {other:?}"),
        }
    }
    assert!(delays.windows(2).all(|w| w[0] < w[1]), "{delays:?}");
    s.transfer_failures = Some(MAX_TRANSFER_FAILURES - 1);
    assert_eq!(
        rolled_back_with(&decide_(&s, &failed)),
        Some(Reason::TransferFailed)
    );
}

#[test]
fn retry_delays_are_capped_at_a_minute() {
    assert_eq!(retry_delay(1), Duration::from_secs(2));
    assert_eq!(retry_delay(100), Duration::from_secs(60));
}

#[test]
fn a_final_transfer_failure_rolls_back_with_its_reason() {
    for reason in [
        Reason::InsufficientSpace,
        Reason::TransferRefused,
        Reason::TargetDiverged,
        Reason::ReceiveFailed,
        Reason::TransferFailed,
    ] {
        let failed = Facts {
            pass: PassFacts::Failed(failure(reason, false)),
            ..facts()
        };
        for s in [status(Phase::Sending), cutover(CutoverStep::ScaledDown)] {
            let d = decide_(&s, &failed);
            assert_eq!(d.effect, Effect::AbortTransfers);
            assert_eq!(rolled_back_with(&d), Some(reason));
        }
    }
}

#[test]
fn the_cutover_records_the_replicas_before_stopping_anything() {
    let mut s = status(Phase::CuttingOver);
    s.cutover = None;
    assert_eq!(
        decide_(&s, &facts()),
        d(Effect::Nothing, Then::StartCutover { replicas: 2 })
    );
}

#[test]
fn the_cutover_scales_to_zero_then_waits_for_every_pod_to_go() {
    let s = cutover(CutoverStep::Started);
    // The downtime clock starts with the scale-down write.
    assert_eq!(
        decide_(&s, &facts()),
        d(Effect::Scale(0), Then::ScalingDown)
    );
    let terminating = Facts {
        workload: Some(WorkloadFacts {
            replicas: 0,
            pods: 1,
            ready_on_target: 0,
        }),
        ..facts()
    };
    assert_eq!(decide_(&s, &terminating), wait(WATCHED));
    assert_eq!(
        decide_(&s, &stopped()).then,
        Then::Step(CutoverStep::ScaledDown)
    );
}

#[test]
fn a_timeout_at_any_cutover_step_rolls_back() {
    let late = Facts {
        since_cutover: Some(LIMITS.cutover + Duration::from_secs(1)),
        ..stopped()
    };
    for step in IN_FLIGHT {
        assert_eq!(
            rolled_back_with(&decide_(&cutover(step), &late)),
            Some(Reason::CutoverTimeout),
            "{step:?}"
        );
    }
}

#[test]
fn an_unreachable_target_before_the_scale_up_rolls_back_within_seconds() {
    let gone = Facts {
        target_unreachable_for: Some(PEER_DEADLINE),
        ..stopped()
    };
    for step in &IN_FLIGHT[..6] {
        assert_eq!(
            rolled_back_with(&decide_(&cutover(*step), &gone)),
            Some(Reason::TargetUnreachable),
            "{step:?}"
        );
    }
    // A blip shorter than the deadline changes nothing.
    let blip = Facts {
        target_unreachable_for: Some(PEER_DEADLINE / 2),
        ..stopped()
    };
    assert_eq!(
        decide_(&cutover(CutoverStep::Promoted), &blip).effect,
        Effect::RebindToTarget
    );
    // Once started on the target, the workload's data lives there: no blind way back.
    assert_ne!(
        rolled_back_with(&decide_(&cutover(CutoverStep::ScaledUp), &gone)),
        Some(Reason::TargetUnreachable)
    );
}

#[test]
fn the_final_pass_is_snapshotted_sent_and_recorded() {
    let s = cutover(CutoverStep::ScaledDown);
    assert_eq!(decide_(&s, &stopped()).effect, Effect::StartFinalPass);
    let running = Facts {
        pass: PassFacts::Running,
        ..stopped()
    };
    assert_eq!(decide_(&s, &running).effect, Effect::ReportProgress);
    let done = Facts {
        pass: PassFacts::Done(42),
        ..stopped()
    };
    assert_eq!(decide_(&s, &done).then, Then::FinalSent { bytes: 42 });
    let retrying = Facts {
        pass: PassFacts::Failed(failure(Reason::TransferFailed, true)),
        ..stopped()
    };
    assert!(matches!(
        decide_(&s, &retrying).then,
        Then::Retry { failures: 1, .. }
    ));
}

#[test]
fn what_a_rollback_needs_is_recorded_before_the_workload_stops() {
    let mut s = cutover(CutoverStep::Started);
    s.cutover.iter_mut().for_each(|c| c.volumes.clear());
    assert_eq!(
        decide_(&s, &facts()),
        d(Effect::RecordBindings, Then::Step(CutoverStep::Started))
    );
    let pinned = Facts {
        pinning: Pinning::Source,
        ..facts()
    };
    assert_eq!(
        decide_(&cutover(CutoverStep::Started), &pinned),
        d(Effect::RecordPinning, Then::Step(CutoverStep::Started))
    );
    let mut recorded = cutover(CutoverStep::Started);
    recorded
        .cutover
        .iter_mut()
        .for_each(|c| c.original_placement = Some("{}".into()));
    assert_eq!(decide_(&recorded, &pinned).effect, Effect::Scale(0));
}

#[test]
fn bindings_are_recorded_before_the_target_is_promoted() {
    let mut s = cutover(CutoverStep::FinalSent);
    s.cutover.iter_mut().for_each(|c| c.volumes.clear());
    assert_eq!(
        decide_(&s, &stopped()),
        d(Effect::RecordBindings, Then::Step(CutoverStep::FinalSent))
    );
    assert_eq!(
        decide_(&cutover(CutoverStep::FinalSent), &stopped()),
        d(Effect::Promote, Then::Step(CutoverStep::Promoted))
    );
}

#[test]
fn a_promoted_copy_is_rebound_to_the_target() {
    assert_eq!(
        decide_(&cutover(CutoverStep::Promoted), &stopped()),
        d(Effect::RebindToTarget, Then::Step(CutoverStep::Rebound))
    );
}

#[test]
fn the_original_pinning_is_recorded_before_it_is_changed() {
    let s = cutover(CutoverStep::Rebound);
    let on_source = Facts {
        pinning: Pinning::Source,
        ..stopped()
    };
    assert_eq!(
        decide_(&s, &on_source),
        d(Effect::RecordPinning, Then::Step(CutoverStep::Rebound))
    );
}

#[test]
fn a_recorded_pinning_is_applied_even_after_a_crash_between_record_and_patch() {
    let mut s = cutover(CutoverStep::Rebound);
    s.cutover
        .iter_mut()
        .for_each(|c| c.original_placement = Some("{}".into()));
    let on_source = Facts {
        pinning: Pinning::Source,
        ..stopped()
    };
    assert_eq!(
        decide_(&s, &on_source),
        d(Effect::PinToTarget, Then::Step(CutoverStep::Pinned))
    );
    for done in [Pinning::Target, Pinning::None] {
        let f = Facts {
            pinning: done,
            ..stopped()
        };
        assert_eq!(
            decide_(&s, &f),
            d(Effect::Nothing, Then::Step(CutoverStep::Pinned))
        );
    }
}

#[test]
fn the_workload_starts_on_the_target_only_once_every_claim_is_bound() {
    let s = cutover(CutoverStep::Pinned);
    let lost = Facts {
        claims: Claims::Lost,
        ..stopped()
    };
    assert_eq!(decide_(&s, &lost).effect, Effect::TouchClaims);
    let pending = Facts {
        claims: Claims::Pending,
        ..stopped()
    };
    assert_eq!(decide_(&s, &pending), wait(WATCHED));
    assert_eq!(
        decide_(&s, &stopped()),
        d(Effect::Scale(2), Then::Step(CutoverStep::ScaledUp))
    );
}

#[test]
fn a_re_created_pv_gets_its_reclaim_policy_back_once_bound() {
    let retained = Facts {
        claims: Claims::Retained,
        ..stopped()
    };
    assert_eq!(
        decide_(&cutover(CutoverStep::Pinned), &retained),
        d(
            Effect::RestoreReclaimPolicy,
            Then::Wait(Some(Duration::ZERO))
        )
    );
    let s = rolling_back(
        Reason::TargetNotReady,
        Some(RollbackStep::Rebound),
        Some(CutoverStep::ScaledUp),
    );
    assert_eq!(decide_(&s, &retained).effect, Effect::RestoreReclaimPolicy);
}

#[test]
fn every_pod_ready_on_the_target_retires_the_source_copy_and_succeeds() {
    let s = cutover(CutoverStep::ScaledUp);
    let ready = Facts {
        workload: Some(WorkloadFacts {
            replicas: 2,
            pods: 2,
            ready_on_target: 2,
        }),
        ..facts()
    };
    assert_eq!(
        decide_(&s, &ready),
        d(Effect::RetireSource(SourceCopy::Replica), Then::Succeed)
    );
    let delete = Limits {
        source_copy: SourceCopy::Delete,
        ..LIMITS
    };
    assert_eq!(
        decide(&s, &ready, &delete).effect,
        Effect::RetireSource(SourceCopy::Delete)
    );
    // A pod elsewhere (an old one still terminating) is not success.
    let stray = Facts {
        workload: Some(WorkloadFacts {
            replicas: 2,
            pods: 3,
            ready_on_target: 2,
        }),
        ..facts()
    };
    assert_eq!(decide_(&s, &stray), wait(WATCHED));
}

#[test]
fn pods_not_ready_on_the_target_in_time_roll_back() {
    let s = cutover(CutoverStep::ScaledUp);
    let half = Facts {
        workload: Some(WorkloadFacts {
            replicas: 2,
            pods: 2,
            ready_on_target: 1,
        }),
        since_scale_up: Some(LIMITS.target_ready + Duration::from_secs(1)),
        ..facts()
    };
    let d = decide_(&s, &half);
    assert_eq!(rolled_back_with(&d), Some(Reason::TargetNotReady));
    assert!(
        matches!(&d.then, Then::RollBack(_, m) if m.contains("1 of 2")),
        "{d:?}"
    );
}

#[test]
fn a_rollback_first_stops_the_transfers() {
    let s = rolling_back(Reason::TransferFailed, None, None);
    assert_eq!(
        decide_(&s, &facts()),
        d(
            Effect::AbortTransfers,
            Then::RollbackStep(RollbackStep::Started)
        )
    );
}

#[test]
fn a_rollback_before_the_cutover_leaves_the_running_workload_alone() {
    let s = rolling_back(Reason::InsufficientSpace, Some(RollbackStep::Started), None);
    assert_eq!(decide_(&s, &facts()), d(Effect::Nothing, Then::Finish));
}

#[test]
fn a_rollback_after_scale_up_stops_the_target_s_pods_before_rebinding() {
    let s = rolling_back(
        Reason::TargetNotReady,
        Some(RollbackStep::Started),
        Some(CutoverStep::ScaledUp),
    );
    let running_on_target = Facts {
        workload: Some(WorkloadFacts {
            replicas: 2,
            pods: 2,
            ready_on_target: 1,
        }),
        ..facts()
    };
    assert_eq!(decide_(&s, &running_on_target).effect, Effect::Scale(0));
    let terminating = Facts {
        workload: Some(WorkloadFacts {
            replicas: 0,
            pods: 1,
            ready_on_target: 0,
        }),
        ..facts()
    };
    assert_eq!(decide_(&s, &terminating), wait(WATCHED));
    assert_eq!(
        decide_(&s, &stopped()).then,
        Then::RollbackStep(RollbackStep::Stopped)
    );
    let s = rolling_back(
        Reason::TargetNotReady,
        Some(RollbackStep::Stopped),
        Some(CutoverStep::ScaledUp),
    );
    assert_eq!(
        decide_(&s, &stopped()),
        d(
            Effect::RebindToSource,
            Then::RollbackStep(RollbackStep::Rebound)
        )
    );
}

#[test]
fn a_rollback_restores_the_pinning_and_waits_for_the_claims() {
    let mut s = rolling_back(
        Reason::TargetNotReady,
        Some(RollbackStep::Rebound),
        Some(CutoverStep::ScaledUp),
    );
    s.cutover
        .iter_mut()
        .for_each(|c| c.original_placement = Some("{}".into()));
    let pinned = Facts {
        pinning: Pinning::Target,
        ..stopped()
    };
    assert_eq!(decide_(&s, &pinned).effect, Effect::RestorePinning);
    let lost = Facts {
        claims: Claims::Lost,
        ..stopped()
    };
    assert_eq!(decide_(&s, &lost).effect, Effect::TouchClaims);
    let pending = Facts {
        claims: Claims::Pending,
        ..stopped()
    };
    assert_eq!(decide_(&s, &pending), wait(WATCHED));
}

#[test]
fn a_rollback_demotes_the_target_copy_only_if_the_final_delta_reached_it() {
    let after = rolling_back(
        Reason::PromoteFailed,
        Some(RollbackStep::Rebound),
        Some(CutoverStep::FinalSent),
    );
    assert_eq!(
        decide_(&after, &stopped()),
        d(Effect::Demote, Then::RollbackStep(RollbackStep::Demoted))
    );
    let before = rolling_back(
        Reason::CutoverTimeout,
        Some(RollbackStep::Rebound),
        Some(CutoverStep::ScaledDown),
    );
    assert_eq!(
        decide_(&before, &stopped()),
        d(Effect::Nothing, Then::RollbackStep(RollbackStep::Demoted))
    );
}

#[test]
fn a_rollback_scales_the_workload_back_on_the_source_then_finishes() {
    let s = rolling_back(
        Reason::TargetNotReady,
        Some(RollbackStep::Demoted),
        Some(CutoverStep::ScaledUp),
    );
    assert_eq!(
        decide_(&s, &stopped()),
        d(
            Effect::Scale(2),
            Then::RollbackStep(RollbackStep::Restarted)
        )
    );
    let gone = Facts {
        workload: None,
        ..stopped()
    };
    assert_eq!(decide_(&s, &gone).effect, Effect::Nothing);
    let s = rolling_back(
        Reason::TargetNotReady,
        Some(RollbackStep::Restarted),
        Some(CutoverStep::ScaledUp),
    );
    assert_eq!(decide_(&s, &facts()), d(Effect::Nothing, Then::Finish));
}

#[test]
fn deleting_during_a_rollback_lets_it_finish() {
    let s = rolling_back(
        Reason::TargetNotReady,
        Some(RollbackStep::Stopped),
        Some(CutoverStep::ScaledUp),
    );
    let deleting = Facts {
        deleting: true,
        ..stopped()
    };
    assert_eq!(decide_(&s, &deleting).effect, Effect::RebindToSource);
}

#[test]
fn a_cancel_ends_cancelled_and_every_other_cause_failed() {
    assert_eq!(final_phase(Reason::Cancelled), Phase::Cancelled);
    for r in [
        Reason::WorkloadGone,
        Reason::InsufficientSpace,
        Reason::TransferRefused,
        Reason::TargetDiverged,
        Reason::ReceiveFailed,
        Reason::TransferFailed,
        Reason::PromoteFailed,
        Reason::CutoverTimeout,
        Reason::TargetUnreachable,
        Reason::TargetNotReady,
        Reason::VolumeNotFound,
        Reason::InvalidSpec,
        Reason::SourceUnreachable,
        Reason::Abandoned,
    ] {
        assert_eq!(final_phase(r), Phase::Failed, "{r}");
    }
}

#[test]
fn a_finished_migration_releases_its_lock_then_its_finalizer() {
    let done = status(Phase::Succeeded);
    assert_eq!(decide_(&done, &facts()).effect, Effect::Unlock);
    let unlocked = Facts {
        locked_by_us: false,
        ..facts()
    };
    assert_eq!(decide_(&done, &unlocked).effect, Effect::Nothing);
    let deleting = Facts {
        deleting: true,
        ..unlocked
    };
    assert_eq!(decide_(&done, &deleting).effect, Effect::RemoveFinalizer);
    let no_finalizer = Facts {
        finalizer: false,
        ..deleting
    };
    assert_eq!(decide_(&done, &no_finalizer).effect, Effect::Nothing);
}

#[test]
fn a_pending_migration_is_left_to_the_target_s_admission() {
    assert_eq!(
        decide_(&status(Phase::Pending), &facts()),
        d(Effect::Nothing, Then::Wait(None))
    );
}

#[test]
fn a_rollback_never_gives_up_on_an_effect_except_the_demote() {
    let stage = Stage::RollingBack {
        cause: Reason::TargetNotReady,
        step: Some(RollbackStep::Stopped),
    };
    let err = failure(Reason::TransferFailed, false);
    assert_eq!(on_error(&stage, &Effect::RebindToSource, &err), None);
    assert_eq!(on_error(&stage, &Effect::Scale(2), &err), None);
    assert_eq!(
        on_error(&stage, &Effect::Demote, &err),
        Some(Then::RollbackStep(RollbackStep::Demoted))
    );
}

#[test]
fn a_failed_promote_rolls_back_as_promote_failed() {
    let stage = Stage::CuttingOver(Some(CutoverStep::FinalSent));
    let err = failure(Reason::PromoteFailed, false);
    assert!(matches!(
        on_error(&stage, &Effect::Promote, &err),
        Some(Then::RollBack(Reason::PromoteFailed, _))
    ));
}

#[test]
fn a_volume_missing_at_snapshot_rolls_back_as_volume_not_found() {
    let err = failure(Reason::VolumeNotFound, false);
    assert!(matches!(
        on_error(&Stage::Snapshotting, &Effect::Snapshot, &err),
        Some(Then::RollBack(Reason::VolumeNotFound, _))
    ));
}

#[test]
fn an_invalid_spec_found_when_sending_rolls_back_as_invalid_spec() {
    let err = failure(Reason::InvalidSpec, false);
    assert!(matches!(
        on_error(&Stage::Sending, &Effect::StartPass, &err),
        Some(Then::RollBack(Reason::InvalidSpec, _))
    ));
}

#[test]
fn a_transient_effect_error_is_retried_with_backoff() {
    let err = failure(Reason::TransferFailed, true);
    for (stage, effect) in [
        (Stage::Snapshotting, Effect::Snapshot),
        (Stage::Sending, Effect::StartPass),
        (
            Stage::CuttingOver(Some(CutoverStep::Promoted)),
            Effect::RebindToTarget,
        ),
        (
            Stage::CuttingOver(Some(CutoverStep::Started)),
            Effect::Scale(0),
        ),
    ] {
        assert_eq!(on_error(&stage, &effect, &err), None, "{effect:?}");
    }
}

#[test]
fn a_source_copy_that_cannot_be_retired_does_not_undo_a_finished_move() {
    let stage = Stage::CuttingOver(Some(CutoverStep::ScaledUp));
    let err = failure(Reason::TransferFailed, false);
    assert_eq!(
        on_error(&stage, &Effect::RetireSource(SourceCopy::Delete), &err),
        Some(Then::Succeed)
    );
}

#[test]
fn the_stage_is_read_from_status() {
    assert_eq!(Stage::of(&MigrationStatus::default()), Stage::Pending);
    assert_eq!(
        Stage::of(&cutover(CutoverStep::Pinned)),
        Stage::CuttingOver(Some(CutoverStep::Pinned))
    );
    assert_eq!(
        Stage::of(&rolling_back(Reason::TargetNotReady, None, None)),
        Stage::RollingBack {
            cause: Reason::TargetNotReady,
            step: None
        }
    );
    assert_eq!(
        Stage::of(&status(Phase::Failed)),
        Stage::Done(Phase::Failed)
    );
}

#[test]
fn the_readme_shows_the_table_of_the_code() {
    let rows = |text: &str, prefix: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter(|l| l.starts_with('|'))
            .map(str::to_string)
            .collect()
    };
    let code = rows(include_str!("mod.rs"), "//! ");
    let readme = include_str!("../../../README.md");
    let start = readme.find("<!-- flow-table -->").unwrap_or(0);
    let end = readme.find("<!-- /flow-table -->").unwrap_or(0);
    let shown = rows(readme.get(start..end).unwrap_or_default(), "");
    assert!(code.len() > 30, "the table in flow/mod.rs lost its rows");
    assert_eq!(
        shown, code,
        "copy the table of controller/src/flow/mod.rs into the README"
    );
}

fn taken_over(mut s: MigrationStatus) -> MigrationStatus {
    s.taken_over_by = Some("machine-b".into());
    s
}

#[test]
fn a_takeover_before_the_target_has_a_complete_copy_rolls_back() {
    for s in [
        status(Phase::Snapshotting),
        status(Phase::Sending),
        cutover(CutoverStep::Started),
        cutover(CutoverStep::ScaledDown),
    ] {
        let d = decide_(&taken_over(s), &facts());
        assert_eq!(rolled_back_with(&d), Some(Reason::SourceUnreachable));
    }
}

#[test]
fn a_takeover_once_the_final_delta_arrived_completes_on_the_target() {
    assert_eq!(
        decide_(&taken_over(cutover(CutoverStep::FinalSent)), &stopped()).effect,
        Effect::Promote
    );
    assert_eq!(
        decide_(&taken_over(cutover(CutoverStep::Promoted)), &stopped()).effect,
        Effect::RebindToTarget
    );
}

#[test]
fn a_rollback_before_the_scale_up_does_not_wait_for_pods_on_the_source() {
    // A pod hanging in Terminating on a dead source node must not block the way back.
    let s = rolling_back(
        Reason::SourceUnreachable,
        Some(RollbackStep::Started),
        Some(CutoverStep::Started),
    );
    let hanging = Facts {
        workload: Some(WorkloadFacts {
            replicas: 0,
            pods: 1,
            ready_on_target: 0,
        }),
        ..facts()
    };
    assert_eq!(
        decide_(&s, &hanging),
        d(Effect::Nothing, Then::RollbackStep(RollbackStep::Stopped))
    );
}

#[test]
fn the_operator_s_abandon_rolls_back_at_any_stage_in_flight() {
    let abandon = Facts {
        resolve: Some(Resolve::Abandon),
        ..facts()
    };
    for s in every_stage_in_flight() {
        assert_eq!(
            rolled_back_with(&decide_(&s, &abandon)),
            Some(Reason::Abandoned)
        );
    }
}

#[test]
fn an_abandoned_rollback_does_not_wait_for_pods_on_an_unreachable_target() {
    let s = rolling_back(
        Reason::Abandoned,
        Some(RollbackStep::Started),
        Some(CutoverStep::ScaledUp),
    );
    let stuck = Facts {
        workload: Some(WorkloadFacts {
            replicas: 0,
            pods: 1,
            ready_on_target: 0,
        }),
        resolve: Some(Resolve::Abandon),
        ..facts()
    };
    assert_eq!(
        decide_(&s, &stuck).then,
        Then::RollbackStep(RollbackStep::Stopped)
    );
}

#[test]
fn the_operator_s_complete_keeps_the_cutover_going_once_the_target_has_the_final_delta() {
    let late = Facts {
        resolve: Some(Resolve::Complete),
        since_cutover: Some(LIMITS.cutover * 2),
        since_scale_up: Some(LIMITS.target_ready * 2),
        target_unreachable_for: Some(PEER_DEADLINE * 2),
        ..stopped()
    };
    assert_eq!(
        decide_(&cutover(CutoverStep::Promoted), &late).effect,
        Effect::RebindToTarget
    );
    assert_eq!(
        decide_(&cutover(CutoverStep::ScaledUp), &late),
        wait(WATCHED)
    );
    // Before the final delta arrived there is nothing complete on the target to finish with.
    assert_eq!(
        rolled_back_with(&decide_(&cutover(CutoverStep::ScaledDown), &late)),
        Some(Reason::CutoverTimeout)
    );
}

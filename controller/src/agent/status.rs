//! Writing a Migration's status: phase transitions (with timestamps, an Event and a metric),
//! conditions whose `lastTransitionTime` moves only when their status does, and progress.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::metrics::PhaseLabel;
use super::{Ctx, Error};
use crate::api::{Migration, MigrationStatus, Phase, PhaseTransition};

pub fn now() -> Time {
    Time(Timestamp::now())
}

/// Now, kept to the microsecond in status (what a duration is measured from).
pub fn now_micro() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now())
}

pub fn api(ctx: &Ctx, m: &Migration) -> Api<Migration> {
    Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default())
}

/// Replaces the status, on the condition that the Migration is still at the version `m` was
/// read at: a decision taken from an older version fails with a conflict (409) and is taken
/// again from a fresh read. Returns the Migration as written.
pub async fn write(ctx: &Ctx, m: &Migration, status: &MigrationStatus) -> Result<Migration, Error> {
    let mut obj = m.clone();
    obj.status = Some(status.clone());
    obj.metadata.managed_fields = None;
    let pp = PostParams {
        field_manager: Some(super::MANAGER.into()),
        ..PostParams::default()
    };
    let written = api(ctx, m).replace_status(&m.name_any(), &pp, &obj).await?;
    ctx.fresh.saw(&written);
    Ok(written)
}

/// Sets a condition; its transition time changes only with its status.
pub fn set_condition(
    s: &mut MigrationStatus,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let time = s
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(now, |c| c.last_transition_time.clone());
    s.conditions.retain(|c| c.type_ != type_);
    s.conditions.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: time,
        observed_generation: generation,
    });
}

/// Moves `s` to `phase` with a reason and message, and records the transition. Returns
/// whether the phase changed.
pub fn enter(
    s: &mut MigrationStatus,
    m: &Migration,
    phase: Phase,
    reason: &str,
    message: &str,
) -> bool {
    let changed = s.phase != Some(phase);
    s.phase = Some(phase);
    s.reason = Some(reason.into());
    s.message = Some(message.into());
    s.observed_generation = m.metadata.generation;
    if changed {
        s.phase_transitions
            .push(PhaseTransition { phase, time: now() });
    }
    let (status, why) = match phase {
        Phase::Succeeded => ("True", reason),
        Phase::Failed | Phase::Cancelled => ("False", reason),
        _ => ("Unknown", "InProgress"),
    };
    set_condition(s, "Succeeded", status, why, message, m.metadata.generation);
    if phase.is_terminal() {
        s.completion_time = Some(now());
    }
    changed
}

/// Writes the status and, when the phase changed, publishes an Event and counts it.
pub async fn transition(
    ctx: &Ctx,
    m: &Migration,
    mut s: MigrationStatus,
    phase: Phase,
    reason: &str,
    message: &str,
) -> Result<MigrationStatus, Error> {
    let changed = enter(&mut s, m, phase, reason, message);
    write(ctx, m, &s).await?;
    if changed {
        announce(ctx, m, phase, reason, message).await;
    }
    Ok(s)
}

/// Logs, counts and publishes (as an Event) the entry into `phase`.
pub async fn announce(ctx: &Ctx, m: &Migration, phase: Phase, reason: &str, message: &str) {
    {
        info!(migration = %key(m), ?phase, reason, "{message}");
        ctx.metrics
            .phases
            .get_or_create(&PhaseLabel {
                phase: format!("{phase:?}"),
            })
            .inc();
        let type_ = if matches!(phase, Phase::Failed | Phase::RollingBack) {
            EventType::Warning
        } else {
            EventType::Normal
        };
        event(ctx, m, type_, reason, &format!("{phase:?}: {message}")).await;
    }
}

/// Publishes an Event on the Migration; a failure to publish is logged, not fatal.
pub async fn event(ctx: &Ctx, m: &Migration, type_: EventType, reason: &str, note: &str) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Migrate".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &m.object_ref(&())).await {
        warn!(migration = %key(m), error = %e, "cannot publish event");
    }
}

pub fn key(m: &Migration) -> String {
    format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any())
}

//! `ployzctl migrate ...`

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use ployz::agent::RESOLVE_ANNOTATION;
use ployz::api::{CutoverStep, Migration, Phase};
use ployz::manifest::{self, Format, MigrationRequest};
use ployz::plan::{self, observe::observe};
use serde_json::json;

use crate::cluster::explain;

use crate::cli::{MigrationArgs, ResolveArgs};
use crate::error::CliError;

impl MigrationArgs {
    fn to_request(&self) -> MigrationRequest {
        MigrationRequest {
            workload: self.workload.clone(),
            to: self.to.clone(),
            from: self.from.clone(),
            name: self.name.clone(),
            bandwidth_limit: self.bandwidth_limit.clone().map(Quantity),
            compression: self.compression.map(Into::into),
            source_copy: self.source_copy.map(Into::into),
        }
    }
}

/// Builds the Migration and checks it against the CRD's own CEL rules, so a manifest that the
/// API server would refuse fails here, with the server's message, before anyone applies it.
pub fn build(args: &MigrationArgs) -> Result<Migration, CliError> {
    let migration = args.to_request().to_migration().map_err(CliError::usage)?;
    migration.validate_cel().map_err(|errs| {
        let reasons: Vec<String> = errs.into_vec().iter().map(ToString::to_string).collect();
        CliError::Usage(format!(
            "the manifest would be refused: {}",
            reasons.join("; ")
        ))
    })?;
    Ok(migration)
}

/// `migrate render-manifest`: print the Migration.
pub fn render_manifest(args: &MigrationArgs, format: Format) -> Result<String, CliError> {
    Ok(manifest::render(&build(args)?, format)?)
}

fn openebs_namespace() -> String {
    std::env::var("PLOYZ_OPENEBS_NAMESPACE").unwrap_or_else(|_| "openebs".into())
}

/// `migrate preview`: the controller's planner, run here against the live cluster.
pub async fn preview(
    client: Client,
    args: &MigrationArgs,
    format: Format,
) -> Result<String, CliError> {
    let mut migration = build(args)?;
    // Newest of all: an older unfinished Migration of the same workload wins, as it would.
    migration.metadata.creation_timestamp = Some(Time(Timestamp::now()));
    let ns = args.workload.namespace.clone();
    let obs = observe(&client, &ns, &openebs_namespace())
        .await
        .map_err(explain)?;
    let planned = plan::plan(&obs, &migration)
        .map_err(|e| CliError::Failed(anyhow::anyhow!("{} ({})", e.message, e.reason.as_str())))?;
    let target = obs
        .machines
        .iter()
        .find(|m| m.name_any() == planned.plan.target);
    let free = target.and_then(|m| m.status.as_ref()?.free.clone());
    if format == Format::Json {
        let out = json!({
            "migration": format!("{ns}/{}", migration.name_any()),
            "plan": planned.plan,
            "replicas": planned.workload.replicas,
            "targetFreeBytes": target.and_then(|m| m.status.as_ref()?.free_bytes),
        });
        return Ok(format!("{}\n", serde_json::to_string_pretty(&out)?));
    }
    let p = &planned.plan;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Migration {ns}/{} (dry run: nothing was changed)",
        migration.name_any()
    );
    let _ = writeln!(
        out,
        "  workload  {} {ns}/{} ({} replica(s), stopped only during the cutover)",
        p.workload.kind, p.workload.name, planned.workload.replicas
    );
    let _ = writeln!(out, "  from      {}", p.source);
    let _ = writeln!(
        out,
        "  to        {} (free: {})",
        p.target,
        free.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(out, "  volumes   {}", p.volumes.len());
    let width = p
        .volumes
        .iter()
        .map(|v| v.claim.len())
        .max()
        .unwrap_or(5)
        .max(5);
    for v in &p.volumes {
        let _ = writeln!(
            out,
            "    {:<width$}  {}:{}  ->  {}:{}",
            v.claim, p.source, v.source_dataset, p.target, v.target_dataset
        );
    }
    out.push_str(
        "  transfer  a full send the first time; only the delta since the last common snapshot when the target holds a ployz replica\n",
    );
    Ok(out)
}

/// `migrate apply`: create the Migration, then follow it.
pub async fn apply(
    client: Client,
    args: &MigrationArgs,
    no_wait: bool,
    format: Format,
) -> Result<String, CliError> {
    let migration = build(args)?;
    let ns = args.workload.namespace.clone();
    let name = migration.name_any();
    let api: Api<Migration> = Api::namespaced(client, &ns);
    match api.create(&PostParams::default(), &migration).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            return Err(CliError::Failed(anyhow::anyhow!(
                "Migration {ns}/{name} already exists; follow it with `ployzctl migrate watch {ns}/{name}`, or delete it first (`kubectl -n {ns} delete migration {name}`)"
            )));
        }
        Err(e) => return Err(explain(e).into()),
    }
    if no_wait {
        return Ok(if format == Format::Json {
            format!(
                "{}\n",
                json!({"migration": format!("{ns}/{name}"), "created": true})
            )
        } else {
            format!(
                "migration.ployz.dev/{name} created; follow it with `ployzctl migrate watch {ns}/{name}`\n"
            )
        });
    }
    follow(api, &name, format).await
}

/// Prints phase changes and progress as they happen; ends with the Migration's outcome
/// (success when the workload runs on the target).
pub async fn follow(api: Api<Migration>, name: &str, format: Format) -> Result<String, CliError> {
    follow_until(api, name, format, |s| s.phase == Some(Phase::Succeeded)).await
}

/// [`follow`], with the outcome that counts as success.
async fn follow_until(
    api: Api<Migration>,
    name: &str,
    format: Format,
    success: impl Fn(&ployz::api::MigrationStatus) -> bool,
) -> Result<String, CliError> {
    let human = format != Format::Json;
    let stream = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .applied_objects();
    futures::pin_mut!(stream);
    let mut printed = 0;
    let mut last_progress: Option<(String, Instant)> = None;
    let mut start: Option<Timestamp> = None;
    let mut stderr = std::io::stderr();
    while let Some(m) = stream.try_next().await? {
        let s = m.status.clone().unwrap_or_default();
        let t0 = *start.get_or_insert_with(|| {
            m.metadata
                .creation_timestamp
                .clone()
                .map_or_else(Timestamp::now, |t| t.0)
        });
        let seen = printed;
        for t in s.phase_transitions.iter().skip(printed) {
            printed += 1;
            if human {
                let at = t.time.0.duration_since(t0).as_secs_f64();
                let why = if s.phase == Some(t.phase) {
                    format!(
                        "{}: {}",
                        s.reason.clone().unwrap_or_default(),
                        s.message.clone().unwrap_or_default()
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(stderr, "{at:>7.1}s  {:<13} {why}", format!("{:?}", t.phase));
            }
        }
        if let Some(summary) = s.progress.as_ref().and_then(|p| p.summary.clone())
            && human
            && printed == seen
            && matches!(s.phase, Some(Phase::Sending | Phase::CuttingOver))
        {
            let due = last_progress
                .as_ref()
                .is_none_or(|(old, at)| *old != summary && at.elapsed() >= Duration::from_secs(1));
            if due {
                let _ = writeln!(stderr, "          {summary}");
                last_progress = Some((summary, Instant::now()));
            }
        }
        let Some(phase) = s.phase.filter(|p| p.is_terminal()) else {
            continue;
        };
        let key = format!("{}/{name}", m.namespace().unwrap_or_default());
        let out = if human {
            let mut line = format!("{key}: {phase:?}");
            if let Some(ms) = s.downtime_milliseconds {
                let _ = write!(line, ", downtime {:.1}s", ms as f64 / 1000.0);
            }
            if let Some(sent) = s
                .pre_copy
                .as_ref()
                .map(|p| p.pass_bytes.iter().sum::<u64>())
            {
                let _ = write!(line, ", {sent} bytes sent");
            }
            line.push('\n');
            line
        } else {
            format!("{}\n", serde_json::to_string_pretty(&m)?)
        };
        return if success(&s) {
            Ok(out)
        } else {
            Err(CliError::Failed(anyhow::anyhow!(
                "{key} {phase:?} ({}): {}",
                s.reason.unwrap_or_default(),
                s.message.unwrap_or_default()
            )))
        };
    }
    Err(CliError::Failed(anyhow::anyhow!(
        "Migration {name} disappeared before it ended"
    )))
}

/// What the operator decides about a Migration in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Abandon,
    Complete,
}

impl Decision {
    fn value(self) -> &'static str {
        match self {
            Decision::Abandon => "abandon",
            Decision::Complete => "complete",
        }
    }
}

/// `migrate abandon|complete`: checks that the decision applies to the Migration as it is,
/// records it (the `ployz.dev/resolve` annotation, under a resourceVersion precondition), and
/// follows the Migration to its end.
pub async fn resolve(
    client: Client,
    args: &ResolveArgs,
    decision: Decision,
    format: Format,
) -> Result<String, CliError> {
    let (ns, name) = (&args.migration.namespace, &args.migration.service);
    let api: Api<Migration> = Api::namespaced(client, ns);
    let m = api.get_opt(name).await.map_err(explain)?.ok_or_else(|| {
        CliError::Failed(anyhow::anyhow!(
            "there is no Migration {ns}/{name}; list them with `kubectl -n {ns} get migrations`"
        ))
    })?;
    let s = m.status.clone().unwrap_or_default();
    let phase = s.phase.unwrap_or(Phase::Pending);
    let step = s.cutover.as_ref().map(|c| c.step);
    if phase.is_terminal() {
        return Err(CliError::Failed(anyhow::anyhow!(
            "Migration {ns}/{name} already ended {phase:?} ({}); there is nothing to decide",
            s.reason.unwrap_or_default()
        )));
    }
    if phase == Phase::Pending {
        return Err(CliError::Failed(anyhow::anyhow!(
            "Migration {ns}/{name} has not started; delete it instead (`kubectl -n {ns} delete migration {name}`)"
        )));
    }
    let mut note = String::new();
    match decision {
        Decision::Complete
            if phase != Phase::CuttingOver || step.is_none_or(|x| x < CutoverStep::FinalSent) =>
        {
            return Err(CliError::Failed(anyhow::anyhow!(
                "Migration {ns}/{name} is {phase:?} (cutover step {step:?}): the target does not hold the final delta, so there is nothing complete to finish with; wait, or `ployzctl migrate abandon {ns}/{name}`"
            )));
        }
        Decision::Abandon if step.is_some_and(|x| x >= CutoverStep::Pinned) => {
            note = "the workload may have started on the target: what it wrote there stays in the target's copy (a read-only replica afterwards) and is not carried back. ".into();
        }
        _ => {}
    }
    let patch = json!({"metadata": {
        "resourceVersion": m.resource_version(),
        "annotations": {RESOLVE_ANNOTATION: decision.value()},
    }});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            return Err(CliError::Failed(anyhow::anyhow!(
                "Migration {ns}/{name} changed while deciding; run the command again to decide on its current state"
            )));
        }
        Err(e) => return Err(explain(e).into()),
    }
    if args.no_wait {
        return Ok(if format == Format::Json {
            format!(
                "{}\n",
                json!({"migration": format!("{ns}/{name}"), "decision": decision.value()})
            )
        } else {
            format!(
                "migration.ployz.dev/{name}: {} recorded. {note}Follow it with `ployzctl migrate watch {ns}/{name}`\n",
                decision.value()
            )
        });
    }
    if !note.is_empty() && format != Format::Json {
        let _ = writeln!(std::io::stderr(), "note: {note}");
    }
    match decision {
        // Abandoning succeeds when the Migration ends with the workload on the source.
        Decision::Abandon => {
            follow_until(api, name, format, |s| {
                s.reason.as_deref() == Some(ployz::api::Reason::Abandoned.as_str())
            })
            .await
        }
        Decision::Complete => follow(api, name, format).await,
    }
}

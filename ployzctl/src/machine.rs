//! `ployzctl machine ...`

use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use ployz::agent::human_bytes;
use ployz::api::{Machine, Migration, Phase, ZfsImplementation};
use ployz::names::MachineName;
use ployz::plan::machine_ready;
use serde_json::json;

use crate::cli::OutputArg;
use crate::cluster::explain;
use crate::error::CliError;
use crate::output;

const KIND: &str = "machine.ployz.dev";

pub async fn ls(client: Client, out: Option<OutputArg>) -> Result<String, CliError> {
    let api: Api<Machine> = Api::all(client.clone());
    let mut machines = api
        .list(&ListParams::default())
        .await
        .map_err(explain)?
        .items;
    machines.sort_by_key(|m| m.name_any());
    if let Some(format) = output::format(out) {
        return output::list(&machines, format);
    }
    if out == Some(OutputArg::Name) {
        let names: Vec<String> = machines.iter().map(ResourceExt::name_any).collect();
        return Ok(output::names(KIND, names.iter().map(String::as_str)));
    }
    if machines.is_empty() {
        return Ok("No machines: is the ployz agent DaemonSet running (`kubectl -n ployz-system get pods`)?\n".into());
    }
    // Migrations in flight, counted per machine they leave or enter.
    let migrations: Api<Migration> = Api::all(client);
    let in_flight: Vec<Migration> = migrations
        .list(&ListParams::default())
        .await
        .map_err(explain)?
        .items
        .into_iter()
        .filter(|m| {
            m.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_none_or(|p| !p.is_terminal())
        })
        .collect();
    let active = |name: &str| {
        in_flight
            .iter()
            .filter(|m| {
                m.spec.to == name
                    || m.status
                        .as_ref()
                        .and_then(|s| s.plan.as_ref())
                        .is_some_and(|p| p.source == name)
            })
            .count()
    };
    let now = Timestamp::now();
    let wide = out == Some(OutputArg::Wide);
    let mut header = vec![
        "NAME",
        "READY",
        "DRAINING",
        "HEARTBEAT",
        "SIZE",
        "FREE",
        "MIGRATIONS",
        "ZFS",
    ];
    if wide {
        header.extend(["NODE", "POOL", "PARENT DATASET", "ENDPOINT", "AGENT"]);
    }
    let rows: Vec<Vec<String>> = machines
        .iter()
        .map(|m| {
            let s = m.status.clone().unwrap_or_default();
            let zfs = s.zfs.map_or("-".to_string(), |z| match z.implementation {
                ZfsImplementation::OpenZfs => {
                    format!("OpenZFS {}", z.version.unwrap_or_default())
                }
                ZfsImplementation::Legacy => "legacy (zfs-fuse)".into(),
            });
            let mut row = vec![
                m.name_any(),
                if machine_ready(m, Some(now)) {
                    "True".into()
                } else {
                    "False".into()
                },
                m.spec.draining.to_string(),
                s.heartbeat_time.as_ref().map_or("never".into(), |t| {
                    format!("{} ago", output::age(now.duration_since(t.0).as_secs()))
                }),
                s.size_bytes.map_or("-".into(), human_bytes),
                s.free.clone().unwrap_or_else(|| "-".into()),
                active(&m.name_any()).to_string(),
                zfs,
            ];
            if wide {
                row.extend([
                    m.spec.node_name.clone(),
                    m.spec.pool.clone(),
                    m.spec.parent_dataset.clone(),
                    m.spec.endpoint.clone(),
                    s.agent_version.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            row
        })
        .collect();
    output::table(&header, &rows)
}

pub async fn drain(
    client: Client,
    machine: &MachineName,
    undo: bool,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    let api: Api<Machine> = Api::all(client.clone());
    let name = machine.as_str();
    if api.get_opt(name).await.map_err(explain)?.is_none() {
        return Err(CliError::Failed(anyhow::anyhow!(
            "there is no machine {name:?}; see `ployzctl machine ls`"
        )));
    }
    // Server-side apply with our own field manager: the agent owns the rest of the spec.
    let patch = json!({
        "apiVersion": "ployz.dev/v1alpha1",
        "kind": "Machine",
        "metadata": {"name": name},
        "spec": {"draining": !undo},
    });
    api.patch(
        name,
        &PatchParams::apply("ployzctl").force(),
        &Patch::Apply(&patch),
    )
    .await?;
    // Workloads that still live there: those the last successful migrations moved in.
    let migrations: Api<Migration> = Api::all(client);
    let mut here: Vec<String> = migrations
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|m| {
            m.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Succeeded)
                    && s.plan.as_ref().is_some_and(|p| p.target == name)
            })
        })
        .map(|m| format!("{}/{}", m.namespace().unwrap_or_default(), m.spec.service))
        .collect();
    here.sort();
    here.dedup();
    if out == Some(OutputArg::Json) {
        return Ok(format!(
            "{}\n",
            json!({"machine": name, "draining": !undo, "workloadsMovedHere": here})
        ));
    }
    let mut out = if undo {
        format!("machine {name} accepts migrations again\n")
    } else {
        format!("machine {name} is draining: it accepts no incoming migrations\n")
    };
    if !undo && !here.is_empty() {
        out.push_str("workloads ployz moved here; move them away with:\n");
        for w in &here {
            let _ = writeln!(out, "  ployzctl migrate apply {w} --to MACHINE");
        }
    }
    Ok(out)
}

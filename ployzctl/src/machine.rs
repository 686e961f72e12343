//! `ployzctl machine ...`

use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use ployz::api::{Machine, Migration, Phase, ZfsImplementation};
use ployz::manifest::{self, Format};
use ployz::names::MachineName;
use ployz::plan::machine_ready;
use serde_json::json;

use crate::cluster::explain;
use crate::error::CliError;

pub async fn ls(client: Client, format: Format) -> Result<String, CliError> {
    let api: Api<Machine> = Api::all(client);
    let mut machines = api
        .list(&ListParams::default())
        .await
        .map_err(explain)?
        .items;
    machines.sort_by_key(|m| m.name_any());
    if format == Format::Json {
        return Ok(manifest::render_all(&machines, Format::Json)?);
    }
    let now = Some(Timestamp::now());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<6} {:<9} {:<24} {:>10}  ZFS",
        "NAME", "READY", "DRAINING", "PARENT DATASET", "FREE"
    );
    for m in &machines {
        let s = m.status.clone().unwrap_or_default();
        let zfs = s.zfs.map_or("-".to_string(), |z| match z.implementation {
            ZfsImplementation::OpenZfs => format!("OpenZFS {}", z.version.unwrap_or_default()),
            ZfsImplementation::Legacy => "legacy (zfs-fuse)".into(),
        });
        let _ = writeln!(
            out,
            "{:<20} {:<6} {:<9} {:<24} {:>10}  {zfs}",
            m.name_any(),
            if machine_ready(m, now) {
                "True"
            } else {
                "False"
            },
            m.spec.draining,
            m.spec.parent_dataset,
            s.free.unwrap_or_else(|| "-".into()),
        );
    }
    if machines.is_empty() {
        out.push_str("(no machines: is the ployz agent DaemonSet running?)\n");
    }
    Ok(out)
}

pub async fn drain(
    client: Client,
    machine: &MachineName,
    undo: bool,
    format: Format,
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
    if format == Format::Json {
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

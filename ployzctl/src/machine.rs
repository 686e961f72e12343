//! `ployzctl machine ...`

use std::fmt::Write as _;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use ployz::agent::human_bytes;
use ployz::api::{Machine, Migration, ZfsImplementation};
use ployz::manifest::MigrationRequest;
use ployz::names::{MachineName, ServiceRef};
use ployz::plan::machine_ready;
use ployz::plan::observe::observe;
use ployz::plan::residents::{self, Resident};
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
    if let Some(printed) = output::scripted(KIND, &machines, out) {
        return printed;
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

/// Where `drain` moves the workloads it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveTo {
    /// Nowhere: list them, with the commands that move them.
    Nowhere,
    Machine(MachineName),
    /// The Ready, non-draining machine with the most free space.
    Roomiest,
}

/// `machine drain`: cordons the node, marks the Machine draining, finds every workload with
/// a ZFS volume on it (from the PVs, whoever put them there) and moves each away, one
/// Migration per workload, or lists them. `--undo` reverses the first two.
pub async fn drain(
    client: Client,
    machine: &MachineName,
    to: MoveTo,
    undo: bool,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    let api: Api<Machine> = Api::all(client.clone());
    let name = machine.as_str();
    let Some(m) = api.get_opt(name).await.map_err(explain)? else {
        return Err(CliError::Failed(anyhow::anyhow!(
            "there is no machine {name:?}; see `ployzctl machine ls`"
        )));
    };
    let node = m.spec.node_name.clone();
    // Where to, checked before anything changes.
    let target = match &to {
        MoveTo::Nowhere => None,
        MoveTo::Machine(t) if t == machine => {
            return Err(CliError::usage(format!(
                "--to {t} is the machine being drained; pick another machine (`ployzctl machine ls`)"
            )));
        }
        MoveTo::Machine(t) => match api.get_opt(t.as_str()).await.map_err(explain)? {
            Some(_) => Some(t.to_string()),
            None => {
                return Err(CliError::Failed(anyhow::anyhow!(
                    "--to {t}: there is no such machine; see `ployzctl machine ls`. Nothing was changed"
                )));
            }
        },
        MoveTo::Roomiest => Some(roomiest(&client, name).await?),
    };
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
    .await
    .map_err(explain)?;
    // Cordon, as `kubectl cordon`: no new pods are scheduled there.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": !undo}})),
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{} node {node}: {e}",
                if undo { "uncordoning" } else { "cordoning" }
            )
        })?;
    if undo {
        return Ok(match out {
            Some(OutputArg::Json) => format!(
                "{}\n",
                json!({"machine": name, "draining": false, "cordoned": false})
            ),
            _ => format!("machine {name} accepts migrations again; node {node} uncordoned\n"),
        });
    }
    let found = residents(&client, &node).await?;
    let human = out.is_none() || out == Some(OutputArg::Wide);
    let mut report = vec![];
    for r in &found {
        let key = format!("{}/{}", r.namespace, r.workload.reference.name);
        let what = format!("{} {key}", r.workload.reference.kind);
        let entry = |status: &str, migration: Option<String>, message: String| {
            json!({"workload": key, "kind": r.workload.reference.kind, "result": status,
                   "migration": migration, "message": message})
        };
        if let Err(why) = &r.volumes {
            report.push(entry("Blocked", None, why.clone()));
            continue;
        }
        let Some(target) = &target else {
            report.push(entry("Found", None, String::new()));
            continue;
        };
        if human {
            eprintln!("moving {what} to {target}");
        }
        match move_one(&client, r, target, out).await {
            Ok(migration) => report.push(entry("Moved", Some(migration), String::new())),
            Err((migration, e)) => report.push(entry("Failed", migration, format!("{e}"))),
        }
    }
    let failed = report
        .iter()
        .filter(|r| r["result"] == "Failed" || r["result"] == "Blocked")
        .count();
    let text = if out == Some(OutputArg::Json) {
        format!(
            "{}\n",
            json!({"machine": name, "node": node, "draining": true, "cordoned": true,
                   "to": target, "workloads": report})
        )
    } else {
        drain_text(name, &node, target.as_deref(), &report)?
    };
    if failed == 0 {
        return Ok(text);
    }
    print!("{text}");
    Err(CliError::Failed(anyhow::anyhow!(
        "{failed} of {} workload(s) are still on {name}; see above",
        report.len()
    )))
}

fn drain_text(
    name: &str,
    node: &str,
    target: Option<&str>,
    report: &[serde_json::Value],
) -> Result<String, CliError> {
    let mut text =
        format!("machine {name} is draining (no incoming migrations); node {node} cordoned\n");
    if report.is_empty() {
        text.push_str("no workload has a ZFS volume on it\n");
        return Ok(text);
    }
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let rows: Vec<Vec<String>> = report
        .iter()
        .map(|r| {
            vec![
                s(&r["workload"]),
                s(&r["kind"]),
                s(&r["result"]),
                r["migration"].as_str().unwrap_or("-").to_string(),
                s(&r["message"]),
            ]
        })
        .collect();
    text.push_str(&output::table(
        &["WORKLOAD", "KIND", "RESULT", "MIGRATION", "MESSAGE"],
        &rows,
    )?);
    if target.is_none() {
        let _ = writeln!(
            text,
            "move them with `ployzctl machine drain {name} --to MACHINE` (or --evacuate), or one by one:"
        );
        for r in report.iter().filter(|r| r["result"] == "Found") {
            let _ = writeln!(
                text,
                "  ployzctl migrate apply {} --to MACHINE",
                s(&r["workload"])
            );
        }
    }
    Ok(text)
}

/// Every workload with a volume on `node`, namespace by namespace (those holding a PV's
/// claim), as the planner resolves them.
async fn residents(client: &Client, node: &str) -> Result<Vec<Resident>, CliError> {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let namespaces: BTreeSet<String> = pvs
        .list(&ListParams::default())
        .await
        .map_err(explain)?
        .items
        .iter()
        .filter_map(|pv| pv.spec.as_ref()?.claim_ref.as_ref()?.namespace.clone())
        .collect();
    let mut found = vec![];
    for ns in namespaces {
        let obs = observe(client, &ns, &crate::migrate::openebs_namespace())
            .await
            .map_err(explain)?;
        found.extend(residents::residents(&obs, node));
    }
    Ok(found)
}

/// The Ready, non-draining machine other than `except` with the most free space.
async fn roomiest(client: &Client, except: &str) -> Result<String, CliError> {
    let api: Api<Machine> = Api::all(client.clone());
    let now = Some(Timestamp::now());
    api.list(&ListParams::default())
        .await
        .map_err(explain)?
        .items
        .into_iter()
        .filter(|m| m.name_any() != except && !m.spec.draining && machine_ready(m, now))
        .max_by_key(|m| m.status.as_ref().and_then(|s| s.free_bytes))
        .map(|m| m.name_any())
        .ok_or_else(|| {
            CliError::Failed(anyhow::anyhow!(
                "no other machine is Ready and accepting migrations (`ployzctl machine ls`); nothing was changed"
            ))
        })
}

/// Moves one resident to `target` with a new Migration and follows it to its end.
async fn move_one(
    client: &Client,
    r: &Resident,
    target: &str,
    out: Option<OutputArg>,
) -> Result<String, (Option<String>, anyhow::Error)> {
    let fail = |e: anyhow::Error| (None, e);
    let workload = ServiceRef {
        namespace: r.namespace.clone(),
        service: r.workload.reference.name.clone(),
    };
    let to: MachineName = target.parse().map_err(|e| fail(anyhow::anyhow!("{e}")))?;
    let mut m = MigrationRequest::new(workload, to)
        .to_migration()
        .map_err(|e| fail(e.into()))?;
    crate::migrate::name_each_move(&mut m);
    let api: Api<Migration> = Api::namespaced(client.clone(), &r.namespace);
    let created = api
        .create(&PostParams::default(), &m)
        .await
        .map_err(|e| fail(explain(e)))?;
    let name = created.name_any();
    let key = format!("{}/{name}", r.namespace);
    // Human output shows each move's phases; the others print only the final report.
    let quiet = if out.is_none() {
        None
    } else {
        Some(OutputArg::Name)
    };
    match crate::migrate::follow(api, &name, quiet).await {
        Ok(text) => {
            eprint!("{text}");
            Ok(key)
        }
        Err(e) => Err((Some(key), anyhow::anyhow!("{e}"))),
    }
}

//! What the guard reads to judge a write: the Migrations of the namespace, their machines'
//! nodes, the claim a volume is bound to, and the workloads the Migrations lock. Always live
//! (GETs and LISTs, never a cache), so a lock released a moment ago is seen as released.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PodTemplateSpec, Service,
};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::rules::{Claim, Holder, selects};
use crate::agent::LOCK_ANNOTATION;
use crate::api::{Machine, Migration, WorkloadRef};
use crate::plan::rebind::workload_mounts;

/// A live workload: its lock, pod template and claim templates.
struct Live {
    lock: Option<String>,
    template: PodTemplateSpec,
    claim_templates: Vec<String>,
}

async fn workload(client: &Client, ns: &str, w: &WorkloadRef) -> kube::Result<Option<Live>> {
    let live = |annotations: &BTreeMap<String, String>, template, claim_templates| Live {
        lock: annotations.get(LOCK_ANNOTATION).cloned(),
        template,
        claim_templates,
    };
    Ok(if w.kind == "StatefulSet" {
        let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
        api.get_opt(&w.name).await?.map(|s| {
            let spec = s.spec.clone().unwrap_or_default();
            let templates = spec
                .volume_claim_templates
                .iter()
                .flatten()
                .filter_map(|t| t.metadata.name.clone())
                .collect();
            live(s.annotations(), spec.template, templates)
        })
    } else {
        let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
        api.get_opt(&w.name).await?.map(|d| {
            let template = d.spec.clone().unwrap_or_default().template;
            live(d.annotations(), template, vec![])
        })
    })
}

/// The lock of a live workload and the labels of its pods, if it exists.
pub async fn lock_and_labels(
    client: &Client,
    ns: &str,
    w: &WorkloadRef,
) -> kube::Result<Option<(Option<String>, BTreeMap<String, String>)>> {
    Ok(workload(client, ns, w).await?.map(|w| {
        let labels = w
            .template
            .metadata
            .and_then(|m| m.labels)
            .unwrap_or_default();
        (w.lock, labels)
    }))
}

/// The node of machine `name`: its Machine's `spec.nodeName` (an agent writes only its own
/// node's Machine), else the name itself.
fn node_of(machines: &[Machine], name: &str) -> String {
    machines
        .iter()
        .find(|m| m.name_any() == name)
        .map(|m| m.spec.node_name.clone())
        .unwrap_or_else(|| name.to_string())
}

/// What the guard needs to know of the workload or claim under admission.
#[derive(Debug)]
pub enum Subject<'a> {
    /// A workload named `name` whose pods carry `labels`.
    Workload {
        name: &'a str,
        labels: BTreeMap<String, String>,
    },
    Claim(&'a str),
}

/// The Migrations of `ns`, judged for `subject`.
pub async fn holders(
    client: &Client,
    ns: &str,
    subject: &Subject<'_>,
) -> kube::Result<Vec<Holder>> {
    let migrations = Api::<Migration>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    if migrations.is_empty() {
        return Ok(vec![]);
    }
    let machines = Api::<Machine>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let mut out = vec![];
    for m in migrations {
        let status = m.status.clone().unwrap_or_default();
        let plan = status.plan.as_ref();
        let mut h = Holder {
            name: m.name_any(),
            terminal: status.phase.is_some_and(|p| p.is_terminal()),
            deleting: m.metadata.deletion_timestamp.is_some(),
            target_node: node_of(&machines, &m.spec.to),
            source_node: plan.map(|p| node_of(&machines, &p.source)),
            ..Holder::default()
        };
        match subject {
            // Only a running Migration can take a lock: no Service read for the others.
            Subject::Workload { name, labels } if !h.terminal => {
                h.designates = m.spec.service == *name
                    || match Api::<Service>::namespaced(client.clone(), ns)
                        .get_opt(&m.spec.service)
                        .await?
                    {
                        Some(s) => {
                            selects(&s.spec.and_then(|s| s.selector).unwrap_or_default(), labels)
                        }
                        None => false,
                    };
            }
            Subject::Workload { .. } => {}
            Subject::Claim(claim) => {
                if let (Some(p), false) = (plan, h.terminal) {
                    let w = workload(client, ns, &p.workload).await?;
                    h.mounts_claim = w.is_some_and(|w| {
                        w.lock.as_deref() == Some(&h.name)
                            && workload_mounts(
                                &p.workload.name,
                                &w.template,
                                &w.claim_templates,
                                claim,
                            )
                    });
                }
            }
        }
        out.push(h);
    }
    Ok(out)
}

/// The claim `ns/name`, if it exists.
pub async fn claim(client: &Client, ns: &str, name: &str) -> kube::Result<Option<Claim>> {
    let c = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?;
    Ok(c.map(|c| Claim {
        namespace: ns.into(),
        name: name.into(),
        uid: c.uid().unwrap_or_default(),
        volume: c.spec.and_then(|s| s.volume_name).unwrap_or_default(),
    }))
}

/// The PV named `name`, if it exists.
pub async fn pv(client: &Client, name: &str) -> kube::Result<Option<PersistentVolume>> {
    Api::<PersistentVolume>::all(client.clone())
        .get_opt(name)
        .await
}

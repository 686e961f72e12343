//! From `spec.service` to ZFS datasets: the workload (a Deployment or StatefulSet, or the one
//! a Service selects), the claims its pods mount, their PersistentVolumes, and the dataset and
//! node behind each. Pure: it reads only the observed objects.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{Observed, PlanError, Reason};
use crate::api::{Machine, WorkloadRef};
use crate::openebs::CSI_DRIVER;

/// The workload behind `spec.service`.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub reference: WorkloadRef,
    pub replicas: i32,
    pub template: PodTemplateSpec,
    pub selector: LabelSelector,
    /// Claims its pods mount, in a stable order.
    pub claims: Vec<String>,
}

/// A volume as found: its claim and PV, the dataset, and the node holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundVolume {
    pub claim: String,
    pub volume: String,
    pub dataset: String,
    pub node: String,
    pub backend: Backend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A `local` PV on the dataset's mountpoint.
    Local { path: String },
    /// An OpenEBS zfs-localpv volume (`ZFSVolume` of this name).
    ZfsLocalPv,
}

fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn deployment(d: &Deployment) -> Option<Workload> {
    let spec = d.spec.as_ref()?;
    Some(Workload {
        reference: WorkloadRef {
            kind: "Deployment".into(),
            name: d.metadata.name.clone()?,
        },
        replicas: spec.replicas.unwrap_or(1),
        template: spec.template.clone(),
        selector: spec.selector.clone(),
        claims: template_claims(&spec.template),
    })
}

fn statefulset(s: &StatefulSet) -> Option<Workload> {
    let spec = s.spec.as_ref()?;
    let name = s.metadata.name.clone()?;
    let replicas = spec.replicas.unwrap_or(1);
    let mut claims = template_claims(&spec.template);
    // Claims made from volumeClaimTemplates are named TEMPLATE-STATEFULSET-ORDINAL.
    for t in spec.volume_claim_templates.iter().flatten() {
        let Some(tname) = &t.metadata.name else {
            continue;
        };
        for i in 0..replicas.max(0) {
            claims.push(format!("{}{i}", template_claim_prefix(tname, &name)));
        }
    }
    Some(Workload {
        reference: WorkloadRef {
            kind: "StatefulSet".into(),
            name,
        },
        replicas,
        template: spec.template.clone(),
        selector: spec.selector.clone(),
        claims,
    })
}

/// What a StatefulSet's claims from volumeClaimTemplate `template` start with; the ordinal
/// follows.
pub fn template_claim_prefix(template: &str, statefulset: &str) -> String {
    format!("{template}-{statefulset}-")
}

/// The claims a pod template names.
pub fn template_claims(t: &PodTemplateSpec) -> Vec<String> {
    t.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
        .collect()
}

/// Every Deployment and StatefulSet of the namespace, as workloads.
pub fn workloads(obs: &Observed) -> Vec<Workload> {
    let deployments = obs.deployments.iter().filter_map(deployment);
    deployments
        .chain(obs.statefulsets.iter().filter_map(statefulset))
        .collect()
}

/// The Deployment or StatefulSet named `service`, or the only one the Service `service`
/// selects.
pub fn workload(obs: &Observed, service: &str) -> Result<Workload, PlanError> {
    let ns = &obs.namespace;
    let named_d = obs
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some(service));
    let named_s = obs
        .statefulsets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(service));
    match (named_d, named_s) {
        (Some(_), Some(_)) => {
            return Err(PlanError::new(
                Reason::AmbiguousWorkload,
                format!(
                    "both a Deployment and a StatefulSet are named {ns}/{service}; rename one of them"
                ),
            ));
        }
        (Some(d), None) => return deployment(d).ok_or_else(|| no_spec(ns, service)),
        (None, Some(s)) => return statefulset(s).ok_or_else(|| no_spec(ns, service)),
        (None, None) => {}
    }
    let Some(svc) = obs
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(service))
    else {
        return Err(PlanError::new(
            Reason::WorkloadNotFound,
            format!(
                "no Deployment, StatefulSet or Service named {service} in namespace {ns}; spec.service names the workload to move (check with `kubectl -n {ns} get deploy,sts,svc`)"
            ),
        ));
    };
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let selected: Vec<Workload> = obs
        .deployments
        .iter()
        .filter(|d| {
            labels_match(
                &selector,
                d.spec
                    .as_ref()
                    .and_then(|s| s.template.metadata.as_ref()?.labels.as_ref()),
            )
        })
        .filter_map(deployment)
        .chain(
            obs.statefulsets
                .iter()
                .filter(|s| {
                    labels_match(
                        &selector,
                        s.spec
                            .as_ref()
                            .and_then(|s| s.template.metadata.as_ref()?.labels.as_ref()),
                    )
                })
                .filter_map(statefulset),
        )
        .collect();
    match selected.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(PlanError::new(
            Reason::WorkloadNotFound,
            format!(
                "Service {ns}/{service} selects no Deployment or StatefulSet; name the workload in spec.service instead"
            ),
        )),
        many => Err(PlanError::new(
            Reason::AmbiguousWorkload,
            format!(
                "Service {ns}/{service} selects {} workloads ({}); name one of them in spec.service",
                many.len(),
                many.iter()
                    .map(|w| format!("{}/{}", w.reference.kind, w.reference.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn no_spec(ns: &str, name: &str) -> PlanError {
    PlanError::new(
        Reason::WorkloadNotFound,
        format!("workload {ns}/{name} has no spec"),
    )
}

/// The dataset behind a local PV's path: below the pool's mountpoint, datasets inherit their
/// mountpoints, so `/tank/a/b` on a pool `tank` mounted at `/tank` is `tank/a/b`.
/// True when `path` lies strictly below the directory `dir` (both absolute, no `..`): where
/// a volume may be mounted or point, checked against what status or a stream says.
pub fn below(path: &str, dir: &str) -> bool {
    dir.starts_with('/')
        && path.starts_with(&format!("{}/", dir.trim_end_matches('/')))
        && !path.split('/').any(|c| c == "..")
}

pub fn local_dataset(pool: &str, pool_mountpoint: &str, path: &str) -> Option<String> {
    let root = pool_mountpoint.trim_end_matches('/');
    let rest = path.strip_prefix(root)?.strip_prefix('/')?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty()
        || rest
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return None;
    }
    Some(format!("{pool}/{rest}"))
}

/// The node a PV's required node affinity names (`In` on a hostname-like key).
fn affinity_node(pv: &PersistentVolume) -> Option<String> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .find(|e| e.operator == "In" && e.values.as_ref().is_some_and(|v| v.len() == 1))
        .and_then(|e| e.values.as_ref()?.first().cloned())
}

/// Resolves every claim to its dataset and node.
pub fn volumes(obs: &Observed, w: &Workload) -> Result<Vec<FoundVolume>, PlanError> {
    let ns = &obs.namespace;
    let kind_name = format!("{} {ns}/{}", w.reference.kind, w.reference.name);
    if w.claims.is_empty() {
        return Err(PlanError::new(
            Reason::NoZfsVolumes,
            format!(
                "{kind_name} mounts no PersistentVolumeClaim, so there is nothing for ployz to move; a workload without persistent volumes can simply be rescheduled"
            ),
        ));
    }
    let mut found = vec![];
    for claim in &w.claims {
        let pvc = obs
            .claims
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(claim))
            .ok_or_else(|| {
                PlanError::new(
                    Reason::VolumeNotFound,
                    format!("{kind_name} mounts claim {claim}, which does not exist in {ns}"),
                )
            })?;
        let pv_name = pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                PlanError::new(
                    Reason::VolumeNotFound,
                    format!("claim {ns}/{claim} is not bound to a PersistentVolume yet"),
                )
            })?;
        let pv = obs
            .volumes
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(&pv_name))
            .ok_or_else(|| {
                PlanError::new(
                    Reason::VolumeNotFound,
                    format!("claim {ns}/{claim} is bound to PersistentVolume {pv_name}, which does not exist"),
                )
            })?;
        bound_to_each_other(ns, pvc, pv)?;
        found.push(volume(obs, claim, &pv_name, pv)?);
    }
    Ok(found)
}

/// The claim and its PV must point at each other: the claim Bound, the PV's claimRef naming
/// this namespace, this claim and (where both are known) this claim's UID. A tenant can write
/// any `volumeName` into a claim of their own namespace; only the binding controller writes
/// a PV's claimRef, so the claimRef is what says whose volume it is.
fn bound_to_each_other(
    ns: &str,
    pvc: &PersistentVolumeClaim,
    pv: &PersistentVolume,
) -> Result<(), PlanError> {
    let claim = pvc.metadata.name.as_deref().unwrap_or_default();
    let pv_name = pv.metadata.name.as_deref().unwrap_or_default();
    let owner = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    let points_back = owner.is_some_and(|r| {
        r.namespace.as_deref() == Some(ns)
            && r.name.as_deref() == Some(claim)
            && match (r.uid.as_deref(), pvc.metadata.uid.as_deref()) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    });
    if points_back {
        let phase = pvc.status.as_ref().and_then(|s| s.phase.as_deref());
        if phase != Some("Bound") {
            return Err(PlanError::new(
                Reason::VolumeNotFound,
                format!(
                    "claim {ns}/{claim} is {}, not Bound; ployz moves only claims bound to their volume",
                    phase.unwrap_or("not yet bound")
                ),
            ));
        }
        return Ok(());
    }
    let holder = owner.map_or_else(
        || "no claim".to_string(),
        |r| {
            format!(
                "claim {}/{}",
                r.namespace.as_deref().unwrap_or("?"),
                r.name.as_deref().unwrap_or("?")
            )
        },
    );
    Err(PlanError::new(
        Reason::ForeignVolume,
        format!(
            "claim {ns}/{claim} names PersistentVolume {pv_name}, but {pv_name} is bound to {holder}: a Migration moves only volumes bound to its own namespace's claims; fix the claim's spec.volumeName"
        ),
    ))
}

fn volume(
    obs: &Observed,
    claim: &str,
    pv_name: &str,
    pv: &PersistentVolume,
) -> Result<FoundVolume, PlanError> {
    let spec = pv.spec.as_ref();
    let not_zfs = |what: &str| {
        PlanError::new(
            Reason::NotZfsVolume,
            format!(
                "claim {}/{claim} is bound to PersistentVolume {pv_name}, {what}; ployz moves local PVs on ZFS datasets and OpenEBS zfs-localpv ({CSI_DRIVER}) volumes",
                obs.namespace
            ),
        )
    };
    if let Some(csi) = spec.and_then(|s| s.csi.as_ref()) {
        if csi.driver != CSI_DRIVER {
            return Err(not_zfs(&format!("a CSI volume of driver {}", csi.driver)));
        }
        let zv = obs
            .zfs_volumes
            .iter()
            .find(|z| z.metadata.name.as_deref() == Some(&csi.volume_handle))
            .ok_or_else(|| {
                PlanError::new(
                    Reason::VolumeNotFound,
                    format!(
                        "PersistentVolume {pv_name} is a zfs-localpv volume, but its ZFSVolume {} was not found in namespace {}; is the agent's --openebs-namespace right?",
                        csi.volume_handle, obs.openebs_namespace
                    ),
                )
            })?;
        // ownerNodeID is a zfs-localpv node ID (a node's `openebs.io/nodeid` label), which
        // each agent publishes on its Machine; not necessarily the node's name.
        let owner = &zv.spec.owner_node_id;
        let node = obs
            .machines
            .iter()
            .find(|m| m.spec.zfs_node_id() == owner)
            .map_or_else(|| owner.clone(), |m| m.spec.node_name.clone());
        return Ok(FoundVolume {
            claim: claim.into(),
            volume: pv_name.into(),
            dataset: format!("{}/{}", zv.spec.pool_name, csi.volume_handle),
            node,
            backend: Backend::ZfsLocalPv,
        });
    }
    let Some(local) = spec.and_then(|s| s.local.as_ref()) else {
        return Err(not_zfs(
            "which is neither a local volume nor a zfs-localpv volume",
        ));
    };
    let node = affinity_node(pv)
        .ok_or_else(|| not_zfs("a local volume without required node affinity to one node"))?;
    let machine = machine_of_node(&obs.machines, &node).ok_or_else(|| {
        PlanError::new(
            Reason::UnknownMachine,
            format!(
                "PersistentVolume {pv_name} lives on node {node}, which has no ployz Machine; is the ployz agent running there?"
            ),
        )
    })?;
    let mountpoint = machine
        .status
        .as_ref()
        .and_then(|s| s.pool_mountpoint.clone())
        .ok_or_else(|| {
            PlanError::new(
                Reason::MachineNotReady,
                format!(
                    "Machine {} has not reported its pool's mountpoint yet; wait for its agent to be Ready",
                    name_of(machine)
                ),
            )
        })?;
    let dataset = local_dataset(&machine.spec.pool, &mountpoint, &local.path).ok_or_else(|| {
        not_zfs(&format!(
            "whose path {} is not below pool {} (mounted at {mountpoint}) on {node}",
            local.path, machine.spec.pool
        ))
    })?;
    Ok(FoundVolume {
        claim: claim.into(),
        volume: pv_name.into(),
        dataset,
        node,
        backend: Backend::Local {
            path: local.path.clone(),
        },
    })
}

pub fn machine_of_node<'a>(machines: &'a [Machine], node: &str) -> Option<&'a Machine> {
    machines
        .iter()
        .find(|m| m.spec.node_name == node)
        .or_else(|| machines.iter().find(|m| name_of(m) == node))
}

pub fn name_of(m: &Machine) -> &str {
    m.metadata.name.as_deref().unwrap_or_default()
}

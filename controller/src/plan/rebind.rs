//! Pure rewrites for the cutover: a PersistentVolume pointed at another node (node affinity
//! is immutable, so the PV is re-created under the same name and claim), and the pod
//! template's explicit node pinning.

use k8s_openapi::api::core::v1::{PersistentVolume, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

/// The PV `original` re-pointed from node `from` to node `to`: every required node-affinity
/// `In` value naming `from` names `to` instead, and a local PV's path becomes `path`.
/// Server-set metadata is dropped so the result can be created. Its reclaim policy is
/// `Retain` until the claim is bound again ([`reclaim_policy`] of the original is restored
/// then): a provisioner that honours the policy on deletion must never see this PV go
/// with `Delete`.
pub fn move_pv(
    original: &PersistentVolume,
    from: &str,
    to: &str,
    path: Option<&str>,
) -> PersistentVolume {
    let mut spec = original.spec.clone().unwrap_or_default();
    if let Some(req) = spec
        .node_affinity
        .as_mut()
        .and_then(|a| a.required.as_mut())
    {
        for term in &mut req.node_selector_terms {
            for expr in term.match_expressions.iter_mut().flatten() {
                if expr.operator != "In" {
                    continue;
                }
                for v in expr.values.iter_mut().flatten() {
                    if v == from {
                        *v = to.to_string();
                    }
                }
            }
        }
    }
    if let (Some(local), Some(path)) = (spec.local.as_mut(), path) {
        local.path = path.to_string();
    }
    if let Some(claim) = spec.claim_ref.as_mut() {
        claim.resource_version = None;
    }
    spec.persistent_volume_reclaim_policy = Some(RETAIN.into());
    PersistentVolume {
        metadata: ObjectMeta {
            name: original.metadata.name.clone(),
            labels: original.metadata.labels.clone(),
            annotations: original.metadata.annotations.clone(),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The reclaim policy that keeps the backing dataset whatever happens to the PV object.
pub const RETAIN: &str = "Retain";

/// A PV's reclaim policy (`Retain` when unset, as the API server defaults a static PV).
pub fn reclaim_policy(pv: &PersistentVolume) -> &str {
    pv.spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or(RETAIN)
}

/// True when the PV's node affinity names `node`.
pub fn pv_on_node(pv: &PersistentVolume, node: &str) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref()?.required.as_ref())
        .is_some_and(|r| {
            r.node_selector_terms
                .iter()
                .flat_map(|t| t.match_expressions.iter().flatten())
                .any(|e| e.operator == "In" && e.values.iter().flatten().any(|v| v == node))
        })
}

/// Explicit pinning of a pod template to a node: `nodeName`, or a `nodeSelector` value.
#[derive(Debug, Clone, PartialEq)]
pub struct Pinning {
    /// Merge patch of `spec.template.spec` that points the pods at the target.
    pub to_target: Value,
    /// Merge patch that restores the original pinning.
    pub original: Value,
}

/// The pinning to change, if the template pins its pods to `from`.
pub fn pinning(template: &PodTemplateSpec, from: &str, to: &str) -> Option<Pinning> {
    let spec = template.spec.as_ref()?;
    let mut to_target = serde_json::Map::new();
    let mut original = serde_json::Map::new();
    if spec.node_name.as_deref() == Some(from) {
        to_target.insert("nodeName".into(), json!(to));
        original.insert("nodeName".into(), json!(from));
    }
    let mut sel_to = serde_json::Map::new();
    let mut sel_orig = serde_json::Map::new();
    for (k, v) in spec.node_selector.iter().flatten() {
        if v == from {
            sel_to.insert(k.clone(), json!(to));
            sel_orig.insert(k.clone(), json!(from));
        }
    }
    if !sel_to.is_empty() {
        to_target.insert("nodeSelector".into(), Value::Object(sel_to));
        original.insert("nodeSelector".into(), Value::Object(sel_orig));
    }
    (!to_target.is_empty()).then_some(Pinning {
        to_target: Value::Object(to_target),
        original: Value::Object(original),
    })
}

/// What a PV recorded in status must be before ployz re-creates it from the record: the
/// claim's own PV, of a kind ployz moves, on the machine it came from. Status is writable by
/// more than the agents, so a record that is anything else (a hostPath, another claim's PV, a
/// path outside the pool) is refused rather than created.
#[derive(Debug, Clone, Copy)]
pub struct RecordedPv<'a> {
    pub volume: &'a str,
    pub namespace: &'a str,
    pub claim: &'a str,
    /// The live claim's UID, when the claim exists.
    pub claim_uid: Option<&'a str>,
    /// The node (or zfs-localpv node ID) the PV was on.
    pub node: &'a str,
    /// Mountpoint of that machine's pool: a local PV's path lies below it.
    pub pool_mountpoint: Option<&'a str>,
}

/// The fields of a PV spec that ployz moves as they are; anything else in a recorded spec
/// (`hostPath`, `nfs`, ...) was not written by ployz.
const PV_SPEC_FIELDS: [&str; 11] = [
    "accessModes",
    "capacity",
    "claimRef",
    "csi",
    "local",
    "mountOptions",
    "nodeAffinity",
    "persistentVolumeReclaimPolicy",
    "storageClassName",
    "volumeAttributesClassName",
    "volumeMode",
];

/// Checks a recorded PV against what it must be (see [`RecordedPv`]).
pub fn check_recorded_pv(pv: &PersistentVolume, want: &RecordedPv<'_>) -> Result<(), String> {
    if pv.metadata.name.as_deref() != Some(want.volume) {
        return Err(format!(
            "it is named {:?}, not {}",
            pv.metadata.name, want.volume
        ));
    }
    let spec = pv.spec.as_ref().ok_or("it has no spec")?;
    if let Ok(Value::Object(fields)) = serde_json::to_value(spec)
        && let Some(field) = fields
            .keys()
            .find(|k| !PV_SPEC_FIELDS.contains(&k.as_str()))
    {
        return Err(format!("it sets spec.{field}, which ployz never records"));
    }
    let claim = spec.claim_ref.as_ref().ok_or("it is bound to no claim")?;
    let uid_ok = match (claim.uid.as_deref(), want.claim_uid) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    if claim.namespace.as_deref() != Some(want.namespace)
        || claim.name.as_deref() != Some(want.claim)
        || !uid_ok
    {
        return Err(format!(
            "it is bound to claim {}/{} (uid {:?}), not to {}/{}",
            claim.namespace.as_deref().unwrap_or("?"),
            claim.name.as_deref().unwrap_or("?"),
            claim.uid,
            want.namespace,
            want.claim
        ));
    }
    match (&spec.local, &spec.csi) {
        (Some(local), None) => {
            if !want
                .pool_mountpoint
                .is_some_and(|mp| super::resolve::below(&local.path, mp))
            {
                return Err(format!(
                    "its path {} is not below the pool's mountpoint {:?}",
                    local.path, want.pool_mountpoint
                ));
            }
        }
        (None, Some(csi)) if csi.driver == crate::openebs::CSI_DRIVER => {
            if csi.volume_handle != want.volume {
                return Err(format!(
                    "its volume handle {} is not {}",
                    csi.volume_handle, want.volume
                ));
            }
        }
        _ => return Err("it is neither a local nor a zfs-localpv volume".into()),
    }
    if !pv_on_node(pv, want.node) {
        return Err(format!("its node affinity does not name {}", want.node));
    }
    Ok(())
}

/// A recorded original placement may only pin the pods back to `node`: `nodeName` and
/// `nodeSelector` values naming it, nothing else (it is merged into the pod template).
pub fn check_recorded_pinning(original: &Value, node: &str) -> Result<(), String> {
    let fields = original.as_object().ok_or("it is not an object")?;
    for (field, value) in fields {
        let ok = match field.as_str() {
            "nodeName" => value.as_str() == Some(node),
            "nodeSelector" => value
                .as_object()
                .is_some_and(|m| m.values().all(|v| v.as_str() == Some(node))),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "it sets {field}: {value}, which is not pinning to {node}"
            ));
        }
    }
    Ok(())
}

/// A recorded zfs-localpv owner (the ZFSVolume's `ownerNodeID` and `poolName`, restored on
/// rollback) must name the source machine and a dataset of its pool.
/// Whether the pods of workload `workload` mount `claim`: one its pod template names, or one a
/// StatefulSet makes from its volumeClaimTemplates (`TEMPLATE-STATEFULSET-ORDINAL`, any
/// ordinal, since it is scaled to zero during a move). A binding recorded in status is
/// rebound only then, so it cannot name another workload's claim of the same namespace.
pub fn workload_mounts(
    workload: &str,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    claim_templates: &[String],
    claim: &str,
) -> bool {
    super::resolve::template_claims(template)
        .iter()
        .any(|c| c == claim)
        || claim_templates.iter().any(|t| {
            claim
                .strip_prefix(&super::resolve::template_claim_prefix(t, workload))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
}

pub fn check_recorded_owner(spec: &Value, node_id: &str, pool: &str) -> Result<(), String> {
    let owner = spec["ownerNodeID"].as_str().unwrap_or_default();
    let pool_name = spec["poolName"].as_str().unwrap_or_default();
    if owner != node_id {
        return Err(format!("its ownerNodeID {owner:?} is not {node_id}"));
    }
    if pool_name != pool && !pool_name.starts_with(&format!("{pool}/")) {
        return Err(format!("its poolName {pool_name:?} is not in pool {pool}"));
    }
    Ok(())
}

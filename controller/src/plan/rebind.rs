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

//! Which workloads live on a machine: those whose volumes the planner resolves to it. Pure,
//! for `ployzctl machine drain`, which moves each of them away.

use super::Observed;
use super::rebind::pv_on_node;
use super::resolve::{self, FoundVolume, Workload};

/// A workload with a volume on the machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Resident {
    pub namespace: String,
    pub workload: Workload,
    /// Its volumes, when the planner resolves all of them; else why it cannot move them.
    pub volumes: Result<Vec<FoundVolume>, String>,
}

/// The Deployments and StatefulSets of `obs` with a volume on `node`: every volume resolved
/// to it, or (when one of its volumes cannot be resolved) a claim bound to a PV pinned to it,
/// so that a workload ployz cannot move is reported rather than silently left behind.
pub fn residents(obs: &Observed, node: &str) -> Vec<Resident> {
    let mut found = vec![];
    for w in resolve::workloads(obs) {
        let volumes = match resolve::volumes(obs, &w) {
            Ok(v) if v.iter().any(|v| v.node == node) => Ok(v),
            Ok(_) => continue,
            Err(e) if pinned_here(obs, &w, node) => Err(e.message),
            Err(_) => continue,
        };
        found.push(Resident {
            namespace: obs.namespace.clone(),
            workload: w,
            volumes,
        });
    }
    found
}

fn pinned_here(obs: &Observed, w: &Workload, node: &str) -> bool {
    w.claims.iter().any(|claim| {
        let volume = obs
            .claims
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(claim))
            .and_then(|c| c.spec.as_ref()?.volume_name.clone());
        obs.volumes.iter().any(|pv| {
            pv.metadata.name.is_some() && pv.metadata.name == volume && pv_on_node(pv, node)
        })
    })
}

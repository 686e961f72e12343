//! What an agent may write, as pure functions of the write and the live objects it concerns.
//!
//! A ValidatingAdmissionPolicy sees only the object under admission, so it can hold an agent
//! to *what* it writes (placement, never the image) but not to *which* objects: "a Migration
//! of this node holds this workload's lock" relates two objects. These rules do, for the
//! writes the agents' RBAC allows (workloads, PersistentVolumes, claims, ZFSVolumes):
//!
//! - a workload: only while a Migration whose target or planned source is the agent's node
//!   holds its lock (`ployz.dev/migration`), and only its replicas (through `/scale`), its
//!   pods' node pinning (to either end of that Migration) and the lock itself; the lock is taken only by the target's
//!   agent, for the workload its Migration names, when no live Migration holds it;
//! - a PV, a claim or a ZFSVolume: only one bound to a claim the locked workload mounts (the
//!   claim's UID and volume name agree with the PV), and a PV only on either end's node.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::agent::LOCK_ANNOTATION;

/// A Migration of the request's namespace, as the guard judges it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Holder {
    pub name: String,
    /// Succeeded, Failed or Cancelled.
    pub terminal: bool,
    /// Its deletion was requested.
    pub deleting: bool,
    /// The node of the machine it moves to (`spec.to`).
    pub target_node: String,
    /// The node of the machine its plan moves from, once planned.
    pub source_node: Option<String>,
    /// Its `spec.service` designates the workload under admission (the workload's own name,
    /// or a Service whose selector its pods carry).
    pub designates: bool,
    /// Its locked workload mounts the claim under admission (PV, claim and ZFSVolume writes).
    pub mounts_claim: bool,
}

impl Holder {
    fn concerns(&self, node: &str) -> bool {
        self.target_node == node || self.source_node.as_deref() == Some(node)
    }

    fn ends(&self) -> String {
        match &self.source_node {
            Some(s) => format!("{s} and {}", self.target_node),
            None => self.target_node.clone(),
        }
    }
}

/// The workload's lock: the Migration its annotation names.
fn lock(o: &Value) -> Option<&str> {
    o["metadata"]["annotations"][LOCK_ANNOTATION].as_str()
}

/// Pod-template fields that pin pods to a node: what a move changes.
const PINNING: [&str; 2] = ["nodeName", "nodeSelector"];

/// `o` without what an agent may change on a locked workload itself: pinning and the lock
/// (replicas change through the `/scale` subresource).
fn fixed_part(o: &Value) -> Value {
    let mut spec = o["spec"].clone();
    if let Some(t) = spec["template"]["spec"].as_object_mut() {
        for f in PINNING {
            t.remove(f);
        }
    }
    let mut annotations = o["metadata"]["annotations"].clone();
    if let Some(a) = annotations.as_object_mut() {
        a.remove(LOCK_ANNOTATION);
    }
    serde_json::json!({
        "spec": spec,
        "labels": o["metadata"]["labels"],
        "annotations": annotations,
    })
}

/// The nodes a template pins to that it did not before.
fn new_pins(old: &Value, new: &Value) -> Vec<String> {
    let (o, n) = (
        &old["spec"]["template"]["spec"],
        &new["spec"]["template"]["spec"],
    );
    let mut pins = vec![];
    if n["nodeName"] != o["nodeName"]
        && let Some(name) = n["nodeName"].as_str()
    {
        pins.push(name.to_string());
    }
    for (k, v) in n["nodeSelector"].as_object().into_iter().flatten() {
        if o["nodeSelector"][k] != *v {
            pins.push(v.as_str().unwrap_or_default().to_string());
        }
    }
    pins
}

fn holder<'a>(holders: &'a [Holder], name: &str) -> Option<&'a Holder> {
    holders.iter().find(|h| h.name == name)
}

/// An UPDATE of a Deployment or StatefulSet (`what`, for messages: `Deployment ns/name`) by
/// the agent of `node`, judged against the namespace's Migrations.
pub fn workload_update(
    node: &str,
    what: &str,
    old: &Value,
    new: &Value,
    holders: &[Holder],
) -> Result<(), String> {
    if fixed_part(old) != fixed_part(new) {
        return Err(format!(
            "a ployz agent changes only the node pinning and lock of a workload (and its replicas through /scale); this write to {what} changes more"
        ));
    }
    let live = |name: &str| holder(holders, name).filter(|h| !h.terminal);
    let (old_lock, new_lock) = (lock(old), lock(new));
    let pins = new_pins(old, new);
    if old_lock != new_lock && !pins.is_empty() {
        return Err(format!(
            "taking or releasing the lock of {what} changes nothing else in the same write"
        ));
    }
    if let Some(m) = new_lock.filter(|m| old_lock != Some(*m)) {
        // Taking the lock (or a finished Migration's place).
        if let Some(other) = old_lock.and_then(live) {
            return Err(format!(
                "{what} is locked by Migration {}, which is still running; a second Migration cannot take it",
                other.name
            ));
        }
        let Some(h) = live(m).filter(|h| !h.deleting) else {
            return Err(format!(
                "{what} can be locked only for a running Migration of its namespace; {m} is none"
            ));
        };
        if h.target_node != node {
            return Err(format!(
                "only the agent of the target node {} locks {what} for Migration {m}, not the agent of {node}",
                h.target_node
            ));
        }
        if !h.designates {
            return Err(format!(
                "Migration {m} does not name {what} (spec.service); its lock goes on the workload it names"
            ));
        }
        return Ok(());
    }
    match (old_lock, new_lock) {
        (Some(m), None) => match live(m) {
            // A lock its Migration no longer needs: anyone may release it.
            None => Ok(()),
            Some(h) if h.concerns(node) => Ok(()),
            Some(h) => Err(format!(
                "the agent of node {node} may not release the lock of {what}: Migration {m} moves it between {}",
                h.ends()
            )),
        },
        (Some(m), Some(_)) => {
            let h = end_of_holder(node, what, m, holders)?;
            for pin in pins {
                if !h.concerns(&pin) {
                    return Err(format!(
                        "{what} may be pinned only to {} (the ends of Migration {m}), not to {pin:?}",
                        h.ends()
                    ));
                }
            }
            Ok(())
        }
        (None, _) => Err(unlocked(node, what)),
    }
}

fn unlocked(node: &str, what: &str) -> String {
    format!(
        "the agent of node {node} may change {what} only while a Migration it is the source or target of holds its lock ({LOCK_ANNOTATION}); it holds none. Move a workload with a Migration"
    )
}

/// The running Migration `m` holding a workload's lock, when `node` is one of its ends.
fn end_of_holder<'a>(
    node: &str,
    what: &str,
    m: &str,
    holders: &'a [Holder],
) -> Result<&'a Holder, String> {
    let Some(h) = holder(holders, m).filter(|h| !h.terminal) else {
        return Err(format!(
            "{what} is locked by Migration {m}, which is over or gone; only releasing the lock is allowed"
        ));
    };
    if !h.concerns(node) {
        return Err(format!(
            "the agent of node {node} may change {what} only for a Migration it is the source or target of; Migration {m} moves it between {}",
            h.ends()
        ));
    }
    Ok(h)
}

/// A write of a workload's `/scale` subresource (its replicas) by the agent of `node`; `lock`
/// is the live workload's lock.
pub fn scale_update(
    node: &str,
    what: &str,
    lock: Option<&str>,
    holders: &[Holder],
) -> Result<(), String> {
    match lock {
        Some(m) => end_of_holder(node, what, m, holders).map(|_| ()),
        None => Err(unlocked(node, what)),
    }
}

/// The claim a PV is bound to, as the guard found it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Claim {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.volumeName`.
    pub volume: String,
}

/// The nodes a PV's required node affinity admits (`kubernetes.io/hostname` values).
fn pv_nodes(pv: &Value) -> Vec<String> {
    let terms = &pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"];
    terms
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["matchExpressions"].as_array().into_iter().flatten())
        .flat_map(|e| e["values"].as_array().into_iter().flatten())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// The Migration that lets `node` write a volume of `claim`: one holding the lock of a
/// workload that mounts the claim, with `node` at one of its ends.
fn volume_holder<'a>(
    node: &str,
    what: &str,
    claim: &Claim,
    holders: &'a [Holder],
) -> Result<&'a Holder, String> {
    let mounting: Vec<&Holder> = holders
        .iter()
        .filter(|h| h.mounts_claim && !h.terminal)
        .collect();
    if let Some(h) = mounting.iter().find(|h| h.concerns(node)) {
        return Ok(h);
    }
    match mounting.first() {
        Some(h) => Err(format!(
            "the agent of node {node} may not change {what}: Migration {} moves its claim {}/{} between {}",
            h.name,
            claim.namespace,
            claim.name,
            h.ends()
        )),
        None => Err(format!(
            "the agent of node {node} may change {what} only while a Migration it is the source or target of holds the lock of a workload mounting its claim {}/{}; none does",
            claim.namespace, claim.name
        )),
    }
}

/// A CREATE, UPDATE or DELETE of PersistentVolume `name` (`pv`: the new object, or the old
/// one of a DELETE) by the agent of `node`; `claim` is the claim its claimRef names.
pub fn pv_write(
    node: &str,
    name: &str,
    pv: &Value,
    deleting: bool,
    claim: Option<&Claim>,
    holders: &[Holder],
) -> Result<(), String> {
    let what = format!("PersistentVolume {name}");
    let Some(claim) = claim else {
        return Err(format!(
            "a ployz agent changes only PersistentVolumes bound to a claim; {what} names no existing claim"
        ));
    };
    let r = &pv["spec"]["claimRef"];
    let uid_ok = r["uid"].as_str().is_none_or(|u| u == claim.uid);
    if claim.volume != name || !uid_ok {
        return Err(format!(
            "{what} is not the volume of claim {}/{} (the claim is bound to {:?})",
            claim.namespace, claim.name, claim.volume
        ));
    }
    let h = volume_holder(node, &what, claim, holders)?;
    if !deleting {
        for n in pv_nodes(pv) {
            if !h.concerns(&n) {
                return Err(format!(
                    "{what} may be bound only to {} (the ends of Migration {}), not to node {n:?}",
                    h.ends(),
                    h.name
                ));
            }
        }
    }
    Ok(())
}

/// An UPDATE of claim `claim` by the agent of `node`: its metadata (a nudge to the PV
/// controller), never its spec.
pub fn claim_update(
    node: &str,
    claim: &Claim,
    old: &Value,
    new: &Value,
    holders: &[Holder],
) -> Result<(), String> {
    let what = format!("PersistentVolumeClaim {}/{}", claim.namespace, claim.name);
    if old["spec"] != new["spec"] {
        return Err(format!("a ployz agent never changes the spec of {what}"));
    }
    volume_holder(node, &what, claim, holders).map(|_| ())
}

/// Whether `labels` carry every label a (non-empty) `selector` asks for.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(lock: Option<&str>, replicas: i32, pin: Option<&str>) -> Value {
        let mut d = json!({
            "metadata": {"name": "web", "labels": {"app": "web"}, "annotations": {"team": "a"}},
            "spec": {"replicas": replicas, "template": {"spec": {
                "containers": [{"name": "web", "image": "web:1"}]}}},
        });
        if let Some(l) = lock {
            d["metadata"]["annotations"][LOCK_ANNOTATION] = json!(l);
        }
        if let Some(p) = pin {
            d["spec"]["template"]["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": p});
        }
        d
    }

    fn moving(name: &str, from: Option<&str>, to: &str) -> Holder {
        Holder {
            name: name.into(),
            target_node: to.into(),
            source_node: from.map(str::to_string),
            designates: true,
            mounts_claim: true,
            ..Holder::default()
        }
    }

    const W: &str = "Deployment ns/web";

    #[test]
    fn an_unlocked_workload_is_changed_by_no_agent() {
        let (old, new) = (deployment(None, 0, None), deployment(None, 0, Some("a")));
        let r = workload_update("a", W, &old, &new, &[]);
        assert!(r.is_err_and(|e| e.contains("holds none")));
    }

    #[test]
    fn a_workload_is_scaled_only_by_the_ends_of_the_migration_holding_its_lock() {
        let hs = [moving("m", Some("a"), "b")];
        assert_eq!(scale_update("a", W, Some("m"), &hs), Ok(()));
        assert_eq!(scale_update("b", W, Some("m"), &hs), Ok(()));
        let r = scale_update("c", W, Some("m"), &hs);
        assert!(r.is_err_and(|e| e.contains("between a and b")));
        assert!(scale_update("a", W, None, &hs).is_err_and(|e| e.contains("holds none")));
        let over = [Holder {
            terminal: true,
            ..moving("m", Some("a"), "b")
        }];
        assert!(scale_update("a", W, Some("m"), &over).is_err_and(|e| e.contains("over or gone")));
    }

    #[test]
    fn a_workload_is_pinned_only_by_the_ends_of_the_migration_holding_its_lock() {
        let hs = [moving("m", Some("a"), "b")];
        let (old, new) = (
            deployment(Some("m"), 0, None),
            deployment(Some("m"), 0, Some("b")),
        );
        assert_eq!(workload_update("a", W, &old, &new, &hs), Ok(()));
        assert_eq!(workload_update("b", W, &old, &new, &hs), Ok(()));
        let r = workload_update("c", W, &old, &new, &hs);
        assert!(r.is_err_and(|e| e.contains("between a and b")));
    }

    #[test]
    fn replicas_change_only_through_scale() {
        let hs = [moving("m", Some("a"), "b")];
        let (old, new) = (
            deployment(Some("m"), 1, None),
            deployment(Some("m"), 0, None),
        );
        let r = workload_update("a", W, &old, &new, &hs);
        assert!(r.is_err_and(|e| e.contains("through /scale")));
    }

    #[test]
    fn a_locked_workload_is_pinned_only_to_an_end_of_its_migration() {
        let hs = [moving("m", Some("a"), "b")];
        let old = deployment(Some("m"), 0, Some("a"));
        let to_b = deployment(Some("m"), 0, Some("b"));
        assert_eq!(workload_update("a", W, &old, &to_b, &hs), Ok(()));
        let to_c = deployment(Some("m"), 0, Some("c"));
        let r = workload_update("a", W, &old, &to_c, &hs);
        assert!(r.is_err_and(|e| e.contains("not to \"c\"")));
    }

    #[test]
    fn an_agent_never_changes_what_a_workload_runs() {
        let hs = [moving("m", Some("a"), "b")];
        let old = deployment(Some("m"), 1, None);
        let mut new = old.clone();
        new["spec"]["template"]["spec"]["containers"][0]["image"] = json!("evil:1");
        assert!(
            workload_update("a", W, &old, &new, &hs).is_err_and(|e| e.contains("changes more"))
        );
        let mut new = old.clone();
        new["metadata"]["labels"]["app"] = json!("other");
        assert!(workload_update("a", W, &old, &new, &hs).is_err());
    }

    #[test]
    fn only_the_target_locks_the_workload_its_migration_names() {
        let hs = [moving("m", None, "b")];
        let (old, new) = (deployment(None, 1, None), deployment(Some("m"), 1, None));
        assert_eq!(workload_update("b", W, &old, &new, &hs), Ok(()));
        let r = workload_update("a", W, &old, &new, &hs);
        assert!(r.is_err_and(|e| e.contains("only the agent of the target node b")));
        let other = [Holder {
            designates: false,
            ..moving("m", None, "b")
        }];
        let r = workload_update("b", W, &old, &new, &other);
        assert!(r.is_err_and(|e| e.contains("does not name")));
        let r = workload_update("b", W, &old, &deployment(Some("ghost"), 1, None), &hs);
        assert!(r.is_err_and(|e| e.contains("ghost is none")));
    }

    #[test]
    fn a_lock_held_by_a_running_migration_is_not_taken() {
        let hs = [moving("first", Some("a"), "b"), moving("second", None, "c")];
        let (old, new) = (
            deployment(Some("first"), 1, None),
            deployment(Some("second"), 1, None),
        );
        let r = workload_update("c", W, &old, &new, &hs);
        assert!(r.is_err_and(|e| e.contains("locked by Migration first")));
        let done = [
            Holder {
                terminal: true,
                ..moving("first", Some("a"), "b")
            },
            moving("second", None, "c"),
        ];
        assert_eq!(workload_update("c", W, &old, &new, &done), Ok(()));
    }

    #[test]
    fn a_finished_migration_s_lock_lets_nobody_change_the_workload() {
        let hs = [Holder {
            terminal: true,
            ..moving("m", Some("a"), "b")
        }];
        let (old, new) = (
            deployment(Some("m"), 0, None),
            deployment(Some("m"), 0, Some("b")),
        );
        let r = workload_update("a", W, &old, &new, &hs);
        assert!(r.is_err_and(|e| e.contains("over or gone")));
    }

    #[test]
    fn releasing_a_stale_lock_pins_nothing() {
        let (old, new) = (
            deployment(Some("m"), 0, None),
            deployment(None, 0, Some("c")),
        );
        let r = workload_update("c", W, &old, &new, &[]);
        assert!(r.is_err_and(|e| e.contains("changes nothing else")));
    }

    #[test]
    fn a_lock_is_released_by_an_end_or_once_its_migration_is_over() {
        let (old, new) = (deployment(Some("m"), 1, None), deployment(None, 1, None));
        let hs = [moving("m", Some("a"), "b")];
        assert_eq!(workload_update("a", W, &old, &new, &hs), Ok(()));
        assert!(workload_update("c", W, &old, &new, &hs).is_err());
        assert_eq!(workload_update("c", W, &old, &new, &[]), Ok(()));
    }

    fn pv(claim_uid: &str, node: &str) -> Value {
        json!({"spec": {
            "claimRef": {"namespace": "ns", "name": "data", "uid": claim_uid},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
        }})
    }

    fn claim() -> Claim {
        Claim {
            namespace: "ns".into(),
            name: "data".into(),
            uid: "u1".into(),
            volume: "pv-1".into(),
        }
    }

    #[test]
    fn a_pv_is_rewritten_only_for_a_locked_workload_s_claim_by_its_ends() {
        let hs = [moving("m", Some("a"), "b")];
        let c = claim();
        assert_eq!(
            pv_write("a", "pv-1", &pv("u1", "b"), false, Some(&c), &hs),
            Ok(())
        );
        assert_eq!(
            pv_write("b", "pv-1", &pv("u1", "a"), true, Some(&c), &hs),
            Ok(())
        );
        let r = pv_write("c", "pv-1", &pv("u1", "b"), false, Some(&c), &hs);
        assert!(r.is_err_and(|e| e.contains("between a and b")));
        let unlocked = [Holder {
            mounts_claim: false,
            ..moving("m", Some("a"), "b")
        }];
        let r = pv_write("a", "pv-1", &pv("u1", "b"), false, Some(&c), &unlocked);
        assert!(r.is_err_and(|e| e.contains("none does")));
    }

    #[test]
    fn a_pv_goes_only_to_an_end_and_only_as_its_claim_s_volume() {
        let hs = [moving("m", Some("a"), "b")];
        let c = claim();
        let r = pv_write("a", "pv-1", &pv("u1", "c"), false, Some(&c), &hs);
        assert!(r.is_err_and(|e| e.contains("not to node \"c\"")));
        let r = pv_write("a", "pv-1", &pv("other-uid", "b"), false, Some(&c), &hs);
        assert!(r.is_err_and(|e| e.contains("not the volume of claim")));
        let r = pv_write("a", "pv-2", &pv("u1", "b"), false, Some(&c), &hs);
        assert!(r.is_err_and(|e| e.contains("not the volume of claim")));
        let r = pv_write("a", "pv-1", &pv("u1", "b"), false, None, &hs);
        assert!(r.is_err_and(|e| e.contains("names no existing claim")));
    }

    #[test]
    fn a_claim_is_touched_never_respecified() {
        let hs = [moving("m", Some("a"), "b")];
        let old = json!({"metadata": {}, "spec": {"volumeName": "pv-1"}});
        let mut touched = old.clone();
        touched["metadata"]["annotations"] = json!({"ployz.dev/rebound": "now"});
        assert_eq!(claim_update("a", &claim(), &old, &touched, &hs), Ok(()));
        let mut moved = old.clone();
        moved["spec"]["volumeName"] = json!("pv-9");
        assert!(claim_update("a", &claim(), &old, &moved, &hs).is_err());
        assert!(claim_update("c", &claim(), &old, &touched, &hs).is_err());
    }
}

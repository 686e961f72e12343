//! Who may send what. A peer is the machine its certificate names when it holds the key that
//! Machine publishes. The receiver accepts a stream only for a Migration that exists, targets
//! this machine, comes from the peer machine (by its certificate), is in a sending phase, and
//! names the claim; the destination dataset is computed here, under this machine's parent
//! dataset. Nothing a sender says can make the receiver write elsewhere. The plan comes from
//! the Migration's status, which the source's agent writes: the volume it names for the claim
//! must be, live, the PersistentVolume that claim of the Migration's namespace is bound to, so
//! a forged plan cannot aim a stream at another volume's replica.

use std::future::Future;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::{Api, Client};

use super::protocol::{Action, Hello, RefusalReason};
use super::tls::Pin;
use crate::api::{Machine, Migration, Phase};
use crate::zfs::DatasetName;

/// Permission to receive one volume into `dataset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub dataset: DatasetName,
    /// The claim (`namespace/name`) whose volume it is: an existing dataset must hold that
    /// claim's volume (`Dataset::holds_claim`).
    pub claim: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub reason: RefusalReason,
    pub message: String,
}

fn refuse(reason: RefusalReason, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
    }
}

/// Decides who a peer is, and whether it may send for a `Hello`.
pub trait Authorizer: Send + Sync {
    /// Whether `pin` is the key machine `peer` (named by its certificate) publishes.
    fn authenticate(
        &self,
        peer: &str,
        pin: &Pin,
    ) -> impl Future<Output = Result<(), Refusal>> + Send;

    /// Whether `peer`, authenticated, may send for `hello`.
    fn authorize(
        &self,
        peer: &str,
        hello: &Hello,
    ) -> impl Future<Output = Result<Grant, Refusal>> + Send;
}

/// Where a volume lives on a machine: one dataset per PersistentVolume under the parent.
/// The planner and the receiver both use this, so they always agree.
pub fn volume_dataset(parent: &DatasetName, volume: &str) -> Result<DatasetName, String> {
    parent
        .child(volume)
        .map_err(|e| format!("volume {volume:?} cannot name a dataset under {parent}: {e}"))
}

/// A peer is the machine its certificate names only when it holds the key that Machine
/// publishes (the pure check, given the Machine as read from the API).
pub fn check_pin(peer: &str, presented: &Pin, machine: Option<&Machine>) -> Result<(), Refusal> {
    let m = machine.ok_or_else(|| {
        refuse(
            RefusalReason::UnknownPeer,
            format!("no Machine {peer} exists; only machines with a ployz agent may connect"),
        )
    })?;
    let published = m.status.as_ref().and_then(|s| s.tls_pin.as_deref());
    match published {
        Some(p) if p == presented.as_str() => Ok(()),
        Some(p) => Err(refuse(
            RefusalReason::UnknownPeer,
            format!(
                "the client's key {presented} is not the key Machine {peer} publishes ({p}); \
                 if that agent just restarted, it retries with its new key"
            ),
        )),
        None => Err(refuse(
            RefusalReason::UnknownPeer,
            format!("Machine {peer} publishes no key (status.tlsPin); is its agent running?"),
        )),
    }
}

/// The pure decision, given the Migration as read from the API.
pub fn decide(
    machine: &str,
    parent: &DatasetName,
    peer: &str,
    hello: &Hello,
    migration: Option<&Migration>,
) -> Result<Grant, Refusal> {
    let key = &hello.migration;
    let m = migration.ok_or_else(|| {
        refuse(
            RefusalReason::UnknownMigration,
            format!("no Migration {key} exists; the receiver only accepts streams for existing migrations"),
        )
    })?;
    let status = m.status.as_ref();
    let plan = status.and_then(|s| s.plan.as_ref()).ok_or_else(|| {
        refuse(
            RefusalReason::NotPlanned,
            format!("Migration {key} has no plan yet"),
        )
    })?;
    if plan.target != machine {
        return Err(refuse(
            RefusalReason::NotForThisMachine,
            format!(
                "Migration {key} moves to {}, not to this machine ({machine})",
                plan.target
            ),
        ));
    }
    if plan.source != peer {
        return Err(refuse(
            RefusalReason::WrongPeer,
            format!(
                "Migration {key} moves from {}, but the sender's certificate is for {peer}",
                plan.source
            ),
        ));
    }
    let phase = status.and_then(|s| s.phase);
    let allowed = match hello.action {
        Action::Receive => matches!(phase, Some(Phase::Sending | Phase::CuttingOver)),
        Action::Promote => phase == Some(Phase::CuttingOver),
        Action::Demote => matches!(phase, Some(Phase::CuttingOver | Phase::RollingBack)),
    };
    if !allowed {
        return Err(refuse(
            RefusalReason::NotSending,
            format!(
                "Migration {key} is in phase {phase:?}, which does not allow {:?}",
                hello.action
            ),
        ));
    }
    let volume = plan
        .volumes
        .iter()
        .find(|v| v.claim == hello.claim)
        .ok_or_else(|| {
            refuse(
                RefusalReason::UnknownVolume,
                format!("Migration {key} does not move claim {:?}", hello.claim),
            )
        })?;
    let dataset = volume_dataset(parent, &volume.volume)
        .map_err(|e| refuse(RefusalReason::OutsideParent, e))?;
    if volume.target_dataset != dataset.as_str() {
        return Err(refuse(
            RefusalReason::OutsideParent,
            format!(
                "Migration {key} plans claim {:?} into {:?}; this machine receives it only as {dataset}",
                hello.claim, volume.target_dataset
            ),
        ));
    }
    Ok(Grant {
        dataset,
        claim: crate::zfs::claim_owner(&key.namespace, &hello.claim),
    })
}

/// The live binding behind a granted volume: PV `volume` is bound to claim `namespace/claim`
/// (its claimRef, with the claim's UID when both carry one) and the claim names that PV.
pub fn check_volume(
    namespace: &str,
    claim: &str,
    volume: &str,
    pv: Option<&PersistentVolume>,
    pvc: Option<&PersistentVolumeClaim>,
) -> Result<(), Refusal> {
    let foreign = |why: String| {
        refuse(
            RefusalReason::UnknownVolume,
            format!(
                "the plan maps claim {namespace}/{claim} to PersistentVolume {volume}, but {why}; the receiver follows only live bindings"
            ),
        )
    };
    let pv = pv.ok_or_else(|| foreign(format!("{volume} does not exist")))?;
    let pvc = pvc.ok_or_else(|| foreign(format!("claim {namespace}/{claim} does not exist")))?;
    let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    let bound_to = claim_ref.map(|r| {
        (
            r.namespace.as_deref().unwrap_or_default(),
            r.name.as_deref().unwrap_or_default(),
        )
    });
    if bound_to != Some((namespace, claim)) {
        return Err(foreign(format!(
            "{volume} is bound to {}",
            bound_to.map_or("no claim".to_string(), |(n, c)| format!("claim {n}/{c}"))
        )));
    }
    if let (Some(a), Some(b)) = (
        claim_ref.and_then(|r| r.uid.as_deref()),
        pvc.metadata.uid.as_deref(),
    ) && a != b
    {
        return Err(foreign(format!(
            "{volume} is bound to an earlier claim of that name (uid {a}, not {b})"
        )));
    }
    let named = pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    if named != Some(volume) {
        return Err(foreign(format!(
            "the claim names PersistentVolume {}",
            named.unwrap_or("none")
        )));
    }
    Ok(())
}

/// Reads the Migration from the Kubernetes API.
#[derive(Clone)]
pub struct KubeAuthorizer {
    pub client: Client,
    pub machine: String,
    pub parent: DatasetName,
}

impl std::fmt::Debug for KubeAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuthorizer")
            .field("machine", &self.machine)
            .field("parent", &self.parent)
            .finish()
    }
}

impl Authorizer for KubeAuthorizer {
    async fn authenticate(&self, peer: &str, pin: &Pin) -> Result<(), Refusal> {
        let api: Api<Machine> = Api::all(self.client.clone());
        let m = api.get_opt(peer).await.map_err(|e| {
            refuse(
                RefusalReason::Internal,
                format!("reading Machine {peer}: {e}"),
            )
        })?;
        check_pin(peer, pin, m.as_ref())
    }

    async fn authorize(&self, peer: &str, hello: &Hello) -> Result<Grant, Refusal> {
        let api: Api<Migration> = Api::namespaced(self.client.clone(), &hello.migration.namespace);
        let m = api.get_opt(&hello.migration.name).await.map_err(|e| {
            refuse(
                RefusalReason::Internal,
                format!("reading Migration {}: {e}", hello.migration),
            )
        })?;
        let grant = decide(&self.machine, &self.parent, peer, hello, m.as_ref())?;
        let ns = &hello.migration.namespace;
        let volume = m
            .as_ref()
            .and_then(|m| m.status.as_ref()?.plan.as_ref())
            .and_then(|p| p.volumes.iter().find(|v| v.claim == hello.claim))
            .map(|v| v.volume.clone())
            .unwrap_or_default();
        let internal = |what: &str, e: kube::Error| {
            refuse(RefusalReason::Internal, format!("reading {what}: {e}"))
        };
        let pv = Api::<PersistentVolume>::all(self.client.clone())
            .get_opt(&volume)
            .await
            .map_err(|e| internal(&format!("PersistentVolume {volume}"), e))?;
        let pvc = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), ns)
            .get_opt(&hello.claim)
            .await
            .map_err(|e| internal(&format!("claim {ns}/{}", hello.claim), e))?;
        check_volume(ns, &hello.claim, &volume, pv.as_ref(), pvc.as_ref())?;
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MigrationPlan, MigrationSpec, MigrationStatus, VolumePlan, WorkloadRef};
    use crate::transfer::protocol::{MigrationKey, PROTOCOL_VERSION};

    fn migration(phase: Phase, target_dataset: &str) -> Migration {
        let mut m = Migration::new(
            "m",
            MigrationSpec {
                service: "web".into(),
                to: "b".into(),
                from: None,
                transfer: None,
                timeouts: None,
                source_copy: None,
            },
        );
        m.status = Some(MigrationStatus {
            phase: Some(phase),
            plan: Some(MigrationPlan {
                source: "a".into(),
                target: "b".into(),
                workload: WorkloadRef {
                    kind: "Deployment".into(),
                    name: "web".into(),
                },
                volumes: vec![VolumePlan {
                    claim: "data".into(),
                    volume: "pv-1".into(),
                    source_dataset: "tank/ployz/pv-1".into(),
                    target_dataset: target_dataset.into(),
                    base: None,
                    estimated_bytes: None,
                }],
            }),
            ..MigrationStatus::default()
        });
        m
    }

    fn hello(claim: &str) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            migration: MigrationKey {
                namespace: "ns".into(),
                name: "m".into(),
            },
            claim: claim.into(),
            action: Action::Receive,
        }
    }

    fn parent() -> DatasetName {
        "tank/ployz".parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn reason(r: Result<Grant, Refusal>) -> Option<RefusalReason> {
        r.err().map(|e| e.reason)
    }

    #[test]
    fn grants_the_planned_volume_under_the_parent() {
        let m = migration(Phase::Sending, "tank/ployz/pv-1");
        let g = decide("b", &parent(), "a", &hello("data"), Some(&m));
        assert_eq!(
            g.map(|g| g.dataset.to_string()),
            Ok("tank/ployz/pv-1".to_string())
        );
    }

    fn machine_publishing(pin: Option<&Pin>) -> Machine {
        let mut m = Machine::new(
            "a",
            crate::api::MachineSpec {
                node_name: "a".into(),
                pool: "tank".into(),
                parent_dataset: "tank/ployz".into(),
                endpoint: "198.18.0.1:7420".into(),
                draining: false,
                zfs_node_id: None,
            },
        );
        m.status = Some(crate::api::MachineStatus {
            tls_pin: pin.map(|p| p.to_string()),
            ..Default::default()
        });
        m
    }

    fn pin(hex: char) -> Pin {
        format!("sha256:{}", hex.to_string().repeat(64))
            .parse()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_peer_is_the_machine_it_names_only_with_the_key_that_machine_publishes() {
        let (key, other) = (pin('a'), pin('b'));
        assert!(check_pin("a", &key, Some(&machine_publishing(Some(&key)))).is_ok());
        for (machine, why) in [
            (Some(machine_publishing(Some(&other))), "another key"),
            (Some(machine_publishing(None)), "no key published"),
            (None, "no Machine"),
        ] {
            let r = check_pin("a", &key, machine.as_ref());
            assert_eq!(
                r.map_err(|e| e.reason),
                Err(RefusalReason::UnknownPeer),
                "{why}"
            );
        }
    }

    #[test]
    fn refuses_everything_else() {
        let ok = migration(Phase::Sending, "tank/ployz/pv-1");
        assert_eq!(
            reason(decide("b", &parent(), "a", &hello("data"), None)),
            Some(RefusalReason::UnknownMigration)
        );
        assert_eq!(
            reason(decide("c", &parent(), "a", &hello("data"), Some(&ok))),
            Some(RefusalReason::NotForThisMachine)
        );
        assert_eq!(
            reason(decide("b", &parent(), "x", &hello("data"), Some(&ok))),
            Some(RefusalReason::WrongPeer)
        );
        assert_eq!(
            reason(decide("b", &parent(), "a", &hello("other"), Some(&ok))),
            Some(RefusalReason::UnknownVolume)
        );
        let mut promote = hello("data");
        promote.action = Action::Promote;
        assert_eq!(
            reason(decide("b", &parent(), "a", &promote, Some(&ok))),
            Some(RefusalReason::NotSending),
            "promotion only during cutover"
        );
        let cutover = migration(Phase::CuttingOver, "tank/ployz/pv-1");
        assert!(decide("b", &parent(), "a", &promote, Some(&cutover)).is_ok());
        let done = migration(Phase::Succeeded, "tank/ployz/pv-1");
        assert_eq!(
            reason(decide("b", &parent(), "a", &hello("data"), Some(&done))),
            Some(RefusalReason::NotSending)
        );
        for outside in [
            "tank/elsewhere",
            "tank/ployz/../x",
            "tank/ployz/pv-1/deeper",
            "other/ployz/pv-1",
        ] {
            let m = migration(Phase::Sending, outside);
            assert_eq!(
                reason(decide("b", &parent(), "a", &hello("data"), Some(&m))),
                Some(RefusalReason::OutsideParent),
                "{outside}"
            );
        }
        let mut no_plan = ok.clone();
        no_plan.status = None;
        assert_eq!(
            reason(decide("b", &parent(), "a", &hello("data"), Some(&no_plan))),
            Some(RefusalReason::NotPlanned)
        );
    }

    #[test]
    fn a_volume_is_granted_only_through_its_live_binding() {
        let pv = |ns: &str, claim: &str, uid: &str| -> PersistentVolume {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "pv-data"},
                "spec": {"claimRef": {"namespace": ns, "name": claim, "uid": uid}},
            }))
            .unwrap_or_default()
        };
        let pvc = |volume: &str| -> PersistentVolumeClaim {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "data", "namespace": "ns", "uid": "u1"},
                "spec": {"volumeName": volume},
            }))
            .unwrap_or_default()
        };
        let check = |pv: Option<&PersistentVolume>, pvc: Option<&PersistentVolumeClaim>| {
            check_volume("ns", "data", "pv-data", pv, pvc).map_err(|r| r.message)
        };
        assert_eq!(
            check(Some(&pv("ns", "data", "u1")), Some(&pvc("pv-data"))),
            Ok(())
        );
        for (what, pv, pvc, says) in [
            (
                "another namespace's",
                pv("victim", "data", "u1"),
                pvc("pv-data"),
                "claim victim/data",
            ),
            (
                "another claim's",
                pv("ns", "other", "u1"),
                pvc("pv-data"),
                "claim ns/other",
            ),
            (
                "an earlier claim's",
                pv("ns", "data", "u0"),
                pvc("pv-data"),
                "earlier claim",
            ),
            (
                "a claim naming another PV",
                pv("ns", "data", "u1"),
                pvc("pv-other"),
                "names PersistentVolume pv-other",
            ),
        ] {
            let got = check(Some(&pv), Some(&pvc));
            assert!(
                got.as_ref().is_err_and(|m| m.contains(says)),
                "{what}: {got:?}"
            );
        }
        assert!(check(None, Some(&pvc("pv-data"))).is_err(), "no PV");
        assert!(
            check(Some(&pv("ns", "data", "u1")), None).is_err(),
            "no claim"
        );
    }
}

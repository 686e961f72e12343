use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::rebind::{move_pv, pinning, pv_on_node, workload_mounts};
use super::resolve::local_dataset;
use super::*;
use crate::api::MigrationSpec;

fn de<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
}

fn machine(name: &str, draining: bool, ready: bool) -> Machine {
    de(json!({
        "apiVersion": "ployz.dev/v1alpha1", "kind": "Machine",
        "metadata": {"name": name},
        "spec": {"nodeName": name, "pool": "tank", "parentDataset": "tank/ployz",
                 "endpoint": "x:1", "draining": draining},
        "status": {
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"},
                            "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "heartbeatTime": "2026-01-01T00:00:00Z",
            "poolMountpoint": "/tank",
            "zfs": {"implementation": "Legacy", "capabilities": {"resumeTokens": false,
                "sizeEstimates": false, "compressedSend": false, "rawSend": false, "bookmarks": false}},
        },
    }))
}

fn pv(name: &str, node: &str, path: &str) -> PersistentVolume {
    de(json!({
        "metadata": {"name": name},
        "spec": {"capacity": {"storage": "1Gi"}, "local": {"path": path},
                 "claimRef": {"namespace": "ns", "name": "data", "uid": "u1", "resourceVersion": "7"},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}},
    }))
}

/// A Bound claim `name` of namespace ns (uid u1, as the fixtures' PVs point back at it).
fn claim(name: &str, volume: &str) -> PersistentVolumeClaim {
    de(
        json!({"metadata": {"name": name, "uid": "u1"}, "spec": {"volumeName": volume},
              "status": {"phase": "Bound"}}),
    )
}

fn observed() -> Observed {
    Observed {
        namespace: "ns".into(),
        openebs_namespace: "openebs".into(),
        deployments: vec![de(json!({
            "metadata": {"name": "web"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                         "containers": [{"name": "c"}],
                         "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}},
                                     {"name": "tmp", "emptyDir": {}}]}}},
        }))],
        services: vec![de(
            json!({"metadata": {"name": "front"}, "spec": {"selector": {"app": "web"}}}),
        )],
        claims: vec![claim("data", "pv-1")],
        volumes: vec![pv("pv-1", "a", "/tank/ployz/pv-1")],
        machines: vec![machine("a", false, true), machine("b", false, true)],
        now: Some(
            "2026-01-01T00:00:10Z"
                .parse::<Timestamp>()
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        ..Observed::default()
    }
}

fn migration(name: &str, service: &str, to: &str, from: Option<&str>) -> Migration {
    let mut m = Migration::new(
        name,
        MigrationSpec {
            service: service.into(),
            to: to.into(),
            from: from.map(Into::into),
            transfer: None,
            timeouts: None,
            source_copy: None,
        },
    );
    m.metadata.namespace = Some("ns".into());
    m
}

fn reason(obs: &Observed, m: &Migration) -> Option<Reason> {
    plan(obs, m).err().map(|e| e.reason)
}

#[test]
fn plans_a_deployment_on_a_local_zfs_volume() {
    let obs = observed();
    let p = plan(&obs, &migration("m", "web", "b", None)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((p.plan.source.as_str(), p.plan.target.as_str()), ("a", "b"));
    assert_eq!(p.plan.workload.kind, "Deployment");
    assert_eq!(p.plan.volumes.len(), 1, "emptyDir is not a volume to move");
    assert_eq!(p.plan.volumes[0].source_dataset, "tank/ployz/pv-1");
    assert_eq!(p.plan.volumes[0].target_dataset, "tank/ployz/pv-1");
    // A Service selecting exactly that Deployment names it too.
    let via_service =
        plan(&obs, &migration("m", "front", "b", None)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(via_service.plan, p.plan);
}

#[test]
fn a_zfs_localpv_owner_is_resolved_through_the_machines_node_id() {
    let mut obs = observed();
    obs.volumes = vec![de(json!({
        "metadata": {"name": "pvc-1"},
        "spec": {"csi": {"driver": "zfs.csi.openebs.io", "volumeHandle": "pvc-1"},
                 "claimRef": {"namespace": "ns", "name": "data"},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "openebs.io/nodeid", "operator": "In", "values": ["disk-1"]}]}]}}},
    }))];
    obs.claims = vec![claim("data", "pvc-1")];
    obs.zfs_volumes = vec![de(json!({
        "apiVersion": "zfs.openebs.io/v1", "kind": "ZFSVolume",
        "metadata": {"name": "pvc-1", "namespace": "openebs"},
        "spec": {"ownerNodeID": "disk-1", "poolName": "tank/ployz"},
    }))];
    // zfs-localpv's FAQ: nodes labelled with their own openebs.io/nodeid, not their names.
    obs.machines[0].spec.zfs_node_id = Some("disk-1".into());
    let p = plan(&obs, &migration("m", "web", "b", None)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((p.plan.source.as_str(), p.plan.target.as_str()), ("a", "b"));
    assert_eq!(p.plan.volumes[0].source_dataset, "tank/ployz/pvc-1");
    // Without the machine's node ID the owner names no machine.
    obs.machines[0].spec.zfs_node_id = None;
    assert_eq!(
        reason(&obs, &migration("m", "web", "b", None)),
        Some(Reason::UnknownMachine)
    );
}

#[test]
fn refuses_bad_requests_with_a_reason() {
    let obs = observed();
    assert_eq!(
        reason(&obs, &migration("m", "nope", "b", None)),
        Some(Reason::WorkloadNotFound)
    );
    assert_eq!(
        reason(&obs, &migration("m", "web", "c", None)),
        Some(Reason::UnknownMachine)
    );
    assert_eq!(
        reason(&obs, &migration("m", "web", "a", None)),
        Some(Reason::SameMachine)
    );
    assert_eq!(
        reason(&obs, &migration("m", "web", "b", Some("c"))),
        Some(Reason::SourceMismatch)
    );
    let mut draining = obs.clone();
    draining.machines[1] = machine("b", true, true);
    assert_eq!(
        reason(&draining, &migration("m", "web", "b", None)),
        Some(Reason::TargetDraining)
    );
    let mut down = obs.clone();
    down.machines[1] = machine("b", false, false);
    assert_eq!(
        reason(&down, &migration("m", "web", "b", None)),
        Some(Reason::MachineNotReady)
    );
    let mut stale = obs.clone();
    stale.now = Some(
        "2026-01-01T01:00:00Z"
            .parse()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    assert_eq!(
        reason(&stale, &migration("m", "web", "b", None)),
        Some(Reason::MachineNotReady)
    );
    let mut nfs = obs.clone();
    nfs.volumes = vec![de(
        json!({"metadata": {"name": "pv-1"}, "spec": {"nfs": {"server": "x", "path": "/"},
            "claimRef": {"namespace": "ns", "name": "data", "uid": "u1"}}}),
    )];
    assert_eq!(
        reason(&nfs, &migration("m", "web", "b", None)),
        Some(Reason::NotZfsVolume)
    );
    let mut outside = obs.clone();
    outside.volumes = vec![pv("pv-1", "a", "/srv/data")];
    assert_eq!(
        reason(&outside, &migration("m", "web", "b", None)),
        Some(Reason::NotZfsVolume)
    );
    let mut no_volumes = obs.clone();
    no_volumes.deployments[0] = de(json!({"metadata": {"name": "web"}, "spec": {
        "selector": {}, "template": {"spec": {"containers": [{"name": "c"}]}}}}));
    assert_eq!(
        reason(&no_volumes, &migration("m", "web", "b", None)),
        Some(Reason::NoZfsVolumes)
    );
}

#[test]
fn a_name_shared_by_a_deployment_and_a_statefulset_is_ambiguous() {
    let mut obs = observed();
    obs.statefulsets = vec![de(json!({"metadata": {"name": "web"}, "spec": {
        "serviceName": "web", "selector": {"matchLabels": {"app": "db"}},
        "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "c"}]}}}}))];
    let e = plan(&obs, &migration("m", "web", "b", None)).err();
    assert_eq!(
        e.as_ref().map(|e| e.reason),
        Some(Reason::AmbiguousWorkload)
    );
    assert!(
        e.is_some_and(|e| e.to_string().contains("rename one of them")),
        "the message names the fix"
    );
}

#[test]
fn one_active_migration_per_workload() {
    let mut obs = observed();
    let mut first = migration("first", "web", "b", None);
    first.status = Some(crate::api::MigrationStatus {
        phase: Some(Phase::Sending),
        plan: Some(plan(&obs, &first).unwrap_or_else(|e| panic!("{e}")).plan),
        ..Default::default()
    });
    obs.migrations = vec![first.clone()];
    let second = migration("second", "web", "b", None);
    let err = plan(&obs, &second)
        .err()
        .unwrap_or_else(|| panic!("planned a duplicate"));
    assert_eq!(err.reason, Reason::DuplicateMigration);
    assert!(err.message.contains("first"), "{}", err.message);
    // A finished one does not count.
    if let Some(s) = obs.migrations[0].status.as_mut() {
        s.phase = Some(Phase::Succeeded);
    }
    assert!(plan(&obs, &second).is_ok());
}

#[test]
fn local_paths_map_to_datasets_below_the_pool() {
    assert_eq!(
        local_dataset("tank", "/tank", "/tank/ployz/v"),
        Some("tank/ployz/v".into())
    );
    assert_eq!(
        local_dataset("tank", "/mnt/tank/", "/mnt/tank/v/"),
        Some("tank/v".into())
    );
    assert_eq!(local_dataset("tank", "/tank", "/tank"), None);
    assert_eq!(local_dataset("tank", "/tank", "/tankx/v"), None);
    assert_eq!(local_dataset("tank", "/tank", "/tank/../etc"), None);
}

#[test]
fn pre_copy_repeats_while_the_delta_is_big_and_shrinking() {
    assert!(another_pass(&[], 10, 5));
    assert!(another_pass(&[100], 10, 5));
    assert!(!another_pass(&[5], 10, 5), "small enough");
    assert!(another_pass(&[100, 50], 10, 5));
    assert!(!another_pass(&[100, 120], 10, 5), "not shrinking");
    assert!(!another_pass(&[100, 90, 80], 10, 3), "out of passes");
    assert_eq!(
        snapshot_name("1b2c-3d4e-5f60-7", Some(2)),
        "ployz-1b2c3d4e-2"
    );
    assert_eq!(
        snapshot_name("1b2c-3d4e-5f60-7", None),
        "ployz-1b2c3d4e-final"
    );
}

#[test]
fn volumes_and_pinning_move_to_the_target() {
    let old = pv("pv-1", "a", "/tank/ployz/pv-1");
    let new = move_pv(&old, "a", "b", Some("/pool2/pv-1"));
    assert!(pv_on_node(&new, "b") && !pv_on_node(&new, "a"));
    let spec = new.spec.as_ref().unwrap_or_else(|| panic!("no spec"));
    assert_eq!(
        spec.local.as_ref().map(|l| l.path.as_str()),
        Some("/pool2/pv-1")
    );
    let claim = spec
        .claim_ref
        .as_ref()
        .unwrap_or_else(|| panic!("no claimRef"));
    assert_eq!(
        (claim.uid.as_deref(), claim.resource_version.as_deref()),
        (Some("u1"), None)
    );

    let t: k8s_openapi::api::core::v1::PodTemplateSpec = de(json!({"spec": {"containers": [],
        "nodeSelector": {"kubernetes.io/hostname": "a", "disk": "ssd"}}}));
    let p = pinning(&t, "a", "b").unwrap_or_else(|| panic!("no pinning"));
    assert_eq!(
        p.to_target,
        json!({"nodeSelector": {"kubernetes.io/hostname": "b"}})
    );
    assert_eq!(
        p.original,
        json!({"nodeSelector": {"kubernetes.io/hostname": "a"}})
    );
    let free: k8s_openapi::api::core::v1::PodTemplateSpec = de(json!({"spec": {"containers": []}}));
    assert_eq!(pinning(&free, "a", "b"), None);
}

#[test]
fn a_claim_naming_another_namespace_s_volume_is_refused_as_foreign() {
    let mut obs = observed();
    // The victim's PV, bound to their claim in another namespace.
    obs.volumes[0]
        .spec
        .iter_mut()
        .filter_map(|s| s.claim_ref.as_mut())
        .for_each(|r| r.namespace = Some("victim".into()));
    let e = plan(&obs, &migration("m", "web", "b", None)).err();
    assert_eq!(e.as_ref().map(|e| e.reason), Some(Reason::ForeignVolume));
    assert!(
        e.is_some_and(|e| e.message.contains("bound to claim victim/data")),
        "the message names the holder"
    );
    // Same namespace and name, another claim object (re-created): the UID tells.
    let mut obs = observed();
    obs.claims[0].metadata.uid = Some("u2".into());
    assert_eq!(
        reason(&obs, &migration("m", "web", "b", None)),
        Some(Reason::ForeignVolume)
    );
    // A PV nobody claims.
    let mut obs = observed();
    obs.volumes[0]
        .spec
        .iter_mut()
        .for_each(|s| s.claim_ref = None);
    assert_eq!(
        reason(&obs, &migration("m", "web", "b", None)),
        Some(Reason::ForeignVolume)
    );
}

#[test]
fn a_claim_that_is_not_bound_is_not_moved() {
    let mut obs = observed();
    obs.claims[0].status = None;
    let e = plan(&obs, &migration("m", "web", "b", None)).err();
    assert_eq!(e.as_ref().map(|e| e.reason), Some(Reason::VolumeNotFound));
    assert!(e.is_some_and(|e| e.message.contains("not Bound")));
}

#[test]
fn a_volume_already_being_moved_by_another_workload_s_migration_is_a_duplicate() {
    let mut obs = observed();
    let mut other = migration("older", "other-app", "b", None);
    other.status = Some(crate::api::MigrationStatus {
        phase: Some(Phase::Sending),
        plan: Some(crate::api::MigrationPlan {
            source: "a".into(),
            target: "b".into(),
            workload: crate::api::WorkloadRef {
                kind: "Deployment".into(),
                name: "other-app".into(),
            },
            volumes: vec![VolumePlan {
                claim: "data".into(),
                volume: "pv-1".into(),
                source_dataset: "tank/ployz/pv-1".into(),
                target_dataset: "tank/ployz/pv-1".into(),
                base: None,
                estimated_bytes: None,
            }],
        }),
        ..Default::default()
    });
    obs.migrations = vec![other];
    assert_eq!(
        reason(&obs, &migration("m", "web", "b", None)),
        Some(Reason::DuplicateMigration)
    );
}

#[test]
fn recorded_pvs_are_re_created_only_when_they_are_the_claim_s_own() {
    let want = super::rebind::RecordedPv {
        volume: "pv-1",
        namespace: "ns",
        claim: "data",
        claim_uid: Some("u1"),
        node: "a",
        pool_mountpoint: Some("/tank"),
    };
    let check = |pv: &PersistentVolume| super::rebind::check_recorded_pv(pv, &want);
    assert_eq!(check(&pv("pv-1", "a", "/tank/ployz/pv-1")), Ok(()));
    for (pv, why) in [
        (pv("pv-2", "a", "/tank/ployz/pv-1"), "named"),
        (pv("pv-1", "b", "/tank/ployz/pv-1"), "node affinity"),
        (pv("pv-1", "a", "/etc"), "not below the pool"),
        (pv("pv-1", "a", "/tank/../etc"), "not below the pool"),
    ] {
        let e = check(&pv).err().unwrap_or_default();
        assert!(e.contains(why), "{why}: {e}");
    }
    let mut host_path = pv("pv-1", "a", "/tank/ployz/pv-1");
    if let Some(s) = host_path.spec.as_mut() {
        s.host_path = Some(de(json!({"path": "/"})));
    }
    assert!(check(&host_path).is_err_and(|e| e.contains("spec.hostPath")));
    let mut foreign = pv("pv-1", "a", "/tank/ployz/pv-1");
    if let Some(r) = foreign.spec.as_mut().and_then(|s| s.claim_ref.as_mut()) {
        r.namespace = Some("victim".into());
    }
    assert!(check(&foreign).is_err_and(|e| e.contains("victim/data")));
    let mut recreated = pv("pv-1", "a", "/tank/ployz/pv-1");
    if let Some(r) = recreated.spec.as_mut().and_then(|s| s.claim_ref.as_mut()) {
        r.uid = Some("u9".into());
    }
    assert!(check(&recreated).is_err());
}

#[test]
fn recorded_pinning_and_owner_name_only_the_source() {
    use super::rebind::{check_recorded_owner, check_recorded_pinning};
    let ok = json!({"nodeSelector": {"kubernetes.io/hostname": "a"}, "nodeName": "a"});
    assert_eq!(check_recorded_pinning(&ok, "a"), Ok(()));
    for bad in [
        json!({"nodeSelector": {"kubernetes.io/hostname": "b"}}),
        json!({"containers": [{"name": "x", "image": "evil"}]}),
        json!({"hostNetwork": true}),
        json!("nodeName"),
    ] {
        assert!(check_recorded_pinning(&bad, "a").is_err(), "{bad}");
    }
    let owner = json!({"ownerNodeID": "disk-1", "poolName": "tank/ployz"});
    assert_eq!(check_recorded_owner(&owner, "disk-1", "tank"), Ok(()));
    assert!(check_recorded_owner(&owner, "disk-2", "tank").is_err());
    assert!(check_recorded_owner(&owner, "disk-1", "other").is_err());
    let sneaky = json!({"ownerNodeID": "disk-1", "poolName": "tankard"});
    assert!(check_recorded_owner(&sneaky, "disk-1", "tank").is_err());
}

#[test]
fn a_plan_is_checked_against_the_live_objects() {
    let obs = observed();
    let m = migration("m", "web", "b", None);
    let planned = plan(&obs, &m).unwrap_or_else(|e| panic!("{e}")).plan;
    assert_eq!(check_live(&obs, &m, &planned, None), Ok(()));
    let mut forged = planned.clone();
    forged.volumes[0].source_dataset = "tank/secret".into();
    let e = check_live(&obs, &m, &forged, None).err();
    assert_eq!(e.as_ref().map(|e| e.reason), Some(Reason::PlanMismatch));
    assert!(e.is_some_and(|e| e.message.contains("tank/secret")));
    let mut other_workload = planned.clone();
    other_workload.workload.name = "db".into();
    assert_eq!(
        check_live(&obs, &m, &other_workload, None)
            .err()
            .map(|e| e.reason),
        Some(Reason::PlanMismatch)
    );
    let mut elsewhere = planned;
    elsewhere.source = "b".into();
    assert_eq!(
        check_live(&obs, &m, &elsewhere, None)
            .err()
            .map(|e| e.reason),
        Some(Reason::PlanMismatch)
    );
}

#[test]
fn residents_are_the_workloads_with_a_volume_on_the_machine() {
    let mut obs = observed();
    let ns_workload = |name: &str, claim: &str| -> Deployment {
        de(json!({
            "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {
                         "containers": [{"name": "c"}],
                         "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]}}},
        }))
    };
    // "db" lives on b; "cache" mounts no claim; "odd" is on a but not on a ZFS path.
    obs.deployments.push(ns_workload("db", "db-data"));
    obs.deployments.push(de(json!({
        "metadata": {"name": "cache"},
        "spec": {"selector": {"matchLabels": {"app": "cache"}},
                 "template": {"metadata": {"labels": {"app": "cache"}},
                              "spec": {"containers": [{"name": "c"}]}}},
    })));
    obs.deployments.push(ns_workload("odd", "odd-data"));
    obs.claims.push(claim("db-data", "pv-2"));
    obs.claims.push(claim("odd-data", "pv-3"));
    obs.volumes.push(pv("pv-2", "b", "/tank/ployz/pv-2"));
    obs.volumes.push(pv("pv-3", "a", "/srv/elsewhere"));

    let on_a = residents::residents(&obs, "a");
    let names: Vec<&str> = on_a
        .iter()
        .map(|r| r.workload.reference.name.as_str())
        .collect();
    assert_eq!(names, ["web", "odd"]);
    assert!(
        on_a[0]
            .volumes
            .as_ref()
            .is_ok_and(|v| v[0].volume == "pv-1")
    );
    // Reported with the planner's reason, not silently left behind.
    let why = on_a[1].volumes.clone().err().unwrap_or_default();
    assert!(why.contains("pv-3"), "{why}");

    let on_b = residents::residents(&obs, "b");
    assert_eq!(on_b.len(), 1);
    assert_eq!(on_b[0].workload.reference.name, "db");
    assert!(residents::residents(&obs, "c").is_empty());
}

#[test]
fn a_recorded_binding_is_rebound_only_for_a_claim_the_workload_mounts() {
    let template: k8s_openapi::api::core::v1::PodTemplateSpec = serde_json::from_value(json!({
        "spec": {"containers": [], "volumes": [
            {"name": "v", "persistentVolumeClaim": {"claimName": "data"}},
            {"name": "c", "configMap": {"name": "data-too"}},
        ]}
    }))
    .unwrap_or_default();
    let none: [String; 0] = [];
    assert!(workload_mounts("web", &template, &none, "data"));
    assert!(
        !workload_mounts("web", &template, &none, "other"),
        "another claim of the namespace"
    );
    assert!(
        !workload_mounts("web", &template, &none, "data-too"),
        "a config map's name is no claim"
    );
    let templates = ["pgdata".to_string()];
    let empty = k8s_openapi::api::core::v1::PodTemplateSpec::default();
    assert!(
        workload_mounts("db", &empty, &templates, "pgdata-db-0"),
        "a StatefulSet's claim, scaled to zero or not"
    );
    assert!(workload_mounts("db", &empty, &templates, "pgdata-db-12"));
    for stranger in [
        "pgdata-db-",
        "pgdata-db-x",
        "pgdata-dbx-0",
        "pgdata-other-0",
        "pg-db-0",
    ] {
        assert!(
            !workload_mounts("db", &empty, &templates, stranger),
            "{stranger} is not one of db's claims"
        );
    }
}

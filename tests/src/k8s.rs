//! Kubernetes helpers for tests: CRDs, namespaces, workloads on ZFS-backed local volumes, and
//! where their pods run.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::ledger;
use crate::machine::ZfsMachine;
use crate::node::LEDGER_IMAGE;
use crate::wait::until;

const FIELD_MANAGER: &str = "ployz-e2e";

/// Applies every CRD in `dir` and waits until each is Established.
pub async fn install_crds(client: &Client, dir: &Path) -> Result<Vec<String>> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = vec![];
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let text = std::fs::read_to_string(entry.path())?;
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&text)
            .with_context(|| format!("parsing {}", entry.path().display()))?;
        let name = crd.metadata.name.clone().context("CRD without a name")?;
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
        names.push(name);
    }
    for name in &names {
        until(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                async move {
                    let crd = api.get(name).await?;
                    let established = crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    Ok(established.then_some(()))
                }
            },
        )
        .await?;
    }
    Ok(names)
}

pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    api.create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// A ZFS-backed volume as ployz finds it on a machine: a local PV whose path is the mountpoint
/// of a dataset under the machine's pool, pre-bound to a claim, with node affinity to the
/// machine.
#[derive(Debug, Clone)]
pub struct LocalVolume {
    pub namespace: String,
    pub claim: String,
    pub pv: String,
    pub dataset: String,
    pub path: String,
}

/// The PersistentVolume object for `vol` pinned to `node`.
pub fn local_pv(
    vol: &LocalVolume,
    node: &str,
    claim_uid: Option<&str>,
) -> Result<PersistentVolume> {
    let mut claim_ref =
        json!({"kind": "PersistentVolumeClaim", "namespace": vol.namespace, "name": vol.claim});
    if let Some(uid) = claim_uid {
        claim_ref["uid"] = json!(uid);
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": vol.pv, "labels": {"ployz.dev/dataset": vol.dataset.replace('/', ".")}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "ployz-local",
            "volumeMode": "Filesystem",
            "local": {"path": vol.path},
            "claimRef": claim_ref,
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
            ]}]}},
        },
    }))?)
}

/// Creates a dataset on `machine`, and a PV and pre-bound PVC for it.
pub async fn create_local_volume(
    client: &Client,
    machine: &ZfsMachine,
    namespace: &str,
    claim: &str,
) -> Result<LocalVolume> {
    let pv = format!("{namespace}-{claim}");
    let dataset = format!("{}/ployz/{pv}", machine.pool);
    let path = machine.create_dataset(&dataset)?;
    let vol = LocalVolume {
        namespace: namespace.into(),
        claim: claim.into(),
        pv,
        dataset,
        path,
    };
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    pvs.create(
        &PostParams::default(),
        &local_pv(&vol, &machine.name, None)?,
    )
    .await?;
    create_claim_naming(client, namespace, claim, &vol.pv).await?;
    Ok(vol)
}

/// Creates claim `claim` in `namespace` that names PersistentVolume `pv` (`spec.volumeName`).
pub async fn create_claim_naming(
    client: &Client,
    namespace: &str,
    claim: &str,
    pv: &str,
) -> Result<()> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": claim},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "ployz-local",
            "volumeName": pv,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }))?;
    pvcs.create(&PostParams::default(), &pvc).await?;
    Ok(())
}

/// The test app's container: `ledger` writing into `dir`, Ready once it answers over HTTP.
fn ledger_container(name: &str, dir: &str) -> serde_json::Value {
    json!({
        "name": name,
        "image": LEDGER_IMAGE,
        // Images are imported into each machine's containerd; there is no registry.
        "imagePullPolicy": "Never",
        "args": [dir, ledger::PORT.to_string()],
        // The app signs its records POD@NODE.
        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "ports": [{"containerPort": ledger::PORT}],
        "readinessProbe": {
            "httpGet": {"path": "/", "port": ledger::PORT},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
    })
}

/// A bare pod `name` of the ledger app on `node`, writing into its own /tmp.
pub fn ledger_pod(name: &str, node: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [ledger_container("app", "/tmp")],
        },
    }))?)
}

/// A one-replica Deployment `name` (label app=NAME) running the ledger app on `claim`,
/// mounted at /data.
pub async fn create_deployment(
    client: &Client,
    namespace: &str,
    name: &str,
    claim: &str,
) -> Result<()> {
    create_deployment_with(client, namespace, name, claim, &AppOptions::default()).await
}

/// Variations of the test app's Deployment for fault tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppOptions<'a> {
    /// The app runs (and writes) on this node but never turns Ready there.
    pub never_ready_on: Option<&'a str>,
    /// Pin the pods to this node with a nodeSelector on the hostname label.
    pub pinned_to: Option<&'a str>,
    /// Replicas other than one (zero: a workload that only names its claim).
    pub replicas: Option<i32>,
}

/// [`create_deployment`] with [`AppOptions`].
pub async fn create_deployment_with(
    client: &Client,
    namespace: &str,
    name: &str,
    claim: &str,
    opts: &AppOptions<'_>,
) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let mut container = ledger_container("app", "/data");
    container["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    if let Some(node) = opts.never_ready_on {
        container["readinessProbe"] = json!({
            "exec": {"command": ["sh", "-c", format!(
                "test \"$NODE_NAME\" != {node} && wget -q -O /dev/null http://127.0.0.1:{}/",
                ledger::PORT
            )]},
            "periodSeconds": 1,
            "failureThreshold": 1,
        });
    }
    let mut d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": opts.replicas.unwrap_or(1),
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": 10,
                },
            },
        },
    }))?;
    if let (Some(node), Some(spec)) = (
        opts.pinned_to,
        d.spec.as_mut().and_then(|s| s.template.spec.as_mut()),
    ) {
        spec.node_selector =
            Some([("kubernetes.io/hostname".to_string(), node.to_string())].into());
    }
    api.create(&PostParams::default(), &d).await?;
    Ok(())
}

pub fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Nodes of the Ready pods matching `selector`, sorted.
pub async fn ready_pod_nodes(
    client: &Client,
    namespace: &str,
    selector: &str,
) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut nodes: Vec<String> = pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .iter()
        .filter(|p| pod_ready(p))
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    nodes.sort();
    Ok(nodes)
}

/// Waits until exactly `count` pods matching `selector` are Ready, all on `node`.
pub async fn wait_ready_on(
    client: &Client,
    namespace: &str,
    selector: &str,
    node: &str,
    count: usize,
) -> Result<()> {
    until(
        &format!("{count} Ready pod(s) {selector} on {node}"),
        Duration::from_secs(60),
        || async move {
            let nodes = ready_pod_nodes(client, namespace, selector).await?;
            Ok((nodes.len() == count && nodes.iter().all(|n| n == node)).then_some(()))
        },
    )
    .await
}

/// Scales a Deployment.
pub async fn scale_deployment(
    client: &Client,
    namespace: &str,
    name: &str,
    replicas: i32,
) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await?;
    Ok(())
}

/// Waits until no pod matches `selector`.
pub async fn wait_no_pods(client: &Client, namespace: &str, selector: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    until(
        &format!("pods {selector} gone"),
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let n = pods
                    .list(&ListParams::default().labels(selector))
                    .await?
                    .items
                    .len();
                Ok((n == 0).then_some(()))
            }
        },
    )
    .await
}

/// Recreates the PV of `vol` with node affinity to `node` (node affinity is immutable, so the
/// PV is deleted and created again under the same name and claim).
pub async fn rebind_volume(client: &Client, vol: &LocalVolume, node: &str) -> Result<()> {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &vol.namespace);
    let claim_uid = pvcs.get(&vol.claim).await?.metadata.uid;
    // pv-protection holds deletion while the claim is bound; the claim stays and rebinds.
    // Lifted after the delete, when the controller can no longer add it back.
    pvs.delete(&vol.pv, &DeleteParams::default()).await?;
    pvs.patch(
        &vol.pv,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    until(
        &format!("PV {} deleted", vol.pv),
        Duration::from_secs(30),
        || {
            let pvs = pvs.clone();
            async move { Ok(pvs.get_opt(&vol.pv).await?.is_none().then_some(())) }
        },
    )
    .await?;
    pvs.create(
        &PostParams::default(),
        &local_pv(vol, node, claim_uid.as_deref())?,
    )
    .await?;
    Ok(())
}

/// A one-replica StatefulSet `name` (label app=NAME) running the ledger app, with a volume
/// claim template per entry of `templates` (the ledger goes into the first); the claims
/// `TEMPLATE-NAME-0` must exist (see [`create_local_volume`]).
pub async fn create_statefulset(
    client: &Client,
    namespace: &str,
    name: &str,
    templates: &[&str],
) -> Result<()> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let mounts: Vec<_> = templates
        .iter()
        .map(|t| json!({"name": t, "mountPath": format!("/{t}")}))
        .collect();
    let claims: Vec<_> = templates
        .iter()
        .map(|t| {
            json!({
                "metadata": {"name": t},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "ployz-local",
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            })
        })
        .collect();
    // The app writes its ledger into the first volume.
    let mut container = ledger_container("db", &format!("/{}", templates[0]));
    container["volumeMounts"] = json!(mounts);
    let s: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [container],
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": 10,
                },
            },
            "volumeClaimTemplates": claims,
        },
    }))?;
    api.create(&PostParams::default(), &s).await?;
    Ok(())
}

/// An OpenEBS zfs-localpv volume on `machine`: the dataset `POOL_NAME/PV`, its ZFSVolume in
/// `openebs_ns` owned by the machine's zfs-localpv node ID, a CSI PV pinned by
/// `openebs.io/nodeid`, and a pre-bound claim.
pub async fn create_zfs_localpv_volume(
    client: &Client,
    machine: &ZfsMachine,
    namespace: &str,
    claim: &str,
    openebs_ns: &str,
) -> Result<LocalVolume> {
    let pv = format!("pvc-{namespace}-{claim}");
    let pool_name = format!("{}/ployz", machine.pool);
    let dataset = format!("{pool_name}/{pv}");
    let path = machine.create_dataset(&dataset)?;
    let zv = json!({
        "apiVersion": "zfs.openebs.io/v1",
        "kind": "ZFSVolume",
        "metadata": {"name": pv, "namespace": openebs_ns},
        "spec": {"ownerNodeID": machine.zfs_node_id(), "poolName": pool_name,
                 "capacity": "1073741824", "fsType": "zfs"},
    });
    let zvs: Api<kube::core::DynamicObject> = Api::namespaced_with(
        client.clone(),
        openebs_ns,
        &kube::discovery::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
            "zfs.openebs.io",
            "v1",
            "ZFSVolume",
        )),
    );
    zvs.create(&PostParams::default(), &serde_json::from_value(zv)?)
        .await?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv_obj: PersistentVolume = serde_json::from_value(json!({
        "metadata": {
            "name": pv,
            "annotations": {"pv.kubernetes.io/provisioned-by": "zfs.csi.openebs.io"},
            "finalizers": [PROVISIONER_FINALIZER],
        },
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            // As zfs-localpv's provisioner creates them: its volume goes with the PV.
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "openebs-zfspv",
            "csi": {"driver": "zfs.csi.openebs.io", "volumeHandle": pv, "fsType": "zfs"},
            "claimRef": {"kind": "PersistentVolumeClaim", "namespace": namespace, "name": claim},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "openebs.io/nodeid", "operator": "In", "values": [machine.zfs_node_id()]}
            ]}]}},
        },
    }))?;
    pvs.create(&PostParams::default(), &pv_obj).await?;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": claim},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "openebs-zfspv",
            "volumeName": pv,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }))?;
    pvcs.create(&PostParams::default(), &pvc).await?;
    Ok(LocalVolume {
        namespace: namespace.into(),
        claim: claim.into(),
        pv,
        dataset,
        path,
    })
}

/// The finalizer external-provisioner puts on the PVs it provisioned, to delete their volume
/// when the PV is deleted with reclaim policy `Delete` (HonorPVReclaimPolicy).
pub const PROVISIONER_FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";

/// Stands in for a CSI external-provisioner that honours the reclaim policy on deletion:
/// records every PV it would have destroyed the volume of (deleted while its policy was
/// `Delete`).
#[derive(Debug)]
pub struct ReclaimWatch {
    destroyed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReclaimWatch {
    pub fn start(rt: &tokio::runtime::Runtime, client: &Client) -> Self {
        use futures::StreamExt;
        use kube::runtime::watcher::{self, Event};
        let api: Api<PersistentVolume> = Api::all(client.clone());
        let destroyed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&destroyed);
        let task = rt.spawn(async move {
            let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
            while let Some(event) = events.next().await {
                let Ok(Event::Apply(pv) | Event::InitApply(pv) | Event::Delete(pv)) = event else {
                    continue;
                };
                let deleting = pv.metadata.deletion_timestamp.is_some();
                let policy = pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
                if deleting && policy == Some("Delete") {
                    let name = pv.metadata.name.unwrap_or_default();
                    let mut d = seen.lock().unwrap_or_else(|p| p.into_inner());
                    if !d.contains(&name) {
                        d.push(name);
                    }
                }
            }
        });
        Self { destroyed, task }
    }

    /// PVs whose volume the provisioner would have destroyed so far.
    pub fn destroyed(&self) -> Vec<String> {
        self.destroyed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for ReclaimWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! Side effects on the workload and its volumes through the Kubernetes API: the lock
//! annotation, scaling, pods, PersistentVolume re-creation, ZFSVolume ownership, node pinning.
//! Each operation is idempotent, so a restarted agent can repeat it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::{Error, LOCK_ANNOTATION};
use crate::api::WorkloadRef;

/// A Deployment or StatefulSet, reached by kind.
pub struct Workload {
    client: Client,
    namespace: String,
    pub reference: WorkloadRef,
}

/// What the agent reads of a workload.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub replicas: i32,
    pub selector: String,
    pub annotations: BTreeMap<String, String>,
    pub resource_version: Option<String>,
    pub template: k8s_openapi::api::core::v1::PodTemplateSpec,
    /// A StatefulSet's volumeClaimTemplates, by name (none for a Deployment).
    pub claim_templates: Vec<String>,
}

fn selector_string(s: &LabelSelector) -> String {
    s.match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Workload {
    pub fn new(client: Client, namespace: &str, reference: WorkloadRef) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            reference,
        }
    }

    fn name(&self) -> &str {
        &self.reference.name
    }

    pub async fn get(&self) -> Result<Observed, Error> {
        let missing = || {
            Error::WorkloadGone(format!(
                "{} {}/{}",
                self.reference.kind,
                self.namespace,
                self.name()
            ))
        };
        if self.reference.kind == "StatefulSet" {
            let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.namespace);
            let s = api.get_opt(self.name()).await?.ok_or_else(missing)?;
            let spec = s.spec.clone().unwrap_or_default();
            Ok(Observed {
                replicas: spec.replicas.unwrap_or(1),
                selector: selector_string(&spec.selector),
                annotations: s.annotations().clone(),
                resource_version: s.resource_version(),
                template: spec.template,
                claim_templates: spec
                    .volume_claim_templates
                    .iter()
                    .flatten()
                    .filter_map(|t| t.metadata.name.clone())
                    .collect(),
            })
        } else {
            let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
            let d = api.get_opt(self.name()).await?.ok_or_else(missing)?;
            let spec = d.spec.clone().unwrap_or_default();
            Ok(Observed {
                replicas: spec.replicas.unwrap_or(1),
                selector: selector_string(&spec.selector),
                annotations: d.annotations().clone(),
                resource_version: d.resource_version(),
                template: spec.template,
                claim_templates: vec![],
            })
        }
    }

    async fn patch(&self, patch: Value) -> Result<(), Error> {
        let pp = PatchParams::default();
        if self.reference.kind == "StatefulSet" {
            let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.namespace);
            api.patch(self.name(), &pp, &Patch::Merge(patch)).await?;
        } else {
            let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
            api.patch(self.name(), &pp, &Patch::Merge(patch)).await?;
        }
        Ok(())
    }

    /// Takes the per-workload lock for `migration`: the annotation is written only if the
    /// workload did not change since it was read (resourceVersion precondition), so two
    /// migrations racing for one workload cannot both win. Returns the holder otherwise.
    pub async fn lock(
        &self,
        migration: &str,
        is_active: impl Fn(&str) -> bool,
    ) -> Result<Result<(), String>, Error> {
        let w = self.get().await?;
        match w.annotations.get(LOCK_ANNOTATION) {
            Some(holder) if holder == migration => return Ok(Ok(())),
            Some(holder) if is_active(holder) => return Ok(Err(holder.clone())),
            _ => {}
        }
        let patch = json!({"metadata": {
            "resourceVersion": w.resource_version,
            "annotations": {LOCK_ANNOTATION: migration},
        }});
        match self.patch(patch).await {
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => Err(Error::Other(format!(
                "{} {} changed while locking it; retrying",
                self.reference.kind,
                self.name()
            ))),
            other => other.map(Ok),
        }
    }

    /// Releases the lock if `migration` holds it.
    pub async fn unlock(&self, migration: &str) -> Result<(), Error> {
        let w = match self.get().await {
            Ok(w) => w,
            // Nothing to unlock on a workload that is gone.
            Err(Error::WorkloadGone(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if w.annotations.get(LOCK_ANNOTATION).map(String::as_str) == Some(migration) {
            self.patch(json!({"metadata": {"annotations": {LOCK_ANNOTATION: null}}}))
                .await?;
        }
        Ok(())
    }

    /// Through the `/scale` subresource: the one write of replicas ployz-guard lets through.
    pub async fn scale(&self, replicas: i32) -> Result<(), Error> {
        let (pp, patch) = (
            PatchParams::default(),
            Patch::Merge(json!({"spec": {"replicas": replicas}})),
        );
        if self.reference.kind == "StatefulSet" {
            let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.namespace);
            api.patch_scale(self.name(), &pp, &patch).await?;
        } else {
            let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
            api.patch_scale(self.name(), &pp, &patch).await?;
        }
        Ok(())
    }

    /// Merge-patches the pod template's spec (node pinning).
    pub async fn patch_pod_spec(&self, patch: &Value) -> Result<(), Error> {
        self.patch(json!({"spec": {"template": {"spec": patch}}}))
            .await
    }

    pub async fn pods(&self, selector: &str) -> Result<Vec<Pod>, Error> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(api
            .list(&ListParams::default().labels(selector))
            .await?
            .items)
    }
}

pub fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Re-creates a PersistentVolume as `new` (same name): node affinity is immutable. The
/// pv-protection finalizer is lifted first, since the claim stays bound throughout; the claim
/// binds to the new PV by name and claimRef UID.
pub async fn replace_pv(client: &Client, new: &PersistentVolume) -> Result<(), Error> {
    let api: Api<PersistentVolume> = Api::all(client.clone());
    let name = new.name_any();
    if let Some(old) = api.get_opt(&name).await? {
        let uid = old.uid().unwrap_or_default();
        // A provisioner that honours `Delete` on the PV's deletion (external-provisioner's
        // finalizer) would destroy the volume: keep it, whatever the PV's policy was.
        if crate::plan::rebind::reclaim_policy(&old) != crate::plan::rebind::RETAIN {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {
                    "persistentVolumeReclaimPolicy": crate::plan::rebind::RETAIN,
                }})),
            )
            .await?;
        }
        // Delete first, then lift the finalizers: once the deletion is marked, the
        // pv-protection controller can no longer put its finalizer back.
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        match api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        let gone = await_condition(api.clone(), &name, conditions::is_deleted(&uid));
        tokio::time::timeout(Duration::from_secs(30), gone)
            .await
            .map_err(|_| Error::Other(format!("PersistentVolume {name} is not going away")))?
            .map_err(|e| Error::Other(format!("waiting for PersistentVolume {name} to go: {e}")))?;
    }
    match api.create(&PostParams::default(), new).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

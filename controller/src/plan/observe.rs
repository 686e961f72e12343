//! Reads what the planner looks at from the API, once per planning. Shared by the agent and
//! `ployzctl migrate preview`.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use super::Observed;
use crate::api::{Machine, Migration};
use crate::openebs::ZFSVolume;

async fn list<K>(api: Api<K>) -> Result<Vec<K>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(api.list(&ListParams::default()).await?.items)
}

/// The observed state for planning a Migration in `namespace`. ZFSVolumes are read only where
/// their CRD is installed.
pub async fn observe(
    client: &Client,
    namespace: &str,
    openebs_namespace: &str,
) -> Result<Observed, kube::Error> {
    let ns = |c: &Client| c.clone();
    let zfs_volumes = match list(Api::<ZFSVolume>::namespaced(ns(client), openebs_namespace)).await
    {
        Ok(v) => v,
        Err(kube::Error::Api(e)) if e.code == 404 => vec![],
        Err(e) => return Err(e),
    };
    Ok(Observed {
        namespace: namespace.into(),
        openebs_namespace: openebs_namespace.into(),
        deployments: list(Api::<Deployment>::namespaced(ns(client), namespace)).await?,
        statefulsets: list(Api::<StatefulSet>::namespaced(ns(client), namespace)).await?,
        services: list(Api::<Service>::namespaced(ns(client), namespace)).await?,
        claims: list(Api::<PersistentVolumeClaim>::namespaced(
            ns(client),
            namespace,
        ))
        .await?,
        volumes: list(Api::<PersistentVolume>::all(ns(client))).await?,
        zfs_volumes,
        machines: list(Api::<Machine>::all(ns(client))).await?,
        migrations: list(Api::<Migration>::namespaced(ns(client), namespace)).await?,
        now: Some(Timestamp::now()),
    })
}

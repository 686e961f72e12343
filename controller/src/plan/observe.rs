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
/// their CRD is installed. The lists are read concurrently: this runs before the final
/// snapshot, while the workload is down.
pub async fn observe(
    client: &Client,
    namespace: &str,
    openebs_namespace: &str,
) -> Result<Observed, kube::Error> {
    let ns = |c: &Client| c.clone();
    let zfs_volumes = async {
        match list(Api::<ZFSVolume>::namespaced(ns(client), openebs_namespace)).await {
            Ok(v) => Ok(v),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(vec![]),
            Err(e) => Err(e),
        }
    };
    let (zfs_volumes, deployments, statefulsets, services, claims, volumes, machines, migrations) =
        tokio::try_join!(
            zfs_volumes,
            list(Api::<Deployment>::namespaced(ns(client), namespace)),
            list(Api::<StatefulSet>::namespaced(ns(client), namespace)),
            list(Api::<Service>::namespaced(ns(client), namespace)),
            list(Api::<PersistentVolumeClaim>::namespaced(
                ns(client),
                namespace
            )),
            list(Api::<PersistentVolume>::all(ns(client))),
            list(Api::<Machine>::all(ns(client))),
            list(Api::<Migration>::namespaced(ns(client), namespace)),
        )?;
    Ok(Observed {
        namespace: namespace.into(),
        openebs_namespace: openebs_namespace.into(),
        deployments,
        statefulsets,
        services,
        claims,
        volumes,
        zfs_volumes,
        machines,
        migrations,
        now: Some(Timestamp::now()),
    })
}

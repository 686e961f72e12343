//! The one OpenEBS zfs-localpv type ployz reads and changes: `ZFSVolume`
//! (`zfs.openebs.io/v1`), whose dataset is `poolName/<name>` on the node `ownerNodeID`.
//! Only those two fields matter here; the rest of the spec is kept as it is.

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// CSI driver name of OpenEBS zfs-localpv.
pub const CSI_DRIVER: &str = "zfs.csi.openebs.io";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "zfs.openebs.io",
    version = "v1",
    kind = "ZFSVolume",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct ZfsVolumeSpec {
    #[serde(rename = "ownerNodeID")]
    pub owner_node_id: String,
    pub pool_name: String,
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_json::Value>,
}

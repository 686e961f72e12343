//! The `Machine` resource: one per node, published and heart-beaten by that node's agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A node that can hold ZFS-backed volumes, as its ployz agent sees it.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ployz.dev",
    version = "v1alpha1",
    kind = "Machine",
    status = "MachineStatus",
    category = "ployz",
    derive = "PartialEq",
    doc = "A node's ZFS storage and ployz agent.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Draining", type_ = "boolean", json_path = ".spec.draining"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(name = "Free", type_ = "string", json_path = ".status.free"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".spec.endpoint",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MachineSpec {
    /// The Kubernetes node this machine is (the Machine has the node's name).
    #[schemars(schema_with = "super::machine_schema")]
    pub node_name: String,

    /// ZFS pool holding the volumes.
    #[schemars(length(min = 1, max = 255))]
    pub pool: String,

    /// Dataset under which this machine's ployz volumes and replicas live; the agent never
    /// receives anything outside it.
    #[schemars(length(min = 1, max = 255))]
    pub parent_dataset: String,

    /// `host:port` of the agent's transfer endpoint (TLS, mutually authenticated).
    #[schemars(length(min = 3, max = 300))]
    pub endpoint: String,

    /// A draining machine accepts no incoming migrations. Set by `ployzctl machine drain`.
    #[serde(default)]
    pub draining: bool,

    /// The machine's OpenEBS zfs-localpv node ID: its node's `openebs.io/nodeid` label, which
    /// zfs-localpv uses for a ZFSVolume's `ownerNodeID` and its PVs' topology. Absent when the
    /// node has no such label; zfs-localpv then uses the node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub zfs_node_id: Option<String>,
}

/// The label zfs-localpv identifies a node by.
pub const OPENEBS_NODE_ID_LABEL: &str = "openebs.io/nodeid";

impl MachineSpec {
    /// The ID zfs-localpv knows this machine by.
    pub fn zfs_node_id(&self) -> &str {
        self.zfs_node_id.as_deref().unwrap_or(&self.node_name)
    }
}

/// What the agent observes on its machine.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MachineStatus {
    /// `Ready` is True while the agent heart-beats and its ZFS pool answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// Last heartbeat of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<Time>,

    /// Version of the ployz agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,

    /// The local ZFS and what it can do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zfs: Option<ZfsInfo>,

    /// Pool size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,

    /// Bytes available under the parent dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,

    /// `freeBytes` in human form for `kubectl get`, e.g. `12.5GiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<String>,

    /// Mountpoint of the pool's root dataset: a local PV's path below it names a dataset of
    /// the pool (datasets inherit their mountpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_mountpoint: Option<String>,

    /// SHA-256 of the agent's TLS public key, `sha256:` and 64 hex digits. The agent makes a
    /// new key at each start and publishes it here; peers accept this machine's agent only
    /// with this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::transfer::tls::PIN_PATTERN))]
    pub tls_pin: Option<String>,
}

/// ZFS implementation and capabilities, detected by the agent.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ZfsInfo {
    pub implementation: ZfsImplementation,
    /// Version string as reported by `zfs version`, when available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub capabilities: ZfsCapabilities,
}

/// Which ZFS.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ZfsImplementation {
    /// OpenZFS 2.x (kernel module).
    #[serde(rename = "OpenZFS")]
    OpenZfs,
    /// Legacy ZFS without `zfs version` (for example zfs-fuse, pool version 23).
    #[default]
    Legacy,
}

/// Features ployz uses when present.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ZfsCapabilities {
    /// `receive -s` / `send -t`: interrupted transfers resume.
    pub resume_tokens: bool,
    /// `send -nvP`: exact size estimates for progress.
    pub size_estimates: bool,
    /// `send -c`: compressed blocks sent as they are stored.
    pub compressed_send: bool,
    /// `send -w`: encrypted datasets sent without their keys.
    pub raw_send: bool,
    /// Bookmarks as incremental bases.
    pub bookmarks: bool,
}

//! The `Migration` resource: "move this workload to that machine".

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Moves a workload (its pods and its ZFS-backed volumes) from the machine it runs on to
/// another machine. A Migration is a one-shot request: its spec cannot change after creation
/// (a changed mind is a new Migration); deleting it while in flight cancels the move and
/// leaves the workload running on the source.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ployz.dev",
    version = "v1alpha1",
    kind = "Migration",
    namespaced,
    status = "MigrationStatus",
    shortname = "mig",
    category = "ployz",
    derive = "PartialEq",
    cel,
    doc = "A request to move a workload and its ZFS-backed volumes to another machine.",
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.service"),
    printcolumn(name = "From", type_ = "string", json_path = ".status.plan.source"),
    printcolumn(name = "To", type_ = "string", json_path = ".spec.to"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress.summary"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.reason",
        priority = 1
    ),
    selectable = ".spec.service",
    selectable = ".spec.to",
    selectable = ".spec.from"
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: to change a migration, delete it and create a new one"))]
#[x_kube(validation = Rule::new("!has(self.from) || self.from != self.to").message("spec.from and spec.to name the same machine: a migration must move the workload to another machine"))]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    /// The workload to move: a Deployment or StatefulSet in this namespace, or a Service that
    /// selects exactly one of them.
    #[schemars(schema_with = "super::subdomain_schema")]
    pub service: String,

    /// The machine (node) to move the workload to.
    #[schemars(schema_with = "super::machine_schema")]
    pub to: String,

    /// The machine the workload is expected to run on. When set and the workload runs
    /// elsewhere, the migration fails instead of moving it, which makes a re-applied manifest
    /// (GitOps) safe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::optional_machine_schema")]
    pub from: Option<String>,

    /// How the data crosses the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferOptions>,

    /// Limits on how long the move may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,

    /// What becomes of the data left on the source after a successful move: `Replica` keeps it
    /// as a read-only replica holding the last common snapshot, so moving back sends only the
    /// delta; `Delete` destroys it. Default `Replica`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_copy: Option<SourceCopy>,
}

/// Transfer tuning.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TransferOptions {
    /// Upper bound of the transfer rate, in bytes per second, as a quantity (for example
    /// `100Mi`). Unlimited when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('1Ki')) >= 0 && quantity(string(self)).compareTo(quantity('1Ei')) <= 0").message("bandwidthLimit must be a quantity of bytes per second from 1Ki to 1Ei, for example 100Mi"))]
    pub bandwidth_limit: Option<Quantity>,

    /// Compression on the wire. `Zstd` helps on slow links with compressible data; `None`
    /// (default) is fastest on a LAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
}

/// Wire compression.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Zstd,
}

/// Timeouts, in seconds.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Longest the workload may be down during cutover (scale-down to Ready on the target)
    /// before the migration rolls back to the source. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub cutover_seconds: Option<u32>,

    /// Longest wait for the workload's pods to turn Ready on the target. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub target_ready_seconds: Option<u32>,

    /// A transfer that makes no progress for this long is aborted and retried. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub no_progress_seconds: Option<u32>,
}

impl MigrationSpec {
    fn timeout(&self, pick: fn(&Timeouts) -> Option<u32>, default: u64) -> std::time::Duration {
        let secs = self
            .timeouts
            .as_ref()
            .and_then(pick)
            .map_or(default, u64::from);
        std::time::Duration::from_secs(secs)
    }

    /// `timeouts.cutoverSeconds`, default 600.
    pub fn cutover_timeout(&self) -> std::time::Duration {
        self.timeout(|t| t.cutover_seconds, 600)
    }

    /// `timeouts.targetReadySeconds`, default 300.
    pub fn target_ready_timeout(&self) -> std::time::Duration {
        self.timeout(|t| t.target_ready_seconds, 300)
    }

    /// `timeouts.noProgressSeconds`, default 300.
    pub fn no_progress_timeout(&self) -> std::time::Duration {
        self.timeout(|t| t.no_progress_seconds, 300)
    }
}

/// What happens to the source's copy after a successful move.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SourceCopy {
    /// Keep as a read-only replica (fast way back).
    #[default]
    Replica,
    /// Destroy it.
    Delete,
}

/// Where a migration is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted, not started (validating, waiting for a transfer slot).
    Pending,
    /// Taking snapshots of the volumes on the source.
    Snapshotting,
    /// Pre-copy: sending snapshots to the target while the workload runs.
    Sending,
    /// Workload stopped; final delta, volumes rebound, workload started on the target.
    CuttingOver,
    /// Undoing a failed or cancelled move: workload back on the source.
    RollingBack,
    /// The workload runs on the target.
    Succeeded,
    /// The move failed; the workload runs on the source.
    Failed,
    /// The migration was deleted in flight; the workload runs on the source.
    Cancelled,
}

impl Phase {
    /// Terminal phases never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
}

/// Observed state of a migration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Machine-readable reason for the current phase (CamelCase), e.g. `TargetNotReady`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// Human-readable explanation: what happened and what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// What is moved, from where to where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<MigrationPlan>,

    /// Bytes sent against the estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,

    /// When each phase was entered, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase_transitions: Vec<PhaseTransition>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Measured downtime: from the start of the scale-down on the source to the workload
    /// Ready on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_milliseconds: Option<u64>,

    /// Pre-copy bookkeeping, written before each snapshot is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_copy: Option<PreCopy>,

    /// Cutover bookkeeping: everything rollback needs, written before each side effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover: Option<Cutover>,

    /// Consecutive failed transfer attempts; reset by a successful pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_failures: Option<u32>,

    /// Earliest time of the next transfer attempt after a failed one (the retry backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Time>,

    /// Rollback bookkeeping: the last rollback step completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackStep>,

    /// The machine whose agent took the Migration over when the source's agent stopped
    /// heart-beating; unset while the source's agent drives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_over_by: Option<String>,
}

/// Steps of a rollback, in order; each is the last one completed.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
pub enum RollbackStep {
    /// Transfers stopped.
    Started,
    /// No pod of the workload runs anywhere (during a cutover).
    Stopped,
    /// Every volume is bound to the source again and the pinning restored.
    Rebound,
    /// The target's copy is a read-only replica again.
    Demoted,
    /// The workload is scaled back to its replicas on the source.
    Restarted,
}

/// Pre-copy passes: each snapshots every volume and sends it while the workload runs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PreCopy {
    /// Current pass, from 1.
    pub pass: u32,
    /// Snapshot (short name) this pass sends, the same on every volume.
    pub snapshot: String,
    /// Stream bytes each finished pass sent, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pass_bytes: Vec<u64>,
}

/// Steps of the cutover, in order; `step` in [`Cutover`] is the last one completed.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
pub enum CutoverStep {
    /// Original replicas recorded; scaling down.
    Started,
    /// No pod of the workload is left.
    ScaledDown,
    /// The final snapshot reached the target.
    FinalSent,
    /// The target's copy is writable and mounted.
    Promoted,
    /// Every volume is bound to the target.
    Rebound,
    /// The pod template's node pinning points at the target (or it has none).
    Pinned,
    /// The workload is scaled back up (placement on the target).
    ScaledUp,
}

/// What the cutover changed, and how to undo it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Cutover {
    pub step: CutoverStep,
    /// Replicas of the workload before the scale-down.
    pub original_replicas: i32,
    /// When the scale-down was written (downtime is measured from here). To the microsecond:
    /// a `Time` keeps whole seconds, which would add up to a second to the downtime.
    pub started: MicroTime,
    /// Final snapshot (short name).
    pub final_snapshot: String,
    /// The volumes as they were bound on the source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeBinding>,
    /// When the workload was scaled back up on the target (the Ready wait starts here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaled_up: Option<MicroTime>,
    /// When each step was reached, in order: where the downtime goes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepTime>,
    /// The pod template's node pinning before it was pointed at the target (JSON), when it
    /// had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_placement: Option<String>,
}

/// A cutover step and when it was reached.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepTime {
    pub step: CutoverStep,
    pub at: MicroTime,
}

/// A volume's binding on the source, kept for rollback.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeBinding {
    pub claim: String,
    pub volume: String,
    /// The PersistentVolume's spec on the source (JSON).
    pub original_spec: String,
    /// The ZFSVolume's spec on the source (JSON), for zfs-localpv volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_zfs_volume: Option<String>,
    /// Mountpoint of the volume's dataset on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_path: Option<String>,
}

/// The plan the source agent executes; also what `ployzctl migrate preview` prints.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPlan {
    /// Machine the workload runs on.
    pub source: String,
    /// Machine it moves to.
    pub target: String,
    /// The workload resolved from `spec.service`.
    pub workload: WorkloadRef,
    pub volumes: Vec<VolumePlan>,
}

/// A Deployment or StatefulSet.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// `Deployment` or `StatefulSet`.
    pub kind: String,
    pub name: String,
}

/// One volume of the workload and how it moves.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumePlan {
    /// PersistentVolumeClaim name.
    pub claim: String,
    /// PersistentVolume name.
    pub volume: String,
    /// Dataset on the source machine.
    pub source_dataset: String,
    /// Dataset on the target machine.
    pub target_dataset: String,
    /// Snapshot (or bookmark) present on both sides that the send is incremental from;
    /// unset for a full send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Estimated bytes to send for this volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_bytes: Option<u64>,
}

/// Transfer progress, total and per volume.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub bytes_sent: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_estimated: Option<u64>,
    /// Transfer rate over the last reporting interval, in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
    /// Seconds left at that rate, when the size is estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// Short human form for `kubectl get`, e.g. `pass 1: 1.2GiB/2.0GiB 60%, 40.0MiB/s, 20s left`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeProgress>,
}

/// The rate between two reports of one pass `elapsed` apart, and the time left at that rate
/// when the size is estimated. None where there is nothing to say: too short an interval, a
/// count that went back (a new pass), no estimate, or the estimate passed.
pub fn rate_and_eta(
    before: u64,
    now: u64,
    elapsed: std::time::Duration,
    estimated: Option<u64>,
) -> (Option<u64>, Option<u64>) {
    let secs = elapsed.as_secs_f64();
    if secs < 0.5 || now < before {
        return (None, None);
    }
    let rate = ((now - before) as f64 / secs) as u64;
    let eta = estimated
        .filter(|&e| e > now && rate > 0)
        .map(|e| (e - now).div_ceil(rate));
    (Some(rate), eta)
}

/// Progress of one volume.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeProgress {
    pub claim: String,
    pub bytes_sent: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_estimated: Option<u64>,
}

/// The moment a phase was entered.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition {
    pub phase: Phase,
    pub time: Time,
}

//! The ZFS layer: a typed interface over the `zfs` command. [`Zfs`] is the narrow trait the
//! planner and transfer engine use; [`ZfsCli`] implements it by spawning `zfs` directly (never
//! through a shell) with validated arguments.
//!
//! Works on OpenZFS 2.x and on legacy ZFS (zfs-fuse, pool v23): capabilities are detected, and
//! the modern path (resume tokens, `send -nvP` estimates, compressed and raw sends, bookmarks)
//! is used where the local ZFS has it.

pub mod base;
mod cli;
mod error;
pub mod name;
pub mod parse;
pub mod retention;

use std::collections::BTreeMap;
use std::future::Future;

pub use cli::ZfsCli;
pub use error::ZfsError;
pub use name::{BookmarkName, DatasetName, SnapshotName};

use crate::api::ZfsInfo;

/// User property: the migration (`namespace/name`) that made a snapshot or replica.
pub const PROP_MIGRATION: &str = "ployz:migration";
/// User property: `true` on a read-only replica dataset that ployz owns.
pub const PROP_REPLICA: &str = "ployz:replica";
/// User property on a snapshot: the other machines known to hold it (comma-separated),
/// written when it is sent or received; retention keeps the newest one per machine.
pub const PROP_PEERS: &str = "ployz:peers";
/// User property on a ployz dataset (a replica, or a copy it promoted): the claim
/// (`namespace/name`) whose volume it holds. A receive or role change for another claim is
/// refused, so a replica left behind by a deleted PV never takes another claim's stream.
pub const PROP_CLAIM: &str = "ployz:claim";

/// The value of [`PROP_CLAIM`] for claim `claim` of `namespace`.
pub fn claim_owner(namespace: &str, claim: &str) -> String {
    format!("{namespace}/{claim}")
}
/// User property on a replica: the machine its last stream came from. For people reading the
/// pool; not checked, since a volume may come back from any machine that holds its lineage.
pub const PROP_SOURCE: &str = "ployz:source";
/// Hold tag that protects the base snapshot of an incremental while it is needed.
pub const HOLD_TAG: &str = "ployz";

/// A snapshot with the numbers ployz plans with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub name: SnapshotName,
    pub guid: u64,
    pub createtxg: u64,
    pub used: u64,
    pub referenced: u64,
    /// Number of holds.
    pub userrefs: u64,
    pub user_props: BTreeMap<String, String>,
}

/// A bookmark (OpenZFS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookmark {
    pub name: BookmarkName,
    pub guid: u64,
    pub createtxg: u64,
}

/// A filesystem dataset with its snapshots (oldest first) and bookmarks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub name: DatasetName,
    pub guid: u64,
    pub createtxg: u64,
    pub used: u64,
    pub referenced: u64,
    pub available: u64,
    pub mountpoint: Option<String>,
    pub readonly: bool,
    /// Set after an interrupted resumable receive (OpenZFS).
    pub resume_token: Option<String>,
    /// Native encryption (OpenZFS): such a dataset is only ever sent raw (`-w`).
    pub encrypted: bool,
    pub user_props: BTreeMap<String, String>,
    pub snapshots: Vec<Snapshot>,
    pub bookmarks: Vec<Bookmark>,
}

impl Dataset {
    /// True for a read-only replica that ployz made.
    pub fn is_ployz_replica(&self) -> bool {
        self.user_props
            .get(PROP_REPLICA)
            .is_some_and(|v| v == "true")
    }

    /// Whether this dataset may hold the volume of claim `owner` (`namespace/name`): one that
    /// ployz marked holds only its own claim's volume (replicas made before `ployz:claim`
    /// existed: their Migration's namespace). A dataset ployz never marked is not refused
    /// here: ZFS's own rules protect it (ployz never rolls it back nor forces a receive).
    pub fn holds_claim(&self, owner: &str) -> Result<(), String> {
        let namespace = |key: &str| key.split_once('/').map(|(ns, _)| ns.to_string());
        let holder = match (
            self.user_props.get(PROP_CLAIM),
            self.user_props.get(PROP_MIGRATION),
        ) {
            (Some(claim), _) if claim == owner => return Ok(()),
            (Some(claim), _) => format!("claim {claim}"),
            (None, Some(m)) if namespace(m) == namespace(owner) => return Ok(()),
            (None, Some(m)) => format!("Migration {m} of another namespace"),
            (None, None) => return Ok(()),
        };
        Err(format!(
            "{} holds the volume of {holder}, not of claim {owner}; ployz will not write into it. If its data is no longer needed, destroy it on that machine (zfs destroy -r {}) and retry, or move to another machine",
            self.name, self.name
        ))
    }

    /// The dataset as base selection sees it, as a source.
    pub fn source_side(&self) -> base::SourceSide {
        base::SourceSide {
            snapshots: self
                .snapshots
                .iter()
                .map(|s| point(s.name.short(), s.guid, s.createtxg))
                .collect(),
            bookmarks: self
                .bookmarks
                .iter()
                .map(|b| point(b.name.short(), b.guid, b.createtxg))
                .collect(),
        }
    }

    /// The dataset as base selection sees it, as a target.
    pub fn target_side(&self) -> base::TargetSide {
        base::TargetSide {
            exists: true,
            snapshots: self
                .snapshots
                .iter()
                .map(|s| point(s.name.short(), s.guid, s.createtxg))
                .collect(),
            ployz_replica: self.is_ployz_replica(),
        }
    }

    pub fn snapshot(&self, short: &str) -> Option<&Snapshot> {
        self.snapshots.iter().find(|s| s.name.short() == short)
    }
}

fn point(name: &str, guid: u64, createtxg: u64) -> base::Point {
    base::Point {
        name: name.to_string(),
        guid,
        createtxg,
    }
}

/// A dataset's space (bytes) and mountpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Space {
    pub used: u64,
    pub available: u64,
    pub mountpoint: Option<String>,
}

/// A property of a dataset as `zfs get` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    pub name: String,
    pub value: String,
    /// `local`, `received`, `default`, `inherited from DATASET`, or `-`.
    pub source: String,
}

impl Property {
    /// Set on the dataset itself (by `zfs set`, or carried in by a stream), not inherited.
    pub fn is_set_here(&self) -> bool {
        matches!(self.source.as_str(), "local" | "received")
    }
}

/// Datasets below (and including) a root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub datasets: BTreeMap<DatasetName, Dataset>,
}

/// Arguments of `zfs send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendArgs {
    pub to: SnapshotName,
    /// Incremental base: `@snap` or `#bookmark` of the same dataset.
    pub base: Option<base::Base>,
    /// `-c`: send blocks compressed as stored (OpenZFS).
    pub compressed: bool,
    /// `-w`: send encrypted blocks as they are (OpenZFS).
    pub raw: bool,
    /// Resume an interrupted send from the receiver's token (OpenZFS); overrides the rest.
    pub resume_token: Option<String>,
}

impl SendArgs {
    pub fn new(to: SnapshotName) -> Self {
        Self {
            to,
            base: None,
            compressed: false,
            raw: false,
            resume_token: None,
        }
    }

    /// The `zfs` arguments after `send`.
    pub fn to_args(&self) -> Vec<String> {
        if let Some(token) = &self.resume_token {
            return vec!["-t".into(), token.clone()];
        }
        let mut args = vec![];
        if self.compressed {
            args.push("-c".into());
        }
        if self.raw {
            args.push("-w".into());
        }
        // Never -I: its stream is compound, the kind that can carry properties and child
        // datasets, which receivers refuse. Snapshots in between go one stream each
        // (`base::steps`).
        if let Some(b) = &self.base {
            args.push("-i".into());
            args.push(format!("{}{}", self.to.dataset(), b.suffix()));
        }
        args.push(self.to.to_string());
        args
    }
}

/// What a receiver's resume token asks the sender to continue (`zfs send -nvt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeToken {
    /// The snapshot being sent when the stream was cut.
    pub to: SnapshotName,
    pub to_guid: u64,
    /// The incremental base, for an incremental send.
    pub from_guid: Option<u64>,
    /// The stream was raw (`-w`): encrypted blocks as they are.
    pub raw: bool,
}

/// Arguments of `zfs receive` (always `-u`: mounting happens after the receive, see
/// shared/notes/zfs-fuse.md on stale reads after receiving into a mounted dataset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveArgs {
    pub target: DatasetName,
    /// `-s`: keep partial state and a resume token when interrupted (OpenZFS).
    pub resumable: bool,
    /// `-F`: roll the target back to the base first. Only for ployz-owned replicas.
    pub rollback: bool,
    /// `-x`/`-o` (OpenZFS): whatever the stream says, the dataset mounts where its parent
    /// puts it and honours no setuid bits or device nodes. Legacy ZFS has no such options;
    /// there the receiver resets and checks before mounting ([`NEUTRAL`]).
    pub neutralize: bool,
}

/// Properties a received dataset must not take from its stream: `-x` (inherit from the
/// parent, or the default) on receive, reset to inherited before any mount.
pub const NOT_RECEIVED: [&str; 4] = ["mountpoint", "canmount", "sharenfs", "sharesmb"];
/// Properties a received dataset always has (`-o` on receive, set again before any mount;
/// `canmount` cannot be inherited, so it is set rather than reset). No quota or reservation
/// comes from a stream: a crafted `reservation` could take the target's whole pool.
pub const NEUTRAL: [(&str, &str); 6] = [
    ("setuid", "off"),
    ("devices", "off"),
    ("reservation", "none"),
    ("refreservation", "none"),
    ("quota", "none"),
    ("refquota", "none"),
];

impl ReceiveArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["-u".to_string()];
        if self.resumable {
            args.push("-s".into());
        }
        if self.rollback {
            args.push("-F".into());
        }
        if self.neutralize {
            for prop in NOT_RECEIVED {
                args.extend(["-x".into(), prop.into()]);
            }
            for (prop, value) in NEUTRAL {
                args.extend(["-o".into(), format!("{prop}={value}")]);
            }
        }
        args.push(self.target.to_string());
        args
    }
}

/// The ZFS operations ployz needs. Implemented by [`ZfsCli`]; tests of pure logic use fakes.
pub trait Zfs: Send + Sync {
    /// Implementation and capabilities.
    fn info(&self) -> impl Future<Output = Result<ZfsInfo, ZfsError>> + Send;
    /// One dataset's space and mountpoint, without its children.
    fn space(&self, dataset: &DatasetName) -> impl Future<Output = Result<Space, ZfsError>> + Send;
    /// Datasets under `root` with snapshots (and bookmarks where supported).
    fn inventory(
        &self,
        root: &DatasetName,
        info: &ZfsInfo,
    ) -> impl Future<Output = Result<Inventory, ZfsError>> + Send;
    /// Creates a dataset (and missing parents).
    fn create(
        &self,
        dataset: &DatasetName,
        props: &[(&str, &str)],
    ) -> impl Future<Output = Result<(), ZfsError>> + Send;
    fn snapshot(
        &self,
        snap: &SnapshotName,
        props: &[(&str, &str)],
    ) -> impl Future<Output = Result<(), ZfsError>> + Send;
    fn hold(&self, snap: &SnapshotName) -> impl Future<Output = Result<(), ZfsError>> + Send;
    fn release(&self, snap: &SnapshotName) -> impl Future<Output = Result<(), ZfsError>> + Send;
    /// Destroys a snapshot; retried while busy.
    fn destroy_snapshot(
        &self,
        snap: &SnapshotName,
    ) -> impl Future<Output = Result<(), ZfsError>> + Send;
    /// Destroys a dataset and its snapshots; unmounts first and retries while busy.
    fn destroy_dataset(
        &self,
        dataset: &DatasetName,
    ) -> impl Future<Output = Result<(), ZfsError>> + Send;
    fn rename(
        &self,
        from: &DatasetName,
        to: &DatasetName,
    ) -> impl Future<Output = Result<(), ZfsError>> + Send;
    /// Sets a property on a dataset or snapshot (`name` is either).
    fn set(
        &self,
        name: &str,
        prop: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), ZfsError>> + Send;
    /// The values and sources of `props` on `dataset`, in one `zfs get`.
    fn properties(
        &self,
        dataset: &DatasetName,
        props: &[&str],
    ) -> impl Future<Output = Result<Vec<Property>, ZfsError>> + Send;
    /// Resets a dataset's property to what it inherits (`zfs inherit`).
    fn inherit(
        &self,
        dataset: &DatasetName,
        prop: &str,
    ) -> impl Future<Output = Result<(), ZfsError>> + Send;
    /// Rolls a dataset back to `snap`, destroying later snapshots (`rollback -r`).
    fn rollback(&self, snap: &SnapshotName) -> impl Future<Output = Result<(), ZfsError>> + Send;
    fn mount(&self, dataset: &DatasetName) -> impl Future<Output = Result<(), ZfsError>> + Send;
    fn unmount(&self, dataset: &DatasetName) -> impl Future<Output = Result<(), ZfsError>> + Send;
    /// Bytes `send` would produce (OpenZFS `send -nvP`); `None` where unsupported.
    fn estimate(
        &self,
        send: &SendArgs,
        info: &ZfsInfo,
    ) -> impl Future<Output = Result<Option<u64>, ZfsError>> + Send;
    /// Starts `zfs send`; the stream is the child's stdout.
    fn send(&self, send: &SendArgs) -> Result<tokio::process::Child, ZfsError>;
    /// Starts `zfs receive`; the stream goes to the child's stdin.
    fn receive(&self, recv: &ReceiveArgs) -> Result<tokio::process::Child, ZfsError>;
    /// Decodes a receiver's resume token (OpenZFS `send -nvt`).
    fn resume_token(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<ResumeToken, ZfsError>> + Send;
    /// Discards the partial state of an interrupted resumable receive (`receive -A`).
    fn abort_receive(
        &self,
        dataset: &DatasetName,
    ) -> impl Future<Output = Result<(), ZfsError>> + Send;
}

/// Waits for a `zfs send` or `zfs receive` started by [`Zfs::send`] or [`Zfs::receive`] and
/// classifies its failure.
pub async fn finish(child: tokio::process::Child, command: &str) -> Result<(), ZfsError> {
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| ZfsError::Io {
            command: command.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ZfsError::from_stderr(
            command,
            &String::from_utf8_lossy(&out.stderr),
        ))
    }
}

/// Size estimate where `send -nvP` is missing: the referenced bytes of `to` for a full send, and
/// for an incremental the growth since the base plus what later snapshots hold uniquely. A
/// lower bound for rewrites in place; progress never shows more than 99% before the end.
pub fn legacy_estimate(dataset: &Dataset, send: &SendArgs) -> Option<u64> {
    let to = dataset.snapshot(send.to.short())?;
    // Stream headers add about 1%.
    let overhead = |b: u64| b + b / 100 + 4096;
    match &send.base {
        None => Some(overhead(to.referenced)),
        Some(b) => {
            let base_txg = b.point().createtxg;
            let unique_after: u64 = dataset
                .snapshots
                .iter()
                .filter(|s| s.createtxg > base_txg && s.createtxg <= to.createtxg)
                .map(|s| s.used)
                .sum();
            let base_ref = dataset
                .snapshot(&b.point().name)
                .map_or(0, |s| s.referenced);
            Some(overhead(
                to.referenced.saturating_sub(base_ref) + unique_after,
            ))
        }
    }
}

#[cfg(test)]
impl Dataset {
    /// An empty dataset of that name, for tests to fill in.
    pub(crate) fn fixture(name: &str) -> Dataset {
        Dataset {
            name: name.parse().unwrap_or_else(|e| panic!("{e}")),
            guid: 1,
            createtxg: 1,
            used: 0,
            referenced: 0,
            available: 0,
            mountpoint: None,
            readonly: false,
            resume_token: None,
            encrypted: false,
            user_props: BTreeMap::new(),
            snapshots: vec![],
            bookmarks: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(s: &str) -> SnapshotName {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn send_and_receive_arguments() {
        let mut a = SendArgs::new(snap("tank/v@s3"));
        assert_eq!(a.to_args(), ["tank/v@s3"]);
        a.base = Some(base::Base::Snapshot(point("s1", 1, 1)));
        a.compressed = true;
        assert_eq!(a.to_args(), ["-c", "-i", "tank/v@s1", "tank/v@s3"]);
        a.base = Some(base::Base::Bookmark(point("b1", 1, 1)));
        assert_eq!(a.to_args(), ["-c", "-i", "tank/v#b1", "tank/v@s3"]);
        a.resume_token = Some("1-abc".into());
        assert_eq!(a.to_args(), ["-t", "1-abc"]);
        let r = ReceiveArgs {
            target: "tank/ployz/v".parse().unwrap_or_else(|e| panic!("{e}")),
            resumable: true,
            rollback: false,
            neutralize: false,
        };
        assert_eq!(r.to_args(), ["-u", "-s", "tank/ployz/v"]);
        let r = ReceiveArgs {
            neutralize: true,
            ..r
        };
        assert_eq!(
            r.to_args().join(" "),
            "-u -s -x mountpoint -x canmount -x sharenfs -x sharesmb -o setuid=off -o devices=off \
             -o reservation=none -o refreservation=none -o quota=none -o refquota=none tank/ployz/v"
        );
    }

    fn dataset(props: &[(&str, &str)]) -> Dataset {
        let mut d = Dataset::fixture("tank/ployz/pv-1");
        d.user_props = props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        d
    }

    #[test]
    fn a_ployz_dataset_takes_only_its_own_claim_s_volume() {
        let marked = dataset(&[(PROP_REPLICA, "true"), (PROP_CLAIM, "shop/data")]);
        assert_eq!(marked.holds_claim("shop/data"), Ok(()));
        let e = marked.holds_claim("tenant/data").err().unwrap_or_default();
        assert!(
            e.contains("holds the volume of claim shop/data, not of claim tenant/data"),
            "{e}"
        );
        assert!(e.contains("zfs destroy -r tank/ployz/pv-1"), "{e}");
        assert!(marked.holds_claim("shop/other").is_err());
        // A replica from before `ployz:claim`: its Migration's namespace.
        let older = dataset(&[(PROP_REPLICA, "true"), (PROP_MIGRATION, "shop/m1")]);
        assert_eq!(older.holds_claim("shop/data"), Ok(()));
        let e = older.holds_claim("tenant/data").err().unwrap_or_default();
        assert!(e.contains("Migration shop/m1 of another namespace"), "{e}");
        // Not ployz's: left to ZFS's own rules (no rollback, no forced receive).
        assert_eq!(dataset(&[]).holds_claim("tenant/data"), Ok(()));
    }
}

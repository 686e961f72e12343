//! Which of ployz's own snapshots of a dataset to destroy once the migrations that made them
//! ended. The policy, per dataset and machine: keep, for every machine this dataset was
//! exchanged with, the newest snapshot both hold (the base of the next incremental either way);
//! keep anything newer than the finished migration's snapshots (a later migration's); keep
//! held snapshots (a send uses them) and the newest `ployz-*` snapshot (should a peer mark
//! be missing, the next move still has its base); destroy the other `ployz-*` snapshots.
//! Snapshots that are not ployz's are never touched.

use std::collections::BTreeSet;

use super::{PROP_PEERS, Snapshot, SnapshotName};

/// Prefix of every snapshot ployz takes.
pub const PREFIX: &str = "ployz-";

/// The machines a snapshot is known to be held by besides this one (`ployz:peers`).
pub fn peers(s: &Snapshot) -> BTreeSet<&str> {
    s.user_props
        .get(PROP_PEERS)
        .map(|v| v.split(',').filter(|p| !p.is_empty()).collect())
        .unwrap_or_default()
}

/// `peers` with `machine` added, as the property's value.
pub fn with_peer(current: Option<&str>, machine: &str) -> String {
    let mut all: BTreeSet<&str> = current
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .collect();
    all.insert(machine);
    all.into_iter().collect::<Vec<_>>().join(",")
}

/// The snapshots of one dataset to destroy after the migration whose snapshots start with
/// `finished` (`ployz-<uid8>-`) ended.
pub fn to_destroy(snapshots: &[Snapshot], finished: &str) -> Vec<SnapshotName> {
    let ours: Vec<&Snapshot> = snapshots
        .iter()
        .filter(|s| s.name.short().starts_with(PREFIX))
        .collect();
    // Anything taken after the finished migration's last snapshot belongs to a later one.
    let Some(horizon) = ours
        .iter()
        .filter(|s| s.name.short().starts_with(finished))
        .map(|s| s.createtxg)
        .max()
    else {
        return vec![];
    };
    let mut keep: BTreeSet<&SnapshotName> = BTreeSet::new();
    if let Some(newest) = ours.iter().max_by_key(|s| s.createtxg) {
        keep.insert(&newest.name);
    }
    let all_peers: BTreeSet<&str> = ours.iter().flat_map(|s| peers(s)).collect();
    for peer in all_peers {
        if let Some(newest) = ours
            .iter()
            .filter(|s| peers(s).contains(peer))
            .max_by_key(|s| s.createtxg)
        {
            keep.insert(&newest.name);
        }
    }
    ours.iter()
        .filter(|s| s.createtxg <= horizon && s.userrefs == 0 && !keep.contains(&s.name))
        .map(|s| s.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn snap(short: &str, txg: u64, peers: &str) -> Snapshot {
        let mut user_props = BTreeMap::new();
        if !peers.is_empty() {
            user_props.insert(PROP_PEERS.to_string(), peers.to_string());
        }
        Snapshot {
            name: format!("tank/ployz/data@{short}")
                .parse()
                .unwrap_or_else(|e| panic!("{e}")),
            guid: txg,
            createtxg: txg,
            used: 0,
            referenced: 0,
            userrefs: 0,
            user_props,
        }
    }

    fn shorts(v: Vec<SnapshotName>) -> Vec<String> {
        v.iter().map(|s| s.short().to_string()).collect()
    }

    #[test]
    fn a_finished_move_keeps_only_its_final_snapshot_per_peer() {
        let s = [
            snap("ployz-aaaa-1", 1, "machine-b"),
            snap("ployz-aaaa-2", 2, "machine-b"),
            snap("ployz-aaaa-final", 3, "machine-b"),
        ];
        assert_eq!(
            shorts(to_destroy(&s, "ployz-aaaa-")),
            ["ployz-aaaa-1", "ployz-aaaa-2"]
        );
    }

    #[test]
    fn a_move_back_supersedes_the_common_snapshot_of_the_move_there() {
        // A -> B then B -> A: on A, the old final and the new snapshots are all common with B.
        let s = [
            snap("ployz-aaaa-final", 3, "machine-b"),
            snap("ployz-bbbb-1", 5, "machine-b"),
            snap("ployz-bbbb-final", 6, "machine-b"),
        ];
        assert_eq!(
            shorts(to_destroy(&s, "ployz-bbbb-")),
            ["ployz-aaaa-final", "ployz-bbbb-1"]
        );
    }

    #[test]
    fn the_last_common_snapshot_with_each_other_machine_is_kept() {
        let s = [
            snap("ployz-aaaa-final", 3, "machine-a"),
            snap("ployz-cccc-1", 5, "machine-c"),
            snap("ployz-cccc-final", 6, "machine-c"),
        ];
        assert_eq!(shorts(to_destroy(&s, "ployz-cccc-")), ["ployz-cccc-1"]);
    }

    #[test]
    fn later_migrations_held_and_foreign_snapshots_are_never_touched() {
        let mut held = snap("ployz-aaaa-1", 1, "");
        held.userrefs = 1;
        let s = [
            held,
            snap("nightly-2026-11-27", 2, ""),
            snap("ployz-aaaa-final", 3, "machine-b"),
            snap("ployz-dddd-1", 9, ""),
        ];
        assert!(to_destroy(&s, "ployz-aaaa-").is_empty());
    }

    #[test]
    fn a_failed_move_s_snapshot_goes_with_the_next_finished_move() {
        let s = [
            snap("ployz-eeee-1", 4, ""),
            snap("ployz-ffff-1", 5, "machine-b"),
            snap("ployz-ffff-final", 6, "machine-b"),
        ];
        assert_eq!(
            shorts(to_destroy(&s, "ployz-ffff-")),
            ["ployz-eeee-1", "ployz-ffff-1"]
        );
    }

    #[test]
    fn the_newest_snapshot_stays_even_without_a_peer_mark() {
        let s = [snap("ployz-gggg-1", 4, ""), snap("ployz-gggg-final", 5, "")];
        assert_eq!(shorts(to_destroy(&s, "ployz-gggg-")), ["ployz-gggg-1"]);
    }

    #[test]
    fn peers_accumulate_without_duplicates() {
        assert_eq!(with_peer(None, "machine-b"), "machine-b");
        assert_eq!(
            with_peer(Some("machine-c,machine-b"), "machine-b"),
            "machine-b,machine-c"
        );
    }
}

//! Which snapshots to send, from which base: a pure function of what both sides have.
//!
//! Semantics follow zrepl and syncoid: the base is the newest snapshot of the source (or
//! bookmark, where supported) whose GUID the target also has. A target that gained snapshots
//! after the base is diverged and refused, unless it is a ployz-owned read-only replica, which
//! may be rolled back to the base. A target with no common snapshot is never overwritten.

use std::fmt;

/// A snapshot or bookmark as base selection sees it: name after '@' or '#', GUID, and
/// creation transaction group (orders snapshots of one dataset).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    pub name: String,
    pub guid: u64,
    pub createtxg: u64,
}

/// The source dataset.
#[derive(Debug, Clone, Default)]
pub struct SourceSide {
    pub snapshots: Vec<Point>,
    pub bookmarks: Vec<Point>,
}

/// The target dataset, if it exists.
#[derive(Debug, Clone, Default)]
pub struct TargetSide {
    pub exists: bool,
    pub snapshots: Vec<Point>,
    /// A read-only replica that ployz made: may be rolled back to the base.
    pub ployz_replica: bool,
}

/// The base of an incremental send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    Snapshot(Point),
    Bookmark(Point),
}

impl Base {
    pub fn point(&self) -> &Point {
        match self {
            Base::Snapshot(p) | Base::Bookmark(p) => p,
        }
    }

    /// `@name` or `#name`, as `zfs send -i` takes it after the dataset.
    pub fn suffix(&self) -> String {
        match self {
            Base::Snapshot(p) => format!("@{}", p.name),
            Base::Bookmark(p) => format!("#{}", p.name),
        }
    }
}

/// What to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendPlan {
    /// The target does not exist: a full stream of `to`.
    Full { to: Point },
    /// From `base` up to `to`, with every snapshot in between (`-I`, or `-i` from a bookmark).
    /// `rollback` means the target is a ployz replica with later changes that the receive
    /// discards (`receive -F`).
    Incremental {
        base: Base,
        to: Point,
        rollback: bool,
    },
    /// The target already has `to`: nothing to send.
    UpToDate { to: Point },
}

/// Why nothing can be sent safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseError {
    #[error("snapshot {0:?} does not exist on the source")]
    NoSuchSnapshot(String),
    #[error(
        "the target dataset exists but shares no snapshot with the source; ployz will not overwrite it. Rename or destroy the target dataset yourself if its data is not needed"
    )]
    NoCommonSnapshot,
    #[error(
        "the target diverged: it has snapshot(s) {newer:?} taken after the common snapshot {base:?}; ployz will not discard them. Remove them from the target yourself, or migrate to another machine"
    )]
    Diverged { base: String, newer: Vec<String> },
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (guid {})", self.name, self.guid)
    }
}

/// Plans sending the source up to its snapshot `to`.
pub fn plan_send(
    source: &SourceSide,
    target: &TargetSide,
    to: &str,
) -> Result<SendPlan, BaseError> {
    let to = source
        .snapshots
        .iter()
        .find(|s| s.name == to)
        .cloned()
        .ok_or_else(|| BaseError::NoSuchSnapshot(to.to_string()))?;
    if !target.exists {
        return Ok(SendPlan::Full { to });
    }
    if target.snapshots.iter().any(|t| t.guid == to.guid) {
        return Ok(SendPlan::UpToDate { to });
    }
    let on_target = |guid: u64| target.snapshots.iter().find(|t| t.guid == guid);
    // Newest common point not newer than `to`; a snapshot wins over a bookmark of the same GUID.
    let snap = source
        .snapshots
        .iter()
        .filter(|s| s.createtxg <= to.createtxg && on_target(s.guid).is_some())
        .max_by_key(|s| s.createtxg);
    let mark = source
        .bookmarks
        .iter()
        .filter(|b| b.createtxg <= to.createtxg && on_target(b.guid).is_some())
        .max_by_key(|b| b.createtxg);
    let base = match (snap, mark) {
        (Some(s), Some(b)) if b.createtxg > s.createtxg => Base::Bookmark(b.clone()),
        (Some(s), _) => Base::Snapshot(s.clone()),
        (None, Some(b)) => Base::Bookmark(b.clone()),
        (None, None) => return Err(BaseError::NoCommonSnapshot),
    };
    let base_on_target = on_target(base.point().guid).map_or(0, |t| t.createtxg);
    let newer: Vec<String> = target
        .snapshots
        .iter()
        .filter(|t| t.createtxg > base_on_target)
        .map(|t| t.name.clone())
        .collect();
    if !newer.is_empty() && !target.ployz_replica {
        return Err(BaseError::Diverged {
            base: base.point().name.clone(),
            newer,
        });
    }
    // A replica is always received with rollback: it may also have been modified (atime,
    // a stray write) since the base, which zfs-fuse cannot report before the receive.
    Ok(SendPlan::Incremental {
        base,
        to,
        rollback: target.ployz_replica,
    })
}

/// One stream of a send: from `base` (none: a full stream) to the snapshot `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub base: Option<Base>,
    pub to: Point,
}

/// The streams that bring a target from `base` to `to`, one snapshot each (`zfs send -i`),
/// every snapshot of the source in between arriving with its GUID as `-I` would bring it.
/// One stream per snapshot is what lets the receiver refuse compound streams, the only kind
/// that can carry properties or child datasets (`transfer::begin`).
pub fn steps(source: &SourceSide, base: Option<Base>, to: &Point) -> Vec<Step> {
    let Some(base) = base else {
        return vec![Step {
            base: None,
            to: to.clone(),
        }];
    };
    let from = base.point().createtxg;
    let mut between: Vec<&Point> = source
        .snapshots
        .iter()
        .filter(|s| s.createtxg > from && s.createtxg < to.createtxg)
        .collect();
    between.sort_by_key(|s| s.createtxg);
    let mut out = Vec::with_capacity(between.len() + 1);
    let mut prev = base;
    for s in between.into_iter().chain(std::iter::once(to)) {
        out.push(Step {
            base: Some(prev),
            to: s.clone(),
        });
        prev = Base::Snapshot(s.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_is_one_stream_per_snapshot() {
        let src = source();
        assert_eq!(
            steps(&src, None, &p("s3", 3, 30)),
            [Step {
                base: None,
                to: p("s3", 3, 30)
            }]
        );
        let from_s1 = steps(&src, Some(Base::Snapshot(p("s1", 1, 10))), &p("s3", 3, 30));
        assert_eq!(
            from_s1,
            [
                Step {
                    base: Some(Base::Snapshot(p("s1", 1, 10))),
                    to: p("s2", 2, 20)
                },
                Step {
                    base: Some(Base::Snapshot(p("s2", 2, 20))),
                    to: p("s3", 3, 30)
                },
            ]
        );
        // From a bookmark: the first stream starts there, the next from a snapshot.
        let from_mark = steps(&src, Some(Base::Bookmark(p("b1", 1, 10))), &p("s3", 3, 30));
        assert_eq!(from_mark.len(), 2);
        assert_eq!(from_mark[0].base, Some(Base::Bookmark(p("b1", 1, 10))));
        // Only up to `to`, and nothing older than the base.
        let short = steps(&src, Some(Base::Snapshot(p("s2", 2, 20))), &p("s3", 3, 30));
        assert_eq!(short.len(), 1);
        assert_eq!(
            steps(&src, Some(Base::Snapshot(p("s1", 1, 10))), &p("s2", 2, 20)).len(),
            1
        );
    }

    fn p(name: &str, guid: u64, txg: u64) -> Point {
        Point {
            name: name.into(),
            guid,
            createtxg: txg,
        }
    }

    fn source() -> SourceSide {
        SourceSide {
            snapshots: vec![p("s1", 1, 10), p("s2", 2, 20), p("s3", 3, 30)],
            bookmarks: vec![],
        }
    }

    fn target(snaps: Vec<Point>) -> TargetSide {
        TargetSide {
            exists: true,
            snapshots: snaps,
            ployz_replica: false,
        }
    }

    #[test]
    fn full_when_the_target_does_not_exist() {
        let plan = plan_send(&source(), &TargetSide::default(), "s3");
        assert_eq!(plan, Ok(SendPlan::Full { to: p("s3", 3, 30) }));
    }

    #[test]
    fn incremental_from_the_newest_common_snapshot_by_guid() {
        // Target names differ (renamed) but GUIDs match: GUID decides.
        let t = target(vec![p("old-1", 1, 5), p("old-2", 2, 9)]);
        let plan = plan_send(&source(), &t, "s3");
        assert_eq!(
            plan,
            Ok(SendPlan::Incremental {
                base: Base::Snapshot(p("s2", 2, 20)),
                to: p("s3", 3, 30),
                rollback: false
            })
        );
    }

    #[test]
    fn same_name_other_guid_is_not_common() {
        let t = target(vec![p("s2", 99, 9)]);
        assert_eq!(
            plan_send(&source(), &t, "s3"),
            Err(BaseError::NoCommonSnapshot)
        );
    }

    #[test]
    fn up_to_date_is_a_no_op() {
        let t = target(vec![p("s1", 1, 5), p("s3", 3, 9)]);
        assert_eq!(
            plan_send(&source(), &t, "s3"),
            Ok(SendPlan::UpToDate { to: p("s3", 3, 30) })
        );
    }

    #[test]
    fn an_existing_target_without_common_snapshot_is_refused() {
        let empty = target(vec![]);
        assert_eq!(
            plan_send(&source(), &empty, "s3"),
            Err(BaseError::NoCommonSnapshot)
        );
    }

    #[test]
    fn a_target_with_newer_snapshots_is_diverged() {
        let t = target(vec![p("s1", 1, 5), p("local", 77, 8)]);
        let err = plan_send(&source(), &t, "s3");
        assert_eq!(
            err,
            Err(BaseError::Diverged {
                base: "s1".into(),
                newer: vec!["local".into()]
            })
        );
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("will not discard"), "{msg}");
    }

    #[test]
    fn a_diverged_ployz_replica_is_rolled_back() {
        let mut t = target(vec![p("s1", 1, 5), p("local", 77, 8)]);
        t.ployz_replica = true;
        assert_eq!(
            plan_send(&source(), &t, "s3"),
            Ok(SendPlan::Incremental {
                base: Base::Snapshot(p("s1", 1, 10)),
                to: p("s3", 3, 30),
                rollback: true
            })
        );
    }

    #[test]
    fn a_newer_bookmark_is_a_better_base() {
        let mut s = source();
        // s2 was destroyed on the source after being bookmarked.
        s.snapshots.retain(|x| x.name != "s2");
        s.bookmarks.push(p("s2", 2, 20));
        let t = target(vec![p("s1", 1, 5), p("s2", 2, 9)]);
        assert_eq!(
            plan_send(&s, &t, "s3"),
            Ok(SendPlan::Incremental {
                base: Base::Bookmark(p("s2", 2, 20)),
                to: p("s3", 3, 30),
                rollback: false
            })
        );
        assert_eq!(Base::Bookmark(p("s2", 2, 20)).suffix(), "#s2");
    }

    #[test]
    fn bases_newer_than_the_requested_snapshot_are_ignored() {
        let t = target(vec![p("s1", 1, 5)]);
        assert_eq!(
            plan_send(&source(), &t, "s2"),
            Ok(SendPlan::Incremental {
                base: Base::Snapshot(p("s1", 1, 10)),
                to: p("s2", 2, 20),
                rollback: false
            })
        );
        assert_eq!(
            plan_send(&source(), &t, "nope"),
            Err(BaseError::NoSuchSnapshot("nope".into()))
        );
    }
}

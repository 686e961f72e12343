//! When a reconcile may decide from the watch cache instead of reading the Migration again.
//!
//! A cached Migration may lag behind the API (a watch that reconnects late after an API-server
//! restart), and a stale status must never drive an effect. Reading it live at every reconcile
//! guarantees that, at the price of one request per reconcile: every status write wakes both
//! of its agents, and a waiting step looks again every few seconds. Instead:
//!
//! - the version this agent last read live or wrote itself is remembered ([`Fresh::saw`]);
//!   a cached object at exactly that version, remembered less than [`MAX_AGE`] ago, is what
//!   the API had then, so a reconcile may decide from it ([`Read::Cached`]);
//! - a decision from the cache that would act (any effect but waiting or reporting progress)
//!   is confirmed first: the Migration is read live, and if it moved on, decided again from
//!   that version (`source::drive`). Admission and the takeover read live or write
//!   conditionally on the version read;
//! - a write refused for a newer version (409) forgets the memo, so the retry reads live.
//!
//! So a stale cache can delay a wait by at most [`MAX_AGE`], never make an agent act on it.
//! The target's agent, once a Migration is admitted, only waits on it (or takes it over, by a
//! write conditional on the version it read): it decides from the cache whatever the version
//! ([`Fresh::may_wait_on`]), unless its last write conflicted. A stale cache there delays a
//! takeover, which the conflict then corrects.
//! The same holds for the source's heartbeat, which only moves forward: one seen recently
//! enough proves the source alive without reading its Machine again ([`Heartbeats`]). A
//! waiting step's facts may use the plan's Machines as read less than [`MAX_AGE`] ago
//! ([`Recent`]); an effect reads them live.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::lock;
use crate::api::Migration;

/// How long a version read live (or written) vouches for the cache.
pub const MAX_AGE: Duration = Duration::from_secs(10);

/// How a reconcile's Migration was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// From the API, in this reconcile.
    Live,
    /// From the watch cache, at the version this agent last read live or wrote.
    Cached,
}

/// Most Migrations are deleted without a last reconcile here to forget them: an entry not
/// refreshed for this long is dropped when a new Migration is first seen.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Per Migration (UID): the version this agent last read live or wrote (`None` after a
/// conflict, until it is read live again), and when.
#[derive(Debug, Default)]
pub struct Fresh(Mutex<HashMap<String, (Option<String>, Instant)>>);

impl Fresh {
    /// `m` is what the API has now (just read, or just written by this agent).
    pub fn saw(&self, m: &Migration) {
        if let (Some(uid), Some(rv)) = (m.uid(), m.resource_version()) {
            self.remember(uid, Some(rv));
        }
    }

    fn remember(&self, uid: String, version: Option<String>) {
        let mut map = lock(&self.0);
        if !map.contains_key(&uid) {
            map.retain(|_, (_, at)| at.elapsed() < FORGET_AFTER);
        }
        map.insert(uid, (version, Instant::now()));
    }

    /// Whether a reconcile that only waits (or writes on the condition of the version it
    /// read) may take `m` from the cache as it is: yes unless this agent's last write on it
    /// conflicted, when it reads live until it has caught up.
    pub fn may_wait_on(&self, m: &Migration) -> bool {
        let Some(uid) = m.uid() else {
            return false;
        };
        !matches!(lock(&self.0).get(&uid), Some((None, _)))
    }

    /// Whether the cached `m` is at the version this agent last saw live, recently.
    pub fn current(&self, m: &Migration) -> bool {
        let (Some(uid), Some(rv)) = (m.uid(), m.resource_version()) else {
            return false;
        };
        lock(&self.0)
            .get(&uid)
            .is_some_and(|(seen, at)| seen.as_ref() == Some(&rv) && at.elapsed() < MAX_AGE)
    }

    /// The next reconcile of `uid` reads live (a conflict).
    pub fn forget(&self, uid: &str) {
        self.remember(uid.to_string(), None);
    }

    /// `uid` is gone: nothing to remember.
    pub fn gone(&self, uid: &str) {
        lock(&self.0).remove(uid);
    }
}

/// The newest heartbeat this agent has read of each machine.
#[derive(Debug, Default)]
pub struct Heartbeats(Mutex<HashMap<String, Timestamp>>);

impl Heartbeats {
    pub fn saw(&self, machine: &str, at: Timestamp) {
        let mut map = lock(&self.0);
        let newest = map.entry(machine.to_string()).or_insert(at);
        if at > *newest {
            *newest = at;
        }
    }

    /// The newest heartbeat of `machine` read so far: the machine was alive then at least.
    pub fn newest(&self, machine: &str) -> Option<Timestamp> {
        lock(&self.0).get(machine).copied()
    }
}

/// Objects read live recently, by name: what the API had less than [`MAX_AGE`] ago. For the
/// facts a wait decides on (a step that waits looks every few seconds, and would read the
/// same two Machines each time), never for the read an effect acts on.
#[derive(Debug)]
pub struct Recent<V>(Mutex<HashMap<String, (V, Instant)>>);

impl<V> Default for Recent<V> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<V: Clone> Recent<V> {
    pub fn get(&self, name: &str) -> Option<V> {
        lock(&self.0)
            .get(name)
            .filter(|(_, at)| at.elapsed() < MAX_AGE)
            .map(|(v, _)| v.clone())
    }

    pub fn put(&self, name: &str, v: V) {
        lock(&self.0).insert(name.to_string(), (v, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(uid: &str, rv: &str) -> Migration {
        let mut m = Migration::new(
            "m",
            crate::api::MigrationSpec {
                service: "db".into(),
                to: "b".into(),
                from: None,
                transfer: None,
                timeouts: None,
                source_copy: None,
            },
        );
        m.metadata.uid = Some(uid.into());
        m.metadata.resource_version = Some(rv.into());
        m
    }

    #[test]
    fn the_cache_is_trusted_only_at_the_version_last_seen_live() {
        let fresh = Fresh::default();
        let v1 = migration("u", "1");
        assert!(!fresh.current(&v1), "nothing seen yet: read live");
        fresh.saw(&v1);
        assert!(fresh.current(&v1));
        // Seen live at 2 while the cache still holds 1: the cache lags, read live.
        fresh.saw(&migration("u", "2"));
        assert!(!fresh.current(&v1));
        assert!(fresh.current(&migration("u", "2")));
        assert!(fresh.may_wait_on(&v1));
        fresh.forget("u");
        assert!(
            !fresh.current(&migration("u", "2")),
            "after a conflict: read live"
        );
        assert!(
            !fresh.may_wait_on(&v1),
            "after a conflict: not even a wait from the cache"
        );
        fresh.saw(&migration("u", "3"));
        assert!(fresh.may_wait_on(&v1));
        assert!(!fresh.current(&migration("other", "2")));
        assert!(fresh.may_wait_on(&migration("other", "2")));
    }

    #[test]
    fn old_entries_go_when_a_new_migration_comes() {
        let fresh = Fresh::default();
        fresh.saw(&migration("old", "1"));
        fresh.saw(&migration("recent", "1"));
        lock(&fresh.0).insert(
            "old".into(),
            (Some("1".into()), Instant::now() - FORGET_AFTER),
        );
        fresh.saw(&migration("new", "1"));
        let map = lock(&fresh.0);
        assert!(!map.contains_key("old"));
        assert!(map.contains_key("recent") && map.contains_key("new"));
    }

    #[test]
    fn a_recent_read_is_reused_only_while_recent() {
        let r = Recent::default();
        assert_eq!(r.get("a"), None);
        r.put("a", 1);
        assert_eq!(r.get("a"), Some(1));
        assert_eq!(r.get("b"), None);
        // Read MAX_AGE ago: read again.
        lock(&r.0).insert("a".into(), (1, Instant::now() - MAX_AGE));
        assert_eq!(r.get("a"), None);
    }

    #[test]
    fn a_heartbeat_only_moves_forward() {
        let h = Heartbeats::default();
        let t1 = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let t2 = Timestamp::from_second(2_000).unwrap_or(Timestamp::UNIX_EPOCH);
        h.saw("a", t2);
        h.saw("a", t1);
        assert_eq!(h.newest("a"), Some(t2));
        assert_eq!(h.newest("b"), None);
    }
}

//! Admission to the receive port, so that connections nobody has authenticated yet cannot
//! crowd out the ones that will authenticate, and one machine cannot take every slot.
//!
//! A connection is *pending* from accept until its peer is known (TLS handshake and `Hello`),
//! then it holds a *peer* slot until it ends. Pending connections are capped globally and per
//! source address; when a cap is reached the oldest pending connection is evicted, not the new
//! one (OpenSSH's `MaxStartups` refuses the new one, which lets a flood of idle sockets lock a
//! real sender out). An idle socket therefore lives at most until newer ones push it out, or
//! the handshake timeout, whichever comes first; a real sender's handshake takes milliseconds.
//! Peer slots are capped per machine (by certificate) and for all machines together: beyond
//! either the receiver refuses with `Busy`, which a sender retries.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

/// Limits of the receive port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections not yet authenticated, all sources together.
    pub pending: usize,
    /// Connections not yet authenticated from one address.
    pub pending_per_address: usize,
    /// Authenticated connections of one machine (one per volume in flight is enough).
    pub per_peer: usize,
    /// Authenticated connections of all machines together: each runs a `zfs receive`, so
    /// this bounds the processes a receiver runs however many machines send to it.
    pub peers: usize,
    /// From accept to the end of the `Hello`: the TLS handshake and the first frame.
    pub handshake: Duration,
    /// Any later control frame, and any gap between stream chunks.
    pub frame: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            pending: 64,
            pending_per_address: 16,
            per_peer: 16,
            peers: 64,
            handshake: Duration::from_secs(10),
            frame: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// Pending connections by age (ids only grow).
    pending: BTreeMap<u64, (IpAddr, Arc<Notify>)>,
    peers: HashMap<String, usize>,
    /// Sum of `peers`.
    authenticated: usize,
}

/// Shared by every connection of one receiver.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    inner: Mutex<Inner>,
}

/// A pending connection's place; leaves the gate when dropped.
#[derive(Debug)]
pub struct Pending<'a> {
    gate: &'a Gate,
    id: u64,
    evicted: Arc<Notify>,
}

impl Pending<'_> {
    /// Resolves when a newer connection pushed this one out.
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.gate.lock().pending.remove(&self.id);
    }
}

/// An authenticated connection's place; leaves the gate when dropped.
#[derive(Debug)]
pub struct PeerSlot<'a> {
    gate: &'a Gate,
    peer: String,
}

impl Drop for PeerSlot<'_> {
    fn drop(&mut self) {
        let mut inner = self.gate.lock();
        if let Some(n) = inner.peers.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.peers.remove(&self.peer);
            }
            inner.authenticated = inner.authenticated.saturating_sub(1);
        }
    }
}

impl Gate {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            inner: Mutex::default(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `addr`, evicting the oldest pending ones over a cap.
    pub fn admit(&self, addr: IpAddr) -> Pending<'_> {
        let mut inner = self.lock();
        let id = inner.next;
        inner.next += 1;
        let evicted = Arc::new(Notify::new());
        inner.pending.insert(id, (addr, Arc::clone(&evicted)));
        let from_addr: Vec<u64> = inner
            .pending
            .iter()
            .filter(|(_, (a, _))| *a == addr)
            .map(|(id, _)| *id)
            .collect();
        let over = from_addr
            .len()
            .saturating_sub(self.limits.pending_per_address.max(1));
        for old in from_addr.into_iter().take(over) {
            evict(&mut inner, old);
        }
        while inner.pending.len() > self.limits.pending.max(1) {
            let Some(oldest) = inner.pending.keys().next().copied() else {
                break;
            };
            evict(&mut inner, oldest);
        }
        Pending {
            gate: self,
            id,
            evicted,
        }
    }

    /// Turns a pending connection into one of `peer`'s slots, or says which cap is full.
    pub fn authenticated(&self, pending: Pending<'_>, peer: &str) -> Result<PeerSlot<'_>, Full> {
        drop(pending);
        let mut inner = self.lock();
        if inner.authenticated >= self.limits.peers.max(1) {
            return Err(Full::AllPeers(self.limits.peers.max(1)));
        }
        let n = inner.peers.entry(peer.to_string()).or_default();
        if *n >= self.limits.per_peer.max(1) {
            return Err(Full::Peer(self.limits.per_peer.max(1)));
        }
        *n += 1;
        inner.authenticated += 1;
        Ok(PeerSlot {
            gate: self,
            peer: peer.to_string(),
        })
    }

    /// Connections waiting to authenticate (for tests and metrics).
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }
}

/// Which cap refused an authenticated connection, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("already has {0} connections open to this machine; retry when one ends")]
    Peer(usize),
    #[error(
        "this machine already receives on {0} connections from all machines; retry when one ends"
    )]
    AllPeers(usize),
}

fn evict(inner: &mut Inner, id: u64) {
    if let Some((_, notify)) = inner.pending.remove(&id) {
        // A stored permit: the connection sees it even if it is not waiting yet.
        notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(pending: usize, per_address: usize, per_peer: usize) -> Limits {
        Limits {
            pending,
            pending_per_address: per_address,
            per_peer,
            peers: 100,
            ..Limits::default()
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    async fn is_evicted(p: &Pending<'_>) -> bool {
        tokio::time::timeout(Duration::from_millis(1), p.evicted())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_flood_from_one_address_evicts_its_own_oldest_never_the_newest() {
        let gate = Gate::new(limits(100, 3, 4));
        let other = gate.admit(ip(9));
        let flood: Vec<_> = (0..10).map(|_| gate.admit(ip(1))).collect();
        let newest = gate.admit(ip(1));
        assert!(!is_evicted(&newest).await, "the newest connection is kept");
        assert!(!is_evicted(&other).await, "another address is untouched");
        let mut kept = 0;
        for p in &flood {
            kept += usize::from(!is_evicted(p).await);
        }
        assert_eq!(
            kept, 2,
            "three per address: the newest and two of the flood"
        );
        assert_eq!(gate.pending(), 4);
    }

    #[tokio::test]
    async fn the_global_cap_evicts_the_oldest_whatever_its_address() {
        let gate = Gate::new(limits(3, 10, 4));
        let first = gate.admit(ip(1));
        let _b = gate.admit(ip(2));
        let _c = gate.admit(ip(3));
        let last = gate.admit(ip(4));
        assert!(is_evicted(&first).await);
        assert!(!is_evicted(&last).await);
        assert_eq!(gate.pending(), 3);
    }

    #[tokio::test]
    async fn a_machine_gets_its_slots_and_no_more_and_gets_them_back() {
        let gate = Gate::new(limits(10, 10, 2));
        let one = gate.authenticated(gate.admit(ip(1)), "machine-a");
        let two = gate.authenticated(gate.admit(ip(1)), "machine-a");
        assert!(one.is_ok() && two.is_ok());
        assert_eq!(
            gate.authenticated(gate.admit(ip(1)), "machine-a").err(),
            Some(Full::Peer(2))
        );
        assert!(
            gate.authenticated(gate.admit(ip(2)), "machine-b").is_ok(),
            "another machine has its own slots"
        );
        drop(one);
        assert!(gate.authenticated(gate.admit(ip(1)), "machine-a").is_ok());
        assert_eq!(
            gate.pending(),
            0,
            "authenticated connections are not pending"
        );
    }

    #[tokio::test]
    async fn all_machines_together_get_the_global_slots_and_no_more() {
        let gate = Gate::new(Limits {
            peers: 3,
            ..limits(10, 10, 2)
        });
        let a1 = gate.authenticated(gate.admit(ip(1)), "machine-a");
        let _a2 = gate.authenticated(gate.admit(ip(1)), "machine-a");
        let _b1 = gate.authenticated(gate.admit(ip(2)), "machine-b");
        assert!(a1.is_ok());
        assert_eq!(
            gate.authenticated(gate.admit(ip(3)), "machine-c").err(),
            Some(Full::AllPeers(3)),
            "a third machine finds every slot taken"
        );
        drop(a1);
        assert!(
            gate.authenticated(gate.admit(ip(3)), "machine-c").is_ok(),
            "a slot freed by one machine serves another"
        );
    }
}

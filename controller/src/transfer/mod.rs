//! The machine-to-machine transfer engine. The target machine's agent runs a [`server::Server`]
//! on its transfer endpoint; the source machine's agent streams `zfs send` into it with
//! [`client::Sender`]. See [`protocol`] for the exchange, [`authz`] for who may send what.

pub mod authz;
pub mod begin;
pub mod client;
pub mod gate;
pub mod protocol;
pub mod pump;
pub mod server;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live byte counters of one transfer, read by progress reporting.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of the ZFS stream produced by `zfs send`.
    pub stream_bytes: Arc<AtomicU64>,
    /// Bytes on the wire (compressed, with framing).
    pub wire_bytes: AtomicU64,
    /// Estimated stream size; 0 when unknown.
    pub estimated_bytes: AtomicU64,
    /// Bytes read from `zfs send` but still queued for the wire.
    pub queued_bytes: Arc<AtomicU64>,
}

impl Progress {
    pub fn stream(&self) -> u64 {
        self.stream_bytes.load(Ordering::Relaxed)
    }
    /// Stream bytes handed to the network: read, less those still queued (with compression
    /// the queue holds compressed bytes, so this errs high by the compression saved there).
    pub fn sent(&self) -> u64 {
        self.stream()
            .saturating_sub(self.queued_bytes.load(Ordering::Relaxed))
    }
    pub fn wire(&self) -> u64 {
        self.wire_bytes.load(Ordering::Relaxed)
    }
    pub fn estimate(&self) -> Option<u64> {
        Some(self.estimated_bytes.load(Ordering::Relaxed)).filter(|e| *e > 0)
    }
}

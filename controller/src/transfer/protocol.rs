//! The wire protocol between a source agent (client) and a target agent (server), inside a
//! mutually authenticated TLS session:
//!
//! 1. client `Hello` (which migration, which claim) -> server `HelloReply`: refused, or
//!    accepted with the state of the target dataset the server chose itself;
//! 2. client `Offer`: nothing to send, or a stream (full, incremental from a base, or resumed);
//! 3. the stream as chunks (`u32` length + bytes), ended by an empty chunk, so a cut
//!    connection is never mistaken for a complete stream;
//! 4. server `Outcome`.
//!
//! Control messages are JSON frames: a `u32` big-endian length, then the JSON.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::api::ZfsCapabilities;
use crate::zfs::base::Point;

/// 3: one stream per snapshot (`Offer::Stream::more`); a version-2 sender's `-I` streams are
/// compound, which a version-3 receiver refuses.
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest control frame; anything bigger is a protocol violation.
const MAX_FRAME: u32 = 1 << 20;
/// Largest data chunk.
pub const MAX_CHUNK: usize = 1 << 20;

/// `namespace/name` of a Migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for MigrationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub migration: MigrationKey,
    /// The PersistentVolumeClaim whose volume is sent.
    pub claim: String,
    /// What the sender asks for; a receive unless said otherwise.
    #[serde(default)]
    pub action: Action,
}

/// What a source agent asks of the target agent for one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Action {
    /// Receive a stream (then an `Offer` follows).
    #[default]
    Receive,
    /// Cutover: make the received copy the live volume (writable, mounted).
    Promote,
    /// Rollback: make the copy a read-only ployz replica again.
    Demote,
}

/// Why a receiver refuses a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    ProtocolVersion,
    /// The client's key is not the one the machine it names publishes.
    UnknownPeer,
    UnknownMigration,
    NotPlanned,
    NotForThisMachine,
    WrongPeer,
    NotSending,
    UnknownVolume,
    OutsideParent,
    /// The dataset on this machine holds another claim's volume (its `ployz:claim`).
    NotThisVolume,
    /// The sender's machine holds all of its connection slots; retried.
    Busy,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum HelloReply {
    Accepted(TargetState),
    Refused {
        reason: RefusalReason,
        message: String,
    },
}

/// The target dataset as the receiver sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetState {
    pub dataset: String,
    pub exists: bool,
    pub snapshots: Vec<Point>,
    pub ployz_replica: bool,
    /// Token of an interrupted resumable receive.
    pub resume_token: Option<String>,
    /// What the receiver's ZFS can do; the sender uses only what both sides have.
    pub capabilities: ZfsCapabilities,
    /// Bytes the receive may write (the dataset's, or its parent's when it is new).
    #[serde(default)]
    pub available: Option<u64>,
}

/// Wire compression of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum WireCompression {
    #[default]
    None,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Offer {
    /// The target is up to date, or the sender gave up (it says why).
    Nothing { reason: String },
    Stream {
        /// Snapshot (short name) the stream brings the target to.
        to: String,
        /// Incremental base (short name), or none for a full stream.
        base: Option<String>,
        /// GUID of the base, by which the receiver finds its own copy of it.
        base_guid: Option<u64>,
        /// The stream continues an interrupted receive from its token.
        resumed: bool,
        compression: WireCompression,
        /// Another `Offer` follows this stream's `Outcome` on the same connection: the next
        /// snapshot's stream (one per snapshot; see `zfs::base::steps`).
        #[serde(default)]
        more: bool,
    },
}

/// How a receive ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiveFailure {
    WrongBase,
    TargetModified,
    TargetExists,
    OutOfSpace,
    StreamBroken,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Outcome {
    Received {
        bytes: u64,
    },
    Failed {
        reason: ReceiveFailure,
        message: String,
    },
    /// Answer to [`Action::Promote`]: where the live volume is mounted.
    Promoted {
        mountpoint: String,
    },
    /// Answer to [`Action::Demote`].
    Demoted,
    /// Answer to [`Action::Demote`] of a copy the workload wrote to on this machine: kept
    /// (read-only) under `dataset`, a name no Migration plans, so that no later receive
    /// rolls back what it wrote.
    Kept {
        dataset: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unexpected message {0}")]
    Unexpected(String),
}

pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(u32::MAX))?;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
) -> Result<T, FrameError> {
    let len = r.read_u32().await?;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0; len as usize];
    r.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_reject_oversized() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            migration: MigrationKey {
                namespace: "ns".into(),
                name: "m".into(),
            },
            claim: "data".into(),
            action: Action::Promote,
        };
        write_frame(&mut a, &hello)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let got: Hello = read_frame(&mut b).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, hello);

        a.write_all(&(MAX_FRAME + 1).to_be_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let err = read_frame::<_, Hello>(&mut b).await;
        assert!(matches!(err, Err(FrameError::TooLarge(_))), "{err:?}");
    }
}

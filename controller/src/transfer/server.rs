//! The receiving side: accepts mutually authenticated connections, authorizes each against
//! the API, reports the target dataset's state, and pipes the stream into `zfs receive`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_compression::tokio::write::ZstdDecoder;
use async_compression::zstd::DParameter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::authz::{Authorizer, Grant};
use super::begin::BeginCheck;
use super::gate::{Full, Gate, Limits};
use super::protocol::{
    Action, Hello, HelloReply, Offer, Outcome, PROTOCOL_VERSION, ReceiveFailure, RefusalReason,
    TargetState, WireCompression, read_frame, write_frame,
};
use super::pump::{PumpError, PumpOptions, recv_chunks};
use super::tls::{self, TlsError};
use crate::api::{ZfsImplementation, ZfsInfo};
use crate::zfs::{
    DatasetName, NEUTRAL, NOT_RECEIVED, PROP_CLAIM, PROP_MIGRATION, PROP_PEERS, PROP_REPLICA,
    PROP_SOURCE, ReceiveArgs, Zfs, ZfsError,
};

/// The snapshot a demote takes to see whether a promoted copy was written to.
const PROBE: &str = "ployz-demote-probe";

/// Whether a dataset changed between its snapshot `base` and a later snapshot `probe` with
/// nothing in between: any change rewrites blocks (copy on write), which leaves `base` blocks
/// of its own, or adds some, which changes what `probe` refers to.
pub fn written_since(base: &crate::zfs::Snapshot, probe: &crate::zfs::Snapshot) -> bool {
    base.used > 0 || probe.referenced != base.referenced
}

/// How long an empty, unmarked target may take to vanish after an interrupted receive.
const SETTLE: Duration = Duration::from_secs(5);
/// Pause after a failed accept, doubling up to the maximum while accepts keep failing.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(50);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// Largest zstd window a sender may make the receiver allocate (2^23 = 8 MiB). The sender's
/// default level uses 2^21 at most; zstd's own default limit would allow 128 MiB per stream.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Parent dataset of everything this machine receives.
    pub parent: DatasetName,
    /// Connection caps and read timeouts; `limits.frame` also aborts a stalled stream.
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("no Hello within {0:?} of connecting")]
    HandshakeTimeout(Duration),
    #[error("pushed out by newer connections before authenticating")]
    Evicted,
    #[error("no message from the peer within {0:?}")]
    FrameTimeout(Duration),
    #[error("stream refused: {0}")]
    StreamRefused(String),
    #[error(transparent)]
    Identity(#[from] TlsError),
    #[error("protocol: {0}")]
    Frame(#[from] super::protocol::FrameError),
    #[error("refused {peer}: {message}")]
    Refused { peer: String, message: String },
    #[error("a client claiming to be {claimed} was refused: {message}")]
    Stranger { claimed: String, message: String },
    #[error("{0}")]
    NotThisVolume(String),
    #[error(transparent)]
    Zfs(#[from] ZfsError),
    #[error("stream: {0}")]
    Pump(#[from] PumpError),
}

/// Answers a `Hello` with a refusal; the error to end the connection with.
async fn refuse<S: AsyncWrite + Unpin>(
    conn: &mut S,
    peer: String,
    reason: RefusalReason,
    message: String,
) -> ServerError {
    let reply = HelloReply::Refused {
        reason,
        message: message.clone(),
    };
    match write_frame(conn, &reply).await {
        Ok(()) => ServerError::Refused { peer, message },
        Err(e) => e.into(),
    }
}

/// The receiver. Cheap to share; one task per connection.
pub struct Server<Z, A> {
    zfs: Arc<Z>,
    info: ZfsInfo,
    authz: Arc<A>,
    acceptor: TlsAcceptor,
    config: ServerConfig,
    gate: Gate,
    /// Datasets with a receive in progress: a second sender for one is refused.
    active: Mutex<HashSet<DatasetName>>,
    /// Bytes received, all transfers (for metrics).
    pub received_bytes: AtomicU64,
}

impl<Z, A> std::fmt::Debug for Server<Z, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Removes a dataset from the active set when its receive ends, however it ends.
struct ActiveGuard<'a> {
    set: &'a Mutex<HashSet<DatasetName>>,
    dataset: DatasetName,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.dataset);
    }
}

fn failure_of(e: &ZfsError) -> ReceiveFailure {
    match e {
        ZfsError::WrongBase(_) => ReceiveFailure::WrongBase,
        ZfsError::TargetModified(_) => ReceiveFailure::TargetModified,
        ZfsError::TargetExists(_) => ReceiveFailure::TargetExists,
        ZfsError::OutOfSpace(_) => ReceiveFailure::OutOfSpace,
        ZfsError::StreamBroken(_) => ReceiveFailure::StreamBroken,
        _ => ReceiveFailure::Other,
    }
}

impl<Z: Zfs + 'static, A: Authorizer + 'static> Server<Z, A> {
    pub fn new(
        zfs: Arc<Z>,
        info: ZfsInfo,
        authz: Arc<A>,
        tls: Arc<rustls::ServerConfig>,
        config: ServerConfig,
    ) -> Self {
        Self {
            zfs,
            info,
            authz,
            acceptor: TlsAcceptor::from(tls),
            gate: Gate::new(config.limits),
            config,
            active: Mutex::new(HashSet::new()),
            received_bytes: AtomicU64::new(0),
        }
    }

    /// Connections waiting to authenticate.
    pub fn pending_connections(&self) -> usize {
        self.gate.pending()
    }

    /// Accepts connections until dropped. Connections run as tasks owned by this future:
    /// when it is dropped (the agent stops), every receive in flight is aborted, its
    /// `zfs receive` sees a truncated stream and leaves the target at its base. A failed
    /// accept (out of file descriptors, most often) is logged and survived: the connections
    /// that end free descriptors, and the gate keeps idle ones from holding them.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut connections = tokio::task::JoinSet::new();
        let mut pause = ACCEPT_PAUSE_MIN;
        loop {
            let (tcp, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => {
                        pause = ACCEPT_PAUSE_MIN;
                        a
                    }
                    Err(e) => {
                        warn!(error = %e, ?pause, "accepting a transfer connection failed; pausing");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                        continue;
                    }
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let this = Arc::clone(&self);
            connections.spawn(async move {
                match this.handle(tcp).await {
                    Ok(()) => {}
                    // A peer's reachability probe (connect, then close) looks like this.
                    Err(ServerError::Handshake(e))
                        if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                    {
                        debug!(peer = %addr, "closed before the TLS handshake");
                    }
                    Err(e) => warn!(peer = %addr, error = %e, "transfer connection failed"),
                }
            });
        }
    }

    /// The TLS handshake, the peer's key checked against the pin its machine publishes, and
    /// the `Hello`: who the peer is and what it asks. A stranger fails here, before the
    /// receiver reads a byte of the protocol from it.
    async fn open(
        &self,
        tcp: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, String, Hello), ServerError> {
        let mut conn = self
            .acceptor
            .accept(tcp)
            .await
            .map_err(ServerError::Handshake)?;
        conn.get_mut().1.set_buffer_limit(Some(4 << 20));
        let (peer, pin) = {
            let (_, session) = conn.get_ref();
            let cert = session
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| TlsError::PeerIdentity("no client certificate".into()))?;
            (tls::peer_machine(cert)?, tls::Pin::of(cert)?)
        };
        if let Err(refusal) = self.authz.authenticate(&peer, &pin).await {
            let reply = HelloReply::Refused {
                reason: refusal.reason,
                message: refusal.message.clone(),
            };
            write_frame(&mut conn, &reply).await?;
            return Err(ServerError::Stranger {
                claimed: peer,
                message: refusal.message,
            });
        }
        let hello: Hello = read_frame(&mut conn).await?;
        Ok((conn, peer, hello))
    }

    /// Serves one connection.
    pub async fn handle(&self, tcp: TcpStream) -> Result<(), ServerError> {
        let _ = tcp.set_nodelay(true);
        let limits = self.gate.limits();
        let address = tcp
            .peer_addr()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let pending = self.gate.admit(address);
        let (mut conn, peer, hello) = tokio::select! {
            opened = tokio::time::timeout(limits.handshake, self.open(tcp)) => {
                opened.map_err(|_| ServerError::HandshakeTimeout(limits.handshake))??
            }
            () = pending.evicted() => return Err(ServerError::Evicted),
        };
        let _slot = match self.gate.authenticated(pending, &peer) {
            Ok(slot) => slot,
            Err(full) => {
                let message = match full {
                    Full::Peer(_) => format!("{peer} {full}"),
                    Full::AllPeers(_) => full.to_string(),
                };
                return Err(refuse(&mut conn, peer, RefusalReason::Busy, message).await);
            }
        };
        let grant = if hello.version != PROTOCOL_VERSION {
            Err((
                RefusalReason::ProtocolVersion,
                format!(
                    "protocol version {} is not {PROTOCOL_VERSION}; upgrade the agents to the same version",
                    hello.version
                ),
            ))
        } else {
            self.authz
                .authorize(&peer, &hello)
                .await
                .map_err(|r| (r.reason, r.message))
        };
        let Grant { dataset, claim } = match grant {
            Ok(g) => g,
            Err((reason, message)) => {
                return Err(refuse(&mut conn, peer, reason, message).await);
            }
        };
        let inserted = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dataset.clone());
        if !inserted {
            let message =
                format!("a receive into {dataset} is already in progress; retry when it ends");
            return Err(refuse(&mut conn, peer, RefusalReason::Internal, message).await);
        }
        let active = ActiveGuard {
            set: &self.active,
            dataset: dataset.clone(),
        };
        if hello.action != Action::Receive {
            let (state, found) = self.target_state(&dataset).await?;
            let done = match &found {
                Some(ds) => self.change_role_of(ds, hello.action, &claim).await,
                None => Err(ZfsError::NotFound(dataset.to_string()).into()),
            };
            write_frame(&mut conn, &HelloReply::Accepted(state)).await?;
            let reply = match &done {
                Ok(outcome) => outcome.clone(),
                Err(e) => Outcome::Failed {
                    reason: ReceiveFailure::Other,
                    message: e.to_string(),
                },
            };
            write_frame(&mut conn, &reply).await?;
            info!(%peer, %dataset, action = ?hello.action, ok = done.is_ok(), "role change");
            return done.map(drop);
        }
        let (state, found) = self.target_state(&dataset).await?;
        if let Some(Err(message)) = found.as_ref().map(|ds| ds.holds_claim(&claim)) {
            return Err(refuse(&mut conn, peer, RefusalReason::NotThisVolume, message).await);
        }
        write_frame(&mut conn, &HelloReply::Accepted(state.clone())).await?;

        let mut offer: Offer = tokio::time::timeout(limits.frame, read_frame(&mut conn))
            .await
            .map_err(|_| ServerError::FrameTimeout(limits.frame))??;
        // One stream per snapshot (`transfer::base::steps`): the sender says whether another
        // follows on this connection. Only the first may resume or roll the replica back.
        let mut first = true;
        let mut received = None;
        let outcome = loop {
            let (compression, resumed, to, base_guid, more) = match offer {
                Offer::Nothing { reason } => {
                    info!(%peer, %dataset, %reason, "nothing (more) to receive");
                    break Ok(());
                }
                Offer::Stream {
                    compression,
                    resumed,
                    to,
                    base_guid,
                    more,
                    ..
                } => (compression, resumed, to, base_guid, more),
            };
            let step = if first {
                match self.prepare(&dataset, &state, base_guid, resumed).await {
                    Ok(rollback) => {
                        self.receive(&mut conn, &dataset, &state, compression, rollback)
                            .await
                    }
                    Err(e) => Err(e),
                }
            } else {
                self.receive(&mut conn, &dataset, &state, compression, false)
                    .await
            };
            let reply = match &step {
                Ok(bytes) => {
                    if first {
                        self.after_receive(&dataset, found.as_ref(), &hello, &claim, &peer)
                            .await;
                    }
                    info!(%peer, %dataset, snapshot = %to, bytes, "received");
                    Outcome::Received { bytes: *bytes }
                }
                Err(ServerError::Zfs(e)) => Outcome::Failed {
                    reason: failure_of(e),
                    message: e.to_string(),
                },
                // Not the link's fault: sending it again would be refused again.
                Err(e @ ServerError::StreamRefused(_)) => Outcome::Failed {
                    reason: ReceiveFailure::Other,
                    message: e.to_string(),
                },
                Err(e) => Outcome::Failed {
                    reason: ReceiveFailure::StreamBroken,
                    message: e.to_string(),
                },
            };
            // The sender may be gone already (a cut link); the outcome is logged either way.
            let _ = write_frame(&mut conn, &reply).await;
            first = false;
            match step {
                Ok(_) if more => {
                    received = Some(to);
                    offer = tokio::time::timeout(limits.frame, read_frame(&mut conn))
                        .await
                        .map_err(|_| ServerError::FrameTimeout(limits.frame))??;
                }
                Ok(_) => {
                    received = Some(to);
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
        };
        // After the answer: the sender's next step (the promotion, after the final delta)
        // need not wait for this best-effort mark, nor find the dataset still busy.
        drop(active);
        if let Some(to) = &received {
            self.mark_peer(&dataset, to, &peer).await;
        }
        outcome
    }

    async fn inspect(
        &self,
        dataset: &DatasetName,
    ) -> Result<Option<crate::zfs::Dataset>, ServerError> {
        match self.zfs.inventory(dataset, &self.info).await {
            Ok(mut inv) => Ok(inv.datasets.remove(dataset)),
            Err(ZfsError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// What the sender needs to know of the target's copy, and the copy as inspected.
    async fn target_state(
        &self,
        dataset: &DatasetName,
    ) -> Result<(TargetState, Option<crate::zfs::Dataset>), ServerError> {
        let capabilities = self.info.capabilities;
        let mut found = self.inspect(dataset).await?;
        // A dataset with no snapshot, no ployz mark and no resume token may be a full receive
        // that was just interrupted (a killed agent) and that ZFS is still failing: it vanishes
        // moments later. Look again for a while before calling it someone else's data.
        let deadline = tokio::time::Instant::now() + SETTLE;
        while found.as_ref().is_some_and(|ds| {
            ds.snapshots.is_empty() && !ds.is_ployz_replica() && ds.resume_token.is_none()
        }) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            found = self.inspect(dataset).await?;
        }
        let state = match &found {
            Some(ds) => TargetState {
                dataset: dataset.to_string(),
                exists: true,
                snapshots: ds.target_side().snapshots,
                ployz_replica: ds.is_ployz_replica(),
                resume_token: ds.resume_token.clone(),
                capabilities,
                available: Some(ds.available),
            },
            None => TargetState {
                dataset: dataset.to_string(),
                exists: false,
                snapshots: vec![],
                ployz_replica: false,
                resume_token: None,
                capabilities,
                // The parent's own space, not its recursive inventory.
                available: self
                    .zfs
                    .space(&self.config.parent)
                    .await
                    .ok()
                    .map(|p| p.available),
            },
        };
        Ok((state, found))
    }

    /// Gets the target ready; returns whether the receive may roll it back. Decided here from
    /// what this machine sees, never from what the sender says: only a ployz-owned replica is
    /// rolled back, to its copy of the base (found by GUID), discarding what came after.
    async fn prepare(
        &self,
        dataset: &DatasetName,
        state: &TargetState,
        base_guid: Option<u64>,
        resumed: bool,
    ) -> Result<bool, ServerError> {
        if !state.exists {
            self.zfs
                .create(&self.config.parent, &[])
                .await
                .or_else(|e| match e {
                    ZfsError::Failed { stderr, .. } if stderr.contains("already exists") => Ok(()),
                    e => Err(e),
                })?;
            return Ok(false);
        }
        if !state.ployz_replica || resumed {
            return Ok(false);
        }
        let base = base_guid.and_then(|g| state.snapshots.iter().find(|s| s.guid == g));
        if let Some(base) = base {
            let newest = state.snapshots.iter().map(|s| s.createtxg).max();
            if newest != Some(base.createtxg) {
                let snap = dataset.snapshot(&base.name).map_err(ZfsError::from)?;
                info!(%dataset, base = %base.name, "rolling the replica back to the common snapshot");
                self.zfs.rollback(&snap).await?;
            }
        }
        Ok(true)
    }

    async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut S,
        dataset: &DatasetName,
        state: &TargetState,
        compression: WireCompression,
        rollback: bool,
    ) -> Result<u64, ServerError> {
        let args = ReceiveArgs {
            target: dataset.clone(),
            resumable: state.capabilities.resume_tokens,
            rollback,
            neutralize: self.info.implementation == ZfsImplementation::OpenZfs,
        };
        let mut child = self.zfs.receive(&args)?;
        let stdin = child.stdin.take().ok_or_else(|| ZfsError::Failed {
            command: "zfs receive".into(),
            stderr: "no stdin".into(),
        })?;
        let opts = PumpOptions {
            no_progress: self.config.limits.frame,
            rate_limit: None,
        };
        // Nothing reaches `zfs receive` before the stream's first record is checked.
        let stdin = BeginCheck::new(stdin);
        let pumped = match compression {
            WireCompression::None => recv_chunks(conn, stdin, opts, &self.received_bytes).await,
            WireCompression::Zstd => {
                // A bounded window: a stream asking for more is refused, not allocated.
                let params = [DParameter::window_log_max(ZSTD_WINDOW_LOG_MAX)];
                let decoder = ZstdDecoder::with_params(stdin, &params);
                recv_chunks(conn, decoder, opts, &self.received_bytes).await
            }
        };
        // Whether or not the stream was complete, the receive must end before we answer:
        // a truncated stream makes it fail and leaves the target at its base (or, with
        // resume tokens, keeps the partial state for the next attempt).
        let finished = crate::zfs::finish(child, "zfs receive").await;
        if let Err(PumpError::Local(e)) = &pumped
            && e.kind() == std::io::ErrorKind::InvalidData
        {
            return Err(ServerError::StreamRefused(e.to_string()));
        }
        if let Err(err) = finished {
            // An unclassified receive failure after a broken stream is the stream's fault.
            return Err(match pumped {
                Err(p) if matches!(err, ZfsError::Failed { .. }) => p.into(),
                _ => err.into(),
            });
        }
        Ok(pumped?)
    }

    /// Promote: the copy becomes the live volume (writable, no longer a ployz replica,
    /// mounted); returns its mountpoint. Demote: back to a read-only ployz replica. Both are
    /// idempotent. Also called directly by this machine's agent when it drives a Migration
    /// whose source is gone. `claim` (`namespace/name`): only a dataset holding that claim's
    /// volume changes role.
    pub async fn change_role(
        &self,
        dataset: &DatasetName,
        action: Action,
        claim: &str,
    ) -> Result<Outcome, ServerError> {
        let found = self
            .inspect(dataset)
            .await?
            .ok_or_else(|| ZfsError::NotFound(dataset.to_string()))?;
        self.change_role_of(&found, action, claim).await
    }

    /// [`Server::change_role`] of a dataset as just inspected.
    async fn change_role_of(
        &self,
        found: &crate::zfs::Dataset,
        action: Action,
        claim: &str,
    ) -> Result<Outcome, ServerError> {
        found
            .holds_claim(claim)
            .map_err(ServerError::NotThisVolume)?;
        let dataset = &found.name;
        let name = dataset.as_str();
        let mountpoint = self.contain(dataset).await?;
        if action == Action::Demote {
            // A copy promoted here and written to since (a rollback after the workload ran
            // on this machine) would lose those writes to the next receive's rollback.
            if !found.is_ployz_replica()
                && let Some(kept) = self.set_aside_if_written(found).await?
            {
                return Ok(Outcome::Kept {
                    dataset: kept.to_string(),
                });
            }
            self.zfs.set(name, PROP_REPLICA, "true").await?;
            self.zfs.set(name, "readonly", "on").await?;
            // zfs-fuse applies readonly only at mount time; the workload is stopped by now.
            let _ = self.zfs.unmount(dataset).await;
            match self.zfs.mount(dataset).await {
                Err(ZfsError::Failed { stderr, .. }) if stderr.contains("already mounted") => {}
                other => other?,
            }
            return Ok(Outcome::Demoted);
        }
        self.zfs.set(name, "readonly", "off").await?;
        self.zfs.set(name, PROP_REPLICA, "false").await?;
        // Remount: zfs-fuse can serve stale file contents after a receive into a mounted
        // dataset (shared/notes/zfs-fuse.md). Not being mounted is fine.
        let _ = self.zfs.unmount(dataset).await;
        match self.zfs.mount(dataset).await {
            Err(ZfsError::Failed { stderr, .. }) if stderr.contains("already mounted") => {}
            other => other?,
        }
        // As `contain` read it: mounting does not change it.
        mountpoint
            .filter(|m| m.starts_with('/'))
            .map(|mountpoint| Outcome::Promoted { mountpoint })
            .ok_or_else(|| {
                ServerError::Zfs(ZfsError::Failed {
                    command: "zfs get mountpoint".into(),
                    stderr: format!("{dataset} has no mountpoint to bind a volume to"),
                })
            })
    }

    /// A promoted copy that changed since its newest snapshot (what the cutover received)
    /// is kept read-only under `NAME-kept-TIMESTAMP`, out of every plan; returns that name.
    /// A probe snapshot settles the question: taking it syncs what was written, and the
    /// newest snapshot then holds blocks of its own, or the probe refers to other data.
    async fn set_aside_if_written(
        &self,
        found: &crate::zfs::Dataset,
    ) -> Result<Option<DatasetName>, ServerError> {
        let dataset = &found.name;
        let Some(base) = found.snapshots.last() else {
            return Ok(None);
        };
        let probe = dataset.snapshot(PROBE).map_err(ZfsError::from)?;
        match self.zfs.destroy_snapshot(&probe).await {
            Ok(()) | Err(ZfsError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.zfs.snapshot(&probe, &[]).await?;
        let inv = self.zfs.inventory(dataset, &self.info).await?;
        let now = inv.datasets.get(dataset);
        let snap = |short: &str| now.and_then(|d| d.snapshot(short));
        if !snap(base.name.short())
            .zip(snap(PROBE))
            .is_none_or(|(b, p)| written_since(b, p))
        {
            self.zfs.destroy_snapshot(&probe).await?;
            return Ok(None);
        }
        let stamp = k8s_openapi::jiff::Timestamp::now().strftime("%Y%m%d%H%M%S");
        let kept: DatasetName = format!("{dataset}-kept-{stamp}")
            .parse()
            .map_err(ZfsError::from)?;
        let name = dataset.as_str();
        self.zfs.set(name, PROP_REPLICA, "false").await?;
        self.zfs.set(name, "readonly", "on").await?;
        // zfs-fuse renames only an unmounted dataset; the workload's pods are gone by now.
        self.zfs.unmount(dataset).await?;
        self.zfs.rename(dataset, &kept).await?;
        // Mounted again, read-only, where its new name puts it: what was written can be read.
        match self.zfs.mount(&kept).await {
            Err(ZfsError::Failed { stderr, .. }) if stderr.contains("already mounted") => {}
            other => other?,
        }
        warn!(%dataset, %kept, "the workload wrote to this copy after the cutover; kept it read-only under another name");
        Ok(Some(kept))
    }

    /// Before any mount: the dataset's mountpoint comes from its parent, it honours no setuid
    /// bits or device nodes, and it has no children. Whatever a stream managed to set is reset
    /// here (legacy ZFS cannot exclude properties on receive), then checked: a dataset that
    /// would mount outside the parent's mountpoint, or that has children, is not mounted.
    /// Returns its mountpoint.
    async fn contain(&self, dataset: &DatasetName) -> Result<Option<String>, ServerError> {
        // A replication stream, the only kind that carries properties, never gets this far
        // (transfer::begin); this undoes what one might have set all the same. One `zfs get`,
        // then a change only where needed: this runs during the cutover's downtime.
        let wanted: Vec<(&str, &str)> = [("canmount", "on")].into_iter().chain(NEUTRAL).collect();
        // `canmount` is in both lists: it cannot be inherited, so it is set.
        let names: Vec<&str> = NOT_RECEIVED
            .into_iter()
            .filter(|p| *p != "canmount")
            .chain(wanted.iter().map(|(p, _)| *p))
            .collect();
        let props = self.zfs.properties(dataset, &names).await?;
        for p in &props {
            if NOT_RECEIVED.contains(&p.name.as_str()) && p.name != "canmount" && p.is_set_here() {
                self.zfs.inherit(dataset, &p.name).await?;
            }
        }
        for (prop, value) in wanted {
            if !props.iter().any(|p| p.name == prop && p.value == value) {
                self.zfs.set(dataset.as_str(), prop, value).await?;
            }
        }
        let parent_mp = self.zfs.space(&self.config.parent).await?.mountpoint;
        let inv = self.zfs.inventory(dataset, &self.info).await?;
        let uncontained = |what: String| {
            ServerError::Zfs(ZfsError::Failed {
                command: "mount".into(),
                stderr: format!("{dataset} is not mounted: {what}"),
            })
        };
        let children: Vec<String> = inv
            .datasets
            .keys()
            .filter(|d| *d != dataset)
            .map(ToString::to_string)
            .collect();
        if !children.is_empty() {
            return Err(uncontained(format!(
                "it has child datasets ({}) that no Migration planned",
                children.join(", ")
            )));
        }
        let ds = inv
            .datasets
            .get(dataset)
            .ok_or_else(|| ZfsError::NotFound(dataset.to_string()))?;
        match (&parent_mp, &ds.mountpoint) {
            // `none` or `legacy`: ZFS mounts it nowhere.
            (_, m) if !m.as_deref().is_some_and(|m| m.starts_with('/')) => Ok(m.clone()),
            (Some(p), Some(m)) if crate::plan::resolve::below(m, p) => Ok(Some(m.clone())),
            (p, m) => Err(uncontained(format!(
                "its mountpoint {m:?} is not below {}'s mountpoint {p:?}",
                self.config.parent
            ))),
        }
    }

    /// Marks a newly received dataset as ployz's read-only replica.
    /// Records on the received snapshot that `peer` holds it too (retention keeps the newest
    /// snapshot common with each machine). Best effort: a missing mark only costs space.
    async fn mark_peer(&self, dataset: &DatasetName, to: &str, peer: &str) {
        let Ok(snap) = dataset.snapshot(to) else {
            return;
        };
        let value = crate::zfs::retention::with_peer(None, peer);
        if let Err(e) = self.zfs.set(&snap.to_string(), PROP_PEERS, &value).await {
            warn!(%snap, error = %e, "cannot record the snapshot's peer");
        }
    }

    /// `found`: the dataset as inspected before the receive, if it existed.
    async fn after_receive(
        &self,
        dataset: &DatasetName,
        found: Option<&crate::zfs::Dataset>,
        hello: &Hello,
        claim: &str,
        peer: &str,
    ) {
        if found.is_some_and(|ds| !ds.is_ployz_replica()) {
            return;
        }
        // A replica keeps its marks across incremental receives (a stream sets no property:
        // transfer::begin), and each `zfs set` is tens of milliseconds of zfs-fuse, in the
        // cutover's downtime for the final delta: set only what a replica does not have yet.
        let marked = |prop: &str, value: &str| {
            found.is_some_and(|ds| match prop {
                "readonly" => ds.readonly == (value == "on"),
                // Set with the other marks when the replica was first received.
                "atime" => true,
                _ => ds.user_props.get(prop).is_some_and(|v| v == value),
            })
        };
        let name = dataset.as_str();
        for (prop, value) in [
            (PROP_REPLICA, "true".to_string()),
            (PROP_MIGRATION, hello.migration.to_string()),
            (PROP_CLAIM, claim.to_string()),
            (PROP_SOURCE, peer.to_string()),
            ("readonly", "on".to_string()),
            ("atime", "off".to_string()),
        ] {
            if marked(prop, &value) {
                continue;
            }
            if let Err(e) = self.zfs.set(name, prop, &value).await {
                warn!(%dataset, prop, error = %e, "cannot mark received dataset");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn snap(name: &str, used: u64, referenced: u64) -> crate::zfs::Snapshot {
        crate::zfs::Snapshot {
            name: name.parse().unwrap_or_else(|e| panic!("{e}")),
            guid: 1,
            createtxg: 1,
            used,
            referenced,
            userrefs: 0,
            user_props: BTreeMap::new(),
        }
    }

    #[test]
    fn a_copy_counts_as_written_when_its_newest_snapshot_no_longer_describes_it() {
        let base = |used| snap("tank/ployz/v@final", used, 4096);
        let probe = |referenced| snap("tank/ployz/v@probe", 0, referenced);
        assert!(!written_since(&base(0), &probe(4096)), "mounted, untouched");
        assert!(written_since(&base(0), &probe(8192)), "appended");
        assert!(
            written_since(&base(512), &probe(4096)),
            "rewritten in place: the old blocks are the snapshot's own"
        );
    }
}

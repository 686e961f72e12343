//! The sending side: asks the target what it has, picks the base (newest common snapshot by
//! GUID, or the receiver's resume token), holds the base while it is needed, and streams
//! `zfs send` to the receiver.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_compression::tokio::bufread::ZstdEncoder;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::info;

use super::Progress;
use super::protocol::{
    Action, FrameError, Hello, HelloReply, MigrationKey, Offer, Outcome, PROTOCOL_VERSION,
    ReceiveFailure, RefusalReason, TargetState, WireCompression, read_frame, write_frame,
};
use super::pump::{Counting, PumpError, PumpOptions, send_chunks};
use super::tls::{self, Identity, Pin};
use crate::api::ZfsInfo;
use crate::zfs::base::{self, BaseError, SendPlan, TargetSide};
use crate::zfs::{DatasetName, ResumeToken, SendArgs, Zfs, ZfsError, legacy_estimate};

/// Outgoing TLS buffer: a few chunks.
const TLS_BUFFER: usize = 4 << 20;

/// One volume to send.
#[derive(Debug, Clone)]
pub struct SendJob {
    pub migration: MigrationKey,
    pub claim: String,
    /// The machine receiving it (checked against its TLS certificate).
    pub target_machine: String,
    /// The key that machine publishes; the receiver must hold it. `send_with_retry` sets it
    /// from what its `connect` reads at each attempt.
    pub target_pin: Option<Pin>,
    /// The source dataset.
    pub dataset: DatasetName,
    /// Snapshot (short name) to bring the target to.
    pub to: String,
    pub compression: WireCompression,
    pub rate_limit: Option<u64>,
    pub no_progress: Duration,
}

/// What a send did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendReport {
    /// The target already had the snapshot.
    UpToDate,
    Sent {
        /// Incremental base, or `None` for a full stream.
        base: Option<String>,
        resumed: bool,
        stream_bytes: u64,
        wire_bytes: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("connecting to {machine}: {source}")]
    Connect {
        machine: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "TLS with {machine}: {source}; the receiver must hold the key its Machine publishes (status.tlsPin), and accepts this agent only with the key this Machine publishes"
    )]
    Tls {
        machine: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] tls::TlsError),
    #[error("{machine} refused the transfer ({reason:?}): {message}")]
    Refused {
        machine: String,
        reason: RefusalReason,
        message: String,
    },
    #[error("cannot send {dataset}: {source}")]
    Base {
        dataset: String,
        #[source]
        source: BaseError,
    },
    #[error(transparent)]
    Zfs(#[from] ZfsError),
    #[error("{machine} could not receive ({reason:?}): {message}")]
    Remote {
        machine: String,
        reason: ReceiveFailure,
        message: String,
    },
    #[error(
        "{machine} has no room for {dataset}: the stream needs about {needed} bytes and {available} are free; free space on {machine} or pick another target"
    )]
    NoRoom {
        machine: String,
        dataset: String,
        needed: u64,
        available: u64,
    },
    #[error(
        "{machine}'s resume token cannot be used: {what}; discard its partial receive (zfs receive -A {dataset} on {machine}) and retry"
    )]
    BadToken {
        machine: String,
        dataset: String,
        what: String,
    },
    #[error("{what}; move it to a machine with OpenZFS")]
    Unsupported { machine: String, what: String },
    #[error("stream: {0}")]
    Pump(#[from] PumpError),
    #[error("protocol: {0}")]
    Frame(#[from] FrameError),
}

impl TransferError {
    /// A fresh attempt may succeed (the link, not the data, was the problem).
    pub fn is_retryable(&self) -> bool {
        match self {
            // A handshake fails when the peer restarted with a new key since it was read;
            // the next attempt reads it again.
            TransferError::Connect { .. }
            | TransferError::Tls { .. }
            | TransferError::Pump(_)
            | TransferError::Frame(FrameError::Io(_)) => true,
            TransferError::Remote { reason, .. } => matches!(reason, ReceiveFailure::StreamBroken),
            TransferError::Zfs(e) => e.is_transient(),
            TransferError::Refused { reason, .. } => {
                matches!(reason, RefusalReason::Internal | RefusalReason::Busy)
            }
            _ => false,
        }
    }
}

/// Whether a receiver's resume token may continue a send of `ds`: it must name one of `ds`'s
/// own snapshots, and an encrypted dataset only ever leaves raw (a token without `rawok`
/// would make `zfs send -t` send its plaintext).
pub fn resume_fits(ds: &crate::zfs::Dataset, token: &ResumeToken) -> Result<(), String> {
    if token.to.dataset() != &ds.name {
        return Err(format!(
            "it continues a send of {}, not of {}",
            token.to, ds.name
        ));
    }
    if !ds.snapshots.iter().any(|s| s.guid == token.to_guid) {
        return Err(format!(
            "its snapshot {} (guid {:#x}) is not a snapshot of {} on this machine",
            token.to, token.to_guid, ds.name
        ));
    }
    if ds.encrypted && !token.raw {
        return Err(format!(
            "it continues a non-raw send, and {} is encrypted: that would send its plaintext",
            ds.name
        ));
    }
    Ok(())
}

/// Sends volumes from this machine.
pub struct Sender<Z> {
    zfs: Arc<Z>,
    info: ZfsInfo,
    identity: Identity,
}

impl<Z> std::fmt::Debug for Sender<Z> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl<Z: Zfs + 'static> Sender<Z> {
    pub fn new(zfs: Arc<Z>, info: ZfsInfo, identity: Identity) -> Self {
        Self {
            zfs,
            info,
            identity,
        }
    }

    /// The key this agent presents, which its Machine publishes.
    pub fn pin(&self) -> &Pin {
        self.identity.pin()
    }

    /// Sends `job` over `tcp` (already connected to the target's endpoint).
    pub async fn send(
        &self,
        tcp: TcpStream,
        job: &SendJob,
        progress: &Progress,
    ) -> Result<SendReport, TransferError> {
        let (mut conn, target) = self
            .open(tcp, job, Action::Receive, job.no_progress)
            .await?;

        let steps = match self.choose(job, &target).await {
            Ok(Some(steps)) => steps,
            Ok(None) => {
                write_frame(
                    &mut conn,
                    &Offer::Nothing {
                        reason: format!("{} already has {}", target.dataset, job.to),
                    },
                )
                .await?;
                return Ok(SendReport::UpToDate);
            }
            Err(e) => {
                let _ = write_frame(
                    &mut conn,
                    &Offer::Nothing {
                        reason: e.to_string(),
                    },
                )
                .await;
                return Err(e);
            }
        };
        // The whole send's size, for progress and for the receiver's room.
        let mut estimate = Some(0u64);
        for (args, fallback) in &steps {
            let one = match self.zfs.estimate(args, &self.info).await {
                Ok(Some(e)) => Some(e),
                _ => *fallback,
            };
            estimate = estimate.zip(one).map(|(a, b)| a.saturating_add(b));
        }
        progress
            .estimated_bytes
            .store(estimate.unwrap_or(0), Ordering::Relaxed);
        if let (Some(needed), Some(available)) = (estimate, target.available)
            && needed > available
        {
            let e = TransferError::NoRoom {
                machine: job.target_machine.clone(),
                dataset: target.dataset.clone(),
                needed,
                available,
            };
            let _ = write_frame(
                &mut conn,
                &Offer::Nothing {
                    reason: e.to_string(),
                },
            )
            .await;
            return Err(e);
        }
        let first = steps.first().map(|(args, _)| args);
        let resumed = first.is_some_and(|a| a.resume_token.is_some());
        let base = first
            .and_then(|a| a.base.as_ref())
            .map(|b| b.point().name.clone());
        let (mut stream_bytes, mut wire_bytes) = (0, 0);
        for (i, (args, _)) in steps.iter().enumerate() {
            // Protect the base from being destroyed while the incremental needs it.
            let held = match &args.base {
                Some(base::Base::Snapshot(p)) if args.resume_token.is_none() => {
                    Some(job.dataset.snapshot(&p.name).map_err(ZfsError::from)?)
                }
                _ => None,
            };
            if let Some(s) = &held {
                self.zfs.hold(s).await?;
            }
            let more = i + 1 < steps.len();
            let result = self.stream(&mut conn, job, args, more, progress).await;
            if let Some(s) = &held {
                // Best effort: a leftover hold only keeps a snapshot alive, it never loses data.
                let _ = self.zfs.release(s).await;
            }
            let (s, w) = result?;
            stream_bytes += s;
            wire_bytes += w;
        }
        info!(migration = %job.migration, claim = %job.claim, ?base, resumed, streams = steps.len(), stream_bytes, wire_bytes, "sent");
        Ok(SendReport::Sent {
            base,
            resumed,
            stream_bytes,
            wire_bytes,
        })
    }

    /// TLS handshake and `Hello` for `action` on `job`'s volume; the receiver's view of its
    /// dataset when it accepts.
    async fn open(
        &self,
        tcp: TcpStream,
        job: &SendJob,
        action: Action,
        timeout: Duration,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, TargetState), TransferError> {
        let _ = tcp.set_nodelay(true);
        let machine = job.target_machine.clone();
        let name = tls::server_name(&machine)?;
        let pin = job.target_pin.as_ref().ok_or_else(|| {
            tls::TlsError::PeerIdentity(format!("no key of {machine} to check its agent against"))
        })?;
        let connector = TlsConnector::from(self.identity.client_config(pin)?);
        let mut conn = tokio::time::timeout(timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| TransferError::Tls {
                machine: machine.clone(),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| TransferError::Tls {
                machine: machine.clone(),
                source,
            })?;
        // Whole chunks go to the socket in one piece rather than 64 KiB at a time.
        conn.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
        let hello = Hello {
            version: PROTOCOL_VERSION,
            migration: job.migration.clone(),
            claim: job.claim.clone(),
            action,
        };
        write_frame(&mut conn, &hello).await?;
        match read_frame::<_, HelloReply>(&mut conn).await? {
            HelloReply::Accepted(state) => Ok((conn, state)),
            HelloReply::Refused { reason, message } => Err(TransferError::Refused {
                machine,
                reason,
                message,
            }),
        }
    }

    /// Asks the target to promote or demote its copy of `job`'s volume; returns the
    /// mountpoint of a promoted copy, or the name a demoted copy was kept under
    /// ([`Outcome::Kept`]).
    pub async fn request(
        &self,
        tcp: TcpStream,
        job: &SendJob,
        action: Action,
    ) -> Result<Option<String>, TransferError> {
        let (mut conn, _) = self.open(tcp, job, action, job.no_progress).await?;
        let answer = tokio::time::timeout(job.no_progress, read_frame::<_, Outcome>(&mut conn))
            .await
            .map_err(|_| PumpError::Stalled(job.no_progress))??;
        match answer {
            Outcome::Promoted { mountpoint } => Ok(Some(mountpoint)),
            Outcome::Demoted => Ok(None),
            Outcome::Kept { dataset } => Ok(Some(dataset)),
            Outcome::Failed { reason, message } => Err(TransferError::Remote {
                machine: job.target_machine.clone(),
                reason,
                message,
            }),
            Outcome::Received { .. } => Err(FrameError::Unexpected("Received".into()).into()),
        }
    }

    /// Sends `job`, reconnecting with `connect` and retrying while the failure is one a new
    /// attempt can fix (a cut link, a stalled peer, a busy dataset, a restarted peer with a
    /// new key). Each attempt resumes from the receiver's token where supported, otherwise
    /// starts again from the common base. `connect` also answers the key the target publishes
    /// now: an agent makes a new one when it restarts.
    pub async fn send_with_retry<C, F>(
        &self,
        connect: C,
        job: &SendJob,
        progress: &Progress,
        attempts: usize,
    ) -> Result<SendReport, TransferError>
    where
        C: Fn() -> F,
        F: std::future::Future<Output = std::io::Result<(TcpStream, Pin)>>,
    {
        use backon::{ExponentialBuilder, Retryable};
        let attempt = || async {
            let (tcp, pin) = connect().await.map_err(|source| TransferError::Connect {
                machine: job.target_machine.clone(),
                source,
            })?;
            let job = SendJob {
                target_pin: Some(pin),
                ..job.clone()
            };
            self.send(tcp, &job, progress).await
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(500))
                    .with_max_delay(Duration::from_secs(10))
                    .with_max_times(attempts.saturating_sub(1)),
            )
            .when(TransferError::is_retryable)
            .notify(
                |e, after| tracing::warn!(error = %e, ?after, "transfer attempt failed; retrying"),
            )
            .await
    }

    /// The streams to send this target, one per snapshot (the first may resume the
    /// receiver's interrupted one), each with the legacy size estimate when this ZFS cannot
    /// estimate itself; `None` when the target is up to date.
    async fn choose(
        &self,
        job: &SendJob,
        target: &TargetState,
    ) -> Result<Option<Vec<(SendArgs, Option<u64>)>>, TransferError> {
        let ours = self.info.capabilities;
        let theirs = target.capabilities;
        let inv = self.zfs.inventory(&job.dataset, &self.info).await?;
        let ds = inv
            .datasets
            .get(&job.dataset)
            .ok_or_else(|| ZfsError::NotFound(job.dataset.to_string()))?;
        // Encrypted data leaves this machine encrypted: raw, and received without the key. A
        // receiver that cannot take a raw stream does not get the plaintext instead.
        if ds.encrypted && !(ours.raw_send && theirs.raw_send) {
            return Err(TransferError::Unsupported {
                machine: job.target_machine.clone(),
                what: format!(
                    "{} is encrypted and needs a raw send (zfs send -w), which {} cannot receive",
                    job.dataset, job.target_machine
                ),
            });
        }
        let source = ds.source_side();
        let base_error = |source| TransferError::Base {
            dataset: job.dataset.to_string(),
            source,
        };
        let snapshot = |found: Option<&base::Point>, name: String| {
            found
                .cloned()
                .ok_or_else(|| base_error(BaseError::NoSuchSnapshot(name)))
        };
        let to = snapshot(
            source.snapshots.iter().find(|s| s.name == job.to),
            job.to.clone(),
        )?;
        let args = |step: &base::Step| -> Result<SendArgs, TransferError> {
            let mut a = SendArgs::new(
                job.dataset
                    .snapshot(&step.to.name)
                    .map_err(ZfsError::from)?,
            );
            a.base = step.base.clone();
            a.raw = ds.encrypted;
            // Only what both sides support: a legacy receiver cannot take a compressed stream.
            a.compressed = !a.raw && ours.compressed_send && theirs.compressed_send;
            Ok(a)
        };
        let fallback = |a: &SendArgs| {
            if ours.size_estimates {
                None
            } else {
                legacy_estimate(ds, a)
            }
        };
        let mut out = vec![];
        let next = if let Some(token) = target.resume_token.clone().filter(|_| ours.resume_tokens) {
            // The token comes from the receiver: decoded and checked before it picks what
            // leaves this machine.
            let contents = self.zfs.resume_token(&token).await?;
            resume_fits(ds, &contents).map_err(|what| TransferError::BadToken {
                machine: job.target_machine.clone(),
                dataset: target.dataset.clone(),
                what,
            })?;
            let done = snapshot(
                source.snapshots.iter().find(|s| s.guid == contents.to_guid),
                contents.to.to_string(),
            )?;
            let mut resume = SendArgs::new(contents.to.clone());
            resume.resume_token = Some(token);
            out.push((resume, None));
            // Then on from the snapshot the resumed stream completes.
            (done.createtxg < to.createtxg).then_some(Some(base::Base::Snapshot(done)))
        } else {
            let side = TargetSide {
                exists: target.exists,
                snapshots: target.snapshots.clone(),
                ployz_replica: target.ployz_replica,
            };
            match base::plan_send(&source, &side, &job.to).map_err(base_error)? {
                SendPlan::UpToDate { .. } => return Ok(None),
                SendPlan::Full { .. } => Some(None),
                SendPlan::Incremental { base, .. } => Some(Some(base)),
            }
        };
        if let Some(from) = next {
            for step in base::steps(&source, from, &to) {
                let a = args(&step)?;
                let f = fallback(&a);
                out.push((a, f));
            }
        }
        Ok(Some(out))
    }

    /// One stream; `more`: another follows on this connection.
    async fn stream<S>(
        &self,
        conn: &mut S,
        job: &SendJob,
        args: &SendArgs,
        more: bool,
        progress: &Progress,
    ) -> Result<(u64, u64), TransferError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let offer = Offer::Stream {
            to: args.to.short().to_string(),
            base: args.base.as_ref().map(|b| b.point().name.clone()),
            base_guid: args.base.as_ref().map(|b| b.point().guid),
            resumed: args.resume_token.is_some(),
            compression: job.compression,
            more,
        };
        write_frame(conn, &offer).await?;
        let mut child = self.zfs.send(args)?;
        let stdout = child.stdout.take().ok_or_else(|| ZfsError::Failed {
            command: "zfs send".into(),
            stderr: "no stdout".into(),
        })?;
        let start_stream = progress.stream();
        let start_wire = progress.wire();
        let counted = Counting::new(stdout, Arc::clone(&progress.stream_bytes));
        let opts = PumpOptions {
            no_progress: job.no_progress,
            rate_limit: job.rate_limit,
        };

        // Full duplex: the receiver may fail early (out of space, a modified target) and say
        // so while we are still sending; its answer must win over the broken pipe that follows.
        let (mut rd, mut wr) = tokio::io::split(conn);
        let outcome = read_frame::<_, Outcome>(&mut rd);
        tokio::pin!(outcome);
        let pump = async {
            match job.compression {
                WireCompression::None => {
                    let queued = Arc::clone(&progress.queued_bytes);
                    send_chunks(counted, &mut wr, opts, &progress.wire_bytes, queued).await
                }
                WireCompression::Zstd => {
                    let enc = ZstdEncoder::new(BufReader::with_capacity(1 << 20, counted));
                    let queued = Arc::clone(&progress.queued_bytes);
                    send_chunks(enc, &mut wr, opts, &progress.wire_bytes, queued).await
                }
            }
        };
        let (pumped, answer) = tokio::select! {
            pumped = pump => {
                // After a failed pump, the receiver's reason (if it gave one) is worth a moment.
                let wait = if pumped.is_ok() { job.no_progress } else { Duration::from_secs(2) };
                (pumped, tokio::time::timeout(wait, &mut outcome).await.ok())
            }
            early = &mut outcome => (Err(PumpError::Net(std::io::ErrorKind::ConnectionAborted.into())), Some(early)),
        };
        if pumped.is_err() {
            let _ = child.start_kill();
        }
        let sent = crate::zfs::finish(child, "zfs send").await;
        match answer {
            Some(Ok(Outcome::Failed { reason, message })) => Err(TransferError::Remote {
                machine: job.target_machine.clone(),
                reason,
                message,
            }),
            Some(Ok(Outcome::Received { .. })) if pumped.is_ok() => {
                sent?;
                Ok((
                    progress.stream() - start_stream,
                    progress.wire() - start_wire,
                ))
            }
            Some(Ok(Outcome::Received { .. })) => Err(TransferError::Pump(PumpError::Net(
                std::io::ErrorKind::InvalidData.into(),
            ))),
            Some(Err(e)) if pumped.is_ok() => Err(e.into()),
            _ => Err(pumped
                .err()
                .map_or_else(|| PumpError::Stalled(job.no_progress).into(), Into::into)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::zfs::{Dataset, Snapshot};

    fn dataset(encrypted: bool) -> Dataset {
        let mut d = Dataset::fixture("tank/ployz/pv-1");
        d.snapshots = vec![Snapshot {
            name: d.name.snapshot("ployz-2").unwrap_or_else(|e| panic!("{e}")),
            guid: 22,
            createtxg: 9,
            used: 0,
            referenced: 0,
            userrefs: 0,
            user_props: BTreeMap::new(),
        }];
        d.encrypted = encrypted;
        d
    }

    fn token(to: &str, to_guid: u64, raw: bool) -> ResumeToken {
        ResumeToken {
            to: to.parse().unwrap_or_else(|e| panic!("{e}")),
            to_guid,
            from_guid: None,
            raw,
        }
    }

    #[test]
    fn a_resume_token_continues_only_this_dataset_and_never_unwraps_encryption() {
        let plain = dataset(false);
        let secret = dataset(true);
        assert!(resume_fits(&plain, &token("tank/ployz/pv-1@ployz-2", 22, false)).is_ok());
        assert!(resume_fits(&secret, &token("tank/ployz/pv-1@ployz-2", 22, true)).is_ok());
        let other = resume_fits(&plain, &token("tank/ployz/pv-9@ployz-2", 22, false));
        assert!(other.is_err_and(|e| e.contains("not of tank/ployz/pv-1")));
        let stranger = resume_fits(&plain, &token("tank/ployz/pv-1@ployz-2", 23, false));
        assert!(stranger.is_err_and(|e| e.contains("not a snapshot of")));
        let unwrapped = resume_fits(&secret, &token("tank/ployz/pv-1@ployz-2", 22, false));
        assert!(unwrapped.is_err_and(|e| e.contains("plaintext")));
    }
}

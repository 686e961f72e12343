//! Moving stream bytes between `zfs` and the network, the job mbuffer does for syncoid:
//! a separate task fills 1 MiB chunks into a bounded queue so a short stall on one side does
//! not stall the other; byte counters feed progress; a pacing limiter caps the rate; and a
//! network that makes no progress for too long aborts the transfer instead of hanging.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

use super::protocol::MAX_CHUNK;

/// Chunks in flight between the two sides (up to 16 MiB buffered).
const QUEUE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("no progress for {0:?}: the link or the peer stalled")]
    Stalled(Duration),
    #[error("network: {0}")]
    Net(std::io::Error),
    #[error("local stream: {0}")]
    Local(std::io::Error),
    #[error("the peer sent a chunk of {0} bytes, above the limit")]
    Protocol(usize),
}

/// Transfer limits.
#[derive(Debug, Clone, Copy)]
pub struct PumpOptions {
    /// Abort when the network makes no progress for this long.
    pub no_progress: Duration,
    /// Bytes per second on the wire; unlimited when `None`.
    pub rate_limit: Option<u64>,
}

/// Counts bytes read through it.
#[derive(Debug)]
pub struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R> Counting<R> {
    pub fn new(inner: R, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        res
    }
}

/// Reads `src` to its end in chunks, into a queue drained by the caller. Buffers come back
/// through `recycle` once written, so a long stream allocates only a queue's worth of them.
fn spawn_reader<R: AsyncRead + Unpin + Send + 'static>(
    mut src: R,
    queued: Arc<AtomicU64>,
) -> (
    mpsc::Receiver<std::io::Result<Vec<u8>>>,
    mpsc::Sender<Vec<u8>>,
) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (recycle, mut returned) = mpsc::channel::<Vec<u8>>(QUEUE + 2);
    tokio::spawn(async move {
        loop {
            let mut chunk = returned.try_recv().unwrap_or_else(|_| vec![0; MAX_CHUNK]);
            chunk.resize(MAX_CHUNK, 0);
            // Fill whole chunks (up to the end of the stream): fewer, larger writes.
            let mut filled = 0;
            let res = loop {
                match src.read(&mut chunk[filled..]).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled == MAX_CHUNK {
                            break Ok(());
                        }
                    }
                    Err(e) => break Err(e),
                }
            };
            chunk.truncate(filled);
            let last = filled < MAX_CHUNK;
            let msg = match res {
                Ok(()) if filled == 0 => return,
                Ok(()) => Ok(chunk),
                Err(e) => Err(e),
            };
            let failed = msg.is_err();
            let counted = if failed { 0 } else { filled as u64 };
            queued.fetch_add(counted, Ordering::Relaxed);
            if tx.send(msg).await.is_err() {
                // The sender is gone: this chunk never reaches the queue.
                queued.fetch_sub(counted, Ordering::Relaxed);
                return;
            }
            if failed || last {
                return;
            }
        }
    });
    (rx, recycle)
}

struct Pacer {
    start: Instant,
    rate: Option<u64>,
}

impl Pacer {
    async fn after(&self, total: u64) {
        if let Some(rate) = self.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(total as f64 / rate as f64);
            let elapsed = self.start.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
}

async fn net<T>(
    limit: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, PumpError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| PumpError::Stalled(limit))?
        .map_err(PumpError::Net)
}

/// Sends `src` as chunks on `net_w`, then the end marker. Returns the bytes put on the wire.
/// `wire` counts them as they go; `queued` holds the bytes read from `src` but not sent yet
/// (up to the queue's 16 MiB), which progress subtracts from what was read: without it a
/// paced transfer reads as nearly done long before it is.
pub async fn send_chunks<R, W>(
    src: R,
    net_w: &mut W,
    opts: PumpOptions,
    wire: &AtomicU64,
    queued: Arc<AtomicU64>,
) -> Result<u64, PumpError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let (mut rx, recycle) = spawn_reader(src, Arc::clone(&queued));
    let pacer = Pacer {
        start: Instant::now(),
        rate: opts.rate_limit,
    };
    let mut total = 0u64;
    let result = async {
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.map_err(PumpError::Local)?;
            queued.fetch_sub(chunk.len() as u64, Ordering::Relaxed);
            let len = chunk.len() as u32;
            net(opts.no_progress, net_w.write_all(&len.to_be_bytes())).await?;
            net(opts.no_progress, net_w.write_all(&chunk)).await?;
            total += chunk.len() as u64 + 4;
            wire.fetch_add(chunk.len() as u64 + 4, Ordering::Relaxed);
            let _ = recycle.try_send(chunk);
            pacer.after(total).await;
        }
        net(opts.no_progress, net_w.write_all(&0u32.to_be_bytes())).await?;
        net(opts.no_progress, net_w.flush()).await?;
        Ok(total + 4)
    }
    .await;
    // A failed attempt leaves chunks queued: they were never sent, so the next attempt
    // (a resume reuses the counters) must not count them as queued.
    rx.close();
    while let Ok(chunk) = rx.try_recv() {
        if let Ok(c) = chunk {
            queued.fetch_sub(c.len() as u64, Ordering::Relaxed);
        }
    }
    result
}

/// Receives chunks from `net_r` into `dst` until the end marker. A connection that ends
/// before it is a broken stream. Returns the bytes taken off the wire.
pub async fn recv_chunks<R, W>(
    net_r: &mut R,
    dst: W,
    opts: PumpOptions,
    wire: &AtomicU64,
) -> Result<u64, PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (recycle, mut returned) = mpsc::channel::<Vec<u8>>(QUEUE + 2);
    let writer = tokio::spawn(async move {
        let mut dst = dst;
        while let Some(chunk) = rx.recv().await {
            dst.write_all(&chunk).await?;
            let _ = recycle.try_send(chunk);
        }
        dst.shutdown().await
    });
    let mut total = 0u64;
    let res = async {
        loop {
            let len = net(opts.no_progress, net_r.read_u32()).await? as usize;
            total += 4;
            if len == 0 {
                return Ok(());
            }
            if len > MAX_CHUNK {
                return Err(PumpError::Protocol(len));
            }
            let mut chunk = returned.try_recv().unwrap_or_default();
            chunk.resize(len, 0);
            net(opts.no_progress, net_r.read_exact(&mut chunk)).await?;
            total += len as u64;
            wire.fetch_add(len as u64 + 4, Ordering::Relaxed);
            if tx.send(chunk).await.is_err() {
                // The local side stopped taking data; its error is reported below.
                return Ok(());
            }
        }
    }
    .await;
    drop(tx);
    match res {
        // Complete: wait until every byte reached the local side.
        Ok(()) => match writer.await {
            Ok(Ok(())) => Ok(total),
            Ok(Err(e)) => Err(PumpError::Local(e)),
            Err(e) => Err(PumpError::Local(std::io::Error::other(e))),
        },
        // Incomplete: stop feeding the local side, so it sees a truncated stream and fails.
        Err(e) => {
            writer.abort();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> PumpOptions {
        PumpOptions {
            no_progress: Duration::from_secs(5),
            rate_limit: None,
        }
    }

    #[tokio::test]
    async fn chunks_round_trip_with_counts() {
        let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 251) as u8).collect();
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let wire_out = AtomicU64::new(0);
        let src = std::io::Cursor::new(data.clone());
        let sender = async { send_chunks(src, &mut a, opts(), &wire_out, Arc::default()).await };
        let (out_w, mut out_r) = tokio::io::duplex(8 << 20);
        let wire_in = AtomicU64::new(0);
        let receiver = async { recv_chunks(&mut b, out_w, opts(), &wire_in).await };
        let (sent, received) = tokio::join!(sender, receiver);
        let sent = sent.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sent, received.unwrap_or_else(|e| panic!("{e}")));
        let mut got = vec![];
        out_r
            .read_to_end(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, data);
        assert_eq!(wire_in.load(Ordering::Relaxed) + 4, sent);
    }

    #[tokio::test]
    async fn a_failed_attempt_leaves_nothing_counted_as_queued() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        drop(b);
        let queued = Arc::new(AtomicU64::new(0));
        let src = std::io::Cursor::new(vec![1u8; 8 << 20]);
        let err = send_chunks(src, &mut a, opts(), &AtomicU64::new(0), Arc::clone(&queued)).await;
        assert!(matches!(err, Err(PumpError::Net(_))), "{err:?}");
        // The reader may still be filling a chunk; once it stops, nothing stays counted.
        tokio::time::timeout(Duration::from_secs(5), async {
            while queued.load(Ordering::Relaxed) != 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} bytes still counted as queued",
                queued.load(Ordering::Relaxed)
            )
        });
    }

    #[tokio::test]
    async fn a_cut_stream_is_an_error_not_an_end() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&10u32.to_be_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        a.write_all(b"12345")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        drop(a);
        let (out_w, _out_r) = tokio::io::duplex(1 << 16);
        let err = recv_chunks(&mut b, out_w, opts(), &AtomicU64::new(0)).await;
        assert!(matches!(err, Err(PumpError::Net(_))), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_a_stall() {
        let (_a, mut b) = tokio::io::duplex(1 << 16);
        let (out_w, _out_r) = tokio::io::duplex(1 << 16);
        let o = PumpOptions {
            no_progress: Duration::from_secs(3),
            rate_limit: None,
        };
        let err = recv_chunks(&mut b, out_w, o, &AtomicU64::new(0)).await;
        assert!(matches!(err, Err(PumpError::Stalled(_))), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_paces_the_sender() {
        let data = vec![7u8; 4 << 20];
        let (mut a, mut b) = tokio::io::duplex(16 << 20);
        let o = PumpOptions {
            no_progress: Duration::from_secs(60),
            rate_limit: Some(1 << 20),
        };
        let start = tokio::time::Instant::now();
        let drain = tokio::spawn(async move {
            let mut sink = vec![];
            let _ = b.read_to_end(&mut sink).await;
        });
        let (read, wire, queued) = (Arc::default(), Arc::new(AtomicU64::new(0)), Arc::default());
        let src = Counting::new(std::io::Cursor::new(data), Arc::clone(&read));
        // Halfway, by the clock the limiter paces against.
        let sample = {
            let (read, wire, queued) = (Arc::clone(&read), Arc::clone(&wire), Arc::clone(&queued));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2000)).await;
                let load = |x: &AtomicU64| x.load(Ordering::Relaxed);
                (load(&read), load(&wire), load(&queued))
            })
        };
        send_chunks(src, &mut a, o, &wire, queued)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        drop(a);
        let _ = drain.await;
        let (read, wire, queued): (u64, u64, u64) = sample.await.unwrap_or_else(|e| panic!("{e}"));
        // Everything was read at once into the queue; what is not queued is what was sent.
        assert_eq!(read, 4 << 20);
        let sent = read - queued;
        let mib = 1u64 << 20;
        assert!(
            (mib..=3 * mib).contains(&sent) && sent.abs_diff(wire) <= 4 * 4,
            "read {read}, queued {queued}, wire {wire}"
        );
        // 4 MiB at 1 MiB/s: the last chunk is due at about 4 s (virtual time).
        assert!(
            start.elapsed() >= Duration::from_millis(3900),
            "{:?}",
            start.elapsed()
        );
    }
}

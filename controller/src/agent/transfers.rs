//! Transfers in flight, one per Migration, run as tasks so a reconcile never blocks on a long
//! send: it starts the task, then looks at its counters and result on later reconciles. A
//! semaphore caps how many volumes this machine sends at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::metrics::Metrics;
use crate::transfer::Progress;
use crate::transfer::client::{SendReport, TransferError};

/// What a finished pass did, per volume (stream bytes).
pub type PassResult = Result<Vec<u64>, TransferError>;

/// One pass: every volume of a Migration brought to `snapshot`.
pub struct Pass {
    /// Snapshot the pass sends; a different snapshot is a different pass.
    pub snapshot: String,
    /// Per volume, in plan order.
    pub progress: Vec<Arc<Progress>>,
    /// Volumes waiting for a transfer slot.
    pub waiting: Arc<std::sync::atomic::AtomicUsize>,
    /// The task; it leaves its result in `outcome`, then calls its `done`.
    handle: JoinHandle<()>,
    /// The result, once the task has one; kept until the pass is forgotten.
    outcome: Arc<Mutex<Option<PassResult>>>,
}

/// Where a pass stands; `F` is the caller's view of a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassStatus<F> {
    Idle,
    Running,
    /// Finished; total stream bytes.
    Done(u64),
    Failed(F),
}

pub struct Transfers {
    slots: Arc<Semaphore>,
    passes: Mutex<HashMap<String, Pass>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Transfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfers").finish_non_exhaustive()
    }
}

/// A snapshot of a pass's counters.
#[derive(Debug, Clone, Default)]
pub struct PassView {
    pub sent: Vec<u64>,
    pub estimated: Vec<Option<u64>>,
    pub waiting: usize,
}

/// One volume's send, as the pass runs it.
pub type SendFn = Arc<
    dyn Fn(
            usize,
            Arc<Progress>,
        ) -> futures::future::BoxFuture<'static, Result<SendReport, TransferError>>
        + Send
        + Sync,
>;

/// Counts a transfer as active while it lives (an aborted task drops it too).
struct Active<'a>(&'a Metrics);

impl<'a> Active<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.active_transfers.inc();
        Self(m)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active_transfers.dec();
    }
}

impl Transfers {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max.max(1))),
            passes: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pass>> {
        self.passes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counters of the running pass of `key` for `snapshot`, or `None` when there is none.
    pub fn view(&self, key: &str, snapshot: &str) -> Option<PassView> {
        let passes = self.lock();
        let p = passes.get(key).filter(|p| p.snapshot == snapshot)?;
        Some(PassView {
            sent: p.progress.iter().map(|x| x.sent()).collect(),
            estimated: p.progress.iter().map(|x| x.estimate()).collect(),
            waiting: p.waiting.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Where `key`'s pass for `snapshot` stands. A finished pass keeps its result until
    /// [`Transfers::forget`] (status recorded it), so a failed status write loses nothing.
    /// A pass for another snapshot is stale (the Migration moved on) and is stopped.
    pub fn peek<F>(
        &self,
        key: &str,
        snapshot: &str,
        failed: impl FnOnce(&TransferError) -> F,
    ) -> PassStatus<F> {
        let mut passes = self.lock();
        let Some(p) = passes.get_mut(key) else {
            return PassStatus::Idle;
        };
        if p.snapshot != snapshot {
            if let Some(old) = passes.remove(key) {
                old.handle.abort();
            }
            return PassStatus::Idle;
        }
        let mut outcome = p.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if outcome.is_none() && p.handle.is_finished() {
            // Finished without a result: the task panicked.
            let joined = futures::FutureExt::now_or_never(&mut p.handle);
            *outcome = joined.map(|j| {
                Err(TransferError::Pump(crate::transfer::pump::PumpError::Net(
                    std::io::Error::other(match j {
                        Ok(()) => "transfer task ended without a result".to_string(),
                        Err(e) => format!("transfer task ended: {e}"),
                    }),
                )))
            });
        }
        match &*outcome {
            None => PassStatus::Running,
            Some(Ok(bytes)) => PassStatus::Done(bytes.iter().sum()),
            Some(Err(e)) => PassStatus::Failed(failed(e)),
        }
    }

    /// Starts a pass sending `volumes` volumes with `send`, one slot per volume; `done` runs
    /// once its result can be peeked (it wakes the Migration, so nothing polls for the end).
    pub fn start(
        &self,
        key: &str,
        snapshot: &str,
        volumes: usize,
        send: SendFn,
        done: impl FnOnce() + Send + 'static,
    ) {
        let progress: Vec<Arc<Progress>> = (0..volumes)
            .map(|_| Arc::new(Progress::default()))
            .collect();
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(volumes));
        let slots = Arc::clone(&self.slots);
        let metrics = Arc::clone(&self.metrics);
        let (task_progress, task_waiting) = (progress.clone(), Arc::clone(&waiting));
        let outcome = Arc::new(Mutex::new(None));
        let task_outcome = Arc::clone(&outcome);
        let run = async move {
            let mut bytes = vec![];
            for (i, p) in task_progress.into_iter().enumerate() {
                let _slot = slots.acquire().await.map_err(|e| {
                    TransferError::Pump(crate::transfer::pump::PumpError::Net(
                        std::io::Error::other(e),
                    ))
                })?;
                task_waiting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                let _active = Active::new(&metrics);
                let report = send(i, Arc::clone(&p)).await;
                let sent = match report? {
                    SendReport::UpToDate => 0,
                    SendReport::Sent { stream_bytes, .. } => stream_bytes,
                };
                metrics.bytes_sent.inc_by(sent);
                bytes.push(sent);
            }
            Ok(bytes)
        };
        let handle = tokio::spawn(async move {
            let result: PassResult = run.await;
            *task_outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            done();
        });
        let old = self.lock().insert(
            key.to_string(),
            Pass {
                snapshot: snapshot.to_string(),
                progress,
                waiting,
                handle,
                outcome,
            },
        );
        if let Some(old) = old {
            old.handle.abort();
        }
    }

    /// Drops `key`'s finished pass for `snapshot` once status has recorded its result.
    pub fn forget(&self, key: &str, snapshot: &str) {
        let mut passes = self.lock();
        if passes.get(key).is_some_and(|p| {
            p.snapshot == snapshot
                && p.outcome
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some()
        }) {
            passes.remove(key);
        }
    }

    /// Stops `key`'s pass, if any (cancel, rollback).
    pub fn abort(&self, key: &str) {
        if let Some(p) = self.lock().remove(key) {
            p.handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A send that records how many run at once and waits for `gate`.
    fn send(
        now: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
        gate: Arc<tokio::sync::Notify>,
    ) -> SendFn {
        Arc::new(move |_, _| {
            let (now, peak, gate) = (Arc::clone(&now), Arc::clone(&peak), Arc::clone(&gate));
            Box::pin(async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                gate.notified().await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(SendReport::Sent {
                    base: None,
                    resumed: false,
                    stream_bytes: 10,
                    wire_bytes: 10,
                })
            })
        })
    }

    #[tokio::test]
    async fn passes_share_the_machine_s_transfer_slots() {
        let t = Transfers::new(1, Arc::new(Metrics::default()));
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let gate = Arc::new(tokio::sync::Notify::new());
        t.start(
            "m1",
            "s1",
            2,
            send(Arc::clone(&now), Arc::clone(&peak), Arc::clone(&gate)),
            || {},
        );
        t.start(
            "m2",
            "s1",
            1,
            send(Arc::clone(&now), Arc::clone(&peak), Arc::clone(&gate)),
            || {},
        );
        let mut results = vec![];
        while results.len() < 2 {
            tokio::task::yield_now().await;
            gate.notify_waiters();
            for key in ["m1", "m2"] {
                if results.iter().any(|(k, _)| *k == key) {
                    continue;
                }
                match t.peek(key, "s1", ToString::to_string) {
                    PassStatus::Running => {}
                    PassStatus::Idle => panic!("pass {key} lost"),
                    done => {
                        // Kept until forgotten: looking again gives the same result.
                        assert_eq!(t.peek(key, "s1", ToString::to_string), done);
                        t.forget(key, "s1");
                        results.push((key, done));
                    }
                }
            }
        }
        assert_eq!(
            peak.load(Ordering::SeqCst),
            1,
            "one slot, one transfer at a time"
        );
        assert!(
            results.contains(&("m1", PassStatus::Done(20)))
                && results.contains(&("m2", PassStatus::Done(10)))
        );
        assert_eq!(t.peek("m1", "s1", ToString::to_string), PassStatus::Idle);
        // A pass for another snapshot replaces (and stops) a stale one.
        t.start("m3", "old", 1, send(now, peak, gate), || {});
        assert_eq!(t.peek("m3", "new", ToString::to_string), PassStatus::Idle);
        assert!(t.view("m3", "old").is_none());
    }

    /// The wake-up replaces polling for the end of a pass, so when it arrives the result
    /// must already be there to peek (the task may not count as finished yet).
    #[tokio::test]
    async fn a_pass_s_result_is_there_when_its_wake_up_arrives() {
        let t = Transfers::new(1, Arc::new(Metrics::default()));
        let gate = Arc::new(tokio::sync::Notify::new());
        let (woke, wake) = tokio::sync::oneshot::channel();
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        t.start("m", "s", 1, send(now, peak, Arc::clone(&gate)), move || {
            let _ = woke.send(());
        });
        assert_eq!(t.peek("m", "s", ToString::to_string), PassStatus::Running);
        gate.notify_one();
        assert!(wake.await.is_ok(), "the pass wakes its Migration");
        assert_eq!(t.peek("m", "s", ToString::to_string), PassStatus::Done(10));
    }
}

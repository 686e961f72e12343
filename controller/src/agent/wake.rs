//! Reconciles triggered by what a driven Migration waits for, instead of polls: its own
//! transfer pass finishing (an in-memory task no watch sees), and, while a step waits for
//! pods or claims, changes to exactly those: a watch of the workload's pods (by its selector,
//! on whichever node) or of the claims in its namespace, opened for that step and closed
//! after it. An agent therefore receives only objects of the migrations it drives, and only
//! while they wait. A watch that has just listed wakes its step once, for what changed between
//! the step's read and the watch's start; the step's own fallback look is the last resort.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::lock;
use super::metrics::WatchLabel;
use crate::api::Migration;

/// What a step waits for, to be woken by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Wait {
    /// The workload's pods (its label selector) in the Migration's namespace.
    Pods { selector: String },
    /// The claims of the Migration's namespace.
    Claims,
}

/// The wake-up channels of this agent's Migration controllers, and the watches open for the
/// Migrations it drives.
#[derive(Default)]
pub struct Wakeups {
    /// One per controller (source and target role): a Migration is driven by one of them,
    /// and the other ignores the wake-up of a Migration it does not hold.
    subscribers: Mutex<Vec<mpsc::UnboundedSender<ObjectRef<Migration>>>>,
    /// Per Migration (UID): the open watch and what it watches.
    watches: Mutex<HashMap<String, (Wait, AbortHandle)>>,
    /// How many are open (`ployz_step_watches`).
    open: Gauge,
    /// Objects the step watches received (`ployz_watch_objects_total`).
    received: Family<WatchLabel, Counter>,
}

impl std::fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakeups").finish_non_exhaustive()
    }
}

impl Wakeups {
    pub fn new(open: Gauge, received: Family<WatchLabel, Counter>) -> Self {
        Self {
            open,
            received,
            ..Self::default()
        }
    }

    /// A stream of Migrations to reconcile, for `Controller::reconcile_on`.
    pub fn subscribe(&self) -> impl Stream<Item = ObjectRef<Migration>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.subscribers).push(tx);
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
    }

    /// A handle that wakes `m` when called: cheap to clone into a task.
    pub fn waker(&self, m: &Migration) -> Waker {
        Waker {
            to: lock(&self.subscribers).clone(),
            m: ObjectRef::from_obj(m),
        }
    }

    /// Keeps exactly the watch `wait` open for `m` (none when `None`): a different wait
    /// replaces the open one, the same one is left running.
    pub fn follow(&self, client: &Client, m: &Migration, wait: Option<Wait>) {
        let Some(uid) = m.meta().uid.clone() else {
            return;
        };
        let mut watches = lock(&self.watches);
        if watches.get(&uid).map(|(w, _)| w) == wait.as_ref() {
            return;
        }
        if let Some((_, task)) = watches.remove(&uid) {
            task.abort();
        }
        let Some(wait) = wait else {
            self.open.set(watches.len() as i64);
            return;
        };
        let ns = m.meta().namespace.clone().unwrap_or_default();
        let waker = self.waker(m);
        let counter = |watch: &str| {
            self.received
                .get_or_create(&WatchLabel {
                    watch: watch.into(),
                })
                .clone()
        };
        let task = match &wait {
            Wait::Pods { selector } => tokio::spawn(wake_on_changes(
                Api::<Pod>::namespaced(client.clone(), &ns),
                watcher::Config::default().labels(selector),
                waker,
                counter("step_pods"),
            )),
            Wait::Claims => tokio::spawn(wake_on_changes(
                Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns),
                watcher::Config::default(),
                waker,
                counter("step_claims"),
            )),
        };
        watches.insert(uid, (wait, task.abort_handle()));
        self.open.set(watches.len() as i64);
    }

    /// Closes `uid`'s watch, if any (the Migration is gone).
    pub fn forget(&self, uid: &str) {
        let mut watches = lock(&self.watches);
        if let Some((_, task)) = watches.remove(uid) {
            task.abort();
        }
        self.open.set(watches.len() as i64);
    }
}

/// Wakes one Migration's controllers.
#[derive(Debug, Clone)]
pub struct Waker {
    to: Vec<mpsc::UnboundedSender<ObjectRef<Migration>>>,
    m: ObjectRef<Migration>,
}

impl Waker {
    pub fn wake(&self) {
        for tx in &self.to {
            // A closed channel is a controller shutting down: nothing left to wake.
            let _ = tx.send(self.m.clone());
        }
    }
}

/// Wakes on every change, and once the initial list is complete: a change between the
/// step's own read and the watch's start is seen there, not at the step's fallback look
/// seconds later. The same holds for a re-list after the watch reconnects. A watch error is
/// retried by the watcher's own backoff.
async fn wake_on_changes<K>(api: Api<K>, config: watcher::Config, waker: Waker, received: Counter)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let events = watcher(api, config).default_backoff();
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        if let Ok(event) = &event {
            received.inc_by(objects(event).count() as u64);
        }
        if matches!(
            event,
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone)
        ) {
            waker.wake();
        }
    }
}

/// The objects a watch event carries (none for the markers around a re-list).
pub fn objects<K>(event: &watcher::Event<K>) -> impl Iterator<Item = &K> {
    match event {
        watcher::Event::Apply(k) | watcher::Event::Delete(k) | watcher::Event::InitApply(k) => {
            Some(k)
        }
        watcher::Event::Init | watcher::Event::InitDone => None,
    }
    .into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(uid: &str) -> Migration {
        let mut m = Migration::new(
            "web-to-b",
            crate::api::MigrationSpec {
                service: "web".into(),
                to: "machine-b".into(),
                from: None,
                transfer: None,
                timeouts: None,
                source_copy: None,
            },
        );
        m.metadata.namespace = Some("ns".into());
        m.metadata.uid = Some(uid.into());
        m
    }

    #[tokio::test]
    async fn a_wake_reaches_every_controller() {
        let w = Wakeups::default();
        let (mut a, mut b) = (Box::pin(w.subscribe()), Box::pin(w.subscribe()));
        w.waker(&migration("u1")).wake();
        let want = ObjectRef::<Migration>::new("web-to-b").within("ns");
        assert_eq!(a.next().await, Some(want.clone()));
        assert_eq!(b.next().await, Some(want));
    }
}

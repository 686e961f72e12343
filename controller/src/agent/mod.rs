//! The per-node agent: publishes its Machine, serves the transfer endpoint, and reconciles the
//! Migrations that concern its machine. The target's agent admits a Migration (plans it, locks
//! the workload); the source's agent drives it through snapshot, send, cutover and rollback.

mod fresh;
mod http;
mod machine;
pub mod metrics;
pub use machine::human_bytes;
mod retention;
mod source;
mod status;
mod target;
mod transfers;
mod wake;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Client, ResourceExt};
use tracing::{Instrument as _, info, warn};

use crate::api::{Migration, ZfsInfo};
use crate::transfer::authz::KubeAuthorizer;
use crate::transfer::client::Sender;
use crate::transfer::gate::Limits;
use crate::transfer::server::{Server, ServerConfig};
use crate::transfer::tls::Identity;
use crate::zfs::{DatasetName, Zfs, ZfsCli};

/// Label naming the source machine of a planned Migration; the source agent watches it.
pub const SOURCE_LABEL: &str = "ployz.dev/source";
/// Finalizer that lets the source agent roll back a Migration deleted in flight.
pub const FINALIZER: &str = "ployz.dev/rollback";
/// Annotation on the workload naming the Migration that moves it (the per-workload lock).
pub const LOCK_ANNOTATION: &str = "ployz.dev/migration";
/// Annotation on a Migration with the operator's decision, `abandon` or `complete`
/// (`ployzctl migrate abandon|complete`).
pub const RESOLVE_ANNOTATION: &str = "ployz.dev/resolve";
/// Field manager of everything the agent writes.
pub const MANAGER: &str = "ployz-agent";

/// Agent settings; every flag can also come from the environment.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// The Kubernetes node this agent runs on.
    #[arg(long, env = "PLOYZ_NODE_NAME")]
    pub node_name: String,
    /// Name of this machine's Machine resource (default: the node name).
    #[arg(long, env = "PLOYZ_MACHINE_NAME")]
    pub machine_name: Option<String>,
    /// ZFS pool of the volumes.
    #[arg(long, env = "PLOYZ_POOL")]
    pub pool: String,
    /// Dataset under which received volumes live (default: POOL/ployz).
    #[arg(long, env = "PLOYZ_PARENT_DATASET")]
    pub parent_dataset: Option<String>,
    /// Address of the transfer endpoint.
    #[arg(long, env = "PLOYZ_LISTEN", default_value = "0.0.0.0:7420")]
    pub listen: SocketAddr,
    /// `host:port` other agents connect to (default: the listen address).
    #[arg(long, env = "PLOYZ_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "PLOYZ_HTTP_LISTEN", default_value = "0.0.0.0:7421")]
    pub http_listen: SocketAddr,
    /// This agent's certificate (PEM), whose DNS name is the machine name, for keys managed
    /// outside the agent (cert-manager). By default the agent makes a new key at each start,
    /// in memory; either way peers trust the key the Machine publishes, not an issuer.
    #[arg(long, env = "PLOYZ_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of `--tls-cert` (PEM).
    #[arg(long, env = "PLOYZ_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The `zfs` command.
    #[arg(long, env = "PLOYZ_ZFS", default_value = "zfs")]
    pub zfs: PathBuf,
    /// Volume transfers this machine sends at the same time; more wait their turn.
    #[arg(long, env = "PLOYZ_MAX_TRANSFERS", default_value_t = 2)]
    pub max_transfers: usize,
    /// Pre-copy repeats while a pass sends more than this many bytes (and the delta shrinks).
    #[arg(long, env = "PLOYZ_PRECOPY_THRESHOLD", default_value_t = 64 << 20)]
    pub precopy_threshold: u64,
    /// Most pre-copy passes before the cutover.
    #[arg(long, env = "PLOYZ_PRECOPY_PASSES", default_value_t = 5)]
    pub precopy_passes: u32,
    /// Seconds between Machine heartbeats.
    #[arg(long, env = "PLOYZ_HEARTBEAT_SECONDS", default_value_t = 10)]
    pub heartbeat_seconds: u64,
    /// Seconds without a heartbeat from a Migration's source agent before this machine, its
    /// target, takes the Migration over.
    #[arg(long, env = "PLOYZ_TAKEOVER_SECONDS", default_value_t = 60)]
    pub takeover_seconds: u64,
    /// Seconds a sender may stay silent (no control frame, no stream chunk) before this
    /// machine drops its connection and frees the dataset it was receiving into.
    #[arg(long, env = "PLOYZ_RECEIVE_STALL_SECONDS", default_value_t = 120)]
    pub receive_stall_seconds: u64,
    /// Namespace of OpenEBS zfs-localpv's ZFSVolumes.
    #[arg(long, env = "PLOYZ_OPENEBS_NAMESPACE", default_value = "openebs")]
    pub openebs_namespace: String,
}

impl Config {
    pub fn machine(&self) -> &str {
        self.machine_name.as_deref().unwrap_or(&self.node_name)
    }

    pub fn parent(&self) -> Result<DatasetName> {
        let parent = match &self.parent_dataset {
            Some(p) => p.clone(),
            None => format!("{}/ployz", self.pool),
        };
        parent
            .parse()
            .with_context(|| format!("--parent-dataset {parent:?}"))
    }
}

/// What every reconcile shares.
pub struct Ctx {
    pub client: Client,
    pub config: Config,
    pub machine: String,
    pub parent: DatasetName,
    pub zfs: Arc<ZfsCli>,
    pub info: ZfsInfo,
    pub sender: Arc<Sender<ZfsCli>>,
    /// This machine's receiver, for role changes of its own copies when it drives.
    pub server: Arc<Server<ZfsCli, KubeAuthorizer>>,
    pub recorder: Recorder,
    pub metrics: Arc<metrics::Metrics>,
    pub transfers: transfers::Transfers,
    pub backoff: Backoff,
    /// Per Migration (UID): when its progress was last written.
    pub progress_written: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Migrations (UID) whose datasets on this machine were pruned in this run.
    pub pruned: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Per Migration (UID): since when its target has refused connections.
    pub unreachable: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Wake-ups of the Migrations this agent drives, and the watches open for them.
    pub wakeups: wake::Wakeups,
    /// The Migration versions this agent last read live or wrote (agent/fresh.rs).
    pub fresh: fresh::Fresh,
    /// The newest heartbeat read of each peer.
    pub heartbeats: fresh::Heartbeats,
    /// Machines read live recently, for a waiting step's facts.
    pub machines: fresh::Recent<crate::api::Machine>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

/// Errors of a reconcile: retried with backoff by the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Zfs(#[from] crate::zfs::ZfsError),
    #[error("{0} no longer exists")]
    WorkloadGone(String),
    /// The peer agent refused or failed a role change.
    #[error("{1}")]
    Peer(crate::api::Reason, String),
    #[error("{0}")]
    InvalidSpec(String),
    /// Status names something the live objects do not (`Reason::PlanMismatch`).
    #[error("{0}")]
    PlanMismatch(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// First retry delay: a write conflict is retried at once, the rest backs off.
    fn first_delay(&self) -> Duration {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => Duration::from_millis(100),
            Error::Zfs(e) if e.is_transient() => Duration::from_millis(500),
            _ => Duration::from_secs(1),
        }
    }
}

/// Retries per Migration back off exponentially (to a minute) and reset on success.
#[derive(Debug, Default)]
pub struct Backoff(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl Backoff {
    fn next(&self, key: &str, first: Duration) -> Duration {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        first
            .saturating_mul(1 << (*n - 1).min(10))
            .min(Duration::from_secs(60))
    }

    fn reset(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// A failed reconcile is retried with backoff, counted, and reported on the Migration as a
/// Warning Event (the recorder aggregates repeats), so an RBAC or API error reaches the user.
fn error_policy(m: Arc<Migration>, e: &Error, ctx: Arc<Ctx>) -> Action {
    let delay = ctx
        .backoff
        .next(&m.uid().unwrap_or_default(), e.first_delay());
    warn!(migration = %m.name_any(), error = %e, ?delay, "reconcile failed; retrying");
    ctx.metrics.reconcile_errors.inc();
    // A conflict only means a newer version exists: decided again at once, from a live read,
    // not an error.
    let conflict = matches!(e, Error::Kube(kube::Error::Api(a)) if a.code == 409);
    if conflict {
        ctx.fresh.forget(&m.uid().unwrap_or_default());
    }
    if !conflict {
        let note = format!("{e}; retrying in {}s", delay.as_secs().max(1));
        tokio::spawn(async move {
            status::event(
                &ctx,
                &m,
                kube::runtime::events::EventType::Warning,
                "ReconcileError",
                &note,
            )
            .await;
        });
    }
    Action::requeue(delay)
}

/// Wraps a reconciler so that success resets the Migration's backoff.
async fn reset_on_success(
    ctx: &Ctx,
    m: &Migration,
    result: Result<Action, Error>,
) -> Result<Action, Error> {
    if result.is_ok() {
        ctx.backoff.reset(&m.uid().unwrap_or_default());
    }
    result
}

/// One role of the agent: a controller over the Migrations `watch` selects, whose successful
/// reconciles reset that Migration's backoff.
fn role<F, Fut>(
    role: &'static str,
    api: Api<Migration>,
    watch: watcher::Config,
    reconcile: F,
    only_waits: fn(&Migration) -> bool,
    ctx: Arc<Ctx>,
) -> impl std::future::Future<Output = ()>
where
    F: Fn(Arc<Migration>, Arc<Ctx>, fresh::Read) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    // What a driven Migration waits for (its pass ending, its pods or claims changing) wakes
    // it through `wakeups`, with the watches its driver opens; see wake.rs. The watch is
    // built here rather than by `Controller::new` to count what it receives.
    let (reader, writer) = reflector::store();
    let metrics = Arc::clone(&ctx.metrics);
    let watched = format!("migrations_{role}");
    let migrations = watcher(api, watch)
        .default_backoff()
        .inspect(move |event| {
            if let Ok(event) = event {
                for _ in wake::objects(event) {
                    metrics.watched(&watched);
                }
            }
        })
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(migrations, reader)
        .reconcile_on(ctx.wakeups.subscribe())
        .shutdown_on_signal()
        .run(
            move |cached, ctx| {
                let span = tracing::info_span!(
                    "reconcile",
                    migration = %status::key(&cached),
                    role
                );
                async move {
                    // Decide from the live object, or from the cache when it holds the version
                    // this agent last read live or wrote, or when this role only waits on it
                    // (see fresh.rs).
                    let from_cache = ctx.fresh.current(&cached)
                        || (only_waits(&cached) && ctx.fresh.may_wait_on(&cached));
                    let (m, read) = if from_cache {
                        (cached, fresh::Read::Cached)
                    } else {
                        match live(&ctx, &cached).await? {
                            Some(m) => (m, fresh::Read::Live),
                            None => return Ok(Action::await_change()),
                        }
                    };
                    let result = reconcile(Arc::clone(&m), Arc::clone(&ctx), read).await;
                    reset_on_success(&ctx, &m, result).await
                }
                .instrument(span)
            },
            error_policy,
            ctx,
        )
        .for_each(|_| async {})
}

/// A client of the API (in-cluster or KUBECONFIG) that counts each request it sends
/// (`ployz_api_requests_total`): what an agent costs the API server, per verb and resource.
async fn counted_client(metrics: Arc<metrics::Metrics>) -> Result<Client> {
    let config = kube::Config::infer()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let count =
        tower::util::MapRequestLayer::new(move |req: ::http::Request<kube::client::Body>| {
            metrics.request(req.method().as_str(), req.uri().path(), req.uri().query());
            req
        });
    Ok(kube::client::ClientBuilder::try_from(config)
        .context("configuring the Kubernetes client")?
        .with_layer(&count)
        .build())
}

/// A mutex's guard, also after a panic elsewhere poisoned it: what it guards here (memos,
/// open watches) stays valid whatever the panicking holder was doing.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Migration as the API has it now (remembered as seen), or `None` once it is gone.
pub async fn live(ctx: &Ctx, m: &Migration) -> Result<Option<Arc<Migration>>, Error> {
    match status::api(ctx, m).get_opt(&m.name_any()).await? {
        Some(live) => {
            ctx.fresh.saw(&live);
            Ok(Some(Arc::new(live)))
        }
        None => {
            let uid = m.uid().unwrap_or_default();
            ctx.wakeups.forget(&uid);
            ctx.fresh.gone(&uid);
            Ok(None)
        }
    }
}

/// Confirms a Migration read from the cache before acting on it: `Some` when the API still has
/// that version, `None` when it moved on (decide again: the next reconcile reads it live) or
/// is gone.
pub async fn confirm(ctx: &Ctx, m: &Migration) -> Result<Option<Arc<Migration>>, Error> {
    Ok(live(ctx, m)
        .await?
        .filter(|l| l.resource_version() == m.resource_version()))
}

/// Fails fast, with the fix, when the ployz CRDs are missing.
async fn check_crds(client: &Client) -> Result<()> {
    let api: Api<Migration> = Api::all(client.clone());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => bail!(
            "the ployz CRDs are not installed in this cluster (Migration {}/{} not found); install them with `kubectl apply -f crds/` or the Helm chart",
            crate::api::GROUP,
            crate::api::VERSION
        ),
        Err(e) => Err(e).context("listing Migrations"),
    }
}

/// Runs the agent until a signal.
pub async fn run(config: Config) -> Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let client = counted_client(Arc::clone(&metrics)).await?;
    check_crds(&client).await?;
    // Migrations carry their source machine as a label value: a longer name could never be
    // found by its own agent's watch.
    let machine = config
        .machine()
        .parse::<crate::names::MachineName>()
        .context("the machine name (--machine-name, or the node name)")?
        .to_string();
    let parent = config.parent()?;
    let zfs = Arc::new(ZfsCli::new(&config.zfs));
    let info = zfs
        .info()
        .await
        .with_context(|| format!("running {}", config.zfs.display()))?;
    if let Ok(pool) = config.pool.parse::<DatasetName>() {
        retention::release_leaked_holds(&zfs, &info, &pool).await;
    }
    let identity = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            Identity::load(cert, key).context("loading the agent's TLS key and certificate")?
        }
        _ => Identity::generate(&machine).context("generating the agent's TLS key")?,
    };
    info!(pin = %identity.pin(), "TLS key; peers accept this machine only with it");
    let ready = Arc::new(AtomicBool::new(false));

    let server = Arc::new(Server::new(
        Arc::clone(&zfs),
        info.clone(),
        Arc::new(KubeAuthorizer {
            client: client.clone(),
            machine: machine.clone(),
            parent: parent.clone(),
        }),
        identity.server_config()?,
        ServerConfig {
            parent: parent.clone(),
            limits: Limits {
                frame: Duration::from_secs(config.receive_stall_seconds.max(1)),
                ..Limits::default()
            },
        },
    ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let http = http::serve(
        config.http_listen,
        http::Health {
            metrics: Arc::clone(&metrics),
            ready: Arc::clone(&ready),
        },
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        machine: machine.clone(),
        parent,
        sender: Arc::new(Sender::new(Arc::clone(&zfs), info.clone(), identity)),
        server: Arc::clone(&server),
        zfs,
        info,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "ployz-agent".into(),
                instance: Some(machine.clone()),
            },
        ),
        transfers: transfers::Transfers::new(config.max_transfers, Arc::clone(&metrics)),
        backoff: Backoff::default(),
        unreachable: Default::default(),
        pruned: Default::default(),
        progress_written: Default::default(),
        wakeups: wake::Wakeups::new(metrics.step_watches.clone(), metrics.watch_objects.clone()),
        metrics: Arc::clone(&metrics),
        fresh: Default::default(),
        heartbeats: Default::default(),
        machines: Default::default(),
        config,
    });
    let ready_condition = machine::publish(&ctx).await?;
    ready.store(true, Ordering::Relaxed);
    info!(%machine, "agent ready");

    let api: Api<Migration> = Api::all(client.clone());
    let as_target = role(
        "target",
        api.clone(),
        watcher::Config::default().fields(&format!("spec.to={machine}")),
        target::reconcile,
        target::only_waits,
        Arc::clone(&ctx),
    );
    let as_source = role(
        "source",
        api,
        watcher::Config::default().labels(&format!("{SOURCE_LABEL}={machine}")),
        source::reconcile,
        |_| false,
        Arc::clone(&ctx),
    );
    let received = Arc::clone(&server);
    tokio::select! {
        _ = async { futures::join!(as_target, as_source) } => info!("shutting down"),
        r = Arc::clone(&server).serve(listener) => r.context("transfer endpoint")?,
        r = http => r.context("health endpoint")?,
        r = machine::heartbeat(Arc::clone(&ctx), received, ready_condition) => r?,
    }
    Ok(())
}

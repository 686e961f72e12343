//! The agent's Machine: its spec is applied at start (server-side apply, so `draining`, which
//! `ployzctl machine drain` owns, is left alone), its status is heart-beaten.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::warn;

use super::{Ctx, MANAGER};
use crate::api::{Machine, MachineStatus, OPENEBS_NODE_ID_LABEL};
use crate::transfer::server::Server;
use crate::zfs::{DatasetName, Zfs, ZfsCli};

/// Applies the Machine's spec and writes its first status; returns the Ready condition
/// written, which the heartbeat carries on.
pub async fn publish(ctx: &Ctx) -> Result<Condition> {
    let api: Api<Machine> = Api::all(ctx.client.clone());
    let endpoint = ctx
        .config
        .endpoint
        .clone()
        .unwrap_or_else(|| ctx.config.listen.to_string());
    let mut spec = json!({
        "apiVersion": "ployz.dev/v1alpha1",
        "kind": "Machine",
        "metadata": {"name": ctx.machine},
        "spec": {
            "nodeName": ctx.config.node_name,
            "pool": ctx.config.pool,
            "parentDataset": ctx.parent.as_str(),
            "endpoint": endpoint,
        },
    });
    if let Some(id) = zfs_node_id(ctx).await? {
        spec["spec"]["zfsNodeId"] = json!(id);
    }
    let published = api
        .patch(
            &ctx.machine,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&spec),
        )
        .await
        .with_context(|| format!("publishing Machine {}", ctx.machine))?;
    // A restarted agent keeps the condition's transition time when its status is unchanged.
    let previous = published
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"));
    beat(ctx, &api, previous.as_ref()).await
}

/// The node's `openebs.io/nodeid` label, read once at start (relabelling a node means
/// restarting its agent, as it does for zfs-localpv's own node plugin).
async fn zfs_node_id(ctx: &Ctx) -> Result<Option<String>> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let node = nodes
        .get(&ctx.config.node_name)
        .await
        .with_context(|| format!("reading Node {}", ctx.config.node_name))?;
    Ok(node
        .metadata
        .labels
        .and_then(|mut l| l.remove(OPENEBS_NODE_ID_LABEL)))
}

/// `1.5GiB`-style sizes for `kubectl get`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

async fn beat(ctx: &Ctx, api: &Api<Machine>, previous: Option<&Condition>) -> Result<Condition> {
    let pool: Result<DatasetName, _> = ctx.config.pool.parse();
    let (pool_space, parent_space) = match pool {
        Ok(pool) => (
            ctx.zfs.space(&pool).await,
            match ctx.zfs.space(&ctx.parent).await {
                // The parent is created by the first receive; until then the pool's room counts.
                Err(crate::zfs::ZfsError::NotFound(_)) => ctx.zfs.space(&pool).await,
                other => other,
            },
        ),
        Err(e) => (
            Err(e.into()),
            Err(crate::zfs::ZfsError::NotFound(String::new())),
        ),
    };
    let now = Time(Timestamp::now());
    let (status, reason, message) = match (&pool_space, &parent_space) {
        (Ok(_), Ok(_)) => (
            "True",
            "PoolOnline",
            "the agent heart-beats and its pool answers".to_string(),
        ),
        (Err(e), _) | (_, Err(e)) => (
            "False",
            "PoolUnavailable",
            format!("pool {}: {e}", ctx.config.pool),
        ),
    };
    // lastTransitionTime moves only when the status does.
    let transition = previous
        .filter(|c| c.status == status)
        .map_or(now.clone(), |c| c.last_transition_time.clone());
    let free = parent_space.as_ref().ok().map(|s| s.available);
    let ready = Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: transition,
        observed_generation: None,
    };
    let status = MachineStatus {
        conditions: vec![ready.clone()],
        heartbeat_time: Some(now),
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        zfs: Some(ctx.info.clone()),
        size_bytes: pool_space.as_ref().ok().map(|s| s.used + s.available),
        free_bytes: free,
        free: free.map(human_bytes),
        pool_mountpoint: pool_space.ok().and_then(|s| s.mountpoint),
        tls_pin: Some(ctx.sender.pin().to_string()),
    };
    api.patch_status(
        &ctx.machine,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .with_context(|| format!("updating Machine {} status", ctx.machine))?;
    Ok(ready)
}

/// Heart-beats until the agent stops, from the condition `publish` wrote; also carries the
/// receiver's byte count into metrics.
pub async fn heartbeat<A>(
    ctx: Arc<Ctx>,
    server: Arc<Server<ZfsCli, A>>,
    mut ready: Condition,
) -> Result<()> {
    let api: Api<Machine> = Api::all(ctx.client.clone());
    let mut counted = 0;
    let mut every = tokio::time::interval(Duration::from_secs(ctx.config.heartbeat_seconds.max(1)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let received = server.received_bytes.load(Ordering::Relaxed);
        ctx.metrics
            .bytes_received
            .inc_by(received.saturating_sub(counted));
        counted = received;
        match beat(&ctx, &api, Some(&ready)).await {
            Ok(written) => ready = written,
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
    }
}

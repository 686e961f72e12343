//! Housekeeping of ployz's own snapshots on this machine: after a Migration ended, its side's
//! datasets are pruned by the policy of [`crate::zfs::retention`]; at start, holds a crashed
//! agent left behind are released (no transfer runs yet, so none is in use).

use kube::ResourceExt;
use tracing::{info, warn};

use super::Ctx;
use crate::api::{Migration, MigrationPlan};
use crate::plan::snapshot_prefix;
use crate::zfs::retention::{PREFIX, to_destroy};
use crate::zfs::{DatasetName, Zfs, ZfsCli, ZfsError};

/// True the first time this agent run looks at the finished Migration `m` (again after a
/// restart, which then finds little or nothing left to do).
pub fn first_look(ctx: &Ctx, m: &Migration) -> bool {
    ctx.pruned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(m.uid().unwrap_or_default())
}

/// Undoes [`first_look`]: what it gated failed and is to be done again.
pub fn look_again(ctx: &Ctx, m: &Migration) {
    ctx.pruned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&m.uid().unwrap_or_default());
}

/// Prunes this machine's datasets of the finished Migration `m`.
pub async fn prune(ctx: &Ctx, m: &Migration, plan: &MigrationPlan) {
    let uid = m.uid().unwrap_or_default();
    let datasets: Vec<&str> = plan
        .volumes
        .iter()
        .filter_map(|v| {
            if plan.source == ctx.machine {
                Some(v.source_dataset.as_str())
            } else if plan.target == ctx.machine {
                Some(v.target_dataset.as_str())
            } else {
                None
            }
        })
        .collect();
    let prefix = snapshot_prefix(&uid);
    for ds in datasets {
        let Ok(ds) = ds.parse::<DatasetName>() else {
            continue;
        };
        let snapshots = match ctx.zfs.inventory(&ds, &ctx.info).await {
            Ok(mut inv) => inv
                .datasets
                .remove(&ds)
                .map(|d| d.snapshots)
                .unwrap_or_default(),
            // Destroyed (sourceCopy: Delete) or never received: nothing to prune.
            Err(ZfsError::NotFound(_)) => continue,
            Err(e) => {
                warn!(dataset = %ds, error = %e, "cannot list snapshots to prune");
                continue;
            }
        };
        for snap in to_destroy(&snapshots, &prefix) {
            match ctx.zfs.destroy_snapshot(&snap).await {
                Ok(()) => info!(migration = %m.name_any(), %snap, "pruned"),
                Err(e) => warn!(%snap, error = %e, "cannot prune"),
            }
        }
    }
}

/// Releases ployz's holds on `ployz-*` snapshots under `root`: called before any transfer
/// starts, when no hold can be in use.
pub async fn release_leaked_holds(zfs: &ZfsCli, info: &crate::api::ZfsInfo, root: &DatasetName) {
    let inv = match zfs.inventory(root, info).await {
        Ok(inv) => inv,
        Err(e) => {
            warn!(%root, error = %e, "cannot look for leaked holds");
            return;
        }
    };
    for snap in inv
        .datasets
        .values()
        .flat_map(|d| &d.snapshots)
        .filter(|s| s.userrefs > 0 && s.name.short().starts_with(PREFIX))
    {
        match zfs.release(&snap.name).await {
            Ok(()) => info!(snap = %snap.name, "released a hold left by an earlier run"),
            Err(e) => warn!(snap = %snap.name, error = %e, "cannot release hold"),
        }
    }
}

//! ployz: move a stateful Kubernetes workload and its ZFS-backed volumes from one machine to
//! another, declaratively.
//!
//! This library holds the API types, the planner and the side-effect layers (ZFS, transfer,
//! Kubernetes) shared by the per-node agent (`ployz-controller`) and `ployzctl`.

pub mod agent;
pub mod api;
pub mod entry;
pub mod flow;
pub mod guard;
pub mod manifest;
pub mod names;
pub mod openebs;
pub mod plan;
pub mod transfer;
pub mod zfs;

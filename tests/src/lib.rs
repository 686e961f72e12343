//! End-to-end harness for ployz: a real Kubernetes control plane (built from Go modules),
//! real nodes (a kubelet with containerd and runc on every machine, images built locally),
//! real ZFS (one zfs-fuse daemon per machine, in its own mount namespace) and a real network
//! (one network namespace per machine). Suites build one [`env::Env`] and run their tests
//! against it through [`suite::run`].

pub mod agents;
pub mod controlplane;
pub mod env;
pub mod fakezfs;
pub mod k8s;
pub mod ledger;
pub mod machine;
pub mod network;
pub mod node;
pub mod pki;
pub mod process;
pub mod reaper;
pub mod report;
pub mod suite;
pub mod vm;
pub mod wait;

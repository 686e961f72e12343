//! The test network: a bridge in the host namespace (the "cluster network", where the API
//! server listens) and one network namespace per machine, linked to the bridge by a veth pair.
//! All addresses come from 198.18.0.0/15 (reserved for benchmarking); nothing leaves the host.

use std::fs::File;
use std::net::Ipv4Addr;
use std::thread;

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

use crate::process::{command, run};
use crate::reaper::{self, Resource};

/// Name of the host bridge.
pub const BRIDGE: &str = "pz-br0";
/// The host's address on the bridge: the API server listens here.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Prefix length of the test network.
pub const PREFIX: u8 = 24;
/// Pod addresses kwok hands out to fake nodes (never contacted).
pub const KWOK_POD_CIDR: &str = "198.19.0.0/17";

/// The pod network of the machine with index `i` (1-based): `198.19.i.0/24`, bridged on the
/// machine (CNI bridge `cni0`) and routed to by the host and the other machines.
pub fn pod_subnet(i: u8) -> String {
    format!("198.19.{i}.0/24")
}
/// Service cluster IPs (never contacted).
pub const SERVICE_CIDR: &str = "198.19.128.0/24";

/// Creates the bridge with the host's address.
pub fn create_bridge() -> Result<()> {
    reaper::register(Resource::Link(BRIDGE.into()));
    run(&mut command(
        "ip",
        ["link", "add", BRIDGE, "type", "bridge"],
    ))?;
    run(&mut command(
        "ip",
        ["addr", "add", &format!("{HOST_IP}/{PREFIX}"), "dev", BRIDGE],
    ))?;
    run(&mut command("ip", ["link", "set", BRIDGE, "up"]))?;
    Ok(())
}

/// A machine's network namespace, attached to the bridge.
#[derive(Debug, Clone)]
pub struct MachineNet {
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl MachineNet {
    /// Creates namespace `pz-NAME` with `eth0` at `ip` and loopback up.
    pub fn create(machine: &str, ip: Ipv4Addr) -> Result<Self> {
        let netns = format!("pz-{machine}");
        let host_end = host_end(machine);
        reaper::register(Resource::Netns(netns.clone()));
        run(&mut command("ip", ["netns", "add", &netns]))?;
        reaper::register(Resource::Link(host_end.clone()));
        run(&mut command(
            "ip",
            [
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        ))?;
        run(&mut command(
            "ip",
            ["link", "set", &host_end, "master", BRIDGE, "up"],
        ))?;
        let ns = |args: &[&str]| {
            let mut full = vec!["-n", netns.as_str()];
            full.extend_from_slice(args);
            run(&mut command("ip", full))
        };
        ns(&["addr", "add", &format!("{ip}/{PREFIX}"), "dev", "eth0"])?;
        ns(&["link", "set", "eth0", "up"])?;
        ns(&["link", "set", "lo", "up"])?;
        Ok(Self { netns, ip })
    }

    /// Plugs the machine's cable in or pulls it out: its veth's host end up or down. Routes
    /// and addresses stay, as on a machine that is switched off and on again.
    pub fn set_link(&self, up: bool) -> Result<()> {
        let machine = self.netns.trim_start_matches("pz-");
        let state = if up { "up" } else { "down" };
        run(&mut command(
            "ip",
            ["link", "set", &host_end(machine), state],
        ))
        .map(drop)
    }

    /// Runs `f` on a thread inside this namespace: sockets it opens live in the namespace, so
    /// a test can listen or connect as the machine would.
    pub fn run_in<T, F>(&self, f: F) -> thread::JoinHandle<Result<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.netns);
        thread::spawn(move || {
            let fd = File::open(&path).with_context(|| format!("opening {path}"))?;
            setns(&fd, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
            f()
        })
    }
}

/// The host end of a machine's veth (names are limited to 15 bytes).
fn host_end(machine: &str) -> String {
    format!("pzv-{machine}").chars().take(15).collect()
}

/// Joins a [`MachineNet::run_in`] thread, turning a panic into an error.
pub fn join<T>(h: thread::JoinHandle<Result<T>>) -> Result<T> {
    h.join()
        .map_err(|_| anyhow!("thread in network namespace panicked"))?
}

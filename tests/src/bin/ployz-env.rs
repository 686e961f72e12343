//! `make env`: brings the local environment up for a person (control plane, machine-a and
//! machine-b with ZFS and real nodes, the CRDs installed), prints how to use it, and keeps it
//! up until Ctrl-C, which tears everything down. `PLOYZ_NODES=kwok` gives fake kwok nodes
//! instead (no container runs), for scale experiments.

use std::process::ExitCode;

use ployz_e2e::env::{Env, Nodes, Options};
use ployz_e2e::k8s;

fn main() -> ExitCode {
    let mut opts = Options::new("env");
    if std::env::var("PLOYZ_NODES").as_deref() == Ok("kwok") {
        opts.nodes = Nodes::Kwok;
    }
    let env = match Env::start(opts) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("error: the environment did not start: {e:#}");
            ployz_e2e::reaper::release_all();
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = env.block_on(k8s::install_crds(&env.client, &env.root.join("crds"))) {
        eprintln!("error: installing the CRDs: {e:#}");
        return ExitCode::FAILURE;
    }
    let kubeconfig = env
        .kubeconfig()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let bins = ployz_e2e::env::bin_dir(&env.root)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!("The ployz environment is up. In another shell:\n");
    println!("  export KUBECONFIG={kubeconfig}");
    println!("  export PATH={bins}:$PATH     # kubectl");
    println!("  kubectl get nodes");
    for m in &env.machines {
        println!(
            "  nsenter --target {} --mount --net -- zfs list     # {} ({}), pool {}",
            m.pid(),
            m.name,
            m.ip(),
            m.pool
        );
    }
    println!(
        "\nComponent logs: {}\nPress Ctrl-C to tear it all down.",
        env.logs.display()
    );
    // The reaper's signal handler tears everything down and exits; until then, wait.
    loop {
        std::thread::park();
    }
}

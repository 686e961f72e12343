//! `make demo`: the whole story on the local environment. Two machines with ZFS, a real
//! kubelet and a ployz agent each; a stateful app (the ledger: a checksummed record every
//! 20 ms, fsync'd) running in a pod on machine-a with data on a ZFS volume; a Migration
//! rendered by `ployzctl`, applied with `kubectl`, followed phase by phase; the app Running on
//! machine-b with identical checksums, every write it acknowledged there, and the downtime the
//! app itself saw; and the way back, which sends only what changed. Everything is torn down at
//! the end, and on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use kube::api::Api;
use ployz::api::Migration;
use ployz_e2e::agents::{install_chart, workspace_binary};
use ployz_e2e::env::{Env, Options, bin_dir};
use ployz_e2e::k8s;
use ployz_e2e::ledger::{self, AckWatch};
use ployz_e2e::machine::ZfsMachine;

const NS: &str = "demo";
const APP: &str = "db";

fn main() -> ExitCode {
    let started = Instant::now();
    let env = match Env::start(Options::new("demo")) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("error: the environment did not start: {e:#}");
            ployz_e2e::reaper::release_all();
            return ExitCode::FAILURE;
        }
    };
    let result = demo(&env);
    drop(env);
    match result {
        Ok(()) => {
            step(&format!(
                "done in {:.0}s; everything was torn down",
                started.elapsed().as_secs_f64()
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(what: &str) {
    println!("\n==> {what}");
}

/// Runs a command with its output shown; fails when it fails.
fn show(cmd: &mut Command) -> Result<()> {
    println!("$ {}", describe(cmd));
    let status = cmd.stdin(Stdio::null()).status()?;
    ensure!(status.success(), "{} failed ({status})", describe(cmd));
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let prog = Path::new(cmd.get_program())
        .file_name()
        .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| !a.starts_with("--kubeconfig") && !a.contains("kubeconfig"))
        .collect();
    format!("{prog} {}", args.join(" "))
}

struct Tools {
    kubectl: PathBuf,
    ployzctl: PathBuf,
    kubeconfig: PathBuf,
}

impl Tools {
    fn kubectl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.args(args).env("KUBECONFIG", &self.kubeconfig);
        c
    }

    fn ployzctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.ployzctl);
        c.args(args).env("KUBECONFIG", &self.kubeconfig);
        c
    }
}

fn checksums(m: &ZfsMachine, dataset: &str) -> Result<String> {
    let mp = m.zfs(&["get", "-H", "-o", "value", "mountpoint", dataset])?;
    m.checksums(mp.trim())
}

fn bytes_sent(env: &Env, name: &str) -> Result<u64> {
    let api: Api<Migration> = Api::namespaced(env.client.clone(), NS);
    let m = env.block_on(api.get(name))?;
    Ok(m.status
        .and_then(|s| s.pre_copy)
        .map_or(0, |p| p.pass_bytes.iter().sum()))
}

/// Waits until the app answers from `node`, then checks its ledger after the move and says
/// what the app saw.
fn report_app(
    app: &AckWatch,
    downtime_ms: Option<u64>,
    from: (&ZfsMachine, &str),
    to: (&ZfsMachine, &str),
) -> Result<()> {
    app.wait_acked_on(&to.0.name)?;
    let r = ledger::verify_move(&app.acks(), from, to)?;
    println!(
        "the app: {} records in its ledger on {}, every acknowledged write there, none torn",
        r.last_seq, to.0.name
    );
    println!(
        "downtime seen by the app: {:.2}s (its last write on {}, record {}, to its first on {}, record {}); ployz measured {:.2}s",
        r.app_downtime.as_secs_f64(),
        from.0.name,
        r.handover.from.seq,
        to.0.name,
        r.handover.to.seq,
        downtime_ms.unwrap_or_default() as f64 / 1000.0
    );
    Ok(())
}

fn downtime(env: &Env, name: &str) -> Result<Option<u64>> {
    let api: Api<Migration> = Api::namespaced(env.client.clone(), NS);
    Ok(env
        .block_on(api.get(name))?
        .status
        .and_then(|s| s.downtime_milliseconds))
}

/// The name of the newest Migration of the demo to `machine`.
fn newest_to(env: &Env, machine: &str) -> Result<String> {
    let api: Api<Migration> = Api::namespaced(env.client.clone(), NS);
    let list = env.block_on(api.list(&kube::api::ListParams::default()))?;
    list.items
        .into_iter()
        .filter(|m| m.spec.to == machine)
        .max_by_key(|m| m.metadata.creation_timestamp.clone().map(|t| t.0))
        .and_then(|m| m.metadata.name)
        .with_context(|| format!("no Migration to {machine} in {NS}"))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn demo(env: &Env) -> Result<()> {
    let tools = Tools {
        kubectl: bin_dir(&env.root)?.join("kubectl"),
        ployzctl: workspace_binary(&env.root, "ployzctl", "ployzctl")?,
        kubeconfig: env.kubeconfig()?.to_path_buf(),
    };
    step(
        "installing ployz as users do: the agent image (built offline, imported into each node) and `helm install` of charts/ployz",
    );
    install_chart(env, &[])?;
    show(&mut tools.kubectl(&["-n", "ployz-system", "get", "pods", "-o", "wide"]))?;
    show(&mut tools.ployzctl(&["machine", "ls"]))?;

    step(
        "deploying a stateful app on machine-a with 64 MiB of data on a ZFS volume (a real pod: it appends a checksummed record every 20 ms)",
    );
    let a = env.machine("machine-a")?;
    let b = env.machine("machine-b")?;
    env.block_on(k8s::create_namespace(&env.client, NS))?;
    let vol = env.block_on(k8s::create_local_volume(&env.client, a, NS, "data"))?;
    a.sh(&format!(
        "cd '{}' && for i in $(seq 1 64); do head -c 1048576 /dev/urandom > table-$i; done && sync",
        vol.path
    ))?;
    env.block_on(k8s::create_deployment(&env.client, NS, APP, "data"))?;
    env.block_on(k8s::wait_ready_on(
        &env.client,
        NS,
        &format!("app={APP}"),
        "machine-a",
        1,
    ))?;
    show(&mut tools.kubectl(&["-n", NS, "get", "pods,pvc", "-o", "wide"]))?;
    let app = AckWatch::start(&env.rt, &env.client, NS, &format!("app={APP}"));
    let before = a.checksums(&vol.path)?;

    step("previewing the move (the controller's own planner, as a dry run)");
    show(&mut tools.ployzctl(&[
        "migrate",
        "preview",
        &format!("{NS}/{APP}"),
        "--to",
        "machine-b",
    ]))?;

    step("rendering the Migration with ployzctl and applying it with kubectl");
    let render = tools
        .ployzctl(&[
            "migrate",
            "render-manifest",
            &format!("{NS}/{APP}"),
            "--to",
            "machine-b",
        ])
        .output()?;
    ensure!(render.status.success(), "render-manifest failed");
    let manifest = String::from_utf8(render.stdout)?;
    println!("$ ployzctl migrate render-manifest {NS}/{APP} --to machine-b\n{manifest}");
    let mut apply = tools.kubectl(&["apply", "-f", "-"]);
    apply.stdin(Stdio::piped());
    println!("$ kubectl apply -f -");
    let mut child = apply.spawn()?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("kubectl stdin")?,
        manifest.as_bytes(),
    )?;
    drop(child.stdin.take());
    ensure!(child.wait()?.success(), "kubectl apply failed");

    step("following it: phases as they pass");
    let name = format!("{APP}-to-machine-b");
    show(&mut tools.ployzctl(&["migrate", "watch", &format!("{NS}/{name}")]))?;
    show(&mut tools.kubectl(&["-n", NS, "get", "migrations", "-o", "wide"]))?;
    show(&mut tools.kubectl(&["-n", NS, "get", "pods", "-o", "wide"]))?;

    step(
        "comparing the data: every file's SHA-256 on machine-a and machine-b, and the app's ledger",
    );
    let after = checksums(b, &vol.dataset)?;
    if after != before {
        bail!("checksums differ between machine-a and machine-b");
    }
    println!("{} files, all checksums identical", after.lines().count());
    let on_b = b.zfs(&["get", "-H", "-o", "value", "mountpoint", &vol.dataset])?;
    let on_b = on_b.trim();
    report_app(&app, downtime(env, &name)?, (a, &vol.path), (b, on_b))?;
    let there = bytes_sent(env, &name)?;

    step("2 MiB more data on machine-b; moving it back sends only the delta");
    b.sh(&format!(
        "cd '{on_b}' && head -c 2097152 /dev/urandom > new-rows && sync"
    ))?;
    show(&mut tools.ployzctl(&[
        "migrate",
        "apply",
        &format!("{NS}/{APP}"),
        "--to",
        "machine-a",
    ]))?;
    // `migrate apply` names each move anew (SERVICE-to-MACHINE-xxxxx): the newest to machine-a.
    let back_name = newest_to(env, "machine-a")?;
    let back = bytes_sent(env, &back_name)?;
    ensure!(
        checksums(a, &vol.dataset)? == checksums(b, &vol.dataset)?,
        "checksums differ after moving back"
    );
    show(&mut tools.kubectl(&["-n", NS, "get", "pods", "-o", "wide"]))?;
    report_app(&app, downtime(env, &back_name)?, (b, on_b), (a, &vol.path))?;
    println!(
        "\nmoving to machine-b sent {}; moving back sent {} ({:.0}x less): only the delta since the last common snapshot",
        mib(there),
        mib(back),
        there as f64 / back.max(1) as f64
    );
    Ok(())
}

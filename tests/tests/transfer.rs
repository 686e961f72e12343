//! Transfer engine suite: two zfs-fuse machines in separate namespaces, streams over mutual
//! TLS across the veth link, authorization against Migrations in the real API server.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ployz::transfer::Progress;
use ployz::transfer::client::{SendJob, SendReport, Sender, TransferError};
use ployz::transfer::protocol::{
    Action, Hello, HelloReply, MigrationKey, Offer, PROTOCOL_VERSION, ReceiveFailure,
    RefusalReason, WireCompression, read_frame, write_frame,
};
use ployz::transfer::tls::{Identity, Pin};
use ployz::zfs::base::BaseError;
use ployz::zfs::{Zfs, ZfsCli};
use ployz_e2e::agents::{
    Receiver, connect_from, identity, publish_identity, sender, sending_migration, start_receiver,
};
use ployz_e2e::env::{Env, Options};
use ployz_e2e::k8s;
use ployz_e2e::machine::ZfsMachine;
use ployz_e2e::process::{command, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "xfer";
const PORT: u16 = 7443;
const NO_PROGRESS: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    ployz_e2e::suite::run(
        Options::new("transfer"),
        &[
            ("full_send_arrives_with_matching_checksums", full_send),
            ("incremental_send_carries_only_the_delta", incremental_send),
            (
                "intermediate_snapshots_arrive_with_their_guids",
                intermediate_snapshots,
            ),
            (
                "repeated_send_of_the_same_snapshot_is_a_no_op",
                repeated_send,
            ),
            (
                "compressed_wire_with_rate_limit_delivers_the_same_data",
                zstd_and_rate_limit,
            ),
            (
                "modified_target_is_refused_and_kept",
                modified_target_refused,
            ),
            (
                "diverged_target_is_refused_and_kept",
                diverged_target_refused,
            ),
            ("diverged_ployz_replica_is_rolled_back", replica_rolled_back),
            (
                "replica_of_another_claim_is_refused_and_kept",
                replica_of_another_claim_refused,
            ),
            (
                "target_without_common_snapshot_is_refused_and_kept",
                no_common_snapshot,
            ),
            ("target_pool_too_small_fails_cleanly", pool_too_small),
            (
                "cut_link_mid_stream_then_retry_succeeds",
                cut_link_then_retry,
            ),
            (
                "receiver_killed_mid_stream_then_restarted_retry_succeeds",
                receiver_killed_then_retry,
            ),
            (
                "leftover_of_an_interrupted_receive_is_waited_for",
                interrupted_leftover_waited_for,
            ),
            (
                "stranger_without_the_key_its_machine_publishes_is_refused",
                stranger_refused,
            ),
            (
                "known_machine_without_migration_is_refused",
                no_migration_refused,
            ),
            (
                "path_outside_parent_dataset_is_refused",
                outside_parent_refused,
            ),
            (
                "plan_mapping_a_claim_to_another_claim_s_volume_is_refused",
                foreign_volume_refused,
            ),
            (
                "sender_impersonating_another_machine_is_refused",
                wrong_peer_refused,
            ),
            (
                "idle_connections_do_not_stop_a_send_beside_them",
                idle_connections,
            ),
            (
                "stalled_sender_frees_its_dataset_within_the_read_timeout",
                stalled_sender,
            ),
            (
                "crafted_compound_streams_are_refused_before_zfs_receive",
                crafted_compound_streams_are_refused_before_zfs_receive,
            ),
        ],
    )
}

/// What the suite sets up once.
struct Agents {
    a: Identity,
    receiver: Receiver,
}

/// The keys of machine-a (sender) and machine-b (receiver), made once per run.
fn keys() -> Result<&'static (Identity, Identity)> {
    use std::sync::OnceLock;
    static KEYS: OnceLock<(Identity, Identity)> = OnceLock::new();
    if let Some(k) = KEYS.get() {
        return Ok(k);
    }
    let made = (identity("machine-a")?, identity("machine-b")?);
    Ok(KEYS.get_or_init(|| made))
}

/// The key machine-b's receivers hold, which senders check.
fn b_pin() -> Result<Pin> {
    Ok(keys()?.1.pin().clone())
}

fn agents(env: &Env) -> Result<&'static Agents> {
    use std::sync::OnceLock;
    static AGENTS: OnceLock<Agents> = OnceLock::new();
    if let Some(a) = AGENTS.get() {
        return Ok(a);
    }
    env.block_on(k8s::install_crds(&env.client, &env.root.join("crds")))?;
    env.block_on(k8s::create_namespace(&env.client, NS))?;
    let (a, b) = keys()?;
    for (machine, key) in [("machine-a", a), ("machine-b", b)] {
        env.block_on(publish_identity(&env.client, machine, key))?;
    }
    let receiver = start_receiver(
        env,
        env.client.clone(),
        env.machine("machine-b")?,
        b,
        "tank/ployz",
        PORT,
        NO_PROGRESS,
    )?;
    let a = a.clone();
    Ok(AGENTS.get_or_init(|| Agents { a, receiver }))
}

fn migration(env: &Env, name: &str, claim: &str, volume: &str, target_dataset: &str) -> Result<()> {
    env.block_on(sending_migration(
        &env.client,
        NS,
        name,
        ("machine-a", "machine-b"),
        (claim, volume, target_dataset),
    ))
}

fn job(migration: &str, claim: &str, volume: &str, to: &str) -> Result<SendJob> {
    Ok(SendJob {
        migration: MigrationKey {
            namespace: NS.into(),
            name: migration.into(),
        },
        claim: claim.into(),
        target_machine: "machine-b".into(),
        target_pin: Some(b_pin()?),
        dataset: format!("tank/ployz/{volume}").parse()?,
        to: to.into(),
        compression: WireCompression::None,
        rate_limit: None,
        no_progress: NO_PROGRESS,
    })
}

fn send_as(
    env: &Env,
    identity: &Identity,
    addr: std::net::SocketAddr,
    job: &SendJob,
) -> Result<Result<SendReport, TransferError>> {
    send_watched(env, identity, addr, job, &Progress::default())
}

/// Like [`send_as`], with the caller's progress counters.
fn send_watched(
    env: &Env,
    identity: &Identity,
    addr: std::net::SocketAddr,
    job: &SendJob,
    progress: &Progress,
) -> Result<Result<SendReport, TransferError>> {
    let a = env.machine("machine-a")?;
    let s = sender(env, a, identity)?;
    let net = a.net.clone();
    env.block_on(async {
        let tcp = connect_from(net, addr)
            .await
            .context("connecting from machine-a")?;
        anyhow::Ok(s.send(tcp, job, progress).await)
    })
}

fn send(env: &Env, job: &SendJob) -> Result<Result<SendReport, TransferError>> {
    let ag = agents(env)?;
    send_as(env, &ag.a, ag.receiver.addr, job)
}

fn write_data(m: &ZfsMachine, dir: &str, script: &str) -> Result<()> {
    m.sh(&format!("cd '{dir}' && {script}")).map(drop)
}

/// Checksums on the target after a fresh mount (zfs-fuse may serve stale pages of a dataset
/// that stayed mounted across a receive).
fn target_checksums(b: &ZfsMachine, dataset: &str) -> Result<String> {
    let _ = b.zfs(&["unmount", dataset]);
    b.zfs(&["mount", dataset])?;
    let mp = b.zfs(&["get", "-H", "-o", "value", "mountpoint", dataset])?;
    let sums = b.checksums(mp.trim());
    b.zfs(&["unmount", dataset])?;
    sums
}

fn guids(m: &ZfsMachine, dataset: &str) -> Result<Vec<(String, String)>> {
    let out = m.zfs(&[
        "list",
        "-H",
        "-r",
        "-t",
        "snapshot",
        "-o",
        "name",
        "-s",
        "createtxg",
        dataset,
    ])?;
    out.lines()
        .map(|snap| {
            let guid = m.zfs(&["get", "-H", "-p", "-o", "value", "guid", snap])?;
            Ok((
                snap.split('@').nth(1).unwrap_or_default().to_string(),
                guid.trim().to_string(),
            ))
        })
        .collect()
}

fn sent(r: Result<SendReport, TransferError>) -> Result<(Option<String>, u64)> {
    match r {
        Ok(SendReport::Sent {
            base, stream_bytes, ..
        }) => Ok((base, stream_bytes)),
        other => bail!("expected a send, got {other:?}"),
    }
}

const DATA: &str = "data";

fn full_send(env: &mut Env) -> Result<()> {
    agents(env)?;
    let a = env.machine("machine-a")?;
    let mp = a.create_dataset("tank/ployz/xfer-data")?;
    write_data(
        a,
        &mp,
        "head -c 33554432 /dev/urandom > big && mkdir -p d && echo one > d/small && ln -s d/small link",
    )?;
    a.zfs(&["snapshot", "tank/ployz/xfer-data@s1"])?;
    migration(env, "m-data", DATA, "xfer-data", "tank/ployz/xfer-data")?;

    let ag = agents(env)?;
    let progress = Progress::default();
    let j = job("m-data", DATA, "xfer-data", "s1")?;
    let (base, bytes) = sent(send_watched(env, &ag.a, ag.receiver.addr, &j, &progress)?)?;
    ensure!(base.is_none(), "a first send is full, got base {base:?}");
    // Random data does not compress: the (legacy) estimate is close to the real stream.
    let estimate = progress.estimate().context("no size estimate")?;
    ensure!(
        estimate.abs_diff(bytes) * 10 < bytes,
        "estimate {estimate} is more than 10% off the stream's {bytes} bytes"
    );
    ensure!(
        progress.stream() == bytes,
        "progress counted {} of {bytes}",
        progress.stream()
    );
    ensure!(
        bytes > 32 << 20,
        "stream of {bytes} bytes for 32 MiB of data"
    );
    let a = env.machine("machine-a")?;
    let b = env.machine("machine-b")?;
    ensure!(
        target_checksums(b, "tank/ployz/xfer-data")? == a.checksums(&mp)?,
        "checksums differ"
    );
    ensure!(
        guids(b, "tank/ployz/xfer-data")? == guids(a, "tank/ployz/xfer-data")?,
        "snapshot GUIDs differ"
    );
    let props = b.zfs(&[
        "get",
        "-H",
        "-o",
        "value",
        "ployz:replica,readonly,ployz:migration",
        "tank/ployz/xfer-data",
    ])?;
    ensure!(
        props == "true\non\nxfer/m-data\n",
        "received dataset not marked as replica: {props:?}"
    );
    Ok(())
}

fn incremental_send(env: &mut Env) -> Result<()> {
    let a = env.machine("machine-a")?;
    let mp = "/tank/ployz/xfer-data";
    write_data(
        a,
        mp,
        "head -c 4194304 /dev/urandom > delta && echo two > d/small && rm link",
    )?;
    a.zfs(&["snapshot", "tank/ployz/xfer-data@s2"])?;
    let (base, bytes) = sent(send(env, &job("m-data", DATA, "xfer-data", "s2")?)?)?;
    ensure!(base.as_deref() == Some("s1"), "base {base:?}");
    ensure!(
        (4 << 20..6 << 20).contains(&bytes),
        "a 4 MiB delta took {bytes} stream bytes"
    );
    let (a, b) = (env.machine("machine-a")?, env.machine("machine-b")?);
    ensure!(
        target_checksums(b, "tank/ployz/xfer-data")? == a.checksums(mp)?,
        "checksums differ"
    );
    Ok(())
}

fn intermediate_snapshots(env: &mut Env) -> Result<()> {
    let a = env.machine("machine-a")?;
    for s in ["s3", "s4"] {
        write_data(a, "/tank/ployz/xfer-data", &format!("echo {s} > {s}"))?;
        a.zfs(&["snapshot", &format!("tank/ployz/xfer-data@{s}")])?;
    }
    let (base, _) = sent(send(env, &job("m-data", DATA, "xfer-data", "s4")?)?)?;
    ensure!(base.as_deref() == Some("s2"), "base {base:?}");
    let (a, b) = (env.machine("machine-a")?, env.machine("machine-b")?);
    let got = guids(b, "tank/ployz/xfer-data")?;
    ensure!(
        got == guids(a, "tank/ployz/xfer-data")?,
        "target snapshots {got:?}"
    );
    ensure!(
        got.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>() == ["s1", "s2", "s3", "s4"],
        "{got:?}"
    );
    Ok(())
}

fn repeated_send(env: &mut Env) -> Result<()> {
    let before = agents(env)?
        .receiver
        .server
        .received_bytes
        .load(Ordering::Relaxed);
    let r = send(env, &job("m-data", DATA, "xfer-data", "s4")?)?;
    ensure!(matches!(r, Ok(SendReport::UpToDate)), "{r:?}");
    let after = agents(env)?
        .receiver
        .server
        .received_bytes
        .load(Ordering::Relaxed);
    ensure!(
        before == after,
        "an up-to-date send moved {} bytes",
        after - before
    );
    Ok(())
}

fn zstd_and_rate_limit(env: &mut Env) -> Result<()> {
    let a = env.machine("machine-a")?;
    // Compressible data: zeros and text.
    write_data(
        a,
        "/tank/ployz/xfer-data",
        "head -c 8388608 /dev/zero > zeros && seq 1 200000 > numbers",
    )?;
    a.zfs(&["snapshot", "tank/ployz/xfer-data@s5"])?;
    let mut j = job("m-data", DATA, "xfer-data", "s5")?;
    j.compression = WireCompression::Zstd;
    j.rate_limit = Some(4 << 20);
    let ag = agents(env)?;
    let r = send_as(env, &ag.a, ag.receiver.addr, &j)?;
    let (stream, wire) = match r {
        Ok(SendReport::Sent {
            stream_bytes,
            wire_bytes,
            ..
        }) => (stream_bytes, wire_bytes),
        other => bail!("{other:?}"),
    };
    ensure!(
        wire * 4 < stream,
        "zstd did not shrink the stream: {wire} wire bytes for {stream}"
    );
    let (a, b) = (env.machine("machine-a")?, env.machine("machine-b")?);
    ensure!(
        target_checksums(b, "tank/ployz/xfer-data")? == a.checksums("/tank/ployz/xfer-data")?,
        "checksums differ"
    );
    Ok(())
}

/// Makes the target an ordinary dataset (not a ployz replica) for the refusal tests.
fn unmark_replica(b: &ZfsMachine, ds: &str) -> Result<()> {
    b.zfs(&["set", "ployz:replica=false", ds])?;
    b.zfs(&["set", "readonly=off", ds]).map(drop)
}

fn modified_target_refused(env: &mut Env) -> Result<()> {
    let ds = "tank/ployz/xfer-data";
    let b = env.machine("machine-b")?;
    unmark_replica(b, ds)?;
    b.zfs(&["mount", ds])?;
    b.sh("echo precious > /tank/ployz/xfer-data/precious")?;
    let a = env.machine("machine-a")?;
    write_data(a, "/tank/ployz/xfer-data", "echo s6 > s6")?;
    a.zfs(&["snapshot", &format!("{ds}@s6")])?;
    let r = send(env, &job("m-data", DATA, "xfer-data", "s6")?)?;
    match &r {
        Err(
            e @ TransferError::Remote {
                reason: ReceiveFailure::TargetModified,
                ..
            },
        ) => {
            ensure!(e.to_string().contains("will not overwrite"), "{e}");
        }
        other => bail!("expected TargetModified, got {other:?}"),
    }
    let b = env.machine("machine-b")?;
    ensure!(
        b.sh("cat /tank/ployz/xfer-data/precious")? == "precious\n",
        "the target's file is gone"
    );
    // Put the target back at the common snapshot for the next tests.
    b.sh("rm /tank/ployz/xfer-data/precious")?;
    b.zfs(&["rollback", &format!("{ds}@s5")])?;
    b.zfs(&["unmount", ds]).map(drop)
}

fn diverged_target_refused(env: &mut Env) -> Result<()> {
    let ds = "tank/ployz/xfer-data";
    env.machine("machine-b")?
        .zfs(&["snapshot", &format!("{ds}@local")])?;
    let r = send(env, &job("m-data", DATA, "xfer-data", "s6")?)?;
    match &r {
        Err(TransferError::Base {
            source: BaseError::Diverged { base, newer },
            ..
        }) => {
            ensure!(base == "s5" && newer == &["local".to_string()], "{r:?}");
        }
        other => bail!("expected Diverged, got {other:?}"),
    }
    let snaps = guids(env.machine("machine-b")?, ds)?;
    ensure!(
        snaps.iter().any(|(n, _)| n == "local"),
        "the target's snapshot was destroyed: {snaps:?}"
    );
    Ok(())
}

fn replica_rolled_back(env: &mut Env) -> Result<()> {
    let ds = "tank/ployz/xfer-data";
    env.machine("machine-b")?
        .zfs(&["set", "ployz:replica=true", ds])?;
    let (base, _) = sent(send(env, &job("m-data", DATA, "xfer-data", "s6")?)?)?;
    ensure!(base.as_deref() == Some("s5"), "base {base:?}");
    let (a, b) = (env.machine("machine-a")?, env.machine("machine-b")?);
    let (want, got) = (guids(a, ds)?, guids(b, ds)?);
    ensure!(
        got == want,
        "replica not brought to the source's snapshots:\n source {want:?}\n target {got:?}"
    );
    Ok(())
}

/// A replica stamped with another claim (a PV deleted and its name reused by another claim,
/// or a stamp forged on the dataset) takes no stream and changes no role, though it is a
/// ployz replica holding the stream's base: a receive would have rolled it back.
fn replica_of_another_claim_refused(env: &mut Env) -> Result<()> {
    let ds = "tank/ployz/xfer-data";
    let b = env.machine("machine-b")?;
    let own = b.zfs(&["get", "-H", "-o", "value", "ployz:claim", ds])?;
    ensure!(
        own.trim() == format!("{NS}/{DATA}"),
        "the receive did not stamp its claim: {own:?}"
    );
    b.zfs(&["set", "ployz:claim=victim/data", ds])?;
    b.zfs(&["snapshot", &format!("{ds}@victim")])?;
    let before = guids(b, ds)?;
    let a = env.machine("machine-a")?;
    write_data(a, "/tank/ployz/xfer-data", "echo s7 > s7")?;
    a.zfs(&["snapshot", &format!("{ds}@s7")])?;
    let r = send(env, &job("m-data", DATA, "xfer-data", "s7")?)?;
    ensure!(
        refused(&r) == Some(RefusalReason::NotThisVolume),
        "expected NotThisVolume, got {r:?}"
    );
    let message = r.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        message.contains("holds the volume of claim victim/data, not of claim xfer/data"),
        "{message}"
    );
    let ag = agents(env)?;
    let promoted = env.block_on(ag.receiver.server.change_role(
        &ds.parse()?,
        Action::Promote,
        &format!("{NS}/{DATA}"),
    ));
    ensure!(
        promoted
            .as_ref()
            .is_err_and(|e| e.to_string().contains("victim/data")),
        "promoted another claim's replica: {promoted:?}"
    );
    let b = env.machine("machine-b")?;
    ensure!(guids(b, ds)? == before, "the replica changed");
    ensure!(
        b.zfs(&["get", "-H", "-o", "value", "readonly,ployz:replica", ds])? == "on\ntrue\n",
        "the replica's role changed"
    );
    // Back to the suite's state: machine-b's replica of xfer/data at s6.
    b.zfs(&["destroy", &format!("{ds}@victim")])?;
    b.zfs(&["set", &format!("ployz:claim={NS}/{DATA}"), ds])
        .map(drop)
}

fn no_common_snapshot(env: &mut Env) -> Result<()> {
    let (a, b) = (env.machine("machine-a")?, env.machine("machine-b")?);
    a.create_dataset("tank/ployz/xfer-other")?;
    a.zfs(&["snapshot", "tank/ployz/xfer-other@s1"])?;
    let mp = b.create_dataset("tank/ployz/xfer-other")?;
    b.sh(&format!("echo theirs > {mp}/theirs"))?;
    b.zfs(&["snapshot", "tank/ployz/xfer-other@theirs"])?;
    migration(
        env,
        "m-other",
        "other",
        "xfer-other",
        "tank/ployz/xfer-other",
    )?;
    let r = send(env, &job("m-other", "other", "xfer-other", "s1")?)?;
    ensure!(
        matches!(
            &r,
            Err(TransferError::Base {
                source: BaseError::NoCommonSnapshot,
                ..
            })
        ),
        "expected NoCommonSnapshot, got {r:?}"
    );
    let b = env.machine("machine-b")?;
    ensure!(
        b.sh(&format!("cat {mp}/theirs"))? == "theirs\n",
        "the target's data is gone"
    );
    Ok(())
}

fn pool_too_small(env: &mut Env) -> Result<()> {
    let b = env.machine("machine-b")?;
    let file = b.pool_file.with_file_name("small.img");
    std::fs::File::create(&file)?.set_len(64 << 20)?;
    b.zpool(&["create", "-m", "none", "small", &file.to_string_lossy()])?;
    let ag = agents(env)?;
    let small = start_receiver(
        env,
        env.client.clone(),
        env.machine("machine-b")?,
        &keys()?.1,
        "small/ployz",
        PORT + 1,
        NO_PROGRESS,
    )?;
    let a = env.machine("machine-a")?;
    let mp = a.create_dataset("tank/ployz/xfer-big")?;
    write_data(a, &mp, "head -c 134217728 /dev/urandom > big")?;
    a.zfs(&["snapshot", "tank/ployz/xfer-big@s1"])?;
    migration(env, "m-big", "big", "xfer-big", "small/ployz/xfer-big")?;
    let r = send_as(
        env,
        &ag.a,
        small.addr,
        &job("m-big", "big", "xfer-big", "s1")?,
    )?;
    let outcome = match &r {
        Err(
            e @ TransferError::Remote {
                reason: ReceiveFailure::OutOfSpace,
                ..
            },
        ) => {
            ensure!(e.to_string().contains("free space on the target"), "{e}");
            Ok(())
        }
        other => Err(anyhow::anyhow!("expected OutOfSpace, got {other:?}")),
    };
    let b = env.machine("machine-b")?;
    let left = b.zfs(&["list", "-H", "-r", "-o", "name", "small"])?;
    drop(small);
    let _ = b.zpool(&["destroy", "-f", "small"]);
    let _ = std::fs::remove_file(&file);
    outcome?;
    ensure!(
        !left.contains("xfer-big"),
        "a partial dataset was left: {left}"
    );
    Ok(())
}

/// A rate-limited send of 64 MiB from `tank/ployz/xfer-NAME`, interrupted by `interrupt` once
/// a good part is on the wire: the attempt must fail retryably. Then `recover` (which may
/// return something to keep alive, such as a restarted receiver) runs, and a retry must
/// deliver the data intact.
fn interrupted_then_retried<G>(
    env: &Env,
    name: &str,
    addr: std::net::SocketAddr,
    interrupt: impl FnOnce(&Env) -> Result<()>,
    recover: impl FnOnce(&Env) -> Result<G>,
) -> Result<()> {
    let (volume, migration_name) = (format!("xfer-{name}"), format!("m-{name}"));
    let dataset = format!("tank/ployz/{volume}");
    let a = env.machine("machine-a")?;
    let mp = a.create_dataset(&dataset)?;
    write_data(a, &mp, "head -c 67108864 /dev/urandom > big")?;
    a.zfs(&["snapshot", &format!("{dataset}@s1")])?;
    migration(env, &migration_name, name, &volume, &dataset)?;
    let mut j = job(&migration_name, name, &volume, "s1")?;
    j.rate_limit = Some(16 << 20);

    let ag = agents(env)?;
    let s = sender(env, a, &ag.a)?;
    let net = a.net.clone();
    let progress = std::sync::Arc::new(Progress::default());
    let p = std::sync::Arc::clone(&progress);
    let j2 = j.clone();
    let first = env.rt.spawn(async move {
        let tcp = connect_from(net, addr).await?;
        anyhow::Ok(s.send(tcp, &j2, &p).await)
    });
    ployz_e2e::wait::wait_for("24 MiB on the wire", Duration::from_secs(30), || {
        Ok(progress.wire() > 24 << 20)
    })?;
    interrupt(env)?;
    let result = env.block_on(first).context("first attempt panicked")?;
    let _guard = recover(env)?;
    match result? {
        Err(e) if e.is_retryable() => {}
        other => bail!("an interrupted send should fail retryably, got {other:?}"),
    }

    let s = sender(env, env.machine("machine-a")?, &ag.a)?;
    let net = env.machine("machine-a")?.net.clone();
    let pin = b_pin()?;
    let report = env.block_on(s.send_with_retry(
        || {
            let (net, pin) = (net.clone(), pin.clone());
            async move { Ok((connect_from(net, addr).await?, pin)) }
        },
        &j,
        &Progress::default(),
        5,
    ))?;
    ensure!(
        matches!(report, SendReport::Sent { base: None, .. }),
        "{report:?}"
    );
    let (a, b) = (env.machine("machine-a")?, env.machine("machine-b")?);
    ensure!(
        target_checksums(b, &dataset)? == a.checksums(&mp)?,
        "checksums differ after the retry"
    );
    Ok(())
}

fn cut_link_then_retry(env: &mut Env) -> Result<()> {
    let addr = agents(env)?.receiver.addr;
    interrupted_then_retried(
        env,
        "cut",
        addr,
        |_| run(&mut command("ip", ["link", "set", "pzv-machine-b", "down"])).map(drop),
        |env| {
            run(&mut command("ip", ["link", "set", "pzv-machine-b", "up"]))?;
            let b = env.machine("machine-b")?;
            let left = b.zfs(&["list", "-H", "-r", "-o", "name", "tank/ployz"])?;
            ensure!(
                !left.contains("xfer-cut"),
                "a half-received dataset blocks the retry: {left}"
            );
            Ok(())
        },
    )
}

fn receiver_killed_then_retry(env: &mut Env) -> Result<()> {
    agents(env)?;
    // A receiver of its own on another port, so the suite's shared one keeps running.
    let port = PORT + 2;
    let start = |env: &Env| {
        let b = env.machine("machine-b")?;
        start_receiver(
            env,
            env.client.clone(),
            b,
            &keys()?.1,
            "tank/ployz",
            port,
            NO_PROGRESS,
        )
    };
    let receiver = start(env)?;
    let addr = receiver.addr;
    interrupted_then_retried(
        env,
        "kill",
        addr,
        // The agent dies: its server and every connection it serves stop at once.
        |env| {
            receiver.stop(env);
            Ok(())
        },
        // It comes back at once, while ZFS may still be failing the interrupted receive.
        start,
    )
}

/// After an interrupted full receive, ZFS removes the empty target a moment later. A retry that
/// arrives in between must wait for that instead of refusing an "existing" target.
fn interrupted_leftover_waited_for(env: &mut Env) -> Result<()> {
    let a = env.machine("machine-a")?;
    let mp = a.create_dataset("tank/ployz/xfer-settle")?;
    write_data(a, &mp, "echo settled > f")?;
    a.zfs(&["snapshot", "tank/ployz/xfer-settle@s1"])?;
    migration(
        env,
        "m-settle",
        "settle",
        "xfer-settle",
        "tank/ployz/xfer-settle",
    )?;
    // The leftover, and the cleanup that ZFS would do about a second later.
    let b = env.machine("machine-b")?;
    // Unmounted, as a receive (-u) leaves it.
    b.zfs(&["create", "-o", "mountpoint=none", "tank/ployz/xfer-settle"])?;
    let mut destroy = b.command("/sbin/zfs");
    destroy.args(["destroy", "tank/ployz/xfer-settle"]);
    let cleanup = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        run(&mut destroy)
    });
    let r = send(env, &job("m-settle", "settle", "xfer-settle", "s1")?)?;
    cleanup
        .join()
        .map_err(|_| anyhow::anyhow!("cleanup panicked"))??;
    ensure!(
        matches!(r, Ok(SendReport::Sent { base: None, .. })),
        "{r:?}"
    );
    let (a, b) = (env.machine("machine-a")?, env.machine("machine-b")?);
    ensure!(
        target_checksums(b, "tank/ployz/xfer-settle")? == a.checksums(&mp)?,
        "checksums differ"
    );
    Ok(())
}

fn stranger_refused(env: &mut Env) -> Result<()> {
    let ag = agents(env)?;
    let before = ag.receiver.server.received_bytes.load(Ordering::Relaxed);
    // A key of its own, claiming to be machine-a (which publishes another key), and one
    // claiming a machine that does not exist: both pass the TLS handshake (they hold their
    // keys) and are refused before the receiver reads their Hello.
    for (claimed, why) in [
        ("machine-a", "is not the key Machine machine-a publishes"),
        ("machine-z", "no Machine machine-z exists"),
    ] {
        let stranger = identity(claimed)?;
        let r = send_as(
            env,
            &stranger,
            ag.receiver.addr,
            &job("m-data", DATA, "xfer-data", "s6")?,
        )?;
        ensure!(
            refused(&r) == Some(RefusalReason::UnknownPeer),
            "a stranger claiming {claimed} got in: {r:?}"
        );
        let message = r.err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(message.contains(why), "unclear refusal: {message}");
    }
    ensure!(
        ag.receiver.server.received_bytes.load(Ordering::Relaxed) == before,
        "bytes were received from a stranger"
    );
    // And a sender that dials a receiver holding another key than machine-b publishes
    // stops at the handshake.
    let impostor = start_receiver(
        env,
        env.client.clone(),
        env.machine("machine-b")?,
        &identity("machine-b")?,
        "tank/ployz",
        PORT + 7,
        NO_PROGRESS,
    )?;
    let r = send_as(
        env,
        &ag.a,
        impostor.addr,
        &job("m-data", DATA, "xfer-data", "s6")?,
    )?;
    impostor.stop(env);
    ensure!(
        matches!(&r, Err(TransferError::Tls { .. })),
        "a receiver with another key was trusted: {r:?}"
    );
    Ok(())
}

fn refused(r: &Result<SendReport, TransferError>) -> Option<RefusalReason> {
    match r {
        Err(TransferError::Refused { reason, .. }) => Some(*reason),
        _ => None,
    }
}

fn no_migration_refused(env: &mut Env) -> Result<()> {
    let r = send(env, &job("no-such-migration", DATA, "xfer-data", "s6")?)?;
    ensure!(
        refused(&r) == Some(RefusalReason::UnknownMigration),
        "{r:?}"
    );
    ensure!(
        r.err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("no Migration xfer/no-such-migration exists")
    );
    Ok(())
}

fn outside_parent_refused(env: &mut Env) -> Result<()> {
    let a = env.machine("machine-a")?;
    a.create_dataset("tank/ployz/xfer-evil")?;
    a.zfs(&["snapshot", "tank/ployz/xfer-evil@s1"])?;
    for (name, target) in [
        ("m-evil-1", "tank/elsewhere/xfer-evil"),
        ("m-evil-2", "tank/ployz/xfer-evil/../../x"),
    ] {
        migration(env, name, "evil", "xfer-evil", target)?;
        let r = send(env, &job(name, "evil", "xfer-evil", "s1")?)?;
        ensure!(
            refused(&r) == Some(RefusalReason::OutsideParent),
            "{target}: {r:?}"
        );
    }
    let b = env.machine("machine-b")?;
    let all = b.zfs(&["list", "-H", "-r", "-o", "name", "tank"])?;
    ensure!(
        !all.contains("elsewhere") && !all.contains("xfer-evil"),
        "something was written: {all}"
    );
    Ok(())
}

/// A plan (status, which the source's agent writes) that maps its claim `thief` to
/// `xfer-data`, the PV bound to another claim and replicated on machine-b: the receiver checks
/// the binding live and refuses before anything reaches `zfs receive`; the replica keeps its
/// snapshots.
fn foreign_volume_refused(env: &mut Env) -> Result<()> {
    let b = env.machine("machine-b")?;
    let snapshots = |b: &ZfsMachine| {
        b.zfs(&[
            "list",
            "-H",
            "-t",
            "snapshot",
            "-o",
            "name,guid",
            "-r",
            "tank/ployz/xfer-data",
        ])
    };
    let before = snapshots(b)?;
    ensure!(
        !before.trim().is_empty(),
        "no replica of xfer-data on machine-b"
    );
    migration(env, "m-thief", "thief", "xfer-data", "tank/ployz/xfer-data")?;
    let r = send(env, &job("m-thief", "thief", "xfer-data", "s6")?)?;
    ensure!(refused(&r) == Some(RefusalReason::UnknownVolume), "{r:?}");
    let message = r.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        message.contains(&format!("bound to claim {NS}/{DATA}")),
        "{message}"
    );
    eprintln!("    {message}");
    ensure!(snapshots(b)? == before, "the replica of xfer-data changed");
    Ok(())
}

fn wrong_peer_refused(env: &mut Env) -> Result<()> {
    let ag = agents(env)?;
    // machine-b's own (valid) certificate, used from machine-a: the plan's source is machine-a.
    let r = send_as(
        env,
        &keys()?.1,
        ag.receiver.addr,
        &job("m-data", DATA, "xfer-data", "s6")?,
    )?;
    ensure!(refused(&r) == Some(RefusalReason::WrongPeer), "{r:?}");
    Ok(())
}

/// Idle TCP connections from the real sender's own address, the hardest place for them: the
/// receiver must not refuse the real sender, nor keep every idle socket open.
fn idle_connections(env: &mut Env) -> Result<()> {
    const IDLE: usize = 500;
    let ag = agents(env)?;
    let a = env.machine("machine-a")?;
    let mp = a.create_dataset("tank/ployz/xfer-idle")?;
    write_data(a, &mp, "head -c 1048576 /dev/urandom > f")?;
    a.zfs(&["snapshot", "tank/ployz/xfer-idle@s1"])?;
    migration(env, "m-idle", "idle", "xfer-idle", "tank/ployz/xfer-idle")?;
    let net = a.net.clone();
    let addr = ag.receiver.addr;
    let idle = env.block_on(async {
        let mut idle = Vec::with_capacity(IDLE);
        for _ in 0..IDLE {
            idle.push(connect_from(net.clone(), addr).await?);
        }
        anyhow::Ok(idle)
    })?;
    let limits = ployz::transfer::gate::Limits::default();
    let pending = ag.receiver.server.pending_connections();
    ensure!(
        pending <= limits.pending_per_address,
        "{pending} idle connections held open by the receiver"
    );

    let r = send(env, &job("m-idle", "idle", "xfer-idle", "s1")?)?;
    ensure!(
        matches!(r, Ok(SendReport::Sent { .. })),
        "the send beside {IDLE} idle connections: {r:?}"
    );
    let (a, b) = (env.machine("machine-a")?, env.machine("machine-b")?);
    ensure!(
        target_checksums(b, "tank/ployz/xfer-idle")? == a.checksums(&mp)?,
        "checksums differ"
    );
    // The receiver closed the idle connections it pushed out: they read end-of-stream.
    let closed = env.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut closed = 0;
            for c in &idle {
                let mut byte = [0u8; 1];
                match c.try_read(&mut byte) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(0) | Err(_) => closed += 1,
                    Ok(_) => {}
                }
            }
            if closed >= IDLE - limits.pending_per_address || tokio::time::Instant::now() > deadline
            {
                return closed;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    ensure!(
        closed >= IDLE - limits.pending_per_address,
        "only {closed} of {IDLE} idle connections were closed by the receiver"
    );
    drop(idle);
    Ok(())
}

/// Opens a session as `identity` and says `Hello` for `claim` of `migration`; the reply.
async fn hello_raw(
    net: ployz_e2e::network::MachineNet,
    identity: &Identity,
    addr: std::net::SocketAddr,
    migration: &str,
    claim: &str,
) -> Result<(
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    HelloReply,
)> {
    let tcp = connect_from(net, addr).await?;
    let connector = tokio_rustls::TlsConnector::from(identity.client_config(&b_pin()?)?);
    let mut conn = connector
        .connect(ployz::transfer::tls::server_name("machine-b")?, tcp)
        .await?;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        migration: MigrationKey {
            namespace: NS.into(),
            name: migration.into(),
        },
        claim: claim.into(),
        action: Action::Receive,
    };
    write_frame(&mut conn, &hello).await?;
    let reply = read_frame(&mut conn).await?;
    Ok((conn, reply))
}

/// A sender that was let in and then goes silent, before its offer and in the middle of its
/// stream: the receiver drops it within its read timeout and the next sender gets in.
fn stalled_sender(env: &mut Env) -> Result<()> {
    let ag = agents(env)?;
    let a = env.machine("machine-a")?;
    let mp = a.create_dataset("tank/ployz/xfer-stall")?;
    write_data(a, &mp, "head -c 1048576 /dev/urandom > f")?;
    a.zfs(&["snapshot", "tank/ployz/xfer-stall@s1"])?;
    migration(
        env,
        "m-stall",
        "stall",
        "xfer-stall",
        "tank/ployz/xfer-stall",
    )?;
    let net = a.net.clone();
    let addr = ag.receiver.addr;

    for stage in ["before its offer", "mid-stream"] {
        let (mut silent, reply) =
            env.block_on(hello_raw(net.clone(), &ag.a, addr, "m-stall", "stall"))?;
        ensure!(
            matches!(reply, HelloReply::Accepted(_)),
            "{stage}: not let in: {reply:?}"
        );
        if stage == "mid-stream" {
            env.block_on(async {
                write_frame(
                    &mut silent,
                    &Offer::Stream {
                        to: "s1".into(),
                        base: None,
                        base_guid: None,
                        resumed: false,
                        compression: WireCompression::None,
                        more: false,
                    },
                )
                .await?;
                // A chunk announced as 64 KiB, of which only a few bytes ever come.
                silent.write_all(&(64u32 << 10).to_be_bytes()).await?;
                silent.write_all(b"partial").await?;
                silent.flush().await?;
                anyhow::Ok(())
            })?;
        }
        let started = std::time::Instant::now();
        // While the silent sender holds the dataset, another is refused (the test's premise).
        let blocked = send(env, &job("m-stall", "stall", "xfer-stall", "s1")?)?;
        ensure!(
            refused(&blocked) == Some(RefusalReason::Internal)
                && blocked
                    .as_ref()
                    .err()
                    .is_some_and(|e| e.to_string().contains("already in progress")),
            "{stage}: a second sender was not held off: {blocked:?}"
        );
        let deadline = NO_PROGRESS * 4;
        let r = loop {
            let r = send(env, &job("m-stall", "stall", "xfer-stall", "s1")?)?;
            if refused(&r) != Some(RefusalReason::Internal) || started.elapsed() > deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        ensure!(
            matches!(r, Ok(SendReport::Sent { .. } | SendReport::UpToDate)),
            "{stage}: the dataset was still held {:?} after the sender went silent: {r:?}",
            started.elapsed()
        );
        // The receiver closed the silent connection (after saying why, mid-stream).
        let mut said = vec![];
        let closed = env.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut said)).await
        });
        ensure!(
            matches!(closed, Ok(Ok(_) | Err(_))),
            "{stage}: the silent connection is still open"
        );
    }
    let (a, b) = (env.machine("machine-a")?, env.machine("machine-b")?);
    ensure!(
        target_checksums(b, "tank/ployz/xfer-stall")? == a.checksums(&mp)?,
        "checksums differ"
    );
    Ok(())
}

/// A sender whose `zfs send` adds `flag` (`-p`, `-R`): what a compromised source agent could
/// send. A script in this run's scratch directory, run inside machine-a's namespaces.
fn crafting_sender(env: &Env, identity: &Identity, flag: &str) -> Result<Sender<ZfsCli>> {
    let a = env.machine("machine-a")?;
    let script = env.state.join(format!("zfs-send{flag}"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = send ]; then shift; exec /sbin/zfs send {flag} \"$@\"; fi\nexec /sbin/zfs \"$@\"\n"
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let crafted = ployz_e2e::agents::machine_program(a, &script);
    let info = env.block_on(crafted.info())?;
    Ok(Sender::new(
        std::sync::Arc::new(crafted),
        info,
        identity.clone(),
    ))
}

/// What a compromised source agent could send: a stream carrying properties (`send -p`: a
/// mountpoint outside the pool, setuid) and one carrying a child dataset (`send -R`). Both
/// are compound streams, which zfs-fuse could not receive without their properties; the
/// receiver refuses them before `zfs receive` sees a byte, so nothing lands at all.
fn crafted_compound_streams_are_refused_before_zfs_receive(env: &mut Env) -> Result<()> {
    let ag = agents(env)?;
    let elsewhere = env.state.join("mounted-by-the-stream");
    std::fs::create_dir_all(&elsewhere)?;
    let elsewhere = elsewhere.display().to_string();
    for flag in ["-p", "-R"] {
        let name = format!(
            "xfer-crafted-{}",
            flag.trim_start_matches('-').to_lowercase()
        );
        let dataset = format!("tank/ployz/{name}");
        let a = env.machine("machine-a")?;
        // Never mounted on machine-a (canmount=noauto): only the stream is to carry it.
        a.zfs(&[
            "create",
            "-p",
            "-o",
            "canmount=noauto",
            "-o",
            &format!("mountpoint={elsewhere}"),
            "-o",
            "setuid=on",
            &dataset,
        ])?;
        a.zfs(&[
            "create",
            "-o",
            "mountpoint=none",
            &format!("{dataset}/child"),
        ])?;
        a.zfs(&["snapshot", "-r", &format!("{dataset}@s1")])?;
        let m = format!("m-{name}");
        migration(env, &m, &name, &name, &dataset)?;
        let s = crafting_sender(env, &ag.a, flag)?;
        let net = env.machine("machine-a")?.net.clone();
        let addr = ag.receiver.addr;
        let job = job(&m, &name, &name, "s1")?;
        let r = env.block_on(async {
            let tcp = connect_from(net, addr).await?;
            anyhow::Ok(s.send(tcp, &job, &Progress::default()).await)
        })?;
        match &r {
            Err(
                e @ TransferError::Remote {
                    reason: ReceiveFailure::Other,
                    ..
                },
            ) => ensure!(
                e.to_string().contains("compound stream"),
                "send {flag}: {e}"
            ),
            other => bail!("send {flag}: expected the compound stream refused, got {other:?}"),
        }
        let b = env.machine("machine-b")?;
        ensure!(
            b.zfs(&["list", "-H", "-o", "name", "-r", &dataset])
                .is_err(),
            "send {flag}: the crafted stream left {dataset} on machine-b"
        );
        let mounts = b.sh("cat /proc/mounts")?;
        ensure!(
            !mounts.contains(&elsewhere),
            "send {flag}: mounted where the stream said: {mounts}"
        );
    }
    Ok(())
}

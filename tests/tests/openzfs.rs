//! OpenZFS conformance: the project's own ZFS layer and transfer engine against real OpenZFS
//! 2.3, in a QEMU guest (tests/vm). On the host this binary boots the guest and runs itself
//! inside it (`PLOYZ_IN_GUEST=1`), where two file-backed pools, `src` and `dst`, stand for two
//! machines and the engine streams between them over TLS on the loopback.

use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use libtest_mimic::{Arguments, Failed, Trial};
use ployz::api::ZfsImplementation;
use ployz::transfer::Progress;
use ployz::transfer::authz::{Authorizer, Grant, Refusal};
use ployz::transfer::client::{SendJob, SendReport, Sender, TransferError};
use ployz::transfer::gate::Limits;
use ployz::transfer::protocol::{Hello, MigrationKey, WireCompression};
use ployz::transfer::server::{Server, ServerConfig};
use ployz::transfer::tls::Pin;
use ployz::zfs::base::BaseError;
use ployz::zfs::{DatasetName, ReceiveArgs, SendArgs, Zfs, ZfsCli};
use ployz_e2e::agents::identity;
use ployz_e2e::process::run;
use ployz_e2e::wait::wait_for;

type Test = fn(&Guest) -> Result<()>;

const TESTS: &[(&str, Test)] = &[
    ("capabilities_are_detected_as_openzfs_2_3", capabilities),
    ("inventory_is_exact", inventory_exact),
    ("size_estimates_feed_the_plan", estimates),
    ("bookmark_serves_as_incremental_base", bookmark_base),
    (
        "cut_transfer_resumes_from_the_token_then_sends_later_snapshots",
        resume_after_cut,
    ),
    ("compressed_send_keeps_blocks_compressed", compressed_send),
    ("encrypted_dataset_is_sent_raw_without_the_key", raw_send),
    (
        "resume_token_of_a_plaintext_send_of_an_encrypted_dataset_is_refused",
        plaintext_token_refused,
    ),
    (
        "crafted_stream_with_mountpoint_etc_lands_below_the_pool",
        crafted_stream_lands_below_the_pool,
    ),
    ("holds_protect_the_base", holds),
    ("diverged_target_is_refused_and_kept", diverged),
];

fn main() -> ExitCode {
    if std::env::var_os("PLOYZ_IN_GUEST").is_some() {
        return in_guest();
    }
    match on_host() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            println!("test result: FAILED. 0 passed; {} failed", TESTS.len());
            ExitCode::FAILURE
        }
    }
}

/// Boots the guest and runs this same binary in it, with the same arguments.
fn on_host() -> Result<ExitCode> {
    let args = Arguments::from_args();
    if args.list {
        let trials = TESTS
            .iter()
            .map(|(n, _)| Trial::test(*n, || Ok(())))
            .collect();
        return Ok(libtest_mimic::run(&args, trials).exit_code());
    }
    let root = ployz_e2e::env::repo_root()?;
    let run_dir = ployz_e2e::env::run_dir();
    let _lock = ployz_e2e::reaper::begin(&run_dir)?;
    let image = ployz_e2e::vm::image(&root)?;
    eprintln!("[harness] booting the OpenZFS guest ({})", image.display());
    let forwarded: Vec<String> = std::env::args().skip(1).collect();
    let forwarded: Vec<&str> = forwarded.iter().map(String::as_str).collect();
    let outcome = ployz_e2e::vm::run_in_guest(
        &image,
        &run_dir.join("openzfs-vm"),
        &std::env::current_exe()?,
        &forwarded,
        &[("PLOYZ_IN_GUEST", "1"), ("PLOYZ_LOG", "error")],
        Duration::from_secs(1200),
    );
    ployz_e2e::reaper::release_all();
    let outcome = outcome?;
    print!("{}", outcome.output);
    Ok(if outcome.code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn in_guest() -> ExitCode {
    ployz_e2e::suite::init_logging();
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let guest = match Guest::start() {
        Ok(g) => Arc::new(g),
        Err(e) => {
            eprintln!("error: setting up the pools: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let trials = TESTS
        .iter()
        .map(|&(name, test)| {
            let guest = Arc::clone(&guest);
            Trial::test(name, move || {
                test(&guest).map_err(|e| Failed::from(format!("{e:#}")))
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// Lets in the one sender whose key it pins, and grants every claim a dataset of the same
/// name under the receiver's parent (the Kubernetes side of authorization is proven by the
/// other suites).
struct AllowAll(DatasetName, Pin);

impl Authorizer for AllowAll {
    async fn authenticate(&self, peer: &str, pin: &Pin) -> Result<(), Refusal> {
        if *pin == self.1 {
            return Ok(());
        }
        Err(Refusal {
            reason: ployz::transfer::protocol::RefusalReason::UnknownPeer,
            message: format!("{peer} holds another key"),
        })
    }

    async fn authorize(&self, _peer: &str, hello: &Hello) -> Result<Grant, Refusal> {
        Ok(Grant {
            dataset: self.0.child(&hello.claim).map_err(|e| Refusal {
                reason: ployz::transfer::protocol::RefusalReason::OutsideParent,
                message: e.to_string(),
            })?,
            claim: ployz::zfs::claim_owner(&hello.migration.namespace, &hello.claim),
        })
    }
}

/// The guest's two pools, a receiver for `dst/ployz` and a sender.
struct Guest {
    rt: tokio::runtime::Runtime,
    zfs: Arc<ZfsCli>,
    sender: Sender<ZfsCli>,
    /// A sender whose `zfs send` adds `-p`: a stream carrying the source's properties.
    crafting: Sender<ZfsCli>,
    addr: SocketAddr,
    /// The receiver's key, which the senders pin.
    pin: Pin,
    server: Arc<Server<ZfsCli, AllowAll>>,
    _serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

fn sh(script: &str) -> Result<String> {
    run(Command::new("sh").args(["-c", script])).with_context(|| script.to_string())
}

fn ds(name: &str) -> Result<DatasetName> {
    Ok(name.parse()?)
}

impl Guest {
    fn start() -> Result<Self> {
        sh("truncate -s 256M /tmp/src.img /tmp/dst.img \
            && zpool create -f -O compression=off -O atime=off src /tmp/src.img \
            && zpool create -f -O compression=off -O atime=off dst /tmp/dst.img \
            && zfs create dst/ployz")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let zfs = Arc::new(ZfsCli::new("zfs"));
        let info = rt.block_on(zfs.info())?;
        let (src, dst) = (identity("src")?, identity("dst")?);
        let parent = ds("dst/ployz")?;
        let server = Arc::new(Server::new(
            Arc::clone(&zfs),
            info.clone(),
            Arc::new(AllowAll(parent.clone(), src.pin().clone())),
            dst.server_config()?,
            ServerConfig {
                parent,
                limits: Limits {
                    frame: Duration::from_secs(20),
                    ..Limits::default()
                },
            },
        ));
        let (addr, serving) = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            anyhow::Ok((addr, tokio::spawn(Arc::clone(&server).serve(l))))
        })?;
        let sender = Sender::new(Arc::clone(&zfs), info.clone(), src.clone());
        sh(
            "printf '#!/bin/sh\\nif [ \"$1\" = send ]; then shift; exec zfs send -p \"$@\"; fi\\nexec zfs \"$@\"\\n' > /tmp/zfs-send-p && chmod +x /tmp/zfs-send-p",
        )?;
        let crafting = Sender::new(Arc::new(ZfsCli::new("/tmp/zfs-send-p")), info, src);
        Ok(Self {
            rt,
            zfs,
            sender,
            crafting,
            addr,
            pin: dst.pin().clone(),
            server,
            _serving: serving,
        })
    }

    fn job(&self, name: &str, to: &str) -> Result<SendJob> {
        Ok(SendJob {
            migration: MigrationKey {
                namespace: "conformance".into(),
                name: name.into(),
            },
            claim: name.into(),
            target_machine: "dst".into(),
            target_pin: Some(self.pin.clone()),
            dataset: ds(&format!("src/{name}"))?,
            to: to.into(),
            compression: WireCompression::None,
            rate_limit: None,
            no_progress: Duration::from_secs(20),
        })
    }

    fn send(&self, job: &SendJob, progress: &Progress) -> Result<SendReport, TransferError> {
        self.rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|source| TransferError::Connect {
                    machine: "dst".into(),
                    source,
                })?;
            self.sender.send(tcp, job, progress).await
        })
    }

    /// A dataset `src/NAME` with `mib` MiB of random data and snapshot `s1`.
    fn dataset(&self, name: &str, mib: u32, props: &str) -> Result<()> {
        sh(&format!(
            "zfs create {props} src/{name} && head -c {}M /dev/urandom > /src/{name}/data && zfs snapshot src/{name}@s1",
            mib
        ))?;
        Ok(())
    }
}

fn guid(name: &str) -> Result<u64> {
    Ok(sh(&format!("zfs get -H -p -o value guid {name}"))?
        .trim()
        .parse()?)
}

fn checksums(dir: &str) -> Result<String> {
    sh(&format!(
        "cd {dir} && find . -type f | sort | xargs sha256sum"
    ))
}

fn sent(r: Result<SendReport, TransferError>) -> Result<(Option<String>, bool, u64)> {
    match r? {
        SendReport::Sent {
            base,
            resumed,
            stream_bytes,
            ..
        } => Ok((base, resumed, stream_bytes)),
        SendReport::UpToDate => bail!("nothing was sent"),
    }
}

fn capabilities(g: &Guest) -> Result<()> {
    let info = g.rt.block_on(g.zfs.info())?;
    ensure!(
        info.implementation == ZfsImplementation::OpenZfs,
        "{info:?}"
    );
    ensure!(
        info.version
            .as_deref()
            .is_some_and(|v| v.starts_with("2.3")),
        "version {:?}",
        info.version
    );
    let c = info.capabilities;
    ensure!(
        c.resume_tokens && c.size_estimates && c.compressed_send && c.raw_send && c.bookmarks,
        "{c:?}"
    );
    Ok(())
}

fn inventory_exact(g: &Guest) -> Result<()> {
    g.dataset("inv", 1, "")?;
    sh("zfs snapshot src/inv@s2 && zfs bookmark src/inv@s1 src/inv#b1")?;
    let info = g.rt.block_on(g.zfs.info())?;
    let inv = g.rt.block_on(g.zfs.inventory(&ds("src/inv")?, &info))?;
    let d = inv
        .datasets
        .get(&ds("src/inv")?)
        .context("src/inv missing")?;
    ensure!(d.guid == guid("src/inv")?);
    let names: Vec<&str> = d.snapshots.iter().map(|s| s.name.short()).collect();
    ensure!(names == ["s1", "s2"], "{names:?}");
    for s in &d.snapshots {
        let full = format!("src/inv@{}", s.name.short());
        ensure!(s.guid == guid(&full)?, "guid of {full}");
        let txg: u64 = sh(&format!("zfs get -H -p -o value createtxg {full}"))?
            .trim()
            .parse()?;
        ensure!(s.createtxg == txg, "createtxg of {full}");
    }
    ensure!(d.bookmarks.len() == 1, "{:?}", d.bookmarks);
    ensure!(
        d.bookmarks[0].guid == guid("src/inv@s1")?,
        "a bookmark has its snapshot's GUID"
    );
    ensure!(!d.encrypted && d.resume_token.is_none());
    Ok(())
}

fn estimates(g: &Guest) -> Result<()> {
    g.dataset("est", 8, "")?;
    let info = g.rt.block_on(g.zfs.info())?;
    // The arguments the engine uses between two OpenZFS machines: a full, compressed send.
    let mut args = SendArgs::new(ds("src/est")?.snapshot("s1")?);
    args.compressed = true;
    let estimate =
        g.rt.block_on(g.zfs.estimate(&args, &info))?
            .context("no estimate from send -nvP")?;
    let progress = Progress::default();
    let (_, _, bytes) = sent(g.send(&g.job("est", "s1")?, &progress))?;
    ensure!(
        progress.estimate() == Some(estimate),
        "progress used {:?}, not the -nvP estimate {estimate}",
        progress.estimate()
    );
    let ratio = bytes as f64 / estimate as f64;
    ensure!(
        (0.9..1.1).contains(&ratio),
        "estimate {estimate} vs {bytes} sent"
    );
    Ok(())
}

fn bookmark_base(g: &Guest) -> Result<()> {
    g.dataset("bm", 4, "")?;
    sent(g.send(&g.job("bm", "s1")?, &Progress::default()))?;
    // Keep only a bookmark of the common snapshot on the source.
    sh("zfs bookmark src/bm@s1 src/bm#s1 && zfs destroy src/bm@s1 \
        && head -c 1M /dev/urandom > /src/bm/more && zfs snapshot src/bm@s2")?;
    let (base, _, bytes) = sent(g.send(&g.job("bm", "s2")?, &Progress::default()))?;
    ensure!(base.as_deref() == Some("s1"), "base {base:?}");
    ensure!(
        bytes < 2 << 20,
        "an incremental of 1 MiB sent {bytes} bytes"
    );
    ensure!(guid("dst/ployz/bm@s2")? == guid("src/bm@s2")?);
    Ok(())
}

fn resume_after_cut(g: &Guest) -> Result<()> {
    g.dataset("cut", 24, "")?;
    let mut job = g.job("cut", "s1")?;
    job.rate_limit = Some(6 << 20);
    let progress = Arc::new(Progress::default());
    // Cut the link once a third is across: the task (and its connection) is dropped.
    let cut = g.rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(g.addr).await?;
        let send = g.sender.send(tcp, &job, &progress);
        tokio::pin!(send);
        loop {
            tokio::select! {
                r = &mut send => return anyhow::Ok(Some(r)),
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if progress.wire() > 12 << 20 { return Ok(None); }
                }
            }
        }
    })?;
    ensure!(cut.is_none(), "the send finished before the cut: {cut:?}");
    let before_cut = progress.stream();
    // The receiver keeps the partial state and a token.
    let mut token = String::new();
    wait_for(
        "receive_resume_token after the cut",
        Duration::from_secs(20),
        || {
            token = sh("zfs get -H -o value receive_resume_token dst/ployz/cut")?
                .trim()
                .to_string();
            Ok(!token.is_empty() && token != "-")
        },
    )?;
    ensure!(token.len() > 10);
    // The sender decodes the receiver's token before it trusts it.
    let decoded = g.rt.block_on(g.zfs.resume_token(&token))?;
    ensure!(
        decoded.to.to_string() == "src/cut@s1"
            && decoded.to_guid == guid("src/cut@s1")?
            && !decoded.raw,
        "the token decodes as {decoded:?}"
    );
    job.rate_limit = None;
    // Two more snapshots meanwhile: the retry resumes s1's stream, then sends s2 and s3 one
    // stream each on the same connection.
    sh(
        "head -c 256K /dev/urandom > /src/cut/more2 && zfs snapshot src/cut@s2 \
        && head -c 256K /dev/urandom > /src/cut/more3 && zfs snapshot src/cut@s3",
    )?;
    job.to = "s3".into();
    let again = Progress::default();
    // As the agent does: the receiver may still be closing the cut receive, so retry.
    let retried = g.rt.block_on(g.sender.send_with_retry(
        || async { Ok((tokio::net::TcpStream::connect(g.addr).await?, g.pin.clone())) },
        &job,
        &again,
        5,
    ));
    let (_, resumed, bytes) = sent(retried)?;
    ensure!(resumed, "the retry did not resume from the token");
    // What a restart would carry: the whole stream, as `send -nvP` counts it.
    let info = g.rt.block_on(g.zfs.info())?;
    let mut full = SendArgs::new(ds("src/cut")?.snapshot("s1")?);
    full.compressed = true;
    let whole =
        g.rt.block_on(g.zfs.estimate(&full, &info))?
            .context("no estimate")?;
    // Bytes read from `zfs send` before the cut are not all received (queues, TLS, sockets),
    // so the saving is smaller than `before_cut`, but it must be real.
    ensure!(
        bytes + (2 << 20) < whole,
        "resumed send carried {bytes} bytes ({before_cut} had been read before the cut); a restart carries {whole}"
    );
    eprintln!("    cut after {before_cut} bytes read; resumed with {bytes} of {whole}");
    for snap in ["s1", "s2", "s3"] {
        ensure!(
            guid(&format!("dst/ployz/cut@{snap}"))? == guid(&format!("src/cut@{snap}"))?,
            "{snap} did not arrive as itself"
        );
    }
    sh("zfs mount dst/ployz/cut || true")?;
    ensure!(checksums("/src/cut")? == checksums("/dst/ployz/cut")?);
    Ok(())
}

fn compressed_send(g: &Guest) -> Result<()> {
    // Compressible data in an lz4 dataset: a -c stream carries the blocks as stored.
    sh("zfs create -o compression=lz4 src/cmp \
        && yes ployz-compressible-line | head -c 16M > /src/cmp/text && zfs snapshot src/cmp@s1")?;
    let (_, _, bytes) = sent(g.send(&g.job("cmp", "s1")?, &Progress::default()))?;
    ensure!(
        bytes < 4 << 20,
        "16 MiB of lz4-compressible data sent as {bytes} bytes: not a compressed stream"
    );
    sh("zfs mount dst/ployz/cmp || true")?;
    ensure!(checksums("/src/cmp")? == checksums("/dst/ployz/cmp")?);
    Ok(())
}

fn raw_send(g: &Guest) -> Result<()> {
    sh("printf 'correct horse battery staple' > /tmp/key \
        && zfs create -o encryption=aes-256-gcm -o keyformat=passphrase -o keylocation=file:///tmp/key src/enc \
        && head -c 2M /dev/urandom > /src/enc/secret && zfs snapshot src/enc@s1")?;
    sent(g.send(&g.job("enc", "s1")?, &Progress::default()))?;
    let status = sh("zfs get -H -o value keystatus,encryption dst/ployz/enc")?;
    let lines: Vec<&str> = status.lines().collect();
    ensure!(
        lines == ["unavailable", "aes-256-gcm"],
        "received copy: {lines:?} (want the key unavailable: a raw stream)"
    );
    ensure!(guid("dst/ployz/enc@s1")? == guid("src/enc@s1")?);
    Ok(())
}

/// A target that holds the token of a plaintext send of an encrypted dataset (what a
/// malicious receiver would offer): resuming from it would send the plaintext. Refused.
fn plaintext_token_refused(g: &Guest) -> Result<()> {
    sh(
        "zfs create -o encryption=aes-256-gcm -o keyformat=passphrase -o keylocation=file:///tmp/key src/enc2 \
        && head -c 4M /dev/urandom > /src/enc2/secret && zfs snapshot src/enc2@s1 \
        && { zfs send src/enc2@s1 | head -c 1500000 | zfs receive -s -u dst/ployz/enc2 || true; }",
    )?;
    let token = sh("zfs get -H -o value receive_resume_token dst/ployz/enc2")?;
    ensure!(
        token.trim().len() > 10,
        "no partial plaintext receive to offer: {token:?}"
    );
    match g.send(&g.job("enc2", "s1")?, &Progress::default()) {
        Err(TransferError::BadToken { what, .. }) if what.contains("plaintext") => {}
        other => bail!("expected the token to be refused, got {other:?}"),
    }
    // Nothing was resumed: the partial state and its token are as the setup left them.
    let after = sh("zfs get -H -o value receive_resume_token dst/ployz/enc2")?;
    ensure!(after == token, "the partial receive moved on: {after:?}");
    Ok(())
}

/// A stream carrying `mountpoint=/etc`, `setuid=on`, a reservation and a quota (`send -p`,
/// what a compromised source could send) is compound: the receive port refuses it before
/// `zfs receive` sees a byte, and nothing lands. The second line, for a stream that got past
/// anyway, fed to ployz's own receive: it takes none of those properties (`-x`/`-o`), so no
/// share of the target's pool is reserved, and the promotion mounts the copy below the pool.
fn crafted_stream_lands_below_the_pool(g: &Guest) -> Result<()> {
    sh(
        "zfs create -o canmount=noauto -o mountpoint=/etc -o setuid=on -o reservation=16M \
         -o quota=1G src/crafted \
        && zfs snapshot src/crafted@s1",
    )?;
    let job = g.job("crafted", "s1")?;
    let r = g.rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(g.addr).await?;
        anyhow::Ok(g.crafting.send(tcp, &job, &Progress::default()).await)
    })?;
    match &r {
        Err(e @ TransferError::Remote { .. }) if e.to_string().contains("compound stream") => {}
        other => bail!("expected the compound stream refused, got {other:?}"),
    }
    let landed = sh("zfs list -H -o name dst/ployz/crafted 2>&1 || true")?;
    ensure!(
        landed.contains("does not exist"),
        "the refused stream left {landed:?}"
    );
    let args = ReceiveArgs {
        target: ds("dst/ployz/crafted")?,
        resumable: true,
        rollback: false,
        neutralize: true,
    };
    g.rt.block_on(async {
        let mut receive = g.zfs.receive(&args)?;
        let mut stdin = receive.stdin.take().context("zfs receive has no stdin")?;
        let mut send = tokio::process::Command::new("zfs")
            .args(["send", "-p", "src/crafted@s1"])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut stream = send.stdout.take().context("zfs send has no stdout")?;
        tokio::io::copy(&mut stream, &mut stdin).await?;
        drop(stdin);
        ensure!(send.wait().await?.success(), "zfs send -p failed");
        ployz::zfs::finish(receive, "zfs receive").await?;
        anyhow::Ok(())
    })?;
    let props =
        sh("zfs get -H -o value,source mountpoint,setuid,devices,canmount dst/ployz/crafted")?;
    ensure!(
        props
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("/dst/ployz/crafted\t"))
            && props.contains("off\tlocal"),
        "received with {props:?}"
    );
    let space = sh("zfs get -H -o value reservation,quota dst/ployz/crafted")?;
    ensure!(
        space.lines().all(|l| l == "none"),
        "received with reservation and quota {space:?}"
    );
    let promoted = g.rt.block_on(g.server.change_role(
        &ds("dst/ployz/crafted")?,
        ployz::transfer::protocol::Action::Promote,
        "conformance/crafted",
    ))?;
    ensure!(
        promoted
            == ployz::transfer::protocol::Outcome::Promoted {
                mountpoint: "/dst/ployz/crafted".into()
            },
        "promoted at {promoted:?}"
    );
    let etc = sh("findmnt -n -o SOURCE /etc || true")?;
    ensure!(!etc.contains("crafted"), "/etc is the stream's: {etc:?}");
    Ok(())
}

fn holds(g: &Guest) -> Result<()> {
    g.dataset("hold", 1, "")?;
    let snap = ds("src/hold")?.snapshot("s1")?;
    g.rt.block_on(g.zfs.hold(&snap))?;
    g.rt.block_on(g.zfs.hold(&snap))?; // idempotent
    ensure!(
        g.rt.block_on(g.zfs.destroy_snapshot(&snap)).is_err(),
        "a held snapshot was destroyed"
    );
    g.rt.block_on(g.zfs.release(&snap))?;
    g.rt.block_on(g.zfs.release(&snap))?; // idempotent
    g.rt.block_on(g.zfs.destroy_snapshot(&snap))?;
    Ok(())
}

fn diverged(g: &Guest) -> Result<()> {
    g.dataset("div", 1, "")?;
    sent(g.send(&g.job("div", "s1")?, &Progress::default()))?;
    // Someone else's snapshot on the target, and new data on the source.
    sh(
        "zfs set ployz:replica=false dst/ployz/div && zfs snapshot dst/ployz/div@theirs \
        && head -c 1M /dev/urandom > /src/div/more && zfs snapshot src/div@s2",
    )?;
    let before = sh("zfs list -H -t snapshot -o name,guid -r dst/ployz/div")?;
    match g.send(&g.job("div", "s2")?, &Progress::default()) {
        Err(TransferError::Base {
            source: BaseError::Diverged { .. },
            ..
        }) => {}
        other => bail!("expected a refusal as diverged, got {other:?}"),
    }
    ensure!(
        sh("zfs list -H -t snapshot -o name,guid -r dst/ployz/div")? == before,
        "the target changed"
    );
    Ok(())
}

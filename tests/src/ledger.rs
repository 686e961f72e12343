//! The test app's side of a migration. `ledger` (tests/images/ledger.c) appends a checksummed,
//! sequence-numbered, fsync'd record every 20 ms and answers its last acknowledged sequence
//! number over HTTP. The suites watch those acknowledgements while a migration runs
//! ([`AckWatch`]), then read the ledger from the dataset ([`Ledger`]) and assert that no
//! acknowledged record is missing, none is torn or corrupt, and measure the downtime the app
//! itself saw: from its last write on the source to its first write on the target.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::machine::ZfsMachine;
use crate::wait::wait_for;

/// The ledger's file, relative to the volume's root.
pub const FILE: &str = "ledger.log";
/// The port the app answers on.
pub const PORT: u16 = 8080;

/// One record: `SEQ REALTIME_NS WRITER CRC32`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub time_ns: i64,
    /// Who wrote it: `POD@NODE`.
    pub writer: String,
}

/// The node of a writer `POD@NODE`.
pub fn node_of(writer: &str) -> Option<&str> {
    writer.split_once('@').map(|(_, node)| node)
}

/// The CRC-32 (IEEE) the app writes, over the record's text before the checksum.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = (c >> 1) ^ (0xedb8_8320 & (c & 1).wrapping_neg());
        }
    }
    !c
}

fn parse_record(line: &str) -> Result<Record> {
    let (body, crc) = line.rsplit_once(' ').context("no checksum")?;
    let want = u32::from_str_radix(crc, 16).context("checksum is not hex")?;
    ensure!(crc32(body.as_bytes()) == want, "checksum mismatch");
    let mut f = body.split(' ');
    let (Some(seq), Some(time), Some(writer), None) = (f.next(), f.next(), f.next(), f.next())
    else {
        bail!("not SEQ TIME WRITER");
    };
    Ok(Record {
        seq: seq.parse()?,
        time_ns: time.parse()?,
        writer: writer.into(),
    })
}

/// A ledger read back from a volume, verified.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub records: Vec<Record>,
}

/// A change of writer in the ledger: the app stopped in one pod and started in another.
#[derive(Debug, Clone)]
pub struct Handover {
    pub from: Record,
    pub to: Record,
}

impl Handover {
    /// The time between the last write of one pod and the first of the next.
    pub fn gap(&self) -> Duration {
        Duration::from_nanos(u64::try_from(self.to.time_ns - self.from.time_ns).unwrap_or(0))
    }
}

impl Ledger {
    /// Parses and verifies a whole ledger: every record complete (the text ends with a
    /// newline), its checksum right, and the sequence numbers 1, 2, 3, ... without a gap.
    pub fn parse(text: &str) -> Result<Self> {
        ensure!(!text.is_empty(), "the ledger is empty");
        ensure!(
            text.ends_with('\n'),
            "the ledger's last record is torn: {:?}",
            text.lines().last()
        );
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let r = parse_record(line)
                .with_context(|| format!("ledger line {}: {line:?} is corrupt", i + 1))?;
            let want = i as u64 + 1;
            ensure!(
                r.seq == want,
                "ledger line {}: sequence {} where {want} belongs: records {}..{} are missing",
                i + 1,
                r.seq,
                want,
                r.seq.saturating_sub(1)
            );
            records.push(r);
        }
        Ok(Self { records })
    }

    /// Reads and verifies the ledger in directory `dir` on machine `m`.
    pub fn read(m: &ZfsMachine, dir: &str) -> Result<Self> {
        let text = m.sh(&format!("cat '{dir}/{FILE}'"))?;
        Self::parse(&text).with_context(|| format!("ledger {dir}/{FILE} on {}", m.name))
    }

    pub fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, |r| r.seq)
    }

    /// Every change of writer, in order.
    pub fn handovers(&self) -> Vec<Handover> {
        self.records
            .windows(2)
            .filter(|w| w[0].writer != w[1].writer)
            .map(|w| Handover {
                from: w[0].clone(),
                to: w[1].clone(),
            })
            .collect()
    }

    /// Fails unless every acknowledgement in `acks` is in the ledger, written by the pod that
    /// acknowledged it.
    pub fn check_acks(&self, acks: &Acks) -> Result<()> {
        ensure!(
            !acks.by_writer.is_empty(),
            "no acknowledgement was observed"
        );
        for (writer, &seq) in &acks.by_writer {
            let Some(r) = usize::try_from(seq)
                .ok()
                .and_then(|s| s.checked_sub(1))
                .and_then(|i| self.records.get(i))
            else {
                bail!(
                    "LOST WRITES: pod {writer} acknowledged record {seq}, but the ledger ends at {}",
                    self.last_seq()
                );
            };
            ensure!(
                &r.writer == writer,
                "LOST WRITES: pod {writer} acknowledged record {seq}, but the ledger's record {seq} was written by {}",
                r.writer
            );
        }
        Ok(())
    }

    /// True when `prefix` is where this ledger began: the same records, then more.
    pub fn extends(&self, prefix: &Ledger) -> bool {
        self.records.len() >= prefix.records.len()
            && self.records[..prefix.records.len()] == prefix.records[..]
    }
}

/// What the app acknowledged while it was watched: the highest sequence number per writer
/// (`POD@NODE`).
#[derive(Debug, Clone, Default)]
pub struct Acks {
    pub by_writer: BTreeMap<String, u64>,
}

impl Acks {
    /// True when a pod on `node` acknowledged a write.
    pub fn any_on(&self, node: &str) -> bool {
        self.by_writer.keys().any(|w| node_of(w) == Some(node))
    }
}

/// Polls the app's pods (selected by label) every 20 ms from the host while it lives, and
/// records what they acknowledge. Runs on the environment's runtime.
#[derive(Debug)]
pub struct AckWatch {
    acks: Arc<Mutex<Acks>>,
    task: tokio::task::JoinHandle<()>,
}

impl AckWatch {
    pub fn start(
        rt: &tokio::runtime::Runtime,
        client: &Client,
        namespace: &str,
        selector: &str,
    ) -> Self {
        let acks = Arc::new(Mutex::new(Acks::default()));
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let lp = ListParams::default().labels(selector);
        let shared = Arc::clone(&acks);
        let task = rt.spawn(async move {
            let mut targets: Vec<String> = vec![];
            let mut tick = 0u32;
            loop {
                // The pods come and go during a move: look them up every 200 ms.
                if tick.is_multiple_of(10)
                    && let Ok(list) = pods.list(&lp).await
                {
                    targets = list
                        .items
                        .into_iter()
                        .filter_map(|p| p.status?.pod_ip)
                        .collect();
                }
                tick = tick.wrapping_add(1);
                for ip in &targets {
                    if let Ok(Some((writer, seq))) = ask(ip).await {
                        let mut a = shared.lock().unwrap_or_else(|p| p.into_inner());
                        let e = a.by_writer.entry(writer).or_default();
                        *e = (*e).max(seq);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self { acks, task }
    }

    /// What was acknowledged so far.
    pub fn acks(&self) -> Acks {
        self.acks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until a pod of the app on `node` has acknowledged a write.
    pub fn wait_acked_on(&self, node: &str) -> Result<()> {
        wait_for(
            &format!("the app to acknowledge a write on {node}"),
            Duration::from_secs(60),
            || Ok(self.acks().any_on(node)),
        )
    }

    /// Stops watching and returns what was acknowledged.
    pub fn stop(self) -> Acks {
        self.task.abort();
        self.acks()
    }
}

impl Drop for AckWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP GET to the app at `ip`: `(writer, seq)`, or None when it does not answer in time.
async fn ask(ip: &str) -> Result<Option<(String, u64)>> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect((ip, PORT)).await?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).await?;
        anyhow::Ok(resp)
    };
    let Ok(resp) = tokio::time::timeout(Duration::from_millis(300), exchange).await else {
        return Ok(None);
    };
    let resp = resp?;
    let body = resp.split("\r\n\r\n").nth(1).context("no body")?;
    let v: serde_json::Value = serde_json::from_str(body.trim())?;
    let seq = v["seq"].as_u64().context("no seq")?;
    let writer = v["writer"].as_str().context("no writer")?.to_string();
    Ok(Some((writer, seq)))
}

/// The app-side outcome of one move, for assertions and reports.
#[derive(Debug, Clone)]
pub struct MoveReport {
    pub last_seq: u64,
    /// Downtime seen by the app: last write on the source to first write on the target.
    pub app_downtime: Duration,
    pub handover: Handover,
}

/// Verifies the ledger after a move from node `from` to node `to`: read on `target` in
/// `dir`, every acknowledgement in `acks` present, the last change of writer from a pod on
/// `from` to a pod on `to`, and the source's final ledger (on `source`, read-only now) a prefix
/// of the target's.
pub fn verify_move(
    acks: &Acks,
    (source, src_dir): (&ZfsMachine, &str),
    (target, dst_dir): (&ZfsMachine, &str),
) -> Result<MoveReport> {
    let on_target = Ledger::read(target, dst_dir)?;
    on_target.check_acks(acks)?;
    let on_source = Ledger::read(source, src_dir)?;
    ensure!(
        on_target.extends(&on_source),
        "the target's ledger does not continue the source's: source ends at {}, target at {}",
        on_source.last_seq(),
        on_target.last_seq()
    );
    let handover = on_target
        .handovers()
        .pop()
        .context("the ledger shows no change of writer: the app never restarted on the target")?;
    let (from_node, to_node) = (node_of(&handover.from.writer), node_of(&handover.to.writer));
    ensure!(
        from_node == Some(source.name.as_str()) && to_node == Some(target.name.as_str()),
        "the last handover went from {} on {from_node:?} to {} on {to_node:?}, not {} -> {}",
        handover.from.writer,
        handover.to.writer,
        source.name,
        target.name
    );
    ensure!(
        on_source.last_seq() == handover.from.seq,
        "the source's ledger ends at {}, but the app's last write there was {}",
        on_source.last_seq(),
        handover.from.seq
    );
    Ok(MoveReport {
        last_seq: on_target.last_seq(),
        app_downtime: handover.gap(),
        handover,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, t: i64, w: &str) -> String {
        let body = format!("{seq} {t} {w}");
        format!("{body} {:08x}\n", crc32(body.as_bytes()))
    }

    #[test]
    fn crc_matches_the_apps() {
        // From a run of tests/images/ledger.c.
        assert_eq!(crc32(b"27 1795794728181755515 vm"), 0x9c49_3177);
    }

    #[test]
    fn verifies_and_finds_handovers() -> Result<()> {
        let text = [
            rec(1, 10, "db-0@a"),
            rec(2, 20, "db-0@a"),
            rec(3, 2_000_000_020, "db-0@b"),
        ]
        .concat();
        let l = Ledger::parse(&text)?;
        assert_eq!(l.last_seq(), 3);
        let h = l.handovers();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].gap(), Duration::from_secs(2));
        assert_eq!(node_of(&h[0].to.writer), Some("b"));
        let mut acks = Acks::default();
        acks.by_writer.insert("db-0@a".into(), 2);
        acks.by_writer.insert("db-0@b".into(), 3);
        l.check_acks(&acks)?;
        assert!(acks.any_on("b") && !acks.any_on("c"));
        acks.by_writer.insert("db-0@b".into(), 4);
        assert!(l.check_acks(&acks).is_err(), "a lost write went unnoticed");
        Ok(())
    }

    #[test]
    fn refuses_torn_corrupt_and_gapped_ledgers() {
        let good = [rec(1, 1, "a"), rec(2, 2, "a")].concat();
        assert!(Ledger::parse(&good[..good.len() - 1]).is_err(), "torn");
        assert!(
            Ledger::parse(&good.replace("2 2 a", "2 3 a")).is_err(),
            "corrupt"
        );
        assert!(
            Ledger::parse(&[rec(1, 1, "a"), rec(3, 2, "a")].concat()).is_err(),
            "gap"
        );
    }
}

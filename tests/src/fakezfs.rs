//! A stand-in for the `zfs` command, for the scale benchmark only: a hundred agents on kwok
//! machines need a `zfs` each, and a hundred zfs-fuse daemons would measure zfs-fuse, not the
//! control loop. It keeps one machine's datasets, snapshots (with GUIDs), holds and properties
//! in a JSON file, and answers the subset of `zfs` that ployz's agent runs on legacy ZFS
//! (zfs-fuse: no `version`, so none of the modern capabilities), in zfs-fuse's output format
//! and with its error messages. `send` writes a stream that begins with a real ZFS BEGIN
//! record (the receiver checks it), then the snapshots it carries and filler bytes;
//! `receive` applies it with ZFS's rules (full into nothing, incremental onto the matching
//! GUID, `-F` rolls back). Nothing is stored but the metadata.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

/// Size of the pool every fake machine has.
pub const POOL_BYTES: u64 = 100 << 30;
/// Filler bytes of a full stream, and of each snapshot of an incremental one.
pub const FULL_BYTES: u64 = 1 << 20;
pub const DELTA_BYTES: u64 = 64 << 10;

const MAGIC: u64 = 0x2_F5BA_CBAC;
/// `drr_versioninfo` of a substream (`-i` or full) and a compound stream (`-I`).
const SUBSTREAM: u64 = 1;
const COMPOUND: u64 = 2;

/// A failed command: what `zfs` prints on stderr, and its exit code.
#[derive(Debug)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

fn fail<T>(msg: impl Into<String>) -> Result<T> {
    Err(Failure(msg.into()).into())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snap {
    pub guid: u64,
    pub createtxg: u64,
    #[serde(default)]
    pub props: BTreeMap<String, String>,
    #[serde(default)]
    pub holds: BTreeSet<String>,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ds {
    pub guid: u64,
    pub createtxg: u64,
    /// Locally set properties (user properties included).
    #[serde(default)]
    pub props: BTreeMap<String, String>,
    /// Snapshots by short name.
    #[serde(default)]
    pub snapshots: BTreeMap<String, Snap>,
    #[serde(default)]
    pub mounted: bool,
    pub bytes: u64,
}

/// One machine's ZFS.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub txg: u64,
    /// Where the pool's root dataset mounts.
    pub mountroot: String,
    pub datasets: BTreeMap<String, Ds>,
}

/// Properties and their defaults, as zfs-fuse reports them when not set.
const DEFAULTS: &[(&str, &str)] = &[
    ("readonly", "off"),
    ("canmount", "on"),
    ("sharenfs", "off"),
    ("sharesmb", "off"),
    ("setuid", "on"),
    ("devices", "on"),
    ("reservation", "none"),
    ("refreservation", "none"),
    ("quota", "none"),
    ("refquota", "none"),
];
/// Properties children inherit.
const INHERITED: &[&str] = &["readonly", "sharenfs", "sharesmb", "setuid", "devices"];

fn random_guid() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}

fn parent_of(name: &str) -> Option<&str> {
    name.rsplit_once('/').map(|(p, _)| p)
}

fn split_snap(name: &str) -> Result<(&str, &str)> {
    match name.split_once('@') {
        Some((ds, s)) if !ds.is_empty() && !s.is_empty() => Ok((ds, s)),
        _ => fail(format!("invalid snapshot name '{name}'")),
    }
}

fn no_dataset<T>(name: &str) -> Result<T> {
    fail(format!("cannot open '{name}': dataset does not exist"))
}

impl State {
    pub fn new(pool: &str, mountroot: &str) -> Self {
        let mut s = Self {
            txg: 1,
            mountroot: mountroot.into(),
            datasets: BTreeMap::new(),
        };
        s.datasets.insert(
            pool.into(),
            Ds {
                guid: random_guid(),
                createtxg: 1,
                mounted: true,
                ..Ds::default()
            },
        );
        s
    }

    fn next_txg(&mut self) -> u64 {
        self.txg += 1;
        self.txg
    }

    fn ds(&self, name: &str) -> Result<&Ds> {
        match self.datasets.get(name) {
            Some(d) => Ok(d),
            None => no_dataset(name),
        }
    }

    /// A new snapshot `short` of `ds` at the next txg; `exists` is what ZFS says when `ds`
    /// already has one of that name.
    fn add_snapshot(
        &mut self,
        ds: &str,
        short: &str,
        guid: u64,
        props: BTreeMap<String, String>,
        exists: String,
    ) -> Result<()> {
        let txg = self.next_txg();
        let d = self.ds_mut(ds)?;
        if d.snapshots.contains_key(short) {
            return fail(exists);
        }
        d.snapshots.insert(
            short.into(),
            Snap {
                guid,
                createtxg: txg,
                props,
                holds: BTreeSet::new(),
                bytes: DELTA_BYTES,
            },
        );
        Ok(())
    }

    fn ds_mut(&mut self, name: &str) -> Result<&mut Ds> {
        match self.datasets.get_mut(name) {
            Some(d) => Ok(d),
            None => no_dataset(name),
        }
    }

    fn used(&self) -> u64 {
        self.datasets
            .values()
            .map(|d| d.bytes + d.snapshots.values().map(|s| s.bytes).sum::<u64>())
            .sum()
    }

    /// A dataset's property: its value and source, as `zfs get` shows them.
    fn prop(&self, name: &str, prop: &str) -> (String, String) {
        let Some(ds) = self.datasets.get(name) else {
            return ("-".into(), "-".into());
        };
        if let Some(v) = ds.props.get(prop) {
            return (v.clone(), "local".into());
        }
        let below = |d: &Ds| d.bytes + d.snapshots.values().map(|s| s.bytes).sum::<u64>();
        let subtree = || -> u64 {
            self.datasets
                .iter()
                .filter(|(n, _)| *n == name || n.starts_with(&format!("{name}/")))
                .map(|(_, d)| below(d))
                .sum()
        };
        let value = match prop {
            "guid" => ds.guid.to_string(),
            "createtxg" => ds.createtxg.to_string(),
            "used" => subtree().to_string(),
            "referenced" => ds.bytes.to_string(),
            "available" => POOL_BYTES.saturating_sub(self.used()).to_string(),
            "mountpoint" => {
                return match parent_of(name) {
                    None => (format!("{}/{name}", self.mountroot), "default".into()),
                    Some(p) => {
                        let (pm, _) = self.prop(p, "mountpoint");
                        let leaf = name.rsplit('/').next().unwrap_or(name);
                        (format!("{pm}/{leaf}"), format!("inherited from {p}"))
                    }
                };
            }
            p if INHERITED.contains(&p) && parent_of(name).is_some() => {
                let parent = parent_of(name).unwrap_or_default();
                let (v, src) = self.prop(parent, p);
                let src = if src == "local" {
                    format!("inherited from {parent}")
                } else {
                    src
                };
                return (v, src);
            }
            p => match DEFAULTS.iter().find(|(k, _)| *k == p) {
                Some((_, v)) => return ((*v).into(), "default".into()),
                None => return ("-".into(), "-".into()),
            },
        };
        (value, "-".into())
    }

    fn snap_prop(&self, ds: &str, snap: &Snap, prop: &str) -> String {
        match prop {
            "guid" => snap.guid.to_string(),
            "createtxg" => snap.createtxg.to_string(),
            "used" | "referenced" => snap.bytes.to_string(),
            "userrefs" => snap.holds.len().to_string(),
            "available" | "mountpoint" => "-".into(),
            "readonly" => self.prop(ds, "readonly").0,
            p => snap.props.get(p).cloned().unwrap_or_else(|| "-".into()),
        }
    }
}

/// The stream's description, after its BEGIN record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StreamMeta {
    from_guid: Option<u64>,
    /// Short name, GUID and properties of each snapshot, oldest first.
    snapshots: Vec<(String, u64, BTreeMap<String, String>)>,
    payload: u64,
}

fn begin_record(compound: bool) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[8..16].copy_from_slice(&MAGIC.to_le_bytes());
    let info = if compound { COMPOUND } else { SUBSTREAM };
    h[16..24].copy_from_slice(&info.to_le_bytes());
    h
}

/// Runs one `zfs` command line against the state in `dir`.
pub fn run(
    dir: &Path,
    args: &[String],
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.split_first() {
        Some((&"send", rest)) => return send(dir, rest, stdout),
        Some((&"receive" | &"recv", rest)) if !rest.contains(&"-A") => {
            return receive(dir, rest, stdin);
        }
        _ => {}
    }
    with_state(dir, |s| command(s, &args, stdout))
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

/// Reads the state under an exclusive lock, lets `f` change it, and writes it back.
fn with_state<T>(dir: &Path, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("state.lock"))
        .with_context(|| format!("opening the lock in {}", dir.display()))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking {}: {e}", dir.display()))?;
    let text = std::fs::read_to_string(state_file(dir))
        .with_context(|| format!("reading {}", state_file(dir).display()))?;
    let mut state: State = serde_json::from_str(&text)?;
    let out = f(&mut state)?;
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&state)?)?;
    std::fs::rename(&tmp, state_file(dir))?;
    Ok(out)
}

/// Creates `dir` with a pool `pool` mounted below `mountroot`.
pub fn init(dir: &Path, pool: &str, mountroot: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        state_file(dir),
        serde_json::to_vec(&State::new(pool, mountroot))?,
    )?;
    Ok(())
}

fn command(s: &mut State, args: &[&str], out: &mut dyn Write) -> Result<()> {
    let Some((cmd, rest)) = args.split_first() else {
        return fail("usage: zfs command args ...");
    };
    match *cmd {
        "list" => list(s, rest, out),
        "get" => get(s, rest, out),
        "create" => create(s, rest),
        "snapshot" => snapshot(s, rest),
        "hold" | "release" => hold(s, *cmd == "hold", rest),
        "destroy" => destroy(s, rest),
        "rename" => rename(s, rest),
        "set" => set(s, rest),
        "inherit" => inherit(s, rest),
        "rollback" => rollback(s, rest),
        "mount" | "unmount" => mount(s, *cmd == "mount", rest),
        "receive" | "recv" => {
            // `receive -A`: legacy ZFS keeps no partial state.
            fail("invalid option 'A'")
        }
        other => fail(format!("unrecognized command '{other}'")),
    }
}

/// Splits `-o k=v` pairs (and flags) from the operands.
fn options<'a>(args: &[&'a str]) -> (BTreeMap<String, String>, BTreeSet<&'a str>, Vec<&'a str>) {
    let mut props = BTreeMap::new();
    let mut flags = BTreeSet::new();
    let mut operands = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "-o" | "-x" | "-t" => {
                if let Some(v) = it.next() {
                    if *a == "-o" {
                        if let Some((k, v)) = v.split_once('=') {
                            props.insert(k.to_string(), v.to_string());
                        }
                    } else {
                        flags.insert(*v);
                    }
                }
            }
            f if f.starts_with('-') => {
                flags.insert(*a);
            }
            _ => operands.push(*a),
        }
    }
    (props, flags, operands)
}

fn list(s: &State, args: &[&str], out: &mut dyn Write) -> Result<()> {
    let (_, flags, _) = options(args);
    if flags.contains("bookmark") {
        return Ok(());
    }
    for name in s.datasets.keys() {
        writeln!(out, "{name}")?;
    }
    Ok(())
}

fn get(s: &State, args: &[&str], out: &mut dyn Write) -> Result<()> {
    let recursive = args.contains(&"-r");
    let mut it = args.iter().filter(|a| !matches!(**a, "-H" | "-p" | "-r"));
    let mut columns = vec!["name", "property", "value", "source"];
    let mut rest = vec![];
    while let Some(a) = it.next() {
        if *a == "-o" {
            columns = it
                .next()
                .map(|c| c.split(',').collect())
                .unwrap_or_default();
        } else {
            rest.push(*a);
        }
    }
    let [props, target] = rest.as_slice() else {
        return fail(
            "usage: zfs get [-rHp] [-o field[,...]] <all | property[,...]> [filesystem|snapshot]",
        );
    };
    let props: Vec<&str> = props.split(',').collect();
    let mut rows: Vec<(String, String, String, String)> = vec![];
    let mut one = |name: &str| -> Result<()> {
        if let Some((ds, short)) = name.split_once('@') {
            let snap =
                s.ds(ds)?.snapshots.get(short).ok_or_else(|| {
                    Failure(format!("cannot open '{name}': dataset does not exist"))
                })?;
            for p in &props {
                let v = s.snap_prop(ds, snap, p);
                let src = if snap.props.contains_key(*p) {
                    "local"
                } else {
                    "-"
                };
                rows.push((name.into(), (*p).into(), v, src.into()));
            }
        } else {
            s.ds(name)?;
            for p in &props {
                let (v, src) = s.prop(name, p);
                rows.push((name.into(), (*p).into(), v, src));
            }
        }
        Ok(())
    };
    if recursive {
        if target.contains('@') {
            one(target)?;
        } else {
            s.ds(target)?;
            let below = format!("{target}/");
            let names: Vec<&String> = s
                .datasets
                .keys()
                .filter(|n| n.as_str() == *target || n.starts_with(&below))
                .collect();
            for name in names {
                one(name)?;
                let ds = s.ds(name)?;
                for short in ds.snapshots.keys() {
                    one(&format!("{name}@{short}"))?;
                }
            }
        }
    } else {
        one(target)?;
    }
    for (name, prop, value, source) in rows {
        let fields: Vec<&str> = columns
            .iter()
            .map(|c| match *c {
                "name" => name.as_str(),
                "property" => prop.as_str(),
                "value" => value.as_str(),
                _ => source.as_str(),
            })
            .collect();
        writeln!(out, "{}", fields.join("\t"))?;
    }
    Ok(())
}

fn create(s: &mut State, args: &[&str]) -> Result<()> {
    let (props, flags, operands) = options(args);
    let [name] = operands.as_slice() else {
        return fail("usage: zfs create [-p] [-o property=value] ... <filesystem>");
    };
    if s.datasets.contains_key(*name) {
        if flags.contains("-p") {
            return Ok(());
        }
        return fail(format!("cannot create '{name}': dataset already exists"));
    }
    let mut missing = vec![*name];
    let mut p = parent_of(name);
    while let Some(parent) = p {
        if s.datasets.contains_key(parent) {
            break;
        }
        if !flags.contains("-p") {
            return fail(format!("cannot create '{name}': parent does not exist"));
        }
        missing.push(parent);
        p = parent_of(parent);
    }
    if p.is_none() {
        return fail(format!("cannot create '{name}': no such pool"));
    }
    for n in missing.into_iter().rev() {
        let txg = s.next_txg();
        s.datasets.insert(
            n.into(),
            Ds {
                guid: random_guid(),
                createtxg: txg,
                props: if n == *name {
                    props.clone()
                } else {
                    BTreeMap::new()
                },
                mounted: true,
                ..Ds::default()
            },
        );
    }
    Ok(())
}

fn snapshot(s: &mut State, args: &[&str]) -> Result<()> {
    let (props, _, operands) = options(args);
    let [name] = operands.as_slice() else {
        return fail("usage: zfs snapshot [-o property=value] ... <snapshot>");
    };
    let (ds, short) = split_snap(name)?;
    let exists = format!("cannot create snapshot '{name}': dataset already exists");
    s.add_snapshot(ds, short, random_guid(), props, exists)
}

fn find_snap<'a>(s: &'a mut State, name: &str) -> Result<&'a mut Snap> {
    let (ds, short) = split_snap(name)?;
    match s.ds_mut(ds)?.snapshots.get_mut(short) {
        Some(snap) => Ok(snap),
        None => no_dataset(name),
    }
}

fn hold(s: &mut State, hold: bool, args: &[&str]) -> Result<()> {
    let [tag, name] = args else {
        return fail("usage: zfs hold|release <tag> <snapshot>");
    };
    let snap = find_snap(s, name)?;
    if hold {
        if !snap.holds.insert((*tag).into()) {
            return fail(format!(
                "cannot hold snapshot '{name}': tag already exists on this dataset"
            ));
        }
    } else if !snap.holds.remove(*tag) {
        return fail(format!(
            "cannot release '{tag}' from snapshot '{name}': no such tag on this dataset"
        ));
    }
    Ok(())
}

fn destroy(s: &mut State, args: &[&str]) -> Result<()> {
    let (_, flags, operands) = options(args);
    let [name] = operands.as_slice() else {
        return fail("usage: zfs destroy [-r] <filesystem|snapshot>");
    };
    if name.contains('@') {
        let (ds, short) = split_snap(name)?;
        let d = s.ds_mut(ds)?;
        match d.snapshots.get(short) {
            None => return no_dataset(name),
            Some(snap) if !snap.holds.is_empty() => {
                return fail(format!("cannot destroy snapshot {name}: dataset is busy"));
            }
            Some(_) => {}
        }
        d.snapshots.remove(short);
        return Ok(());
    }
    s.ds(name)?;
    if parent_of(name).is_none() {
        return fail(format!(
            "cannot destroy '{name}': operation does not apply to pools"
        ));
    }
    let below = format!("{name}/");
    let doomed: Vec<String> = s
        .datasets
        .keys()
        .filter(|n| n.as_str() == *name || n.starts_with(&below))
        .cloned()
        .collect();
    if doomed.len() > 1 && !flags.contains("-r") {
        return fail(format!("cannot destroy '{name}': filesystem has children"));
    }
    for n in &doomed {
        let d = s.ds(n)?;
        if (!d.snapshots.is_empty() && !flags.contains("-r"))
            || d.snapshots.values().any(|snap| !snap.holds.is_empty())
        {
            return fail(format!("cannot destroy '{n}': dataset is busy"));
        }
    }
    for n in doomed {
        s.datasets.remove(&n);
    }
    Ok(())
}

fn rename(s: &mut State, args: &[&str]) -> Result<()> {
    let [from, to] = args else {
        return fail("usage: zfs rename <filesystem> <filesystem>");
    };
    s.ds(from)?;
    if s.datasets.contains_key(*to) {
        return fail(format!("cannot rename to '{to}': dataset already exists"));
    }
    if let Some(p) = parent_of(to) {
        s.ds(p)?;
    }
    let below = format!("{from}/");
    let moving: Vec<String> = s
        .datasets
        .keys()
        .filter(|n| n.as_str() == *from || n.starts_with(&below))
        .cloned()
        .collect();
    for n in moving {
        if let Some(d) = s.datasets.remove(&n) {
            s.datasets.insert(format!("{to}{}", &n[from.len()..]), d);
        }
    }
    Ok(())
}

fn set(s: &mut State, args: &[&str]) -> Result<()> {
    let [assignment, name] = args else {
        return fail("usage: zfs set <property=value> <filesystem|snapshot>");
    };
    let Some((k, v)) = assignment.split_once('=') else {
        return fail(format!("invalid property '{assignment}'"));
    };
    if name.contains('@') {
        find_snap(s, name)?.props.insert(k.into(), v.into());
    } else {
        s.ds_mut(name)?.props.insert(k.into(), v.into());
    }
    Ok(())
}

fn inherit(s: &mut State, args: &[&str]) -> Result<()> {
    let [prop, name] = args else {
        return fail("usage: zfs inherit <property> <filesystem>");
    };
    s.ds_mut(name)?.props.remove(*prop);
    Ok(())
}

fn rollback(s: &mut State, args: &[&str]) -> Result<()> {
    let (_, flags, operands) = options(args);
    let [name] = operands.as_slice() else {
        return fail("usage: zfs rollback [-r] <snapshot>");
    };
    let (ds, short) = split_snap(name)?;
    let d = s.ds_mut(ds)?;
    let Some(txg) = d.snapshots.get(short).map(|s| s.createtxg) else {
        return no_dataset(name);
    };
    let later: Vec<String> = d
        .snapshots
        .iter()
        .filter(|(_, s)| s.createtxg > txg)
        .map(|(n, _)| n.clone())
        .collect();
    if !later.is_empty() && !flags.contains("-r") {
        return fail(format!(
            "cannot rollback to '{name}': more recent snapshots exist\nuse '-r' to force deletion of the following snapshots"
        ));
    }
    for n in later {
        if d.snapshots.get(&n).is_some_and(|s| !s.holds.is_empty()) {
            return fail(format!("cannot destroy '{ds}@{n}': dataset is busy"));
        }
        d.snapshots.remove(&n);
    }
    Ok(())
}

fn mount(s: &mut State, mount: bool, args: &[&str]) -> Result<()> {
    let [name] = args else {
        return fail("usage: zfs mount|unmount <filesystem>");
    };
    let d = s.ds_mut(name)?;
    match (mount, d.mounted) {
        (true, true) => fail(format!("cannot mount '{name}': filesystem already mounted")),
        (false, false) => fail(format!("cannot unmount '{name}': not currently mounted")),
        _ => {
            d.mounted = mount;
            Ok(())
        }
    }
}

fn send(dir: &Path, args: &[&str], out: &mut dyn Write) -> Result<()> {
    let mut base = None;
    let mut compound = false;
    let mut to = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "-I" | "-i" => {
                compound = *a == "-I";
                base = it.next().copied();
            }
            a if a.starts_with('-') => return fail(format!("invalid option '{a}'")),
            a => to = Some(a),
        }
    }
    let Some(to) = to else {
        return fail("usage: zfs send [-i|-I snapshot] <snapshot>");
    };
    let meta = with_state(dir, |s| {
        let (ds, short) = split_snap(to)?;
        let d = s.ds(ds)?;
        let Some(target) = d.snapshots.get(short) else {
            return no_dataset(to);
        };
        let from = match base {
            None => None,
            Some(b) => {
                let (bds, bshort) = split_snap(b)?;
                if bds != ds {
                    return fail(format!(
                        "cannot send: incremental source {b} must be in the same filesystem"
                    ));
                }
                match d.snapshots.get(bshort) {
                    Some(b) => Some(b.clone()),
                    None => return no_dataset(b),
                }
            }
        };
        let mut snaps: Vec<(&String, &Snap)> = d
            .snapshots
            .iter()
            .filter(|(_, s)| {
                s.createtxg <= target.createtxg
                    && match &from {
                        Some(f) if compound => s.createtxg > f.createtxg,
                        Some(_) => s.createtxg == target.createtxg,
                        None => s.createtxg == target.createtxg,
                    }
            })
            .collect();
        snaps.sort_by_key(|(_, s)| s.createtxg);
        let payload = if from.is_some() {
            DELTA_BYTES * snaps.len() as u64
        } else {
            FULL_BYTES
        };
        Ok(StreamMeta {
            from_guid: from.map(|f| f.guid),
            snapshots: snaps
                .into_iter()
                .map(|(n, s)| (n.clone(), s.guid, s.props.clone()))
                .collect(),
            payload,
        })
    })?;
    let json = serde_json::to_vec(&meta)?;
    out.write_all(&begin_record(compound))?;
    out.write_all(&(json.len() as u32).to_le_bytes())?;
    out.write_all(&json)?;
    let chunk = vec![0u8; 64 << 10];
    let mut left = meta.payload;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

fn broken<T>() -> Result<T> {
    fail("cannot receive: invalid backup stream")
}

fn read_stream(stdin: &mut dyn Read) -> Result<StreamMeta> {
    let mut head = [0u8; 24];
    if stdin.read_exact(&mut head).is_err() || head[8..16] != MAGIC.to_le_bytes() {
        return broken();
    }
    let mut len = [0u8; 4];
    if stdin.read_exact(&mut len).is_err() {
        return broken();
    }
    let mut json = vec![0u8; u32::from_le_bytes(len) as usize];
    if stdin.read_exact(&mut json).is_err() {
        return broken();
    }
    let Ok(meta) = serde_json::from_slice::<StreamMeta>(&json) else {
        return broken();
    };
    let got = std::io::copy(&mut stdin.take(meta.payload), &mut std::io::sink())?;
    if got != meta.payload {
        return fail("cannot receive: incomplete stream");
    }
    Ok(meta)
}

fn receive(dir: &Path, args: &[&str], stdin: &mut dyn Read) -> Result<()> {
    let (props, flags, operands) = options(args);
    let [name] = operands.as_slice() else {
        return fail("usage: zfs receive [-uF] <filesystem>");
    };
    for f in &flags {
        if !matches!(*f, "-u" | "-F") {
            return fail(format!("invalid option '{}'", f.trim_start_matches('-')));
        }
    }
    let meta = read_stream(stdin)?;
    with_state(dir, |s| {
        if meta.snapshots.is_empty() {
            return broken();
        }
        match meta.from_guid {
            None => {
                if s.datasets.contains_key(*name) {
                    return fail(format!(
                        "cannot receive new filesystem stream: destination '{name}' exists\nmust specify -F to overwrite it"
                    ));
                }
                match parent_of(name) {
                    Some(p) if s.datasets.contains_key(p) => {}
                    _ => {
                        return fail(format!(
                            "cannot receive: destination's parent of '{name}' does not exist"
                        ));
                    }
                }
                let txg = s.next_txg();
                s.datasets.insert(
                    (*name).into(),
                    Ds {
                        guid: random_guid(),
                        createtxg: txg,
                        props: props.clone(),
                        mounted: false,
                        bytes: FULL_BYTES,
                        ..Ds::default()
                    },
                );
            }
            Some(from) => {
                let d = s.ds_mut(name)?;
                let Some(base_txg) = d
                    .snapshots
                    .values()
                    .find(|s| s.guid == from)
                    .map(|s| s.createtxg)
                else {
                    let newest = d
                        .snapshots
                        .iter()
                        .max_by_key(|(_, s)| s.createtxg)
                        .map(|(n, _)| n.clone())
                        .unwrap_or_default();
                    return fail(format!(
                        "cannot receive incremental stream: most recent snapshot of {name}@{newest} does not\nmatch incremental source"
                    ));
                };
                let later = d.snapshots.values().any(|s| s.createtxg > base_txg);
                if later && !flags.contains("-F") {
                    return fail(format!(
                        "cannot receive incremental stream: destination {name} has been modified\nsince most recent snapshot"
                    ));
                }
                d.snapshots.retain(|_, s| s.createtxg <= base_txg);
            }
        }
        for (short, guid, sprops) in &meta.snapshots {
            let exists = format!("cannot receive: destination snapshot {name}@{short} exists");
            s.add_snapshot(name, short, *guid, sprops.clone(), exists)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zfs(dir: &Path, line: &str) -> Result<String> {
        let args: Vec<String> = line.split(' ').map(String::from).collect();
        let mut out = vec![];
        run(dir, &args, &mut std::io::empty(), &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    fn pipe(from: &Path, send: &str, to: &Path, recv: &str) -> Result<()> {
        let args: Vec<String> = send.split(' ').map(String::from).collect();
        let mut stream = vec![];
        run(from, &args, &mut std::io::empty(), &mut stream)?;
        let args: Vec<String> = recv.split(' ').map(String::from).collect();
        run(to, &args, &mut stream.as_slice(), &mut vec![])
    }

    fn dirs(name: &str) -> Result<(PathBuf, PathBuf)> {
        let base = std::env::temp_dir().join(format!("fakezfs-{name}-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        init(&a, "tank", "/mnt/a")?;
        init(&b, "tank", "/mnt/b")?;
        Ok((a, b))
    }

    #[test]
    fn incremental_sends_land_on_the_matching_guid_and_nothing_else() -> Result<()> {
        let (a, b) = dirs("incr")?;
        zfs(&a, "create -p tank/ployz/v")?;
        zfs(&b, "create -p tank/ployz")?;
        zfs(&a, "snapshot tank/ployz/v@1")?;
        pipe(&a, "send tank/ployz/v@1", &b, "receive -u tank/ployz/v")?;
        let guid = |d: &Path, s: &str| zfs(d, &format!("get -H -p -o value guid {s}"));
        assert_eq!(guid(&a, "tank/ployz/v@1")?, guid(&b, "tank/ployz/v@1")?);
        assert_eq!(
            zfs(
                &b,
                "get -H -o property,value,source mountpoint tank/ployz/v"
            )?,
            "mountpoint\t/mnt/b/tank/ployz/v\tinherited from tank/ployz\n"
        );
        // A full stream into an existing dataset, and an incremental from the wrong base, fail
        // with zfs's own words.
        let again = pipe(&a, "send tank/ployz/v@1", &b, "receive -u tank/ployz/v");
        assert!(
            format!("{again:?}").contains("must specify -F"),
            "{again:?}"
        );
        zfs(&a, "snapshot tank/ployz/v@2")?;
        zfs(&a, "snapshot tank/ployz/v@3")?;
        pipe(
            &a,
            "send -I tank/ployz/v@1 tank/ployz/v@3",
            &b,
            "receive -u tank/ployz/v",
        )?;
        assert_eq!(guid(&a, "tank/ployz/v@2")?, guid(&b, "tank/ployz/v@2")?);
        zfs(&b, "snapshot tank/ployz/v@local")?;
        let diverged = pipe(
            &a,
            "send -i tank/ployz/v@1 tank/ployz/v@3",
            &b,
            "receive -u tank/ployz/v",
        );
        assert!(
            format!("{diverged:?}").contains("has been modified"),
            "{diverged:?}"
        );
        zfs(&b, "destroy tank/ployz/v@local")?;
        // b's newest is @3; a stream from @4 has no base there.
        zfs(&a, "snapshot tank/ployz/v@4")?;
        zfs(&a, "snapshot tank/ployz/v@5")?;
        let wrong = pipe(
            &a,
            "send -i tank/ployz/v@4 tank/ployz/v@5",
            &b,
            "receive -u tank/ployz/v",
        );
        assert!(format!("{wrong:?}").contains("does not"), "{wrong:?}");
        let _ = std::fs::remove_dir_all(a.parent().unwrap_or(&a));
        Ok(())
    }

    #[test]
    fn held_snapshots_are_busy_and_version_is_unknown() -> Result<()> {
        let (a, _) = dirs("hold")?;
        zfs(&a, "create -p tank/v")?;
        zfs(&a, "snapshot -o ployz:migration=ns/m tank/v@1")?;
        zfs(&a, "hold ployz tank/v@1")?;
        assert!(format!("{:?}", zfs(&a, "hold ployz tank/v@1")).contains("tag already exists"));
        assert!(format!("{:?}", zfs(&a, "destroy tank/v@1")).contains("dataset is busy"));
        assert_eq!(
            zfs(
                &a,
                "get -H -p -o name,property,value userrefs,ployz:migration tank/v@1"
            )?,
            "tank/v@1\tuserrefs\t1\ntank/v@1\tployz:migration\tns/m\n"
        );
        zfs(&a, "release ployz tank/v@1")?;
        zfs(&a, "destroy tank/v@1")?;
        assert!(format!("{:?}", zfs(&a, "version")).contains("unrecognized command"));
        let _ = std::fs::remove_dir_all(a.parent().unwrap_or(&a));
        Ok(())
    }
}

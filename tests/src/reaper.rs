//! Everything the harness creates is registered here before use, and removed in reverse order
//! when the environment is dropped, when a signal arrives (Ctrl-C in `make demo`), and at the
//! start of the next run if a previous run was killed before it could clean up.
//!
//! Resources are recorded in a journal file under the run directory so the next run can undo
//! what a crashed one left: processes are killed by PID (after checking the PID still runs the
//! recorded program), cgroup trees emptied (their processes killed: containers, shims) and
//! removed, network namespaces and links deleted, directories removed, sysctls restored.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Something to remove at teardown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// A process (and its process group) started by the harness; `exe` is its program, used to
    /// make sure a recycled PID is never killed.
    Process { pid: i32, exe: String },
    /// A network namespace (`ip netns`).
    Netns(String),
    /// A network link in the host namespace.
    Link(String),
    /// A directory the harness created (removed recursively).
    Dir(PathBuf),
    /// An empty directory the harness created as a mountpoint (removed only if empty).
    EmptyDir(PathBuf),
    /// A cgroup `/NAME` in every cgroup v1 hierarchy: every process in its subtree is killed,
    /// then the subtree removed. Containers and shims of a test machine live in these.
    Cgroup(String),
    /// A sysctl (`kernel.panic`) and the value to restore (kubelet changes a few).
    Sysctl { key: String, value: String },
}

impl Resource {
    fn to_line(&self) -> String {
        match self {
            Resource::Process { pid, exe } => format!("process {pid} {exe}"),
            Resource::Netns(n) => format!("netns {n}"),
            Resource::Link(n) => format!("link {n}"),
            Resource::Dir(p) => format!("dir {}", p.display()),
            Resource::EmptyDir(p) => format!("emptydir {}", p.display()),
            Resource::Cgroup(n) => format!("cgroup {n}"),
            Resource::Sysctl { key, value } => format!("sysctl {key} {value}"),
        }
    }

    fn from_line(line: &str) -> Option<Self> {
        let (kind, rest) = line.split_once(' ')?;
        Some(match kind {
            "process" => {
                let (pid, exe) = rest.split_once(' ')?;
                Resource::Process {
                    pid: pid.parse().ok()?,
                    exe: exe.to_string(),
                }
            }
            "netns" => Resource::Netns(rest.to_string()),
            "link" => Resource::Link(rest.to_string()),
            "dir" => Resource::Dir(rest.into()),
            "emptydir" => Resource::EmptyDir(rest.into()),
            "cgroup" => Resource::Cgroup(rest.to_string()),
            "sysctl" => {
                let (key, value) = rest.split_once(' ')?;
                Resource::Sysctl {
                    key: key.to_string(),
                    value: value.to_string(),
                }
            }
            _ => return None,
        })
    }

    /// Removes the resource; failures are reported, not fatal: teardown goes on.
    fn release(&self) {
        match self {
            Resource::Process { pid, exe } => stop_process(*pid, exe),
            Resource::Netns(n) => {
                let _ = Command::new("ip").args(["netns", "delete", n]).output();
            }
            Resource::Link(n) => {
                let _ = Command::new("ip").args(["link", "delete", n]).output();
            }
            Resource::Dir(p) => {
                if p.exists()
                    && let Err(e) = fs::remove_dir_all(p)
                {
                    eprintln!("[harness] cannot remove {}: {e}", p.display());
                }
            }
            Resource::EmptyDir(p) => {
                let _ = fs::remove_dir(p);
            }
            Resource::Cgroup(n) => remove_cgroup(n),
            Resource::Sysctl { key, value } => {
                if let Err(e) = fs::write(sysctl_path(key), value) {
                    eprintln!("[harness] cannot restore sysctl {key}={value}: {e}");
                }
            }
        }
    }
}

/// `/proc/sys/...` of a dotted sysctl name.
pub fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// The current value of a sysctl.
pub fn sysctl(key: &str) -> Result<String> {
    let p = sysctl_path(key);
    Ok(fs::read_to_string(&p)
        .with_context(|| format!("reading {}", p.display()))?
        .trim()
        .to_string())
}

/// The cgroup v1 hierarchies (`/sys/fs/cgroup/H`, not the cgroup2 `unified` one).
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/fs/cgroup") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "unified")
        .map(|e| e.path())
        .filter(|h| h.join("cgroup.procs").exists())
        .collect()
}

/// `/sys/fs/cgroup/H/NAME` for every cgroup v1 hierarchy H that has it.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    cgroup_hierarchies()
        .into_iter()
        .map(|h| h.join(name))
        .filter(|p| p.is_dir())
        .collect()
}

/// Directories of a cgroup subtree, deepest first.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subtree(&e.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

/// Every process in the subtree of `/NAME` in any hierarchy.
fn cgroup_pids(name: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup_dirs(name)
        .iter()
        .flat_map(|d| subtree(d))
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Kills every process of the cgroup tree `/NAME` (SIGKILL: containers and shims of a machine
/// being torn down have nothing to save), waits until it is empty, removes it.
pub fn remove_cgroup(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pids = cgroup_pids(name);
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!("[harness] cgroup /{name} still has processes {pids:?}");
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for top in cgroup_dirs(name) {
        for d in subtree(&top) {
            // An emptied cgroup can take a moment to become removable (EBUSY).
            let gone = || !d.exists() || fs::remove_dir(&d).is_ok();
            let until = Instant::now() + Duration::from_secs(5);
            while !gone() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// True while `pid` is alive and runs `exe` (compared by program name).
fn runs(pid: i32, exe: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let name = |s: &[u8]| {
        Path::new(std::str::from_utf8(s).unwrap_or_default())
            .file_name()
            .map(|n| n.to_os_string())
    };
    // A zombie has an empty cmdline: it is gone for our purposes (its parent reaps it).
    !argv0.is_empty() && name(argv0) == name(exe.as_bytes())
}

/// SIGTERM to the process group, then SIGKILL if it does not exit within a few seconds.
pub fn stop_process(pid: i32, exe: &str) {
    if !runs(pid, exe) {
        return;
    }
    let p = Pid::from_raw(pid);
    let _ = killpg(p, Signal::SIGTERM).or_else(|_| kill(p, Signal::SIGTERM));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !runs(pid, exe) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("[harness] {exe} (pid {pid}) ignored SIGTERM; sending SIGKILL");
    let _ = killpg(p, Signal::SIGKILL).or_else(|_| kill(p, Signal::SIGKILL));
}

struct State {
    journal: PathBuf,
    resources: Vec<Resource>,
}

fn state() -> &'static Mutex<Option<State>> {
    static STATE: OnceLock<Mutex<Option<State>>> = OnceLock::new();
    STATE.get_or_init(|| Mutex::new(None))
}

fn lock() -> MutexGuard<'static, Option<State>> {
    // A panic while holding the lock must not stop teardown.
    state().lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts a run: takes the machine-wide lock file (so two suites never share the fixed network
/// names), undoes whatever a crashed previous run left, and opens a fresh journal.
/// Returns the lock file, which must live as long as the run.
pub fn begin(run_root: &Path) -> Result<File> {
    fs::create_dir_all(run_root).with_context(|| format!("creating {}", run_root.display()))?;
    let lock_path = run_root.with_extension("lock");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    lock_file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another ployz test environment is running on this machine (lock {} is held); wait for it to finish",
            lock_path.display()
        )
    })?;

    let journal = run_root.join("resources");
    if let Ok(text) = fs::read_to_string(&journal) {
        let stale: Vec<Resource> = text.lines().filter_map(Resource::from_line).collect();
        if !stale.is_empty() {
            eprintln!(
                "[harness] cleaning up {} resources left by a previous run",
                stale.len()
            );
        }
        for r in stale.iter().rev() {
            r.release();
        }
    }
    fs::write(&journal, "").with_context(|| format!("writing {}", journal.display()))?;
    *lock() = Some(State {
        journal,
        resources: vec![],
    });
    install_signal_handler();
    Ok(lock_file)
}

/// Records a resource before (or right after) it is created.
pub fn register(r: Resource) {
    let mut guard = lock();
    if let Some(st) = guard.as_mut() {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&st.journal) {
            let _ = writeln!(f, "{}", r.to_line());
        }
        st.resources.push(r);
    }
}

/// Releases one resource now (for example a process a test stops on purpose).
pub fn release(r: &Resource) {
    r.release();
    let mut guard = lock();
    if let Some(st) = guard.as_mut() {
        st.resources.retain(|x| x != r);
        rewrite_journal(st);
    }
}

fn rewrite_journal(st: &State) {
    let text: String = st.resources.iter().map(|r| r.to_line() + "\n").collect();
    let _ = fs::write(&st.journal, text);
}

/// Releases everything, newest first, and empties the journal.
pub fn release_all() {
    let resources = {
        let mut guard = lock();
        match guard.as_mut() {
            Some(st) => std::mem::take(&mut st.resources),
            None => return,
        }
    };
    for r in resources.iter().rev() {
        r.release();
    }
    let guard = lock();
    if let Some(st) = guard.as_ref() {
        rewrite_journal(st);
    }
}

fn install_signal_handler() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ]);
        match signals {
            Ok(mut signals) => {
                std::thread::spawn(move || {
                    if let Some(sig) = signals.forever().next() {
                        eprintln!("\n[harness] signal {sig}: tearing the environment down");
                        release_all();
                        std::process::exit(128 + sig);
                    }
                });
            }
            Err(e) => eprintln!("[harness] cannot install signal handler: {e}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_round_trip() {
        for r in [
            Resource::Process {
                pid: 42,
                exe: "/x/kube apiserver".into(),
            },
            Resource::Netns("pz-machine-a".into()),
            Resource::Link("pz-br0".into()),
            Resource::Dir("/tmp/a b".into()),
            Resource::EmptyDir("/tank".into()),
            Resource::Cgroup("pz-machine-a".into()),
            Resource::Sysctl {
                key: "kernel.panic".into(),
                value: "0".into(),
            },
        ] {
            assert_eq!(Resource::from_line(&r.to_line()), Some(r));
        }
        assert_eq!(Resource::from_line("bogus"), None);
    }
}

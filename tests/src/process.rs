//! Long-running processes of the environment: started with their output in a log file, in a
//! process group of their own, registered with the reaper, stopped by PID.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::reaper::{self, Resource};

/// A running process of the environment.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    resource: Resource,
}

impl Proc {
    /// Starts `cmd`; `exe` is the program the process ends up running (after any `exec` in a
    /// wrapper), recorded so that a stale PID is never mistaken for it.
    pub fn spawn(name: &str, mut cmd: Command, exe: &str, log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let log = log_dir.join(format!("{name}.log"));
        // Appended: a process restarted under the same name (a killed agent) keeps the log
        // of its previous life for the post-mortem.
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let resource = Resource::Process {
            pid: child.id() as i32,
            exe: exe.to_string(),
        };
        reaper::register(resource.clone());
        Ok(Self {
            name: name.to_string(),
            log,
            child,
            resource,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of the log when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// Kills the process at once (SIGKILL, no grace), reaps it, then forgets it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        reaper::release(&self.resource);
    }

    /// Stops the process (SIGTERM, then SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        reaper::release(&self.resource);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a short command to completion; fails with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds a command from a program and arguments.
pub fn command<I, S>(program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

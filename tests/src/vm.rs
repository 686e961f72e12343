//! One QEMU guest with real OpenZFS (see tests/vm/build-image.sh and
//! shared/notes/openzfs-vm.md): booted on a throwaway overlay of the cached image, it runs a
//! test binary built on the host from a 9p share and powers off. The qemu process is stopped
//! by PID and the overlay removed, also when the run fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::process::{Proc, run, tail};
use crate::reaper::{self, Resource};
use crate::wait::wait_for;

/// The cached image (built on first use; a no-op afterwards).
pub fn image(root: &Path) -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PLOYZ_VM_IMAGE") {
        return Ok(dir.into());
    }
    let out = run(&mut Command::new(root.join("tests/vm/build-image.sh")))?;
    Ok(PathBuf::from(out.trim()))
}

/// What a guest run left in its share.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code of the command in the guest.
    pub code: i32,
    /// Its output.
    pub output: String,
}

/// Boots the guest, runs `binary ARGS` (copied into the share) with `env`, and returns its
/// outcome. `work` holds the overlay, the share and the serial log.
pub fn run_in_guest(
    image: &Path,
    work: &Path,
    binary: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Outcome> {
    let _ = std::fs::remove_dir_all(work);
    let share = work.join("share");
    std::fs::create_dir_all(&share)?;
    reaper::register(Resource::Dir(work.to_path_buf()));
    std::fs::copy(binary, share.join("suite"))
        .with_context(|| format!("copying {}", binary.display()))?;
    let exports: String = env
        .iter()
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();
    std::fs::write(
        share.join("run.sh"),
        format!(
            "{exports}cd /share && ./suite {} >/share/output.txt 2>&1; echo $? >/share/exit\n",
            args.join(" ")
        ),
    )?;
    let overlay = work.join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(image.join("root.qcow2"))
        .arg(&overlay))?;
    let serial = work.join("serial.log");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2048",
    ])
    .args(["-display", "none", "-no-reboot", "-monitor", "none"])
    .arg("-kernel")
    .arg(image.join("vmlinuz"))
    .arg("-initrd")
    .arg(image.join("initrd.img"))
    .args([
        "-append",
        "console=ttyS0 root=/dev/vda rw quiet init=/sbin/ployz-init",
    ])
    .arg("-drive")
    .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag=share,security_model=none,id=share",
        share.display()
    ))
    .arg("-serial")
    .arg(format!("file:{}", serial.display()));
    let mut vm = Proc::spawn("openzfs-vm", qemu, "qemu-system-x86_64", work)?;
    let exit = share.join("exit");
    let waited = wait_for("the guest to finish", timeout, || {
        if exit.exists() {
            return Ok(true);
        }
        vm.check_running().map(|()| false)
    });
    // The guest powers itself off; a guest that hangs is stopped here either way.
    let _ = wait_for("the guest to power off", Duration::from_secs(30), || {
        Ok(vm.check_running().is_err())
    });
    vm.stop();
    if let Err(e) = waited {
        bail!("{e:#}; end of the serial console:\n{}", tail(&serial, 40));
    }
    let code: i32 = std::fs::read_to_string(&exit)?
        .trim()
        .parse()
        .context("exit code")?;
    let output = std::fs::read_to_string(share.join("output.txt")).unwrap_or_default();
    let _ = std::fs::remove_file(&overlay);
    Ok(Outcome { code, output })
}

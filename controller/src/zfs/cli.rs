//! [`Zfs`] over the `zfs` command line.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::process::{Child, Command};

use super::{
    DatasetName, HOLD_TAG, Inventory, ReceiveArgs, ResumeToken, SendArgs, SnapshotName, Space, Zfs,
    ZfsError, parse,
};
use crate::api::ZfsInfo;

const PIPE_SIZE: i32 = 1 << 20;

/// Runs `zfs` as a child process. `prefix` runs it through a wrapper (for example `nsenter`
/// into a test machine's namespaces); empty in production.
#[derive(Debug, Clone)]
pub struct ZfsCli {
    zfs: PathBuf,
    prefix: Vec<String>,
}

impl Default for ZfsCli {
    fn default() -> Self {
        Self::new("zfs")
    }
}

impl ZfsCli {
    pub fn new(zfs: impl Into<PathBuf>) -> Self {
        Self {
            zfs: zfs.into(),
            prefix: vec![],
        }
    }

    /// Runs every command as `PREFIX... zfs ARGS...`.
    pub fn with_prefix(mut self, prefix: Vec<String>) -> Self {
        self.prefix = prefix;
        self
    }

    fn command<S: AsRef<str>>(&self, args: &[S]) -> Command {
        let mut c = match self.prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&self.zfs);
                c
            }
            None => Command::new(&self.zfs),
        };
        c.args(args.iter().map(AsRef::as_ref));
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    fn describe<S: AsRef<str>>(args: &[S]) -> String {
        let words: Vec<&str> = args.iter().map(AsRef::as_ref).take(3).collect();
        format!("zfs {}", words.join(" "))
    }

    /// Runs to completion; stdout and stderr on success, a classified error otherwise.
    async fn run_both<S: AsRef<str>>(&self, args: &[S]) -> Result<(String, String), ZfsError> {
        let what = Self::describe(args);
        let out = self
            .command(args)
            .output()
            .await
            .map_err(|source| ZfsError::Io {
                command: what.clone(),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            Ok((String::from_utf8_lossy(&out.stdout).into_owned(), stderr))
        } else {
            Err(ZfsError::from_stderr(&what, &stderr))
        }
    }

    /// Runs to completion; stdout on success, a classified error otherwise.
    async fn run<S: AsRef<str>>(&self, args: &[S]) -> Result<String, ZfsError> {
        self.run_both(args).await.map(|(stdout, _)| stdout)
    }

    /// Retries while the dataset is busy (a receive finishing, a mount in use).
    async fn run_retrying_busy(&self, args: &[String]) -> Result<String, ZfsError> {
        (|| self.run(args))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_times(6),
            )
            .when(|e| matches!(e, ZfsError::Busy(_)))
            .await
    }

    fn spawn(&self, args: &[String], stdin: Stdio, stdout: Stdio) -> Result<Child, ZfsError> {
        let mut c = self.command(args);
        c.stdin(stdin).stdout(stdout).stderr(Stdio::piped());
        let child = c.spawn().map_err(|source| ZfsError::Io {
            command: Self::describe(args),
            source,
        })?;
        // Streams move through these pipes: 1 MiB instead of the default 64 KiB means far
        // fewer wake-ups of the daemon and of us. Best effort (capped by pipe-max-size).
        let grow = |fd: std::os::fd::BorrowedFd<'_>| {
            let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        };
        if let Some(out) = &child.stdout {
            grow(out.as_fd());
        }
        if let Some(inp) = &child.stdin {
            grow(inp.as_fd());
        }
        Ok(child)
    }
}

fn props_args(props: &[(&str, &str)]) -> Vec<String> {
    props
        .iter()
        .flat_map(|(k, v)| ["-o".to_string(), format!("{k}={v}")])
        .collect()
}

impl Zfs for ZfsCli {
    async fn info(&self) -> Result<ZfsInfo, ZfsError> {
        match self.run(&["version"]).await {
            Ok(out) => Ok(parse::version(&out)),
            // Legacy ZFS has no `version` subcommand; anything else (no daemon, no binary) is
            // a real failure, which the next call shows.
            Err(ZfsError::Failed { .. }) => {
                self.run(&["list", "-H", "-o", "name"]).await?;
                Ok(parse::legacy())
            }
            Err(e) => Err(e),
        }
    }

    async fn space(&self, dataset: &DatasetName) -> Result<Space, ZfsError> {
        let args = [
            "get",
            "-H",
            "-p",
            "-o",
            "property,value",
            "used,available,mountpoint",
            dataset.as_str(),
        ];
        let out = self.run(&args).await?;
        let mut space = Space::default();
        for line in out.lines() {
            let (prop, value) = line.split_once('\t').unwrap_or((line, ""));
            let number = || {
                value.parse::<u64>().map_err(|_| ZfsError::Parse {
                    command: "zfs get".into(),
                    detail: format!("{prop} of {dataset} is not a number: {value:?}"),
                })
            };
            match prop {
                "used" => space.used = number()?,
                "available" => space.available = number()?,
                "mountpoint" => {
                    space.mountpoint = Some(value.to_string()).filter(|m| m.starts_with('/'))
                }
                _ => {}
            }
        }
        Ok(space)
    }

    async fn inventory(&self, root: &DatasetName, info: &ZfsInfo) -> Result<Inventory, ZfsError> {
        let mut props: Vec<&str> = parse::BASE_PROPS.to_vec();
        if info.capabilities.resume_tokens {
            props.extend_from_slice(parse::MODERN_PROPS);
        }
        props.extend_from_slice(parse::PLOYZ_PROPS);
        let props = props.join(",");
        let args = [
            "get",
            "-H",
            "-p",
            "-r",
            "-o",
            "name,property,value",
            &props,
            root.as_str(),
        ];
        let out = self.run(&args).await?;
        let mut inv = parse::inventory("zfs get", &out)?;
        if info.capabilities.bookmarks {
            let out = self
                .run(&[
                    "list",
                    "-H",
                    "-p",
                    "-r",
                    "-t",
                    "bookmark",
                    "-o",
                    "name,guid,createtxg",
                    root.as_str(),
                ])
                .await?;
            parse::bookmarks("zfs list", &out, &mut inv)?;
        }
        Ok(inv)
    }

    async fn create(&self, dataset: &DatasetName, props: &[(&str, &str)]) -> Result<(), ZfsError> {
        let mut args = vec!["create".to_string(), "-p".into()];
        args.extend(props_args(props));
        args.push(dataset.to_string());
        self.run(&args).await.map(drop)
    }

    async fn snapshot(&self, snap: &SnapshotName, props: &[(&str, &str)]) -> Result<(), ZfsError> {
        let mut args = vec!["snapshot".to_string()];
        args.extend(props_args(props));
        args.push(snap.to_string());
        self.run(&args).await.map(drop)
    }

    async fn hold(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        match self.run(&["hold", HOLD_TAG, &snap.to_string()]).await {
            // Already held by ployz: holding is idempotent.
            Err(ZfsError::Failed { stderr, .. }) if stderr.contains("tag already exists") => Ok(()),
            other => other.map(drop),
        }
    }

    async fn release(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        match self.run(&["release", HOLD_TAG, &snap.to_string()]).await {
            Err(ZfsError::Failed { stderr, .. }) if stderr.contains("no such tag") => Ok(()),
            other => other.map(drop),
        }
    }

    async fn destroy_snapshot(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        self.run_retrying_busy(&["destroy".into(), snap.to_string()])
            .await
            .map(drop)
    }

    async fn destroy_dataset(&self, dataset: &DatasetName) -> Result<(), ZfsError> {
        // `destroy -r` on a mounted tree fails with "busy" once per level: unmount first.
        let _ = self.unmount(dataset).await;
        self.run_retrying_busy(&["destroy".into(), "-r".into(), dataset.to_string()])
            .await
            .map(drop)
    }

    async fn rename(&self, from: &DatasetName, to: &DatasetName) -> Result<(), ZfsError> {
        // zfs-fuse refuses a rename as busy for a moment after a snapshot or an unmount.
        self.run_retrying_busy(&["rename".into(), from.to_string(), to.to_string()])
            .await
            .map(drop)
    }

    async fn set(&self, name: &str, prop: &str, value: &str) -> Result<(), ZfsError> {
        // `name` is a dataset or snapshot; validate it as one of them.
        if name.contains('@') {
            name.parse::<SnapshotName>()?;
        } else {
            name.parse::<DatasetName>()?;
        }
        if prop.starts_with('-') || value.contains('\n') {
            return Err(ZfsError::Failed {
                command: "zfs set".into(),
                stderr: format!("refusing property {prop:?}={value:?}"),
            });
        }
        self.run(&["set", &format!("{prop}={value}"), name])
            .await
            .map(drop)
    }

    async fn properties(
        &self,
        dataset: &DatasetName,
        props: &[&str],
    ) -> Result<Vec<super::Property>, ZfsError> {
        if props.is_empty()
            || props
                .iter()
                .any(|p| p.is_empty() || p.starts_with('-') || p.contains(','))
        {
            return Err(ZfsError::Failed {
                command: "zfs get".into(),
                stderr: format!("refusing property list {props:?}"),
            });
        }
        let list = props.join(",");
        let args = [
            "get",
            "-H",
            "-o",
            "property,value,source",
            &list,
            dataset.as_str(),
        ];
        let out = self.run(&args).await?;
        parse::properties("zfs get", &out)
    }

    async fn inherit(&self, dataset: &DatasetName, prop: &str) -> Result<(), ZfsError> {
        if prop.starts_with('-') {
            return Err(ZfsError::Failed {
                command: "zfs inherit".into(),
                stderr: format!("refusing property {prop:?}"),
            });
        }
        self.run(&["inherit", prop, dataset.as_str()])
            .await
            .map(drop)
    }

    async fn rollback(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        self.run_retrying_busy(&["rollback".into(), "-r".into(), snap.to_string()])
            .await
            .map(drop)
    }

    async fn mount(&self, dataset: &DatasetName) -> Result<(), ZfsError> {
        match self.run(&["mount", dataset.as_str()]).await {
            Err(ZfsError::Failed { stderr, .. }) if stderr.contains("already mounted") => Ok(()),
            other => other.map(drop),
        }
    }

    async fn unmount(&self, dataset: &DatasetName) -> Result<(), ZfsError> {
        match self.run(&["unmount", dataset.as_str()]).await {
            Err(ZfsError::Failed { stderr, .. }) if stderr.contains("not currently mounted") => {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    async fn estimate(&self, send: &SendArgs, info: &ZfsInfo) -> Result<Option<u64>, ZfsError> {
        if !info.capabilities.size_estimates {
            return Ok(None);
        }
        let mut args = vec!["send".to_string(), "-n".into(), "-v".into(), "-P".into()];
        args.extend(send.to_args());
        let out = self.run(&args).await?;
        parse::send_estimate("zfs send -nvP", &out).map(Some)
    }

    fn send(&self, send: &SendArgs) -> Result<Child, ZfsError> {
        let mut args = vec!["send".to_string()];
        args.extend(send.to_args());
        self.spawn(&args, Stdio::null(), Stdio::piped())
    }

    fn receive(&self, recv: &ReceiveArgs) -> Result<Child, ZfsError> {
        let mut args = vec!["receive".to_string()];
        args.extend(recv.to_args());
        self.spawn(&args, Stdio::piped(), Stdio::null())
    }

    async fn resume_token(&self, token: &str) -> Result<ResumeToken, ZfsError> {
        let args = ["send", "-n", "-v", "-t", token];
        let (stdout, stderr) = self.run_both(&args).await?;
        parse::resume_token(&Self::describe(&args), &format!("{stdout}\n{stderr}"))
    }

    async fn abort_receive(&self, dataset: &DatasetName) -> Result<(), ZfsError> {
        match self.run(&["receive", "-A", dataset.as_str()]).await {
            Err(ZfsError::Failed { stderr, .. })
                if stderr.contains("does not have any resumable receive state") =>
            {
                Ok(())
            }
            Err(ZfsError::NotFound(_)) => Ok(()),
            other => other.map(drop),
        }
    }
}

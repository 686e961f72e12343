//! Errors of ZFS commands, classified from their stderr so callers can act on them (retry,
//! refuse, explain) and users read what happened and what to do.

use super::name::InvalidZfsName;

#[derive(Debug, thiserror::Error)]
pub enum ZfsError {
    #[error(transparent)]
    InvalidName(#[from] InvalidZfsName),
    #[error("ZFS is not available on this machine: {0}")]
    Unavailable(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} is busy (held, mounted or in use); retry later or release what holds it")]
    Busy(String),
    #[error(
        "the target's newest snapshot does not match the incremental base: {0}; the plan must be recomputed from the snapshots both sides have"
    )]
    WrongBase(String),
    #[error(
        "the target dataset was modified since the common snapshot: {0}; ployz will not overwrite it (inspect it, then roll it back or destroy it yourself)"
    )]
    TargetModified(String),
    #[error(
        "the target dataset already exists: {0}; a full send would overwrite it, so ployz refuses"
    )]
    TargetExists(String),
    #[error(
        "the target pool is out of space: {0}; free space on the target or choose another machine"
    )]
    OutOfSpace(String),
    #[error("the stream broke before it was complete: {0}; the transfer can be retried")]
    StreamBroken(String),
    #[error("unexpected output from {command}: {detail}")]
    Parse { command: String, detail: String },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("running {command}: {source}")]
    Io {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

impl ZfsError {
    /// Classifies a failed command by its stderr.
    pub fn from_stderr(command: &str, stderr: &str) -> Self {
        // zfs wraps long messages onto several lines; match on the text, not the layout.
        let s = stderr.split_whitespace().collect::<Vec<_>>().join(" ");
        let has = |p: &str| s.contains(p);
        if has("zfs-fuse daemon is running")
            || has("failed to initialize ZFS library")
            || has("/dev/zfs") && has("No such file")
        {
            ZfsError::Unavailable(s)
        } else if has("does not match incremental source") {
            ZfsError::WrongBase(s)
        } else if has("has been modified") {
            ZfsError::TargetModified(s)
        } else if has("must specify -F to overwrite") || has("destination") && has("exists") {
            ZfsError::TargetExists(s)
        } else if has("out of space") {
            ZfsError::OutOfSpace(s)
        } else if has("invalid backup stream")
            || has("checksum mismatch")
            || has("incomplete stream")
            || has("Input/output error") && command.contains("receive")
        {
            ZfsError::StreamBroken(s)
        } else if has("dataset is busy") || has("pool or dataset is busy") {
            ZfsError::Busy(s)
        } else if has("dataset does not exist")
            || has("could not find any snapshots")
            || has("no such pool")
        {
            ZfsError::NotFound(s)
        } else {
            ZfsError::Failed {
                command: command.to_string(),
                stderr: s,
            }
        }
    }

    /// Worth retrying as is (the same command may succeed later).
    pub fn is_transient(&self) -> bool {
        matches!(self, ZfsError::Busy(_) | ZfsError::StreamBroken(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_messages_zfs_prints() {
        type Check = fn(&ZfsError) -> bool;
        let cases: [(&str, Check); 8] = [
            (
                "cannot receive incremental stream: most recent snapshot of tank/x does not\nmatch incremental source",
                |e| matches!(e, ZfsError::WrongBase(_)),
            ),
            (
                "cannot receive incremental stream: destination tank/x has been modified\nsince most recent snapshot",
                |e| matches!(e, ZfsError::TargetModified(_)),
            ),
            (
                "cannot receive new filesystem stream: destination 'tank/x' exists\nmust specify -F to overwrite it",
                |e| matches!(e, ZfsError::TargetExists(_)),
            ),
            ("cannot receive new filesystem stream: out of space", |e| {
                matches!(e, ZfsError::OutOfSpace(_))
            }),
            ("cannot receive: invalid backup stream", |e| {
                matches!(e, ZfsError::StreamBroken(_))
            }),
            ("cannot destroy 'tank/v@a': dataset is busy", |e| {
                matches!(e, ZfsError::Busy(_))
            }),
            ("cannot open 'tank/nope': dataset does not exist", |e| {
                matches!(e, ZfsError::NotFound(_))
            }),
            (
                "connect: No such file or directory\nPlease make sure that the zfs-fuse daemon is running.",
                |e| matches!(e, ZfsError::Unavailable(_)),
            ),
        ];
        for (stderr, check) in cases {
            let e = ZfsError::from_stderr("zfs receive", stderr);
            assert!(check(&e), "{stderr:?} -> {e:?}");
        }
        assert!(ZfsError::from_stderr("zfs", "cannot destroy: dataset is busy").is_transient());
        assert!(!ZfsError::from_stderr("zfs", "out of space").is_transient());
    }
}

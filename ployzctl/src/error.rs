//! One error type for the CLI, mapped to documented exit codes:
//! 0 success, 1 the operation failed, 2 the command line was wrong.

use std::fmt;

#[derive(Debug)]
pub enum CliError {
    /// Bad input: exit code 2, like clap's own usage errors.
    Usage(String),
    /// Anything else: exit code 1.
    Failed(anyhow::Error),
}

impl CliError {
    pub fn usage(e: impl fmt::Display) -> Self {
        CliError::Usage(e.to_string())
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError::Failed(e.into())
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(msg) => write!(f, "{msg}"),
            // The whole cause chain, on one line: "what failed: because: because".
            CliError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

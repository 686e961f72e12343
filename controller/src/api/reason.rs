//! Every reason a Migration can be in its phase or end with: the planner's refusals, the
//! steps of a move, and the executor's failures. `status.reason` and the Events carry its
//! CamelCase name.

use strum::{EnumString, IntoStaticStr, VariantArray};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumString, IntoStaticStr, VariantArray)]
pub enum Reason {
    // The planner's refusals (the Migration fails before anything is touched).
    WorkloadNotFound,
    AmbiguousWorkload,
    NoZfsVolumes,
    NotZfsVolume,
    VolumeNotFound,
    /// The claim names a PersistentVolume that is bound to another claim (the
    /// cross-namespace `volumeName` trick).
    ForeignVolume,
    VolumesOnSeveralMachines,
    UnknownMachine,
    SameMachine,
    SourceMismatch,
    TargetDraining,
    MachineNotReady,
    IncompatibleZfs,
    DuplicateMigration,
    InvalidDataset,
    InvalidSpec,

    // Progress.
    Planned,
    Snapshotted,
    AnotherPass,
    PreCopyDone,
    Succeeded,

    // Why a move is rolled back (and then ends Failed, or Cancelled).
    Cancelled,
    WorkloadGone,
    InsufficientSpace,
    TransferRefused,
    TargetDiverged,
    ReceiveFailed,
    TransferFailed,
    PromoteFailed,
    CutoverTimeout,
    TargetUnreachable,
    TargetNotReady,
    /// The source's agent stopped heart-beating before the target had a complete copy.
    SourceUnreachable,
    /// The operator ended it (`ployzctl migrate abandon`).
    Abandoned,
    /// What status says (the plan, a recorded PV or placement) is not what the live objects
    /// say: something other than the agents wrote it. Nothing is acted on from it.
    PlanMismatch,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Parses a recorded `status.reason`; an unknown one (written by another version) is
    /// treated as a plain failure.
    pub fn parse(s: &str) -> Reason {
        s.parse().unwrap_or(Reason::TransferFailed)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_through_its_name() {
        for r in Reason::VARIANTS {
            assert_eq!(Reason::parse(r.as_str()), *r);
        }
    }
}

//! `ployzctl migrate ...`

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use ployz::api::Migration;
use ployz::manifest::{self, Format, MigrationRequest};

use crate::cli::MigrationArgs;
use crate::error::CliError;

impl MigrationArgs {
    fn to_request(&self) -> MigrationRequest {
        MigrationRequest {
            workload: self.workload.clone(),
            to: self.to.clone(),
            from: self.from.clone(),
            name: self.name.clone(),
            bandwidth_limit: self.bandwidth_limit.clone().map(Quantity),
            compression: self.compression.map(Into::into),
            source_copy: self.source_copy.map(Into::into),
        }
    }
}

/// Builds the Migration and checks it against the CRD's own CEL rules, so a manifest that the
/// API server would refuse fails here, with the server's message, before anyone applies it.
pub fn build(args: &MigrationArgs) -> Result<Migration, CliError> {
    let migration = args.to_request().to_migration().map_err(CliError::usage)?;
    migration.validate_cel().map_err(|errs| {
        let reasons: Vec<String> = errs.into_vec().iter().map(ToString::to_string).collect();
        CliError::Usage(format!(
            "the manifest would be refused: {}",
            reasons.join("; ")
        ))
    })?;
    Ok(migration)
}

/// `migrate render-manifest`: print the Migration.
pub fn render_manifest(args: &MigrationArgs, format: Format) -> Result<String, CliError> {
    Ok(manifest::render(&build(args)?, format)?)
}

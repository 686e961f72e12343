//! Rendering objects as manifests: the Migration that `ployzctl migrate render-manifest` prints,
//! and the generated CRDs. Pure and deterministic: the same input gives the same bytes, so
//! GitOps diffs stay clean.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use serde::Serialize;

use crate::api::{Compression, Migration, MigrationSpec, SourceCopy, TransferOptions};
use crate::names::{self, MachineName, ServiceRef};

/// Output format of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

/// Why a manifest could not be serialized.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot serialize as YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
    #[error("cannot serialize as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Serializes `value` in `format`, ending with a newline.
pub fn render<T: Serialize>(value: &T, format: Format) -> Result<String, RenderError> {
    let mut out = match format {
        Format::Yaml => serde_saphyr::to_string(value)?,
        Format::Json => serde_json::to_string_pretty(value)?,
    };
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// Several objects as one stream: a YAML multi-document or a JSON `List`, as kubectl prints.
pub fn render_all<T: Serialize>(values: &[T], format: Format) -> Result<String, RenderError> {
    match format {
        Format::Yaml => {
            let mut out = String::new();
            for v in values {
                out.push_str("---\n");
                out.push_str(&render(v, format)?);
            }
            Ok(out)
        }
        Format::Json => render(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values}),
            format,
        ),
    }
}

/// What a user asks for on the command line, already validated name by name.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationRequest {
    pub workload: ServiceRef,
    pub to: MachineName,
    pub from: Option<MachineName>,
    /// Object name; default `SERVICE-to-MACHINE`.
    pub name: Option<String>,
    pub bandwidth_limit: Option<Quantity>,
    pub compression: Option<Compression>,
    pub source_copy: Option<SourceCopy>,
}

/// A request that cannot become a Migration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "--from and --to both name machine {0:?}: a migration moves a workload to another machine; pick a different --to"
    )]
    SameMachine(String),
    #[error("--name: {0}")]
    InvalidName(#[from] names::InvalidName),
    #[error("--bandwidth-limit: {0}")]
    BandwidthLimit(String),
}

impl MigrationRequest {
    /// A request with only the required parts.
    pub fn new(workload: ServiceRef, to: MachineName) -> Self {
        Self {
            workload,
            to,
            from: None,
            name: None,
            bandwidth_limit: None,
            compression: None,
            source_copy: None,
        }
    }

    /// The Migration object for this request. Only what the user chose is set, so the
    /// manifest stays minimal and the controller's defaults apply to the rest.
    pub fn to_migration(&self) -> Result<Migration, RequestError> {
        if self.from.as_ref() == Some(&self.to) {
            return Err(RequestError::SameMachine(self.to.to_string()));
        }
        let name = match &self.name {
            Some(n) => {
                names::validate(names::NameKind::Migration, n)?;
                n.clone()
            }
            None => names::migration_name(&self.workload.service, &self.to),
        };
        if let Some(q) = &self.bandwidth_limit {
            crate::api::quantity::bandwidth_limit(&q.0).map_err(RequestError::BandwidthLimit)?;
        }
        let transfer = (self.bandwidth_limit.is_some() || self.compression.is_some()).then(|| {
            TransferOptions {
                bandwidth_limit: self.bandwidth_limit.clone(),
                compression: self.compression,
            }
        });
        Ok(Migration {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(self.workload.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: MigrationSpec {
                service: self.workload.service.clone(),
                to: self.to.to_string(),
                from: self.from.as_ref().map(ToString::to_string),
                transfer,
                timeouts: None,
                source_copy: self.source_copy,
            },
            status: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(r: &str, to: &str) -> MigrationRequest {
        MigrationRequest::new(
            r.parse().unwrap_or_else(|e| panic!("{e}")),
            to.parse().unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn renders_a_minimal_migration_as_yaml() {
        let m = ok(request("production/web", "machine-b").to_migration());
        let yaml = ok(render(&m, Format::Yaml));
        assert_eq!(
            yaml,
            "apiVersion: ployz.dev/v1alpha1\nkind: Migration\nmetadata:\n  name: web-to-machine-b\n  namespace: production\nspec:\n  service: web\n  to: machine-b\n"
        );
    }

    #[test]
    fn json_is_the_same_object() {
        let m = ok(request("production/web", "machine-b").to_migration());
        let from_yaml: serde_json::Value =
            ok(serde_saphyr::from_str(&ok(render(&m, Format::Yaml))));
        let from_json: serde_json::Value = ok(serde_json::from_str(&ok(render(&m, Format::Json))));
        assert_eq!(from_yaml, from_json);
        assert_eq!(from_json["spec"]["to"], "machine-b");
    }

    #[test]
    fn rendering_is_deterministic() {
        let mut r = request("db/postgres", "machine-c");
        r.from = Some(ok("machine-a".parse()));
        r.bandwidth_limit = Some(Quantity("100Mi".into()));
        r.compression = Some(Compression::Zstd);
        r.source_copy = Some(SourceCopy::Delete);
        let first = ok(render(&ok(r.to_migration()), Format::Yaml));
        for _ in 0..20 {
            assert_eq!(first, ok(render(&ok(r.to_migration()), Format::Yaml)));
        }
        assert!(first.contains("bandwidthLimit: 100Mi"), "{first}");
        assert!(first.contains("compression: Zstd"), "{first}");
        assert!(first.contains("sourceCopy: Delete"), "{first}");
        assert!(first.contains("from: machine-a"), "{first}");
    }

    #[test]
    fn refuses_the_same_machine() {
        let mut r = request("production/web", "machine-b");
        r.from = Some(ok("machine-b".parse()));
        let err = r
            .to_migration()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("both name machine \"machine-b\""), "{err}");
        assert!(err.contains("pick a different --to"), "{err}");
    }

    #[test]
    fn custom_names_are_validated() {
        let mut r = request("production/web", "machine-b");
        r.name = Some("Web_Move".into());
        let err = r
            .to_migration()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("--name:"), "{err}");
    }

    #[test]
    fn lists_render_as_yaml_documents_or_a_json_list() {
        let a = ok(request("a/x", "m1").to_migration());
        let b = ok(request("b/y", "m2").to_migration());
        let yaml = ok(render_all(&[a.clone(), b.clone()], Format::Yaml));
        assert_eq!(yaml.matches("---\n").count(), 2);
        let docs: Vec<serde_json::Value> = ok(serde_saphyr::from_multiple(&yaml));
        assert_eq!(docs.len(), 2);
        let json: serde_json::Value =
            ok(serde_json::from_str(&ok(render_all(&[a, b], Format::Json))));
        assert_eq!(json["kind"], "List");
        assert_eq!(json["items"][1]["metadata"]["namespace"], "b");
    }
}

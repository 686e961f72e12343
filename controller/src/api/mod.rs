//! The `ployz.dev/v1alpha1` API: `Migration` (namespaced, one per move of a workload) and
//! `Machine` (cluster-scoped, one per node, written by that node's agent).
//!
//! The CRD YAML in `crds/` is generated from these types (`make crds`); a test fails when the
//! committed YAML drifts from them.

// kube-derive takes repeated `printcolumn(type_ = ...)` arguments, which this lint misreads
// as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
mod machine;
#[allow(clippy::duplicated_attributes)]
mod migration;
mod reason;

pub use machine::*;
pub use migration::*;
pub use reason::Reason;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResourceExt;
use schemars::{JsonSchema, Schema, SchemaGenerator};

/// API group of every ployz resource.
pub const GROUP: &str = "ployz.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Every CRD ployz defines, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Migration::crd(), Machine::crd()]
}

/// `metav1.Condition` list as a list-map keyed by `type`, as the API conventions ask, so that
/// server-side apply merges conditions one by one instead of replacing the list.
pub(crate) fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = <Vec<Condition>>::json_schema(generator);
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

/// A DNS-1123 subdomain (object and node names).
pub(crate) fn subdomain_schema(_: &mut SchemaGenerator) -> Schema {
    schemars::json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": crate::names::DNS1123_SUBDOMAIN_MAX,
        "pattern": crate::names::DNS1123_SUBDOMAIN_PATTERN,
    })
}

/// An optional DNS-1123 subdomain.
pub(crate) fn optional_subdomain_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = subdomain_schema(generator);
    schema.insert("nullable".into(), true.into());
    schema
}

#[cfg(test)]
mod tests;

/// Bytes in a Kubernetes quantity (`100Mi`, `1G`, `512k`, `2e6`); `None` when it is not one
/// or does not fit. Fractions are rounded down.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    const SUFFIXES: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let q = q.trim();
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(s, f)| q.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((q, 1.0));
    let value: f64 = number.parse().ok()?;
    let bytes = value * factor;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

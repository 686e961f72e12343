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
pub mod quantity;
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

/// A machine name: a DNS-1123 subdomain short enough to be a label value (63 characters),
/// since Migrations are labelled with their source machine.
pub(crate) fn machine_schema(_: &mut SchemaGenerator) -> Schema {
    schemars::json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": crate::names::MACHINE_NAME_MAX,
        "pattern": crate::names::DNS1123_SUBDOMAIN_PATTERN,
    })
}

/// An optional machine name.
pub(crate) fn optional_machine_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = machine_schema(generator);
    schema.insert("nullable".into(), true.into());
    schema
}

#[cfg(test)]
mod tests;

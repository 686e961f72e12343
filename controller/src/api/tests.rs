//! Schema rules checked without a server: the OpenAPI constraints (patterns, bounds, enums)
//! through a JSON-schema validator, the CEL rules through kube's client-side CEL evaluator.
//! The smoke suite proves the same rules against the real API server.

use serde_json::{Value, json};

use super::*;
use crate::names;

fn migration_schema() -> Value {
    let crd = Migration::crd();
    let schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .map(serde_json::to_value);
    match schema {
        Some(Ok(v)) => v,
        other => panic!("no openAPIV3Schema: {other:?}"),
    }
}

/// The schema's OpenAPI-level errors for `object` (CEL rules are not evaluated here).
fn schema_errors(object: &Value) -> Vec<String> {
    // OpenAPI's `nullable` is not JSON Schema: drop it so optional fields may be absent or null.
    let validator = match jsonschema::draft4::new(&migration_schema()) {
        Ok(v) => v,
        Err(e) => panic!("schema does not compile: {e}"),
    };
    validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect()
}

fn migration(spec: Value) -> Value {
    json!({
        "apiVersion": "ployz.dev/v1alpha1",
        "kind": "Migration",
        "metadata": {"name": "web-to-machine-b", "namespace": "production"},
        "spec": spec,
    })
}

fn parse(object: Value) -> Migration {
    serde_json::from_value(object).unwrap_or_else(|e| panic!("does not deserialize: {e}"))
}

fn cel_errors(object: Value) -> Vec<String> {
    match parse(object).validate_cel() {
        Ok(()) => vec![],
        Err(errs) => errs.into_vec().iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn a_minimal_migration_is_valid() {
    let m = migration(json!({"service": "web", "to": "machine-b"}));
    assert_eq!(schema_errors(&m), Vec::<String>::new());
    assert_eq!(cel_errors(m), Vec::<String>::new());
}

#[test]
fn names_must_be_dns1123_subdomains() {
    for bad in ["Web", "web_1", "-web", "web-", "a..b", ""] {
        let errs = schema_errors(&migration(json!({"service": bad, "to": "machine-b"})));
        assert!(!errs.is_empty(), "service {bad:?} accepted");
        let errs = schema_errors(&migration(json!({"service": "web", "to": bad})));
        assert!(!errs.is_empty(), "to {bad:?} accepted");
        let errs = schema_errors(&migration(
            json!({"service": "web", "to": "m", "from": bad}),
        ));
        assert!(!errs.is_empty(), "from {bad:?} accepted");
    }
    let too_long = "a".repeat(254);
    assert!(!schema_errors(&migration(json!({"service": too_long, "to": "m"}))).is_empty());
}

#[test]
fn machine_names_fit_a_label_value() {
    let longest = "m".repeat(names::MACHINE_NAME_MAX);
    let too_long = "m".repeat(names::MACHINE_NAME_MAX + 7);
    assert!(schema_errors(&migration(json!({"service": "web", "to": longest}))).is_empty());
    for spec in [
        json!({"service": "web", "to": too_long}),
        json!({"service": "web", "to": "m", "from": too_long}),
    ] {
        assert!(
            !schema_errors(&migration(spec.clone())).is_empty(),
            "{spec}"
        );
    }
    let e = too_long
        .parse::<names::MachineName>()
        .err()
        .map(|e| e.to_string());
    assert!(e.is_some_and(|e| e.contains("at most 63 characters")));
}

#[test]
fn bandwidth_rule_has_the_rust_bounds() {
    let crd = serde_json::to_string(&Migration::crd()).unwrap_or_default();
    let (min, max) = (quantity::BANDWIDTH_MIN.0, quantity::BANDWIDTH_MAX.0);
    assert!(
        crd.contains(&format!("compareTo(quantity('{min}')) >= 0"))
            && crd.contains(&format!("compareTo(quantity('{max}')) <= 0")),
        "the CRD's bandwidthLimit rule drifted from api::quantity"
    );
}

#[test]
fn schema_patterns_agree_with_the_rust_validators() {
    let samples = [
        "web",
        "a",
        "db.primary-0",
        "Web",
        "web_1",
        "-a",
        "a-",
        "a..b",
        ".a",
        "a.",
        "0",
        "9-9",
        "x.y.z",
        "ä",
    ];
    for s in samples {
        let by_schema = schema_errors(&migration(json!({"service": s, "to": "m"}))).is_empty();
        assert_eq!(by_schema, names::is_dns1123_subdomain(s), "{s:?}");
    }
}

#[test]
fn to_and_from_must_differ() {
    let errs = cel_errors(migration(
        json!({"service": "web", "to": "m1", "from": "m1"}),
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("spec.from and spec.to name the same machine"),
        "{errs:?}"
    );
    assert!(
        cel_errors(migration(
            json!({"service": "web", "to": "m1", "from": "m2"})
        ))
        .is_empty()
    );
}

#[test]
fn spec_is_immutable() {
    let old = parse(migration(json!({"service": "web", "to": "m1"})));
    let changed = parse(migration(json!({"service": "web", "to": "m2"})));
    let errs = match changed.validate_cel_update(&old) {
        Ok(()) => panic!("changing spec.to was accepted"),
        Err(e) => e
            .into_vec()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
    };
    assert!(
        errs.iter().any(|e| e.contains("spec is immutable")),
        "{errs:?}"
    );
    // A status change leaves the spec alone and is fine.
    let mut with_status = old.clone();
    with_status.status = Some(MigrationStatus {
        phase: Some(Phase::Sending),
        ..MigrationStatus::default()
    });
    assert!(with_status.validate_cel_update(&old).is_ok());
}

#[test]
fn bandwidth_limit_is_a_sensible_quantity() {
    for good in [json!("100Mi"), json!("1Ki"), json!("2G"), json!(1048576)] {
        let m =
            migration(json!({"service": "web", "to": "m", "transfer": {"bandwidthLimit": good}}));
        assert_eq!(cel_errors(m), Vec::<String>::new(), "{good}");
    }
    for bad in [
        json!("0"),
        json!("12"),
        json!("fast"),
        json!("-5Mi"),
        json!("2Ei"),
        json!(100),
    ] {
        let m =
            migration(json!({"service": "web", "to": "m", "transfer": {"bandwidthLimit": bad}}));
        let errs = cel_errors(m);
        assert!(
            errs.iter().any(|e| e
                .contains("bandwidthLimit must be a quantity of bytes per second from 1Ki to 1Ei")),
            "{bad}: {errs:?}"
        );
    }
}

#[test]
fn timeouts_and_enums_are_bounded() {
    let with = |spec: Value| schema_errors(&migration(spec));
    assert!(with(json!({"service": "w", "to": "m", "timeouts": {"cutoverSeconds": 5}})).len() == 1);
    assert!(
        with(json!({"service": "w", "to": "m", "timeouts": {"cutoverSeconds": 90000}})).len() == 1
    );
    assert!(
        with(json!({"service": "w", "to": "m", "timeouts": {"cutoverSeconds": 600}})).is_empty()
    );
    assert!(!with(json!({"service": "w", "to": "m", "sourceCopy": "Keep"})).is_empty());
    assert!(
        !with(json!({"service": "w", "to": "m", "transfer": {"compression": "gzip"}})).is_empty()
    );
    assert!(
        with(json!({"service": "w", "to": "m", "transfer": {"compression": "Zstd"}})).is_empty()
    );
}

#[test]
fn conditions_are_a_list_map_keyed_by_type() {
    let schema = migration_schema();
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    let machine = serde_json::to_value(Machine::crd()).unwrap_or_default();
    let conditions = &machine["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        ["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
}

#[test]
fn machines_are_cluster_scoped_and_migrations_namespaced() {
    assert_eq!(Machine::crd().spec.scope, "Cluster");
    assert_eq!(Migration::crd().spec.scope, "Namespaced");
    let fields: Vec<String> = Migration::crd().spec.versions[0]
        .selectable_fields
        .iter()
        .flatten()
        .map(|f| f.json_path.clone())
        .collect();
    assert_eq!(fields, [".spec.service", ".spec.to", ".spec.from"]);
}

#[test]
fn rate_and_time_left_come_from_two_reports_of_one_pass() {
    use std::time::Duration;
    let mib = 1 << 20;
    // 8 MiB in 2 s: 4 MiB/s, 24 MiB left of 32: 6 s.
    assert_eq!(
        rate_and_eta(0, 8 * mib, Duration::from_secs(2), Some(32 * mib)),
        (Some(4 * mib), Some(6))
    );
    // Rounded up: a second and a bit left reads 2 s, never 0 before the end.
    assert_eq!(
        rate_and_eta(0, 4, Duration::from_secs(1), Some(9)),
        (Some(4), Some(2))
    );
    // No estimate, or past it: a rate, no time left.
    assert_eq!(
        rate_and_eta(0, 10, Duration::from_secs(1), None),
        (Some(10), None)
    );
    assert_eq!(
        rate_and_eta(0, 10, Duration::from_secs(1), Some(5)),
        (Some(10), None)
    );
    // Stalled: rate 0, no time left to promise.
    assert_eq!(
        rate_and_eta(7, 7, Duration::from_secs(3), Some(9)),
        (Some(0), None)
    );
    // A new pass (the count went back) or too short an interval says nothing.
    assert_eq!(
        rate_and_eta(10, 3, Duration::from_secs(2), Some(9)),
        (None, None)
    );
    assert_eq!(
        rate_and_eta(0, 3, Duration::from_millis(100), Some(9)),
        (None, None)
    );
}

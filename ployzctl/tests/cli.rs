//! The CLI as a user runs it: exit codes, messages and output bytes.

use std::path::Path;
use std::process::{Command, Output};

fn ployzctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ployzctl"))
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap_or_else(|e| panic!("running ployzctl: {e}"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn render_manifest_prints_yaml_and_the_same_object_as_json() {
    let yaml = ployzctl(&[
        "migrate",
        "render-manifest",
        "production/web",
        "--to",
        "machine-b",
    ]);
    assert!(yaml.status.success(), "{}", stderr(&yaml));
    assert_eq!(
        stdout(&yaml),
        "apiVersion: ployz.dev/v1alpha1\nkind: Migration\nmetadata:\n  name: web-to-machine-b\n  namespace: production\nspec:\n  service: web\n  to: machine-b\n"
    );
    let json = ployzctl(&[
        "--json",
        "migrate",
        "render-manifest",
        "production/web",
        "--to",
        "machine-b",
    ]);
    assert!(json.status.success(), "{}", stderr(&json));
    let a: serde_json::Value = serde_saphyr::from_str(&stdout(&yaml)).unwrap_or_default();
    let b: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap_or_default();
    assert_eq!(a, b);
    assert_eq!(b["kind"], "Migration");
    // --json is global: it may also follow the subcommand.
    let late = ployzctl(&[
        "migrate",
        "render-manifest",
        "production/web",
        "--to",
        "machine-b",
        "--json",
    ]);
    assert_eq!(stdout(&late), stdout(&json));
}

#[test]
fn malformed_references_exit_2_and_show_the_expected_form() {
    for bad in ["web", "a/b/c", "Prod/web", "", "prod/"] {
        let o = ployzctl(&["migrate", "render-manifest", bad, "--to", "machine-b"]);
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
        assert!(stdout(&o).is_empty(), "{bad:?} printed a manifest");
        assert!(
            stderr(&o).contains("expected NAMESPACE/SERVICE"),
            "{bad:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn a_missing_or_invalid_target_exits_2() {
    let o = ployzctl(&["migrate", "render-manifest", "production/web"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--to <MACHINE>"), "{}", stderr(&o));

    let o = ployzctl(&[
        "migrate",
        "render-manifest",
        "production/web",
        "--to",
        "Machine_B",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("machine \"Machine_B\" is not a valid name"),
        "{}",
        stderr(&o)
    );

    let o = ployzctl(&[
        "migrate",
        "render-manifest",
        "p/web",
        "--to",
        "m1",
        "--from",
        "m1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("pick a different --to"),
        "{}",
        stderr(&o)
    );
}

/// Inputs that once panicked or passed and failed later: each is a usage error (exit 2) that
/// names the option and the expected form.
#[test]
fn unusable_inputs_are_usage_errors_naming_the_field() {
    let long_machine = "m".repeat(70);
    let cases: [(&[&str], &str); 6] = [
        (
            &["--bandwidth-limit", "fast"],
            "is not a Kubernetes quantity",
        ),
        (&["--bandwidth-limit", "1e400"], "is larger than 16Ei"),
        (&["--bandwidth-limit", "16Ei"], "is larger than 16Ei"),
        (&["--bandwidth-limit", "12"], "is out of range"),
        (&["--to", &long_machine], "at most 63 characters"),
        (
            &["--name", "Web_Move"],
            "Migration name \"Web_Move\" is not a valid name",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["migrate", "render-manifest", "p/web"];
        if !extra.contains(&"--to") {
            args.extend(["--to", "m1"]);
        }
        args.extend(extra);
        let o = ployzctl(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{extra:?} printed a manifest");
        assert!(stderr(&o).contains(want), "{extra:?}: {}", stderr(&o));
        if extra[0] == "--bandwidth-limit" {
            assert!(
                stderr(&o).contains("--bandwidth-limit: spec.transfer.bandwidthLimit")
                    && stderr(&o).contains("from 1Ki to 1Ei, for example 100Mi"),
                "{}",
                stderr(&o)
            );
        }
    }
    let o = ployzctl(&[
        "migrate",
        "render-manifest",
        "p/web",
        "--to",
        "m1",
        "--bandwidth-limit",
        "1024000m",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("bandwidthLimit: 1024000m"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn the_committed_example_is_what_render_manifest_prints() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/migration.yaml");
    let committed =
        std::fs::read_to_string(&example).unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    let o = ployzctl(&[
        "migrate",
        "render-manifest",
        "production/web",
        "--to",
        "machine-b",
    ]);
    assert_eq!(
        committed,
        stdout(&o),
        "examples/migration.yaml drifted; run `make examples` and commit the result"
    );
}

#[test]
fn cluster_commands_without_a_cluster_say_how_to_configure_one() {
    let o = Command::new(env!("CARGO_BIN_EXE_ployzctl"))
        .args(["migrate", "preview", "production/web", "--to", "machine-b"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .output()
        .unwrap_or_else(|e| panic!("running ployzctl: {e}"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/kubeconfig"),
        "{}",
        stderr(&o)
    );
    // Bad input is still a usage error, found before any cluster is needed.
    let bad = ployzctl(&["migrate", "apply", "web", "--to", "machine-b"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("NAMESPACE/SERVICE"),
        "{}",
        stderr(&bad)
    );
}

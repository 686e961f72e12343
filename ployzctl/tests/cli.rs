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
    for bad in ["a/b/c", "Prod/web", "", "prod/", "prod/we_b"] {
        let o = ployzctl(&["migrate", "render-manifest", bad, "--to", "machine-b"]);
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
        assert!(stdout(&o).is_empty(), "{bad:?} printed a manifest");
        assert!(
            stderr(&o).contains("expected SERVICE or NAMESPACE/SERVICE"),
            "{bad:?}: {}",
            stderr(&o)
        );
    }
}

/// As kubectl: a NAME takes its namespace from -n, else from the kubeconfig context, else
/// "default"; NAMESPACE/NAME must agree with -n.
#[test]
fn namespaces_come_from_the_reference_the_flag_or_the_context() {
    let ns = |args: &[&str], kubeconfig: Option<&Path>| -> String {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ployzctl"));
        cmd.args(["migrate", "render-manifest", "--to", "m1", "-o", "json"])
            .args(args)
            .env_remove("KUBECONFIG");
        if let Some(k) = kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        let o = cmd.output().unwrap_or_else(|e| panic!("{e}"));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["metadata"]["namespace"]
            .as_str()
            .map_or_else(|| stderr(&o), str::to_string)
    };
    assert_eq!(ns(&["web"], None), "default");
    assert_eq!(ns(&["web", "-n", "prod"], None), "prod");
    assert_eq!(ns(&["--namespace=prod", "prod/web"], None), "prod");
    assert!(ns(&["dev/web", "-n", "prod"], None).contains("-n says \"prod\""));
    // KUBECONFIG may list several files, merged: the context is in one, its namespace set.
    let dir = std::env::temp_dir().join(format!("ployzctl-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (dir.join("a"), dir.join("b"));
    let write = |p: &Path, s: &str| std::fs::write(p, s).unwrap_or_else(|e| panic!("{e}"));
    write(
        &a,
        "apiVersion: v1\nkind: Config\ncurrent-context: team\nclusters: []\nusers: []\ncontexts: []\n",
    );
    write(
        &b,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://198.18.0.1:6443'}\nusers:\n- name: u\n  user: {}\ncontexts:\n- name: team\n  context: {cluster: c, user: u, namespace: team-ns}\n- name: other\n  context: {cluster: c, user: u, namespace: other-ns}\n",
    );
    let list = std::env::join_paths([&a, &b]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ns(&["web"], Some(Path::new(&list))), "team-ns");
    assert_eq!(ns(&["web", "-n", "x"], Some(Path::new(&list))), "x");
    assert_eq!(
        ns(&["web", "--context", "other"], Some(Path::new(&list))),
        "other-ns"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn output_formats_follow_kubectl() {
    let base = ["migrate", "render-manifest", "p/web", "--to", "m1"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend(extra);
        ployzctl(&args)
    };
    assert_eq!(
        stdout(&with(&["-o", "name"])),
        "migration.ployz.dev/web-to-m1\n"
    );
    assert_eq!(stdout(&with(&["-o", "yaml"])), stdout(&with(&[])));
    assert_eq!(stdout(&with(&["-o", "json"])), stdout(&with(&["--json"])));
    let both = with(&["-o", "yaml", "--json"]);
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
    let bad = with(&["-o", "table"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("json, yaml, wide, name"),
        "{}",
        stderr(&bad)
    );
}

/// `source <(ployzctl completion bash)` defines the completion function bash then uses.
#[test]
fn completion_scripts_load_in_bash() {
    let script = stdout(&ployzctl(&["completion", "bash"]));
    assert!(script.contains("ployzctl"), "{script}");
    let o = Command::new("bash")
        .args([
            "-c",
            // What bash does on `ployzctl mig<TAB>`, then on `ployzctl migrate <TAB>`.
            r#"source /dev/stdin && complete -p ployzctl \
              && COMP_WORDS=(ployzctl mig) COMP_CWORD=1 && _ployzctl ployzctl mig ployzctl \
              && echo "first: ${COMPREPLY[*]}" \
              && COMP_WORDS=(ployzctl migrate '') COMP_CWORD=2 && _ployzctl ployzctl '' migrate \
              && echo "then: ${COMPREPLY[*]}""#,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().map(|mut i| i.write_all(script.as_bytes()));
            c.wait_with_output()
        })
        .unwrap_or_else(|e| panic!("bash: {e}"));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("-F _ployzctl ployzctl"), "{out}");
    assert!(out.contains("first: migrate\n"), "{out}");
    let then = out
        .lines()
        .find(|l| l.starts_with("then:"))
        .unwrap_or_default();
    for sub in ["apply", "ls", "describe", "cancel", "--namespace"] {
        assert!(then.split(' ').any(|w| w == sub), "{sub}: {then}");
    }
    for shell in ["zsh", "fish"] {
        let o = ployzctl(&["completion", shell]);
        assert!(o.status.success() && !o.stdout.is_empty(), "{shell}");
    }
}

/// kubectl runs `kubectl-ployz` for `kubectl ployz ...`: the same commands, its own name.
#[test]
fn the_kubectl_plugin_is_the_same_cli() {
    let o = Command::new(env!("CARGO_BIN_EXE_kubectl-ployz"))
        .args([
            "migrate",
            "render-manifest",
            "production/web",
            "--to",
            "machine-b",
        ])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        stdout(&ployzctl(&[
            "migrate",
            "render-manifest",
            "production/web",
            "--to",
            "machine-b"
        ]))
    );
    let help = Command::new(env!("CARGO_BIN_EXE_kubectl-ployz"))
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        stdout(&help).contains("Usage: kubectl ployz"),
        "{}",
        stdout(&help)
    );
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

    // An address needs the cluster's Machines to resolve; render-manifest has none.
    let o = ployzctl(&["migrate", "render-manifest", "p/web", "--to", "198.18.0.2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("give the machine's name"),
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
    let bad = ployzctl(&["migrate", "apply", "a/b/web", "--to", "machine-b"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("NAMESPACE/SERVICE"),
        "{}",
        stderr(&bad)
    );
    // So is a watch of a malformed name, which once waited forever.
    let bad = ployzctl(&["migrate", "watch", "demo/Typo_"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

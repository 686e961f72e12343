//! The committed CRD YAML in crds/, and the Helm chart's copy in charts/ployz/crds/, must be
//! exactly what the API types generate. On failure, run `make crds` and commit the result.

use std::path::Path;

use ployz::manifest::{Format, render};

#[test]
fn committed_crds_match_the_types() {
    check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds"));
}

#[test]
fn the_chart_s_crds_match_the_types() {
    check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/ployz/crds"));
}

fn check(dir: &Path) {
    let mut expected_files = vec![];
    for crd in ployz::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let path = dir.join(format!("{name}.yaml"));
        let generated = render(&crd, Format::Yaml).unwrap_or_else(|e| panic!("{e}"));
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `make crds`", path.display()));
        assert!(
            committed == generated,
            "{} drifted from the Rust types; run `make crds` and commit the result",
            path.display()
        );
        expected_files.push(format!("{name}.yaml"));
    }
    let mut present: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present,
        expected_files,
        "{} holds a file no type generates",
        dir.display()
    );
}

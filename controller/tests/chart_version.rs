//! The Helm chart and the agent are released together: the chart's version and appVersion are
//! the workspace's version, so the image tag it defaults to is the agent it was tested with.

use std::path::Path;

#[test]
fn the_chart_is_versioned_with_the_agent() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/ployz/Chart.yaml");
    let chart =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let field = |name: &str| {
        chart
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(|v| v.trim().trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("Chart.yaml has no {name}"))
    };
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(field("version"), version, "Chart.yaml version");
    assert_eq!(field("appVersion"), version, "Chart.yaml appVersion");
}

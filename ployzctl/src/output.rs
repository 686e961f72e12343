//! How results are printed: tables sized to their content (kubectl's tab-writer style), or
//! objects as JSON, YAML or `kind.group/name` lines for scripts.

use std::io::Write as _;

use ployz::manifest::{self, Format};
use serde::Serialize;
use tabwriter::TabWriter;

use crate::cli::OutputArg;
use crate::error::CliError;

/// Columns left-aligned and separated by three spaces, as `kubectl get` prints them.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> Result<String, CliError> {
    let mut tw = TabWriter::new(Vec::new()).padding(3);
    let mut line = |cells: &mut dyn Iterator<Item = &str>| -> std::io::Result<()> {
        let cells: Vec<&str> = cells.collect();
        writeln!(tw, "{}", cells.join("\t"))
    };
    line(&mut header.iter().copied())?;
    for row in rows {
        line(&mut row.iter().map(String::as_str))?;
    }
    let bytes = tw.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The serialization `-o` asks for, when it asks for one.
pub fn format(output: Option<OutputArg>) -> Option<Format> {
    match output {
        Some(OutputArg::Json) => Some(Format::Json),
        Some(OutputArg::Yaml) => Some(Format::Yaml),
        _ => None,
    }
}

/// One object as `-o json|yaml`.
pub fn object<T: Serialize>(value: &T, format: Format) -> Result<String, CliError> {
    Ok(manifest::render(value, format)?)
}

/// A list as `-o json|yaml` (a `List`, as kubectl prints one).
pub fn list<T: Serialize>(values: &[T], format: Format) -> Result<String, CliError> {
    Ok(manifest::render(
        &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values}),
        format,
    )?)
}

/// A list the way `-o json|yaml|name` asks for it; `None` for the tables (no `-o`, or wide).
pub fn scripted<T: Serialize + kube::ResourceExt>(
    kind: &str,
    items: &[T],
    out: Option<OutputArg>,
) -> Option<Result<String, CliError>> {
    if let Some(f) = format(out) {
        return Some(list(items, f));
    }
    (out == Some(OutputArg::Name)).then(|| {
        let all: Vec<String> = items.iter().map(kube::ResourceExt::name_any).collect();
        Ok(names(kind, all.iter().map(String::as_str)))
    })
}

/// `-o name`: `kind.group/name` lines.
pub fn names<'a>(kind: &str, names: impl IntoIterator<Item = &'a str>) -> String {
    names.into_iter().map(|n| format!("{kind}/{n}\n")).collect()
}

/// Age in kubectl's short form: 45s, 12m, 3h, 5d.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_the_longest_cell() {
        let long = "ip-10-0-12-34.eu-west-1.compute.internal";
        let t = table(
            &["NAME", "READY"],
            &[
                vec![long.into(), "True".into()],
                vec!["b".into(), "False".into()],
            ],
        )
        .unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], format!("{:<w$}READY", "NAME", w = long.len() + 3));
        assert_eq!(lines[1], format!("{long}   True"));
        assert_eq!(lines[2], format!("{:<w$}False", "b", w = long.len() + 3));
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(age(-3), "0s");
        assert_eq!(age(119), "119s");
        assert_eq!(age(120), "2m");
        assert_eq!(age(7199), "119m");
        assert_eq!(age(7200), "2h");
        assert_eq!(age(200_000), "2d");
    }
}

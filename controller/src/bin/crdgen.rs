//! Writes the CRD YAML generated from the API types: `crdgen DIR` writes one file per CRD into
//! DIR (`make crds`); `crdgen` alone prints them all.

use std::path::PathBuf;

use anyhow::Context;
use ployz::api;
use ployz::manifest::{Format, render};

fn main() -> anyhow::Result<()> {
    let crds = api::crds();
    match std::env::args_os().nth(1).map(PathBuf::from) {
        None => {
            print!("{}", ployz::manifest::render_all(&crds, Format::Yaml)?);
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in &crds {
                let name = crd
                    .metadata
                    .name
                    .as_deref()
                    .context("generated CRD has no name")?;
                let path = dir.join(format!("{name}.yaml"));
                std::fs::write(&path, render(crd, Format::Yaml)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

//! The Kubernetes client, from --kubeconfig/--context or the usual inference (the files
//! $KUBECONFIG lists, merged, then ~/.kube/config, then the in-cluster service account).

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::cli::GlobalArgs;

pub async fn client(global: &GlobalArgs) -> anyhow::Result<Client> {
    let options = KubeConfigOptions {
        context: global.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &global.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &options).await?
        }
        None if global.context.is_some() => Config::from_kubeconfig(&options).await?,
        None => Config::infer()
            .await
            .context("no cluster configured: pass --kubeconfig or set KUBECONFIG")?,
    };
    Ok(Client::try_from(config)?)
}

/// The namespace of the kubeconfig context in use, read without contacting the cluster (for
/// commands that need none); "default" when there is no kubeconfig or it names none.
pub fn context_namespace(global: &GlobalArgs) -> String {
    let kc = match &global.kubeconfig {
        Some(path) => Kubeconfig::read_from(path).ok(),
        None => Kubeconfig::read().ok(),
    };
    kc.and_then(|kc| {
        let name = global.context.clone().or(kc.current_context)?;
        kc.contexts
            .into_iter()
            .find(|c| c.name == name)?
            .context?
            .namespace
    })
    .unwrap_or_else(|| "default".into())
}

/// A ployz API that is not installed gets the fix in the message.
pub fn explain(e: kube::Error) -> anyhow::Error {
    match &e {
        kube::Error::Api(s) if s.code == 404 && s.message.contains("the server could not find") => {
            anyhow::anyhow!(
                "the ployz CRDs are not installed in this cluster: install ployz with its Helm chart (docs/install.md), or only the CRDs with `kubectl apply -f crds/` ({e})"
            )
        }
        _ => e.into(),
    }
}

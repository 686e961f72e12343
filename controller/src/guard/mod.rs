//! ployz-guard: a validating admission webhook that holds each node's agent to the workloads
//! and volumes of its own Migrations (see [`rules`]), as the NodeRestriction admission plugin
//! holds a kubelet to its own pods. The chart's webhook configuration sends it only the
//! agents' writes of workloads, PersistentVolumes, claims and ZFSVolumes; everyone else's
//! requests never reach it, so its being down stops ployz's writes and nothing else.
//!
//! Its serving key is made in memory at start; the guard writes its certificate into its own
//! webhook configuration's `caBundle` (the API server trusts exactly that certificate), so
//! installing needs no cert-manager and no key is ever stored.

pub mod facts;
pub mod rules;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use facts::Subject;

/// The user-info key under which a pod-bound service-account token names its node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address of the webhook (HTTPS).
    #[arg(long, env = "PLOYZ_GUARD_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// The ValidatingWebhookConfiguration whose caBundle the guard fills in.
    #[arg(long, env = "PLOYZ_GUARD_WEBHOOK", default_value = "ployz-guard")]
    pub webhook: String,
    /// DNS names of the serving certificate (the Service's `NAME.NAMESPACE.svc`).
    #[arg(
        long,
        env = "PLOYZ_GUARD_DNS_NAMES",
        value_delimiter = ',',
        required = true
    )]
    pub dns_names: Vec<String>,
}

/// The denial of a write whose concerns could not be read (the guard fails closed).
fn unread(e: kube::Error) -> String {
    format!("ployz-guard could not read what this write concerns ({e}); retry")
}

/// A request judged: allowed, or denied with a message that names the problem.
async fn judge(client: &Client, req: &AdmissionRequest<DynamicObject>) -> Result<(), String> {
    let node = req
        .user_info
        .extra
        .as_ref()
        .and_then(|e| e.get(NODE_NAME_EXTRA))
        .and_then(|v| v.first())
        .ok_or("a ployz agent must authenticate with its pod's bound service-account token (it names the node); this request carries no node name")?;
    let value = |o: &Option<DynamicObject>| {
        o.as_ref()
            .and_then(|o| serde_json::to_value(o).ok())
            .unwrap_or(Value::Null)
    };
    let (old, new) = (value(&req.old_object), value(&req.object));
    let ns = req.namespace.clone().unwrap_or_default();
    match (req.resource.group.as_str(), req.resource.resource.as_str()) {
        ("apps", kind @ ("deployments" | "statefulsets")) => {
            let what = match kind {
                "deployments" => format!("Deployment {ns}/{}", req.name),
                _ => format!("StatefulSet {ns}/{}", req.name),
            };
            if req.operation != Operation::Update {
                return Err(format!("a ployz agent never creates or deletes {what}"));
            }
            if req.sub_resource.as_deref() == Some("scale") {
                return scale(client, node, &ns, &req.name, kind, &what).await;
            }
            if let Some(sub) = &req.sub_resource {
                return Err(format!("a ployz agent never writes {sub} of {what}"));
            }
            let labels =
                serde_json::from_value(new["spec"]["template"]["metadata"]["labels"].clone())
                    .unwrap_or_default();
            let subject = Subject::Workload {
                name: &req.name,
                labels,
            };
            let holders = facts::holders(client, &ns, &subject)
                .await
                .map_err(unread)?;
            rules::workload_update(node, &what, &old, &new, &holders)
        }
        ("", "persistentvolumes") => {
            let deleting = req.operation == Operation::Delete;
            let pv = if deleting { &old } else { &new };
            volume(client, node, &req.name, pv, deleting).await
        }
        ("", "persistentvolumeclaims") => {
            let claim = facts::claim(client, &ns, &req.name)
                .await
                .map_err(unread)?
                .ok_or_else(|| format!("PersistentVolumeClaim {ns}/{} does not exist", req.name))?;
            let holders = facts::holders(client, &ns, &Subject::Claim(&req.name))
                .await
                .map_err(unread)?;
            rules::claim_update(node, &claim, &old, &new, &holders)
        }
        // A zfs-localpv volume's owner follows its PV: the PV of the same name, with this
        // volume handle, decides.
        ("zfs.openebs.io", "zfsvolumes") => {
            let pv = facts::pv(client, &req.name)
                .await
                .map_err(unread)?
                .and_then(|pv| serde_json::to_value(pv).ok())
                .filter(|pv| pv["spec"]["csi"]["volumeHandle"].as_str() == Some(&req.name))
                .ok_or_else(|| {
                    format!(
                        "ZFSVolume {} belongs to no PersistentVolume ployz moves",
                        req.name
                    )
                })?;
            volume(client, node, &req.name, &pv, true).await
        }
        (group, resource) => Err(format!(
            "ployz-guard judges workloads and volumes, not {resource}.{group}"
        )),
    }
}

/// A write of a workload's `/scale`, judged by the live workload's lock.
async fn scale(
    client: &Client,
    node: &str,
    ns: &str,
    name: &str,
    kind: &str,
    what: &str,
) -> Result<(), String> {
    let reference = crate::api::WorkloadRef {
        kind: if kind == "statefulsets" {
            "StatefulSet"
        } else {
            "Deployment"
        }
        .into(),
        name: name.into(),
    };
    let (lock, labels) = facts::lock_and_labels(client, ns, &reference)
        .await
        .map_err(unread)?
        .ok_or_else(|| format!("{what} does not exist"))?;
    let subject = Subject::Workload { name, labels };
    let holders = facts::holders(client, ns, &subject).await.map_err(unread)?;
    rules::scale_update(node, what, lock.as_deref(), &holders)
}

/// A write of PV `name` (`pv`), judged by the claim its claimRef names.
async fn volume(
    client: &Client,
    node: &str,
    name: &str,
    pv: &Value,
    deleting: bool,
) -> Result<(), String> {
    let r = &pv["spec"]["claimRef"];
    let (Some(ns), Some(claim_name)) = (r["namespace"].as_str(), r["name"].as_str()) else {
        return rules::pv_write(node, name, pv, deleting, None, &[]);
    };
    let claim = facts::claim(client, ns, claim_name).await.map_err(unread)?;
    let holders = facts::holders(client, ns, &Subject::Claim(claim_name))
        .await
        .map_err(unread)?;
    rules::pv_write(node, name, pv, deleting, claim.as_ref(), &holders)
}

#[derive(Clone)]
struct App {
    client: Client,
    ready: Arc<AtomicBool>,
}

/// The AdmissionReview as JSON (axum's `Json` would add a crate for nothing more).
fn reply(review: &AdmissionReview<DynamicObject>) -> impl IntoResponse + use<> {
    let body = serde_json::to_vec(review).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

async fn validate(State(app): State<App>, body: Bytes) -> impl IntoResponse {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return reply(&AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return reply(&AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    let response = AdmissionResponse::from(&req);
    let response = match judge(&app.client, &req).await {
        Ok(()) => response,
        Err(message) => {
            info!(
                resource = %req.resource.resource,
                name = %req.name,
                namespace = ?req.namespace,
                user = ?req.user_info.username,
                %message,
                "denied"
            );
            response.deny(message)
        }
    };
    reply(&response.into_review())
}

async fn readyz(State(app): State<App>) -> StatusCode {
    if app.ready.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// A TLS listener for axum: handshakes each connection (with a deadline) before handing it
/// over; a failed handshake is logged and the next connection accepted.
struct Tls {
    tcp: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for Tls {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handshake = self.acceptor.accept(tcp);
            match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                Ok(Ok(tls)) => return (tls, addr),
                Ok(Err(e)) => warn!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => warn!(%addr, "TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A key made in memory and its self-signed certificate for `dns_names`, as PEM.
fn serving_identity(dns_names: &[String]) -> Result<(Arc<rustls::ServerConfig>, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(dns_names.to_vec())?;
    if let Some(cn) = dns_names.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn.as_str());
    }
    let cert = params.self_signed(&key)?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow::anyhow!("the serving key: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], der)?;
    Ok((Arc::new(config), cert.pem()))
}

/// Makes the API server trust `pem` for every webhook of configuration `name`.
async fn publish_ca(client: &Client, name: &str, pem: &str) -> Result<()> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let mut vwc = api
        .get(name)
        .await
        .with_context(|| format!("reading ValidatingWebhookConfiguration {name}"))?;
    for w in vwc.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(ByteString(pem.as_bytes().to_vec()));
    }
    api.replace(name, &PostParams::default(), &vwc)
        .await
        .with_context(|| {
            format!("writing the caBundle of ValidatingWebhookConfiguration {name}")
        })?;
    Ok(())
}

/// Runs the guard until a signal.
pub async fn run(config: Config) -> Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let (tls, pem) = serving_identity(&config.dns_names)?;
    let ready = Arc::new(AtomicBool::new(false));
    let app = App {
        client: client.clone(),
        ready: Arc::clone(&ready),
    };
    let router = Router::new()
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(app);
    let tcp = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let listener = Tls {
        tcp,
        acceptor: TlsAcceptor::from(tls),
    };
    // Serving first: the API server may call as soon as it trusts the certificate.
    let serve = tokio::spawn(async move { axum::serve(listener, router).await });
    let publish = || publish_ca(&client, &config.webhook, &pem);
    backon::Retryable::retry(
        publish,
        backon::ExponentialBuilder::default().with_max_times(8),
    )
    .notify(|e, d| warn!(error = %format!("{e:#}"), ?d, "publishing the caBundle; retrying"))
    .await?;
    ready.store(true, Ordering::Relaxed);
    info!(webhook = %config.webhook, "guard ready");
    tokio::select! {
        r = serve => r.context("the webhook server")?.context("the webhook server")?,
        _ = tokio::signal::ctrl_c() => info!("shutting down"),
    }
    Ok(())
}

//! A real Kubernetes control plane: etcd, kube-apiserver (the Node authorizer and RBAC,
//! NodeRestriction, an admin client certificate, service-account keys, a client identity
//! towards the kubelets), kube-controller-manager and kube-scheduler. The machines' kubelets
//! are real (see `node.rs`); kwok, which fakes kubelets, is started only for environments that
//! ask for fake nodes (scale tests).

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::network::{HOST_IP, KWOK_POD_CIDR, SERVICE_CIDR};
use crate::pki::Pki;
use crate::process::{Proc, command};
use crate::wait::until;

/// The running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    /// Admin kubeconfig (a client certificate in system:masters).
    pub kubeconfig: PathBuf,
    pub server: String,
    pub pki: Pki,
    procs: Vec<Proc>,
    /// How the API server was started, to start it again ([`ControlPlane::restart_apiserver`]).
    apiserver: (String, Vec<String>, PathBuf),
}

fn free_port(ip: IpAddr) -> Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

impl ControlPlane {
    /// Starts every component from `bins` (and kwok when `kwok`) and waits until the API
    /// server is ready and the controller-manager has created the default service account.
    pub async fn start(bins: &Path, dir: &Path, logs: &Path, kwok: bool) -> Result<Self> {
        let started = Instant::now();
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let pki = Pki::create(&dir.join("pki"), &[IpAddr::V4(HOST_IP), localhost])?;
        // What the API server shows the kubelets (logs, exec): kubeadm's identity for it.
        let (cert, key) = pki.client("kube-apiserver-kubelet-client", "system:masters")?;
        let kubelet_client_cert = pki.write("apiserver-kubelet-client.crt", &cert)?;
        let kubelet_client_key = pki.write("apiserver-kubelet-client.key", &key)?;
        let bin = |name: &str| bins.join(name).to_string_lossy().into_owned();
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let mut procs = vec![];

        let client_port = free_port(localhost)?;
        let peer_port = free_port(localhost)?;
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        procs.push(Proc::spawn(
            "etcd",
            command(
                &bin("etcd"),
                [
                    "--name=e2e".to_string(),
                    format!("--data-dir={}", s(&dir.join("etcd"))),
                    format!("--listen-client-urls={etcd_url}"),
                    format!("--advertise-client-urls={etcd_url}"),
                    format!("--listen-peer-urls={peer_url}"),
                    format!("--initial-advertise-peer-urls={peer_url}"),
                    format!("--initial-cluster=e2e={peer_url}"),
                    "--unsafe-no-fsync=true".into(),
                    "--log-level=warn".into(),
                ],
            ),
            &bin("etcd"),
            logs,
        )?);

        let port = free_port(IpAddr::V4(HOST_IP))?;
        let server = format!("https://{HOST_IP}:{port}");
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", s(&dir.join("apiserver"))),
            format!("--tls-cert-file={}", s(&pki.serving_cert)),
            format!("--tls-private-key-file={}", s(&pki.serving_key)),
            format!("--client-ca-file={}", s(&pki.ca_cert)),
            format!("--secure-port={port}"),
            format!("--bind-address={HOST_IP}"),
            format!("--advertise-address={HOST_IP}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--allow-privileged=true".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            format!("--kubelet-client-certificate={}", s(&kubelet_client_cert)),
            format!("--kubelet-client-key={}", s(&kubelet_client_key)),
            // Kubelets are reached on their machine's address, not by a DNS name.
            "--kubelet-preferred-address-types=InternalIP".into(),
            // No kube-proxy here: the API server calls a webhook Service (ployz-guard) at its
            // endpoints' pod addresses, which the host routes to, not at its cluster IP.
            "--enable-aggregator-routing=true".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", s(&pki.sa_pub)),
            format!("--service-account-signing-key-file={}", s(&pki.sa_key)),
            "--v=1".into(),
        ];
        procs.push(Proc::spawn(
            "kube-apiserver",
            command(&bin("kube-apiserver"), apiserver_args.clone()),
            &bin("kube-apiserver"),
            logs,
        )?);

        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(
                &server,
                &pki.ca_pem,
                &pki.admin_cert_pem,
                &pki.admin_key_pem,
            ),
        )?;
        let kc = format!("--kubeconfig={}", s(&kubeconfig));

        procs.push(Proc::spawn(
            "kube-controller-manager",
            command(
                &bin("kube-controller-manager"),
                [
                    kc.clone(),
                    "--leader-elect=false".into(),
                    format!("--service-account-private-key-file={}", s(&pki.sa_key)),
                    format!("--root-ca-file={}", s(&pki.ca_cert)),
                    "--use-service-account-credentials=true".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={}", free_port(localhost)?),
                    "--v=1".into(),
                ],
            ),
            &bin("kube-controller-manager"),
            logs,
        )?);
        procs.push(Proc::spawn(
            "kube-scheduler",
            command(
                &bin("kube-scheduler"),
                [
                    kc.clone(),
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={}", free_port(localhost)?),
                    "--v=1".into(),
                ],
            ),
            &bin("kube-scheduler"),
            logs,
        )?);
        if kwok {
            procs.push(Proc::spawn(
                "kwok",
                command(
                    &bin("kwok"),
                    [
                        kc,
                        format!("--config={}", bin("kwok-stages.yaml")),
                        "--manage-all-nodes=false".into(),
                        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                        format!("--cidr={KWOK_POD_CIDR}"),
                        format!("--node-ip={HOST_IP}"),
                        format!("--server-address=127.0.0.1:{}", free_port(localhost)?),
                        "--node-lease-duration-seconds=40".into(),
                    ],
                ),
                &bin("kwok"),
                logs,
            )?);
        }

        let mut cp = Self {
            kubeconfig,
            server,
            pki,
            procs,
            apiserver: (bin("kube-apiserver"), apiserver_args, logs.to_path_buf()),
        };
        cp.wait_ready().await?;
        let client = cp.client().await?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        until(
            "kube-controller-manager to create the default service account",
            Duration::from_secs(60),
            || {
                let sas = sas.clone();
                let procs_ok = cp.check_running();
                async move {
                    procs_ok?;
                    Ok(sas.get_opt("default").await?)
                }
            },
        )
        .await?;
        eprintln!(
            "[harness] control plane ready at {} in {:.1}s",
            cp.server,
            started.elapsed().as_secs_f64()
        );
        Ok(cp)
    }

    /// Kills the API server (SIGKILL: no graceful goodbye to its watchers) and starts it
    /// again on the same port and etcd; returns once it is ready.
    pub async fn restart_apiserver(&mut self) -> Result<()> {
        let i = self
            .procs
            .iter()
            .position(|p| p.name == "kube-apiserver")
            .context("no kube-apiserver")?;
        self.procs.remove(i).kill();
        let (bin, args, logs) = &self.apiserver;
        self.procs.push(Proc::spawn(
            "kube-apiserver",
            command(bin, args.clone()),
            bin,
            logs,
        )?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = self.client().await?;
        let readyz = http::Request::get("/readyz").body(vec![])?;
        until("kube-apiserver /readyz", Duration::from_secs(60), || {
            let client = client.clone();
            let req = readyz.clone();
            let procs_ok = self.check_running();
            async move {
                procs_ok?;
                Ok(client.request_text(req).await.ok().filter(|t| t == "ok"))
            }
        })
        .await
        .map(drop)
    }

    /// Fails with the process log when a component has exited.
    pub fn check_running(&mut self) -> Result<()> {
        for p in &mut self.procs {
            p.check_running()?;
        }
        Ok(())
    }

    /// A kubeconfig at `path` for the client identity `cert` and `key` (PEM).
    pub fn write_kubeconfig(&self, path: &Path, cert: &str, key: &str) -> Result<()> {
        std::fs::write(
            path,
            kubeconfig_yaml(&self.server, &self.pki.ca_pem, cert, key),
        )?;
        Ok(())
    }

    /// An admin client.
    pub async fn client(&self) -> Result<Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Client::try_from(config).context("building the Kubernetes client")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Stop in reverse order: kwok and controllers before the API server, etcd last.
        while let Some(mut p) = self.procs.pop() {
            p.stop();
        }
    }
}

fn kubeconfig_yaml(server: &str, ca: &str, cert: &str, key: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ployz-e2e
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: user
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: ployz-e2e
  context:
    cluster: ployz-e2e
    user: user
current-context: ployz-e2e
",
        ca = B64.encode(ca),
        cert = B64.encode(cert),
        key = B64.encode(key),
    )
}

//! `nestor-node-agent`: schedules and runs the pods of one namespace as Docker containers, for
//! testing nestor's kubernetes provisioner against a real kube-apiserver without a cluster
//! (see `nestor_test_support::node_agent`). Runs until SIGINT/SIGTERM, then removes every
//! container and volume it made (and, with `--create-namespace`, the namespace's contents).
//! Prints `ready` on stdout once it runs.
//!
//! ```text
//! nestor-node-agent --kubeconfig ~/.cache/nestor/kube-run/admin.kubeconfig --namespace agents
//! ```

use std::path::PathBuf;

use clap::Parser;
use nestor_test_support::node_agent::{NodeAgent, NodeAgentConfig};

#[derive(Parser)]
#[command(about = "A test kubelet: runs the pods of one namespace as Docker containers")]
struct Args {
    /// A kubeconfig with rights to bind pods and update their status (the admin one of
    /// scripts/setup-kube.sh).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[arg(long)]
    namespace: String,
    #[arg(long, default_value = "nestor-test-node")]
    node_name: String,
    /// Docker engine (default: $DOCKER_HOST or the local socket).
    #[arg(long)]
    docker_host: Option<String>,
    /// Create the namespace first, with deploy/kubernetes/rbac.yaml's Role bound to the test
    /// user `nestor` (and a read-only Role to `nestor-readonly`); on exit, delete everything
    /// in it and the namespace.
    #[arg(long)]
    create_namespace: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("NESTOR_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let ns = if a.create_namespace {
        Some(nestor_test_support::kube_env::TestNamespace::create_named(&a.kubeconfig, &a.namespace).await?)
    } else {
        None
    };
    let agent = NodeAgent::start(NodeAgentConfig {
        kubeconfig: a.kubeconfig,
        namespace: a.namespace,
        node_name: a.node_name,
        docker_host: a.docker_host,
    })
    .await?;
    println!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if let Some(ns) = ns {
        ns.shutdown().await;
    }
    agent.shutdown().await;
    Ok(())
}

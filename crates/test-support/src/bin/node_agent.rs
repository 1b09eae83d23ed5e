//! `nestor-node-agent`: schedules and runs the pods of one namespace as Docker containers, for
//! testing nestor's kubernetes provisioner against a real kube-apiserver without a cluster
//! (see `nestor_test_support::node_agent`). Runs until SIGINT/SIGTERM, then removes every
//! container and volume it made.
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("NESTOR_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let agent = NodeAgent::start(NodeAgentConfig {
        kubeconfig: a.kubeconfig,
        namespace: a.namespace,
        node_name: a.node_name,
        docker_host: a.docker_host,
    })
    .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    agent.shutdown().await;
    Ok(())
}

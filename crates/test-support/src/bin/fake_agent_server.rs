//! `nestor-fake-agent-server`: the in-process fake agent-server as its own process, for
//! benchmarks and for comparing nestor with other proxies (nginx...) against an identical,
//! cheap downstream.
//!
//! Prints exactly one line on stdout, `listening on <url>`, once the port is bound (scripts
//! wait for it), then serves until SIGTERM or SIGINT. Logs go to stderr (`RUST_LOG`).

use std::time::Duration;

use clap::Parser;
use nestor_test_support::{FakeAgentServer, FakeConfig};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "nestor-fake-agent-server",
    about = "A fast fake of the OpenHands agent-server 1.58.2 API"
)]
struct Args {
    /// Port to listen on (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Session API key clients must present (none = no authentication; also read from
    /// `OH_SESSION_API_KEYS_0`, as the real server does).
    #[arg(long, env = "SESSION_API_KEY")]
    session_api_key: Option<String>,
    /// Start dormant (deferred init; also `OH_DEFERRED_INIT=true`): `/api/*` answers 503
    /// until `POST /api/init`.
    #[arg(long)]
    deferred_init: bool,
    /// The secret key: `X-Init-API-Key` of `POST /api/init` (also `OH_SECRET_KEY`).
    #[arg(long, env = "OH_SECRET_KEY")]
    secret_key: Option<String>,
    /// Conversations to create at startup.
    #[arg(long, default_value_t = 0)]
    seed_conversations: usize,
    /// Events to append to each seeded conversation (user messages and agent replies).
    #[arg(long, default_value_t = 0)]
    events_per_conversation: usize,
    /// Action/observation pairs of a scripted run.
    #[arg(long, default_value_t = 2)]
    run_steps: usize,
    /// Delay before each event of a scripted run, in milliseconds.
    #[arg(long, default_value_t = 5)]
    step_delay_ms: u64,
    /// Maximum subscribers per conversation (the real server allows 50).
    #[arg(long, default_value_t = 50)]
    max_subscribers_per_conversation: usize,
    /// Keep conversations in this directory and load them at start (like the real server;
    /// the process provisioner sets `OH_CONVERSATIONS_PATH` for each child).
    #[arg(long, env = "OH_CONVERSATIONS_PATH")]
    conversations_path: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let env_flag = |name: &str| {
        std::env::var(name).is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
    };
    let session_api_key = args
        .session_api_key
        .clone()
        .or_else(|| std::env::var("OH_SESSION_API_KEYS_0").ok())
        .filter(|k| !k.is_empty());
    let cfg = FakeConfig {
        session_api_key,
        deferred_init: args.deferred_init || env_flag("OH_DEFERRED_INIT"),
        secret_key: args.secret_key.clone(),
        host: args.host,
        port: args.port,
        run_steps: args.run_steps,
        step_delay: Duration::from_millis(args.step_delay_ms),
        max_subscribers_per_conversation: args.max_subscribers_per_conversation,
        persist_dir: args.conversations_path.clone().filter(|p| !p.as_os_str().is_empty()),
        ..FakeConfig::default()
    };
    let server = FakeAgentServer::start(cfg).await?;
    seed(
        &server,
        args.seed_conversations,
        args.events_per_conversation,
    );
    #[allow(clippy::print_stdout)]
    {
        println!("listening on {}", server.url());
    }
    use std::io::Write as _;
    std::io::stdout().flush()?;
    wait_for_signal().await?;
    tracing::info!("fake agent-server shutting down");
    server.stop().await;
    Ok(())
}

/// Conversations with alternating user messages and agent replies, as seeded history.
fn seed(server: &FakeAgentServer, conversations: usize, events: usize) {
    for c in 0..conversations {
        let info = server.create_conversation(
            None,
            json!({
                "agent": {"kind": "Agent", "llm": {"model": "openai/fake", "usage_id": "agent"}, "tools": [{"name": "terminal"}]},
                "workspace": {"working_dir": "/workspace"},
                "tags": {"seed": c.to_string()},
            }),
        );
        let id = info["id"]
            .as_str()
            .and_then(|s| uuid::Uuid::parse_str(s).ok())
            .expect("created conversation has an id");
        for e in 0..events {
            let (source, role) = if e % 2 == 0 {
                ("user", "user")
            } else {
                ("agent", "assistant")
            };
            server.append_event(
                id,
                json!({
                    "source": source,
                    "llm_message": {
                        "role": role,
                        "content": [{"cache_prompt": false, "type": "text", "text": format!("seeded message {e} of conversation {c}")}],
                        "thinking_blocks": []
                    },
                    "activated_skills": [],
                    "extended_content": [],
                    "kind": "MessageEvent"
                }),
            );
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

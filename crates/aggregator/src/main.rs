//! The `nestor` command.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc: the request path allocates small, short-lived buffers; glibc malloc was ~8 %
/// of nestor's CPU under load (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use nestor_aggregator::config::{Config, LogFormat, Overrides, ProvisionerKind, ProvisionerOverride};
use nestor_aggregator::{app, server, AppState};

#[derive(Parser)]
#[command(name = "nestor", version, about = "One OpenHands agent-server API in front of many isolated agent-servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the agent-server API.
    Serve(ServeArgs),
    /// List the conversations of a running nestor with their downstream, state and age.
    Status(StatusArgs),
    /// Inside a kubernetes pod (set up by nestor's pod spec): restore or push the
    /// conversation's files (`[workspace_storage]`).
    #[command(subcommand)]
    WorkspaceSync(SyncCommand),
}

#[derive(Subcommand)]
enum SyncCommand {
    /// Init container: restore every missing tree from the bucket, then exit.
    Pull,
    /// Sidecar: push periodically, serve /status and /push, final push on SIGTERM.
    Serve,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The running nestor (default: http://127.0.0.1:8000).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Session key (default: $SESSION_API_KEY, else the key nestor generated in --state-dir).
    #[arg(long, env = "NESTOR_STATUS_KEY")]
    key: Option<String>,
    /// nestor's state directory, to find a generated key.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8000).
    #[arg(long)]
    bind: Option<String>,
    /// A client session key (repeat for several).
    #[arg(long = "session-api-key")]
    session_api_keys: Vec<String>,
    /// Provisioner kind: process, existing, docker or kubernetes.
    #[arg(long)]
    provisioner: Option<ProvisionerKind>,
    /// nestor's state directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NESTOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Status(args) => status(args),
        Command::WorkspaceSync(cmd) => workspace_sync(cmd),
    };
    if let Err(e) = result {
        // One clear line for the operator (no backtrace: these are expected failures).
        eprintln!("nestor: {e:#}");
        std::process::exit(1);
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        bind: args.bind,
        session_api_keys: (!args.session_api_keys.is_empty()).then_some(args.session_api_keys),
        state_dir: args.state_dir,
        log_format: args.log_json.then_some(LogFormat::Json),
        provisioner: args.provisioner.map(|kind| ProvisionerOverride { kind }),
    };
    let cfg = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nestor: {e}");
            std::process::exit(2);
        }
    };
    init_logging(cfg.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let keys = app::resolve_keys(&cfg)?;
        let bind = cfg.bind;
        let listener = listen(bind).map_err(|e| anyhow::anyhow!("cannot listen on {bind}: {e}"))?;
        let internal = match cfg.internal_bind {
            Some(a) => Some(listen(a).map_err(|e| anyhow::anyhow!("cannot listen on internal_bind {a}: {e}"))?),
            None => None,
        };
        let state = AppState::start(cfg, keys).await?;
        server::on_signals(&state);
        tracing::info!(%bind, "listening");
        server::serve_with_internal(state, listener, internal).await
    })
}

fn workspace_sync(cmd: SyncCommand) -> anyhow::Result<()> {
    init_logging(LogFormat::Human);
    let env = nestor_aggregator::workspace_sync::SyncEnv::from_env()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        match cmd {
            SyncCommand::Pull => nestor_aggregator::workspace_sync::pull(&env).await,
            SyncCommand::Serve => nestor_aggregator::workspace_sync::serve(&env).await,
        }
    })
}

/// Listen with a deep accept backlog: after a downstream restart or a nestor restart,
/// hundreds of clients reconnect at once, and the default 128 makes the overflow wait seconds
/// for SYN retries (the agent-server's uvicorn uses 2048).
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(2048)
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    let key = args
        .key
        .or_else(|| std::env::var("SESSION_API_KEY").ok().filter(|k| !k.is_empty()))
        .or_else(|| {
            let dir = args.state_dir.clone().unwrap_or_else(nestor_aggregator::config::default_state_dir);
            std::fs::read_to_string(dir.join("session_api_key")).ok().map(|s| s.trim().to_owned())
        });
    let ep = nestor_core::Endpoint::parse(&args.url, key.map(nestor_core::SessionKey::new))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let v: serde_json::Value = rt.block_on(async {
        nestor_core::DownstreamClient::default()
            .get_json(&ep, "/nestor/status", std::time::Duration::from_secs(10))
            .await
    }).map_err(|e| anyhow::anyhow!("{} ({})", e, args.url))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "nestor {} · provisioner {} · up {}s",
        v["nestor_version"].as_str().unwrap_or("?"),
        v["provisioner"].as_str().unwrap_or("?"),
        v["uptime_seconds"]
    );
    println!("{:<36}  {:<44}  {:<8}  {:<10}  {:>8}  TITLE", "CONVERSATION", "DOWNSTREAM", "STATE", "STATUS", "AGE");
    for c in v["conversations"].as_array().into_iter().flatten() {
        let age = c["age_seconds"].as_i64().map(human_age).unwrap_or_else(|| "-".into());
        println!(
            "{:<36}  {:<44}  {:<8}  {:<10}  {:>8}  {}",
            c["id"].as_str().unwrap_or(""),
            c["downstream"].as_str().unwrap_or(""),
            c["state"].as_str().unwrap_or(""),
            c["execution_status"].as_str().unwrap_or("-"),
            age,
            c["title"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn human_age(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

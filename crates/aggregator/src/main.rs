//! The `nestor` command.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
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
    /// Provisioner kind: process or existing.
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
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {bind}: {e}"))?;
        let state = AppState::start(cfg, keys).await?;
        server::on_signals(&state);
        tracing::info!(%bind, "listening");
        server::serve(state, listener).await
    })
}

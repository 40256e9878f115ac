use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use stevedore::app::App;
use stevedore::config::Config;

#[derive(Parser)]
#[command(name = "stevedore", version, about = "A pull-through caching OCI registry")]
struct Cli {
    /// Log format: `text` or `json`.
    #[arg(long, global = true, env = "STEVEDORE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the registry.
    Serve(ServeArgs),
    /// Load and validate a config file, then exit.
    CheckConfig {
        #[arg(long, env = "STEVEDORE_CONFIG")]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (defaults apply without one).
    #[arg(long, env = "STEVEDORE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, e.g. 0.0.0.0:5000 (overrides server.listen).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Store root directory (overrides storage.root).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Default upstream registry URL, or `none` for a plain local registry.
    #[arg(long)]
    upstream: Option<String>,
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    let cfg = match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    Ok(cfg)
}

/// Logs go to stderr, filtered by `RUST_LOG` (`level` and `target=level` directives, comma
/// separated; `Targets` rather than `EnvFilter`, which would link a regex engine for span-field
/// filters we do not use).
fn init_logs(format: LogFormat) {
    use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};
    const DEFAULT: &str = "info,tower_http=warn";
    let (filter, bad) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (DEFAULT.parse().expect("default filter"), Some(format!("RUST_LOG={v:?} ignored: {e}"))),
        },
        _ => (DEFAULT.parse().expect("default filter"), None),
    };
    // Colours only on a terminal: journald and container logs get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => logs.finish().with(filter).init(),
        LogFormat::Json => logs.json().finish().with(filter).init(),
    }
    if let Some(msg) = bad {
        tracing::warn!("{msg}");
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.cmd {
        Cmd::CheckConfig { config } => {
            let cfg = load(Some(&config))?;
            cfg.validate()?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Cmd::Serve(args) => {
            let mut cfg = load(args.config.as_ref())?;
            if let Some(l) = args.listen {
                cfg.server.listen = l;
            }
            if let Some(r) = args.root {
                cfg.storage.root = r;
            }
            match args.upstream.as_deref() {
                None => {}
                Some("none") => cfg.proxy.default_upstream.clear(),
                Some(url) => {
                    let up = stevedore::config::UpstreamConfig::from_url(url)?;
                    cfg.proxy.default_upstream = up.host.clone();
                    cfg.upstreams.retain(|u| u.host != up.host);
                    cfg.upstreams.push(up);
                }
            }
            cfg.validate()?;
            tokio::runtime::Runtime::new()?.block_on(serve(cfg))
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("binding {}", cfg.server.listen))?;
    let addr = listener.local_addr()?;
    let grace = cfg.server.shutdown_grace;
    let metrics = stevedore::metrics::install().context("installing the metrics recorder")?;
    let app = App::new(cfg, Some(metrics)).await.context("opening the store")?;
    app.spawn_background();
    let upstreams: Vec<String> = app.proxy.upstreams().iter().map(|u| u.host.clone()).collect();
    tracing::info!(
        %addr,
        root = %app.cfg.storage.root.display(),
        upstreams = ?upstreams,
        default_upstream = app.proxy.default_upstream().map(|u| u.host.as_str()).unwrap_or("none"),
        "stevedore started"
    );
    let mut summary = stevedore::app::summary(&app);
    let open = summary.pop();
    for line in summary {
        tracing::info!("{line}");
    }
    if let Some(open) = open {
        tracing::warn!("{open}");
    }
    // The handlers are in place before anyone is told the server is up: a SIGTERM right
    // after the listening line is a graceful shutdown, not the default death by signal.
    let shutdown = shutdown_signal()?;
    println!("stevedore listening on {addr}");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let limits = stevedore::server::Limits::from_config(&app.cfg.server);
    let server = stevedore::server::serve(listener, stevedore::router(app.clone()), limits, async move {
        shutdown.await;
        let _ = tx.send(());
    });
    tokio::select! {
        () = server => {}
        _ = async { let _ = rx.await; tokio::time::sleep(grace).await } => {
            tracing::warn!("shutdown grace period over; exiting with requests in flight");
        }
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT; both handlers are installed when this returns.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
    })
}

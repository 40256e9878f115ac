use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use stevedore::airgap;
use stevedore::api::App;
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
    /// Fill the cache from the upstreams with a list of references (tags, digests, tag
    /// patterns such as `docker.io/library/nginx:1.27*`), with their referrers.
    Prefetch(PrefetchArgs),
    /// Write references from the store (none: everything) as an OCI image layout: a directory,
    /// or an archive when --output ends in `.tar` or `.tar.zst`.
    Export(ExportArgs),
    /// Load an OCI image layout (directory, `.tar` or `.tar.zst`) into the store, verifying
    /// every blob before anything becomes visible.
    Import(ImportArgs),
    /// Reclaim content no manifest references (after manifest and tag deletes in pushed
    /// repositories), keeping anything younger than cache.gc_grace.
    Gc(GcArgs),
    /// Check the store: re-hash every blob, look for dangling links and references, remove
    /// leftover ingests; exits non-zero when problems were found (and not all repaired).
    Fsck(FsckArgs),
}

#[derive(clap::Args)]
struct GcArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Report what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args)]
struct FsckArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Remove corrupt content and dangling links, tags and manifests.
    #[arg(long)]
    repair: bool,
    /// Rewrite the lifecycle records (references, access times) from the store.
    #[arg(long)]
    rebuild_index: bool,
}

/// The store and configuration an offline command works on, as `serve` takes them.
#[derive(clap::Args)]
struct StoreArgs {
    /// TOML config file (defaults apply without one).
    #[arg(long, env = "STEVEDORE_CONFIG")]
    config: Option<PathBuf>,
    /// Store root directory (overrides storage.root).
    #[arg(long)]
    root: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PrefetchArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Default upstream registry URL (as for `serve`).
    #[arg(long)]
    upstream: Option<String>,
    /// Only these platforms of multi-platform images: `linux/amd64,linux/arm64[/v8]`.
    #[arg(long)]
    platform: Option<String>,
    /// A file with one reference per line (`#` starts a comment).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Leave referrers (signatures, SBOMs, attestations) out.
    #[arg(long)]
    no_referrers: bool,
    /// References: `docker.io/library/nginx:1.27`, `127.0.0.1:5001/small@sha256:…`, `nginx:1.27*`.
    refs: Vec<String>,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Only these platforms of multi-platform images: `linux/amd64,linux/arm64[/v8]`.
    #[arg(long)]
    platform: Option<String>,
    /// A directory, or an archive: `PATH.tar`, `PATH.tar.zst`.
    #[arg(long)]
    output: PathBuf,
    /// Leave referrers (signatures, SBOMs, attestations) out.
    #[arg(long)]
    no_referrers: bool,
    /// References (tags, digests, tag patterns); none: every tag in the store.
    refs: Vec<String>,
}

#[derive(clap::Args)]
struct ImportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The repository of entries named by a tag only (`v1`, as skopeo writes them) or not
    /// named: `docker.io/library/nginx`, `127.0.0.1:5001/small`, `team/app`.
    #[arg(long)]
    repository: Option<String>,
    /// An OCI image layout directory, `.tar` or `.tar.zst`.
    path: PathBuf,
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
    /// Serve from the store only; never contact an upstream (proxy.offline = true).
    #[arg(long)]
    offline: bool,
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
///
/// With a `[tracing]` endpoint (`serve` only; within its Tokio runtime) an OpenTelemetry
/// layer exports spans as well; without one none is installed.
fn init_logs(
    format: LogFormat,
    tracing_cfg: Option<&stevedore::config::TracingConfig>,
) -> anyhow::Result<Option<stevedore::telemetry::Guard>> {
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
    // The fmt subscriber would cap levels at INFO on its own; `RUST_LOG` alone decides.
    let logs = tracing_subscriber::fmt()
        .with_max_level(tracing::level_filters::LevelFilter::TRACE)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let endpoint = tracing_cfg.and_then(stevedore::telemetry::endpoint);
    let mut guard = None;
    match (format, endpoint, tracing_cfg) {
        (LogFormat::Text, Some(ep), Some(t)) => {
            let (otel, g) = stevedore::telemetry::layer(&ep, t)?;
            let filter = filter.with_target(stevedore::telemetry::TARGET, tracing::Level::INFO);
            logs.finish().with(filter).with(otel).init();
            guard = Some((g, ep));
        }
        (LogFormat::Json, Some(ep), Some(t)) => {
            let (otel, g) = stevedore::telemetry::layer(&ep, t)?;
            let filter = filter.with_target(stevedore::telemetry::TARGET, tracing::Level::INFO);
            logs.json().finish().with(filter).with(otel).init();
            guard = Some((g, ep));
        }
        (LogFormat::Text, ..) => logs.finish().with(filter).init(),
        (LogFormat::Json, ..) => logs.json().finish().with(filter).init(),
    }
    if let Some(msg) = bad {
        tracing::warn!("{msg}");
    }
    Ok(guard.map(|(g, ep)| {
        tracing::info!(endpoint = %stevedore::config::redact_url(&ep), "tracing: exporting spans over OTLP/HTTP");
        g
    }))
}

/// glibc's allocator, tuned for streaming bodies: the HTTP client's read buffers (up to
/// ~400 KiB each) are held while a fill's batch is written, then freed in bursts. By default
/// glibc serves such sizes by `mmap` at first and returns a thread arena's free top to the
/// kernel (`madvise`) as soon as it exceeds twice that, so the next buffers are fresh pages
/// that fault and are zeroed again: ~85,000 page faults and ~5 % of the server's CPU per GB of a
/// cold pull (`bench/profile_fill.py`, `perf stat -e page-faults`). A fixed mmap threshold
/// and a higher trim threshold keep that memory for reuse (~3,000 faults per GB); the memory
/// kept is what the bounded pipelines used at their peak.
///
/// Each arena keeps its own peak, and glibc gives threads up to 8 arenas per core: a buffer
/// allocated by one Tokio worker and freed after another worker's peak leaves both arenas
/// holding a peak's worth. One arena per 4 cores (`MALLOC_ARENA_MAX` set in the environment
/// wins): on 2 cores, a cold pull's peak RSS was 21.7 instead of 25.3 MiB (the anonymous part
/// 8.8 instead of 12.3) at the same rate, 712 MB/s both (bench floor rows, medians of 5,
/// 2026-12-07); small allocations stay in each thread's cache, without the arena's lock.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let arenas = std::thread::available_parallelism().map_or(1, |n| n.get() / 4).max(1);
        let set_arenas = std::env::var_os("MALLOC_ARENA_MAX").is_none();
        // SAFETY: `mallopt` only sets allocator parameters; called once, before any thread starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
            if set_arenas {
                libc::mallopt(libc::M_ARENA_MAX, arenas as libc::c_int);
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    // `serve` starts its logs once its configuration (`[tracing]`) is read.
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        init_logs(cli.log_format, None)?;
    }
    match cli.cmd {
        Cmd::CheckConfig { config } => {
            let cfg = load(Some(&config))?;
            cfg.validate(&stevedore::app::ConfigFiles)?;
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
            set_upstream(&mut cfg, args.upstream.as_deref())?;
            if args.offline {
                cfg.proxy.offline = true;
            }
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.enable_all();
            if let Some(n) = stevedore::hooks::max_blocking_threads() {
                rt.max_blocking_threads(n);
            }
            let rt = rt.build()?;
            let _traces = rt.block_on(async { init_logs(cli.log_format, Some(&cfg.tracing)) })?;
            cfg.validate(&stevedore::app::ConfigFiles)?;
            rt.block_on(serve(cfg))
        }
        Cmd::Prefetch(args) => {
            let mut cfg = store_config(&args.store)?;
            set_upstream(&mut cfg, args.upstream.as_deref())?;
            cfg.proxy.offline = false;
            cfg.validate(&stevedore::app::ConfigFiles)?;
            let mut refs = args.refs;
            if let Some(f) = &args.file {
                let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
                refs.extend(
                    text.lines()
                        .map(|l| l.split('#').next().unwrap_or_default().trim())
                        .filter(|l| !l.is_empty())
                        .map(str::to_string),
                );
            }
            anyhow::ensure!(!refs.is_empty(), "nothing to prefetch: give references or --file");
            let platforms = platforms(args.platform.as_deref())?;
            tokio::runtime::Runtime::new()?.block_on(async {
                let app = App::new(cfg, None).await.context("opening the store")?;
                app.registry.store().distrust_index().await.context("marking the lifecycle index stale")?;
                let opts = airgap::prefetch::PrefetchOptions {
                    refs: &refs,
                    platforms: &platforms,
                    referrers: !args.no_referrers,
                    live: true,
                };
                let mut out = stevedore::progress::Progress::start("prefetch");
                let r = airgap::prefetch::prefetch(&app.registry, &opts, &mut out).await;
                drop(out);
                println!(
                    "prefetch: {} ok, {} failed; {} manifests, {} blobs fetched ({}), {} blobs already cached",
                    r.ok.len(),
                    r.failed.len(),
                    r.manifests,
                    r.blobs_fetched,
                    airgap::human_bytes(r.bytes_fetched),
                    r.blobs_cached
                );
                if r.failed.is_empty() {
                    return Ok(());
                }
                let failed: Vec<String> = r.failed.iter().map(|(r, why)| format!("{r} ({why})")).collect();
                anyhow::bail!("prefetch failed for {}", failed.join(", "))
            })
        }
        Cmd::Export(args) => {
            let cfg = store_config(&args.store)?;
            let platforms = platforms(args.platform.as_deref())?;
            tokio::runtime::Runtime::new()?.block_on(async {
                let app = App::new(cfg, None).await.context("opening the store")?;
                let progress = stevedore::progress::Progress::start("export");
                let opts = airgap::export::ExportOptions {
                    refs: &args.refs,
                    platforms: &platforms,
                    referrers: !args.no_referrers,
                    output: &args.output,
                    progress: progress.tally(),
                };
                let r = airgap::export::export(&app.registry, &opts).await;
                drop(progress);
                let r = r?;
                for name in &r.refs {
                    println!("{name}");
                }
                println!(
                    "exported {} references: {} manifests, {} blobs, {} to {}",
                    r.refs.len(),
                    r.manifests,
                    r.blobs,
                    airgap::human_bytes(r.bytes),
                    args.output.display()
                );
                Ok(())
            })
        }
        Cmd::Gc(args) => gc(args),
        Cmd::Fsck(args) => fsck(args),
        Cmd::Import(args) => {
            let cfg = store_config(&args.store)?;
            tokio::runtime::Runtime::new()?.block_on(async {
                let app = App::new(cfg, None).await.context("opening the store")?;
                refuse_beside_live_server(&app, "import", "stop it to import (nothing was imported)").await?;
                app.registry
                    .store()
                    .distrust_index()
                    .await
                    .context("marking the lifecycle index stale (nothing was imported)")?;
                let progress = stevedore::progress::Progress::start("import");
                let r =
                    airgap::import::import(&app.registry, &args.path, args.repository.as_deref(), &progress.tally())
                        .await;
                drop(progress);
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        let what = if e.nothing_imported() {
                            "nothing was imported"
                        } else {
                            "not undone completely: what is left is named below"
                        };
                        return Err(
                            anyhow::Error::new(e).context(format!("importing {} ({what})", args.path.display()))
                        );
                    }
                };
                for (name, d) in &r.refs {
                    println!("{name} {d}");
                }
                println!(
                    "imported {} references: {} manifests, {} blobs ({} new, {}){}",
                    r.refs.len(),
                    r.manifests,
                    r.blobs,
                    r.new_blobs,
                    airgap::human_bytes(r.new_bytes),
                    if r.absent_children > 0 {
                        format!("; {} child manifests of other platforms were not in the layout", r.absent_children)
                    } else {
                        String::new()
                    }
                );
                Ok(())
            })
        }
    }
}

/// Exits with code 2 when a server or replica is live on the store: an offline tool that
/// removes or adds content beside it would race it (its caches, its guards are its own).
async fn refuse_beside_live_server(app: &App, what: &str, hint: &str) -> anyhow::Result<()> {
    let live = stevedore::cluster::replicas::live(app.registry.store(), app.cfg.cluster.heartbeat_interval)
        .await
        .context("reading the replicas' heartbeats")?;
    if live.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = live
        .iter()
        .map(|p| {
            format!(
                "replica {} (host {}, pid {}, heartbeat {:.1}s ago)",
                p.heartbeat.replica,
                p.heartbeat.host,
                p.heartbeat.pid,
                p.age.as_secs_f64()
            )
        })
        .collect();
    eprintln!("stevedore {what}: refused: a server is running on this store: {}; {hint}", list.join("; "));
    std::process::exit(2);
}

fn gc(args: GcArgs) -> anyhow::Result<()> {
    let cfg = store_config(&args.store)?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let app = App::new(cfg, None).await.context("opening the store")?;
        if !args.dry_run {
            // A fleet's pass under way is named first (as `lc.gc` would), then any live replica.
            if let Some(h) = match app.registry.store().fleet() {
                Some(c) => c.holder(stevedore::lifecycle::LIFECYCLE_LEASE).await,
                None => None,
            } {
                anyhow::bail!(
                    "garbage collection not run: replica {} ({}) is running eviction or garbage collection on this \
                     store; try again when it is done",
                    h.replica,
                    h.advertise
                );
            }
            refuse_beside_live_server(
                &app,
                "gc",
                "it collects garbage itself (cache.gc_interval); stop it to run `stevedore gc`, or use --dry-run",
            )
            .await?;
            app.registry.store().distrust_index().await.context("marking the lifecycle index stale")?;
        }
        let lc = stevedore::lifecycle::Lifecycle::new(app.registry.store().clone(), &app.cfg.cache);
        let progress = stevedore::progress::Progress::start("gc");
        let r = lc.gc(args.dry_run).await;
        drop(progress);
        let r = r.context("garbage collection")?;
        if let Some(h) = &r.skipped {
            anyhow::bail!(
                "garbage collection not run: replica {} ({}) is running eviction or garbage collection on this store; \
                 try again when it is done",
                h.replica,
                h.advertise
            );
        }
        for line in &r.removed {
            println!("{} {line}", if r.dry_run { "would remove" } else { "removed" });
        }
        println!(
            "gc{}: {} links, {} blobs, {}",
            if r.dry_run { " (dry run)" } else { "" },
            r.unlinked,
            r.deleted,
            airgap::human_bytes(r.bytes)
        );
        Ok(())
    })
}

fn fsck(args: FsckArgs) -> anyhow::Result<()> {
    let cfg = store_config(&args.store)?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let app = App::new(cfg, None).await.context("opening the store")?;
        if args.repair || args.rebuild_index {
            refuse_beside_live_server(
                &app,
                "fsck",
                "without --repair and --rebuild-index fsck only reports beside it; stop it to repair",
            )
            .await?;
            app.registry.store().distrust_index().await.context("marking the lifecycle index stale")?;
        }
        let alone = stevedore::cluster::replicas::live(app.registry.store(), app.cfg.cluster.heartbeat_interval)
            .await
            .context("reading the replicas' heartbeats")?
            .is_empty();
        let progress = stevedore::progress::Progress::start("fsck");
        let opts = stevedore::lifecycle::fsck::FsckOptions {
            repair: args.repair,
            rebuild_index: args.rebuild_index,
            ingest_age: app.cfg.uploads.session_ttl,
            sweep_ingests: alone,
            progress: progress.tally(),
        };
        let r = stevedore::lifecycle::fsck::fsck(app.registry.store(), &opts).await;
        drop(progress);
        let r = r.context("checking the store")?;
        for p in &r.problems {
            println!("problem: {p}");
        }
        println!(
            "fsck: {} blobs ({}) checked, {} problems, {} repaired, {} leftover ingests removed{}",
            r.blobs_checked,
            airgap::human_bytes(r.bytes_checked),
            r.problems.len(),
            r.repaired,
            r.ingests_removed,
            if args.rebuild_index {
                format!(", {} reference records rebuilt", r.records_rebuilt)
            } else {
                String::new()
            }
        );
        anyhow::ensure!(r.ok(), "{} problems not repaired", r.problems.len() - r.repaired);
        Ok(())
    })
}

/// The config an offline command (`prefetch`, `export`, `import`) works on.
fn store_config(args: &StoreArgs) -> anyhow::Result<Config> {
    let mut cfg = load(args.config.as_ref())?;
    if let Some(r) = &args.root {
        cfg.storage.root = r.clone();
    }
    cfg.validate(&stevedore::app::ConfigFiles)?;
    Ok(cfg)
}

/// `--upstream URL|none`: the default upstream.
fn set_upstream(cfg: &mut Config, upstream: Option<&str>) -> anyhow::Result<()> {
    match upstream {
        None => {}
        Some("none") => cfg.proxy.default_upstream.clear(),
        Some(url) => {
            let up = stevedore::config::UpstreamConfig::from_url(url)?;
            cfg.proxy.default_upstream = up.host.clone();
            cfg.upstreams.retain(|u| u.host != up.host);
            cfg.upstreams.push(up);
        }
    }
    Ok(())
}

fn platforms(list: Option<&str>) -> anyhow::Result<Vec<airgap::reference::Platform>> {
    Ok(match list {
        Some(l) => airgap::reference::Platform::parse_list(l)?,
        None => Vec::new(),
    })
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    // TLS files are read before anything else starts: a bad pair fails here, clearly.
    let tls = match &cfg.server.tls {
        Some(t) => Some(stevedore::tls::Tls::new(t).map_err(|e| anyhow::anyhow!("{}: {e}", e.key()))?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("binding {}", cfg.server.listen))?;
    let addr = listener.local_addr()?;
    let plain = match cfg.server.plain_listen {
        Some(a) => {
            Some(tokio::net::TcpListener::bind(a).await.with_context(|| format!("binding {a} (server.plain_listen)"))?)
        }
        None => None,
    };
    let grace = cfg.server.shutdown_grace;
    let metrics = stevedore::metrics::install().context("installing the metrics recorder")?;
    let app = App::new(cfg, Some(metrics)).await.context("opening the store")?;
    stevedore::metrics::offline(app.registry.proxy().is_offline());
    // Beside another live replica of this store only with Redis (or when allowed).
    let registry = Arc::new(stevedore::cluster::replicas::Registry::new(
        app.registry.cluster().clone(),
        app.registry.store().clone(),
        &app.cfg,
    ));
    registry.check_and_register(app.cfg.cluster.allow_without_redis).await?;
    registry.clone().spawn();
    app.registry.cluster().spawn_listener();
    let lifecycle = app.spawn_background();
    let upstreams: Vec<String> = app.registry.proxy().upstreams().iter().map(|u| u.host.clone()).collect();
    tracing::info!(
        %addr,
        root = %app.cfg.storage.root.display(),
        upstreams = ?upstreams,
        default_upstream = app.registry.proxy().default_upstream().map(|u| u.host.as_str()).unwrap_or("none"),
        offline = app.registry.proxy().is_offline(),
        "stevedore started"
    );
    let mut summary = stevedore::app::summary(&app);
    let open = if app.auth.is_none() { summary.pop() } else { None };
    for line in summary {
        tracing::info!("{line}");
    }
    if let Some(open) = open {
        tracing::warn!("{open}");
    }
    if let Some(tls) = &tls {
        tracing::info!("{}", tls.summary());
        if tls.leaf().expired() {
            tracing::warn!(certificate = %tls.leaf(), "the TLS certificate has expired");
        }
        tls.spawn_reloader().context("installing the SIGHUP handler")?;
    } else {
        tracing::info!("TLS: off ([server.tls] not set); server.listen speaks plain HTTP");
    }
    // The handlers are in place before anyone is told the server is up: a SIGTERM right
    // after the listening line is a graceful shutdown, not the default death by signal.
    let shutdown = shutdown_signal()?;
    let mut listeners = Vec::new();
    if let Some(plain) = plain {
        // Before the main line, which says the server is up.
        println!("stevedore plain HTTP listening on {}", plain.local_addr()?);
        listeners.push(stevedore::server::Listener::plain(plain));
    }
    listeners.insert(
        0,
        match tls {
            Some(tls) => stevedore::server::Listener::tls(listener, tls),
            None => stevedore::server::Listener::plain(listener),
        },
    );
    println!("stevedore listening on {addr}");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let limits = stevedore::server::Limits::from_config(&app.cfg.server);
    let server = stevedore::server::serve_all(listeners, stevedore::api::router(app.clone()), limits, async move {
        shutdown.await;
        let _ = tx.send(());
    });
    tokio::select! {
        () = server => {}
        _ = async { let _ = rx.await; tokio::time::sleep(grace).await } => {
            tracing::warn!("shutdown grace period over; exiting with requests in flight");
        }
    }
    // The batched access records survive the restart, and the lifecycle's index is saved
    // with its clean-shutdown marker (the next start does not walk the store).
    app.registry.store().flush_access().await;
    if let Err(e) = lifecycle.save().await {
        tracing::warn!(error = %e, "saving the lifecycle index failed: the next start rebuilds it");
    }
    registry.deregister().await;
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

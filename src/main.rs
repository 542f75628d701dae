//! The `segment-bridge` binary: parse the command line, set up logging, load the
//! configuration, run the command, turn the result into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use segment_bridge::config::Config;
use segment_bridge::health::{self, Health};
use segment_bridge::intake::{self, IntakeHealth, IntakeProbes, metrics::IntakeMetrics};
use segment_bridge::metrics::Metrics;
use segment_bridge::session::Region;
use segment_bridge::tools;
use segment_bridge::worker::{Worker, WorkerError};

/// Forwards quiz and survey sessions from RabbitMQ to Segment.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file [default: config.toml in the working directory, if present].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume sessions and deliver them to Segment until SIGTERM or SIGINT.
    Run {
        /// Consume and acknowledge as usual, but write each batch as a JSON line to
        /// standard output instead of posting it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Receive Jebbit and JotUrl webhooks and put them on the queue until SIGTERM or SIGINT.
    Intake,
    /// Read sessions (JSON lines) from standard input and print the events they become.
    Preview,
    /// Put the sessions of a JSON-lines file on the queue, with publisher confirms.
    Publish { file: PathBuf },
    /// Move dead-lettered messages back to the main queue.
    ReplayDead {
        /// Move at most this many.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Validate the configuration, reach the broker, report the regions' write keys and
    /// the intake's sources.
    Check {
        /// Validate and report only: contact no broker, use no network.
        #[arg(long)]
        offline: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let config = match Config::load(cli.config.as_deref(), None) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match cli.command {
        Command::Intake => segment_bridge::runtime::build_intake(),
        _ => segment_bridge::runtime::build(),
    }
    .expect("a tokio runtime");
    let result: anyhow::Result<()> = runtime.block_on(async {
        match cli.command {
            Command::Run { dry_run } => run(config, dry_run).await,
            Command::Intake => run_intake(config).await,
            Command::Preview => Ok(tools::preview(
                &config,
                std::io::stdin().lock(),
                std::io::stdout().lock(),
            )?),
            Command::Publish { file } => tools::publish(&config, &file, std::io::stdout())
                .await
                .map(drop)
                .map_err(Into::into),
            Command::ReplayDead { limit } => tools::replay_dead(&config, limit, std::io::stdout())
                .await
                .map(drop)
                .map_err(Into::into),
            Command::Check { offline } => tools::check(&config, offline, std::io::stdout())
                .await
                .map_err(Into::into),
        }
    });
    // Requests and connections left over after a timed-out drain are simply dropped.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon: the side port, the worker, and shutdown on SIGTERM/SIGINT within the grace
/// period. Exits 0 after a signal, whether or not everything held could be sent in time:
/// what was not is unacknowledged and the broker redelivers it.
async fn run(config: Config, dry_run: bool) -> anyhow::Result<()> {
    if !dry_run && !Region::ALL.iter().any(|r| config.has_write_key(*r)) {
        return Err(WorkerError::NoWriteKey.into());
    }
    let config = Arc::new(config);
    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();

    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on server.listen = {}: {e}",
                config.server.listen
            )
        })?;
    tracing::info!(listen = %config.server.listen, dry_run, "Serving /healthz, /readyz and /metrics.");
    let server = tokio::spawn(health::serve(
        listener,
        health.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let grace = config.grace_period();
    let mut worker =
        tokio::spawn(Worker::new(config, health, metrics, dry_run).run(shutdown.clone()));
    let signal = tokio::select! {
        signal = shutdown_signal() => signal,
        ended = &mut worker => {
            shutdown.cancel();
            return Ok(ended??);
        }
    };
    let started = Instant::now();
    tracing::info!(
        signal,
        grace_period_s = grace.as_secs(),
        "Shutting down: no new deliveries; sending what is held."
    );
    shutdown.cancel();
    match tokio::time::timeout(grace, worker).await {
        Ok(ended) => {
            ended??;
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "Shut down cleanly: everything held was sent and acknowledged."
            );
        }
        Err(_) => tracing::warn!(
            "The grace period ran out; deliveries not yet acknowledged stay with the broker and will be redelivered."
        ),
    }
    let _ = server.await;
    Ok(())
}

/// The intake: the webhook routes, the side port, and shutdown on SIGTERM/SIGINT: not
/// ready at once, then the drain delay, then the requests under way get the grace period.
/// Exits 0 after a signal either way: a request cut off was never answered 2xx, so its
/// sender retries it.
async fn run_intake(config: Config) -> anyhow::Result<()> {
    config.check_intake_sources()?;
    let config = Arc::new(config);
    let health = Arc::new(IntakeHealth::default());
    let metrics = Arc::new(IntakeMetrics::new(
        config.intake.sources.keys().map(String::as_str),
    ));
    let shutdown = CancellationToken::new();
    let bind = |key: &'static str, addr: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {key} = {addr}: {e}"))
    };
    let probes = bind("server.listen", config.server.listen).await?;
    let webhooks = bind("intake.listen", config.intake.listen).await?;
    let sources: Vec<&str> = config.intake.sources.keys().map(String::as_str).collect();
    let shown = |l: &tokio::net::TcpListener, configured| l.local_addr().unwrap_or(configured);
    tracing::info!(
        listen = %shown(&webhooks, config.intake.listen),
        probes = %shown(&probes, config.server.listen),
        sources = ?sources,
        "Serving webhooks."
    );
    let probes_stop = CancellationToken::new();
    let server = tokio::spawn(health::serve_probes(
        probes,
        Arc::new(IntakeProbes {
            health: health.clone(),
            metrics: metrics.clone(),
        }),
        probes_stop.clone(),
    ));
    let bound = config.intake.drain_delay() + config.grace_period() + Duration::from_secs(5);
    let mut intake = tokio::spawn(intake::run(
        config.clone(),
        webhooks,
        health,
        metrics,
        shutdown.clone(),
    ));
    let signal = tokio::select! {
        signal = shutdown_signal() => signal,
        ended = &mut intake => {
            probes_stop.cancel();
            return Ok(ended??);
        }
    };
    let started = Instant::now();
    tracing::info!(signal, "Shutting down the intake.");
    shutdown.cancel();
    match tokio::time::timeout(bound, intake).await {
        Ok(ended) => {
            ended??;
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "Intake shut down."
            );
        }
        Err(_) => tracing::warn!("The intake did not stop in time; exiting anyway."),
    }
    probes_stop.cancel();
    let _ = server.await;
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Logs go to standard error: human text, or JSON when `SEGMENT_BRIDGE_LOG_FORMAT=json`.
/// `RUST_LOG` sets the level (default `info`). lapin's own log lines are off by default:
/// it logs an expected "no queue" on the first start as an error, and every failure that
/// matters is logged by the worker itself (`RUST_LOG=info,lapin=debug` shows them). Its
/// `returned_messages` lines are always off: they print a returned message's whole body,
/// email address included.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=off"))
        .add_directive(
            "lapin::returned_messages=off"
                .parse()
                .expect("a valid directive"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("SEGMENT_BRIDGE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

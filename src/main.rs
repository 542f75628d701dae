//! The `segment-bridge` binary: parse the command line, set up logging, load the
//! configuration, run the command, turn the result into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use segment_bridge::config::Config;
use segment_bridge::health::{self, Health};
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
    /// Validate the configuration, reach the broker, report the regions' write keys.
    Check,
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
    let runtime = segment_bridge::runtime::build().expect("a tokio runtime");
    let result: anyhow::Result<()> = runtime.block_on(async {
        match cli.command {
            Command::Run { dry_run } => run(config, dry_run).await,
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
            Command::Check => tools::check(&config, std::io::stdout())
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
/// matters is logged by the worker itself (`RUST_LOG=info,lapin=debug` shows them).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("SEGMENT_BRIDGE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

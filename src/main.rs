//! The `segment-bridge` binary: parse the command line, set up logging, load the
//! configuration, run the command, turn the result into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use segment_bridge::app::{self, IntakeApp, WorkerApp};
use segment_bridge::config::Config;
use segment_bridge::tools;

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
        Command::Intake => app::intake_runtime(),
        _ => app::worker_runtime(),
    }
    .expect("a tokio runtime");
    let result: anyhow::Result<()> = runtime.block_on(async {
        match cli.command {
            Command::Run { dry_run } => {
                let app = WorkerApp::build(config, dry_run).await?;
                app.run(until_signal()).await.map(drop).map_err(Into::into)
            }
            Command::Intake => {
                let app = IntakeApp::build(config).await?;
                app.run(until_signal()).await.map(drop).map_err(Into::into)
            }
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

/// A token cancelled on the first SIGTERM or SIGINT: the program then drains within its
/// grace period and the process exits 0, whether or not everything held could be
/// finished in time (what was not is redelivered by the broker, or sent again by the
/// webhook's sender).
fn until_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let signal = shutdown_signal().await;
            tracing::info!(
                signal,
                "Shutting down: taking no new work; finishing what is under way."
            );
            shutdown.cancel();
        }
    });
    shutdown
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
/// email address included. So are rustls-platform-verifier's, one per refused certificate.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=off"))
        .add_directive(
            "lapin::returned_messages=off"
                .parse()
                .expect("a valid directive"),
        )
        // It logs every refused certificate, at each retry; the worker logs the problem
        // once (segment.rs) and counts it (`cause="tls"`).
        .add_directive(
            "rustls_platform_verifier=off"
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

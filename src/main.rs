//! The `segment-bridge` binary: parse the command line, set up logging, load the
//! configuration, run the command, turn the result into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use segment_bridge::app::{self, AppError, IntakeApp, WorkerApp, exit};
use segment_bridge::config::Config;
use segment_bridge::onboard::{self, Action};
use segment_bridge::tools::{self, ToolError};

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
    Publish {
        file: PathBuf,
        /// Publish lines that are not JSON objects too, as they are (to test bad input);
        /// without it, such a line stops the command before anything is published.
        #[arg(long)]
        allow_invalid: bool,
    },
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
    /// Set up Jebbit integrations for the intake's sources (credentials from
    /// JEBBIT_CLIENT_ID and JEBBIT_CLIENT_SECRET, or JEBBIT_TOKEN).
    #[command(subcommand)]
    Jebbit(JebbitCommand),
    /// Set up JotUrl CTAs for the intake's sources.
    #[command(subcommand)]
    Joturl(JoturlCommand),
}

#[derive(Subcommand)]
enum JebbitCommand {
    /// Show the business the credentials belong to.
    #[command(alias = "business")]
    Whoami,
    /// List the business's integrations (never their secrets).
    List,
    /// Create or update the integration that posts to an intake source, and hand its
    /// shared secret over (a 0600 file by default).
    Connect {
        /// The intake source (`[intake.sources.<NAME>]`, kind "jebbit").
        #[arg(long)]
        source: String,
        /// The intake's public base URL; the endpoint is <URL>/webhooks/<NAME>.
        #[arg(long, value_name = "URL")]
        public_url: String,
        /// Override the source's region (Jebbit takes us or eu).
        #[arg(long)]
        region: Option<String>,
        #[command(flatten)]
        handover: HandoverArgs,
    },
    /// Trigger Jebbit's test submission and confirm the intake received and verified it.
    Test {
        /// The intake source whose counters prove the submission arrived.
        #[arg(long)]
        source: String,
        /// The integration's id, when several post to the source.
        #[arg(long)]
        id: Option<String>,
        /// The intake's metrics [default: http://127.0.0.1:<server.listen port>/metrics].
        #[arg(long, value_name = "URL")]
        metrics_url: Option<String>,
        /// Seconds to wait for the intake to count the submission.
        #[arg(long, default_value_t = 30)]
        within: u64,
    },
    /// Switch an integration off (Jebbit stops sending).
    Deactivate {
        #[command(flatten)]
        which: Which,
    },
    /// Switch an integration on again.
    Activate {
        #[command(flatten)]
        which: Which,
    },
    /// Delete an integration.
    Delete {
        #[command(flatten)]
        which: Which,
    },
    /// Ask Jebbit to re-send the integration's past sessions.
    Backfill {
        #[command(flatten)]
        which: Which,
    },
    /// Show where a backfill stands.
    BackfillStatus {
        /// The backfill's id, as `backfill` printed it.
        #[arg(long)]
        id: String,
    },
}

/// Which integration: the one posting to a source, or one by id.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Which {
    /// The intake source whose endpoint the integration posts to.
    #[arg(long)]
    source: Option<String>,
    /// The integration's id.
    #[arg(long)]
    id: Option<String>,
}

impl Which {
    /// `onboard::act` on this integration.
    async fn act(
        &self,
        client: &onboard::jebbit::Client,
        action: Action,
        io: &mut onboard::Io<'_>,
    ) -> Result<(), onboard::OnboardError> {
        let (source, id) = (self.source.as_deref(), self.id.as_deref());
        onboard::act(client, source, id, action, io).await
    }
}

#[derive(clap::Args)]
struct HandoverArgs {
    /// Write the secret to this file, mode 0600 [default: <NAME>.secret, unless
    /// --k8s-secret is given].
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,
    /// Print a Kubernetes Secret manifest of this name, holding the secret, on standard
    /// output.
    #[arg(long, value_name = "NAME")]
    k8s_secret: Option<String>,
}

#[derive(Subcommand)]
enum JoturlCommand {
    /// Make a new URL token for a JotUrl source, hand it over like a Jebbit secret, and
    /// print the webhook URL to paste into JotUrl.
    Token {
        /// The intake source (`[intake.sources.<NAME>]`, kind "joturl").
        #[arg(long)]
        source: String,
        /// The intake's public base URL.
        #[arg(long, value_name = "URL")]
        public_url: String,
        #[command(flatten)]
        handover: HandoverArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let config = match Config::load(cli.config.as_deref(), None) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(exit::USAGE);
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
            Command::Publish {
                file,
                allow_invalid,
            } => tools::publish(&config, &file, allow_invalid, std::io::stdout())
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
            Command::Jebbit(command) => jebbit(&config, command).await.map_err(Into::into),
            Command::Joturl(JoturlCommand::Token {
                source,
                public_url,
                handover,
            }) => onboard::joturl_token(
                &config,
                &source,
                &public_url,
                &handover.into(),
                &mut onboard::Io {
                    out: &mut std::io::stdout(),
                    err: &mut std::io::stderr(),
                },
            )
            .map_err(Into::into),
        }
    });
    // Requests and connections left over after a timed-out drain are simply dropped.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each error's message already holds its cause: `{e:#}` would repeat it.
            tracing::error!("{e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

impl From<HandoverArgs> for onboard::Handover {
    fn from(a: HandoverArgs) -> Self {
        onboard::Handover {
            secret_file: a.secret_file,
            k8s_secret: a.k8s_secret,
        }
    }
}

async fn jebbit(config: &Config, command: JebbitCommand) -> Result<(), onboard::OnboardError> {
    let settings = onboard::settings(config, |name| std::env::var(name).ok())?;
    let client = onboard::jebbit::Client::new(settings)?;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let io = &mut onboard::Io {
        out: &mut out,
        err: &mut err,
    };
    match command {
        JebbitCommand::Whoami => onboard::whoami(&client, io).await,
        JebbitCommand::List => onboard::list(&client, io).await,
        JebbitCommand::Connect {
            source,
            public_url,
            region,
            handover,
        } => {
            let args = onboard::Connect {
                source,
                public_url,
                region,
                handover: handover.into(),
            };
            onboard::connect(config, &client, &args, io).await
        }
        JebbitCommand::Test {
            source,
            id,
            metrics_url,
            within,
        } => {
            let metrics_url = metrics_url.unwrap_or_else(|| {
                format!("http://127.0.0.1:{}/metrics", config.server.listen.port())
            });
            let args = onboard::Test {
                source,
                id,
                metrics_url,
                within: std::time::Duration::from_secs(within),
            };
            onboard::test(config, &client, &args, io).await
        }
        JebbitCommand::Deactivate { which } => {
            which.act(&client, Action::SetActive(false), io).await
        }
        JebbitCommand::Activate { which } => which.act(&client, Action::SetActive(true), io).await,
        JebbitCommand::Delete { which } => which.act(&client, Action::Delete, io).await,
        JebbitCommand::Backfill { which } => which.act(&client, Action::Backfill, io).await,
        JebbitCommand::BackfillStatus { id } => onboard::backfill_status(&client, &id, io).await,
    }
}

/// One exit code per class of failure (docs/operating.md, Exit codes).
fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(e) = e.downcast_ref::<AppError>() {
        e.exit_code()
    } else if let Some(e) = e.downcast_ref::<ToolError>() {
        e.exit_code()
    } else if let Some(e) = e.downcast_ref::<onboard::OnboardError>() {
        e.exit_code()
    } else {
        exit::FAILED
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

/// Logs go to standard error: human text (coloured only on a terminal), or JSON when
/// `SEGMENT_BRIDGE_LOG_FORMAT=json`.
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
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var("SEGMENT_BRIDGE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

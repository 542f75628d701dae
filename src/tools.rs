//! The operator's commands besides `run`: `preview`, `publish`, `replay-dead`, `check`.
//!
//! Each writes its report to the given writer (standard output in the binary) and its
//! progress to standard error, and returns an error for the exit code when something
//! went wrong.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use secrecy::ExposeSecret;
use serde_json::json;
use time::OffsetDateTime;

use crate::amqp::headers::without_error_header;
use crate::amqp::{self, confirmed, publish_mandatory};
use crate::config::Config;
use crate::domain::Region;
use crate::events::{self, Mapped};
use crate::session::{Session, peek_session_id};

/// Publishes with at most this many confirmations outstanding.
const PUBLISH_WINDOW: usize = 1024;

/// How long a command waits for the broker to answer before it calls it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a command failed. Each message names the broker by `host:port` (never the
/// password) and says its cause once: none has a `source`, so that a chain printed in
/// full does not repeat it.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} line {line} is not a JSON object ({problem}){more}; nothing was published. Fix the file (one session per line), or pass --allow-invalid to publish such lines as they are."
    )]
    InvalidLine {
        path: String,
        line: u64,
        problem: String,
        more: String,
    },
    #[error(
        "cannot reach RabbitMQ at {addr} ({detail}); is it running, and are the host and port in amqp.url right?"
    )]
    Unreachable { addr: String, detail: String },
    #[error(
        "RabbitMQ at {addr} refused the login ({detail}); check the user, password and vhost in amqp.url"
    )]
    LoginRefused { addr: String, detail: String },
    #[error("RabbitMQ at {addr}: {detail}")]
    Broker { addr: String, detail: String },
    /// A broker error not yet told where: [`ToolError::at`] makes it a `Broker` error.
    #[error("RabbitMQ: {0}")]
    Amqp(String),
    #[error("{failed} of {total} messages were not confirmed by the broker (first error: {first})")]
    Unconfirmed {
        failed: u64,
        total: u64,
        first: String,
    },
    /// `check` found problems; `exit_code` is the class of the worst.
    #[error("{problems}")]
    Check { problems: String, exit_code: u8 },
    #[error("{0}")]
    Io(String),
}

impl From<lapin::Error> for ToolError {
    fn from(e: lapin::Error) -> Self {
        ToolError::Amqp(e.to_string())
    }
}

impl From<std::io::Error> for ToolError {
    fn from(e: std::io::Error) -> Self {
        ToolError::Io(e.to_string())
    }
}

impl ToolError {
    /// The process's exit code for this failure (see [`crate::app::exit`]).
    pub fn exit_code(&self) -> u8 {
        use crate::app::exit;
        match self {
            ToolError::Read { .. } | ToolError::InvalidLine { .. } => exit::USAGE,
            ToolError::Unreachable { .. } | ToolError::LoginRefused { .. } => exit::BROKER,
            ToolError::Check { exit_code, .. } => *exit_code,
            ToolError::Broker { .. }
            | ToolError::Amqp(_)
            | ToolError::Unconfirmed { .. }
            | ToolError::Io(_) => exit::FAILED,
        }
    }

    /// Names the broker in an error that came from it.
    fn at(self, amqp: &crate::config::Amqp) -> ToolError {
        match self {
            ToolError::Amqp(detail) => ToolError::Broker {
                addr: amqp.address(),
                detail,
            },
            other => other,
        }
    }
}

/// Connects within [`CONNECT_TIMEOUT`], telling a refused login from a broker that cannot
/// be reached.
async fn connect(amqp: &crate::config::Amqp) -> Result<lapin::Connection, ToolError> {
    let addr = amqp.address();
    match tokio::time::timeout(CONNECT_TIMEOUT, amqp::connect(amqp)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) if login_refused(&e) => Err(ToolError::LoginRefused {
            addr,
            detail: e.to_string(),
        }),
        Ok(Err(e)) => Err(ToolError::Unreachable {
            addr,
            detail: e.to_string(),
        }),
        Err(_) => Err(ToolError::Unreachable {
            addr,
            detail: format!("no answer in {} s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

/// Whether the broker answered but refused this user, password or vhost (ACCESS_REFUSED,
/// NOT_ALLOWED), as opposed to not answering at all.
fn login_refused(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
        ),
        lapin::ErrorKind::AuthProviderError(_) => true,
        _ => false,
    }
}

/// Reads `file` and refuses it at the first non-blank line that is not a JSON object,
/// naming the line. Blank lines are skipped, as `publish` skips them.
fn check_lines(file: &Path) -> Result<(), ToolError> {
    let path = file.display().to_string();
    let read_err = |source| ToolError::Read {
        path: path.clone(),
        source,
    };
    let reader = std::io::BufReader::new(std::fs::File::open(file).map_err(read_err)?);
    let (mut first, mut others) = (None, 0u64);
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line.map_err(read_err)?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Err(problem) = json_object(&line) {
            if first.is_none() {
                first = Some((i as u64 + 1, problem));
            } else {
                others += 1;
            }
        }
    }
    match first {
        None => Ok(()),
        Some((line, problem)) => Err(ToolError::InvalidLine {
            path,
            line,
            problem,
            more: match others {
                0 => String::new(),
                1 => ", and 1 later line is not either".into(),
                n => format!(", and {n} later lines are not either"),
            },
        }),
    }
}

/// Whether `line` is one JSON object, with only white space around it.
fn json_object(line: &[u8]) -> Result<(), String> {
    let start = line.iter().position(|b| !b.is_ascii_whitespace());
    if start.is_none_or(|i| line[i] != b'{') {
        return Err("it does not start with `{`".into());
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(line)
        .map(drop)
        .map_err(|e| format!("invalid JSON: {e}"))
}

/// `preview`: one JSON line out per line in: the session's events, the reason it is
/// skipped, or an `error` naming what is wrong with it. No broker, no network. Lines are
/// read as bytes, as `publish` sends them, so a webhook body's hash identity is the same.
/// The messageIds are those `run` would send with this configuration; each report names
/// the scheme and the region's namespace they come from.
pub fn preview(config: &Config, input: impl BufRead, mut out: impl Write) -> std::io::Result<()> {
    let options = config.mapping_options();
    let now = OffsetDateTime::now_utc();
    for line in input.split(b'\n') {
        let line = line?;
        let report = if line.iter().all(u8::is_ascii_whitespace) {
            json!({ "error": "blank line: no session" })
        } else {
            match Session::parse(&line) {
                Err(e) => json!({ "session_id": peek_session_id(&line), "error": e.to_string() }),
                Ok(session) => {
                    let id = &session.identity;
                    // No AMQP timestamp here: a JotUrl lead's `date` stands in for it.
                    let time = session.lead_date.unwrap_or(now);
                    match events::map(&session, time, &options) {
                        Err(e) => json!({ "session_id": id, "error": e.to_string() }),
                        Ok(Mapped::Skipped(reason)) => {
                            json!({ "session_id": id, "skipped": reason.as_str() })
                        }
                        Ok(Mapped::Events(e)) => {
                            let ids = options.message_ids.region(e.region);
                            let mut report = json!({
                                "session_id": id,
                                "region": e.region.as_str(),
                                "message_id_scheme": ids.scheme().as_str(),
                                "events": [raw(e.identify()), raw(e.track())],
                            });
                            if let Some(namespace) = ids.namespace() {
                                report["message_id_namespace"] = json!(namespace);
                            }
                            if !config.has_write_key(e.region) {
                                report["warning"] = json!(format!(
                                    "no write key is configured for region {}: `run` would dead-letter this session",
                                    e.region
                                ));
                            }
                            report
                        }
                    }
                }
            }
        };
        serde_json::to_writer(&mut out, &report)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

fn raw(event: &[u8]) -> serde_json::Value {
    serde_json::from_slice(event).expect("events are valid JSON")
}

/// `publish FILE`: every non-blank line, unchanged, onto the queue as a persistent message,
/// with publisher confirms. Returns how many were published. Unless `allow_invalid`, the
/// whole file is read first, and a line that is not a JSON object stops it before
/// anything is published.
pub async fn publish(
    config: &Config,
    file: &Path,
    allow_invalid: bool,
    out: impl Write,
) -> Result<u64, ToolError> {
    if !allow_invalid {
        check_lines(file)?;
    }
    publish_lines(config, file, out)
        .await
        .map_err(|e| e.at(&config.amqp))
}

async fn publish_lines(
    config: &Config,
    file: &Path,
    mut out: impl Write,
) -> Result<u64, ToolError> {
    let read_err = |source| ToolError::Read {
        path: file.display().to_string(),
        source,
    };
    let size = std::fs::metadata(file).map_err(read_err)?.len().max(1);
    let reader = std::io::BufReader::new(std::fs::File::open(file).map_err(read_err)?);

    let conn = connect(&config.amqp).await?;
    amqp::ensure_queue(&conn, &config.amqp.queue, config.amqp.declare).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue: ShortString = config.amqp.queue.as_str().into();

    let mut progress = Progress::new("published");
    let mut pending = FuturesUnordered::new();
    let (mut total, mut failed, mut first_error) = (0u64, 0u64, None);
    let mut read = 0u64;
    let mut settle = |result: Result<(), amqp::Unconfirmed>, failed: &mut u64| {
        if let Err(e) = result {
            *failed += 1;
            first_error.get_or_insert(e.to_string());
        }
    };
    for line in reader.split(b'\n') {
        let line = line.map_err(read_err)?;
        read += line.len() as u64 + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_timestamp(OffsetDateTime::now_utc().unix_timestamp() as u64);
        let confirm = publish_mandatory(&channel, &queue, &line, properties).await?;
        pending.push(confirmed(confirm));
        total += 1;
        if pending.len() >= PUBLISH_WINDOW {
            let result = pending.next().await.expect("not empty");
            settle(result, &mut failed);
        }
        progress.tick(total, Some(read * 100 / size));
    }
    while let Some(result) = pending.next().await {
        settle(result, &mut failed);
    }
    progress.done(total);
    close(&channel, &conn).await;
    writeln!(
        out,
        "published {} of {total} sessions to queue {}",
        total - failed,
        config.amqp.queue
    )?;
    if let Some(first) = first_error {
        return Err(ToolError::Unconfirmed {
            failed,
            total,
            first,
        });
    }
    Ok(total)
}

/// `replay-dead`: moves dead-lettered messages back to the main queue, body and properties
/// as they were, without the error header. Takes at most the messages there at the start
/// (and at most `limit`), so a cause not yet fixed cannot make it loop.
pub async fn replay_dead(
    config: &Config,
    limit: Option<u64>,
    out: impl Write,
) -> Result<u64, ToolError> {
    replay(config, limit, out)
        .await
        .map_err(|e| e.at(&config.amqp))
}

async fn replay(
    config: &Config,
    limit: Option<u64>,
    mut out: impl Write,
) -> Result<u64, ToolError> {
    let conn = connect(&config.amqp).await?;
    amqp::ensure_queue(&conn, &config.amqp.queue, config.amqp.declare).await?;
    let channel = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let dead = channel
        .queue_declare(
            config.amqp.dead_letter_queue.as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let there = u64::from(dead.message_count());
    let todo = limit.map_or(there, |l| l.min(there));
    let queue: ShortString = config.amqp.queue.as_str().into();

    let mut progress = Progress::new("replayed");
    let mut moved = 0;
    while moved < todo {
        let Some(message) = channel
            .basic_get(
                config.amqp.dead_letter_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let properties = without_error_header(amqp::headers::for_copy(delivery.properties.clone()));
        let confirm = publish_mandatory(&channel, &queue, &delivery.data, properties).await?;
        if let Err(e) = confirmed(confirm).await {
            // Put it back where it was without spending a delivery of a quorum
            // dead-letter queue: a copy to the tail, then the ack; nack only if that fails.
            let dead_letter_queue: ShortString = config.amqp.dead_letter_queue.as_str().into();
            let back = publish_mandatory(
                &channel,
                &dead_letter_queue,
                &delivery.data,
                amqp::headers::for_copy(delivery.properties.clone()),
            )
            .await?;
            if confirmed(back).await.is_ok() {
                channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                    .await?;
            } else {
                channel
                    .basic_nack(
                        delivery.delivery_tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .await?;
            }
            // Closed, close-ok awaited, so that the ack above is not lost with the socket.
            close(&channel, &conn).await;
            return Err(ToolError::Unconfirmed {
                failed: 1,
                total: moved + 1,
                first: e.to_string(),
            });
        }
        channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        moved += 1;
        progress.tick(moved, (todo > 0).then(|| moved * 100 / todo));
    }
    progress.done(moved);
    close(&channel, &conn).await;
    writeln!(
        out,
        "moved {moved} messages from {} back to {}",
        config.amqp.dead_letter_queue, config.amqp.queue
    )?;
    Ok(moved)
}

/// `check`: the configuration is valid (it was loaded), the broker answers, the queues are
/// there or will be declared, which regions have a write key, and the intake's sources.
/// `offline` leaves the broker alone (no network at all), for checking a file before it
/// is deployed. Never prints a key or a secret.
pub async fn check(config: &Config, offline: bool, mut out: impl Write) -> Result<(), ToolError> {
    writeln!(out, "config: valid")?;
    // The settings that deployment manifests must agree with, as the binary reads them
    // (defaults included), so that a deploy check need not know the defaults.
    writeln!(out, "amqp.queue = {}", config.amqp.queue)?;
    writeln!(
        out,
        "amqp.dead_letter_queue = {}",
        config.amqp.dead_letter_queue
    )?;
    writeln!(out, "server.listen = {}", config.server.listen)?;
    writeln!(
        out,
        "shutdown.grace_period_s = {}",
        config.shutdown.grace_period_s
    )?;
    writeln!(out, "intake.listen = {}", config.intake.listen)?;
    writeln!(
        out,
        "intake.max_body_bytes = {}",
        config.intake.max_body_bytes
    )?;
    writeln!(
        out,
        "intake.drain_delay_ms = {}",
        config.intake.drain_delay_ms
    )?;
    let mut problems = Vec::new();
    let mut exit_code = crate::app::exit::USAGE;
    if offline {
        writeln!(out, "broker: not contacted (--offline)")?;
    } else if let Some(code) = check_broker(config, &mut out, &mut problems).await? {
        exit_code = code;
    }
    for region in Region::ALL {
        let endpoint = &config.endpoint(region).endpoint;
        if config.has_write_key(region) {
            let ids = match config.segment.message_id_scheme {
                events::MessageIdScheme::V1 => "messageIds v1".to_owned(),
                events::MessageIdScheme::V2 => format!(
                    "messageIds v2 in namespace {}",
                    config.message_id_namespace(region)
                ),
            };
            writeln!(
                out,
                "region {region}: write key set, endpoint {endpoint}, {ids}"
            )?;
        } else {
            writeln!(
                out,
                "region {region}: no write key ({region} sessions would be dead-lettered)"
            )?;
        }
    }
    if !Region::ALL.iter().any(|r| config.has_write_key(*r)) {
        problems.push(
            "no write key is configured for either region: `run` would refuse to start without --dry-run".into(),
        );
    }
    for (name, source) in &config.intake.sources {
        let region = source.region.unwrap_or(config.segment.default_region);
        let secret = if source.secret.expose_secret().trim().is_empty() {
            "no secret"
        } else {
            "secret set"
        };
        let kind = source.kind.as_str();
        writeln!(out, "source {name}: {kind}, region {region}, {secret}")?;
    }
    if !config.intake.sources.is_empty()
        && let Err(e) = config.check_intake_sources()
    {
        problems.push(format!("`intake` would refuse to start: {e}"));
    }
    if problems.is_empty() {
        writeln!(out, "ok")?;
        Ok(())
    } else {
        Err(ToolError::Check {
            problems: problems.join("; "),
            exit_code,
        })
    }
}

/// The broker half of `check`: reachable (or why not: a refused login, or no answer), and
/// the queues there or declared by `run`. Returns the exit code of a broker that could
/// not be used.
async fn check_broker(
    config: &Config,
    out: &mut impl Write,
    problems: &mut Vec<String>,
) -> Result<Option<u8>, ToolError> {
    let addr = config.amqp.address();
    match connect(&config.amqp).await {
        Ok(conn) => {
            writeln!(out, "broker: reachable at {addr}")?;
            for queue in [&config.amqp.queue, &config.amqp.dead_letter_queue] {
                match amqp::ensure_queue(&conn, queue, false).await {
                    Ok(()) => writeln!(out, "queue {queue}: exists")?,
                    Err(_) if config.amqp.declare => writeln!(
                        out,
                        "queue {queue}: missing; `run` will declare it (amqp.declare = true)"
                    )?,
                    Err(e) => {
                        writeln!(out, "queue {queue}: missing and amqp.declare = false")?;
                        problems.push(format!("queue {queue} does not exist: {e}"));
                    }
                }
            }
            let _ = conn.close(200, "OK".into()).await;
            Ok(None)
        }
        Err(e) => {
            let (state, detail) = match &e {
                ToolError::LoginRefused { detail, .. } => ("login refused", detail.as_str()),
                ToolError::Unreachable { detail, .. } => ("unreachable", detail.as_str()),
                _ => ("error", ""),
            };
            writeln!(out, "broker: {state} at {addr} ({detail})")?;
            problems.push(e.to_string());
            Ok(Some(e.exit_code()))
        }
    }
}

/// Closes the channel and then the connection cleanly; a failure to close matters no
/// more at the end of a tool's run.
async fn close(channel: &lapin::Channel, conn: &lapin::Connection) {
    let _ = channel.close(200, "OK".into()).await;
    let _ = conn.close(200, "OK".into()).await;
}

/// A line on standard error at most once a second, for long runs.
struct Progress {
    verb: &'static str,
    last: Instant,
}

impl Progress {
    fn new(verb: &'static str) -> Self {
        Progress {
            verb,
            last: Instant::now(),
        }
    }

    fn tick(&mut self, count: u64, percent: Option<u64>) {
        if self.last.elapsed() >= Duration::from_secs(1) {
            self.last = Instant::now();
            match percent {
                Some(p) => eprintln!("{} {count} messages ({p}%)", self.verb),
                None => eprintln!("{} {count} messages", self.verb),
            }
        }
    }

    fn done(&self, count: u64) {
        if self.last.elapsed() >= Duration::from_secs(1) || count > 10_000 {
            eprintln!("{} {count} messages (100%)", self.verb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preview_lines(input: &str) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        preview(&Config::default(), input.as_bytes(), &mut out).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn preview_reports_a_line_that_is_not_utf8_and_goes_on() {
        let mut out = Vec::new();
        let input: &[u8] = b"{\"session_id\":\"\xff\"}\n{\"session_id\":\"ok\"}\n";
        preview(&Config::default(), input, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("not valid JSON"), "{}", lines[0]);
        assert!(lines[1].contains("skipped_no_email"));
    }

    #[test]
    fn preview_prints_events_skips_and_errors_one_line_each() {
        let lines = preview_lines(concat!(
            r#"{"session_id":"s1","email":"a@b.c","region":"eu"}"#,
            "\n\n",
            r#"{"session_id":"s2"}"#,
            "\n",
            "not json\n",
            r#"{"session_id":"s3","email":"nope"}"#,
            "\n",
        ));
        assert_eq!(lines.len(), 5, "one line out per line in");
        assert_eq!(lines[0]["region"], "eu");
        assert_eq!(lines[0]["events"][0]["type"], "identify");
        assert_eq!(lines[0]["events"][1]["event"], "Survey Completed");
        let text = |v: &serde_json::Value| v.as_str().unwrap().to_owned();
        assert!(text(&lines[0]["warning"]).contains("no write key"));
        assert!(text(&lines[1]["error"]).contains("blank line"));
        assert_eq!(lines[2]["skipped"], "skipped_no_email");
        assert!(text(&lines[3]["error"]).contains("not valid JSON"));
        assert_eq!(
            lines[4]["session_id"], "s3",
            "the id is named even for bad input"
        );
        assert!(text(&lines[4]["error"]).contains("email"));
    }

    #[test]
    fn preview_shows_joturl_leads_by_their_keys_and_skips_tracking_links() {
        let input = [
            include_str!("../tests/fixtures/joturl-form-lead.json"),
            include_str!("../tests/fixtures/joturl-social-optin-lead.json"),
            include_str!("../tests/fixtures/joturl-tracking-link.json"),
        ]
        .concat();
        let lines = preview_lines(&input);
        assert_eq!(lines.len(), 3);
        let track = &lines[0]["events"][1];
        assert_eq!(track["event"], "Lead Captured");
        assert_eq!(track["properties"]["trafficSource"], "JotUrl");
        assert_eq!(track["properties"]["questions"]["name"], "John Smith");
        // No AMQP timestamp in a preview: the lead's day stands in.
        assert_eq!(track["timestamp"], "2020-03-26T00:00:00.000Z");
        assert_eq!(
            lines[0]["region"], "us",
            "the default region: no header here"
        );
        assert_eq!(
            lines[1]["events"][0]["traits"]["first_name"], "Jane",
            "extended_info's keys"
        );
        assert_eq!(lines[2]["skipped"], "skipped_not_a_lead");
    }

    #[test]
    fn preview_shows_the_message_ids_run_would_send_and_their_namespace() {
        let env = [("SEGMENT_BRIDGE__SEGMENT__EU__WRITE_KEY", "eu-key-Jz8rQ2vX")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = Config::load(None, Some(env.into())).unwrap();
        let body = r#"{"session_id":"s1","email":"a@b.c","region":"eu"}"#;
        let mut out = Vec::new();
        preview(&config, body.as_bytes(), &mut out).unwrap();
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["message_id_scheme"], "v2");
        assert_eq!(line["message_id_namespace"], "639beb88a28f816a");
        let session = Session::parse(body.as_bytes()).unwrap();
        let Ok(Mapped::Events(sent)) = events::map(
            &session,
            OffsetDateTime::now_utc(),
            &config.mapping_options(),
        ) else {
            panic!("not mapped");
        };
        assert_eq!(
            line["events"][0]["messageId"],
            raw(sent.identify())["messageId"]
        );
        assert_eq!(
            line["events"][1]["messageId"],
            raw(sent.track())["messageId"]
        );
        let other = preview_lines(body);
        assert_eq!(other[0]["message_id_namespace"], events::NO_KEY_NAMESPACE);
        assert_ne!(
            other[0]["events"][0]["messageId"],
            line["events"][0]["messageId"]
        );
    }
}

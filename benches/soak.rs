//! Soak: the worker binary against the local RabbitMQ and a flaky fake Segment, for a long
//! stream, with the broker misbehaving. Not part of `cargo test`.
//!
//! ```text
//! cargo bench --bench soak -- --run [--sessions N] [--rate R] [--close-every S]
//!                                   [--restart-at S] [--outage-at S] [--outage-for S]
//!                                   [--sample-every S]
//! ```
//!
//! What it does (defaults in brackets):
//! - declares a quorum queue `sb-soak.<pid>` with `x-delivery-limit = 20` (RabbitMQ 4.x's
//!   default) and a dead-letter queue beside it, both deleted at the end;
//! - starts `segment-bridge run` (the release binary) as a child process on them, with
//!   both regions pointing at a fake Segment in this process that answers 5% of requests
//!   500, 0.5% 429 with `Retry-After: 1`, and the rest 200;
//! - publishes N [1,000,000] realistic sessions (`benches/common`) at R [5,000] per second
//!   with publisher confirms, republishing what was not confirmed when the broker goes;
//! - closes the worker's connections from the broker's side every S [60] seconds, and
//!   restarts the broker once (`rabbitmqctl stop_app`, 5 s, `start_app`) at S [90] s;
//! - takes Segment down (every request 503) for S [20] seconds at S [150] s, with the
//!   worker's `retry.max_hold_s` at 5 s, so that it hands held deliveries back several
//!   times (on a quorum queue, without spending their deliveries);
//! - samples the worker's RSS (`/proc/<pid>/status` VmRSS) every S [10] seconds;
//! - ends when the fake has accepted the Track event of every session that has an email
//!   (1% have none and are skipped by design) and both queues are empty, then sends
//!   SIGTERM and expects exit code 0.
//!
//! It prints the RSS series, the request counts, duplicates (events accepted more than once,
//! harmless: same messageId), the dead letters, the worker's own counts of hand-backs and
//! high delivery counts (from its `/metrics`), and a verdict; it exits non-zero if a
//! session is missing, one was dead-lettered, or the worker did not exit cleanly.
//!
//! It restarts the broker, so it holds the broker lock of the tests exclusively (waiting
//! for running tests to finish, and keeping new ones out), and starts the broker again
//! even when it fails. Without `--run` it only prints this usage (so that `cargo bench`
//! and `cargo test --benches` do not restart the broker by surprise).

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use segment_bridge::events;
use segment_bridge::session::Session;

use segment_bridge_testkit::broker::{AMQP_URL, BrokerLock, delete_queues};

mod common;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
struct Options {
    sessions: u64,
    rate: u64,
    close_every: Duration,
    restart_at: Duration,
    outage_at: Duration,
    outage_for: Duration,
    sample_every: Duration,
}

fn options() -> Result<Option<Options>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--run") {
        return Ok(None);
    }
    let value = |name: &str| -> Option<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let secs = |name: &str, default: u64| -> Result<Duration> {
        Ok(Duration::from_secs(match value(name) {
            Some(v) => v.parse()?,
            None => default,
        }))
    };
    Ok(Some(Options {
        sessions: value("--sessions").map_or(Ok(1_000_000), str::parse)?,
        rate: value("--rate").map_or(Ok(5_000), str::parse)?,
        close_every: secs("--close-every", 60)?,
        restart_at: secs("--restart-at", 90)?,
        outage_at: secs("--outage-at", 150)?,
        outage_for: secs("--outage-for", 20)?,
        sample_every: secs("--sample-every", 10)?,
    }))
}

fn main() -> Result<()> {
    let Some(options) = options()? else {
        println!(
            "soak: skipped. It restarts the local broker; run it with `cargo bench --bench soak -- --run` (see benches/soak.rs)."
        );
        return Ok(());
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ok = runtime.block_on(soak(options))?;
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The broker: lock, queues, restarts

fn rabbitmqctl(args: &[&str]) -> Result<String> {
    let out = Command::new("rabbitmqctl").args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts the broker again if dropped while it is stopped.
struct BrokerGuard {
    stopped: AtomicBool,
}

impl BrokerGuard {
    fn restart(&self, down_for: Duration) -> Result<()> {
        self.stopped.store(true, Ordering::SeqCst);
        rabbitmqctl(&["stop_app"])?;
        std::thread::sleep(down_for);
        rabbitmqctl(&["start_app"])?;
        rabbitmqctl(&["await_startup", "--timeout", "60"])?;
        self.stopped.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if self.stopped.load(Ordering::SeqCst) {
            let _ = rabbitmqctl(&["start_app"]);
            let _ = rabbitmqctl(&["await_startup", "--timeout", "60"]);
        }
    }
}

/// Closes every connection of the worker (named `segment-bridge/<version>`); returns how many.
fn close_worker_connections() -> Result<usize> {
    let list = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "--quiet",
        "--no-table-headers",
    ])?;
    let mut closed = 0;
    for line in list.lines() {
        if line.contains("segment-bridge/")
            && let Some(pid) = line.split_whitespace().next()
        {
            rabbitmqctl(&["close_connection", pid, "closed by the soak"])?;
            closed += 1;
        }
    }
    Ok(closed)
}

/// Messages in a queue, ready and unacknowledged.
fn queue_messages(queue: &str) -> Result<u64> {
    let list = rabbitmqctl(&[
        "list_queues",
        "name",
        "messages",
        "--quiet",
        "--no-table-headers",
    ])?;
    list.lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| name.trim() == queue)
        .and_then(|(_, n)| n.trim().parse().ok())
        .ok_or_else(|| format!("no queue {queue}").into())
}

struct Queues {
    main: String,
    dead: String,
}

impl Queues {
    async fn declare() -> Result<Queues> {
        let q = Queues {
            main: format!("sb-soak.{}", std::process::id()),
            dead: format!("sb-soak.{}.dead", std::process::id()),
        };
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(20));
        channel
            .queue_declare(
                q.main.as_str().into(),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await?;
        channel
            .queue_declare(
                q.dead.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "OK".into()).await;
        let _ = conn.close(200, "OK".into()).await;
        Ok(q)
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        delete_queues(vec![self.main.clone(), self.dead.clone()]);
    }
}

// ---------------------------------------------------------------------------------------
// The fake Segment

/// The first 16 hex digits of a messageId's hash, as a number.
/// The worker's write keys, from which its messageIds derive.
const US_WRITE_KEY: &str = "soak-us";
const EU_WRITE_KEY: &str = "soak-eu";

fn id_key(message_id: &str) -> u64 {
    let hex = message_id.rsplit('-').next().unwrap_or_default();
    u64::from_str_radix(&hex[..16.min(hex.len())], 16).unwrap_or(0)
}

#[derive(Default)]
struct Sink {
    /// Segment is down: every request 503.
    down: AtomicBool,
    requests: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    throttled: AtomicU64,
    events: AtomicU64,
    /// Track messageIds accepted, and how many were accepted again.
    tracks: Mutex<HashSet<u64>>,
    duplicates: AtomicU64,
}

/// How a Track's messageId starts in a request body (scheme v2, the default).
const TRACK_ID: &str = "\"messageId\":\"sb2-track-";

async fn receive(State(sink): State<Arc<Sink>>, body: Bytes) -> Response {
    let n = sink.requests.fetch_add(1, Ordering::Relaxed);
    if sink.down.load(Ordering::Relaxed) {
        sink.errors.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "{}").into_response();
    }
    if n % 20 == 7 {
        sink.errors.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::INTERNAL_SERVER_ERROR, "{}").into_response();
    }
    if n % 200 == 13 {
        sink.throttled.fetch_add(1, Ordering::Relaxed);
        let mut r = (StatusCode::TOO_MANY_REQUESTS, "{}").into_response();
        r.headers_mut().insert("retry-after", "1".parse().unwrap());
        return r;
    }
    let text = String::from_utf8_lossy(&body);
    let mut keys = Vec::new();
    let mut rest = &*text;
    while let Some(at) = rest.find(TRACK_ID) {
        rest = &rest[at + TRACK_ID.len()..];
        keys.push(id_key(&rest[..64.min(rest.len())]));
    }
    let events = text.matches("\"messageId\":").count() as u64;
    sink.events.fetch_add(events, Ordering::Relaxed);
    let mut tracks = sink.tracks.lock().unwrap();
    for key in keys {
        if !tracks.insert(key) {
            sink.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
    sink.ok.fetch_add(1, Ordering::Relaxed);
    (StatusCode::OK, "{}").into_response()
}

// ---------------------------------------------------------------------------------------
// The publisher

/// Publishes `n` sessions at `rate`/s with confirms; what was not confirmed when the
/// connection went is published again. Returns the Track messageIds to expect.
async fn publish(
    queue: String,
    n: u64,
    rate: u64,
    expected: Arc<Mutex<HashSet<u64>>>,
    published: Arc<AtomicU64>,
) -> Result<()> {
    let mut rng = common::Rng::new(0x50a6);
    // What the worker maps with: the expected ids are the Tracks it sends.
    let options = events::Options {
        message_ids: events::MessageIds::v2(
            &events::write_key_namespace(US_WRITE_KEY),
            &events::write_key_namespace(EU_WRITE_KEY),
        ),
        ..events::Options::default()
    };
    let mut next = 0u64;
    // Bodies not yet confirmed, oldest first, and those to publish again.
    let mut redo: VecDeque<Vec<u8>> = VecDeque::new();
    let start = Instant::now();
    loop {
        let conn = match Connection::connect(
            AMQP_URL,
            ConnectionProperties::default().with_connection_name("sb-soak-publisher".into()),
        )
        .await
        {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut window: VecDeque<(Vec<u8>, lapin::PublisherConfirm)> = VecDeque::new();
        let failed = 'publishing: loop {
            if next >= n && redo.is_empty() {
                break false;
            }
            // Pace: at most `rate` per second since the start.
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            if redo.is_empty() && next >= due {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let body = match redo.pop_front() {
                Some(body) => body,
                None => {
                    let g = common::session(&mut rng, "soak", next, None);
                    next += 1;
                    if let Ok(session) = Session::parse(g.body.as_bytes())
                        && session.email.is_some()
                    {
                        let ids = options
                            .message_ids
                            .region(session.region.unwrap_or(options.default_region));
                        let event = events::track_event(&session, &options);
                        let id = ids.message_id(&session.identity, events::EventKind::Track(event));
                        expected.lock().unwrap().insert(id_key(&id));
                    }
                    g.body.into_bytes()
                }
            };
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            match channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
            {
                Ok(confirm) => window.push_back((body, confirm)),
                Err(_) => {
                    redo.push_back(body);
                    break 'publishing true;
                }
            }
            while window.len() > 1000 {
                let (body, confirm) = window.pop_front().unwrap();
                match confirm.await {
                    Ok(c) if c.is_ack() => {
                        published.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        redo.push_back(body);
                        break 'publishing true;
                    }
                }
            }
        };
        let mut lost = failed;
        while let Some((body, confirm)) = window.pop_front() {
            if lost {
                redo.push_back(body);
                continue;
            }
            match confirm.await {
                Ok(c) if c.is_ack() => {
                    published.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    lost = true;
                    redo.push_back(body);
                }
            }
        }
        if !lost {
            let _ = channel.close(200, "OK".into()).await;
            let _ = conn.close(200, "OK".into()).await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The worker

fn spawn_worker(
    queues: &Queues,
    sink: &str,
    probes: std::net::SocketAddr,
    dir: &std::path::Path,
) -> Result<Child> {
    let config = dir.join("empty.toml");
    std::fs::write(&config, "")?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segment-bridge"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("worker.log"))?);
    for (key, _) in std::env::vars() {
        if key.starts_with("SEGMENT_BRIDGE__") {
            cmd.env_remove(key);
        }
    }
    for (key, value) in [
        ("AMQP__URL", AMQP_URL.to_owned()),
        ("AMQP__QUEUE", queues.main.clone()),
        ("AMQP__DEAD_LETTER_QUEUE", queues.dead.clone()),
        ("SEGMENT__US__ENDPOINT", sink.to_owned()),
        ("SEGMENT__US__WRITE_KEY", US_WRITE_KEY.to_owned()),
        ("SEGMENT__EU__ENDPOINT", sink.to_owned()),
        ("SEGMENT__EU__WRITE_KEY", EU_WRITE_KEY.to_owned()),
        ("SERVER__LISTEN", probes.to_string()),
        ("RETRY__MAX_BACKOFF_MS", "2000".to_owned()),
        ("RETRY__MAX_HOLD_S", "5".to_owned()),
    ] {
        cmd.env(format!("SEGMENT_BRIDGE__{key}"), value);
    }
    cmd.env("RUST_LOG", "warn,lapin=off");
    Ok(cmd.spawn()?)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------------------------------

async fn soak(options: Options) -> Result<bool> {
    eprintln!("soak: waiting for the broker lock (running tests finish first) ...");
    let _lock = tokio::task::spawn_blocking(BrokerLock::exclusive).await?;
    let broker = Arc::new(BrokerGuard {
        stopped: AtomicBool::new(false),
    });
    let queues = Queues::declare().await?;

    let sink = Arc::new(Sink::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/batch", listener.local_addr()?);
    let app = Router::new()
        .route("/v1/batch", post(receive))
        .with_state(sink.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = std::env::temp_dir().join(format!("sb-soak.{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("worker.log");
    let probes = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut worker = spawn_worker(&queues, &url, probes, &dir)?;
    let pid = worker.id();

    let expected = Arc::new(Mutex::new(HashSet::new()));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn(publish(
        queues.main.clone(),
        options.sessions,
        options.rate,
        expected.clone(),
        published.clone(),
    ));

    println!(
        "soak: {} sessions at {}/s into quorum queue {} (x-delivery-limit 20); worker pid {pid}, log {}",
        options.sessions,
        options.rate,
        queues.main,
        log.display()
    );
    let start = Instant::now();
    let mut rss = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut next_close = options.close_every;
    let mut closes = 0;
    let mut restarted = false;
    let mut outage = 0u8;
    let mut publisher = Some(publisher);
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = start.elapsed();
        if let Some(status) = worker.try_wait()? {
            break format!("the worker exited early: {status}");
        }
        if t >= next_sample {
            next_sample = t + options.sample_every;
            let kib = rss_kib(pid).unwrap_or(0);
            let accepted = sink.tracks.lock().unwrap().len();
            println!(
                "t={:>4}s  rss={:>6.1} MB  published={:>8}  delivered={:>8}",
                t.as_secs(),
                kib as f64 / 1024.0,
                published.load(Ordering::Relaxed),
                accepted
            );
            rss.push((t.as_secs(), kib));
        }
        if t >= next_close {
            next_close = t + options.close_every;
            let n = tokio::task::spawn_blocking(close_worker_connections).await??;
            closes += n;
            println!(
                "t={:>4}s  closed {n} worker connection(s) from the broker",
                t.as_secs()
            );
        }
        if !restarted && t >= options.restart_at {
            restarted = true;
            println!(
                "t={:>4}s  restarting the broker (stop_app, 5 s, start_app)",
                t.as_secs()
            );
            let b = broker.clone();
            tokio::task::spawn_blocking(move || b.restart(Duration::from_secs(5))).await??;
            println!("t={:>4}s  the broker is back", start.elapsed().as_secs());
        }
        if outage == 0 && t >= options.outage_at {
            outage = 1;
            sink.down.store(true, Ordering::Relaxed);
            println!(
                "t={:>4}s  Segment down (503) for {} s",
                t.as_secs(),
                options.outage_for.as_secs()
            );
        }
        if outage == 1 && t >= options.outage_at + options.outage_for {
            outage = 2;
            sink.down.store(false, Ordering::Relaxed);
            println!("t={:>4}s  Segment up again", t.as_secs());
        }
        if let Some(p) = &publisher
            && p.is_finished()
        {
            publisher.take().unwrap().await??;
            println!(
                "t={:>4}s  all {} sessions published and confirmed",
                start.elapsed().as_secs(),
                options.sessions
            );
        }
        if publisher.is_none() && outage != 1 {
            let done = {
                let want = expected.lock().unwrap();
                let got = sink.tracks.lock().unwrap();
                want.iter().all(|k| got.contains(k))
            };
            if done {
                let main = tokio::task::spawn_blocking({
                    let q = queues.main.clone();
                    move || queue_messages(&q)
                })
                .await??;
                if main == 0 {
                    break String::new();
                }
            }
        }
        if t > Duration::from_secs(3600) {
            break "not done within an hour".to_owned();
        }
    };
    let took = start.elapsed();
    let http = segment_bridge::segment::http_client(Duration::from_secs(5))?;
    let metrics = http
        .get(format!("http://{probes}/metrics"))
        .send()
        .await
        .ok();
    let metrics = match metrics {
        Some(r) => r.text().await.unwrap_or_default(),
        None => String::new(),
    };
    let series = |prefix: &str| -> Vec<String> {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    };
    // SIGTERM, then the exit code.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exit = tokio::task::spawn_blocking(move || worker.wait()).await??;
    let dead = tokio::task::spawn_blocking({
        let q = queues.dead.clone();
        move || queue_messages(&q)
    })
    .await??;
    let want = expected.lock().unwrap().len();
    let got = sink.tracks.lock().unwrap().len();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let warnings = log_text.lines().filter(|l| l.contains("WARN")).count();
    let errors = log_text.lines().filter(|l| l.contains("ERROR")).count();

    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| sessions published | {} |", options.sessions);
    println!("| sessions with an email (expected deliveries) | {want} |");
    println!("| sessions delivered (distinct Track messageIds) | {got} |");
    println!(
        "| events accepted | {} |",
        sink.events.load(Ordering::Relaxed)
    );
    println!(
        "| Track events accepted again (same messageId) | {} |",
        sink.duplicates.load(Ordering::Relaxed)
    );
    println!(
        "| requests: 200 / 500 / 429 | {} / {} / {} |",
        sink.ok.load(Ordering::Relaxed),
        sink.errors.load(Ordering::Relaxed),
        sink.throttled.load(Ordering::Relaxed)
    );
    println!("| connections closed by the broker | {closes} |");
    println!("| broker restarts | {} |", u8::from(restarted));
    println!("| dead-lettered | {dead} |");
    println!("| worker log: WARN / ERROR lines | {warnings} / {errors} |");
    for line in series("segment_bridge_deliveries_requeued_total")
        .into_iter()
        .chain(series("segment_bridge_requeue_fallbacks_total"))
        .chain(series("segment_bridge_high_delivery_count_total"))
        .chain(series("segment_bridge_amqp_connections_total"))
    {
        let (name, value) = line.rsplit_once(' ').unwrap_or((&line, ""));
        println!("| worker: `{name}` | {value} |");
    }
    println!("| worker exit after SIGTERM | {exit} |");
    println!("| duration | {:.0} s |", took.as_secs_f64());
    let rss_mb: Vec<String> = rss
        .iter()
        .map(|(t, kib)| format!("{t}s:{:.1}", *kib as f64 / 1024.0))
        .collect();
    println!("| RSS series (MB) | {} |", rss_mb.join(" "));
    if let (Some(first), Some(max)) = (
        rss.iter().find(|(t, _)| *t >= 30).map(|r| r.1),
        rss.iter().map(|r| r.1).max(),
    ) {
        println!(
            "| RSS after 30 s / peak | {:.1} / {:.1} MB |",
            first as f64 / 1024.0,
            max as f64 / 1024.0
        );
    }
    let _ = std::io::stdout().flush();

    let ok = outcome.is_empty() && got == want && dead == 0 && exit.success();
    if ok {
        println!("\nsoak: PASS — every session delivered, none dead-lettered, clean exit.");
    } else {
        println!(
            "\nsoak: FAIL — {}{} of {want} delivered, {dead} dead-lettered, exit {exit}; worker log: {}",
            if outcome.is_empty() {
                String::new()
            } else {
                format!("{outcome}; ")
            },
            got,
            log.display()
        );
    }
    Ok(ok)
}

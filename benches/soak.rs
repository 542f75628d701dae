//! Soak: the worker binary against the local RabbitMQ and a flaky fake Segment, for a long
//! stream, with the broker misbehaving. Not part of `cargo test`.
//!
//! ```text
//! cargo bench --bench soak -- --run [--sessions N] [--rate R] [--close-every S]
//!                                   [--restart-at S] [--outage-at S] [--outage-for S]
//!                                   [--sample-every S] [--no-restart]
//! cargo bench --bench soak -- --help
//! ```
//!
//! What it does (defaults in brackets; counts may group digits with `_`):
//! - declares a quorum queue `sb-test.soak.<unique>` with `x-delivery-limit = 20`
//!   (RabbitMQ 4.x's default) and a dead-letter queue beside it, both deleted at the end
//!   (`segment_bridge_testkit::broker::Queues`);
//! - starts `segment-bridge run` (the release binary, through the kit's launcher) on them,
//!   with both regions pointing at a fake Segment in this process (the kit's counting
//!   `Sink`) that answers 5% of requests 500, 0.5% 429 with `Retry-After: 1`, and the
//!   rest 200;
//! - publishes N [1,000,000] realistic sessions (`segment_bridge_testkit::sessions`) at R
//!   [5,000] per second with publisher confirms, republishing what was not confirmed when
//!   the broker goes;
//! - closes the worker's connection from the broker's side every S [60] seconds
//!   (`--close-every`), and restarts the broker once (`rabbitmqctl stop_app`, 5 s,
//!   `start_app`) at S [90] s (`--restart-at`), unless `--no-restart`;
//! - takes Segment down (every request 503) for S [20] seconds (`--outage-for`) at S [150]
//!   s (`--outage-at`), with the worker's `retry.max_hold_s` at 5 s, so that it hands held
//!   deliveries back several times (on a quorum queue, without spending their deliveries);
//! - samples the worker's RSS (`/proc/<pid>/status` VmRSS) every S [10] seconds
//!   (`--sample-every`);
//! - ends when the fake has accepted the Track event of every session that has an email
//!   (1% have none and are skipped by design) and both queues are empty, then sends
//!   SIGTERM and expects exit code 0.
//!
//! It prints the RSS series, the request counts, duplicates (events accepted more than once,
//! harmless: same messageId), the dead letters, the worker's own counts of hand-backs and
//! high delivery counts (from its `/metrics`), and a verdict; it exits non-zero if a
//! session is missing, one was dead-lettered, or the worker did not exit cleanly. The
//! worker's log is written to `$TMPDIR/sb-soak.<pid>.worker.log` at the end.
//!
//! It restarts the broker, so it holds the broker lock of the tests exclusively (waiting
//! for running tests to finish, and keeping new ones out), and starts the broker again
//! even when it fails (`StoppedBroker`). With `--no-restart` it neither restarts the
//! broker nor takes the lock exclusively, and may run beside the tests. Without `--run`
//! it only says how to run it (so that `cargo bench` and `cargo test --benches` do not
//! restart the broker by surprise).

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use segment_bridge::events;
use segment_bridge::session::Session;
use segment_bridge_testkit::bench::{Result, at_least_one, count, run, two_threads};
use segment_bridge_testkit::broker::{
    AMQP_URL, BrokerLock, Queues, StoppedBroker, find_worker_connection, queue_messages,
    rabbitmqctl_blocking,
};
use segment_bridge_testkit::launch::Bridge;
use segment_bridge_testkit::segment::sink::id_key;
use segment_bridge_testkit::segment::{Reply, Sink};
use segment_bridge_testkit::sessions;
use segment_bridge_testkit::stats::proc_stats;

/// `cargo bench --bench soak -- --run [options]`; without `--run`, it only says how to run.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    about = "Soak: the worker binary for a long stream, with the broker and Segment misbehaving."
)]
struct Options {
    /// Given by `cargo bench`; the soak runs only with `--run`.
    #[arg(long, hide = true)]
    bench: bool,
    /// Run the soak (it restarts the local broker unless `--no-restart`).
    #[arg(long)]
    run: bool,
    /// Sessions published.
    #[arg(long, default_value_t = 1_000_000, value_parser = at_least_one)]
    sessions: u64,
    /// Sessions published a second.
    #[arg(long, default_value_t = 5_000, value_parser = at_least_one)]
    rate: u64,
    /// Seconds between closing the worker's connection from the broker's side.
    #[arg(long, value_name = "S", default_value_t = 60, value_parser = at_least_one)]
    close_every: u64,
    /// Second at which the broker is restarted (stop_app, 5 s, start_app).
    #[arg(long, value_name = "S", default_value_t = 90, value_parser = count)]
    restart_at: u64,
    /// Do not restart the broker (nor wait for the exclusive broker lock).
    #[arg(long)]
    no_restart: bool,
    /// Second at which Segment goes down (every request 503).
    #[arg(long, value_name = "S", default_value_t = 150, value_parser = count)]
    outage_at: u64,
    /// Seconds Segment stays down.
    #[arg(long, value_name = "S", default_value_t = 20, value_parser = count)]
    outage_for: u64,
    /// Seconds between samples of the worker's RSS.
    #[arg(long, value_name = "S", default_value_t = 10, value_parser = at_least_one)]
    sample_every: u64,
}

fn main() {
    let options = <Options as clap::Parser>::parse();
    if !options.run {
        println!(
            "soak: skipped. It restarts the local broker; run it with `cargo bench --bench soak -- --run` (see benches/soak.rs, or `-- --help`)."
        );
        return;
    }
    let runtime = two_threads();
    if !run("soak", runtime, soak(options)) {
        std::process::exit(1);
    }
}

/// The worker's write keys, from which its messageIds derive.
const US_WRITE_KEY: &str = "soak-us";
const EU_WRITE_KEY: &str = "soak-eu";

/// How the fake Segment answers request `n`: 503 while `down`; else 5% 500, 0.5% 429
/// with `Retry-After: 1`, the rest 200.
fn answer(down: &AtomicBool, n: u64) -> Reply {
    if down.load(Ordering::Relaxed) {
        Reply::status(503)
    } else if n % 20 == 7 {
        Reply::status(500)
    } else if n % 200 == 13 {
        Reply {
            headers: vec![("retry-after", "1".to_owned())],
            ..Reply::status(429)
        }
    } else {
        Reply::ok()
    }
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
    let mut rng = sessions::Rng::new(0x50a6);
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
                    let g = sessions::session(&mut rng, "soak", next, None);
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

async fn soak(options: Options) -> Result<bool> {
    let secs = Duration::from_secs;
    let _lock = if options.no_restart {
        None
    } else {
        eprintln!("soak: waiting for the broker lock (running tests finish first) ...");
        Some(tokio::task::spawn_blocking(BrokerLock::exclusive).await?)
    };
    let queues = Queues::quorum("soak", 20).await;

    let down = Arc::new(AtomicBool::new(false));
    let sink = Sink::start(true, {
        let down = down.clone();
        move |n| answer(&down, n)
    })
    .await;

    let mut bridge = Bridge::new(env!("CARGO_BIN_EXE_segment-bridge"), &["run"]);
    bridge
        .config_file("")
        .queues(&queues)
        .set("AMQP__URL", AMQP_URL)
        .region("us", &sink.url(), US_WRITE_KEY)
        .region("eu", &sink.url(), EU_WRITE_KEY)
        .set("RETRY__MAX_BACKOFF_MS", "2000")
        .set("RETRY__MAX_HOLD_S", "5")
        .env("RUST_LOG", "warn,lapin=off");
    bridge.probes();
    let mut worker = bridge.spawn();
    let pid = worker.pid();

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
        "soak: {} sessions at {}/s into quorum queue {} (x-delivery-limit 20); worker pid {pid}",
        options.sessions, options.rate, queues.main,
    );
    let start = Instant::now();
    let mut rss = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut next_close = secs(options.close_every);
    let mut closes = 0;
    let mut restarted = false;
    let mut outage = 0u8;
    let mut publisher = Some(publisher);
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = start.elapsed();
        if let Some(status) = worker.child.try_wait()? {
            break format!("the worker exited early: {status}");
        }
        if t >= next_sample {
            next_sample = t + secs(options.sample_every);
            let kib = proc_stats(pid).map_or(0, |p| p.rss_kib);
            println!(
                "t={:>4}s  rss={:>6.1} MB  published={:>8}  delivered={:>8}",
                t.as_secs(),
                kib as f64 / 1024.0,
                published.load(Ordering::Relaxed),
                sink.delivered()
            );
            rss.push((t.as_secs(), kib));
        }
        if t >= next_close {
            next_close = t + secs(options.close_every);
            // None while the worker is between connections: nothing to close this time.
            let closed = match find_worker_connection(&queues.main).await {
                Some(id) => tokio::task::spawn_blocking(move || {
                    rabbitmqctl_blocking(&["close_connection", &id, "closed by the soak"])
                })
                .await?
                .is_ok(),
                None => false,
            };
            closes += usize::from(closed);
            println!(
                "t={:>4}s  closed {} worker connection(s) from the broker",
                t.as_secs(),
                usize::from(closed)
            );
        }
        if !options.no_restart && !restarted && t >= secs(options.restart_at) {
            restarted = true;
            println!(
                "t={:>4}s  restarting the broker (stop_app, 5 s, start_app)",
                t.as_secs()
            );
            let stopped = StoppedBroker::stop().await;
            tokio::time::sleep(secs(5)).await;
            stopped.start().await;
            println!("t={:>4}s  the broker is back", start.elapsed().as_secs());
        }
        if outage == 0 && t >= secs(options.outage_at) {
            outage = 1;
            down.store(true, Ordering::Relaxed);
            println!(
                "t={:>4}s  Segment down (503) for {} s",
                t.as_secs(),
                options.outage_for
            );
        }
        if outage == 1 && t >= secs(options.outage_at + options.outage_for) {
            outage = 2;
            down.store(false, Ordering::Relaxed);
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
        let all_in = publisher.is_none() && outage != 1 && sink.has_all(&expected.lock().unwrap());
        if all_in && queue_messages(&queues.main).await == Some(0) {
            break String::new();
        }
        if t > Duration::from_secs(3600) {
            break "not done within an hour".to_owned();
        }
    };
    let took = start.elapsed();
    let metrics = worker
        .get("/metrics")
        .await
        .map(|r| r.1)
        .unwrap_or_default();
    let series = |prefix: &str| -> Vec<String> {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    };
    // SIGTERM, then the exit code.
    worker.terminate();
    let (exit, _) = worker.wait_exit(Duration::from_secs(60)).await;
    let dead = queues.ready().await.1;
    let want = expected.lock().unwrap().len();
    let got = sink.delivered();
    let log_text = worker.stderr();
    let log = std::env::temp_dir().join(format!("sb-soak.{}.worker.log", std::process::id()));
    std::fs::write(&log, &log_text)?;
    let warnings = log_text.lines().filter(|l| l.contains("WARN")).count();
    let errors = log_text.lines().filter(|l| l.contains("ERROR")).count();
    let (ok, throttled, failed) = sink.answers();

    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| sessions published | {} |", options.sessions);
    println!("| sessions with an email (expected deliveries) | {want} |");
    println!("| sessions delivered (distinct Track messageIds) | {got} |");
    println!("| events accepted | {} |", sink.events());
    println!(
        "| Track events accepted again (same messageId) | {} |",
        sink.duplicates()
    );
    println!("| requests: 200 / 5xx / 429 | {ok} / {failed} / {throttled} |");
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

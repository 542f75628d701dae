//! The whole path timed: a signed webhook's send to Segment's 2xx, through the intake, the
//! queue and the worker, each a child process of the release binary.
//!
//! ```text
//! cargo bench --bench latency -- [--rates 100,1000] [--flush-ms 500,50] [--secs 10]
//!                                [--rounds 2] [--intake-threads current,1,2]
//! ```
//!
//! Each measurement declares a fresh durable queue `sb-bench.<pid>.latency.…` (and its
//! dead-letter queue), starts `segment-bridge intake` (a Jebbit source with a test secret)
//! and `segment-bridge run` (US and EU endpoints pointing at a Segment stand-in served by
//! this process), then sends signed Jebbit webhooks at a fixed rate for S seconds. Each
//! body carries its sequence number and the time it was due to be sent (`bench_seq`,
//! `bench_sent_us` in `data`, which the worker passes on as properties); the stand-in takes,
//! for every Track event, the time at which it answers 200. Latency counts from when the
//! webhook was due, not when it left, so a sender held up by a slow intake counts too.
//!
//! Per measurement it reports p50/p99/max of that latency, the intake's HTTP p99 (due to
//! response), and the CPU time (utime + stime from `/proc/<pid>/stat`) that the intake and
//! the worker spent from the first send to the last Track's 2xx, per webhook. The variants
//! of a rate (flush intervals × intake runtimes) alternate: A, B, then B, A in the next
//! round. The 1-minute load average is read before and after each measurement. Without
//! `--bench` on its command line (`cargo test --benches`) it only runs a self-check.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use clap::Parser;
use lapin::options::QueueDeleteOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use tokio::sync::{Notify, Semaphore};

use segment_bridge_testkit::bench::{Result, run, self_check_only, two_threads};
use segment_bridge_testkit::broker::{AMQP_URL, declare_durable};
use segment_bridge_testkit::jebbit;
use segment_bridge_testkit::launch::free_port;
use segment_bridge_testkit::stats::{loadavg, median, proc_stats};

const SECRET: &str = "bench-shared-secret-0123456789abcdef";
const SOURCE: &str = "bench";

/// The whole path timed: signed webhooks -> intake -> queue -> worker -> Segment stand-in.
#[derive(Debug, Clone, Parser)]
#[command(name = "latency")]
struct Args {
    /// Passed by `cargo bench`; without it only the self-check runs.
    #[arg(long)]
    bench: bool,
    /// Webhooks per second, one measurement each (at most 5,000).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    rates: Vec<u64>,
    /// `segment.flush_interval_ms` values to compare.
    #[arg(long, value_delimiter = ',', default_value = "500,50")]
    flush_ms: Vec<u64>,
    /// `SEGMENT_BRIDGE_INTAKE_THREADS` values to compare (`current`, or a number of
    /// threads); none: the intake's default runtime.
    #[arg(long, value_delimiter = ',')]
    intake_threads: Vec<String>,
    /// Seconds of sending per measurement (at most 120).
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Rounds; the order of the variants alternates between rounds.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Webhooks in flight at most (the sender's connections).
    #[arg(long, default_value_t = 32)]
    connections: usize,
}

/// One configuration measured.
#[derive(Debug, Clone, PartialEq)]
struct Variant {
    flush_ms: u64,
    intake_threads: Option<String>,
}

impl Variant {
    fn label(&self) -> String {
        format!(
            "flush {} ms, intake {}",
            self.flush_ms,
            self.intake_threads.as_deref().unwrap_or("default")
        )
    }
}

/// One measurement's results.
#[derive(Debug, Clone)]
struct Measured {
    rate: u64,
    variant: Variant,
    round: usize,
    sent: u64,
    accepted: u64,
    delivered: u64,
    /// Due to Segment's 2xx, ms: p50, p99, max.
    path_ms: (f64, f64, f64),
    /// Due to the intake's response, ms: p50, p99.
    http_ms: (f64, f64),
    intake_cpu_ms_per_req: Option<f64>,
    worker_cpu_us_per_session: Option<f64>,
    load_before: String,
    load_after: String,
}

fn main() {
    // `cargo test --benches` may pass arguments of its own: anything but `--bench`
    // means the self-check.
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if std::env::args().any(|a| a == "--bench") => e.exit(),
        Err(_) => Args::parse_from(["latency"]),
    };
    let how = "the measurement runs with `cargo bench --bench latency` (needs RabbitMQ)";
    if self_check_only(args.bench, "latency", how, self_check) {
        return;
    }
    run("latency bench", two_threads(), parent(args));
}

async fn parent(mut args: Args) -> Result<()> {
    args.secs = args.secs.clamp(1, 120);
    args.rates
        .iter_mut()
        .for_each(|r| *r = (*r).clamp(1, 5_000));
    args.connections = args.connections.max(1);
    let mut variants = Vec::new();
    let threads: Vec<Option<String>> = if args.intake_threads.is_empty() {
        vec![None]
    } else {
        args.intake_threads.iter().cloned().map(Some).collect()
    };
    for &flush_ms in &args.flush_ms {
        for t in &threads {
            variants.push(Variant {
                flush_ms: flush_ms.max(1),
                intake_threads: t.clone(),
            });
        }
    }
    let broker = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .map_err(|e| format!("this benchmark needs RabbitMQ at 127.0.0.1:5672: {e}"))?;
    let (sink, sink_addr) = start_sink().await?;
    eprintln!(
        "latency bench: {} rounds, rates {:?}/s, {} s each, {} in flight at most, variants: {}",
        args.rounds,
        args.rates,
        args.secs,
        args.connections,
        variants
            .iter()
            .map(Variant::label)
            .collect::<Vec<_>>()
            .join("; ")
    );
    let mut results = Vec::new();
    for round in 0..args.rounds.max(1) {
        for &rate in &args.rates {
            let mut order = variants.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for (i, variant) in order.into_iter().enumerate() {
                let queue = format!("sb-bench.{}.latency.{round}.{rate}.{i}", std::process::id());
                let channel = broker.create_channel().await?;
                for q in [queue.clone(), format!("{queue}.dead")] {
                    declare_durable(&channel, &q, FieldTable::default()).await?;
                }
                // Let the previous measurement's processes and queue deletion settle.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let load_before = loadavg();
                let measured = measure(&args, rate, &variant, &queue, &sink, sink_addr).await;
                let load_after = loadavg();
                for q in [queue.clone(), format!("{queue}.dead")] {
                    let _ = channel
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = channel.close(200, "OK".into()).await;
                let mut m = measured?;
                m.round = round;
                m.load_before = load_before;
                m.load_after = load_after;
                eprintln!(
                    "round {round} {rate:>5}/s {:<34} path p50 {:>7.1} p99 {:>7.1} max {:>7.1} ms  http p99 {:>6.1} ms  intake {} ms/req  worker {} µs/session  sent {} 200 {} delivered {}  load {} -> {}",
                    m.variant.label(),
                    m.path_ms.0,
                    m.path_ms.1,
                    m.path_ms.2,
                    m.http_ms.1,
                    fmt_opt(m.intake_cpu_ms_per_req, 3),
                    fmt_opt(m.worker_cpu_us_per_session, 0),
                    m.sent,
                    m.accepted,
                    m.delivered,
                    m.load_before,
                    m.load_after
                );
                results.push(m);
            }
        }
    }
    let _ = broker.close(200, "OK".into()).await;
    let _ = std::fs::remove_dir_all(scratch_dir());
    report(&results, &args, &variants);
    Ok(())
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("?".to_owned(), |v| format!("{v:.decimals$}"))
}

async fn measure(
    args: &Args,
    rate: u64,
    variant: &Variant,
    queue: &str,
    sink: &Arc<Sink>,
    sink_addr: SocketAddr,
) -> Result<Measured> {
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir)?;
    let empty = dir.join("empty.toml");
    std::fs::write(&empty, "")?;
    let intake_addr = free_port();
    let intake_probes = free_port();
    let worker_probes = free_port();
    let common = [
        ("AMQP__URL", AMQP_URL.to_owned()),
        ("AMQP__QUEUE", queue.to_owned()),
        ("AMQP__DEAD_LETTER_QUEUE", format!("{queue}.dead")),
        ("AMQP__DECLARE", "false".to_owned()),
    ];
    let mut intake_env: HashMap<String, String> = HashMap::new();
    for (k, v) in common.iter().cloned().chain([
        ("INTAKE__LISTEN", intake_addr.to_string()),
        ("SERVER__LISTEN", intake_probes.to_string()),
        ("INTAKE__SOURCES__BENCH__KIND", "jebbit".to_owned()),
        ("INTAKE__SOURCES__BENCH__REGION", "eu".to_owned()),
        ("INTAKE__SOURCES__BENCH__SECRET", SECRET.to_owned()),
    ]) {
        intake_env.insert(format!("SEGMENT_BRIDGE__{k}"), v);
    }
    if let Some(t) = &variant.intake_threads {
        intake_env.insert("SEGMENT_BRIDGE_INTAKE_THREADS".into(), t.clone());
    }
    let mut worker_env: HashMap<String, String> = HashMap::new();
    for (k, v) in common.iter().cloned().chain([
        ("SERVER__LISTEN", worker_probes.to_string()),
        ("SEGMENT__FLUSH_INTERVAL_MS", variant.flush_ms.to_string()),
        (
            "SEGMENT__US__ENDPOINT",
            format!("http://{sink_addr}/us/v1/batch"),
        ),
        ("SEGMENT__US__WRITE_KEY", "bench-us-write-key".to_owned()),
        (
            "SEGMENT__EU__ENDPOINT",
            format!("http://{sink_addr}/eu/v1/batch"),
        ),
        ("SEGMENT__EU__WRITE_KEY", "bench-eu-write-key".to_owned()),
    ]) {
        worker_env.insert(format!("SEGMENT_BRIDGE__{k}"), v);
    }
    let spawn = |command: &str, env: &HashMap<String, String>| -> Result<Process> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_segment-bridge"));
        child
            .args([command, "--config"])
            .arg(&empty)
            .current_dir(&dir)
            .envs(env)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        Ok(Process(child.spawn()?))
    };
    let worker = spawn("run", &worker_env)?;
    let intake = spawn("intake", &intake_env)?;
    wait_ready(worker_probes, "worker").await?;
    wait_ready(intake_probes, "intake").await?;
    sink.reset();

    let intake_cpu_before = cpu_seconds(intake.0.id());
    let worker_cpu_before = cpu_seconds(worker.0.id());
    let client = segment_bridge::segment::http_client(Duration::from_secs(30))?;
    let url = format!("http://{intake_addr}/webhooks/{SOURCE}");
    let in_flight = Arc::new(Semaphore::new(args.connections));
    let accepted = Arc::new(AtomicU64::new(0));
    let http_latencies = Arc::new(Mutex::new(Vec::new()));
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let total = rate * args.secs;
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for seq in 0..total {
        let due = started + period * seq as u32;
        tokio::time::sleep_until(due).await;
        let due_us = sink.since_base(due.into_std());
        let permit = in_flight.clone().acquire_owned().await?;
        let body = webhook_body(seq, due_us);
        let header = jebbit::signature(SECRET, body.as_bytes());
        let request = client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-jebbit-signature", header)
            .body(body);
        let accepted = accepted.clone();
        let http_latencies = http_latencies.clone();
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            let ok = matches!(request.send().await, Ok(r) if r.status() == 200);
            let took = sink.since_base(Instant::now()).saturating_sub(due_us);
            drop(permit);
            if ok {
                accepted.fetch_add(1, Ordering::Relaxed);
                http_latencies.lock().unwrap().push(took);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let accepted = accepted.load(Ordering::Relaxed);
    // Everything accepted is delivered within a few flush intervals; allow for a slow
    // machine, then count what arrived.
    let deadline =
        Instant::now() + Duration::from_millis(variant.flush_ms * 4) + Duration::from_secs(15);
    while sink.delivered() < accepted && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(100), sink.arrived.notified()).await;
    }
    let intake_cpu = cpu_seconds(intake.0.id())
        .zip(intake_cpu_before)
        .map(|(a, b)| a - b);
    let worker_cpu = cpu_seconds(worker.0.id())
        .zip(worker_cpu_before)
        .map(|(a, b)| a - b);
    drop(intake);
    drop(worker);

    let delivered = sink.delivered();
    if delivered < accepted {
        eprintln!(
            "latency bench: only {delivered} of {accepted} accepted webhooks reached the stand-in"
        );
    }
    let mut path = sink.latencies();
    path.sort_unstable();
    let mut http = std::mem::take(&mut *http_latencies.lock().unwrap());
    http.sort_unstable();
    let ms = |v: &[u64], p: f64| percentile(v, p) as f64 / 1000.0;
    Ok(Measured {
        rate,
        variant: variant.clone(),
        round: 0,
        sent: total,
        accepted,
        delivered,
        path_ms: (
            ms(&path, 0.50),
            ms(&path, 0.99),
            path.last().copied().unwrap_or(0) as f64 / 1000.0,
        ),
        http_ms: (ms(&http, 0.50), ms(&http, 0.99)),
        intake_cpu_ms_per_req: intake_cpu.map(|c| c * 1000.0 / accepted.max(1) as f64),
        worker_cpu_us_per_session: worker_cpu.map(|c| c * 1e6 / delivered.max(1) as f64),
        load_before: String::new(),
        load_after: String::new(),
    })
}

/// A Jebbit webhook of about 700 bytes, like the intake bench's, with the sequence number
/// and the due time (µs since the sink's base) among its answers.
fn webhook_body(seq: u64, due_us: u64) -> String {
    jebbit::webhook_body(
        &format!("Latency.{seq}@Example.com"),
        seq,
        serde_json::json!({"bench_seq": seq, "bench_sent_us": due_us}),
    )
}

// ---------------------------------------------------------------------------------------
// The Segment stand-in

/// Records, for every Track event, the time from its webhook's due time to the 2xx.
struct Sink {
    base: Instant,
    state: Mutex<SinkState>,
    arrived: Notify,
}

#[derive(Default)]
struct SinkState {
    /// bench_seq -> latency in µs (the first delivery; a redelivery is not counted twice).
    seen: HashMap<u64, u64>,
}

impl Sink {
    fn since_base(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_micros() as u64
    }

    fn reset(&self) {
        self.state.lock().unwrap().seen.clear();
    }

    fn delivered(&self) -> u64 {
        self.state.lock().unwrap().seen.len() as u64
    }

    fn latencies(&self) -> Vec<u64> {
        self.state.lock().unwrap().seen.values().copied().collect()
    }
}

async fn receive(State(sink): State<Arc<Sink>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let body = if headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"))
    {
        let mut out = Vec::new();
        if std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)
            .is_err()
        {
            return StatusCode::BAD_REQUEST;
        }
        Bytes::from(out)
    } else {
        body
    };
    let Ok(batch) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let tracks = tracked(&batch);
    // The 2xx leaves now: the worker sees it a few µs later.
    let now = sink.since_base(Instant::now());
    {
        let mut state = sink.state.lock().unwrap();
        for (seq, sent) in tracks {
            state.seen.entry(seq).or_insert(now.saturating_sub(sent));
        }
    }
    sink.arrived.notify_waiters();
    StatusCode::OK
}

/// (bench_seq, bench_sent_us) of every Track event of a Segment batch.
fn tracked(batch: &Value) -> Vec<(u64, u64)> {
    let Some(events) = batch["batch"].as_array() else {
        return Vec::new();
    };
    events
        .iter()
        .filter(|e| e["type"] == "track")
        .filter_map(|e| Some((find_u64(e, "bench_seq")?, find_u64(e, "bench_sent_us")?)))
        .collect()
}

/// The first number under `key`, anywhere in `v`.
fn find_u64(v: &Value, key: &str) -> Option<u64> {
    match v {
        Value::Object(map) => map
            .get(key)
            .and_then(Value::as_u64)
            .or_else(|| map.values().find_map(|x| find_u64(x, key))),
        Value::Array(items) => items.iter().find_map(|x| find_u64(x, key)),
        _ => None,
    }
}

async fn start_sink() -> Result<(Arc<Sink>, SocketAddr)> {
    let sink = Arc::new(Sink {
        base: *BASE.get_or_init(Instant::now),
        state: Mutex::new(SinkState::default()),
        arrived: Notify::new(),
    });
    let app = Router::new()
        .route("/us/v1/batch", post(receive))
        .route("/eu/v1/batch", post(receive))
        .with_state(sink.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((sink, addr))
}

static BASE: OnceLock<Instant> = OnceLock::new();

// ---------------------------------------------------------------------------------------
// Reporting

fn report(results: &[Measured], args: &Args, variants: &[Variant]) {
    println!();
    println!(
        "| rate /s | flush ms | intake runtime | send → Segment 2xx p50 / p99 / max ms (median of rounds) | intake HTTP p99 ms | intake CPU ms / webhook | worker CPU µs / session | rounds: p50/p99/max ms, intake ms/req, load before→after |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---|");
    for &rate in &args.rates {
        for v in variants {
            let of: Vec<&Measured> = results
                .iter()
                .filter(|m| m.rate == rate && &m.variant == v)
                .collect();
            if of.is_empty() {
                continue;
            }
            let med = |f: fn(&Measured) -> Option<f64>| {
                let values: Vec<f64> = of.iter().filter_map(|m| f(m)).collect();
                if values.is_empty() {
                    None
                } else {
                    Some(median(values))
                }
            };
            let rounds: Vec<String> = of
                .iter()
                .map(|m| {
                    format!(
                        "{:.0}/{:.0}/{:.0}, {} ({}→{})",
                        m.path_ms.0,
                        m.path_ms.1,
                        m.path_ms.2,
                        fmt_opt(m.intake_cpu_ms_per_req, 3),
                        m.load_before,
                        m.load_after
                    )
                })
                .collect();
            println!(
                "| {rate} | {} | {} | {} / {} / {} | {} | {} | {} | {} |",
                v.flush_ms,
                v.intake_threads.as_deref().unwrap_or("default"),
                fmt_opt(med(|m| Some(m.path_ms.0)), 0),
                fmt_opt(med(|m| Some(m.path_ms.1)), 0),
                fmt_opt(med(|m| Some(m.path_ms.2)), 0),
                fmt_opt(med(|m| Some(m.http_ms.1)), 1),
                fmt_opt(med(|m| m.intake_cpu_ms_per_req), 3),
                fmt_opt(med(|m| m.worker_cpu_us_per_session), 0),
                rounds.join("; ")
            );
        }
    }
    println!(
        "\n{} s of sending per measurement, {} in flight at most; CPU from the first send to the last 2xx; load = 1-minute load average.",
        args.secs, args.connections
    );
}

// ---------------------------------------------------------------------------------------
// Processes and the machine

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_ready(probes: SocketAddr, what: &str) -> Result<()> {
    let client = segment_bridge::segment::http_client(Duration::from_secs(5))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("http://{probes}/readyz")).send().await
            && r.status() == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the {what} did not become ready within 20 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the children run, with their empty config file; removed at the end.
fn scratch_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sb-bench-latency-{}", std::process::id()))
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    proc_stats(pid).map(|s| s.cpu_s)
}

/// Nearest-rank percentile of sorted values (0 if there are none).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// What runs without a broker: the pieces the measurement relies on.
fn self_check() {
    let body = webhook_body(7, 123_456);
    jebbit::check_webhook(SECRET, &body);
    let batch = serde_json::json!({"batch": [
        {"type": "identify", "traits": {"bench_seq": 1, "bench_sent_us": 5}},
        {"type": "track", "properties": {"bench_seq": 1, "bench_sent_us": 5}},
        {"type": "track", "properties": {"questions": {"bench_seq": 2, "bench_sent_us": 9}}},
        {"type": "track", "properties": {}}
    ]});
    assert_eq!(tracked(&batch), vec![(1, 5), (2, 9)]);
    let sorted: Vec<u64> = (1..=100).collect();
    assert_eq!(percentile(&sorted, 0.50), 50);
    assert_eq!(percentile(&sorted, 0.99), 99);
    assert_eq!(percentile(&[], 0.99), 0);
    assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    let args = Args::parse_from([
        "latency",
        "--bench",
        "--rates",
        "100,1000",
        "--intake-threads",
        "current,2",
    ]);
    assert_eq!(args.rates, vec![100, 1000]);
    assert_eq!(args.intake_threads, vec!["current", "2"]);
}

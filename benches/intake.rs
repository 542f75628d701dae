//! Load on the intake, broker confirms included, against a bare confirm-publish ceiling.
//!
//! ```text
//! cargo install oha                  # the load generator (crates.io), once
//! cargo bench --bench intake -- [--rounds R] [--secs S] [--rate Q] [--connections C]
//! ```
//!
//! Each round runs three measurements, in an order that alternates between rounds:
//! - **fixed rate**: `segment-bridge intake` (the release binary, as a child process) takes
//!   correctly signed Jebbit webhooks from `oha` at Q requests/s (default 1,000) over C
//!   connections (default 32) for S seconds (default 15), with oha's latency correction
//!   (latency counts from when a request was due, not when it was sent);
//! - **saturation**: the same, as fast as oha can send;
//! - **ceiling**: no HTTP at all: C tasks in this process publish the same body with the
//!   same properties to the same kind of queue and each waits for its confirm before the
//!   next, on one connection and one confirm channel and a current-thread runtime, as the
//!   intake does. Its rate is what the broker's publish-confirm path allows with C
//!   publishes outstanding;
//! - **ceiling at the fixed rate**: the same publishers taking turns at Q publishes/s. Its
//!   CPU per publish is what lapin and the kernel cost per message at that rate before any
//!   HTTP: the floor under the intake's CPU per request.
//!
//! CPU per request is the intake process's (utime + stime) over the measurement; for the
//! ceilings, this process's, which does nothing else meanwhile.
//!
//! Every measurement gets a fresh durable queue `sb-bench.<pid>.intake.…`, deleted
//! afterwards, and checks that the queue holds every message answered 200 (and at most
//! the few more that oha abandoned unanswered at its deadline). Requests/s counts the
//! requests answered 200. The body is signed once per measurement (valid for `signature_tolerance_s`). The
//! load average is read before and after each measurement: other work on the machine
//! shows there. `RUST_LOG` and `SEGMENT_BRIDGE__*` variables reach the intake. Without
//! `--bench` on its command line (`cargo test --benches`) the binary only runs a
//! self-check that needs neither oha nor a broker.

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;

use segment_bridge::amqp::{confirmed, publish_mandatory};
use segment_bridge_testkit::bench::{Result, at_least_one, run};
use segment_bridge_testkit::broker::{AMQP_URL, declare_durable};
use segment_bridge_testkit::jebbit::{self, unix_now};
use segment_bridge_testkit::launch::{Bridge, Running, free_port};
use segment_bridge_testkit::stats::{loadavg, median, percentile, proc_stats};

const SECRET: &str = "bench-shared-secret-0123456789abcdef";
const SOURCE: &str = "bench";

/// `cargo bench --bench intake -- [options]`: cargo adds `--bench`; without it (`cargo
/// test`), only the self-check runs.
#[derive(Debug, Clone, clap::Parser)]
#[command(about = "Load on the intake: oha against segment-bridge intake and RabbitMQ.")]
struct Options {
    /// Given by `cargo bench`: run the load benchmark, not only the self-check.
    #[arg(long)]
    bench: bool,
    /// Rounds of each measurement (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    rounds: u64,
    /// Seconds of load a round.
    #[arg(long, default_value_t = 15, value_parser = at_least_one)]
    secs: u64,
    /// Requests a second offered.
    #[arg(long, default_value_t = 1000, value_parser = at_least_one)]
    rate: u64,
    /// Client connections.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    connections: u64,
    /// One round of 5 s.
    #[arg(long)]
    quick: bool,
}

/// A realistic Jebbit webhook body: a dozen answers, about 700 bytes.
fn body() -> String {
    jebbit::webhook_body(
        "Bench.User@Example.com",
        0,
        serde_json::json!({"loyalty_member": true, "referral_source": "instagram"}),
    )
}

fn main() {
    let mut options = <Options as clap::Parser>::parse();
    if !options.bench {
        self_check();
        println!(
            "intake: self-check passed; the load benchmark runs with `cargo bench --bench intake` (needs oha and RabbitMQ)."
        );
        return;
    }
    if options.quick {
        options.rounds = 1;
        options.secs = 5;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    run("intake bench", runtime, parent(options));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fixed,
    Saturation,
    CeilingFixed,
    Ceiling,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Fixed => "fixed rate",
            Kind::Saturation => "saturation",
            Kind::CeilingFixed => "ceiling at the fixed rate",
            Kind::Ceiling => "ceiling (bare confirm-publish)",
        }
    }
}

/// One measurement.
#[derive(Debug, Clone)]
struct Run {
    kind: Kind,
    round: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    ok: u64,
    other: u64,
    /// CPU seconds of the intake per 1,000 requests (HTTP runs only).
    cpu_ms_per_1000: Option<f64>,
    /// The intake's own publish-to-confirm time, p50 and p99, as the upper bounds of
    /// the buckets of `segment_bridge_intake_publish_seconds` they fall in (HTTP runs).
    confirm_ms: Option<(f64, f64)>,
    load_before: String,
    load_after: String,
}

async fn parent(o: Options) -> Result<()> {
    let oha = Command::new("oha")
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run oha ({e}); install it with `cargo install oha`"))?;
    let oha_version = String::from_utf8_lossy(&oha.stdout).trim().to_owned();
    let broker = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .map_err(|e| format!("these benchmarks need RabbitMQ at 127.0.0.1:5672: {e}"))?;
    let body = body();
    eprintln!(
        "intake bench: {oha_version}, {} rounds of {} s, fixed rate {}/s, {} connections, body {} bytes",
        o.rounds,
        o.secs,
        o.rate,
        o.connections,
        body.len()
    );
    let mut runs = Vec::new();
    for round in 0..o.rounds {
        let mut order = [
            Kind::Fixed,
            Kind::CeilingFixed,
            Kind::Saturation,
            Kind::Ceiling,
        ];
        if round % 2 == 1 {
            order.reverse();
        }
        for kind in order {
            let queue = format!("sb-bench.{}.intake.{round}.{kind:?}", std::process::id());
            let channel = broker.create_channel().await?;
            declare_durable(&channel, &queue, FieldTable::default()).await?;
            // Let the previous measurement's queue deletion and disk writes settle.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let load_before = loadavg();
            let measured = match kind {
                Kind::Ceiling | Kind::CeilingFixed => ceiling(kind, &queue, &body, &o).await,
                _ => http(kind, &queue, &body, &o).await,
            };
            let load_after = loadavg();
            let depth = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?
                .message_count();
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = channel.close(200, "OK".into()).await;
            let mut run = measured?;
            run.round = round as usize;
            run.load_before = load_before;
            run.load_after = load_after;
            // Every 200 is on the queue. Requests that oha abandoned at its deadline may
            // be there too, unanswered: at most `other` more.
            let depth = u64::from(depth);
            if depth < run.ok || depth > run.ok + run.other {
                return Err(format!(
                    "{} round {round}: {} answered 200 ({} not) but the queue holds {depth}",
                    kind.name(),
                    run.ok,
                    run.other
                )
                .into());
            }
            eprintln!(
                "round {round} {:<31} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  cpu {:>5.3} ms/req  confirm {:?}  200: {} other: {}  load {} -> {}",
                kind.name(),
                run.rate,
                run.p50_ms,
                run.p99_ms,
                run.cpu_ms_per_1000.unwrap_or(f64::NAN) / 1000.0,
                run.confirm_ms,
                run.ok,
                run.other,
                run.load_before,
                run.load_after
            );
            runs.push(run);
        }
    }
    let _ = broker.close(200, "OK".into()).await;
    report(&runs, &o);
    Ok(())
}

/// `segment-bridge intake` under oha's load.
async fn http(kind: Kind, queue: &str, body: &str, o: &Options) -> Result<Run> {
    let addr = free_port();
    let mut bridge = Bridge::new(env!("CARGO_BIN_EXE_segment-bridge"), &["intake"]);
    // `SEGMENT_BRIDGE__*` of this environment reach the intake; the benchmark's own
    // settings win.
    for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("SEGMENT_BRIDGE__")) {
        bridge.env(&k, &v);
    }
    let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    bridge
        .config_file("")
        .env("RUST_LOG", &rust_log)
        .set("AMQP__URL", AMQP_URL)
        .set("AMQP__QUEUE", queue)
        .set("AMQP__DEAD_LETTER_QUEUE", &format!("{queue}.dead"))
        .set("AMQP__DECLARE", "false")
        .set("INTAKE__LISTEN", &addr.to_string())
        .set("INTAKE__SOURCES__BENCH__KIND", "jebbit")
        .set("INTAKE__SOURCES__BENCH__REGION", "eu")
        .set("INTAKE__SOURCES__BENCH__SECRET", SECRET);
    bridge.probes();
    let mut intake = bridge.spawn();
    intake.wait_ready(Duration::from_secs(20)).await;
    let cpu_before = proc_stats(intake.pid()).map(|p| p.cpu_s);
    let signature = jebbit::signature(SECRET, body.as_bytes());
    let mut oha = Command::new("oha");
    oha.args(["--no-tui", "--output-format", "json", "-m", "POST"])
        .args(["-z", &format!("{}s", o.secs)])
        .args(["-c", &o.connections.to_string()])
        .args(["-H", "content-type: application/json"])
        .args(["-H", &format!("x-jebbit-signature: {signature}")])
        .args(["-d", body]);
    if kind == Kind::Fixed {
        oha.args(["-q", &o.rate.to_string(), "--latency-correction"]);
    }
    oha.arg(format!("http://{addr}/webhooks/{SOURCE}"));
    let out = tokio::task::spawn_blocking(move || oha.output()).await??;
    let cpu = proc_stats(intake.pid())
        .map(|p| p.cpu_s)
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    let confirm_ms = scrape_confirms(&intake).await;
    // SIGTERM: the intake stops as it would in production.
    intake.terminate();
    intake.wait_exit(Duration::from_secs(10)).await;
    if !out.status.success() {
        return Err(format!("oha failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let (rate, p50_ms, p99_ms, ok, other) = oha_numbers(&report)?;
    Ok(Run {
        kind,
        round: 0,
        rate,
        p50_ms,
        p99_ms,
        ok,
        other,
        cpu_ms_per_1000: cpu.map(|c| c * 1000.0 * 1000.0 / (ok + other).max(1) as f64),
        confirm_ms,
        load_before: String::new(),
        load_after: String::new(),
    })
}

/// Requests answered 200 per second, p50 and p99 in ms, and the counts of 200 and of
/// anything else (errors included: oha's `requestsPerSec` counts those too), from oha's
/// JSON report.
fn oha_numbers(report: &Value) -> Result<(f64, f64, f64, u64, u64)> {
    let number = |v: &Value, what: &str| -> Result<f64> {
        v.as_f64()
            .ok_or_else(|| format!("oha's report has no {what}: {report}").into())
    };
    let total = number(&report["summary"]["total"], "total")?;
    let p50 = number(&report["latencyPercentiles"]["p50"], "p50")? * 1000.0;
    let p99 = number(&report["latencyPercentiles"]["p99"], "p99")? * 1000.0;
    let mut ok = 0;
    let mut other = 0;
    if let Some(codes) = report["statusCodeDistribution"].as_object() {
        for (code, n) in codes {
            let n = n.as_u64().unwrap_or(0);
            if code == "200" {
                ok += n;
            } else {
                other += n;
            }
        }
    }
    if let Some(errors) = report["errorDistribution"].as_object() {
        other += errors.values().filter_map(Value::as_u64).sum::<u64>();
    }
    Ok((ok as f64 / total.max(1e-9), p50, p99, ok, other))
}

/// p50 and p99 of the intake's publish histogram, as bucket upper bounds in ms.
async fn scrape_confirms(intake: &Running) -> Option<(f64, f64)> {
    let (_, text) = intake.get("/metrics").await?;
    histogram_quantiles(&text, "segment_bridge_intake_publish_seconds")
}

/// The upper bounds (ms) of the buckets holding the 50th and 99th percentile.
fn histogram_quantiles(text: &str, name: &str) -> Option<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let at = |q: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c >= q * total)
            .map(|(le, _)| le * 1000.0)
    };
    Some((at(0.50)?, at(0.99)?))
}

/// C publishers, each waiting for its confirm before the next publish, for S seconds: as
/// fast as they can (`Ceiling`), or taking turns at the fixed rate (`CeilingFixed`), each
/// publish due at its slot of the schedule, its latency counted from then. They run as
/// the intake does: one connection, one confirm channel, a current-thread runtime on a
/// thread of its own (lapin adds its I/O thread). CPU per publish is this process's
/// (utime + stime) over the measurement; nothing else in it is busy meanwhile.
async fn ceiling(kind: Kind, queue: &str, body: &str, o: &Options) -> Result<Run> {
    let (queue, body, o) = (queue.to_owned(), body.to_owned(), o.clone());
    let cpu_before = proc_stats(std::process::id()).map(|p| p.cpu_s);
    let measured = tokio::task::spawn_blocking(move || -> Result<(f64, Vec<f64>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(publish_loop(kind, &queue, &body, &o))
    })
    .await??;
    let cpu = proc_stats(std::process::id())
        .map(|p| p.cpu_s)
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    let (took, mut latencies) = measured;
    latencies.sort_by(f64::total_cmp);
    let ok = latencies.len() as u64;
    Ok(Run {
        kind,
        round: 0,
        rate: ok as f64 / took,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        ok,
        other: 0,
        cpu_ms_per_1000: cpu.map(|c| c * 1000.0 * 1000.0 / ok.max(1) as f64),
        confirm_ms: None,
        load_before: String::new(),
        load_after: String::new(),
    })
}

/// The publishers of [`ceiling`]: the seconds they took and every publish's latency (ms).
async fn publish_loop(kind: Kind, queue: &str, body: &str, o: &Options) -> Result<(f64, Vec<f64>)> {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // The properties the intake sets.
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("x-segment-bridge-source", SOURCE),
        ("x-segment-bridge-kind", "jebbit"),
        ("x-segment-bridge-region", "eu"),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_timestamp(unix_now() as u64)
        .with_headers(headers);
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(o.secs);
    // The fixed rate's schedule: the n-th publish is due at n / rate; a publisher takes
    // the next slot when it is free, as oha's connections take the next request.
    let slot = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let rate = o.rate as f64;
    let fixed = kind == Kind::CeilingFixed;
    let mut tasks = FuturesUnordered::new();
    for _ in 0..o.connections {
        let (channel, queue, properties, slot) = (
            channel.clone(),
            ShortString::from(queue),
            properties.clone(),
            slot.clone(),
        );
        let body = body.as_bytes();
        tasks.push(async move {
            let mut latencies = Vec::new();
            loop {
                let due = if fixed {
                    let n = slot.get();
                    slot.set(n + 1);
                    started + Duration::from_secs_f64(n as f64 / rate)
                } else {
                    tokio::time::Instant::now()
                };
                if due >= deadline {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let confirm = publish_mandatory(&channel, &queue, body, properties.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                confirmed(confirm).await.map_err(|e| e.to_string())?;
                latencies.push(due.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, String>(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.next().await {
        latencies.extend(done?);
    }
    // The last publishes' confirms may come after the deadline; the rate counts the
    // measurement's length, not that tail.
    let took = started.elapsed().as_secs_f64().min(o.secs as f64);
    let _ = conn.close(200, "OK".into()).await;
    Ok((took, latencies))
}

fn report(runs: &[Run], o: &Options) {
    println!();
    println!(
        "| measurement | req/s (median) | p50 ms (median) | p99 ms (median) | of which confirm p50/p99 ms (bucket ≤) | CPU ms / 1,000 req (the intake; for a ceiling, the publishers) | rounds: req/s, p50/p99 ms, load before→after |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for kind in [
        Kind::Fixed,
        Kind::CeilingFixed,
        Kind::Saturation,
        Kind::Ceiling,
    ] {
        let of: Vec<&Run> = runs.iter().filter(|r| r.kind == kind).collect();
        let med = |f: fn(&Run) -> f64| median(of.iter().map(|r| f(r)).collect());
        let cpu: Vec<f64> = of.iter().filter_map(|r| r.cpu_ms_per_1000).collect();
        let rounds: Vec<String> = of
            .iter()
            .map(|r| {
                format!(
                    "{:.0}, {:.2}/{:.2} ({}→{})",
                    r.rate, r.p50_ms, r.p99_ms, r.load_before, r.load_after
                )
            })
            .collect();
        let name = match kind {
            Kind::Fixed => format!("intake at {}/s", o.rate),
            Kind::Saturation => "intake at saturation".to_owned(),
            Kind::CeilingFixed => format!("ceiling: bare confirm-publish at {}/s", o.rate),
            Kind::Ceiling => "ceiling: bare confirm-publish loop".to_owned(),
        };
        let confirms: Vec<(f64, f64)> = of.iter().filter_map(|r| r.confirm_ms).collect();
        let confirm = if confirms.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{:.1} / {:.0}",
                median(confirms.iter().map(|c| c.0).collect()),
                median(confirms.iter().map(|c| c.1).collect())
            )
        };
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {confirm} | {} | {} |",
            med(|r| r.rate),
            med(|r| r.p50_ms),
            med(|r| r.p99_ms),
            if cpu.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.0}", median(cpu))
            },
            rounds.join("; ")
        );
    }
    println!(
        "\n{} connections / publishers, {} s per measurement, body {} bytes, one durable queue each; load = 1-minute load average.",
        o.connections,
        o.secs,
        body().len()
    );
}

/// What runs without oha or a broker: the pieces the measurements rely on.
fn self_check() {
    jebbit::check_webhook(SECRET, &body());
    let report = serde_json::json!({
        "summary": {"requestsPerSec": 1001.0, "total": 14.99},
        "latencyPercentiles": {"p50": 0.002, "p99": 0.0125},
        "statusCodeDistribution": {"200": 14990, "503": 3},
        "errorDistribution": {"connection closed": 2}
    });
    let (rate, p50, p99, ok, other) = oha_numbers(&report).unwrap();
    assert_eq!((rate, ok, other), (1000.0, 14990, 5));
    assert!((p50 - 2.0).abs() < 1e-9 && (p99 - 12.5).abs() < 1e-9);
    assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    let text = "x_bucket{le=\"0.001\"} 10\nx_bucket{le=\"0.005\"} 98\nx_bucket{le=\"0.01\"} 99\nx_bucket{le=\"+Inf\"} 100\n";
    assert_eq!(histogram_quantiles(text, "x"), Some((5.0, 10.0)));
    assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 3.0);
}

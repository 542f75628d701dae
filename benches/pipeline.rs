//! End-to-end benchmark of the worker against the local RabbitMQ and a local HTTP sink.
//!
//! ```text
//! cargo bench --bench pipeline -- [--sessions N] [--rounds R] [--latency-secs S]
//!                                 [--latency-rate R] [--quick] [--ceiling-group G]
//!                                 [--no-ceiling] [--no-latency] [--no-pure]
//! cargo bench --bench pipeline -- --help
//! ```
//!
//! Options (defaults in brackets; counts may group digits with `_`, as in `20_000`):
//! - `--sessions N`: sessions preloaded each round [200,000; with `--quick` 20,000];
//! - `--rounds R`: rounds [4, an even number so that each consumer goes first as often; with `--quick` 1];
//! - `--latency-secs S`, `--latency-rate R`: the latency run's length and offered load
//!   [10 s, with `--quick` 3 s; 5,000 sessions/s]; either at 0 skips it;
//! - `--ceiling-group G`: the ceiling acknowledges every G deliveries [prefetch / 4];
//! - `--no-ceiling`, `--no-latency`, `--no-pure`: skip that measurement.
//!
//! Each round, alternating the order:
//! - **ceiling**: preload N sessions into a fresh queue, then drain it with a minimal lapin
//!   consumer (same prefetch as the worker) that only acknowledges, with `multiple`, every
//!   G deliveries. Its rate is what the broker, the client library and this machine allow.
//! - **worker**: preload N sessions into another fresh queue, then run the worker
//!   (`segment_bridge::worker::Worker`, configured by `config.toml` plus the environment,
//!   endpoints pointing at the sink) until the sink has every Track event.
//!
//! Both consumers run as child processes (this binary, re-executed as `pipeline worker` or
//! `pipeline ceiling …`, hidden subcommands), each on a current-thread runtime, so their
//! CPU time (utime + stime of all threads) and peak RSS (VmHWM) are theirs alone. Each
//! child reads both from `/proc/self` as it is about to exit and prints them (its `life`
//! line): the whole life, start-up and shutdown included. The sink
//! (`segment_bridge_testkit::segment::Sink`) runs in this process: it counts
//! `"type":"track"` in each body and answers 200. It counts the bytes as they came (the
//! "MB" of a worker round), and decompresses gzip bodies
//! (`SEGMENT_BRIDGE__SEGMENT__COMPRESSION=gzip`) before counting.
//!
//! Then a latency run: the worker consumes an empty queue while this process publishes
//! `--latency-rate` sessions/s for `--latency-secs` s, each stamped with its publish time
//! (the attribute `bench_sent_us`); the sink takes the time of receipt of each.
//!
//! `SEGMENT_BRIDGE__*` variables in the environment reach the worker (and set the
//! ceiling's prefetch), e.g. `SEGMENT_BRIDGE__SEGMENT__MAX_BATCH_EVENTS=2000`.
//! `SB_BENCH_RUNTIME=multi` runs the worker on tokio's multi-thread runtime instead of the
//! binary's one thread (with `TOKIO_WORKER_THREADS` threads, else one per core).
//! `SB_BENCH_TRACE=1` prints the queue's ready count every ~100 ms.
//! `SB_BENCH_WRAP="<command> <args>"` starts each child under that command, e.g.
//! `valgrind --tool=callgrind` or `perf record … --` (with `--no-latency`).
//! `SB_BENCH_CEILING_RUNTIME=multi` runs the ceiling on the multi-thread runtime.
//! Before each run the benchmark waits (up to 20 s) for the broker to go quiet after the
//! preload; the broker still has slow phases (its CPU per message swings by half), so
//! compare the ratios pooled over an even number of rounds rather than single rates. Every queue
//! is named `sb-bench.<pid>.…` and deleted afterwards. Without `--bench` on its command
//! line (`cargo test --benches`) the binary only runs a self-check (no broker needed).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use segment_bridge::app::WorkerApp;
use segment_bridge::config::Config;
use segment_bridge::events::{self, Mapped};
use segment_bridge::session::Session;
use segment_bridge_testkit::bench::{Result, at_least_one, count, or_exit, run};
use segment_bridge_testkit::broker::AMQP_URL;
use segment_bridge_testkit::segment::Sink;
use segment_bridge_testkit::segment::sink::count_tracks;
use segment_bridge_testkit::sessions::{self, Generated};
use segment_bridge_testkit::stats::{ProcStats, broker_pid, loadavg, median, proc_stats, rank};

// ---------------------------------------------------------------------------------------
// Options

/// `cargo bench --bench pipeline -- [options]`: cargo adds `--bench`; without it (`cargo
/// test --benches`), only the self-check runs.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    about = "End to end: the worker against RabbitMQ and a local sink, beside an ack-only ceiling."
)]
struct Options {
    /// Given by `cargo bench`: run the benchmark, not only the self-check.
    #[arg(long)]
    bench: bool,
    /// Sessions preloaded each round [200,000; with --quick 20,000].
    #[arg(long, value_parser = at_least_one)]
    sessions: Option<u64>,
    /// Rounds [4: each consumer goes first as often; with --quick 1].
    #[arg(long, value_parser = at_least_one)]
    rounds: Option<u64>,
    /// Seconds of the latency run [10; with --quick 3]; 0 skips it.
    #[arg(long, value_parser = count)]
    latency_secs: Option<u64>,
    /// Sessions a second published in the latency run; 0 skips it.
    #[arg(long, default_value_t = 5_000, value_parser = count)]
    latency_rate: u64,
    /// The ceiling acknowledges every G deliveries [prefetch / 4].
    #[arg(long, value_name = "G", value_parser = clap::value_parser!(u16).range(1..))]
    ceiling_group: Option<u16>,
    /// 20,000 sessions, 1 round, a 3 s latency run (explicit options win).
    #[arg(long)]
    quick: bool,
    /// Skip the ceiling.
    #[arg(long)]
    no_ceiling: bool,
    /// Skip the latency run.
    #[arg(long)]
    no_latency: bool,
    /// Skip the in-process pure path.
    #[arg(long)]
    no_pure: bool,
    /// A consumer the benchmark starts as a child process.
    #[command(subcommand)]
    child: Option<ChildKind>,
}

impl Options {
    fn sessions(&self) -> u64 {
        self.sessions
            .unwrap_or(if self.quick { 20_000 } else { 200_000 })
    }

    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 1 } else { 4 }) as usize
    }

    fn latency_secs(&self) -> u64 {
        self.latency_secs.unwrap_or(if self.quick { 3 } else { 10 })
    }

    fn latency(&self) -> bool {
        !self.no_latency && self.latency_secs() > 0 && self.latency_rate > 0
    }
}

/// What the benchmark runs as child processes, to measure them alone.
#[derive(Debug, Clone, clap::Subcommand)]
enum ChildKind {
    /// The worker, as `segment-bridge run` runs it.
    #[command(hide = true)]
    Worker,
    /// The ack-only consumer.
    #[command(hide = true)]
    Ceiling {
        queue: String,
        prefetch: u16,
        n: u64,
        group: u64,
    },
}

fn main() {
    let options = <Options as clap::Parser>::parse();
    let child = match &options.child {
        Some(ChildKind::Worker) => Some(child_worker()),
        Some(ChildKind::Ceiling {
            queue,
            prefetch,
            n,
            group,
        }) => Some(child_ceiling(queue, *prefetch, *n, *group)),
        None => None,
    };
    if let Some(done) = child {
        return or_exit("pipeline child", done);
    }
    if !options.bench {
        self_check();
        println!(
            "pipeline: self-check passed; the end-to-end benchmark runs with `cargo bench --bench pipeline`."
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    run("pipeline", runtime, parent(options));
}

// ---------------------------------------------------------------------------------------
// Children

/// The worker as the binary runs it (`segment-bridge run`): the same runtime
/// (`segment_bridge::runtime`) and logging
/// (at `warn` unless `RUST_LOG` says otherwise; `info` only adds start and stop lines),
/// the configuration from `config.toml` and `SEGMENT_BRIDGE__*`. Stops when standard input
/// closes, like SIGTERM: stop consuming, send and acknowledge what is held, exit.
fn child_worker() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("SEGMENT_BRIDGE__"))
        .collect();
    let config = Config::load(None, Some(env))?;
    // `SB_BENCH_RUNTIME=multi` measures tokio's multi-thread runtime instead (worker
    // threads: TOKIO_WORKER_THREADS, else one per core).
    let runtime = if std::env::var("SB_BENCH_RUNTIME").as_deref() == Ok("multi") {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        segment_bridge::app::worker_runtime()?
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        stop.cancel();
    });
    // Built and run as `segment-bridge run` does.
    runtime.block_on(async { WorkerApp::build(config, false).await?.run(shutdown).await })?;
    runtime.shutdown_timeout(Duration::from_millis(100));
    report_life()
}

/// A child's last line: its CPU (user + system, every thread, since it started) and peak
/// RSS over its whole life, start-up and shutdown included, read as it is about to exit.
fn report_life() -> Result<()> {
    let stats = proc_stats(std::process::id()).ok_or("cannot read /proc/self")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "life {} {}", stats.cpu_s, stats.hwm_kib)?;
    out.flush()?;
    Ok(())
}

/// Parses a child's `life` line.
fn parse_life(line: &str) -> Option<ProcStats> {
    let mut parts = line.strip_prefix("life ")?.split(' ');
    let cpu_s = parts.next()?.parse().ok()?;
    let hwm_kib = parts.next()?.parse().ok()?;
    Some(ProcStats {
        cpu_s,
        rss_kib: 0,
        hwm_kib,
    })
}

/// The ceiling: consume with `prefetch`, acknowledge every `group` deliveries with
/// `multiple`, and nothing else. Prints `done` once `n` are acknowledged, then waits for
/// standard input to close. It runs on a current-thread runtime, the leanest a lapin
/// consumer gets (lapin reads the socket on a thread of its own either way): on
/// tokio's multi-thread runtime, the same consumer took 15–30% more CPU per session.
fn child_ceiling(queue: &str, prefetch: u16, n: u64, group: u64) -> Result<()> {
    let runtime = if std::env::var("SB_BENCH_CEILING_RUNTIME").as_deref() == Ok("multi") {
        // Tokio's default, but deaf to TOKIO_WORKER_THREADS (a knob of the worker under test).
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    let done: Result<()> = runtime.block_on(async {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut seen = 0u64;
        let mut bytes = 0usize;
        let mut unacked = 0u64;
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            seen += 1;
            unacked += 1;
            bytes += delivery.data.len();
            if unacked >= group || seen == n {
                channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                    .await?;
                unacked = 0;
            }
            if seen == n {
                break;
            }
        }
        std::hint::black_box(bytes);
        let mut out = std::io::stdout().lock();
        writeln!(out, "done {seen}")?;
        out.flush()?;
        drop(out);
        tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await??;
        let _ = conn.close(200, "OK".into()).await;
        Ok(())
    });
    done?;
    runtime.shutdown_timeout(Duration::from_millis(100));
    report_life()
}

// ---------------------------------------------------------------------------------------
// The broker

struct Broker {
    _conn: Connection,
    /// In confirm mode: preloading.
    channel: Channel,
    /// Without confirms: the latency run's steady publishing.
    plain: Channel,
    /// Queues to delete at the end, whatever happens.
    created: Vec<String>,
}

impl Broker {
    async fn connect() -> Result<Broker> {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .map_err(|e| {
                format!("this benchmark needs RabbitMQ at 127.0.0.1:5672 (guest/guest): {e}")
            })?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let plain = conn.create_channel().await?;
        Ok(Broker {
            _conn: conn,
            channel,
            plain,
            created: Vec::new(),
        })
    }

    async fn declare(&mut self, name: &str) -> Result<()> {
        self.created.push(name.to_owned());
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// (ready messages, consumers)
    async fn counts(&self, name: &str) -> Result<(u32, u32)> {
        let q = self
            .channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await?;
        Ok((q.message_count(), q.consumer_count()))
    }

    async fn delete(&mut self, name: &str) {
        let _ = self
            .channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
        self.created.retain(|n| n != name);
    }

    async fn delete_all(&mut self) {
        for name in std::mem::take(&mut self.created) {
            let _ = self
                .channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }

    /// Publishes persistent messages with confirms, up to 2,000 unconfirmed.
    async fn preload(&self, queue: &str, bodies: &[Generated]) -> Result<()> {
        let mut confirms = FuturesUnordered::new();
        for g in bodies {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    g.body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            confirms.push(confirm);
            if confirms.len() >= 2_000 {
                let c = confirms.next().await.expect("not empty")?;
                if !c.is_ack() {
                    return Err("the broker refused a preloaded message".into());
                }
            }
        }
        while let Some(c) = confirms.next().await {
            if !c?.is_ack() {
                return Err("the broker refused a preloaded message".into());
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Processes

struct Proc {
    child: Child,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
}

impl Proc {
    /// Starts this binary as the child `args`; under `SB_BENCH_WRAP` (split on white
    /// space, e.g. `valgrind --tool=callgrind`) when set.
    fn spawn(args: &[&str], env: &HashMap<String, String>) -> Result<Proc> {
        let wrap = std::env::var("SB_BENCH_WRAP").unwrap_or_default();
        let mut wrap = wrap.split_whitespace();
        let mut command = match wrap.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(wrap).arg(std::env::current_exe()?);
                c
            }
            None => Command::new(std::env::current_exe()?),
        };
        let mut child = command
            .args(args)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Proc { child, lines })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Closes its standard input (its signal to finish), waits for it to exit and returns
    /// what it reported of its whole life.
    async fn finish(mut self, within: Duration) -> Result<ProcStats> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    return Err(format!("child exited with {status}").into());
                }
                // The reader thread sees the end of its output soon after the exit.
                let until = Instant::now() + Duration::from_secs(5);
                while Instant::now() < until {
                    match self.lines.recv_timeout(Duration::from_millis(100)) {
                        Ok((_, line)) => {
                            if let Some(life) = parse_life(&line) {
                                return Ok(life);
                            }
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                return Err("the child exited without reporting its CPU".into());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err("child did not exit in time; killed".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Runs

#[derive(Debug, Clone)]
struct Run {
    secs: f64,
    /// Until 99% of the events were in (the worker) or of the deliveries acknowledged.
    secs99: f64,
    /// From the spawn until the queue had the child as its consumer.
    startup_s: f64,
    rate: f64,
    /// Over the child's whole life, start-up and shutdown included: what is compared.
    life: ProcStats,
    /// The one-minute load average as the run began.
    load: String,
    broker_cpu_s: f64,
    /// This process's CPU meanwhile: the sink (and the idle parent).
    sink_cpu_s: f64,
}

struct Bench {
    options: Options,
    broker: Broker,
    sink: Sink,
    env: HashMap<String, String>,
    prefetch: u16,
    broker_pid: Option<u32>,
    tag: String,
    trace_at: Mutex<Option<Instant>>,
}

impl Bench {
    fn worker_env(&self, queue: &str) -> HashMap<String, String> {
        let mut env = self.env.clone();
        let url = |region: &str| self.sink.url_for(region);
        for (k, v) in [
            ("AMQP__URL", AMQP_URL.to_owned()),
            ("AMQP__QUEUE", queue.to_owned()),
            ("AMQP__DEAD_LETTER_QUEUE", format!("{queue}.dead")),
            ("AMQP__DECLARE", "true".to_owned()),
            ("SEGMENT__US__ENDPOINT", url("us")),
            ("SEGMENT__EU__ENDPOINT", url("eu")),
            ("SEGMENT__US__WRITE_KEY", "bench-us-key".to_owned()),
            ("SEGMENT__EU__WRITE_KEY", "bench-eu-key".to_owned()),
            // The side port the worker serves, on a port of its own.
            ("SERVER__LISTEN", "127.0.0.1:0".to_owned()),
        ] {
            env.insert(format!("SEGMENT_BRIDGE__{k}"), v);
        }
        env
    }

    fn broker_cpu(&self) -> f64 {
        self.broker_pid
            .and_then(proc_stats)
            .map_or(0.0, |s| s.cpu_s)
    }

    fn own_cpu(&self) -> f64 {
        proc_stats(std::process::id()).map_or(0.0, |s| s.cpu_s)
    }

    async fn fresh_queue(&mut self, name: &str, sessions: &[Generated]) -> Result<()> {
        self.broker.declare(name).await?;
        self.broker.preload(name, sessions).await?;
        self.quiet_broker().await;
        Ok(())
    }

    /// Waits (at most 20 s) until the broker has used under 10% of a core for a second:
    /// done writing what was preloaded, done cleaning up after deleted queues. Runs that
    /// start while it is busy are much slower and make the numbers noisy.
    async fn quiet_broker(&self) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(pid) = self.broker_pid else {
            tokio::time::sleep(Duration::from_secs(2)).await;
            return;
        };
        let start = Instant::now();
        let mut last = (Instant::now(), self.broker_cpu());
        let mut calm = 0;
        while calm < 4 && start.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = (Instant::now(), self.broker_cpu());
            let busy = (now.1 - last.1) / now.0.duration_since(last.0).as_secs_f64();
            calm = if busy < 0.10 { calm + 1 } else { 0 };
            last = now;
        }
        if calm < 4 {
            eprintln!(
                "note: the broker (pid {pid}) did not quiet down within 20 s; measuring anyway"
            );
        }
    }

    async fn ceiling(&mut self, round: usize, sessions: &[Generated]) -> Result<Run> {
        let queue = format!("sb-bench.{}.r{round}.ceiling", self.tag);
        self.fresh_queue(&queue, sessions).await?;
        let n = sessions.len() as u64;
        let group = self
            .options
            .ceiling_group
            .unwrap_or((self.prefetch / 4).max(1));
        let (broker0, own0) = (self.broker_cpu(), self.own_cpu());
        let load = loadavg();
        let started = Instant::now();
        let mut proc = Proc::spawn(
            &[
                "ceiling",
                &queue,
                &self.prefetch.to_string(),
                &n.to_string(),
                &group.to_string(),
            ],
            &HashMap::new(),
        )?;
        let deadline = started + Duration::from_secs(600);
        let mut consuming = None;
        let done = loop {
            if let Ok((at, line)) = proc.lines.try_recv()
                && line.starts_with("done")
            {
                break at;
            }
            if proc.exited() || Instant::now() > deadline {
                return Err("the ceiling consumer ended without draining the queue".into());
            }
            self.check_consuming(&queue, &mut consuming).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let mut run = self.run(started, consuming, done, n, broker0, own0);
        run.life = proc.finish(Duration::from_secs(30)).await?;
        run.load = load;
        self.broker.delete(&queue).await;
        Ok(run)
    }

    async fn worker(&mut self, round: usize, sessions: &[Generated]) -> Result<Run> {
        let queue = format!("sb-bench.{}.r{round}.worker", self.tag);
        let dead = format!("{queue}.dead");
        self.broker.declare(&dead).await?;
        self.fresh_queue(&queue, sessions).await?;
        let n = sessions.len() as u64;
        let expected = sessions.iter().filter(|g| g.has_email).count() as u64;
        self.sink.reset(expected);
        let env = self.worker_env(&queue);
        let (broker0, own0) = (self.broker_cpu(), self.own_cpu());
        let load = loadavg();
        let started = Instant::now();
        let mut proc = Proc::spawn(&["worker"], &env)?;
        let mut consuming = None;
        let done = loop {
            let poll = if consuming.is_none() || std::env::var_os("SB_BENCH_TRACE").is_some() {
                5
            } else {
                200
            };
            if let Some(at) = self.sink.wait_done(Duration::from_millis(poll)).await {
                break at;
            }
            self.check_consuming(&queue, &mut consuming).await;
            if proc.exited() {
                return Err("the worker exited before the sink had every event".into());
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err(format!(
                    "the sink has {} of {expected} Track events after 10 minutes",
                    self.sink.tracks()
                )
                .into());
            }
        };
        let mut run = self.run(started, consuming, done, n, broker0, own0);
        run.life = proc.finish(Duration::from_secs(30)).await?;
        run.load = load;
        let (ready, _) = self.broker.counts(&queue).await?;
        let (dead_ready, _) = self.broker.counts(&dead).await?;
        let tracks = self.sink.tracks();
        if ready != 0 || dead_ready != 0 || tracks != expected {
            eprintln!(
                "warning: after the worker: {ready} left in the queue, {dead_ready} dead-lettered, {tracks} Track events for {expected} sessions with an email"
            );
        }
        self.broker.delete(&queue).await;
        self.broker.delete(&dead).await;
        Ok(run)
    }

    /// Notes when the queue first has a consumer: the end of the child's start-up.
    async fn check_consuming(&self, queue: &str, consuming: &mut Option<Instant>) {
        if consuming.is_none() && matches!(self.broker.counts(queue).await, Ok((_, c)) if c > 0) {
            *consuming = Some(Instant::now());
        }
        if std::env::var_os("SB_BENCH_TRACE").is_some() {
            let due = {
                let mut last = self.trace_at.lock().unwrap();
                let due = last.is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
                if due {
                    *last = Some(Instant::now());
                }
                due
            };
            if due && let Ok((ready, _)) = self.broker.counts(queue).await {
                eprint!("{ready} ");
            }
        }
    }

    fn run(
        &self,
        started: Instant,
        consuming: Option<Instant>,
        done: Instant,
        n: u64,
        broker0: f64,
        own0: f64,
    ) -> Run {
        let secs = done.duration_since(started).as_secs_f64();
        let most = self.sink.most_at();
        Run {
            secs,
            secs99: most.map_or(f64::NAN, |m| m.duration_since(started).as_secs_f64()),
            startup_s: consuming.map_or(f64::NAN, |c| c.duration_since(started).as_secs_f64()),
            rate: n as f64 / secs,
            life: ProcStats::default(),
            load: String::new(),
            broker_cpu_s: self.broker_cpu() - broker0,
            sink_cpu_s: self.own_cpu() - own0,
        }
    }

    /// Publishes at a steady rate into an empty queue the worker consumes; returns the
    /// publish → receipt latencies in µs and the worker's CPU seconds per session.
    async fn latency(&mut self) -> Result<(Vec<u64>, f64, u64, ProcStats)> {
        let queue = format!("sb-bench.{}.latency", self.tag);
        let dead = format!("{queue}.dead");
        self.broker.declare(&dead).await?;
        self.broker.declare(&queue).await?;
        let env = self.worker_env(&queue);
        self.sink.reset(u64::MAX);
        let base = Instant::now();
        self.sink.record_latency(Some(base));
        let mut proc = Proc::spawn(&["worker"], &env)?;
        // Wait until it consumes.
        let until = Instant::now() + Duration::from_secs(30);
        while self.broker.counts(&queue).await?.1 == 0 {
            if proc.exited() || Instant::now() > until {
                return Err("the worker did not start consuming".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cpu0 = proc_stats(proc.pid()).unwrap_or_default().cpu_s;
        let rate = self.options.latency_rate;
        let total = rate * self.options.latency_secs();
        let tick = Duration::from_millis(10);
        let per_tick = rate as f64 / 100.0;
        let mut rng = sessions::Rng::new(99);
        let mut interval = tokio::time::interval(tick);
        let mut published = 0u64;
        let mut with_email = 0u64;
        let start = Instant::now();
        while published < total {
            interval.tick().await;
            // Keep the offered load exact even if a tick comes late.
            let due =
                ((start.elapsed().as_secs_f64() / tick.as_secs_f64()).floor() + 1.0) * per_tick;
            let due = (due as u64).min(total);
            while published < due {
                let sent = base.elapsed().as_micros() as u64;
                let g = sessions::session(&mut rng, &self.tag, published, Some(sent));
                with_email += u64::from(g.has_email);
                // No confirms here: the publisher must not pace itself by the broker.
                self.broker
                    .plain
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        g.body.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?
                    // Without confirm mode this resolves at once.
                    .await?;
                published += 1;
            }
        }
        let offered = published as f64 / start.elapsed().as_secs_f64();
        // Wait for the tail (at most a flush interval and a request, normally).
        let until = Instant::now() + Duration::from_secs(30);
        while self.sink.tracks() < with_email && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stats = proc_stats(proc.pid()).unwrap_or_default();
        self.sink.record_latency(None);
        proc.finish(Duration::from_secs(30)).await?;
        let got = self.sink.tracks();
        if got < with_email {
            eprintln!("warning: latency run: {got} of {with_email} Track events arrived");
        }
        let samples = self.sink.take_latencies();
        self.broker.delete(&queue).await;
        self.broker.delete(&dead).await;
        eprintln!("latency run: offered {offered:.0} sessions/s, {published} sessions");
        let cpu = stats.cpu_s - cpu0;
        Ok((samples, cpu, published, stats))
    }
}

/// The pure path in this process, on one thread: parse + map (which serialises).
fn pure_rate() -> f64 {
    let bodies = sessions::bodies(7, "pure", 20_000);
    let options = events::Options::default();
    let now = time::OffsetDateTime::now_utc();
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        sessions::map_each(&bodies, now, &options);
        n += bodies.len() as u64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The `p`th percentile of sorted µs samples, in ms.
fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    rank(sorted, p).map_or(f64::NAN, |us| *us as f64 / 1000.0)
}

async fn parent(options: Options) -> Result<()> {
    // The configuration the worker will get: config.toml (if in the working directory),
    // then SEGMENT_BRIDGE__* from this environment.
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("SEGMENT_BRIDGE__"))
        .collect();
    let config = Config::load(None, Some(env.clone()))?;
    let prefetch = config.amqp.prefetch;
    let file = if std::path::Path::new("config.toml").exists() {
        "config.toml + environment"
    } else {
        "defaults + environment"
    };
    println!(
        "pipeline: {} sessions x {} rounds, prefetch {prefetch}, max_batch_events {}, max_in_flight {}, flush_interval {} ms ({file}); {} cores",
        options.sessions(),
        options.rounds(),
        config.segment.max_batch_events,
        config.segment.max_in_flight,
        config.segment.flush_interval_ms,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    for (k, v) in &env {
        println!("  {k}={v}");
    }

    if std::env::var_os("SB_BENCH_WRAP").is_some() && options.latency() {
        return Err(
            "SB_BENCH_WRAP measures the rounds only (the latency run reads the CPU of the wrapper's process): add --no-latency"
                .into(),
        );
    }
    let pure = if !options.no_pure {
        let r = pure_rate();
        println!("pure path (parse + map + serialise, 1 thread, in-process): {r:.0} sessions/s");
        Some(r)
    } else {
        None
    };

    let sink = Sink::ok().await;
    let broker = Broker::connect().await?;
    let mut bench = Bench {
        tag: format!("{}", std::process::id()),
        options: options.clone(),
        broker,
        sink,
        env,
        prefetch,
        broker_pid: broker_pid(),
        trace_at: Mutex::new(None),
    };
    let result = run_all(&mut bench, pure).await;
    bench.broker.delete_all().await;
    result
}

async fn run_all(bench: &mut Bench, pure: Option<f64>) -> Result<()> {
    let o = bench.options.clone();
    let mut ceilings = Vec::new();
    let mut workers = Vec::new();
    for round in 1..=o.rounds() {
        let sessions = sessions::sessions(
            round as u64,
            &format!("{}-r{round}", bench.tag),
            o.sessions(),
        );
        // Alternate which goes first, so that neither always meets a warmer broker.
        let ceiling_first = round % 2 == 1;
        for step in 0..2 {
            let is_ceiling = (step == 0) == ceiling_first;
            if is_ceiling && !o.no_ceiling {
                let r = bench.ceiling(round, &sessions).await?;
                println!(
                    "round {round} ceiling: {:>8.0} sessions/s  {:6.2} s (start-up {:4.0} ms)  cpu {:5.2} s ({:4.1} µs/session)  rss {:5.1} MB  broker cpu {:5.2} s  load {}",
                    r.rate,
                    r.secs,
                    r.startup_s * 1e3,
                    r.life.cpu_s,
                    r.life.cpu_s * 1e6 / o.sessions() as f64,
                    r.life.hwm_kib as f64 / 1024.0,
                    r.broker_cpu_s,
                    r.load,
                );
                ceilings.push(r);
            } else if !is_ceiling {
                let r = bench.worker(round, &sessions).await?;
                println!(
                    "round {round} worker:  {:>8.0} sessions/s  {:6.2} s (start-up {:4.0} ms, 99% at {:.2} s)  cpu {:5.2} s ({:4.1} µs/session)  rss {:5.1} MB  broker cpu {:5.2} s  sink cpu {:5.2} s  ({} requests, {:.0} MB)  load {}",
                    r.rate,
                    r.secs,
                    r.startup_s * 1e3,
                    r.secs99,
                    r.life.cpu_s,
                    r.life.cpu_s * 1e6 / o.sessions() as f64,
                    r.life.hwm_kib as f64 / 1024.0,
                    r.broker_cpu_s,
                    r.sink_cpu_s,
                    bench.sink.requests(),
                    bench.sink.bytes() as f64 / 1e6,
                    r.load,
                );
                workers.push(r);
            }
        }
    }

    let latency = if o.latency() {
        let (mut samples, cpu, published, _) = bench.latency().await?;
        samples.sort_unstable();
        Some((
            percentile_ms(&samples, 50.0),
            percentile_ms(&samples, 99.0),
            percentile_ms(&samples, 100.0),
            cpu * 1e6 / published as f64,
        ))
    } else {
        None
    };

    let med = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let worker_rate = med(&workers, |r| r.rate);
    let ratios: Vec<f64> = workers
        .iter()
        .zip(&ceilings)
        .map(|(w, c)| w.rate / c.rate)
        .collect();
    let n = o.sessions() as f64;
    println!();
    println!(
        "### segment-bridge pipeline: {} sessions, {} round(s), medians",
        o.sessions(),
        o.rounds()
    );
    println!();
    println!("| metric | value | target |");
    println!("|---|---:|---|");
    if !ceilings.is_empty() {
        println!(
            "| ceiling (ack-only lapin consumer) | {:.0} sessions/s | |",
            med(&ceilings, |r| r.rate)
        );
    }
    println!(
        "| worker, end to end (until the sink has every event) | {worker_rate:.0} sessions/s | |"
    );
    println!(
        "| worker until 99% of the events (without the last partial batches) | {:.0} sessions/s | |",
        med(&workers, |r| 0.99 * r.rate * r.secs / r.secs99)
    );
    if !ratios.is_empty() {
        println!(
            "| worker / ceiling, throughput (median of per-round ratios) | {:.2} | ≥ 0.95 |",
            median(ratios)
        );
        let ratios99: Vec<f64> = workers
            .iter()
            .zip(&ceilings)
            .map(|(w, c)| 0.99 * w.rate * w.secs / w.secs99 / c.rate)
            .collect();
        println!(
            "| the same, worker until 99% of the events | {:.2} | |",
            median(ratios99)
        );
        // Pooled over the rounds: the broker favours whichever consumer goes first in a
        // round, and the order alternates, so over an even number of rounds the pooled
        // ratios cancel that out where a median of per-round ratios does not.
        let total = |runs: &[Run], f: fn(&Run) -> f64| runs.iter().map(f).sum::<f64>();
        println!(
            "| worker / ceiling, throughput pooled over the rounds (their total time against the worker's) | {:.2} | ≥ 0.95 |",
            total(&ceilings, |r| r.secs) / total(&workers, |r| r.secs)
        );
        println!(
            "| worker / ceiling, CPU pooled over the rounds | {:.2} | ≤ 1.30 |",
            total(&workers, |r| r.life.cpu_s) / total(&ceilings, |r| r.life.cpu_s)
        );
        let cpu_ratios: Vec<f64> = workers
            .iter()
            .zip(&ceilings)
            .map(|(w, c)| w.life.cpu_s / c.life.cpu_s)
            .collect();
        println!(
            "| worker / ceiling, CPU per session over each process's life (median of per-round ratios) | {:.2} | ≤ 1.30 |",
            median(cpu_ratios)
        );
    }
    println!(
        "| worker CPU over its life (start-up and shutdown included) | {:.2} s | |",
        med(&workers, |r| r.life.cpu_s)
    );
    println!(
        "| worker CPU per session | {:.1} µs | |",
        med(&workers, |r| r.life.cpu_s) * 1e6 / n
    );
    println!(
        "| worker peak RSS (VmHWM) | {:.1} MB | ≤ 40 MB |",
        med(&workers, |r| r.life.hwm_kib as f64) / 1024.0
    );
    println!(
        "| broker CPU during the worker run | {:.2} s | |",
        med(&workers, |r| r.broker_cpu_s)
    );
    println!(
        "| sink CPU during the worker run | {:.2} s | |",
        med(&workers, |r| r.sink_cpu_s)
    );
    if !ceilings.is_empty() {
        println!(
            "| ceiling CPU per session / peak RSS | {:.1} µs / {:.1} MB | |",
            med(&ceilings, |r| r.life.cpu_s) * 1e6 / n,
            med(&ceilings, |r| r.life.hwm_kib as f64) / 1024.0
        );
    }
    if let Some(p) = pure {
        println!(
            "| pure path, 1 thread (parse+map+serialise; criterion: `cargo bench --bench pure`) | {p:.0} sessions/s | ≥ 500,000 |"
        );
    }
    if let Some((p50, p99, max, cpu_us)) = latency {
        println!(
            "| latency publish → sink at {} sessions/s for {} s: p50 / p99 / max | {p50:.0} / {p99:.0} / {max:.0} ms | p99 ≤ 600 ms |",
            o.latency_rate,
            o.latency_secs()
        );
        println!("| worker CPU per session at that load | {cpu_us:.1} µs | |");
    }
    Ok(())
}

/// What `cargo test --benches` runs: no broker, no processes; the sink's counter and the
/// generated sessions are checked.
fn self_check() {
    // A child's last line carries what the rounds compare.
    let life = parse_life("life 1.25 2048").expect("a life line");
    assert_eq!((life.cpu_s, life.hwm_kib), (1.25, 2048));
    assert_eq!(parse_life("done 20000"), None);
    assert_eq!(parse_life("life 1.25"), None);
    let generated = sessions::sessions(1, "check", 2_000);
    let options = events::Options::default();
    let now = time::OffsetDateTime::now_utc();
    let (mut with_email, mut eu, mut tracks) = (0, 0, 0);
    for g in &generated {
        let session = Session::parse(g.body.as_bytes()).expect("a valid session");
        match events::map(&session, now, &options).expect("maps") {
            Mapped::Events(e) => {
                assert!(g.has_email);
                with_email += 1;
                eu += usize::from(g.eu);
                tracks += count_tracks(e.track());
            }
            Mapped::Skipped(_) => assert!(!g.has_email),
        }
    }
    assert_eq!(tracks, with_email as u64);
    assert!(
        (1_900..2_000).contains(&with_email),
        "{with_email} with an email"
    );
    assert!((700..900).contains(&eu), "{eu} in the EU");
}

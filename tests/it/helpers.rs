//! Test helpers: uniquely named queues on the local RabbitMQ, a real HTTP server standing
//! in for Segment, and a worker spawned in-process (or the binary, for signals).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use segment_bridge::app::{AppError, Stopped, WorkerApp};
use segment_bridge::config::Config;
use segment_bridge::health::Health;
use segment_bridge::metrics::Metrics;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const US_KEY: &str = "us-write-key";
pub const EU_KEY: &str = "eu-write-key";

/// A session in the canonical shape.
pub fn session(id: &str, region: &str) -> String {
    serde_json::json!({
        "session_id": id,
        "campaign_id": "n3zrik6g",
        "campaign_name": "New Quiz",
        "traffic_source": "Owned+Web",
        "completed_at": "2021-03-12T00:00:00.000Z",
        "region": region,
        "email": format!("{id}@example.com"),
        "opt_in": "true",
        "attributes": {"attribute_id_1": "attribute_value_1", "colors": ["red", "blue"]}
    })
    .to_string()
}

pub async fn connect() -> Connection {
    match Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) => panic!(
            "these tests need RabbitMQ at 127.0.0.1:5672 (guest/guest) and cannot reach it: {e}. \
             Start it with `rabbitmq-server -detached` (`.ci/run` does this) and run the tests again."
        ),
    }
}

pub use crate::broker_lock::BrokerLock;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A connection to the local broker and a channel on it in confirm mode.
pub async fn open_confirm_channel() -> (Connection, Channel) {
    let conn = connect().await;
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, channel)
}

/// A main queue and a dead-letter queue with names no other test or run uses, deleted
/// when dropped.
pub struct Queues {
    pub main: String,
    pub dead: String,
    /// Reopened when a broker restart closed it.
    link: tokio::sync::Mutex<(Connection, Channel)>,
    _lock: BrokerLock,
}

impl Queues {
    /// A classic main queue and dead-letter queue.
    pub async fn new(test: &str) -> Queues {
        Queues::declare(test, FieldTable::default()).await
    }

    /// A quorum main queue that drops a message after `delivery_limit` returns (RabbitMQ
    /// 4.x's default limit is 20), and a classic dead-letter queue.
    #[allow(dead_code)]
    pub async fn quorum(test: &str, delivery_limit: i64) -> Queues {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(delivery_limit),
        );
        Queues::declare(test, arguments).await
    }

    /// The test's own channel (in confirm mode), reopened if it was closed.
    pub async fn channel(&self) -> Channel {
        let mut link = self.link.lock().await;
        if !link.1.status().connected() {
            *link = open_confirm_channel().await;
        }
        link.1.clone()
    }

    async fn declare(test: &str, main_arguments: FieldTable) -> Queues {
        let unique = format!(
            "{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let lock = BrokerLock::shared();
        let q = Queues {
            main: format!("sb-test.{test}.{unique}"),
            dead: format!("sb-test.{test}.{unique}.dead"),
            link: tokio::sync::Mutex::new(open_confirm_channel().await),
            _lock: lock,
        };
        for (name, arguments) in [(&q.main, main_arguments), (&q.dead, FieldTable::default())] {
            q.channel()
                .await
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions::durable(),
                    arguments,
                )
                .await
                .unwrap();
        }
        q
    }

    pub async fn publish<I, B>(&self, bodies: I)
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        let channel = self.channel().await;
        let mut confirms = FuturesUnordered::new();
        for body in bodies {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        self.main.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_ref(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
            if confirms.len() > 500 {
                assert!(confirms.next().await.unwrap().unwrap().is_ack());
            }
        }
        while let Some(c) = confirms.next().await {
            assert!(c.unwrap().is_ack());
        }
    }

    pub async fn publish_with(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel()
            .await
            .basic_publish(
                "".into(),
                self.main.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }

    /// Messages ready in (main, dead). Unacknowledged ones are not counted.
    pub async fn ready(&self) -> (u32, u32) {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let channel = self.channel().await;
        let mut counts = [0; 2];
        for (i, name) in [&self.main, &self.dead].into_iter().enumerate() {
            counts[i] = channel
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
                .unwrap()
                .message_count();
        }
        (counts[0], counts[1])
    }

    /// Waits until the ready counts are `want`.
    pub async fn wait_ready(&self, want: (u32, u32), within: Duration) {
        let start = Instant::now();
        loop {
            let got = self.ready().await;
            if got == want {
                return;
            }
            assert!(
                start.elapsed() < within,
                "queues hold {got:?} ready, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes the dead-letter queue (to make dead-lettering fail), or declares it again.
    #[allow(dead_code)]
    pub async fn set_dead_letter_queue(&self, exists: bool) {
        let channel = self.channel().await;
        if exists {
            channel
                .queue_declare(
                    self.dead.as_str().into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        } else {
            channel
                .queue_delete(self.dead.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
    }

    /// Takes every message of the dead-letter queue.
    pub async fn take_dead(&self) -> Vec<(Vec<u8>, BasicProperties)> {
        self.take(&self.dead.clone()).await
    }

    /// Takes every message of the main queue.
    #[allow(dead_code)]
    pub async fn take_main(&self) -> Vec<(Vec<u8>, BasicProperties)> {
        self.take(&self.main.clone()).await
    }

    async fn take(&self, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
        let channel = self.channel().await;
        let mut out = Vec::new();
        while let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let d = m.delivery;
            channel
                .basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await
                .unwrap();
            out.push((d.data, d.properties));
        }
        out
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        crate::broker_lock::delete_queues(vec![self.main.clone(), self.dead.clone()]);
    }
}

/// What the fake Segment received in one request.
#[derive(Debug, Clone)]
pub struct Received {
    /// `user:password` of the Basic authorization.
    pub auth: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// The body as it came, before any decompression.
    pub wire_bytes: usize,
    /// The JSON body, decompressed if it came gzipped.
    pub body: Value,
    /// The status the fake answered with.
    pub status: u16,
    pub at: Instant,
}

impl Received {
    pub fn events(&self) -> Vec<Value> {
        self.body["batch"].as_array().cloned().unwrap_or_default()
    }
}

/// How the fake answers a request: given it and how many came before it.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn ok() -> Reply {
        Reply::status(200)
    }
}

type Respond = dyn Fn(&Received, usize) -> Reply + Send + Sync;

struct SinkState {
    received: Mutex<Vec<Received>>,
    respond: Box<Respond>,
}

/// A real HTTP server standing in for Segment's `/v1/batch`.
pub struct FakeSegment {
    pub addr: SocketAddr,
    state: Arc<SinkState>,
    _server: JoinHandle<()>,
}

impl FakeSegment {
    /// Answers 200 to everything.
    pub async fn ok() -> FakeSegment {
        FakeSegment::start(|_, _| Reply::ok()).await
    }

    /// Answers 503 until the returned switch is set, then 200.
    pub async fn down_until_up() -> (FakeSegment, Arc<std::sync::atomic::AtomicBool>) {
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let switch = up.clone();
        let sink = FakeSegment::start(move |_, _| {
            Reply::status(if switch.load(Ordering::SeqCst) {
                200
            } else {
                503
            })
        })
        .await;
        (sink, up)
    }

    pub async fn start(
        respond: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> FakeSegment {
        let state = Arc::new(SinkState {
            received: Mutex::new(Vec::new()),
            respond: Box::new(respond),
        });
        let app = Router::new()
            .route("/v1/batch", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeSegment {
            addr,
            state,
            _server: server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1/batch", self.addr)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Every event of every request answered 2xx, in order.
    pub fn accepted(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .flat_map(|r| r.events())
            .collect()
    }

    /// Waits until at least `n` events were accepted, and returns them.
    pub async fn wait_accepted(&self, n: usize, within: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let accepted = self.accepted();
            if accepted.len() >= n {
                return accepted;
            }
            assert!(
                start.elapsed() < within,
                "Segment accepted {} events in {within:?}, expected {n}",
                accepted.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn receive(State(state): State<Arc<SinkState>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let auth = header("authorization").and_then(|v| {
        let encoded = v.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        String::from_utf8(decoded).ok()
    });
    let content_encoding = header("content-encoding");
    let json = match content_encoding.as_deref() {
        Some("gzip") => {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)
                .map(|_| out)
                .unwrap_or_default()
        }
        _ => body.to_vec(),
    };
    let mut received = Received {
        auth,
        content_type: header("content-type"),
        content_encoding,
        wire_bytes: body.len(),
        body: serde_json::from_slice(&json).unwrap_or(Value::Null),
        status: 0,
        at: Instant::now(),
    };
    let index = state.received.lock().unwrap().len();
    let reply = (state.respond)(&received, index);
    received.status = reply.status;
    state.received.lock().unwrap().push(received);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), "{}").into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

/// A configuration for the test's queues and fake Segments, with short timers.
pub fn config(queues: &Queues, us: Option<&FakeSegment>, eu: Option<&FakeSegment>) -> Config {
    let mut env: HashMap<String, String> = HashMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(format!("SEGMENT_BRIDGE__{k}"), v);
    };
    set("AMQP__URL", AMQP_URL.into());
    set("AMQP__QUEUE", queues.main.clone());
    set("AMQP__DEAD_LETTER_QUEUE", queues.dead.clone());
    set("AMQP__PREFETCH", "200".into());
    set("SEGMENT__FLUSH_INTERVAL_MS", "50".into());
    set("RETRY__INITIAL_BACKOFF_MS", "10".into());
    set("RETRY__MAX_BACKOFF_MS", "200".into());
    set("SERVER__LISTEN", "127.0.0.1:0".into());
    if let Some(us) = us {
        set("SEGMENT__US__ENDPOINT", us.url());
        set("SEGMENT__US__WRITE_KEY", US_KEY.into());
    }
    if let Some(eu) = eu {
        set("SEGMENT__EU__ENDPOINT", eu.url());
        set("SEGMENT__EU__WRITE_KEY", EU_KEY.into());
    }
    let dir = tempfile::tempdir().unwrap();
    Config::load(Some(&write_empty(&dir)), Some(env)).unwrap()
}

fn write_empty(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "").unwrap();
    path
}

/// A worker running in this process, with its side port, built and run as the binary
/// does ([`WorkerApp`]).
pub struct App {
    /// `shutdown.grace_period_s`: `stop` fails if the worker takes longer, as the binary
    /// would exit then, leaving its deliveries to the broker.
    pub grace: Duration,
    pub shutdown: CancellationToken,
    pub worker: JoinHandle<Result<Stopped, AppError>>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub probes: String,
}

pub async fn spawn_app(config: Config) -> App {
    let grace = config.grace_period();
    let app = WorkerApp::build(config, false).await.unwrap();
    let probes = format!("http://{}", app.probes_addr());
    let (health, metrics) = (app.health(), app.metrics());
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(app.run(shutdown.clone()));
    App {
        grace,
        shutdown,
        worker,
        health,
        metrics,
        probes,
    }
}

impl App {
    /// Shuts the worker down as SIGTERM would, and waits for it: it must have settled
    /// everything within the grace period.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let within = self.grace + Duration::from_millis(500);
        let stopped = tokio::time::timeout(within, self.worker)
            .await
            .unwrap_or_else(|_| panic!("the worker did not stop within {within:?}"))
            .unwrap()
            .unwrap();
        assert_eq!(
            stopped,
            Stopped::Drained,
            "the worker did not settle everything within its grace period ({:?})",
            self.grace
        );
    }

    /// GETs a probe path; returns the status and body.
    pub async fn probe(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("{}{path}", self.probes))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The value of one metric series, e.g. `segment_bridge_sessions_total{outcome="delivered"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics.render(), series)
    }

    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        mut cond: impl FnMut(&App) -> bool,
    ) {
        let start = Instant::now();
        while !cond(self) {
            assert!(start.elapsed() < within, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Reads one series out of a Prometheus text exposition; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The `x-segment-bridge-error` header of a dead-lettered message.
pub fn error_header(properties: &BasicProperties) -> String {
    segment_bridge::amqp::headers::error_header(properties)
        .expect("an x-segment-bridge-error header")
}

/// How long the helpers below wait for the broker or a daemon.
pub const WAIT: Duration = Duration::from_secs(15);

/// Session ids `{prefix}000`, `{prefix}001`, ...
pub fn session_ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}")).collect()
}

pub fn bodies(ids: &[String]) -> Vec<String> {
    ids.iter().map(|id| session(id, "us")).collect()
}

/// The `surveySessionId`s of the Track events among `events`.
pub fn tracked(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .filter(|e| e["type"] == "track")
        .map(|e| {
            e["properties"]["surveySessionId"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// The `session_id`s of raw message bodies.
pub fn session_ids_of(messages: &[(Vec<u8>, lapin::BasicProperties)]) -> Vec<String> {
    messages
        .iter()
        .map(|(body, _)| {
            serde_json::from_slice::<Value>(body).unwrap()["session_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

pub fn all(ids: &[String]) -> BTreeSet<String> {
    ids.iter().cloned().collect()
}

/// A fake Segment that answers every request `status` after `delay`.
pub async fn fake_segment(status: u16, delay: Duration) -> FakeSegment {
    FakeSegment::start(move |_, _| Reply {
        status,
        headers: Vec::new(),
        delay,
    })
    .await
}

/// Waits until the sessions the fake accepted and those ready in the main queue together
/// account for `total` (the broker requeues a dead connection's deliveries shortly after
/// it notices), then takes the main queue's messages and returns their session ids.
pub async fn take_back(queues: &Queues, us: &FakeSegment, total: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        let ready = queues.ready().await.0 as usize;
        let accepted = tracked(&us.accepted()).len();
        if ready + accepted >= total || start.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    session_ids_of(&queues.take_main().await)
}

/// Runs a blocking command (`rabbitmqctl`, `kill`) off the async runtime; returns stdout.
pub async fn command(program: &str, args: &[&str]) -> String {
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(&program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

pub async fn rabbitmqctl(args: &[&str]) -> String {
    command("rabbitmqctl", args).await
}

/// Waits until `queue` holds no message, ready or unacknowledged: the worker has settled
/// every delivery it took, redelivered copies included.
pub async fn wait_drained(queue: &str) {
    let start = Instant::now();
    loop {
        let queues = rabbitmqctl(&[
            "list_queues",
            "name",
            "messages",
            "--quiet",
            "--no-table-headers",
        ])
        .await;
        let messages: u64 = queues
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| name.trim() == queue)
            .and_then(|(_, n)| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no queue {queue}:\n{queues}"));
        if messages == 0 {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "{queue} still holds {messages} messages, ready or unacknowledged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The broker's id of the connection of the worker consuming `queue`, for
/// `rabbitmqctl close_connection`. It is found by its name (`segment-bridge/<version>
/// <queue>`) if the worker names it so, else through the consumer on `queue`, its channel
/// and that channel's connection.
pub async fn worker_connection(queue: &str) -> String {
    let connections = rabbitmqctl(&[
        "list_connections",
        "pid",
        "name",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    let by_name = connections
        .lines()
        .find(|l| l.contains(queue))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_owned);
    match by_name {
        Some(pid) => pid,
        None => {
            let consumers = rabbitmqctl(&[
                "list_consumers",
                "queue_name",
                "channel_pid",
                "--quiet",
                "--no-table-headers",
            ])
            .await;
            let channel = consumers
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .find(|(q, _)| q.trim() == queue)
                .map(|(_, ch)| ch.trim().to_owned())
                .unwrap_or_else(|| panic!("no consumer on {queue}:\n{consumers}"));
            let channels = rabbitmqctl(&[
                "list_channels",
                "pid",
                "connection",
                "--quiet",
                "--no-table-headers",
            ])
            .await;
            channels
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .find(|(ch, _)| ch.trim() == channel)
                .map(|(_, conn)| conn.trim().to_owned())
                .unwrap_or_else(|| panic!("no channel {channel}:\n{channels}"))
        }
    }
}

/// A RabbitMQ user of the test's own, deleted when dropped: its permissions can be taken
/// away without disturbing other tests, which all connect as guest.
pub struct BrokerUser {
    name: String,
}

impl BrokerUser {
    pub async fn new() -> BrokerUser {
        let name = format!(
            "sb-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        rabbitmqctl(&["add_user", &name, "secret"]).await;
        let user = BrokerUser { name };
        user.allow().await;
        user
    }

    pub fn url(&self) -> String {
        format!("amqp://{}:secret@127.0.0.1:5672/%2f", self.name)
    }

    pub async fn allow(&self) {
        rabbitmqctl(&["set_permissions", "-p", "/", &self.name, ".*", ".*", ".*"]).await;
    }

    pub async fn deny(&self) {
        rabbitmqctl(&["clear_permissions", "-p", "/", &self.name]).await;
    }

    /// Closes this user's connections from the broker's side; returns how many.
    pub async fn close_connections(&self) -> usize {
        let connections = rabbitmqctl(&[
            "list_connections",
            "pid",
            "user",
            "--quiet",
            "--no-table-headers",
        ])
        .await;
        let pids: Vec<String> = connections
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(_, user)| user.trim() == self.name)
            .map(|(pid, _)| pid.trim().to_owned())
            .collect();
        for pid in &pids {
            rabbitmqctl(&["close_connection", pid, "closed by a segment-bridge test"]).await;
        }
        pids.len()
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// `segment-bridge run` as a child process, configured by the environment only, with its
/// log in a file. Killed when dropped.
pub struct Daemon {
    pub child: std::process::Child,
    probes: String,
    log: PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// Starts `segment-bridge <command>` as a child process in `dir`, with an empty config
/// file, none of this process's `SEGMENT_BRIDGE*` variables, the given
/// `SEGMENT_BRIDGE__<KEY>` settings (later ones win), `RUST_LOG=info`, and its standard
/// error in `dir/stderr.log`, which is returned with it.
pub fn spawn_bridge<'a>(
    command: &str,
    dir: &tempfile::TempDir,
    settings: impl IntoIterator<Item = (&'a str, String)>,
) -> (std::process::Child, PathBuf) {
    spawn_bridge_env(command, dir, settings, &[])
}

/// [`spawn_bridge`], with other environment variables set as given (`SSL_CERT_FILE`).
pub fn spawn_bridge_env<'a>(
    command: &str,
    dir: &tempfile::TempDir,
    settings: impl IntoIterator<Item = (&'a str, String)>,
    env: &[(&str, &str)],
) -> (std::process::Child, PathBuf) {
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let log = dir.path().join("stderr.log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_segment-bridge"));
    cmd.arg(command)
        .arg("--config")
        .arg(&empty)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (key, _) in std::env::vars() {
        if key.starts_with("SEGMENT_BRIDGE") {
            cmd.env_remove(key);
        }
    }
    for (key, value) in settings {
        cmd.env(format!("SEGMENT_BRIDGE__{key}"), value);
    }
    cmd.env("RUST_LOG", "info");
    cmd.envs(env.iter().copied());
    let child = cmd.spawn().expect("the segment-bridge binary starts");
    (child, log)
}

/// A free local port, for a child process to listen on.
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Daemon {
    pub fn spawn(queues: &Queues, us: &FakeSegment, settings: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_env(queues, us, settings, &[])
    }

    /// [`Daemon::spawn`], with other environment variables set as given.
    pub fn spawn_env(
        queues: &Queues,
        us: &FakeSegment,
        settings: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        // A free port for the side port, so that the test can read /readyz and /metrics.
        let listen = free_port();
        let base = [
            ("AMQP__URL", AMQP_URL.to_owned()),
            ("AMQP__QUEUE", queues.main.clone()),
            ("AMQP__DEAD_LETTER_QUEUE", queues.dead.clone()),
            ("SEGMENT__US__ENDPOINT", us.url()),
            ("SEGMENT__US__WRITE_KEY", US_KEY.to_owned()),
            ("SERVER__LISTEN", listen.to_string()),
            ("SEGMENT__FLUSH_INTERVAL_MS", "50".to_owned()),
            ("RETRY__INITIAL_BACKOFF_MS", "10".to_owned()),
            ("RETRY__MAX_BACKOFF_MS", "200".to_owned()),
        ];
        // Everything that may fail comes first: once spawned, the child is owned by a
        // `Daemon`, whose drop kills it.
        let http = segment_bridge::segment::http_client(Duration::from_secs(5)).unwrap();
        let extra = settings.iter().map(|(k, v)| (*k, (*v).to_owned()));
        let (child, log) = spawn_bridge_env("run", &dir, base.into_iter().chain(extra), env);
        Daemon {
            child,
            probes: format!("http://{listen}"),
            log,
            http,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = self
            .http
            .get(format!("{}{path}", self.probes))
            .send()
            .await
            .ok()?;
        Some((r.status().as_u16(), r.text().await.ok()?))
    }

    pub async fn wait_ready(&self) {
        let start = Instant::now();
        while self.get("/readyz").await.map(|r| r.0) != Some(200) {
            assert!(
                start.elapsed() < WAIT,
                "the daemon did not become ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.map(|r| r.1).unwrap_or_default();
        metric(&text, series)
    }

    pub async fn signal(&self, signal: &str) -> Instant {
        let sent = Instant::now();
        command("kill", &[&format!("-{signal}"), &self.pid().to_string()]).await;
        sent
    }

    /// Waits for the process to end; returns its status and when it ended.
    pub async fn wait_exit(&mut self, within: Duration) -> (ExitStatus, Instant) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, Instant::now());
            }
            assert!(
                start.elapsed() < within,
                "the daemon did not exit within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the fake has accepted a Track event of every session in `ids`.
pub async fn wait_all_tracked(us: &FakeSegment, ids: &[String], within: Duration) {
    let start = Instant::now();
    loop {
        let got = tracked(&us.accepted());
        if got == all(ids) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{} of {} sessions never arrived, e.g. {:?}",
            all(ids).difference(&got).count(),
            ids.len(),
            all(ids).difference(&got).take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The messageIds each event of each person was accepted with: (userId, type) → ids.
pub fn message_ids_by_event(
    events: &[Value],
) -> std::collections::BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: std::collections::BTreeMap<_, BTreeSet<String>> = Default::default();
    for e in events {
        let key = (
            e["userId"].as_str().unwrap().to_owned(),
            e["type"].as_str().unwrap().to_owned(),
        );
        out.entry(key)
            .or_default()
            .insert(e["messageId"].as_str().unwrap().to_owned());
    }
    out
}

/// The messageIds of the events of one type, in the order accepted, repeats included.
#[allow(dead_code)]
pub fn message_ids_of(events: &[Value], kind: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| e["messageId"].as_str().unwrap().to_owned())
        .collect()
}

//! Test helpers: uniquely named queues on the local RabbitMQ, a real HTTP server standing
//! in for Segment, and a worker spawned in-process (or the binary, for signals).

use std::collections::HashMap;
use std::net::SocketAddr;
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
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use segment_bridge::config::Config;
use segment_bridge::health::{self, Health};
use segment_bridge::metrics::Metrics;
use segment_bridge::worker::{Worker, WorkerError};

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

/// The local broker is shared by every test, by other test runs and by the benchmarks. A
/// test that changes the broker itself (a restart, a broker-wide setting) holds this lock
/// exclusively; every [`Queues`] holds it shared. The lock is a `flock` on a file in the
/// temporary directory, so it keeps test binaries and processes apart as well as threads.
pub struct BrokerLock(#[allow(dead_code)] std::fs::File);

impl BrokerLock {
    fn file() -> std::fs::File {
        let path = std::env::temp_dir().join("segment-bridge-tests.broker.lock");
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open the broker lock {}: {e}", path.display()))
    }

    /// Held by every test that uses the broker as it is.
    pub fn shared() -> BrokerLock {
        let file = BrokerLock::file();
        file.lock_shared().expect("the shared broker lock");
        BrokerLock(file)
    }

    /// Held by a test that changes the broker: no other test uses it meanwhile.
    #[allow(dead_code)]
    pub fn exclusive() -> BrokerLock {
        let file = BrokerLock::file();
        file.lock().expect("the exclusive broker lock");
        BrokerLock(file)
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A main queue and a dead-letter queue with names no other test or run uses, deleted
/// when dropped.
pub struct Queues {
    pub main: String,
    pub dead: String,
    _conn: Connection,
    channel: Channel,
    _lock: BrokerLock,
}

impl Queues {
    pub async fn new(test: &str) -> Queues {
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
        let conn = connect().await;
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let q = Queues {
            main: format!("sb-test.{test}.{unique}"),
            dead: format!("sb-test.{test}.{unique}.dead"),
            _conn: conn,
            channel,
            _lock: lock,
        };
        for name in [&q.main, &q.dead] {
            q.channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
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
        let mut confirms = FuturesUnordered::new();
        for body in bodies {
            confirms.push(
                self.channel
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
            .channel
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
        let mut counts = [0; 2];
        for (i, name) in [&self.main, &self.dead].into_iter().enumerate() {
            counts[i] = self
                .channel
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
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let d = m.delivery;
            self.channel
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
        let names = [self.main.clone(), self.dead.clone()];
        // Drop cannot await, and the test's runtime may be busy: a thread with a runtime and
        // a connection of its own deletes the queues, even when the test panicked.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
                else {
                    return;
                };
                if let Ok(channel) = conn.create_channel().await {
                    for name in names {
                        let _ = channel
                            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "OK".into()).await;
            });
        })
        .join();
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

/// A worker running in this process, with its side port.
pub struct App {
    pub shutdown: CancellationToken,
    pub worker: JoinHandle<Result<(), WorkerError>>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub probes: String,
}

pub async fn spawn_app(config: Config) -> App {
    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probes = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(health::serve(
        listener,
        health.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let worker = tokio::spawn(
        Worker::new(config, health.clone(), metrics.clone(), false).run(shutdown.clone()),
    );
    App {
        shutdown,
        worker,
        health,
        metrics,
        probes,
    }
}

impl App {
    /// Shuts the worker down as SIGTERM would, and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.worker)
            .await
            .expect("the worker stops within 30 s")
            .unwrap()
            .unwrap();
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
    segment_bridge::consumer::error_header(properties).expect("an x-segment-bridge-error header")
}

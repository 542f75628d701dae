//! The fake Segment: a real HTTP server on a random local port standing in for Segment's
//! `/v1/batch`, which records each request (decompressed) and answers as the test says;
//! and what tests read out of the events it accepted (sessions, messageIds). The
//! benchmarks' counting sink, which keeps no bodies, is [`sink::Sink`].

pub mod sink;

pub use sink::Sink;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::broker::Queues;
use crate::eventually::wait_until;

/// The write keys the tests configure.
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

    /// The response, after the delay.
    async fn send(self) -> Response {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mut response = (StatusCode::from_u16(self.status).unwrap(), "{}").into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        response
    }
}

/// A request body as sent, decompressed if its `content-encoding` is gzip; `None` if
/// it does not decompress.
fn decoded(headers: &HeaderMap, body: Bytes) -> Option<Bytes> {
    if headers
        .get("content-encoding")
        .is_none_or(|v| v.as_bytes() != b"gzip")
    {
        return Some(body);
    }
    let mut out = Vec::with_capacity(body.len() * 8);
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out).ok()?;
    Some(Bytes::from(out))
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
        let done = wait_until(within, async || self.accepted().len() >= n).await;
        let accepted = self.accepted();
        assert!(
            done.is_ok(),
            "Segment accepted {} events in {within:?}, expected {n}",
            accepted.len()
        );
        accepted
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
    let wire_bytes = body.len();
    let json = decoded(&headers, body).unwrap_or_default();
    let mut received = Received {
        auth,
        content_type: header("content-type"),
        content_encoding,
        wire_bytes,
        body: serde_json::from_slice(&json).unwrap_or(Value::Null),
        status: 0,
        at: Instant::now(),
    };
    let index = state.received.lock().unwrap().len();
    let reply = (state.respond)(&received, index);
    received.status = reply.status;
    state.received.lock().unwrap().push(received);
    reply.send().await
}

/// Session ids `{prefix}000`, `{prefix}001`, ...
pub fn session_ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}")).collect()
}

pub fn bodies(ids: &[String]) -> Vec<String> {
    ids.iter().map(|id| session(id, "us")).collect()
}

/// Publishes [`session_ids`]`(prefix, n)` as sessions of region us to the main queue;
/// returns their ids.
pub async fn publish_sessions(queues: &Queues, prefix: &str, n: usize) -> Vec<String> {
    let ids = session_ids(prefix, n);
    queues.publish(bodies(&ids)).await;
    ids
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

/// The ids as a set.
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
    // Not finding them all is for the caller's assertions to report.
    let _ = wait_until(Duration::from_secs(5), async || {
        let ready = queues.ready().await.0 as usize;
        ready + tracked(&us.accepted()).len() >= total
    })
    .await;
    session_ids_of(&queues.take_main().await)
}

/// Waits until the fake has accepted a Track event of every session in `ids`.
pub async fn wait_all_tracked(us: &FakeSegment, ids: &[String], within: Duration) {
    let mut got = BTreeSet::new();
    let seen = &mut got;
    let done = wait_until(within, async || {
        *seen = tracked(&us.accepted());
        *seen == all(ids)
    })
    .await;
    assert!(
        done.is_ok(),
        "{} of {} sessions never arrived, e.g. {:?}",
        all(ids).difference(&got).count(),
        ids.len(),
        all(ids).difference(&got).take(5).collect::<Vec<_>>()
    );
}

/// The messageIds each event of each person was accepted with: (userId, type) → ids.
pub fn message_ids_by_event(events: &[Value]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<_, BTreeSet<String>> = Default::default();
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
pub fn message_ids_of(events: &[Value], kind: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| e["messageId"].as_str().unwrap().to_owned())
        .collect()
}

//! The benchmarks' Segment: an HTTP server that keeps no bodies, only counts what it
//! accepts, fast enough not to be what a benchmark measures. It counts requests, wire
//! bytes and Track events (by their `"type":"track"`, without parsing the JSON); when
//! asked it also counts every event and keeps the distinct Track messageIds (as 64-bit
//! keys), and it records publish → receipt latencies of events stamped `bench_sent_us`.
//! It answers as its caller's schedule says ([`Reply`]), so that a soak can make it fail.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Reply, decoded};

/// Counted in each body; it ends in a `k`, a letter rare in these bodies (hashes are hex).
const TRACK: &str = r#""type":"track"#;
/// Where each event's messageId starts.
const MESSAGE_ID: &str = r#""messageId":""#;
/// How a Track event's messageId starts, by scheme (`events::MessageIds`): v2 (the
/// default), v1.
const TRACK_IDS: [&str; 2] = ["sb2-track-", "sb-track-"];
/// Where a latency run's publish time stands in each event.
const SENT: &str = r#""bench_sent_us":"#;

type Respond = dyn Fn(u64) -> Reply + Send + Sync;

struct Counts {
    respond: Box<Respond>,
    requests: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    throttled: AtomicU64,
    bytes: AtomicU64,
    tracks: AtomicU64,
    events: AtomicU64,
    duplicates: AtomicU64,
    /// The distinct Track messageIds accepted, when counted ([`Sink::start`]'s `ids`).
    track_ids: Option<Mutex<HashSet<u64>>>,
    expected: AtomicU64,
    done_at: Mutex<Option<Instant>>,
    /// When 99% of the expected Track events were in: what is left after it is the last
    /// partial batches, which wait for their flush interval.
    most_at: Mutex<Option<Instant>>,
    done: Notify,
    /// Latency runs: the time `bench_sent_us` counts from, and (publish → receipt) in µs,
    /// one sample per event.
    latency_base: Mutex<Option<Instant>>,
    recording: AtomicBool,
    latencies: Mutex<Vec<u64>>,
}

/// A counting stand-in for Segment's `/v1/batch` (also served as `/<region>/v1/batch`).
pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<Counts>,
    _server: JoinHandle<()>,
}

impl Sink {
    /// Answers 200 to everything and counts Track events.
    pub async fn ok() -> Sink {
        Sink::start(false, |_| Reply::ok()).await
    }

    /// Answers request `n` (counted from 0) as `respond(n)` says; with `ids`, also counts
    /// every event and keeps the distinct Track messageIds of the requests answered 2xx.
    pub async fn start(ids: bool, respond: impl Fn(u64) -> Reply + Send + Sync + 'static) -> Sink {
        let state = Arc::new(Counts {
            respond: Box::new(respond),
            requests: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            tracks: AtomicU64::new(0),
            events: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            track_ids: ids.then(Default::default),
            expected: AtomicU64::new(u64::MAX),
            done_at: Mutex::new(None),
            most_at: Mutex::new(None),
            done: Notify::new(),
            latency_base: Mutex::new(None),
            recording: AtomicBool::new(false),
            latencies: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/batch", post(receive))
            .route("/{region}/v1/batch", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Sink {
            addr,
            state,
            _server: server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1/batch", self.addr)
    }

    /// The endpoint for one region: the same sink, another path.
    pub fn url_for(&self, region: &str) -> String {
        format!("http://{}/{region}/v1/batch", self.addr)
    }

    /// Zeroes the counts (not the messageIds) and waits for `expected` Track events.
    pub fn reset(&self, expected: u64) {
        let s = &self.state;
        for n in [
            &s.requests,
            &s.ok,
            &s.errors,
            &s.throttled,
            &s.bytes,
            &s.tracks,
        ] {
            n.store(0, Ordering::SeqCst);
        }
        *s.done_at.lock().unwrap() = None;
        *s.most_at.lock().unwrap() = None;
        s.latencies.lock().unwrap().clear();
        s.expected.store(expected, Ordering::SeqCst);
    }

    /// When the expected Track events were all in; `None` if not within `within`.
    pub async fn wait_done(&self, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        loop {
            let notified = self.state.done.notified();
            if let Some(at) = *self.state.done_at.lock().unwrap() {
                return Some(at);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// When 99% of the expected Track events were in.
    pub fn most_at(&self) -> Option<Instant> {
        *self.state.most_at.lock().unwrap()
    }

    /// Records publish → receipt latencies of stamped events, `bench_sent_us` counting in
    /// µs from `base`; `None` stops.
    pub fn record_latency(&self, base: Option<Instant>) {
        *self.state.latency_base.lock().unwrap() = base;
        self.state.recording.store(base.is_some(), Ordering::SeqCst);
    }

    /// The latencies recorded so far, in µs; they are cleared.
    pub fn take_latencies(&self) -> Vec<u64> {
        std::mem::take(&mut *self.state.latencies.lock().unwrap())
    }

    /// Requests received, whatever the answer.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Bytes received as they came on the wire (compressed or not).
    pub fn bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::SeqCst)
    }

    /// Requests answered 2xx, 429, and anything else.
    pub fn answers(&self) -> (u64, u64, u64) {
        let s = &self.state;
        (
            s.ok.load(Ordering::SeqCst),
            s.throttled.load(Ordering::SeqCst),
            s.errors.load(Ordering::SeqCst),
        )
    }

    /// Track events accepted, repeats included.
    pub fn tracks(&self) -> u64 {
        self.state.tracks.load(Ordering::SeqCst)
    }

    /// Events accepted, repeats included (with `ids` only).
    pub fn events(&self) -> u64 {
        self.state.events.load(Ordering::SeqCst)
    }

    /// Track events accepted again with a messageId accepted before (with `ids` only).
    pub fn duplicates(&self) -> u64 {
        self.state.duplicates.load(Ordering::SeqCst)
    }

    /// Distinct Track messageIds accepted (with `ids` only).
    pub fn delivered(&self) -> usize {
        self.state
            .track_ids
            .as_ref()
            .map_or(0, |ids| ids.lock().unwrap().len())
    }

    /// Whether every key of `want` ([`id_key`]) was accepted (with `ids` only).
    pub fn has_all(&self, want: &HashSet<u64>) -> bool {
        let ids = self
            .state
            .track_ids
            .as_ref()
            .expect("a sink started with ids");
        let got = ids.lock().unwrap();
        want.iter().all(|k| got.contains(k))
    }
}

/// A messageId as a 64-bit key: the first 16 hex digits of its hash.
pub fn id_key(message_id: &str) -> u64 {
    let hex = message_id.rsplit('-').next().unwrap_or_default();
    u64::from_str_radix(&hex[..16.min(hex.len())], 16).unwrap_or(0)
}

/// The Track events in a batch body: occurrences of `"type":"track"`, found by its last
/// byte, which is rare in these bodies (a memchr through `str::find(char)`, ~10 GB/s
/// here), then a compare.
pub fn count_tracks(body: &[u8]) -> u64 {
    let text = std::str::from_utf8(body).unwrap_or("");
    let last = char::from(*TRACK.as_bytes().last().expect("a needle"));
    let mut n = 0;
    let mut at = 0;
    // `at` always follows an ASCII byte: a character boundary.
    while let Some(i) = text[at..].find(last) {
        at += i + 1;
        if text.as_bytes()[..at].ends_with(TRACK.as_bytes()) {
            n += 1;
        }
    }
    n
}

async fn receive(State(state): State<Arc<Counts>>, headers: HeaderMap, body: Bytes) -> Response {
    let received = Instant::now();
    let n = state.requests.fetch_add(1, Ordering::Relaxed);
    // Bytes on the wire: as sent, compressed or not.
    state.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    let reply = (state.respond)(n);
    let counter = match reply.status {
        200..=299 => &state.ok,
        429 => &state.throttled,
        _ => &state.errors,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if (200..300).contains(&reply.status) {
        let Some(body) = decoded(&headers, body) else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        count(&state, &body, received);
    }
    reply.send().await
}

/// Counts what an accepted body holds.
fn count(state: &Counts, body: &[u8], received: Instant) {
    // JSON bodies are UTF-8; anything else has nothing worth counting.
    let text = std::str::from_utf8(body).unwrap_or("");
    let tracks = count_tracks(body);
    if let Some(ids) = &state.track_ids {
        let mut keys = Vec::new();
        let mut events = 0;
        for (at, _) in text.match_indices(MESSAGE_ID) {
            events += 1;
            let id = &text[at + MESSAGE_ID.len()..];
            if TRACK_IDS.iter().any(|p| id.starts_with(p)) {
                keys.push(id_key(&id[..id.find('"').unwrap_or(id.len())]));
            }
        }
        state.events.fetch_add(events, Ordering::Relaxed);
        let mut ids = ids.lock().unwrap();
        for key in keys {
            if !ids.insert(key) {
                state.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if state.recording.load(Ordering::Relaxed)
        && let Some(base) = *state.latency_base.lock().unwrap()
    {
        let now_us = received.duration_since(base).as_micros() as u64;
        let samples = text.match_indices(SENT).filter_map(|(at, _)| {
            let digits = &text[at + SENT.len()..];
            let end = digits
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(digits.len());
            let sent: u64 = digits[..end].parse().ok()?;
            Some(now_us.saturating_sub(sent))
        });
        state.latencies.lock().unwrap().extend(samples);
    }
    let total = state.tracks.fetch_add(tracks, Ordering::SeqCst) + tracks;
    let expected = state.expected.load(Ordering::SeqCst);
    if total * 100 >= expected.saturating_mul(99) {
        state.most_at.lock().unwrap().get_or_insert(received);
    }
    if total >= expected {
        let mut done = state.done_at.lock().unwrap();
        if done.is_none() {
            *done = Some(received);
            state.done.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_track_events_by_their_type() {
        let body = br#"[{"type":"track","k":"ok"},{"type":"identify"},{"type":"track"}]"#;
        assert_eq!(count_tracks(body), 2);
        assert_eq!(count_tracks(b"k"), 0);
        assert_eq!(count_tracks("é\"type\":\"track\"".as_bytes()), 1);
    }

    #[test]
    fn a_message_id_key_is_its_hash_prefix() {
        assert_eq!(id_key("sb-track-00000000000000ffabc"), 0xff);
        assert_eq!(id_key("sb-track-"), 0);
    }

    #[tokio::test]
    async fn counts_events_ids_repeats_and_latencies_without_keeping_bodies() {
        let sink = Sink::start(true, |n| Reply::status(if n == 1 { 500 } else { 200 })).await;
        sink.reset(2);
        let base = Instant::now();
        sink.record_latency(Some(base));
        let body = r#"{"batch":[{"type":"identify","messageId":"sb2-identify-01"},{"type":"track","messageId":"sb2-track-0a","properties":{"bench_sent_us":0}}]}"#;
        let http = segment_bridge::segment::http_client(Duration::from_secs(5)).unwrap();
        for _ in 0..4 {
            http.post(sink.url_for("eu"))
                .body(body)
                .send()
                .await
                .unwrap();
        }
        assert_eq!(sink.requests(), 4);
        assert_eq!(sink.answers(), (3, 0, 1));
        assert_eq!((sink.tracks(), sink.events()), (3, 6));
        assert_eq!((sink.delivered(), sink.duplicates()), (1, 2));
        assert!(sink.has_all(&HashSet::from([0x0a])));
        assert!(sink.wait_done(Duration::from_secs(1)).await.is_some());
        assert_eq!(sink.take_latencies().len(), 3);
    }
}

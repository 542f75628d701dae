//! Talking to Segment's HTTP Tracking API: posting one batch body and deciding what its
//! answer means, and how long to wait before trying again.
//!
//! [`classify`] is the one place that turns a response into an [`Outcome`]; the worker
//! acts on outcomes and never looks at status codes.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};

use crate::config::Compression;
use crate::domain::Region;

/// What an attempt to post a batch came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: Segment took every event of the batch.
    Accepted,
    /// Try the same batch again later; `after` is the server's `Retry-After`, capped.
    Retry {
        after: Option<Duration>,
        cause: RetryCause,
    },
    /// 400 or 413: something in this batch's content is refused; split it to find what.
    Rejected { status: u16, detail: String },
    /// 401, 403, 404 or another 4xx: the region's endpoint or write key is wrong. No event
    /// is at fault; the operator must fix the configuration.
    Misconfigured { status: u16 },
}

/// Why an attempt is retried: the `cause` label of `segment_bridge_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    Transport,
    /// The TLS handshake failed on Segment's (or the endpoint's) certificate: unknown
    /// issuer, expired, name mismatch. Retried like any transport error, but counted apart,
    /// as it usually needs an operator (a CA bundle, a clock, an endpoint).
    Tls,
    Timeout,
    Throttled,
    ServerError,
}

impl RetryCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::Transport => "transport",
            RetryCause::Tls => "tls",
            RetryCause::Timeout => "timeout",
            RetryCause::Throttled => "throttled",
            RetryCause::ServerError => "server_error",
        }
    }
}

/// Classifies a response. `retry_after` is the raw header; `now` reads its HTTP-date form.
pub fn classify(
    status: u16,
    retry_after: Option<&HeaderValue>,
    now: SystemTime,
    max_retry_after: Duration,
    body: impl FnOnce() -> String,
) -> Outcome {
    let after = || {
        retry_after
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now))
            .map(|d| d.min(max_retry_after))
    };
    match status {
        200..=299 => Outcome::Accepted,
        408 => Outcome::Retry {
            after: after(),
            cause: RetryCause::Timeout,
        },
        429 => Outcome::Retry {
            after: after(),
            cause: RetryCause::Throttled,
        },
        400 | 413 => Outcome::Rejected {
            status,
            detail: body(),
        },
        400..=499 => Outcome::Misconfigured { status },
        // 5xx, and anything else a proxy might invent, is Segment's side: try again.
        _ => Outcome::Retry {
            after: after(),
            cause: RetryCause::ServerError,
        },
    }
}

/// `Retry-After` as delay-seconds or as an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Where the worker posts a region's batches: one body in, its classified answer out.
/// [`Sink`] is the program's; the worker's tests script their own.
pub trait Post: Send + Sync + 'static {
    fn post(&self, body: Vec<u8>) -> impl Future<Output = Response> + Send;
}

/// Where a region's batches go.
pub enum Sink {
    /// Segment's HTTP API, or a server standing in for it.
    Http(HttpSink),
    /// `run --dry-run`: each body is written as one line to standard output, with the
    /// region it is for added as `"region"`. Both regions share the lock, so that their
    /// lines never interleave.
    DryRun {
        out: Arc<Mutex<std::io::Stdout>>,
        region: Region,
    },
}

/// A dry-run line: the body `{"batch":[…],"sentAt":…}` with `,"region":"us"` added
/// before its closing brace, and a newline.
pub fn dry_run_line(mut body: Vec<u8>, region: Region) -> Vec<u8> {
    debug_assert_eq!(body.last(), Some(&b'}'));
    body.pop();
    body.extend_from_slice(b",\"region\":\"");
    body.extend_from_slice(region.as_str().as_bytes());
    body.extend_from_slice(b"\"}\n");
    body
}

pub struct HttpSink {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    write_key: SecretString,
    max_retry_after: Duration,
    compression: Compression,
    /// The certificate problem last logged; cleared by an answer. A problem is logged
    /// once when it appears, not at every retry.
    tls_problem: Mutex<Option<String>>,
}

impl HttpSink {
    pub fn new(
        client: reqwest::Client,
        endpoint: reqwest::Url,
        write_key: SecretString,
        max_retry_after: Duration,
        compression: Compression,
    ) -> Self {
        HttpSink {
            client,
            endpoint,
            write_key,
            max_retry_after,
            compression,
            tls_problem: Mutex::new(None),
        }
    }
}

/// The gzip level: the fastest. Higher levels cost several times the CPU for a few percent
/// fewer bytes on these bodies (README, Performance).
const GZIP_LEVEL: u32 = 1;

/// `body` compressed as a gzip member, as `Content-Encoding: gzip` wants it.
pub fn gzip(body: &[u8]) -> Vec<u8> {
    use flate2::write::GzEncoder;
    // Repeated keys and hashes: these bodies shrink about fivefold at this level.
    let mut encoder = GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::new(GZIP_LEVEL),
    );
    encoder
        .write_all(body)
        .and_then(|()| encoder.finish())
        .expect("compressing into a Vec cannot fail")
}

/// The HTTP client all regions share: rustls, one connection pool, the request timeout.
pub fn http_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    // rustls is built with ring only; make it the process default (a no-op if it is).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("segment-bridge/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
}

/// One attempt's answer: the status label for metrics and logs, and what it means.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status code, or `transport` / `timeout` when there was none.
    pub status: String,
    pub outcome: Outcome,
    /// Why there was no answer (`transport` / `timeout`): the error and its causes, e.g.
    /// "…: invalid peer certificate: UnknownIssuer".
    pub error: Option<String>,
}

/// An error and its sources, joined by ": ", each said once: reqwest's own message says
/// only "error sending request"; the cause that matters (a refused connection, a
/// certificate the TLS library rejected) is further down the chain, and some layers
/// repeat the message of the one below.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

impl Sink {
    /// Posts one body and classifies the answer.
    pub async fn send(&self, body: Vec<u8>) -> Response {
        match self {
            Sink::DryRun { out, region } => {
                // A blocking write (a paused pipe would stall it) off the runtime's thread.
                let (stdout, line) = (out.clone(), dry_run_line(body, *region));
                let written = tokio::task::spawn_blocking(move || {
                    let mut out = stdout.lock().unwrap_or_else(|e| e.into_inner());
                    out.write_all(&line).and_then(|()| out.flush())
                })
                .await;
                let outcome = match written {
                    Ok(Ok(())) => Outcome::Accepted,
                    _ => Outcome::Retry {
                        after: None,
                        cause: RetryCause::Transport,
                    },
                };
                Response {
                    status: "dry_run".into(),
                    outcome,
                    error: None,
                }
            }
            Sink::Http(http) => http.send(body).await,
        }
    }
}

impl Post for Sink {
    fn post(&self, body: Vec<u8>) -> impl Future<Output = Response> + Send {
        self.send(body)
    }
}

impl HttpSink {
    async fn send(&self, body: Vec<u8>) -> Response {
        let request = self
            .client
            .post(self.endpoint.clone())
            .basic_auth(self.write_key.expose_secret(), Some(""))
            .header(CONTENT_TYPE, "application/json");
        let request = match self.compression {
            Compression::None => request.body(body),
            Compression::Gzip => {
                // A few milliseconds of CPU per batch: off the runtime's one thread, so
                // that deliveries and acks go on meanwhile.
                let compressed = tokio::task::spawn_blocking(move || gzip(&body))
                    .await
                    .expect("gzip into a Vec does not panic");
                request.header(CONTENT_ENCODING, "gzip").body(compressed)
            }
        };
        let sent = request.send().await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                let problem = certificate_problem(&e);
                let cause = if e.is_timeout() {
                    RetryCause::Timeout
                } else if problem.is_some() {
                    RetryCause::Tls
                } else {
                    RetryCause::Transport
                };
                if let Some(problem) = problem {
                    let mut last = self.tls_problem.lock().unwrap_or_else(|e| e.into_inner());
                    if last.as_deref() != Some(problem.as_str()) {
                        tracing::error!(endpoint = %self.endpoint, problem = %problem, "Segment's TLS certificate is not trusted; retrying. Check the endpoint, the clock, and the CA certificates (SSL_CERT_FILE).");
                        *last = Some(problem);
                    }
                }
                return Response {
                    status: cause.as_str().into(),
                    outcome: Outcome::Retry { after: None, cause },
                    error: Some(error_chain(&e)),
                };
            }
        };
        if let Ok(mut last) = self.tls_problem.lock() {
            *last = None;
        }
        let status = response.status().as_u16();
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        // Only a rejection's body is worth reading: it says what Segment disliked.
        let detail = if matches!(status, 400 | 413) {
            response.text().await.unwrap_or_default()
        } else {
            String::new()
        };
        Response {
            status: status.to_string(),
            error: None,
            outcome: classify(
                status,
                retry_after.as_ref(),
                SystemTime::now(),
                self.max_retry_after,
                || truncate(detail, 300),
            ),
        }
    }
}

/// The certificate problem behind a failed request, if a TLS handshake failed on the
/// server's certificate: `unknown issuer`, `expired`, `name mismatch`, or rustls's words
/// for another one.
pub fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        // io::Error's source() skips the error it wraps (reqwest's is an io::Error around
        // tokio-rustls's io::Error around rustls's): unwrap them one by one.
        let mut candidate = Some(e);
        while let Some(c) = candidate {
            if let Some(rustls::Error::InvalidCertificate(cert)) = c.downcast_ref::<rustls::Error>()
            {
                return Some(describe(cert));
            }
            candidate = c
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|inner| inner as &(dyn std::error::Error + 'static));
        }
        next = e.source();
    }
    None
}

fn describe(cert: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match cert {
        C::UnknownIssuer => "unknown issuer".into(),
        C::Expired | C::ExpiredContext { .. } => "expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet".into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => "name mismatch".into(),
        C::Revoked => "revoked".into(),
        other => format!("{other:?}"),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(300);

    #[test]
    fn a_certificate_problem_is_found_inside_the_io_error_that_carries_it() {
        use rustls::CertificateError as C;
        let wrapped = |cert: C| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(cert),
            )
        };
        for (cert, named) in [
            (C::UnknownIssuer, "unknown issuer"),
            (C::Expired, "expired"),
            (C::NotValidForName, "name mismatch"),
        ] {
            // As reqwest hands it over: an io::Error around tokio-rustls's.
            let io = std::io::Error::other(wrapped(cert));
            assert_eq!(certificate_problem(&io).as_deref(), Some(named));
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(certificate_problem(&refused), None);
        assert_eq!(RetryCause::Tls.as_str(), "tls");
    }

    fn outcome(status: u16, retry_after: Option<&str>) -> Outcome {
        let header = retry_after.map(|v| HeaderValue::from_str(v).unwrap());
        classify(
            status,
            header.as_ref(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000),
            CAP,
            || "body".into(),
        )
    }

    fn retry(after: Option<u64>, cause: RetryCause) -> Outcome {
        Outcome::Retry {
            after: after.map(Duration::from_secs),
            cause,
        }
    }

    #[test]
    fn each_status_code_has_one_meaning() {
        use RetryCause::*;
        let table: &[(u16, Option<&str>, Outcome)] = &[
            (200, None, Outcome::Accepted),
            (202, None, Outcome::Accepted),
            (408, None, retry(None, Timeout)),
            (429, None, retry(None, Throttled)),
            (429, Some("7"), retry(Some(7), Throttled)),
            (500, None, retry(None, ServerError)),
            (502, Some("2"), retry(Some(2), ServerError)),
            (503, None, retry(None, ServerError)),
            (504, None, retry(None, ServerError)),
            (
                400,
                None,
                Outcome::Rejected {
                    status: 400,
                    detail: "body".into(),
                },
            ),
            (
                413,
                None,
                Outcome::Rejected {
                    status: 413,
                    detail: "body".into(),
                },
            ),
            (401, None, Outcome::Misconfigured { status: 401 }),
            (403, None, Outcome::Misconfigured { status: 403 }),
            (404, None, Outcome::Misconfigured { status: 404 }),
            (405, None, Outcome::Misconfigured { status: 405 }),
        ];
        for (status, header, want) in table {
            assert_eq!(&outcome(*status, *header), want, "status {status}");
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_an_http_date_and_capped() {
        assert_eq!(
            outcome(429, Some("100000")),
            retry(Some(300), RetryCause::Throttled)
        );
        // The clock in `outcome` is 2001-09-09T01:46:40Z.
        assert_eq!(
            outcome(503, Some("Sun, 09 Sep 2001 01:47:00 GMT")),
            retry(Some(20), RetryCause::ServerError)
        );
        assert_eq!(
            outcome(503, Some("Sun, 09 Sep 2001 01:00:00 GMT")),
            retry(Some(0), RetryCause::ServerError),
            "a date in the past means now"
        );
        assert_eq!(
            outcome(503, Some("soon")),
            retry(None, RetryCause::ServerError),
            "an unreadable header falls back to backoff"
        );
    }

    #[test]
    fn a_gzip_body_decompresses_to_the_same_bytes() {
        use std::io::Read;
        let body = br#"{"batch":[{"type":"identify","userId":"ab"},{"type":"track","userId":"ab"}],"sentAt":"2021-03-12T00:00:00.000Z"}"#.repeat(50);
        let compressed = gzip(&body);
        assert!(
            compressed.len() < body.len() / 4,
            "{} bytes",
            compressed.len()
        );
        assert_eq!(
            &compressed[..2],
            [0x1f, 0x8b],
            "a gzip member, not zlib or raw deflate"
        );
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
    }

    #[test]
    fn a_dry_run_line_is_the_body_with_its_region_and_a_newline() {
        let body = br#"{"batch":[{"type":"track"}],"sentAt":"2021-03-12T00:00:00.000Z"}"#;
        let line = dry_run_line(body.to_vec(), Region::Eu);
        assert_eq!(
            line,
            b"{\"batch\":[{\"type\":\"track\"}],\"sentAt\":\"2021-03-12T00:00:00.000Z\",\"region\":\"eu\"}\n"
        );
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["region"], "eu");
    }

    #[test]
    fn a_transport_error_is_told_with_its_causes_each_once() {
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl std::fmt::Display for Layer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|l| l as _)
            }
        }
        let tls = Layer("invalid peer certificate: UnknownIssuer", None);
        // A layer that repeats its cause's text, as some do.
        let io = Layer(
            "invalid peer certificate: UnknownIssuer",
            Some(Box::new(tls)),
        );
        let connect = Layer("client error (Connect)", Some(Box::new(io)));
        let top = Layer(
            "error sending request for url (https://x/v1/batch)",
            Some(Box::new(connect)),
        );
        assert_eq!(
            error_chain(&top),
            "error sending request for url (https://x/v1/batch): client error (Connect): invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn truncation_respects_character_boundaries() {
        assert_eq!(truncate("ééé".into(), 3), "é…");
        assert_eq!(truncate("abc".into(), 3), "abc");
    }
}

//! The webhook routes and the hardening around them.
//!
//! - `POST /webhooks/<source>`: a `jebbit` source. The signature header is checked before
//!   the body is read (missing, malformed, stale: 401), the HMAC after; a verified test
//!   webhook is answered 200 and not queued (unless `forward_tests`).
//! - `POST /webhooks/<source>/<token>`: a `joturl` source; a wrong token is 404, as for a
//!   source that does not exist, and the token is never logged or used as a label.
//!
//! Then the body must be a JSON object or an array of objects (400), at most
//! `intake.max_body_bytes` (413), arriving without a pause of `body_read_timeout_ms` (408);
//! its messages are published, and the request is answered 200 once the broker confirmed
//! every one, else 503 with `Retry-After`. Around every request: a concurrency limit (over
//! it, 503 at once) and a whole-request timeout (408), both tower layers; hyper's header
//! read timeout is set where connections are served ([`super::serve`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use subtle::ConstantTimeEq;
use tower::{BoxError, ServiceBuilder};
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

use crate::amqp::headers;
use crate::config::{self, SourceKind};

use super::body::{self, BodyError};
use super::metrics::{IntakeMetrics, NO_SOURCE, Outcome};
use super::publisher::{Batch, Publisher};
use super::signature::{self, Signature, SignatureError};

/// What every request shares.
pub struct App {
    sources: HashMap<String, Source>,
    publisher: Arc<Publisher>,
    metrics: Arc<IntakeMetrics>,
    max_body_bytes: usize,
    tolerance: Duration,
    retry_after: HeaderValue,
}

struct Source {
    name: String,
    config: config::Source,
    /// The AMQP headers of its messages, made once.
    headers: FieldTable,
}

impl App {
    pub fn new(
        intake: &config::Intake,
        publisher: Arc<Publisher>,
        metrics: Arc<IntakeMetrics>,
    ) -> App {
        let sources = intake
            .sources
            .iter()
            .map(|(name, source)| {
                let mut table = FieldTable::default();
                let mut set = |key: &str, value: &str| {
                    table.insert(
                        key.into(),
                        AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
                    );
                };
                set(headers::SOURCE, name);
                set(headers::KIND, source.kind.as_str());
                if let Some(region) = source.region {
                    set(headers::REGION, region.as_str());
                }
                let source = Source {
                    name: name.clone(),
                    config: source.clone(),
                    headers: table,
                };
                (name.clone(), source)
            })
            .collect();
        App {
            sources,
            publisher,
            metrics,
            max_body_bytes: intake.max_body_bytes,
            tolerance: intake.signature_tolerance(),
            retry_after: HeaderValue::from(intake.retry_after_s),
        }
    }

    fn source(&self, name: &str, kind: SourceKind) -> Option<&Source> {
        self.sources.get(name).filter(|s| s.config.kind == kind)
    }

    /// Reads the whole body, within the limit. The error is the response to send.
    async fn read_body(
        &self,
        source: &Source,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Bytes, Response> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(self.too_large(source));
        }
        match axum::body::to_bytes(body, self.max_body_bytes).await {
            Ok(bytes) => Ok(bytes),
            Err(e) if caused_by::<http_body_util::LengthLimitError>(&e) => {
                Err(self.too_large(source))
            }
            Err(e) if caused_by::<tower_http::timeout::TimeoutError>(&e) => {
                tracing::info!(source = %source.name, "Webhook body stopped arriving; answered 408.");
                self.metrics.request(&source.name, Outcome::Timeout);
                Err(reply(
                    StatusCode::REQUEST_TIMEOUT,
                    "the body stopped arriving".into(),
                ))
            }
            Err(e) => {
                tracing::info!(source = %source.name, error = %e, "Webhook body could not be read.");
                self.metrics.request(&source.name, Outcome::BadRequest);
                Err(reply(
                    StatusCode::BAD_REQUEST,
                    format!("the body could not be read: {e}"),
                ))
            }
        }
    }

    /// Splits, publishes and answers: 200 once every message is confirmed, else 503.
    async fn queue(&self, source: &Source, body: Bytes, received: u64) -> Response {
        let ranges = match body::split(&body) {
            Ok(ranges) => ranges,
            Err(e) => return self.bad_request(source, e),
        };
        let messages = ranges.len();
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_timestamp(received)
            .with_headers(source.headers.clone());
        let batch = Batch {
            body,
            ranges,
            properties,
        };
        match self.publisher.publish(batch).await {
            Ok(()) => {
                tracing::debug!(source = %source.name, messages, "Webhook queued.");
                self.metrics.request(&source.name, Outcome::Queued);
                self.metrics.queued(&source.name, messages as u64);
                reply_json(StatusCode::OK, &serde_json::json!({ "queued": messages }))
            }
            Err(e) => {
                tracing::warn!(source = %source.name, messages, error = %e, "Webhook not queued; answered 503 so that the sender retries.");
                self.metrics.request(&source.name, Outcome::Unavailable);
                self.unavailable(e.to_string())
            }
        }
    }

    fn unauthorized(&self, source: &Source, e: SignatureError) -> Response {
        tracing::warn!(source = %source.name, reason = e.code(), error = %e, "Webhook refused: its signature does not hold.");
        self.metrics.request(&source.name, Outcome::Unauthorized);
        reply(StatusCode::UNAUTHORIZED, e.to_string())
    }

    fn bad_request(&self, source: &Source, e: BodyError) -> Response {
        tracing::info!(source = %source.name, error = %e, "Webhook refused: not a JSON object or an array of objects.");
        self.metrics.request(&source.name, Outcome::BadRequest);
        reply(StatusCode::BAD_REQUEST, e.to_string())
    }

    fn too_large(&self, source: &Source) -> Response {
        tracing::info!(source = %source.name, max_body_bytes = self.max_body_bytes, "Webhook refused: body over intake.max_body_bytes.");
        self.metrics.request(&source.name, Outcome::TooLarge);
        reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {} bytes", self.max_body_bytes),
        )
    }

    fn unavailable(&self, why: String) -> Response {
        let mut response = reply(StatusCode::SERVICE_UNAVAILABLE, why);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, self.retry_after.clone());
        response
    }

    fn not_found(&self, source: Option<&Source>) -> Response {
        self.metrics
            .request(source.map_or(NO_SOURCE, |s| &s.name), Outcome::NotFound);
        reply(StatusCode::NOT_FOUND, "no such webhook".into())
    }
}

/// The intake's HTTP service: the routes inside the timeouts and the concurrency limit.
pub fn service(
    app: Arc<App>,
    intake: &config::Intake,
) -> impl tower::Service<
    Request<hyper::body::Incoming>,
    Response = Response,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    let metrics = app.metrics.clone();
    let retry_after = app.retry_after.clone();
    let router = Router::new()
        .route("/webhooks/{source}", post(jebbit))
        .route("/webhooks/{source}/{token}", post(joturl))
        .fallback(not_found)
        .with_state(app);
    let overloaded = move |_: BoxError| {
        let metrics = metrics.clone();
        let retry_after = retry_after.clone();
        async move {
            metrics.request(NO_SOURCE, Outcome::Unavailable);
            let mut response = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests at once".into(),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after);
            response
        }
    };
    ServiceBuilder::new()
        .layer(HandleErrorLayer::new(overloaded))
        .load_shed()
        .concurrency_limit(intake.max_concurrent_requests)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            intake.request_timeout(),
        ))
        .layer(RequestBodyTimeoutLayer::new(intake.body_read_timeout()))
        .service(router)
}

async fn jebbit(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = now();
    let Some(source) = app.source(&name, SourceKind::Jebbit) else {
        return app.not_found(None);
    };
    let Some(header) = headers.get(signature::HEADER) else {
        return app.unauthorized(source, SignatureError::Missing);
    };
    let Ok(header) = header.to_str() else {
        return app.unauthorized(source, SignatureError::Malformed("not visible ASCII"));
    };
    // Before the body is read: a request that cannot be genuine costs nothing more.
    let signature = match Signature::parse(header)
        .and_then(|s| s.check_time(received as i64, app.tolerance).map(|()| s))
    {
        Ok(signature) => signature,
        Err(e) => return app.unauthorized(source, e),
    };
    let body = match app.read_body(source, &headers, body).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    if let Err(e) = signature.verify(&body, source.config.secrets()) {
        return app.unauthorized(source, e);
    }
    if headers.contains_key(signature::TEST_HEADER) && !source.config.forward_tests {
        if let Err(e) = body::split(&body) {
            return app.bad_request(source, e);
        }
        tracing::info!(source = %source.name, "Jebbit test webhook verified; answered 200, not queued.");
        app.metrics.request(&source.name, Outcome::Test);
        return reply_json(StatusCode::OK, &serde_json::json!({ "test": true }));
    }
    app.queue(source, body, received).await
}

async fn joturl(
    State(app): State<Arc<App>>,
    Path((name, token)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = now();
    let Some(source) = app.source(&name, SourceKind::Joturl) else {
        return app.not_found(None);
    };
    if !token_matches(&token, source.config.secrets()) {
        // The token itself stays out of the log.
        tracing::warn!(source = %source.name, "Webhook refused: wrong token in the URL (answered 404).");
        return app.not_found(Some(source));
    }
    let body = match app.read_body(source, &headers, body).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    app.queue(source, body, received).await
}

async fn not_found(State(app): State<Arc<App>>) -> Response {
    app.not_found(None)
}

/// Whether `token` equals one of `secrets`, comparing each in constant time (for equal
/// lengths) and all of them whatever the first gives.
fn token_matches<'s>(token: &str, secrets: impl IntoIterator<Item = &'s [u8]>) -> bool {
    let mut matched = subtle::Choice::from(0);
    for secret in secrets {
        matched |= token.as_bytes().ct_eq(secret);
    }
    matched.into()
}

/// Seconds since 1970: the messages' AMQP timestamp and the signature's reference time.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `T` is somewhere in the error's chain of sources.
fn caused_by<T: StdError + 'static>(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<T>() {
            return true;
        }
        cause = c.source();
    }
    false
}

fn reply(status: StatusCode, error: String) -> Response {
    reply_json(status, &serde_json::json!({ "error": error }))
}

fn reply_json(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_the_current_or_the_previous_secret_exactly() {
        let secrets = [b"s3cr3t-token".as_slice(), b"old-token".as_slice()];
        assert!(token_matches("s3cr3t-token", secrets));
        assert!(token_matches("old-token", secrets));
        for wrong in ["", "s3cr3t-toke", "s3cr3t-token!", "S3CR3T-TOKEN", "old"] {
            assert!(!token_matches(wrong, secrets), "{wrong}");
        }
        assert!(!token_matches("", []), "no secret, no match");
    }
}

//! A fake of Jebbit's Integrations API and of its webhook sender, written from Jebbit's
//! published description (not from the client under test): the client-credentials token
//! endpoint, `/api/v1/self`, integrations CRUD, the test submission and historic
//! backfills. Test submissions and backfills POST correctly signed bodies to the
//! integration's endpoint, i.e. to the real intake under test.
//!
//! Self-contained (it uses no other test module) so that it can move into a shared test
//! kit as it is.
// Handlers' helpers return the early answer as their error; its size costs nothing here.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::task::JoinHandle;

const MEDIA_TYPE: &str = "application/vnd.api+json";
const ALL_SCOPES: [&str; 3] = ["read:business", "read:integration", "write:integration"];

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct Options {
    pub client_id: String,
    pub client_secret: String,
    /// The scopes issued tokens carry.
    pub scopes: Vec<String>,
    pub expires_in: u64,
    pub business_id: String,
    pub business_name: String,
    /// A token of several businesses: calls without `x-jebbit-business: <business_id>`
    /// answer 401.
    pub multi_business: bool,
    /// How many past sessions a backfill re-sends.
    pub backfill_sessions: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            client_id: "fake-client-id".into(),
            client_secret: format!("fake-client-secret-{}", random_string(24)),
            scopes: ALL_SCOPES.iter().map(|s| s.to_string()).collect(),
            expires_in: 86400,
            business_id: "bTUIhsye".into(),
            business_name: "Fake Business".into(),
            multi_business: false,
            backfill_sessions: 5,
        }
    }
}

/// One webhook the fake sent to an endpoint, and what the endpoint answered.
#[derive(Debug, Clone)]
pub struct Sent {
    pub endpoint: String,
    pub test: bool,
    pub body: Vec<u8>,
    /// `None`: the endpoint could not be reached.
    pub status: Option<u16>,
}

#[derive(Default)]
struct Store {
    /// Issued tokens and their scopes.
    tokens: HashMap<String, Vec<String>>,
    integrations: BTreeMap<u64, Value>,
    secrets: BTreeMap<u64, String>,
    /// Backfill id → (integration id, status).
    backfills: BTreeMap<u64, (u64, String)>,
    sent: Vec<Sent>,
    next_id: u64,
}

struct Fake {
    options: Options,
    store: Mutex<Store>,
    token_requests: AtomicUsize,
    api_requests: AtomicUsize,
    /// Answer 503 to this many API calls before answering normally.
    fail_next: AtomicUsize,
    http: reqwest::Client,
}

/// The running fake: one base URL for both the API and the token endpoint.
pub struct FakeJebbit {
    pub addr: SocketAddr,
    fake: Arc<Fake>,
    _server: JoinHandle<()>,
}

impl FakeJebbit {
    pub async fn start(options: Options) -> FakeJebbit {
        // rustls (reqwest's TLS) needs a process-wide crypto provider, even for plain http.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let fake = Arc::new(Fake {
            options,
            store: Mutex::new(Store {
                next_id: 1000,
                ..Store::default()
            }),
            token_requests: AtomicUsize::new(0),
            api_requests: AtomicUsize::new(0),
            fail_next: AtomicUsize::new(0),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        });
        let app = Router::new()
            .route("/oauth/token", post(token))
            .route("/api/v1/self", get(business))
            .route("/api/v1/integrations", get(list).post(create))
            .route(
                "/api/v1/integrations/{id}",
                get(read).patch(update).delete(delete),
            )
            .route("/api/v1/integrations/{id}/test", post(test))
            .route("/api/v1/integration_historic_backfills", post(backfill))
            .route(
                "/api/v1/integration_historic_backfills/{id}",
                get(backfill_status),
            )
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeJebbit {
            addr,
            fake,
            _server: server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn options(&self) -> &Options {
        &self.fake.options
    }

    /// Every token issued so far.
    pub fn tokens(&self) -> Vec<String> {
        self.fake
            .store
            .lock()
            .unwrap()
            .tokens
            .keys()
            .cloned()
            .collect()
    }

    pub fn token_requests(&self) -> usize {
        self.fake.token_requests.load(Ordering::SeqCst)
    }

    pub fn api_requests(&self) -> usize {
        self.fake.api_requests.load(Ordering::SeqCst)
    }

    /// The `shared_secret` of every integration created.
    pub fn secrets(&self) -> Vec<String> {
        self.fake
            .store
            .lock()
            .unwrap()
            .secrets
            .values()
            .cloned()
            .collect()
    }

    /// The integrations as the API would list them (with `id`).
    pub fn integrations(&self) -> Vec<Value> {
        let store = self.fake.store.lock().unwrap();
        store
            .integrations
            .iter()
            .map(|(id, attributes)| json!({"id": id.to_string(), "attributes": attributes}))
            .collect()
    }

    /// The webhooks sent so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.fake.store.lock().unwrap().sent.clone()
    }

    /// The next `n` API calls answer 503.
    pub fn fail_next(&self, n: usize) {
        self.fake.fail_next.store(n, Ordering::SeqCst);
    }
}

/// `n` characters of `[A-Za-z0-9]`, from the operating system's random source.
pub fn random_string(n: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).unwrap();
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

/// `t=<now>,v1=<base64 HMAC-SHA256(secret, "<t>.<body>")>`, as Jebbit signs webhooks.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let v1 = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("t={t},v1={v1}")
}

fn api_error(status: StatusCode, title: &str, detail: &str, pointer: Option<&str>) -> Response {
    let mut error =
        json!({"status": status.as_u16().to_string(), "title": title, "detail": detail});
    if let Some(p) = pointer {
        error["source"] = json!({ "pointer": p });
    }
    (
        status,
        [("content-type", MEDIA_TYPE)],
        json!({ "errors": [error] }).to_string(),
    )
        .into_response()
}

fn document(status: StatusCode, data: Value) -> Response {
    (
        status,
        [("content-type", MEDIA_TYPE)],
        json!({ "data": data }).to_string(),
    )
        .into_response()
}

fn integration(id: u64, attributes: &Value) -> Value {
    json!({"id": id.to_string(), "type": "integrations", "attributes": attributes})
}

impl Fake {
    /// Checks the bearer token, its scope and the business header; `Err` is the answer.
    fn authorize(&self, headers: &HeaderMap, scope: &str) -> Result<(), Response> {
        self.api_requests.fetch_add(1, Ordering::SeqCst);
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "try again",
                None,
            ));
        }
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let scopes = token.and_then(|t| self.store.lock().unwrap().tokens.get(t).cloned());
        let Some(scopes) = scopes else {
            return Err(api_error(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "invalid token",
                None,
            ));
        };
        if self.options.multi_business
            && headers
                .get("x-jebbit-business")
                .and_then(|v| v.to_str().ok())
                != Some(&self.options.business_id)
        {
            return Err(api_error(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "the token covers several businesses: name one",
                None,
            ));
        }
        if !scopes.iter().any(|s| s == scope) {
            return Err(api_error(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "insufficient scope",
                None,
            ));
        }
        Ok(())
    }

    /// Reads a JSON:API request body; `Err` is the answer.
    fn body(&self, headers: &HeaderMap, body: &[u8]) -> Result<Value, Response> {
        let media_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !media_type.starts_with(MEDIA_TYPE) {
            return Err(api_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported Media Type",
                "use application/vnd.api+json",
                None,
            ));
        }
        serde_json::from_slice(body)
            .map_err(|_| api_error(StatusCode::BAD_REQUEST, "Bad Request", "not JSON", None))
    }

    /// POSTs `body`, signed with `secret`, to `endpoint`; records what happened.
    async fn send(&self, endpoint: &str, secret: &str, body: Vec<u8>, test: bool) {
        let mut request = self
            .http
            .post(endpoint)
            .header("content-type", "application/json")
            .header("x-jebbit-signature", signature(secret, &body))
            .body(body.clone());
        if test {
            request = request.header("x-jebbit-test", "true");
        }
        let status = request.send().await.ok().map(|r| r.status().as_u16());
        self.store.lock().unwrap().sent.push(Sent {
            endpoint: endpoint.to_owned(),
            test,
            body,
            status,
        });
    }
}

async fn token(State(fake): State<Arc<Fake>>, body: Bytes) -> Response {
    fake.token_requests.fetch_add(1, Ordering::SeqCst);
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let o = &fake.options;
    if v["grant_type"] != "client_credentials" || v["audience"] != "public-api" {
        let e = json!({"error": "invalid_request", "error_description": "grant_type client_credentials and audience public-api are required"});
        return (StatusCode::BAD_REQUEST, e.to_string()).into_response();
    }
    if v["client_id"] != o.client_id.as_str() || v["client_secret"] != o.client_secret.as_str() {
        let e = json!({"error": "access_denied", "error_description": "Unauthorized"});
        return (StatusCode::UNAUTHORIZED, e.to_string()).into_response();
    }
    let token = format!("fake-jwt.{}", random_string(40));
    fake.store
        .lock()
        .unwrap()
        .tokens
        .insert(token.clone(), o.scopes.clone());
    let answer = json!({
        "access_token": token,
        "expires_in": o.expires_in,
        "token_type": "Bearer",
        "scope": o.scopes.join(" "),
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        answer.to_string(),
    )
        .into_response()
}

async fn business(State(fake): State<Arc<Fake>>, headers: HeaderMap) -> Answer {
    fake.authorize(&headers, "read:business")?;
    let o = &fake.options;
    Ok(document(
        StatusCode::OK,
        json!({"id": o.business_id, "type": "businesses", "attributes": {"name": o.business_name}}),
    ))
}

async fn list(State(fake): State<Arc<Fake>>, headers: HeaderMap) -> Answer {
    fake.authorize(&headers, "read:integration")?;
    let store = fake.store.lock().unwrap();
    let data: Vec<Value> = store
        .integrations
        .iter()
        .map(|(id, a)| integration(*id, a))
        .collect();
    Ok(document(StatusCode::OK, Value::Array(data)))
}

/// Checks and applies `attributes` over `current`; `Err` is the answer.
fn apply(current: &mut Value, attributes: &Value) -> Result<(), Response> {
    let Some(attributes) = attributes.as_object() else {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "data.attributes is required",
            Some("/data/attributes"),
        ));
    };
    if let Some(region) = attributes.get("region")
        && region != "us"
        && region != "eu"
    {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "Invalid Attribute",
            "must be a valid region (us|eu)",
            Some("/data/attributes/region"),
        ));
    }
    for (k, v) in attributes {
        if k != "shared_secret" {
            current[k] = v.clone();
        }
    }
    Ok(())
}

async fn create(State(fake): State<Arc<Fake>>, headers: HeaderMap, body: Bytes) -> Answer {
    fake.authorize(&headers, "write:integration")?;
    let request = fake.body(&headers, &body)?;
    let mut attributes = json!({
        "endpoint": null, "region": "us", "is_active": true, "include_uids": false,
        "require_opt_in": null, "include_mapped_attributes": null,
        "service_name": "webhooks_standard", "additional_options": {"hash_pii": false},
        "created_at": "2026-12-06T10:00:00.000Z", "updated_at": "2026-12-06T10:00:00.000Z",
    });
    apply(&mut attributes, &request["data"]["attributes"])?;
    if !attributes["endpoint"].is_string() {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "Invalid Attribute",
            "can't be blank",
            Some("/data/attributes/endpoint"),
        ));
    }
    let secret = random_string(34);
    let mut store = fake.store.lock().unwrap();
    store.next_id += 1;
    let id = store.next_id;
    store.integrations.insert(id, attributes.clone());
    store.secrets.insert(id, secret.clone());
    attributes["shared_secret"] = json!(secret);
    Ok(document(StatusCode::CREATED, integration(id, &attributes)))
}

/// A handler's answer: `Err` for an early one (unauthorized, bad request, not found).
type Answer = Result<Response, Response>;

fn parse_id(id: &str) -> Option<u64> {
    id.parse().ok()
}

fn not_found() -> Response {
    api_error(StatusCode::NOT_FOUND, "Not Found", "record not found", None)
}

async fn read(State(fake): State<Arc<Fake>>, Path(id): Path<String>, headers: HeaderMap) -> Answer {
    fake.authorize(&headers, "read:integration")?;
    let store = fake.store.lock().unwrap();
    match parse_id(&id).and_then(|id| Some((id, store.integrations.get(&id)?))) {
        Some((id, a)) => Ok(document(StatusCode::OK, integration(id, a))),
        None => Err(not_found()),
    }
}

async fn update(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    fake.authorize(&headers, "write:integration")?;
    let request = fake.body(&headers, &body)?;
    let mut store = fake.store.lock().unwrap();
    let Some((id, current)) =
        parse_id(&id).and_then(|id| Some((id, store.integrations.get_mut(&id)?)))
    else {
        return Err(not_found());
    };
    let mut changed = current.clone();
    apply(&mut changed, &request["data"]["attributes"])?;
    *current = changed.clone();
    // Whether Jebbit shows the secret again after creation is not documented: it does not.
    Ok(document(StatusCode::OK, integration(id, &changed)))
}

async fn delete(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Answer {
    fake.authorize(&headers, "write:integration")?;
    let mut store = fake.store.lock().unwrap();
    match parse_id(&id).and_then(|id| store.integrations.remove(&id)) {
        Some(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        None => Err(not_found()),
    }
}

/// The endpoint and secret of an active integration; `Err` is the answer.
fn target(fake: &Fake, id: u64) -> Result<(String, String), Response> {
    let store = fake.store.lock().unwrap();
    let Some(a) = store.integrations.get(&id) else {
        return Err(not_found());
    };
    if a["is_active"] != true {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "integration is inactive",
            None,
        ));
    }
    Ok((
        a["endpoint"].as_str().unwrap_or_default().to_owned(),
        store.secrets[&id].clone(),
    ))
}

async fn test(State(fake): State<Arc<Fake>>, Path(id): Path<String>, headers: HeaderMap) -> Answer {
    fake.authorize(&headers, "write:integration")?;
    let Some(id) = parse_id(&id) else {
        return Err(not_found());
    };
    let (endpoint, secret) = target(&fake, id)?;
    let payload = json!({
        "data": {"email": "test@example.com", "test_attribute": "attribute_value",
                 "opt_in": "true", "outcome": "example_outcome"},
        "event": {"event_number": 0},
    })
    .to_string();
    // Jebbit answers, then sends the webhook.
    tokio::spawn({
        let fake = fake.clone();
        let body = payload.clone().into_bytes();
        async move { fake.send(&endpoint, &secret, body, true).await }
    });
    Ok((StatusCode::OK, json!([payload]).to_string()).into_response())
}

async fn backfill(State(fake): State<Arc<Fake>>, headers: HeaderMap, body: Bytes) -> Answer {
    fake.authorize(&headers, "write:integration")?;
    let request = fake.body(&headers, &body)?;
    // A JSON:API envelope or a flat object: only a third-party copy documents it.
    let named = request["data"]["attributes"]["integration_id"].clone();
    let named = if named.is_null() {
        request["integration_id"].clone()
    } else {
        named
    };
    let id = match &named {
        Value::String(s) => parse_id(s),
        Value::Number(n) => n.as_u64(),
        _ => None,
    };
    let Some(integration_id) = id else {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "Invalid Attribute",
            "integration_id is required",
            Some("/data/attributes/integration_id"),
        ));
    };
    let (endpoint, secret) = target(&fake, integration_id)?;
    let backfill_id = {
        let mut store = fake.store.lock().unwrap();
        if store
            .backfills
            .values()
            .any(|(i, status)| *i == integration_id && status != "completed")
        {
            return Err(api_error(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "a backfill is already processing",
                None,
            ));
        }
        store.next_id += 1;
        let id = store.next_id;
        store
            .backfills
            .insert(id, (integration_id, "received".to_owned()));
        id
    };
    tokio::spawn({
        let fake = fake.clone();
        async move {
            let set = |status: &str| {
                fake.store
                    .lock()
                    .unwrap()
                    .backfills
                    .insert(backfill_id, (integration_id, status.to_owned()));
            };
            set("processing");
            for i in 0..fake.options.backfill_sessions {
                let body = json!({
                    "session_id": format!("backfill-{backfill_id}-{i}"),
                    "data": {"email": format!("past.{i}@example.com"), "opt_in": true,
                             "favourite_colour": "teal"},
                    "event": {"event_number": i},
                })
                .to_string()
                .into_bytes();
                fake.send(&endpoint, &secret, body, false).await;
            }
            set("completed");
        }
    });
    Ok(document(
        StatusCode::CREATED,
        json!({"id": backfill_id.to_string(), "type": "integration_historic_backfills",
               "attributes": {"integration_id": integration_id.to_string(), "status": "received"}}),
    ))
}

async fn backfill_status(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Answer {
    fake.authorize(&headers, "read:integration")?;
    let store = fake.store.lock().unwrap();
    match parse_id(&id).and_then(|id| Some((id, store.backfills.get(&id)?))) {
        Some((id, (integration_id, status))) => Ok(document(
            StatusCode::OK,
            json!({"id": id.to_string(), "type": "integration_historic_backfills",
                   "attributes": {"integration_id": integration_id.to_string(), "status": status}}),
        )),
        None => Err(not_found()),
    }
}

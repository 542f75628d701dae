//! Jebbit's Integrations API, as the onboarding commands use it: a client-credentials
//! token, the business of the credentials, `webhooks_standard` integrations (list, create,
//! change, delete, test submission) and historic backfills.
//!
//! Building requests, reading answers and explaining errors are plain functions (tested at
//! the bottom); only [`Client`] does I/O: it fetches and reuses the token, sends the
//! business header, and retries 5xx answers with backoff. No secret (client secret, token,
//! `shared_secret`) is ever part of an error message or a `Debug` output: they travel as
//! [`SecretString`].

use std::fmt;
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, Url};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use crate::backoff::RetryPolicy;

/// JSON:API's media type, which Jebbit's API speaks.
pub const MEDIA_TYPE: &str = "application/vnd.api+json";
/// The only integration kind the intake understands.
pub const SERVICE_NAME: &str = "webhooks_standard";
/// The scopes the calls need (singular, as Jebbit names them).
pub const READ_BUSINESS: &str = "read:business";
pub const READ_INTEGRATION: &str = "read:integration";
pub const WRITE_INTEGRATION: &str = "write:integration";
/// A token is renewed once this share of its lifetime has passed.
const RENEW_AT: f64 = 0.9;

/// How the commands authenticate.
#[derive(Debug)]
pub enum Credentials {
    /// OAuth2 client credentials, exchanged for a token at `{auth_url}/oauth/token`.
    Client { id: String, secret: SecretString },
    /// A ready bearer token, used as is until Jebbit refuses it.
    Token(SecretString),
}

/// Where Jebbit is and who is asking.
#[derive(Debug)]
pub struct Settings {
    pub api_url: Url,
    pub auth_url: Url,
    /// Sent as `x-jebbit-business` on every call when set.
    pub business_id: Option<String>,
    pub credentials: Credentials,
    /// Attempts per call when Jebbit answers 5xx or cannot be reached.
    pub attempts: u32,
    pub retry: RetryPolicy,
    pub timeout: Duration,
}

/// One call of the API: what it is (for messages), what it needs (for 403s), whether a
/// 5xx may be retried.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub scope: &'static str,
}

impl Call {
    fn new(method: Method, path: impl Into<String>, scope: &'static str) -> Call {
        Call {
            method,
            path: path.into(),
            scope,
        }
    }

    /// Whether an answer with `status` is worth another attempt. Reading, changing and
    /// deleting are idempotent: any 5xx (or 429) is retried. A POST that creates something
    /// (an integration, a test submission, a backfill) is retried only when the answer
    /// says it never reached the application (429, 502, 503, 504), so that a 500 after
    /// the fact cannot create a second integration.
    pub fn retryable(&self, status: u16) -> bool {
        match status {
            429 | 502..=504 => true,
            500..=599 => self.method != Method::POST,
            _ => false,
        }
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// Why a call failed, in one line an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "Jebbit's identity provider refused the client credentials ({status}): check JEBBIT_CLIENT_ID and JEBBIT_CLIENT_SECRET{detail}."
    )]
    Credentials { status: u16, detail: String },
    #[error(
        "Jebbit answered 401 to {call}: the token is invalid or expired, or it covers several businesses and needs JEBBIT_BUSINESS_ID{detail}."
    )]
    Unauthorized { call: String, detail: String },
    #[error(
        "Jebbit answered 403 to {call}: the credentials lack the scope `{scope}` (Jebbit's customer success team grants it), or the business header names a business that is not theirs{detail}."
    )]
    Forbidden {
        call: String,
        scope: &'static str,
        detail: String,
    },
    #[error("Jebbit refused {call} (400): {message}.")]
    BadRequest { call: String, message: String },
    #[error(
        "Jebbit has no such {what} (404 on {call}): list them with `segment-bridge jebbit list`."
    )]
    NotFound { call: String, what: &'static str },
    #[error("Jebbit answered {status} to {call} ({attempts} attempts): {message}.")]
    Status {
        call: String,
        status: u16,
        attempts: u32,
        message: String,
    },
    #[error("cannot reach Jebbit for {call} ({attempts} attempts): {error}.")]
    Transport {
        call: String,
        attempts: u32,
        error: String,
    },
    #[error("Jebbit's answer to {call} is not what its documentation describes: {problem}.")]
    Answer { call: String, problem: String },
}

/// The business the credentials belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Business {
    pub id: String,
    pub name: String,
}

/// An integration as the commands show it: never its `shared_secret`.
#[derive(Debug, Clone, PartialEq)]
pub struct Integration {
    pub id: String,
    pub endpoint: String,
    pub region: String,
    pub active: bool,
    pub service_name: String,
    pub hash_pii: Option<bool>,
    pub require_opt_in: Option<bool>,
    pub include_mapped_attributes: Option<bool>,
}

impl fmt::Display for Integration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<bool>| v.map_or("-".to_owned(), |b| b.to_string());
        write!(
            f,
            "{}  {}  region={}  active={}  service={}  hash_pii={}  require_opt_in={}  include_mapped_attributes={}",
            self.id,
            self.endpoint,
            self.region,
            self.active,
            self.service_name,
            opt(self.hash_pii),
            opt(self.require_opt_in),
            opt(self.include_mapped_attributes),
        )
    }
}

/// What an integration should be: the intake source's URL, region and mapping options.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub endpoint: String,
    pub region: String,
    pub hash_pii: bool,
    pub require_opt_in: bool,
    pub include_mapped_attributes: bool,
}

/// A historic backfill and where it stands (`received`, `processing`, then done).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backfill {
    pub id: String,
    pub status: String,
    pub integration_id: String,
}

// ---- Requests (pure) -------------------------------------------------------------------

/// The client-credentials grant's body.
pub fn token_request(client_id: &str, client_secret: &SecretString) -> Value {
    json!({
        "client_id": client_id,
        "client_secret": client_secret.expose_secret(),
        "audience": "public-api",
        "grant_type": "client_credentials",
    })
}

/// The body that creates (or, with PATCH, changes) a `webhooks_standard` integration.
pub fn integration_request(spec: &Spec, id: Option<&str>) -> Value {
    let mut data = json!({
        "type": "integrations",
        "attributes": {
            "service_name": SERVICE_NAME,
            "endpoint": spec.endpoint,
            "region": spec.region,
            "is_active": true,
            "require_opt_in": spec.require_opt_in,
            "include_mapped_attributes": spec.include_mapped_attributes,
            "additional_options": {"hash_pii": spec.hash_pii},
        }
    });
    if let Some(id) = id {
        data["id"] = json!(id);
    }
    json!({ "data": data })
}

/// The body that switches an integration on or off.
pub fn active_request(id: &str, active: bool) -> Value {
    json!({"data": {"id": id, "type": "integrations", "attributes": {"is_active": active}}})
}

/// The body that asks for a historic backfill of one integration.
pub fn backfill_request(integration_id: &str) -> Value {
    json!({"data": {
        "type": "integration_historic_backfills",
        "attributes": {"integration_id": integration_id},
    }})
}

// ---- Answers (pure) --------------------------------------------------------------------

/// The token and its lifetime.
pub fn parse_token(body: &[u8]) -> Result<(SecretString, Duration), String> {
    let v: Value = serde_json::from_slice(body).map_err(|_| "not JSON".to_owned())?;
    let token = v["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or("no `access_token`")?;
    // Jebbit sets it per client; without it, assume a short life rather than a long one.
    let expires_in = v["expires_in"].as_u64().unwrap_or(300);
    Ok((SecretString::from(token), Duration::from_secs(expires_in)))
}

/// When a token that lives `lifetime` from `issued` should be renewed.
pub fn renew_at(issued: Instant, lifetime: Duration) -> Instant {
    issued + lifetime.mul_f64(RENEW_AT)
}

fn parse_json(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|_| "not JSON".to_owned())
}

fn string_at(v: &Value, key: &str) -> Option<String> {
    match &v[key] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `GET /api/v1/self`.
pub fn parse_business(body: &[u8]) -> Result<Business, String> {
    let v = parse_json(body)?;
    let data = &v["data"];
    Ok(Business {
        id: string_at(data, "id").ok_or("no `data.id`")?,
        name: data["attributes"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    })
}

/// One integration resource (`{"id", "type", "attributes"}`).
pub fn parse_integration(data: &Value) -> Result<Integration, String> {
    let a = &data["attributes"];
    Ok(Integration {
        id: string_at(data, "id").ok_or("an integration without `id`")?,
        endpoint: a["endpoint"].as_str().unwrap_or_default().to_owned(),
        region: a["region"].as_str().unwrap_or("us").to_owned(),
        active: a["is_active"].as_bool().unwrap_or(false),
        service_name: a["service_name"].as_str().unwrap_or_default().to_owned(),
        hash_pii: a["additional_options"]["hash_pii"].as_bool(),
        require_opt_in: a["require_opt_in"].as_bool(),
        include_mapped_attributes: a["include_mapped_attributes"].as_bool(),
    })
}

/// `GET /api/v1/integrations`: `data` is a list.
pub fn parse_integrations(body: &[u8]) -> Result<Vec<Integration>, String> {
    let v = parse_json(body)?;
    v["data"]
        .as_array()
        .ok_or("`data` is not a list")?
        .iter()
        .map(parse_integration)
        .collect()
}

/// A created or changed integration, and its `shared_secret` when the answer carries one
/// (it does on creation; whether it does afterwards is not documented).
pub fn parse_saved(body: &[u8]) -> Result<(Integration, Option<SecretString>), String> {
    let v = parse_json(body)?;
    let integration = parse_integration(&v["data"])?;
    let secret = v["data"]["attributes"]["shared_secret"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(SecretString::from);
    Ok((integration, secret))
}

/// A backfill resource.
pub fn parse_backfill(body: &[u8]) -> Result<Backfill, String> {
    let v = parse_json(body)?;
    let data = &v["data"];
    let a = &data["attributes"];
    Ok(Backfill {
        id: string_at(data, "id").ok_or("a backfill without `id`")?,
        status: a["status"].as_str().unwrap_or("unknown").to_owned(),
        integration_id: string_at(a, "integration_id").unwrap_or_default(),
    })
}

/// The message of an error answer: JSON:API `errors[].detail` (or `title`), an OAuth
/// `error_description`, a `message`, else the start of the body.
pub fn error_message(body: &[u8]) -> String {
    let text = || {
        let t = String::from_utf8_lossy(body);
        let t = t.trim();
        if t.is_empty() {
            "no message".to_owned()
        } else {
            t.chars().take(200).collect()
        }
    };
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return text();
    };
    if let Some(errors) = v["errors"].as_array() {
        let messages: Vec<String> = errors
            .iter()
            .filter_map(|e| {
                let detail = e["detail"].as_str().or(e["title"].as_str())?;
                Some(match e["source"]["pointer"].as_str() {
                    Some(p) => format!("{} {detail}", p.rsplit('/').next().unwrap_or(p)),
                    None => detail.to_owned(),
                })
            })
            .collect();
        if !messages.is_empty() {
            return messages.join("; ");
        }
    }
    for key in ["error_description", "message", "error"] {
        if let Some(m) = v[key].as_str() {
            return m.to_owned();
        }
    }
    text()
}

/// An error answer to `call`, explained; `attempts` were made.
pub fn explain(call: &Call, status: u16, body: &[u8], attempts: u32) -> ApiError {
    let message = error_message(body);
    let detail = if message == "no message" {
        String::new()
    } else {
        format!(" (Jebbit says: {message})")
    };
    let call_text = call.to_string();
    match status {
        400 | 422 => ApiError::BadRequest {
            call: call_text,
            message,
        },
        401 => ApiError::Unauthorized {
            call: call_text,
            detail,
        },
        403 => ApiError::Forbidden {
            call: call_text,
            scope: call.scope,
            detail,
        },
        404 => ApiError::NotFound {
            what: if call.path.contains("backfill") {
                "backfill"
            } else {
                "integration"
            },
            call: call_text,
        },
        _ => ApiError::Status {
            call: call_text,
            status,
            attempts,
            message,
        },
    }
}

// ---- The client (I/O) ------------------------------------------------------------------

struct Cached {
    token: SecretString,
    renew_at: Option<Instant>,
}

/// Jebbit's API for one process: one HTTP client, one token reused until shortly before
/// it expires.
pub struct Client {
    http: reqwest::Client,
    settings: Settings,
    token: tokio::sync::Mutex<Option<Cached>>,
}

impl Client {
    pub fn new(settings: Settings) -> reqwest::Result<Client> {
        Ok(Client {
            http: crate::segment::http_client(settings.timeout)?,
            settings,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The bearer token: the ready one, the cached one while it is fresh, else a new one.
    async fn token(&self) -> Result<SecretString, ApiError> {
        let (id, secret) = match &self.settings.credentials {
            Credentials::Token(token) => return Ok(token.clone()),
            Credentials::Client { id, secret } => (id, secret),
        };
        let mut cached = self.token.lock().await;
        if let Some(c) = cached.as_ref()
            && c.renew_at.is_none_or(|at| Instant::now() < at)
        {
            return Ok(c.token.clone());
        }
        let call = Call::new(Method::POST, "/oauth/token", "");
        let url = join(&self.settings.auth_url, "oauth/token");
        let body = token_request(id, secret);
        let issued = Instant::now();
        let (status, answer, attempts) = self
            .send(&call, url, Some(&body), None, "application/json")
            .await?;
        if !(200..300).contains(&status) {
            return Err(match status {
                400 | 401 | 403 => ApiError::Credentials {
                    status,
                    detail: match error_message(&answer).as_str() {
                        "no message" => String::new(),
                        m => format!(" (it says: {m})"),
                    },
                },
                _ => explain(&call, status, &answer, attempts),
            });
        }
        let (token, lifetime) = parse_token(&answer).map_err(|problem| ApiError::Answer {
            call: call.to_string(),
            problem,
        })?;
        *cached = Some(Cached {
            token: token.clone(),
            renew_at: Some(renew_at(issued, lifetime)),
        });
        Ok(token)
    }

    /// Sends one request, retrying 5xx answers and transport errors as [`Call::retryable`]
    /// says; returns the last status, body and the number of attempts.
    async fn send(
        &self,
        call: &Call,
        url: Url,
        body: Option<&Value>,
        token: Option<&SecretString>,
        media_type: &str,
    ) -> Result<(u16, Vec<u8>, u32), ApiError> {
        let mut backoff = self.settings.retry.backoff();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self
                .http
                .request(call.method.clone(), url.clone())
                .header(ACCEPT, media_type);
            if let Some(token) = token {
                let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose_secret()))
                    .map_err(|_| ApiError::Answer {
                        call: call.to_string(),
                        problem: "the token is not a valid header value".to_owned(),
                    })?;
                value.set_sensitive(true);
                request = request.header(AUTHORIZATION, value);
            }
            if let Some(business) = &self.settings.business_id {
                request = request.header("x-jebbit-business", business);
            }
            if let Some(body) = body {
                request = request
                    .header(CONTENT_TYPE, media_type)
                    .body(body.to_string());
            }
            let last = attempt >= self.settings.attempts.max(1);
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let answer = response.bytes().await.map(|b| b.to_vec());
                    match answer {
                        Ok(answer) if last || !call.retryable(status) => {
                            return Ok((status, answer, attempt));
                        }
                        Ok(_) => {
                            tracing::warn!(call = %call, status, attempt, "Jebbit answered with a server error; trying again.");
                        }
                        Err(e) if last => {
                            return Err(ApiError::Transport {
                                call: call.to_string(),
                                attempts: attempt,
                                error: crate::segment::error_chain(&e.without_url()),
                            });
                        }
                        Err(_) => {}
                    }
                }
                // The whole chain: reqwest's own message says only "error sending
                // request"; the cause (a name that does not resolve, a refused
                // connection, a certificate) is in its sources.
                Err(e) if last => {
                    return Err(ApiError::Transport {
                        call: call.to_string(),
                        attempts: attempt,
                        error: format!("{} ({url})", crate::segment::error_chain(&e.without_url())),
                    });
                }
                Err(e) => {
                    let error = crate::segment::error_chain(&e.without_url());
                    tracing::warn!(call = %call, attempt, error = %error, "Cannot reach Jebbit; trying again.");
                }
            }
            tokio::time::sleep(backoff.next_delay(None)).await;
        }
    }

    /// One API call; a 2xx answer's body, else the error explained.
    async fn api(&self, call: Call, body: Option<&Value>) -> Result<Vec<u8>, ApiError> {
        let token = self.token().await?;
        let url = join(&self.settings.api_url, call.path.trim_start_matches('/'));
        let (status, answer, attempts) = self
            .send(&call, url, body, Some(&token), MEDIA_TYPE)
            .await?;
        if (200..300).contains(&status) {
            Ok(answer)
        } else {
            Err(explain(&call, status, &answer, attempts))
        }
    }

    fn read<T>(call: &Call, parsed: Result<T, String>) -> Result<T, ApiError> {
        parsed.map_err(|problem| ApiError::Answer {
            call: call.to_string(),
            problem,
        })
    }

    /// `GET /api/v1/self`.
    pub async fn business(&self) -> Result<Business, ApiError> {
        let call = Call::new(Method::GET, "/api/v1/self", READ_BUSINESS);
        let body = self.api(call.clone(), None).await?;
        Self::read(&call, parse_business(&body))
    }

    /// `GET /api/v1/integrations`.
    pub async fn integrations(&self) -> Result<Vec<Integration>, ApiError> {
        let call = Call::new(Method::GET, "/api/v1/integrations", READ_INTEGRATION);
        let body = self.api(call.clone(), None).await?;
        Self::read(&call, parse_integrations(&body))
    }

    /// Creates the integration (`id` none) or changes it; returns it and the
    /// `shared_secret` when the answer carries one.
    pub async fn save(
        &self,
        spec: &Spec,
        id: Option<&str>,
    ) -> Result<(Integration, Option<SecretString>), ApiError> {
        let call = match id {
            None => Call::new(Method::POST, "/api/v1/integrations", WRITE_INTEGRATION),
            Some(id) => integration_call(Method::PATCH, id),
        };
        let body = self
            .api(call.clone(), Some(&integration_request(spec, id)))
            .await?;
        Self::read(&call, parse_saved(&body))
    }

    /// Switches an integration on or off.
    pub async fn set_active(&self, id: &str, active: bool) -> Result<Integration, ApiError> {
        let call = integration_call(Method::PATCH, id);
        let body = self
            .api(call.clone(), Some(&active_request(id, active)))
            .await?;
        Self::read(&call, parse_saved(&body).map(|(i, _)| i))
    }

    /// `DELETE /api/v1/integrations/{id}`.
    pub async fn delete(&self, id: &str) -> Result<(), ApiError> {
        let call = integration_call(Method::DELETE, id);
        self.api(call, None).await.map(drop)
    }

    /// `POST /api/v1/integrations/{id}/test`: Jebbit sends a signed test webhook.
    pub async fn test(&self, id: &str) -> Result<(), ApiError> {
        let call = Call::new(
            Method::POST,
            format!("/api/v1/integrations/{id}/test"),
            WRITE_INTEGRATION,
        );
        self.api(call, Some(&json!({}))).await.map(drop)
    }

    /// `POST /api/v1/integration_historic_backfills`.
    pub async fn backfill(&self, integration_id: &str) -> Result<Backfill, ApiError> {
        let call = Call::new(
            Method::POST,
            "/api/v1/integration_historic_backfills",
            WRITE_INTEGRATION,
        );
        let body = self
            .api(call.clone(), Some(&backfill_request(integration_id)))
            .await?;
        Self::read(&call, parse_backfill(&body))
    }

    /// `GET /api/v1/integration_historic_backfills/{id}`. Not in Jebbit's published
    /// table: the JSON:API convention for the resource the POST creates.
    pub async fn backfill_status(&self, id: &str) -> Result<Backfill, ApiError> {
        let call = Call::new(
            Method::GET,
            format!("/api/v1/integration_historic_backfills/{id}"),
            READ_INTEGRATION,
        );
        let body = self.api(call.clone(), None).await?;
        Self::read(&call, parse_backfill(&body))
    }
}

/// A call on the integration `id` (`/api/v1/integrations/{id}`).
fn integration_call(method: Method, id: &str) -> Call {
    Call::new(
        method,
        format!("/api/v1/integrations/{id}"),
        WRITE_INTEGRATION,
    )
}

/// `base` + `path`, keeping any path `base` already has (a test server's prefix).
fn join(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!("{}/{path}", base.path().trim_end_matches('/'));
    url.set_path(&joined);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: Method) -> Call {
        Call::new(method, "/api/v1/integrations", WRITE_INTEGRATION)
    }

    #[test]
    fn server_errors_are_retried_but_a_create_only_when_it_never_reached_the_application() {
        for (status, get, post) in [
            (200, false, false),
            (400, false, false),
            (401, false, false),
            (403, false, false),
            (404, false, false),
            (429, true, true),
            (500, true, false),
            (502, true, true),
            (503, true, true),
            (504, true, true),
        ] {
            assert_eq!(call(Method::GET).retryable(status), get, "GET {status}");
            assert_eq!(call(Method::PATCH).retryable(status), get, "PATCH {status}");
            assert_eq!(call(Method::POST).retryable(status), post, "POST {status}");
        }
    }

    #[test]
    fn each_error_is_one_line_that_names_the_call_and_what_to_do() {
        let c = call(Method::POST);
        let forbidden = explain(&c, 403, b"", 1).to_string();
        assert!(forbidden.contains("write:integration"), "{forbidden}");
        assert!(
            forbidden.contains("POST /api/v1/integrations"),
            "{forbidden}"
        );
        let refused = explain(
            &c,
            400,
            br#"{"errors":[{"detail":"must be a valid region (us|eu)","source":{"pointer":"/data/attributes/region"}}]}"#,
            1,
        )
        .to_string();
        assert!(
            refused.ends_with("(400): region must be a valid region (us|eu)."),
            "{refused}"
        );
        let unauthorized = explain(&c, 401, b"", 1).to_string();
        assert!(
            unauthorized.contains("JEBBIT_BUSINESS_ID"),
            "{unauthorized}"
        );
        let server = explain(&c, 503, b"<html>busy</html>", 4).to_string();
        assert!(
            server.contains("503") && server.contains("4 attempts"),
            "{server}"
        );
        for e in [forbidden, refused, unauthorized, server] {
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_created_integration_is_read_with_its_secret_apart() {
        let body = br#"{"data":{"id":"1234","type":"integrations","attributes":{
            "endpoint":"https://h/webhooks/jebbit_eu","region":"eu","is_active":true,
            "service_name":"webhooks_standard","require_opt_in":null,
            "include_mapped_attributes":true,"additional_options":{"hash_pii":true},
            "shared_secret":"abcdefghijklmnopqrstuvwxyz01234567"}}}"#;
        let (integration, secret) = parse_saved(body).unwrap();
        assert_eq!(integration.id, "1234");
        assert_eq!(integration.region, "eu");
        assert_eq!(integration.hash_pii, Some(true));
        assert_eq!(integration.require_opt_in, None);
        assert_eq!(
            secret.unwrap().expose_secret(),
            "abcdefghijklmnopqrstuvwxyz01234567"
        );
        let shown = format!("{integration} {integration:?}");
        assert!(!shown.contains("abcdefghij"), "{shown}");
    }

    #[test]
    fn requests_carry_the_spec_and_the_token_request_names_the_audience() {
        let spec = Spec {
            endpoint: "https://h/webhooks/s".into(),
            region: "eu".into(),
            hash_pii: true,
            require_opt_in: false,
            include_mapped_attributes: true,
        };
        let body = integration_request(&spec, None);
        let a = &body["data"]["attributes"];
        assert_eq!(a["endpoint"], "https://h/webhooks/s");
        assert_eq!(a["region"], "eu");
        assert_eq!(a["service_name"], SERVICE_NAME);
        assert_eq!(a["additional_options"]["hash_pii"], true);
        assert!(body["data"].get("id").is_none());
        assert_eq!(integration_request(&spec, Some("7"))["data"]["id"], "7");
        let token = token_request("id", &SecretString::from("s"));
        assert_eq!(token["audience"], "public-api");
        assert_eq!(token["grant_type"], "client_credentials");
    }

    #[test]
    fn a_token_is_renewed_at_ninety_percent_of_its_life() {
        let (token, life) =
            parse_token(br#"{"access_token":"jwt","expires_in":1000,"token_type":"Bearer"}"#)
                .unwrap();
        assert_eq!(token.expose_secret(), "jwt");
        let now = Instant::now();
        assert_eq!(renew_at(now, life), now + Duration::from_secs(900));
        assert!(parse_token(br#"{"expires_in":1}"#).is_err());
    }

    #[test]
    fn a_base_url_keeps_its_own_path() {
        let base: Url = "http://127.0.0.1:9/jebbit/".parse().unwrap();
        assert_eq!(
            join(&base, "api/v1/self").as_str(),
            "http://127.0.0.1:9/jebbit/api/v1/self"
        );
        let bare: Url = "https://api2.jebbit.com".parse().unwrap();
        assert_eq!(
            join(&bare, "oauth/token").as_str(),
            "https://api2.jebbit.com/oauth/token"
        );
    }
}

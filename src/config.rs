//! The configuration: `config.toml` layered under `SEGMENT_BRIDGE__SECTION__KEY`
//! environment variables, read into typed values and checked once at start-up.
//!
//! Every default is named here, in the `Default` impls. Write keys and the AMQP URL (which
//! holds the broker password) are [`SecretString`]s: `Debug` redacts them and nothing in
//! this crate prints them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::batch::{ENVELOPE_BYTES, SEGMENT_MAX_BATCH_BYTES, SEGMENT_MAX_BATCH_EVENTS};
use crate::domain::Region;
use crate::events::{self, MAX_EVENT_BYTES, MessageIdScheme};

/// The prefix of environment overrides: `SEGMENT_BRIDGE__AMQP__URL` sets `amqp.url`.
pub const ENV_PREFIX: &str = "SEGMENT_BRIDGE";
/// Read when `--config` is not given; it may be absent.
pub const DEFAULT_PATH: &str = "config.toml";
/// RabbitMQ closes a channel whose delivery stays unacknowledged this long (its default
/// `consumer_timeout`); a delivery must be handed back well before.
pub const RABBITMQ_ACK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub amqp: Amqp,
    pub segment: Segment,
    pub retry: Retry,
    pub mapping: Mapping,
    pub server: Server,
    pub shutdown: Shutdown,
    pub intake: Intake,
    /// Where the `jebbit` onboarding commands find Jebbit's API.
    pub jebbit: Jebbit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Amqp {
    /// The broker, as an AMQP URI, or the nodes of a cluster: a TOML array of URIs, or (from
    /// the environment) URIs separated by commas. Each connection goes to the first node,
    /// in a shuffled order, that accepts it. Secret: it usually holds a password. Read the
    /// nodes with [`Amqp::urls`].
    #[serde(deserialize_with = "amqp_urls")]
    pub url: SecretString,
    /// A PEM file of CA certificates trusted for `amqps://` besides the system's (which
    /// `SSL_CERT_FILE` replaces): for a broker whose certificate a private CA signed.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// The queue consumed.
    pub queue: String,
    /// Where messages that cannot become events are moved, with the reason in a header.
    pub dead_letter_queue: String,
    /// Unacknowledged deliveries the broker may hand this worker at once (basic.qos).
    pub prefetch: u16,
    /// Declare both queues (durable) if missing; existing queues are used as they are.
    pub declare: bool,
    /// The consumed queue's `x-delivery-limit`, if it has one (quorum queues; RabbitMQ 4.x
    /// sets 20 by default). Only for warnings: a delivery whose `x-delivery-count` is over
    /// half of it is logged and counted. 0: no warnings.
    pub delivery_limit: u32,
}

impl Amqp {
    /// The nodes of `amqp.url`, in their written order: split at each comma that starts
    /// another `amqp://` or `amqps://` URI (a comma inside a password stays in it).
    pub fn urls(&self) -> Vec<SecretString> {
        let all = self.url.expose_secret();
        let mut urls = Vec::new();
        let mut start = 0;
        for (i, _) in all.match_indices(',') {
            let next = all[i + 1..].trim_start();
            if next.starts_with("amqp://") || next.starts_with("amqps://") {
                urls.push(all[start..i].trim());
                start = i + 1;
            }
        }
        urls.push(all[start..].trim());
        urls.into_iter().map(SecretString::from).collect()
    }
}

impl Default for Amqp {
    fn default() -> Self {
        Amqp {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            tls_ca_file: None,
            queue: "segment-bridge.sessions".into(),
            dead_letter_queue: "segment-bridge.sessions.dead".into(),
            prefetch: 2000,
            declare: true,
            delivery_limit: 20,
        }
    }
}

impl Amqp {
    /// The broker's `host:port`, for messages: never the user or the password.
    pub fn address(&self) -> String {
        match self.url.expose_secret().parse::<lapin::uri::AMQPUri>() {
            Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
            Err(_) => "amqp.url".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Segment {
    /// The region of sessions that name none.
    #[serde(deserialize_with = "region")]
    pub default_region: Region,
    /// A batch is sent when its oldest event has waited this long.
    pub flush_interval_ms: u64,
    /// A batch is also sent when no session joined it for this long: nothing is coming
    /// to fill it (the end of a burst, a quiet hour). 0: only `flush_interval_ms`.
    pub flush_idle_ms: u64,
    /// Events per request, at most 2,500.
    pub max_batch_events: usize,
    /// Bytes per request body, envelope included, at most 500,000.
    pub max_batch_bytes: usize,
    /// Requests in flight at once, per region.
    pub max_in_flight: usize,
    /// How long one request may take before it counts as a timeout and is retried.
    pub request_timeout_ms: u64,
    /// How request bodies travel: `none`, or `gzip` (`Content-Encoding: gzip`, as Segment's
    /// own libraries send). `max_batch_bytes` counts the body before compression.
    pub compression: Compression,
    /// How messageIds are derived: `v2`, unique per Segment source (each region's
    /// `message_id_namespace`), or `v1`, the earlier derivation (the same ids in every
    /// source), to keep a deployment's ids across the upgrade. docs/events.md.
    pub message_id_scheme: MessageIdScheme,
    pub us: Endpoint,
    pub eu: Endpoint,
}

impl Default for Segment {
    fn default() -> Self {
        Segment {
            default_region: Region::Us,
            flush_interval_ms: 500,
            flush_idle_ms: 50,
            max_batch_events: 1000,
            max_batch_bytes: 475_000,
            max_in_flight: 4,
            request_timeout_ms: 10_000,
            // gzip sends 4.9x fewer bytes for ~3% more worker CPU per session (README,
            // Performance). CPU is what sizes this worker's pods, and Segment's HTTP API
            // documentation does not mention compressed requests: off unless chosen.
            compression: Compression::None,
            message_id_scheme: MessageIdScheme::V2,
            us: Endpoint {
                endpoint: US_ENDPOINT.into(),
                ..Endpoint::default()
            },
            eu: Endpoint {
                endpoint: EU_ENDPOINT.into(),
                ..Endpoint::default()
            },
        }
    }
}

/// How request bodies to Segment are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_of(
            d,
            "compression",
            &[("none", Compression::None), ("gzip", Compression::Gzip)],
        )
    }
}

/// Reads a string that must be one of `allowed`: an error names them all (serde's own
/// message for an enum speaks of "variant constructors").
fn one_of<'de, D: Deserializer<'de>, T: Copy>(
    d: D,
    what: &str,
    allowed: &[(&str, T)],
) -> Result<T, D::Error> {
    let s = String::deserialize(d)?;
    if let Some((_, value)) = allowed.iter().find(|(name, _)| *name == s) {
        return Ok(*value);
    }
    let names: Vec<String> = allowed.iter().map(|(n, _)| format!("{n:?}")).collect();
    Err(serde::de::Error::custom(format!(
        "{what} must be one of {}, found {s:?}",
        names.join(", ")
    )))
}

/// Segment's batch endpoints, used when `segment.<region>.endpoint` is not set.
pub const US_ENDPOINT: &str = "https://api.segment.io/v1/batch";
pub const EU_ENDPOINT: &str = "https://events.eu1.segmentapis.com/v1/batch";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Endpoint {
    /// Segment's batch endpoint for this region (`http://` is allowed, for tests). Empty
    /// until [`Config::load`] fills in the region's default.
    pub endpoint: String,
    /// The region's source write key; empty means the region receives nothing.
    pub write_key: SecretString,
    /// What names this region's Segment source in its messageIds (v2): at most 32
    /// printable ASCII characters, no spaces. Empty: a one-way hash of `write_key`, so
    /// that two sources never share ids; set it to keep the ids when the key is rotated.
    pub message_id_namespace: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// The first delay after a transient failure; it doubles, with jitter, each time.
    pub initial_backoff_ms: u64,
    /// The longest delay between two attempts.
    pub max_backoff_ms: u64,
    /// The longest `Retry-After` obeyed.
    pub max_retry_after_s: u64,
    /// A delivery held longer than this while its batch is retried is handed back.
    pub max_hold_s: u64,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            initial_backoff_ms: 250,
            max_backoff_ms: 30_000,
            max_retry_after_s: 300,
            max_hold_s: 900,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mapping {
    /// Leave the plain email out of the traits; only its hash travels.
    pub hash_pii: bool,
    /// Skip sessions whose opt-in is not true.
    pub require_opt_in: bool,
    /// Send the mapped attributes (traits, `questions`).
    pub include_mapped_attributes: bool,
    /// The Track event's name.
    pub track_event: String,
    /// The Track event's name for a JotUrl CTA lead.
    pub lead_event: String,
}

impl Default for Mapping {
    fn default() -> Self {
        let defaults = events::Options::default();
        Mapping {
            hash_pii: defaults.hash_pii,
            require_opt_in: defaults.require_opt_in,
            include_mapped_attributes: defaults.include_mapped_attributes,
            track_event: defaults.track_event,
            lead_event: defaults.lead_event,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// The side port: `/healthz`, `/readyz`, `/metrics`.
    pub listen: SocketAddr,
    /// How often `run` and `intake` log a progress line while work flows (none while
    /// idle); 0: never.
    pub progress_interval_s: u64,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: SocketAddr::from(([0, 0, 0, 0], 9464)),
            progress_interval_s: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// After SIGTERM, how long to flush and acknowledge before exiting anyway.
    pub grace_period_s: u64,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { grace_period_s: 25 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Intake {
    /// The public port of `segment-bridge intake`: the webhook routes and nothing else.
    pub listen: SocketAddr,
    /// The largest request body taken; a larger one is answered 413 unread.
    pub max_body_bytes: usize,
    /// How old a Jebbit signature's timestamp may be; it may be at most 60 s ahead.
    pub signature_tolerance_s: u64,
    /// How long a request waits for the broker to confirm its messages before it is
    /// answered 503.
    pub publish_timeout_ms: u64,
    /// The `Retry-After` of a 503, in seconds.
    pub retry_after_s: u64,
    /// A client must send a request's line and headers within this time (hyper's header
    /// read timeout); it also closes keep-alive connections that stay idle this long.
    pub header_read_timeout_ms: u64,
    /// The longest pause between two parts of a request body (then 408).
    pub body_read_timeout_ms: u64,
    /// The longest a whole request may take, body and broker confirm included (then 408).
    pub request_timeout_ms: u64,
    /// Requests handled at once; one more is answered 503 at once.
    pub max_concurrent_requests: usize,
    /// After SIGTERM, how long to go on answering while `/readyz` says 503, so that the
    /// load balancer stops sending requests here before the listener closes.
    pub drain_delay_ms: u64,
    /// The webhook senders, by name (lowercase letters, digits and `_`): each has its own
    /// route, secret and region.
    pub sources: BTreeMap<String, Source>,
}

impl Default for Intake {
    fn default() -> Self {
        Intake {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            max_body_bytes: 512 * 1024,
            signature_tolerance_s: 300,
            publish_timeout_ms: 2000,
            retry_after_s: 5,
            header_read_timeout_ms: 5000,
            body_read_timeout_ms: 5000,
            request_timeout_ms: 15_000,
            max_concurrent_requests: 512,
            drain_delay_ms: 0,
            sources: BTreeMap::new(),
        }
    }
}

impl Intake {
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    pub fn signature_tolerance(&self) -> Duration {
        Duration::from_secs(self.signature_tolerance_s)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.drain_delay_ms)
    }
}

/// `[jebbit]`: Jebbit's Integrations API, for the `jebbit` onboarding commands. The client
/// id and secret (or a ready token) come from the environment only: `JEBBIT_CLIENT_ID`,
/// `JEBBIT_CLIENT_SECRET`, `JEBBIT_TOKEN`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Jebbit {
    /// The API's base URL: production `https://api2.jebbit.com`, staging
    /// `https://api.jebbx.com`.
    pub api_url: String,
    /// The identity provider that issues tokens (`POST {auth_url}/oauth/token`).
    pub auth_url: String,
    /// Sent as `x-jebbit-business` on every call when set: needed by a token that covers
    /// several businesses. Empty: not sent.
    pub business_id: String,
}

/// Jebbit's production API.
pub const JEBBIT_API_URL: &str = "https://api2.jebbit.com";
/// Jebbit's identity provider.
pub const JEBBIT_AUTH_URL: &str = "https://auth.jebbit.com";

impl Default for Jebbit {
    fn default() -> Self {
        Jebbit {
            api_url: JEBBIT_API_URL.to_owned(),
            auth_url: JEBBIT_AUTH_URL.to_owned(),
            business_id: String::new(),
        }
    }
}

/// The largest message RabbitMQ 4 takes by default (`max_message_size`, 16 MiB).
pub const RABBITMQ_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// One webhook sender: `[intake.sources.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// `jebbit` (signed bodies, `POST /webhooks/<name>`) or `joturl` (a token in the URL,
    /// `POST /webhooks/<name>/<token>`).
    pub kind: SourceKind,
    /// The region of its sessions when a body names none; absent: `segment.default_region`.
    #[serde(default, deserialize_with = "optional_region")]
    pub region: Option<Region>,
    /// Jebbit: the integration's `shared_secret`; JotUrl: the URL token. Required by the
    /// `intake` command; in production from the environment.
    #[serde(default)]
    pub secret: SecretString,
    /// Also accepted while a secret is rotated; empty: none.
    #[serde(default)]
    pub previous_secret: SecretString,
    /// Queue Jebbit test webhooks (`x-jebbit-test`) too, instead of only answering them.
    #[serde(default)]
    pub forward_tests: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Jebbit,
    Joturl,
}

impl<'de> Deserialize<'de> for SourceKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_of(
            d,
            "kind",
            &[
                ("jebbit", SourceKind::Jebbit),
                ("joturl", SourceKind::Joturl),
            ],
        )
    }
}

impl SourceKind {
    /// The name used in the config, the `x-segment-bridge-kind` header and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Jebbit => "jebbit",
            SourceKind::Joturl => "joturl",
        }
    }
}

impl Source {
    /// The secrets a request may match: the current one, then the previous one if set.
    pub fn secrets(&self) -> impl Iterator<Item = &[u8]> {
        [&self.secret, &self.previous_secret]
            .into_iter()
            .map(|s| s.expose_secret().as_bytes())
            .filter(|s| !s.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("invalid configuration: intake source `{name}`: {problem}")]
    Source { name: String, problem: String },
    /// A secret (write key, source secret, the AMQP URL) that cannot be what was meant.
    /// Names the key, never the value.
    #[error("invalid configuration: {key} {problem}; remove it")]
    Secret { key: String, problem: &'static str },
}

/// Refuses a secret with white space at its ends or a control character: never what a
/// sender or Segment expects, and almost always a copy-and-paste or `echo … > file`
/// mistake that would otherwise be sent as part of the key. Empty is left to the caller.
/// Refuses a secret with white space at either end, only white space, or a control
/// character, naming `key` (never the value). An empty secret means none: not refused here.
pub(crate) fn check_secret(
    key: impl FnOnce() -> String,
    value: &SecretString,
) -> Result<(), ConfigError> {
    let value = value.expose_secret();
    let problem = if value.is_empty() {
        return Ok(());
    } else if value.trim().is_empty() {
        "is only white space (an empty value means none)"
    } else if value.trim() != value {
        "has white space at its start or end (a trailing newline from `echo … > file`?)"
    } else if value.chars().any(char::is_control) {
        "contains a control character"
    } else {
        return Ok(());
    };
    Err(ConfigError::Secret {
        key: key(),
        problem,
    })
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

impl Config {
    /// Reads `path` (or `config.toml` if it exists, when `path` is `None`), then the
    /// environment, and validates the result. `env` replaces the process environment
    /// (tests use it).
    pub fn load(
        path: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) => config::File::from(p)
                .format(config::FileFormat::Toml)
                .required(true),
            None => config::File::with_name(DEFAULT_PATH)
                .format(config::FileFormat::Toml)
                .required(false),
        };
        let names: Vec<String> = match &env {
            Some(env) => env.keys().cloned().collect(),
            None => std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .collect(),
        };
        for name in names.iter().filter(|n| looks_like_a_misspelt_override(n)) {
            // The name only: the value may be a secret.
            tracing::warn!(
                variable = %name,
                "This environment variable is not read: overrides start with {ENV_PREFIX}__ (two underscores) and separate keys with __, e.g. {ENV_PREFIX}__SEGMENT__US__WRITE_KEY."
            );
        }
        let mut config: Config = config::Config::builder()
            .add_source(file)
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .source(env),
            )
            .build()?
            .try_deserialize()?;
        // A region section that sets only the key keeps Segment's endpoint.
        for (endpoint, default) in [
            (&mut config.segment.us.endpoint, US_ENDPOINT),
            (&mut config.segment.eu.endpoint, EU_ENDPOINT),
        ] {
            if endpoint.is_empty() {
                *endpoint = default.to_owned();
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every value that serde's types do not already guarantee.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_secret(|| "amqp.url".into(), &self.amqp.url)?;
        for region in Region::ALL {
            check_secret(
                || format!("segment.{region}.write_key"),
                &self.endpoint(region).write_key,
            )?;
        }
        for (name, source) in &self.intake.sources {
            check_secret(|| format!("intake.sources.{name}.secret"), &source.secret)?;
            check_secret(
                || format!("intake.sources.{name}.previous_secret"),
                &source.previous_secret,
            )?;
        }
        for (i, url) in self.amqp.urls().iter().enumerate() {
            let url = url.expose_secret();
            let scheme_ok = url.starts_with("amqp://") || url.starts_with("amqps://");
            if !scheme_ok || url.parse::<lapin::uri::AMQPUri>().is_err() {
                // The URL holds the password: name the key and the position, not the value.
                return Err(invalid(
                    "amqp.url",
                    format!(
                        "node {} of {} is not an AMQP URI (amqp:// or amqps://user:password@host:port/vhost)",
                        i + 1,
                        self.amqp.urls().len()
                    ),
                ));
            }
        }
        if let Some(path) = &self.amqp.tls_ca_file
            && std::fs::metadata(path).is_err()
        {
            return Err(invalid(
                "amqp.tls_ca_file",
                format!("cannot read {}", path.display()),
            ));
        }
        if self.amqp.queue.is_empty() {
            return Err(invalid("amqp.queue", "must not be empty"));
        }
        if self.amqp.dead_letter_queue.is_empty() || self.amqp.dead_letter_queue == self.amqp.queue
        {
            return Err(invalid(
                "amqp.dead_letter_queue",
                "must be a queue name other than amqp.queue",
            ));
        }
        if self.amqp.prefetch == 0 {
            return Err(invalid(
                "amqp.prefetch",
                "must be at least 1 (0 would mean unlimited)",
            ));
        }
        let s = &self.segment;
        if s.flush_interval_ms == 0 {
            return Err(invalid("segment.flush_interval_ms", "must be at least 1"));
        }
        if !(2..=SEGMENT_MAX_BATCH_EVENTS).contains(&s.max_batch_events) {
            return Err(invalid(
                "segment.max_batch_events",
                format!(
                    "= {} must be between 2 and {SEGMENT_MAX_BATCH_EVENTS} (a session is two events; Segment drops events past {SEGMENT_MAX_BATCH_EVENTS} per request)",
                    s.max_batch_events
                ),
            ));
        }
        let min_bytes = ENVELOPE_BYTES + 2 * MAX_EVENT_BYTES + 1;
        if !(min_bytes..=SEGMENT_MAX_BATCH_BYTES).contains(&s.max_batch_bytes) {
            return Err(invalid(
                "segment.max_batch_bytes",
                format!(
                    "= {} must be between {min_bytes} (one session of two 32,000-byte events) and {SEGMENT_MAX_BATCH_BYTES} (Segment's request limit)",
                    s.max_batch_bytes
                ),
            ));
        }
        if s.max_in_flight == 0 {
            return Err(invalid("segment.max_in_flight", "must be at least 1"));
        }
        if s.request_timeout_ms == 0 {
            return Err(invalid("segment.request_timeout_ms", "must be at least 1"));
        }
        for (key, endpoint) in [
            ("segment.us.endpoint", &s.us.endpoint),
            ("segment.eu.endpoint", &s.eu.endpoint),
        ] {
            match reqwest::Url::parse(endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err(invalid(
                        key,
                        format!("= {endpoint:?} is not an http:// or https:// URL"),
                    ));
                }
            }
        }
        let r = &self.retry;
        if r.initial_backoff_ms == 0 || r.max_backoff_ms < r.initial_backoff_ms {
            return Err(invalid(
                "retry.max_backoff_ms",
                "must be at least retry.initial_backoff_ms, which must be at least 1",
            ));
        }
        if r.max_hold_s == 0 || self.max_hold() >= RABBITMQ_ACK_TIMEOUT {
            return Err(invalid(
                "retry.max_hold_s",
                format!(
                    "= {} must be between 1 and {} (RabbitMQ closes the channel of a delivery unacknowledged for 30 minutes)",
                    r.max_hold_s,
                    RABBITMQ_ACK_TIMEOUT.as_secs() - 1
                ),
            ));
        }
        if self.mapping.track_event.trim().is_empty() {
            return Err(invalid("mapping.track_event", "must not be empty"));
        }
        if self.mapping.lead_event.trim().is_empty() {
            return Err(invalid("mapping.lead_event", "must not be empty"));
        }
        if self.shutdown.grace_period_s == 0 {
            return Err(invalid("shutdown.grace_period_s", "must be at least 1"));
        }
        self.validate_message_ids()?;
        self.validate_intake()
    }

    /// The `[intake]` values that serde's types do not guarantee. Secrets are checked by
    /// [`Config::check_intake_sources`], when the `intake` command starts.
    fn validate_intake(&self) -> Result<(), ConfigError> {
        let i = &self.intake;
        if !(1..=RABBITMQ_MAX_MESSAGE_BYTES).contains(&i.max_body_bytes) {
            return Err(invalid(
                "intake.max_body_bytes",
                format!(
                    "= {} must be between 1 and {RABBITMQ_MAX_MESSAGE_BYTES} (RabbitMQ's default largest message)",
                    i.max_body_bytes
                ),
            ));
        }
        for (key, value) in [
            ("intake.signature_tolerance_s", i.signature_tolerance_s),
            ("intake.publish_timeout_ms", i.publish_timeout_ms),
            ("intake.retry_after_s", i.retry_after_s),
            ("intake.header_read_timeout_ms", i.header_read_timeout_ms),
            ("intake.body_read_timeout_ms", i.body_read_timeout_ms),
            (
                "intake.max_concurrent_requests",
                i.max_concurrent_requests as u64,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if i.request_timeout_ms <= i.publish_timeout_ms {
            return Err(invalid(
                "intake.request_timeout_ms",
                format!(
                    "= {} must be more than intake.publish_timeout_ms ({}), or a slow broker would be answered 408 instead of 503",
                    i.request_timeout_ms, i.publish_timeout_ms
                ),
            ));
        }
        if i.listen.port() != 0 && i.listen.port() == self.server.listen.port() {
            return Err(invalid(
                "intake.listen",
                format!(
                    "= {} must use another port than server.listen ({})",
                    i.listen, self.server.listen
                ),
            ));
        }
        for name in i.sources.keys() {
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                return Err(ConfigError::Source {
                    name: name.clone(),
                    problem: "a source name must be lowercase letters, digits and `_` (the environment can only name it so, e.g. SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__SECRET for jebbit_eu)".into(),
                });
            }
        }
        Ok(())
    }

    /// What only the `intake` command needs: at least one source, and a secret for each
    /// (the `run` command works without). The error names the source, never a secret.
    pub fn check_intake_sources(&self) -> Result<(), ConfigError> {
        if self.intake.sources.is_empty() {
            return Err(invalid(
                "intake.sources",
                "has no source: add an [intake.sources.<name>] table with `kind` (jebbit or joturl) and set its secret",
            ));
        }
        for (name, source) in &self.intake.sources {
            if source.secret.expose_secret().trim().is_empty() {
                return Err(ConfigError::Source {
                    name: name.clone(),
                    problem: format!(
                        "`intake.sources.{name}.secret` is empty; set SEGMENT_BRIDGE__INTAKE__SOURCES__{}__SECRET ({})",
                        name.to_uppercase(),
                        match source.kind {
                            SourceKind::Jebbit => "the Jebbit integration's shared_secret",
                            SourceKind::Joturl =>
                                "a random token that the JotUrl webhook URL ends with",
                        }
                    ),
                });
            }
        }
        Ok(())
    }

    /// The region's endpoint settings.
    pub fn endpoint(&self, region: Region) -> &Endpoint {
        match region {
            Region::Us => &self.segment.us,
            Region::Eu => &self.segment.eu,
        }
    }

    /// Whether the region has a write key, i.e. receives events.
    pub fn has_write_key(&self, region: Region) -> bool {
        !self.endpoint(region).write_key.expose_secret().is_empty()
    }

    pub fn mapping_options(&self) -> events::Options {
        events::Options {
            hash_pii: self.mapping.hash_pii,
            require_opt_in: self.mapping.require_opt_in,
            include_mapped_attributes: self.mapping.include_mapped_attributes,
            track_event: self.mapping.track_event.clone(),
            lead_event: self.mapping.lead_event.clone(),
            default_region: self.segment.default_region,
            message_ids: self.message_ids(),
        }
    }

    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.segment.flush_interval_ms)
    }

    /// `None` when off (0), or when not under `flush_interval`, where it could not matter.
    pub fn flush_idle(&self) -> Option<Duration> {
        let idle = self.segment.flush_idle_ms;
        (idle > 0 && idle < self.segment.flush_interval_ms).then(|| Duration::from_millis(idle))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.segment.request_timeout_ms)
    }

    pub fn max_hold(&self) -> Duration {
        Duration::from_secs(self.retry.max_hold_s)
    }

    pub fn max_retry_after(&self) -> Duration {
        Duration::from_secs(self.retry.max_retry_after_s)
    }

    /// `None`: no progress lines.
    pub fn progress_interval(&self) -> Option<Duration> {
        let s = self.server.progress_interval_s;
        (s > 0).then(|| Duration::from_secs(s))
    }

    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.shutdown.grace_period_s)
    }

    /// How long after SIGTERM the worker stops waiting for Segment and hands back what it
    /// holds: a fifth of the grace period is left for that, at least 1 s and at most 5 s
    /// (and at most half of it).
    pub fn hand_back_after(&self) -> Duration {
        let grace = self.grace_period();
        let margin = (grace / 5).clamp(Duration::from_secs(1), Duration::from_secs(5));
        grace - margin.min(grace / 2)
    }

    pub fn retry_policy(&self) -> crate::backoff::RetryPolicy {
        crate::backoff::RetryPolicy {
            initial: Duration::from_millis(self.retry.initial_backoff_ms),
            max: Duration::from_millis(self.retry.max_backoff_ms),
        }
    }

    pub fn batch_limits(&self) -> crate::batch::Limits {
        crate::batch::Limits {
            max_events: self.segment.max_batch_events,
            max_bytes: self.segment.max_batch_bytes,
        }
    }
}

/// messageIds: each region's namespace (docs/events.md).
impl Config {
    fn validate_message_ids(&self) -> Result<(), ConfigError> {
        for (key, namespace) in [
            (
                "segment.us.message_id_namespace",
                &self.segment.us.message_id_namespace,
            ),
            (
                "segment.eu.message_id_namespace",
                &self.segment.eu.message_id_namespace,
            ),
        ] {
            let printable = namespace.bytes().all(|b| b.is_ascii_graphic());
            if namespace.len() > events::NAMESPACE_MAX_LEN || !printable {
                return Err(invalid(
                    key,
                    format!(
                        "= {namespace:?} must be at most {} printable ASCII characters without spaces (empty: derived from the write key)",
                        events::NAMESPACE_MAX_LEN
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The region's messageId namespace: `segment.<region>.message_id_namespace`, or a
    /// one-way hash of its write key (never the key).
    pub fn message_id_namespace(&self, region: Region) -> String {
        let endpoint = self.endpoint(region);
        if endpoint.message_id_namespace.is_empty() {
            events::write_key_namespace(endpoint.write_key.expose_secret())
        } else {
            endpoint.message_id_namespace.clone()
        }
    }

    /// How each region's messageIds are derived, for [`events::Options`].
    pub fn message_ids(&self) -> events::MessageIds {
        match self.segment.message_id_scheme {
            MessageIdScheme::V1 => events::MessageIds::v1(),
            MessageIdScheme::V2 => events::MessageIds::v2(
                &self.message_id_namespace(Region::Us),
                &self.message_id_namespace(Region::Eu),
            ),
        }
    }
}

/// Whether an environment variable looks meant as an override but is not read as one:
/// it starts with `SEGMENT_BRIDGE_` and one `_` short of the prefix, and goes on like a
/// key (a section's name, or `__` between keys). Other `SEGMENT_BRIDGE_…` variables are
/// left alone: `SEGMENT_BRIDGE_LOG_FORMAT`, `SEGMENT_BRIDGE_INTAKE_THREADS`, test switches, and the `…_SERVICE_HOST` /
/// `…_PORT…` variables Kubernetes sets for a Service named `segment-bridge`.
pub fn looks_like_a_misspelt_override(name: &str) -> bool {
    const SECTIONS: [&str; 8] = [
        "AMQP", "SEGMENT", "RETRY", "MAPPING", "SERVER", "SHUTDOWN", "INTAKE", "JEBBIT",
    ];
    let upper = name.to_ascii_uppercase();
    let Some(rest) = upper.strip_prefix(ENV_PREFIX) else {
        return false;
    };
    if rest.starts_with("__") || !rest.starts_with('_') {
        return false;
    }
    let rest = rest.trim_start_matches('_');
    // The binary's own variables outside the configuration.
    if ["LOG_FORMAT", "INTAKE_THREADS"].contains(&rest) {
        return false;
    }
    let kubernetes = rest.contains("SERVICE_HOST")
        || rest.contains("SERVICE_PORT")
        || rest == "PORT"
        || rest.ends_with("_PORT")
        || rest.contains("PORT_")
            && rest
                .split("PORT_")
                .nth(1)
                .is_some_and(|p| p.starts_with(|c: char| c.is_ascii_digit()));
    if kubernetes {
        return false;
    }
    rest.contains("__")
        || SECTIONS
            .iter()
            .any(|s| rest.strip_prefix(s).is_some_and(|r| r.starts_with('_')))
}

fn region<'de, D: Deserializer<'de>>(d: D) -> Result<Region, D::Error> {
    let s = String::deserialize(d)?;
    Region::parse(&s).ok_or_else(|| {
        serde::de::Error::custom(format!("region must be \"us\" or \"eu\", found {s:?}"))
    })
}

/// `amqp.url`: one URI, or a list of them, kept joined by commas (see [`Amqp::urls`]).
fn amqp_urls<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    // No value in the error: it would hold the password.
    let urls = OneOrMany::deserialize(d).map_err(|_| {
        serde::de::Error::custom("amqp.url must be a string or an array of strings")
    })?;
    Ok(SecretString::from(match urls {
        OneOrMany::One(url) => url,
        OneOrMany::Many(urls) => urls.join(","),
    }))
}

/// An optional region: empty means none.
fn optional_region<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Region>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    Region::parse(&s).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!("region must be \"us\" or \"eu\", found {s:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn amqp_url_is_one_node_or_a_list_from_toml_or_a_comma_separated_environment() {
        let nodes = |c: &Config| -> Vec<String> {
            c.amqp
                .urls()
                .iter()
                .map(|u| u.expose_secret().to_owned())
                .collect()
        };
        let one = Config::load(None, env(&[])).unwrap();
        assert_eq!(nodes(&one), ["amqp://guest:guest@127.0.0.1:5672/%2f"]);

        let f = file("[amqp]\nurl = [\"amqp://u:p@h1:5672/%2f\", \"amqps://u:p@h2:5671/%2f\"]\n");
        let listed = Config::load(Some(f.path()), env(&[])).unwrap();
        assert_eq!(
            nodes(&listed),
            ["amqp://u:p@h1:5672/%2f", "amqps://u:p@h2:5671/%2f"]
        );

        // A comma inside a password is not a separator; one before a URI is.
        let from_env = Config::load(
            None,
            env(&[(
                "SEGMENT_BRIDGE__AMQP__URL",
                "amqp://u:p,q@h1:5672/%2f, amqp://u:p@h2:5672/%2f",
            )]),
        )
        .unwrap();
        assert_eq!(
            nodes(&from_env),
            ["amqp://u:p,q@h1:5672/%2f", "amqp://u:p@h2:5672/%2f"]
        );
        // Other keys keep their types (no list parsing of the environment).
        assert_eq!(from_env.amqp.queue, "segment-bridge.sessions");

        let bad = Config::load(
            None,
            env(&[(
                "SEGMENT_BRIDGE__AMQP__URL",
                "amqp://u:s3cret@h1:5672/%2f,amqp://u:s3cret@h2:notaport/%2f",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("amqp.url") && bad.contains("node 2 of 2"),
            "{bad}"
        );
        assert!(!bad.contains("s3cret"), "{bad}");
        let f = file("[amqp]\ntls_ca_file = \"/nonexistent/ca.pem\"\n");
        let err = Config::load(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("amqp.tls_ca_file"), "{err}");
    }

    #[test]
    fn the_shipped_config_toml_is_valid_and_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let shipped = Config::load(Some(&path), env(&[])).unwrap();
        let defaults = Config::default();
        assert_eq!(format!("{shipped:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn no_file_and_no_environment_gives_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        assert!(
            Config::load(Some(&missing), env(&[])).is_err(),
            "an explicit path must exist"
        );
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.amqp.prefetch, 2000);
        assert_eq!(c.segment.default_region, Region::Us);
        assert!(!c.has_write_key(Region::Us) && !c.has_write_key(Region::Eu));
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let f = file(
            "[segment]\nmax_batch_events = 100\n[segment.eu]\nendpoint = \"http://127.0.0.1:1/v1/batch\"\n",
        );
        let c = Config::load(
            Some(f.path()),
            env(&[
                ("SEGMENT_BRIDGE__SEGMENT__EU__WRITE_KEY", "eu-key"),
                ("SEGMENT_BRIDGE__SEGMENT__MAX_BATCH_EVENTS", "200"),
                ("SEGMENT_BRIDGE__SEGMENT__DEFAULT_REGION", "EU"),
                ("SEGMENT_BRIDGE__MAPPING__HASH_PII", "true"),
                ("SEGMENT_BRIDGE__AMQP__PREFETCH", "10"),
            ]),
        )
        .unwrap();
        assert_eq!(c.segment.eu.write_key.expose_secret(), "eu-key");
        assert_eq!(c.segment.eu.endpoint, "http://127.0.0.1:1/v1/batch");
        assert_eq!(c.segment.max_batch_events, 200);
        assert_eq!(c.segment.default_region, Region::Eu);
        assert!(c.mapping.hash_pii);
        assert_eq!(c.amqp.prefetch, 10);
        assert!(c.has_write_key(Region::Eu) && !c.has_write_key(Region::Us));
    }

    #[test]
    fn a_key_alone_keeps_the_regions_default_endpoint_without_any_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.toml");
        std::fs::write(&empty, "").unwrap();
        let c = Config::load(
            Some(&empty),
            env(&[("SEGMENT_BRIDGE__SEGMENT__EU__WRITE_KEY", "k")]),
        )
        .unwrap();
        assert_eq!(c.segment.eu.endpoint, EU_ENDPOINT);
        assert_eq!(c.segment.us.endpoint, US_ENDPOINT);
        let f = file("[segment.us]\nwrite_key = \"k\"\n");
        let c = Config::load(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c.segment.us.endpoint, US_ENDPOINT);
    }

    #[test]
    fn a_numeric_write_key_from_the_environment_stays_a_string() {
        let c = Config::load(
            None,
            env(&[("SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY", "0123")]),
        )
        .unwrap();
        assert_eq!(c.segment.us.write_key.expose_secret(), "0123");
    }

    #[test]
    fn invalid_values_are_refused_naming_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "SEGMENT_BRIDGE__SEGMENT__MAX_BATCH_EVENTS",
                "5000",
                "segment.max_batch_events",
            ),
            (
                "SEGMENT_BRIDGE__SEGMENT__MAX_BATCH_EVENTS",
                "1",
                "segment.max_batch_events",
            ),
            (
                "SEGMENT_BRIDGE__SEGMENT__MAX_BATCH_BYTES",
                "600000",
                "segment.max_batch_bytes",
            ),
            (
                "SEGMENT_BRIDGE__SEGMENT__MAX_IN_FLIGHT",
                "0",
                "segment.max_in_flight",
            ),
            (
                "SEGMENT_BRIDGE__SEGMENT__US__ENDPOINT",
                "ftp://x",
                "segment.us.endpoint",
            ),
            ("SEGMENT_BRIDGE__AMQP__PREFETCH", "0", "amqp.prefetch"),
            ("SEGMENT_BRIDGE__AMQP__URL", "http://nope", "amqp.url"),
            (
                "SEGMENT_BRIDGE__RETRY__MAX_HOLD_S",
                "1800",
                "retry.max_hold_s",
            ),
            (
                "SEGMENT_BRIDGE__AMQP__DEAD_LETTER_QUEUE",
                "segment-bridge.sessions",
                "amqp.dead_letter_queue",
            ),
        ];
        for (key, value, named) in cases {
            let err = Config::load(None, env(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
        }
        let err = Config::load(
            None,
            env(&[("SEGMENT_BRIDGE__SEGMENT__DEFAULT_REGION", "apac")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("apac"), "{err}");
    }

    #[test]
    fn the_hand_back_at_shutdown_leaves_a_fifth_of_the_grace_period_between_1_and_5_s() {
        let after = |grace: &str| {
            Config::load(
                None,
                env(&[("SEGMENT_BRIDGE__SHUTDOWN__GRACE_PERIOD_S", grace)]),
            )
            .unwrap()
            .hand_back_after()
        };
        assert_eq!(after("25"), Duration::from_secs(20));
        assert_eq!(after("100"), Duration::from_secs(95));
        assert_eq!(after("3"), Duration::from_secs(2));
        assert_eq!(after("1"), Duration::from_millis(500));
    }

    #[test]
    fn the_idle_flush_is_50_ms_off_at_0_and_off_when_not_under_the_flush_interval() {
        let idle = |vars: &[(&str, &str)]| Config::load(None, env(vars)).unwrap().flush_idle();
        assert_eq!(idle(&[]), Some(Duration::from_millis(50)));
        assert_eq!(
            idle(&[("SEGMENT_BRIDGE__SEGMENT__FLUSH_IDLE_MS", "0")]),
            None
        );
        assert_eq!(
            idle(&[
                ("SEGMENT_BRIDGE__SEGMENT__FLUSH_IDLE_MS", "100"),
                ("SEGMENT_BRIDGE__SEGMENT__FLUSH_INTERVAL_MS", "100"),
            ]),
            None
        );
        assert_eq!(
            idle(&[("SEGMENT_BRIDGE__SEGMENT__FLUSH_IDLE_MS", "20")]),
            Some(Duration::from_millis(20))
        );
    }

    #[test]
    fn a_misspelt_key_is_an_error_not_a_silent_default() {
        let f = file("[segment]\nmax_batch_event = 100\n");
        let err = Config::load(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_batch_event"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let c = Config::load(
            None,
            env(&[
                ("SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY", "sekrit-us"),
                ("SEGMENT_BRIDGE__AMQP__URL", "amqp://u:hunter2@h:5672/%2f"),
            ]),
        )
        .unwrap();
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("sekrit-us") && !debug.contains("hunter2"),
            "{debug}"
        );
    }

    #[test]
    fn intake_sources_come_from_the_file_and_their_secrets_from_the_environment() {
        let f = file(
            "[intake.sources.jebbit_eu]\nkind = \"jebbit\"\nregion = \"EU\"\n[intake.sources.cta_1]\nkind = \"joturl\"\n",
        );
        let c = Config::load(
            Some(f.path()),
            env(&[
                ("SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__SECRET", "shh"),
                (
                    "SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__PREVIOUS_SECRET",
                    "old",
                ),
                (
                    "SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__FORWARD_TESTS",
                    "true",
                ),
                ("SEGMENT_BRIDGE__INTAKE__SOURCES__CTA_1__SECRET", "0123"),
                ("SEGMENT_BRIDGE__INTAKE__MAX_BODY_BYTES", "1000"),
            ]),
        )
        .unwrap();
        let eu = &c.intake.sources["jebbit_eu"];
        assert_eq!(eu.kind, SourceKind::Jebbit);
        assert_eq!(eu.region, Some(Region::Eu));
        assert!(eu.forward_tests);
        assert_eq!(
            eu.secrets().collect::<Vec<_>>(),
            [b"shh".as_slice(), b"old"]
        );
        let cta = &c.intake.sources["cta_1"];
        assert_eq!((cta.kind, cta.region), (SourceKind::Joturl, None));
        assert_eq!(cta.secrets().collect::<Vec<_>>(), [b"0123".as_slice()]);
        assert_eq!(c.intake.max_body_bytes, 1000);
        c.check_intake_sources().unwrap();
        // A source may come from the environment alone.
        let c = Config::load(
            None,
            env(&[
                ("SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_US__KIND", "jebbit"),
                ("SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_US__SECRET", "s"),
            ]),
        )
        .unwrap();
        assert_eq!(c.intake.sources["jebbit_us"].region, None);
        c.check_intake_sources().unwrap();
    }

    #[test]
    fn an_intake_source_without_a_secret_is_refused_naming_it_but_run_does_not_care() {
        let f = file("[intake.sources.jebbit_eu]\nkind = \"jebbit\"\nsecret = \"\"\n");
        let c = Config::load(Some(f.path()), env(&[])).unwrap();
        let err = c.check_intake_sources().unwrap_err().to_string();
        assert!(err.contains("jebbit_eu"), "{err}");
        assert!(
            err.contains("SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__SECRET"),
            "{err}"
        );
        let err = Config::default()
            .check_intake_sources()
            .unwrap_err()
            .to_string();
        assert!(err.contains("intake.sources"), "{err}");
    }

    #[test]
    fn intake_values_are_checked_naming_the_key_or_the_source() {
        for (key, value, named) in [
            (
                "SEGMENT_BRIDGE__INTAKE__MAX_BODY_BYTES",
                "0",
                "intake.max_body_bytes",
            ),
            (
                "SEGMENT_BRIDGE__INTAKE__MAX_BODY_BYTES",
                "20000000",
                "intake.max_body_bytes",
            ),
            (
                "SEGMENT_BRIDGE__INTAKE__PUBLISH_TIMEOUT_MS",
                "0",
                "intake.publish_timeout_ms",
            ),
            (
                "SEGMENT_BRIDGE__INTAKE__REQUEST_TIMEOUT_MS",
                "2000",
                "intake.request_timeout_ms",
            ),
            (
                "SEGMENT_BRIDGE__INTAKE__MAX_CONCURRENT_REQUESTS",
                "0",
                "intake.max_concurrent_requests",
            ),
            (
                "SEGMENT_BRIDGE__INTAKE__SIGNATURE_TOLERANCE_S",
                "0",
                "intake.signature_tolerance_s",
            ),
            (
                "SEGMENT_BRIDGE__INTAKE__LISTEN",
                "0.0.0.0:9464",
                "intake.listen",
            ),
            (
                "SEGMENT_BRIDGE__MAPPING__LEAD_EVENT",
                " ",
                "mapping.lead_event",
            ),
        ] {
            let err = Config::load(None, env(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
        }
        for (toml, named) in [
            ("[intake.sources.JebbitEU]\nkind = \"jebbit\"\n", "JebbitEU"),
            (
                "[intake.sources.jebbit-eu]\nkind = \"jebbit\"\n",
                "jebbit-eu",
            ),
            ("[intake.sources.x]\nkind = \"typeform\"\n", "typeform"),
            (
                "[intake.sources.x]\nkind = \"jebbit\"\nregion = \"apac\"\n",
                "apac",
            ),
            (
                "[intake.sources.x]\nkind = \"jebbit\"\nsecrets = \"s\"\n",
                "secrets",
            ),
            ("[intake.sources.x]\nregion = \"eu\"\n", "kind"),
        ] {
            let f = file(toml);
            let err = Config::load(Some(f.path()), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{toml}: {err}");
        }
    }

    #[test]
    fn message_id_namespaces_and_the_scheme_are_checked_naming_the_key() {
        for (key, value, named) in [
            (
                "SEGMENT_BRIDGE__SEGMENT__EU__MESSAGE_ID_NAMESPACE",
                "prod eu",
                "segment.eu.message_id_namespace",
            ),
            (
                "SEGMENT_BRIDGE__SEGMENT__US__MESSAGE_ID_NAMESPACE",
                &"x".repeat(33),
                "segment.us.message_id_namespace",
            ),
            (
                "SEGMENT_BRIDGE__SEGMENT__US__MESSAGE_ID_NAMESPACE",
                "pröd",
                "segment.us.message_id_namespace",
            ),
            ("SEGMENT_BRIDGE__SEGMENT__MESSAGE_ID_SCHEME", "v3", "v3"),
        ] {
            let err = Config::load(None, env(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
        }
        let c = Config::load(
            None,
            env(&[
                (
                    "SEGMENT_BRIDGE__SEGMENT__US__MESSAGE_ID_NAMESPACE",
                    &"x".repeat(32),
                ),
                ("SEGMENT_BRIDGE__SEGMENT__EU__WRITE_KEY", "eu-key-Jz8rQ2vX"),
            ]),
        )
        .unwrap();
        assert_eq!(c.message_id_namespace(Region::Us), "x".repeat(32));
        assert_eq!(c.message_id_namespace(Region::Eu), "639beb88a28f816a");
        assert_eq!(c.segment.message_id_scheme, MessageIdScheme::V2);
    }

    #[test]
    fn intake_secrets_never_show_in_debug_output() {
        let c = Config::load(
            None,
            env(&[
                ("SEGMENT_BRIDGE__INTAKE__SOURCES__J__KIND", "jebbit"),
                ("SEGMENT_BRIDGE__INTAKE__SOURCES__J__SECRET", "hmac-sekrit"),
                (
                    "SEGMENT_BRIDGE__INTAKE__SOURCES__J__PREVIOUS_SECRET",
                    "old-sekrit",
                ),
            ]),
        )
        .unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("sekrit"), "{debug}");
    }

    #[test]
    fn secrets_with_white_space_or_control_characters_are_refused_naming_the_key_not_the_value() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY",
                "wk-sekrit\n",
                "segment.us.write_key has white space at its start or end",
            ),
            (
                "SEGMENT_BRIDGE__SEGMENT__EU__WRITE_KEY",
                " wk-sekrit",
                "segment.eu.write_key has white space",
            ),
            (
                "SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY",
                "   ",
                "segment.us.write_key is only white space",
            ),
            (
                "SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY",
                "wk\x1bsekrit",
                "segment.us.write_key contains a control character",
            ),
            (
                "SEGMENT_BRIDGE__INTAKE__SOURCES__J__SECRET",
                "hmac-sekrit\r\n",
                "intake.sources.j.secret has white space",
            ),
            (
                "SEGMENT_BRIDGE__INTAKE__SOURCES__J__PREVIOUS_SECRET",
                "\thmac-sekrit",
                "intake.sources.j.previous_secret has white space",
            ),
            (
                "SEGMENT_BRIDGE__AMQP__URL",
                "amqp://u:sekrit@h:5672/%2f\n",
                "amqp.url has white space",
            ),
        ];
        for (key, value, want) in cases {
            let err = Config::load(
                None,
                env(&[
                    ("SEGMENT_BRIDGE__INTAKE__SOURCES__J__KIND", "jebbit"),
                    (key, value),
                ]),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(want), "{key}={value:?}: {err}");
            assert!(err.contains("remove it"), "{err}");
            assert!(!err.contains("sekrit"), "the value is never shown: {err}");
        }
        // Inner spaces are a key's own business.
        let c = Config::load(
            None,
            env(&[("SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY", "a b")]),
        )
        .unwrap();
        assert!(c.has_write_key(Region::Us));
    }

    #[test]
    fn a_bad_enum_value_names_the_allowed_values() {
        let err = Config::load(
            None,
            env(&[("SEGMENT_BRIDGE__SEGMENT__COMPRESSION", "zstd")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(r#"compression must be one of "none", "gzip", found "zstd""#),
            "{err}"
        );
        assert!(!err.contains("variant"), "{err}");
        let f = file("[intake.sources.a]\nkind = \"x\"\n");
        let err = Config::load(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r#"kind must be one of "jebbit", "joturl", found "x""#),
            "{err}"
        );
        let c = Config::load(
            None,
            env(&[("SEGMENT_BRIDGE__SEGMENT__COMPRESSION", "gzip")]),
        )
        .unwrap();
        assert_eq!(c.segment.compression, Compression::Gzip);
    }

    #[test]
    fn variables_one_underscore_short_of_an_override_are_noticed_and_others_left_alone() {
        for name in [
            "SEGMENT_BRIDGE_SEGMENT__US__WRITE_KEY",
            "SEGMENT_BRIDGE_AMQP__URL",
            "SEGMENT_BRIDGE_AMQP_URL",
            "SEGMENT_BRIDGE_INTAKE__SOURCES__J__SECRET",
            "segment_bridge_retry__max_hold_s",
        ] {
            assert!(looks_like_a_misspelt_override(name), "{name}");
        }
        for name in [
            "SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY",
            "SEGMENT_BRIDGE_LOG_FORMAT",
            "SEGMENT_BRIDGE_INTAKE_THREADS",
            "SEGMENT_BRIDGE_BIN",
            "SEGMENT_BRIDGE_TEST_CLUSTER",
            "SEGMENT_BRIDGE_SERVICE_HOST",
            "SEGMENT_BRIDGE_SERVICE_PORT_METRICS",
            "SEGMENT_BRIDGE_PORT",
            "SEGMENT_BRIDGE_PORT_9464_TCP_ADDR",
            "SEGMENT_BRIDGE_INTAKE_SERVICE_HOST",
            "SEGMENT_BRIDGE_INTAKE_PORT_8080_TCP",
            "SEGMENT_BRIDGEX",
            "PATH",
        ] {
            assert!(!looks_like_a_misspelt_override(name), "{name}");
        }
    }
}

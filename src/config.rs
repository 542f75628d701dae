//! The configuration: `config.toml` layered under `SEGMENT_BRIDGE__SECTION__KEY`
//! environment variables, read into typed values and checked once at start-up.
//!
//! Every default is named here, in the `Default` impls. Write keys and the AMQP URL (which
//! holds the broker password) are [`SecretString`]s: `Debug` redacts them and nothing in
//! this crate prints them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::batch::{ENVELOPE_BYTES, SEGMENT_MAX_BATCH_BYTES, SEGMENT_MAX_BATCH_EVENTS};
use crate::events::{self, MAX_EVENT_BYTES};
use crate::session::Region;

/// The prefix of environment overrides: `SEGMENT_BRIDGE__AMQP__URL` sets `amqp.url`.
pub const ENV_PREFIX: &str = "SEGMENT_BRIDGE";
/// Read when `--config` is not given; it may be absent.
pub const DEFAULT_PATH: &str = "config.toml";
/// RabbitMQ closes a channel whose delivery stays unacknowledged this long (its default
/// `consumer_timeout`); a delivery must be requeued well before.
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Amqp {
    /// The broker, as an AMQP URI. Secret: it usually holds a password.
    pub url: SecretString,
    /// The queue consumed.
    pub queue: String,
    /// Where messages that cannot become events are moved, with the reason in a header.
    pub dead_letter_queue: String,
    /// Unacknowledged deliveries the broker may hand this worker at once (basic.qos).
    pub prefetch: u16,
    /// Declare both queues (durable) if missing; existing queues are used as they are.
    pub declare: bool,
}

impl Default for Amqp {
    fn default() -> Self {
        Amqp {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            queue: "segment-bridge.sessions".into(),
            dead_letter_queue: "segment-bridge.sessions.dead".into(),
            prefetch: 2000,
            declare: true,
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
    pub us: Endpoint,
    pub eu: Endpoint,
}

impl Default for Segment {
    fn default() -> Self {
        Segment {
            default_region: Region::Us,
            flush_interval_ms: 500,
            max_batch_events: 1000,
            max_batch_bytes: 475_000,
            max_in_flight: 4,
            request_timeout_ms: 10_000,
            // gzip sends 4.9x fewer bytes for ~3% more worker CPU per session (README,
            // Performance). CPU is what sizes this worker's pods, and Segment's HTTP API
            // documentation does not mention compressed requests: off unless chosen.
            compression: Compression::None,
            us: Endpoint {
                endpoint: US_ENDPOINT.into(),
                write_key: SecretString::default(),
            },
            eu: Endpoint {
                endpoint: EU_ENDPOINT.into(),
                write_key: SecretString::default(),
            },
        }
    }
}

/// How request bodies to Segment are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
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
    /// A delivery held longer than this while its batch is retried is requeued.
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
}

impl Default for Mapping {
    fn default() -> Self {
        let defaults = events::Options::default();
        Mapping {
            hash_pii: defaults.hash_pii,
            require_opt_in: defaults.require_opt_in,
            include_mapped_attributes: defaults.include_mapped_attributes,
            track_event: defaults.track_event,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// The side port: `/healthz`, `/readyz`, `/metrics`.
    pub listen: SocketAddr,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: SocketAddr::from(([0, 0, 0, 0], 9464)),
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
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
        let url = self.amqp.url.expose_secret();
        if url.parse::<lapin::uri::AMQPUri>().is_err() {
            // The URL holds the password: name the key, not the value.
            return Err(invalid(
                "amqp.url",
                "is not an AMQP URI (amqp://user:password@host:port/vhost)",
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
        if self.shutdown.grace_period_s == 0 {
            return Err(invalid("shutdown.grace_period_s", "must be at least 1"));
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
            default_region: self.segment.default_region,
        }
    }

    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.segment.flush_interval_ms)
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

    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.shutdown.grace_period_s)
    }

    pub fn retry_policy(&self) -> crate::segment::RetryPolicy {
        crate::segment::RetryPolicy {
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

fn region<'de, D: Deserializer<'de>>(d: D) -> Result<Region, D::Error> {
    let s = String::deserialize(d)?;
    Region::parse(&s).ok_or_else(|| {
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
}

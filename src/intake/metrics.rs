//! The intake's Prometheus metrics. Like the worker's ([`crate::metrics`]), each
//! [`IntakeMetrics`] owns its recorder; every series whose labels are known at start-up
//! (each source × each outcome) is registered then, so a request only bumps a counter.
//! The `source` label is always a configured source's name, or `-` for requests that name
//! none (unknown routes, requests refused before routing): a request can never add a series.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

pub const REQUESTS: &str = "segment_bridge_intake_requests_total";
pub const MESSAGES: &str = "segment_bridge_intake_messages_queued_total";
pub const PUBLISH: &str = "segment_bridge_intake_publish_seconds";
pub const AMQP_CONNECTED: &str = crate::metrics::AMQP_CONNECTED;
pub const AMQP_CONNECTS: &str = crate::metrics::AMQP_CONNECTS;
pub const AMQP_CHANNEL_REPLACEMENTS: &str = crate::metrics::AMQP_CHANNEL_REPLACEMENTS;

/// The `source` label of requests that name no configured source.
pub const NO_SOURCE: &str = "-";

/// How a webhook request ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every message confirmed by the broker: 200.
    Queued,
    /// A verified Jebbit test webhook, answered 200 and not queued.
    Test,
    /// A missing, malformed, stale or wrong signature: 401.
    Unauthorized,
    /// Not a JSON object or an array of objects: 400.
    BadRequest,
    /// Over `intake.max_body_bytes`: 413.
    TooLarge,
    /// The broker is unreachable, refused, or did not confirm in time; or too many
    /// requests at once: 503 with `Retry-After`.
    Unavailable,
    /// The body stopped arriving (`intake.body_read_timeout_ms`): 408.
    Timeout,
    /// No such source, or a wrong JotUrl token: 404.
    NotFound,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Queued,
        Outcome::Test,
        Outcome::Unauthorized,
        Outcome::BadRequest,
        Outcome::TooLarge,
        Outcome::Unavailable,
        Outcome::Timeout,
        Outcome::NotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Queued => "queued",
            Outcome::Test => "test",
            Outcome::Unauthorized => "unauthorized",
            Outcome::BadRequest => "bad_request",
            Outcome::TooLarge => "too_large",
            Outcome::Unavailable => "unavailable",
            Outcome::Timeout => "timeout",
            Outcome::NotFound => "not_found",
        }
    }
}

/// What the intake has done since it started (see [`IntakeMetrics::totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntakeTotals {
    /// Requests answered, by outcome, in [`Outcome::ALL`] order.
    pub requests: [u64; Outcome::ALL.len()],
    /// Messages the broker confirmed.
    pub messages: u64,
}

impl IntakeTotals {
    pub fn since(&self, earlier: &IntakeTotals) -> IntakeTotals {
        IntakeTotals {
            requests: std::array::from_fn(|i| self.requests[i] - earlier.requests[i]),
            messages: self.messages - earlier.messages,
        }
    }

    /// "12 queued, 1 unauthorized": the outcomes that happened, or "none".
    pub fn summary(&self) -> String {
        let parts: Vec<String> = Outcome::ALL
            .iter()
            .zip(self.requests)
            .filter(|(_, n)| *n > 0)
            .map(|(o, n)| format!("{n} {}", o.as_str()))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

const HELP: &[(&str, &str)] = &[
    (
        REQUESTS,
        "Webhook requests answered, by source and outcome: queued, test, unauthorized, bad_request, too_large, unavailable, timeout, not_found.",
    ),
    (
        MESSAGES,
        "Messages the broker confirmed, by source (an array body is one per element).",
    ),
    (
        PUBLISH,
        "Time from publishing a request's messages to the broker's last confirm.",
    ),
    (AMQP_CONNECTED, "1 while connected to RabbitMQ."),
    (
        AMQP_CONNECTS,
        "Connections made to RabbitMQ (more than one means reconnects).",
    ),
    (
        AMQP_CHANNEL_REPLACEMENTS,
        "Publishing channels replaced by a fresh one after the broker refused a publish (nack).",
    ),
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

pub struct IntakeMetrics {
    handle: PrometheusHandle,
    /// Per source (and [`NO_SOURCE`]): one counter per outcome, in [`Outcome::ALL`] order.
    requests: HashMap<String, [Counter; Outcome::ALL.len()]>,
    messages: HashMap<String, Counter>,
    publish: Histogram,
    connected: Gauge,
    connects: Counter,
    channel_replacements: Counter,
    /// Requests by outcome ([`Outcome::ALL`] order), all sources together, then messages
    /// queued: read back by the progress and shutdown log lines.
    totals: [AtomicU64; Outcome::ALL.len() + 1],
    // Keeps the handles' storage alive.
    _recorder: PrometheusRecorder,
}

impl IntakeMetrics {
    /// Registers every series of `sources` (their names).
    pub fn new<'a>(sources: impl IntoIterator<Item = &'a str>) -> IntakeMetrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(PUBLISH.into()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        for (name, help) in HELP {
            let unit = (*name == PUBLISH).then_some(Unit::Seconds);
            recorder.describe_counter(KeyName::from(*name), unit, (*help).into());
        }
        let handle = recorder.handle();
        let mut requests = HashMap::new();
        let mut messages = HashMap::new();
        for source in sources.into_iter().chain([NO_SOURCE]) {
            let counters = Outcome::ALL.map(|outcome| {
                let labels = vec![
                    Label::new("source", source.to_owned()),
                    Label::from_static_parts("outcome", outcome.as_str()),
                ];
                recorder.register_counter(&Key::from_parts(REQUESTS, labels), &METADATA)
            });
            requests.insert(source.to_owned(), counters);
            if source != NO_SOURCE {
                let labels = vec![Label::new("source", source.to_owned())];
                messages.insert(
                    source.to_owned(),
                    recorder.register_counter(&Key::from_parts(MESSAGES, labels), &METADATA),
                );
            }
        }
        IntakeMetrics {
            publish: recorder.register_histogram(&Key::from_name(PUBLISH), &METADATA),
            connected: recorder.register_gauge(&Key::from_name(AMQP_CONNECTED), &METADATA),
            connects: recorder.register_counter(&Key::from_name(AMQP_CONNECTS), &METADATA),
            channel_replacements: recorder
                .register_counter(&Key::from_name(AMQP_CHANNEL_REPLACEMENTS), &METADATA),
            handle,
            requests,
            messages,
            totals: Default::default(),
            _recorder: recorder,
        }
    }

    /// One request answered. An unknown `source` counts under [`NO_SOURCE`].
    pub fn request(&self, source: &str, outcome: Outcome) {
        let counters = self
            .requests
            .get(source)
            .or_else(|| self.requests.get(NO_SOURCE))
            .expect("NO_SOURCE is always registered");
        let i = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("every outcome is in ALL");
        counters[i].increment(1);
        self.totals[i].fetch_add(1, Relaxed);
    }

    /// `n` messages of `source` confirmed by the broker.
    pub fn queued(&self, source: &str, n: u64) {
        if let Some(counter) = self.messages.get(source) {
            counter.increment(n);
            self.totals[Outcome::ALL.len()].fetch_add(n, Relaxed);
        }
    }

    /// Requests answered since start, by outcome, and messages queued.
    pub fn totals(&self) -> IntakeTotals {
        IntakeTotals {
            requests: std::array::from_fn(|i| self.totals[i].load(Relaxed)),
            messages: self.totals[Outcome::ALL.len()].load(Relaxed),
        }
    }

    pub fn publish_took(&self, took: Duration) {
        self.publish.record(took.as_secs_f64());
    }

    /// The publishing channel replaced after a nack.
    pub fn channel_replaced(&self) {
        self.channel_replacements.increment(1);
    }

    pub fn amqp_connected(&self, connected: bool) {
        if connected {
            self.connects.increment(1);
        }
        self.connected.set(f64::from(u8::from(connected)));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_there_from_the_start_and_requests_only_count() {
        let m = IntakeMetrics::new(["jebbit_eu", "cta"]);
        m.request("jebbit_eu", Outcome::Queued);
        m.request("jebbit_eu", Outcome::Queued);
        m.request("cta", Outcome::NotFound);
        m.request("/etc/passwd", Outcome::NotFound);
        m.queued("jebbit_eu", 3);
        m.publish_took(Duration::from_millis(3));
        m.amqp_connected(true);
        let text = m.render();
        for line in [
            r#"segment_bridge_intake_requests_total{source="jebbit_eu",outcome="queued"} 2"#,
            r#"segment_bridge_intake_requests_total{source="jebbit_eu",outcome="unauthorized"} 0"#,
            r#"segment_bridge_intake_requests_total{source="cta",outcome="not_found"} 1"#,
            r#"segment_bridge_intake_requests_total{source="-",outcome="not_found"} 1"#,
            r#"segment_bridge_intake_messages_queued_total{source="jebbit_eu"} 3"#,
            r#"segment_bridge_intake_publish_seconds_bucket{le="0.005"} 1"#,
            "segment_bridge_amqp_connected 1",
            "segment_bridge_amqp_connections_total 1",
            "segment_bridge_amqp_channel_replacements_total 0",
            "# HELP segment_bridge_intake_requests_total Webhook requests answered",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("passwd"), "{text}");
        let totals = m.totals();
        assert_eq!(totals.messages, 3);
        assert_eq!(totals.summary(), "2 queued, 2 not_found");
        assert_eq!(totals.since(&totals).summary(), "none");
    }
}

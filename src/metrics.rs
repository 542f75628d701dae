//! The worker's Prometheus metrics: names, help texts, buckets, and typed handles.
//!
//! Each [`Metrics`] owns its own recorder instead of installing a global one, so that a
//! process (or a test) running several workers sees each worker's numbers apart. Handles
//! used per session are registered once; those whose labels vary (status codes, reasons)
//! are registered when used, which happens at most once per request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::domain::Region;

pub const SESSIONS: &str = "segment_bridge_sessions_total";
pub const DELIVERIES: &str = "segment_bridge_deliveries_received_total";
pub const DEAD_LETTERS: &str = "segment_bridge_dead_letters_total";
pub const REQUEUED: &str = "segment_bridge_deliveries_requeued_total";
pub const EVENTS_SENT: &str = "segment_bridge_events_sent_total";
pub const REQUESTS: &str = "segment_bridge_requests_total";
pub const REQUEST_DURATION: &str = "segment_bridge_request_duration_seconds";
pub const BATCH_EVENTS: &str = "segment_bridge_batch_events";
pub const RETRIES: &str = "segment_bridge_retries_total";
pub const IN_FLIGHT: &str = "segment_bridge_in_flight_requests";
pub const AMQP_CONNECTED: &str = "segment_bridge_amqp_connected";
pub const AMQP_CONNECTS: &str = "segment_bridge_amqp_connections_total";
pub const AMQP_CHANNEL_REPLACEMENTS: &str = "segment_bridge_amqp_channel_replacements_total";
pub const REGION_MISCONFIGURED: &str = "segment_bridge_region_misconfigured";
pub const REQUEUE_FALLBACKS: &str = "segment_bridge_requeue_fallbacks_total";
pub const HIGH_DELIVERY_COUNT: &str = "segment_bridge_high_delivery_count_total";

const HELP: &[(&str, &str)] = &[
    (
        SESSIONS,
        "Sessions finished, by outcome: delivered, skipped_no_email, skipped_no_opt_in, skipped_not_a_lead, dead_lettered.",
    ),
    (DELIVERIES, "Messages received from RabbitMQ."),
    (
        DEAD_LETTERS,
        "Messages moved to the dead-letter queue, by reason.",
    ),
    (
        REQUEUED,
        "Deliveries handed back to the queue (republished unchanged, then acknowledged), by cause.",
    ),
    (
        REQUEUE_FALLBACKS,
        "Hand-backs whose copy the broker refused, returned with nack(requeue) instead (each spends one of a quorum queue's deliveries).",
    ),
    (
        HIGH_DELIVERY_COUNT,
        "Deliveries whose x-delivery-count was over half of amqp.delivery_limit.",
    ),
    (EVENTS_SENT, "Events Segment accepted, by region."),
    (
        REQUESTS,
        "Requests to Segment, by region and HTTP status (or transport/timeout).",
    ),
    (
        REQUEST_DURATION,
        "Time of one request to Segment, by region.",
    ),
    (BATCH_EVENTS, "Events per request to Segment."),
    (RETRIES, "Retried requests, by region and cause."),
    (IN_FLIGHT, "Requests to Segment under way."),
    (
        AMQP_CONNECTED,
        "1 while connected to RabbitMQ and consuming.",
    ),
    (
        AMQP_CONNECTS,
        "Connections made to RabbitMQ (more than one means reconnects).",
    ),
    (
        AMQP_CHANNEL_REPLACEMENTS,
        "Publishing channels replaced by a fresh one after the broker refused a publish (nack).",
    ),
    (
        REGION_MISCONFIGURED,
        "1 when Segment refused the region's write key or endpoint (401/403/404).",
    ),
];

/// Running totals since start, for the progress and shutdown log lines: a Prometheus
/// counter cannot be read back. One relaxed atomic add per event, beside the counter's.
#[derive(Default)]
struct Totals {
    received: AtomicU64,
    delivered: AtomicU64,
    skipped: AtomicU64,
    dead_lettered: AtomicU64,
    handed_back: AtomicU64,
    released: AtomicU64,
    retries: AtomicU64,
    events_sent: [AtomicU64; 2],
}

/// What the worker has done since it started (see [`Metrics::totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerTotals {
    /// Deliveries received from the broker.
    pub received: u64,
    /// Sessions Segment took (or, in a dry run, written out).
    pub delivered: u64,
    /// Sessions skipped (no email, no opt-in, not a lead): acknowledged, nothing sent.
    pub skipped: u64,
    pub dead_lettered: u64,
    /// Deliveries handed back to the queue for a later attempt.
    pub handed_back: u64,
    /// Deliveries let go unsettled with a lost connection or channel: the broker took
    /// them back and redelivers them (counted again in `received` when it does).
    pub released: u64,
    /// Requests to Segment retried.
    pub retries: u64,
    /// Events Segment took, by region ([`Region`] as index).
    pub events_sent: [u64; 2],
}

impl WorkerTotals {
    /// Deliveries received and not (yet) settled by this worker, nor let go with a lost
    /// connection: held now. At exit: what is left unacknowledged to the broker.
    pub fn unsettled(&self) -> u64 {
        self.received.saturating_sub(
            self.delivered + self.skipped + self.dead_lettered + self.handed_back + self.released,
        )
    }

    /// What happened between `earlier` and `self`; `received` stays the running total's
    /// difference too.
    pub fn since(&self, earlier: &WorkerTotals) -> WorkerTotals {
        WorkerTotals {
            received: self.received - earlier.received,
            delivered: self.delivered - earlier.delivered,
            skipped: self.skipped - earlier.skipped,
            dead_lettered: self.dead_lettered - earlier.dead_lettered,
            handed_back: self.handed_back - earlier.handed_back,
            released: self.released - earlier.released,
            retries: self.retries - earlier.retries,
            events_sent: [
                self.events_sent[0] - earlier.events_sent[0],
                self.events_sent[1] - earlier.events_sent[1],
            ],
        }
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    delivered: Counter,
    skipped_no_email: Counter,
    skipped_no_opt_in: Counter,
    skipped_not_a_lead: Counter,
    dead_lettered: Counter,
    deliveries: Counter,
    events_sent: [Counter; 2],
    batch_events: Histogram,
    in_flight: Gauge,
    amqp_connected: Gauge,
    amqp_connects: Counter,
    channel_replacements: Counter,
    high_delivery_count: Counter,
    totals: Totals,
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION.into()),
                &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(BATCH_EVENTS.into()),
                    &[2.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 2500.0],
                )
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        for (name, help) in HELP {
            let unit = (*name == REQUEST_DURATION).then_some(Unit::Seconds);
            recorder.describe_counter(KeyName::from(*name), unit, (*help).into());
        }
        let handle = recorder.handle();
        let counter = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            recorder.register_counter(&key(name, labels), &METADATA)
        };
        let session = |outcome| counter(SESSIONS, &[("outcome", outcome)]);
        let m = Metrics {
            delivered: session("delivered"),
            skipped_no_email: session("skipped_no_email"),
            skipped_no_opt_in: session("skipped_no_opt_in"),
            skipped_not_a_lead: session("skipped_not_a_lead"),
            dead_lettered: session("dead_lettered"),
            deliveries: counter(DELIVERIES, &[]),
            events_sent: Region::ALL.map(|r| counter(EVENTS_SENT, &[("region", r.as_str())])),
            batch_events: recorder.register_histogram(&key(BATCH_EVENTS, &[]), &METADATA),
            in_flight: recorder.register_gauge(&key(IN_FLIGHT, &[]), &METADATA),
            amqp_connected: recorder.register_gauge(&key(AMQP_CONNECTED, &[]), &METADATA),
            amqp_connects: counter(AMQP_CONNECTS, &[]),
            channel_replacements: counter(AMQP_CHANNEL_REPLACEMENTS, &[]),
            high_delivery_count: counter(HIGH_DELIVERY_COUNT, &[]),
            totals: Totals::default(),
            handle,
            recorder,
        };
        for r in Region::ALL {
            m.set_misconfigured(r, false);
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// What the worker has done since it started.
    pub fn totals(&self) -> WorkerTotals {
        let t = &self.totals;
        WorkerTotals {
            received: t.received.load(Relaxed),
            delivered: t.delivered.load(Relaxed),
            skipped: t.skipped.load(Relaxed),
            dead_lettered: t.dead_lettered.load(Relaxed),
            handed_back: t.handed_back.load(Relaxed),
            released: t.released.load(Relaxed),
            retries: t.retries.load(Relaxed),
            events_sent: [
                t.events_sent[0].load(Relaxed),
                t.events_sent[1].load(Relaxed),
            ],
        }
    }

    pub fn delivery_received(&self) {
        self.deliveries.increment(1);
        self.totals.received.fetch_add(1, Relaxed);
    }

    /// A session finished with `outcome` (see [`SESSIONS`]).
    pub fn sessions(&self, outcome: &str, n: u64) {
        let (counter, total) = match outcome {
            "delivered" => (&self.delivered, &self.totals.delivered),
            "skipped_no_email" => (&self.skipped_no_email, &self.totals.skipped),
            "skipped_no_opt_in" => (&self.skipped_no_opt_in, &self.totals.skipped),
            "skipped_not_a_lead" => (&self.skipped_not_a_lead, &self.totals.skipped),
            "dead_lettered" => (&self.dead_lettered, &self.totals.dead_lettered),
            other => unreachable!("unknown session outcome {other}"),
        };
        counter.increment(n);
        total.fetch_add(n, Relaxed);
    }

    pub fn dead_lettered(&self, reason: &'static str) {
        self.sessions("dead_lettered", 1);
        self.counter(DEAD_LETTERS, &[("reason", reason)])
            .increment(1);
    }

    pub fn requeued(&self, cause: &'static str, n: u64) {
        self.counter(REQUEUED, &[("cause", cause)]).increment(n);
        self.totals.handed_back.fetch_add(n, Relaxed);
    }

    /// Deliveries let go unsettled because their connection or channel was lost: the
    /// broker has them again. Only for the progress and shutdown lines.
    pub fn released(&self, n: u64) {
        self.totals.released.fetch_add(n, Relaxed);
    }

    /// A hand-back fell back to `nack(requeue)`.
    pub fn requeue_fallback(&self) {
        self.counter(REQUEUE_FALLBACKS, &[]).increment(1);
    }

    /// A delivery came with an `x-delivery-count` over half of the known limit.
    pub fn high_delivery_count(&self) {
        self.high_delivery_count.increment(1);
    }

    pub fn events_sent(&self, region: Region, n: u64) {
        self.events_sent[region as usize].increment(n);
        self.totals.events_sent[region as usize].fetch_add(n, Relaxed);
    }

    /// One finished request: its status (a code, `transport` or `timeout`) and duration.
    pub fn request(&self, region: Region, status: &str, events: usize, took: Duration) {
        let labels = [
            Label::new("region", region.as_str()),
            Label::new("status", status.to_owned()),
        ];
        self.recorder
            .register_counter(&Key::from_parts(REQUESTS, labels.to_vec()), &METADATA)
            .increment(1);
        self.recorder
            .register_histogram(
                &key(REQUEST_DURATION, &[("region", region.as_str())]),
                &METADATA,
            )
            .record(took.as_secs_f64());
        self.batch_events.record(events as f64);
    }

    pub fn retry(&self, region: Region, cause: &'static str) {
        self.counter(RETRIES, &[("region", region.as_str()), ("cause", cause)])
            .increment(1);
        self.totals.retries.fetch_add(1, Relaxed);
    }

    pub fn in_flight(&self, delta: f64) {
        self.in_flight.increment(delta);
    }

    /// A dead-letter or hand-back channel replaced after a nack.
    pub fn channel_replaced(&self) {
        self.channel_replacements.increment(1);
    }

    pub fn amqp_connected(&self, connected: bool) {
        if connected {
            self.amqp_connects.increment(1);
        }
        self.amqp_connected.set(f64::from(u8::from(connected)));
    }

    pub fn set_misconfigured(&self, region: Region, misconfigured: bool) {
        self.recorder
            .register_gauge(
                &key(REGION_MISCONFIGURED, &[("region", region.as_str())]),
                &METADATA,
            )
            .set(f64::from(u8::from(misconfigured)));
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::from_static_parts(k, v))
            .collect::<Vec<_>>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_metrics_use_prometheus_names_help_and_labels() {
        let m = Metrics::new();
        m.sessions("delivered", 3);
        m.dead_lettered("invalid_email");
        m.events_sent(Region::Eu, 6);
        m.request(Region::Eu, "200", 6, Duration::from_millis(20));
        m.retry(Region::Us, "throttled");
        let text = m.render();
        for line in [
            "segment_bridge_sessions_total{outcome=\"delivered\"} 3",
            "segment_bridge_sessions_total{outcome=\"dead_lettered\"} 1",
            "segment_bridge_dead_letters_total{reason=\"invalid_email\"} 1",
            "segment_bridge_events_sent_total{region=\"eu\"} 6",
            "segment_bridge_requests_total{region=\"eu\",status=\"200\"} 1",
            "segment_bridge_retries_total{region=\"us\",cause=\"throttled\"} 1",
            "segment_bridge_request_duration_seconds_bucket{region=\"eu\",le=\"0.025\"} 1",
            "segment_bridge_region_misconfigured{region=\"us\"} 0",
            "# HELP segment_bridge_sessions_total Sessions finished",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn totals_count_what_the_counters_count_and_tell_what_is_unsettled() {
        let m = Metrics::new();
        for _ in 0..7 {
            m.delivery_received();
        }
        m.sessions("delivered", 3);
        m.sessions("skipped_no_email", 1);
        m.sessions("skipped_not_a_lead", 1);
        m.dead_lettered("invalid_email");
        m.requeued("shutdown", 1);
        m.retry(Region::Us, "transport");
        m.events_sent(Region::Eu, 6);
        let before = m.totals();
        assert_eq!(
            before,
            WorkerTotals {
                received: 7,
                delivered: 3,
                skipped: 2,
                dead_lettered: 1,
                handed_back: 1,
                released: 0,
                retries: 1,
                events_sent: [0, 6],
            }
        );
        assert_eq!(before.unsettled(), 0);
        m.delivery_received();
        m.events_sent(Region::Us, 2);
        let delta = m.totals().since(&before);
        assert_eq!(delta.received, 1);
        assert_eq!(delta.events_sent, [2, 0]);
        assert_eq!(m.totals().unsettled(), 1, "received, not yet settled");
        m.released(1);
        assert_eq!(
            m.totals().unsettled(),
            0,
            "let go with a lost connection: the broker's again, not held"
        );
    }

    #[test]
    fn two_workers_in_one_process_count_apart() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.sessions("delivered", 1);
        assert!(!b.render().contains("outcome=\"delivered\"} 1"));
    }
}

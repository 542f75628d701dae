//! The test kit (`segment-bridge-testkit`) for these tests, and what only they add: the
//! binary's path and `segment-bridge run` started against a test's queues and fake.

pub use segment_bridge_testkit::app::*;
pub use segment_bridge_testkit::broker::*;
pub use segment_bridge_testkit::eventually::*;
pub use segment_bridge_testkit::launch::*;
pub use segment_bridge_testkit::segment::*;

/// The binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_segment-bridge");

/// `segment-bridge <command>` with an empty config file, `RUST_LOG=info` and the given
/// `SEGMENT_BRIDGE__<KEY>` settings (later ones win).
pub fn bridge<'a>(command: &str, settings: impl IntoIterator<Item = (&'a str, String)>) -> Bridge {
    let mut bridge = Bridge::new(BIN, &[command]);
    bridge.config_file("").env("RUST_LOG", "info");
    for (key, value) in settings {
        bridge.set(key, &value);
    }
    bridge
}

/// `segment-bridge run` against the test's queues and fake Segment (us), with short
/// timers and its side port on a free port; `settings` come last and win.
pub fn daemon(queues: &Queues, us: &FakeSegment, settings: &[(&str, &str)]) -> Running {
    let mut bridge = worker_bridge(queues, &us.url());
    for (key, value) in settings {
        bridge.set(key, value);
    }
    bridge.spawn()
}

/// `segment-bridge run`, not yet started, against the test's queues, region us posting to
/// `endpoint`, with short timers and its side port on a free port.
pub fn worker_bridge(queues: &Queues, endpoint: &str) -> Bridge {
    let base = [
        ("AMQP__URL", AMQP_URL.to_owned()),
        ("AMQP__QUEUE", queues.main.clone()),
        ("AMQP__DEAD_LETTER_QUEUE", queues.dead.clone()),
        ("SEGMENT__US__ENDPOINT", endpoint.to_owned()),
        ("SEGMENT__US__WRITE_KEY", US_KEY.to_owned()),
        ("SEGMENT__FLUSH_INTERVAL_MS", "50".to_owned()),
        ("RETRY__INITIAL_BACKOFF_MS", "10".to_owned()),
        ("RETRY__MAX_BACKOFF_MS", "200".to_owned()),
    ];
    let mut bridge = bridge("run", base);
    bridge.probes();
    bridge
}

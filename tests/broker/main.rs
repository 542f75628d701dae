//! Tests that change the broker itself: a restart, a lowered consumer timeout. They run
//! only when `SEGMENT_BRIDGE_TEST_BROKER_RESTART=1` is set (`.ci/run` sets it): a
//! developer's broker is not theirs to restart. They run in
//! a test binary of their own (cargo runs test binaries one after another), each holding
//! the broker lock exclusively (no other test, run or benchmark uses the broker
//! meanwhile), and each puts the broker back as it found it when it ends, also when it
//! fails.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use segment_bridge_testkit::app::{config, spawn_app, spawn_app_segment_down};
use segment_bridge_testkit::broker::{
    BrokerLock, BrokerSettings, Queues, StoppedBroker, restarts_allowed, wait_drained,
};
use segment_bridge_testkit::segment::{
    fake_segment, message_ids_of, publish_sessions, tracked, wait_all_tracked,
};

const WITHIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_midway_loses_no_session_and_dead_letters_none() {
    if !restarts_allowed() {
        return;
    }
    let _lock = BrokerLock::exclusive();
    let queues = Queues::quorum("broker-restart", 5).await;
    let us = fake_segment(200, Duration::from_millis(100)).await;
    let mut config = config(&queues, Some(&us), None);
    // Ten sessions a request, one request at a time: a stream of about 10 s.
    config.segment.max_batch_events = 20;
    config.segment.max_in_flight = 1;
    let app = spawn_app(config).await;
    let ids = publish_sessions(&queues, "b", 1000).await;
    us.wait_accepted(200, WITHIN).await;

    let stopped = StoppedBroker::stop().await;
    app.wait_until("the worker noticed", WITHIN, |a| {
        a.health.readiness().is_err()
    })
    .await;
    let during = tracked(&us.accepted()).len();
    assert!(during < ids.len(), "stopped midway: {during} delivered");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stopped.start().await;

    wait_all_tracked(&us, &ids, WITHIN).await;
    app.wait_until("ready again", WITHIN, |a| a.health.readiness().is_ok())
        .await;
    wait_drained(&queues.main).await;
    assert!(app.metric("segment_bridge_amqp_connections_total") >= 2.0);
    app.stop().await;
    assert_eq!(queues.ready().await, (0, 0), "nothing dead-lettered");
    let tracks = message_ids_of(&us.accepted(), "track");
    let unique: BTreeSet<_> = tracks.iter().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "a resend carries the same messageId"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_by_the_consumer_timeout_is_reopened_and_every_session_arrives_once() {
    if !restarts_allowed() {
        return;
    }
    let _lock = BrokerLock::exclusive();
    // RabbitMQ closes a channel whose delivery stays unacknowledged past consumer_timeout,
    // checked on each channel tick: 5 s and 1 s here instead of 30 min and 60 s.
    let _settings = BrokerSettings::set(&[
        ("consumer_timeout", "5000"),
        ("channel_tick_interval", "1000"),
    ]);
    let queues = Queues::quorum("consumer-timeout", 5).await;
    // Holding longer than the broker's timeout, so that the broker acts first.
    let (app, us, up) = spawn_app_segment_down(&queues, 60).await;
    let ids = publish_sessions(&queues, "t", 50).await;

    app.wait_until(
        "the broker closed the channel and the worker reconnected",
        WITHIN,
        |a| {
            a.metric("segment_bridge_amqp_connections_total") >= 2.0 && a.health.readiness().is_ok()
        },
    )
    .await;
    up.store(true, Ordering::SeqCst);
    wait_all_tracked(&us, &ids, WITHIN).await;
    queues.wait_ready((0, 0), WITHIN).await;
    wait_drained(&queues.main).await;
    app.stop().await;

    // Segment was down until the new channel took over: the first channel's deliveries
    // were never sent, so each session arrives once, under one messageId per event.
    for kind in ["identify", "track"] {
        let sent = message_ids_of(&us.accepted(), kind);
        let unique: BTreeSet<_> = sent.iter().collect();
        assert_eq!(sent.len(), ids.len(), "{kind}: one each, no duplicate");
        assert_eq!(unique.len(), ids.len());
    }
}

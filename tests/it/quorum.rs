//! Nothing lost to the broker: quorum queues with a small `x-delivery-limit`, where every
//! `nack(requeue)` and every delivery left to a closing channel counts, and the message is
//! dropped once the count passes the limit. Each test hands the same sessions back far
//! more often than the limit would allow with plain requeues, then checks that every one
//! of them still arrives. Also: several workers competing for one queue, one of them
//! killed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions};

use segment_bridge::domain::Region;

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(30);

const HANDED_BACK_MAX_HOLD: &str = "segment_bridge_deliveries_requeued_total{cause=\"max_hold\"}";
const FALLBACKS: &str = "segment_bridge_requeue_fallbacks_total";

/// A quorum queue with a delivery limit of 3 holding `n` sessions (ids `<prefix>000`…),
/// and a fake Segment that answers every request with `status`.
async fn failing_segment(
    test: &str,
    status: u16,
    prefix: &str,
    n: usize,
) -> (Queues, FakeSegment, Vec<String>) {
    let queues = Queues::quorum(test, 3).await;
    let segment = fake_segment(status, Duration::ZERO).await;
    let ids = publish_sessions(&queues, prefix, n).await;
    (queues, segment, ids)
}

/// A worker against a healthy Segment delivers every one of `ids` and leaves the queues
/// empty.
async fn deliver_all(queues: &Queues, ids: &[String]) {
    let good = FakeSegment::ok().await;
    let app = spawn_app(config(queues, Some(&good), None)).await;
    wait_all_tracked(&good, ids, WITHIN).await;
    queues.wait_ready((0, 0), WITHIN).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_outage_far_past_the_delivery_limit_loses_no_session_on_a_quorum_queue() {
    let queues = Queues::quorum("qq-outage", 3).await;
    let (app, us, up) = spawn_app_segment_down(&queues, 1).await;
    let ids = publish_sessions(&queues, "o", 100).await;

    // Each delivery is held for a second and handed back, again and again: six times each,
    // twice what the queue's limit of 3 returns allows.
    app.wait_until("every session was handed back 6 times", WITHIN, |a| {
        a.metric(HANDED_BACK_MAX_HOLD) >= 600.0
    })
    .await;
    up.store(true, Ordering::SeqCst);
    wait_all_tracked(&us, &ids, WITHIN).await;
    queues.wait_ready((0, 0), WITHIN).await;
    let metrics = app.metrics.clone();
    app.stop().await;
    assert_eq!(
        queues.ready().await,
        (0, 0),
        "nothing left, nothing dead-lettered"
    );
    assert_eq!(
        metric(&metrics.render(), FALLBACKS),
        0.0,
        "no hand-back spent a delivery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_key_refused_across_many_restarts_loses_no_session_on_a_quorum_queue() {
    let (queues, refused, ids) = failing_segment("qq-refused", 401, "r", 50).await;

    // Five workers in a row take the sessions, are refused, and give them back: each
    // session goes back five times, more than the limit of 3 returns allows.
    for round in 0..5 {
        let app = spawn_app(config(&queues, Some(&refused), None)).await;
        app.wait_until("the key was refused", WITHIN, |a| {
            a.health.is_misconfigured(Region::Us)
        })
        .await;
        queues.wait_ready((50, 0), WITHIN).await;
        app.stop().await;
        assert_eq!(
            queues.ready().await,
            (50, 0),
            "round {round}: every session is back in the queue"
        );
    }
    deliver_all(&queues, &ids).await;
    assert!(
        refused.requests().len() >= 5,
        "each round reached the refusing Segment"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_again_and_again_while_segment_is_down_loses_no_session_on_a_quorum_queue() {
    let (queues, down, ids) = failing_segment("qq-shutdown", 503, "s", 100).await;

    // Each worker is stopped as soon as deliveries arrive, while more are still on their
    // way: what it holds, and what the broker had already sent it, goes back unspent.
    for round in 0..5 {
        let mut config = config(&queues, Some(&down), None);
        config.shutdown.grace_period_s = 2;
        let app = spawn_app(config).await;
        app.wait_until("deliveries arrived", WITHIN, |a| {
            a.metric("segment_bridge_deliveries_received_total") >= 1.0
        })
        .await;
        let metrics = app.metrics.clone();
        app.stop().await;
        queues.wait_ready((100, 0), WITHIN).await;
        assert_eq!(metric(&metrics.render(), FALLBACKS), 0.0, "round {round}");
    }
    deliver_all(&queues, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_broker_refuses_is_held_and_handed_back_until_it_lands_once() {
    // A limit of 1: a plain requeue every 5 s (the old behaviour) loses the message in 10 s.
    let queues = Queues::quorum("qq-dead", 1).await;
    let us = FakeSegment::ok().await;
    let mut config = config(&queues, Some(&us), None);
    config.retry.max_hold_s = 3;
    config.amqp.declare = false;
    let app = spawn_app(config).await;
    app.wait_until("consuming", WITHIN, |a| a.health.readiness().is_ok())
        .await;
    queues.set_dead_letter_queue(false).await;
    let bad: Vec<String> = (0..5).map(|i| format!("not json {i}")).collect();
    queues.publish(&bad).await;

    // The dead-letter queue is missing for 12 s: each dead letter is returned by the broker,
    // retried, and after the 3 s hold limit handed back to the main queue, several times.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        app.metric("segment_bridge_deliveries_requeued_total{cause=\"dead_letter_unconfirmed\"}")
            >= 10.0,
        "the dead letters were handed back while their queue was missing"
    );
    queues.set_dead_letter_queue(true).await;
    queues.wait_ready((0, 5), WITHIN).await;
    assert_eq!(app.metric(FALLBACKS), 0.0);
    app.stop().await;
    let dead = queues.take_dead().await;
    let mut bodies: Vec<String> = dead
        .iter()
        .map(|(b, _)| String::from_utf8(b.clone()).unwrap())
        .collect();
    bodies.sort();
    assert_eq!(bodies, bad, "exactly one copy of each, unchanged");
    for (_, properties) in &dead {
        assert!(error_header(properties).contains("not valid JSON"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_near_the_queues_delivery_limit_is_logged_and_counted_and_still_delivered() {
    let queues = Queues::quorum("qq-count", 4).await;
    let us = FakeSegment::ok().await;
    queues.publish([session("near-limit", "us")]).await;
    // Three returns by some other consumer: the next delivery is its fourth, count 3 > 4 / 2.
    let channel = queues.channel().await;
    for _ in 0..3 {
        let got = channel
            .basic_get(queues.main.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("the session is there");
        channel
            .basic_nack(
                got.delivery.delivery_tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await
            .unwrap();
    }
    let mut config = config(&queues, Some(&us), None);
    config.amqp.delivery_limit = 4;
    let app = spawn_app(config).await;
    us.wait_accepted(2, WITHIN).await;
    assert_eq!(app.metric("segment_bridge_high_delivery_count_total"), 1.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_competing_workers_one_killed_midway_deliver_every_session_with_one_message_id_per_event()
 {
    let queues = Queues::quorum("qq-replicas", 3).await;
    // Slow enough that the stream outlasts the kill on a busy machine: each worker takes
    // at most 2 requests of 20 sessions per 250 ms.
    let us = fake_segment(200, Duration::from_millis(250)).await;
    let settings = [
        ("AMQP__PREFETCH", "100"),
        ("SEGMENT__MAX_BATCH_EVENTS", "40"),
        ("SEGMENT__MAX_IN_FLIGHT", "2"),
    ];
    let mut daemons: Vec<Running> = (0..3).map(|_| daemon(&queues, &us, &settings)).collect();
    for d in &daemons {
        d.wait_ready(WAIT).await;
    }
    // At most about 480 sessions/s with three workers: a stream of over 6 s, killed after
    // about a fifth of it.
    let ids = publish_sessions(&queues, "c", 3000).await;
    us.wait_accepted(600, WITHIN).await;

    let mut killed = daemons.remove(0);
    killed.signal("KILL");
    let (status, _) = killed.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), None, "killed by the signal");
    let before = tracked(&us.accepted()).len();
    assert!(before < ids.len(), "killed midway: {before} delivered");

    wait_all_tracked(&us, &ids, Duration::from_secs(60)).await;
    wait_drained(&queues.main).await;
    for d in &daemons {
        assert!(
            d.metric("segment_bridge_deliveries_received_total").await > 0.0,
            "both survivors took part"
        );
    }
    for d in &mut daemons {
        d.signal("TERM");
        let (status, _) = d.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(0), "{}", d.stderr());
    }
    assert_eq!(queues.ready().await, (0, 0), "nothing dead-lettered");
    let ids_per_event = message_ids_by_event(&us.accepted());
    assert_eq!(
        ids_per_event.len(),
        2 * ids.len(),
        "an Identify and a Track each"
    );
    for (event, message_ids) in ids_per_event {
        assert_eq!(
            message_ids.len(),
            1,
            "{event:?} was sent again with another messageId: {message_ids:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_while_the_dead_letter_queue_is_missing_hands_the_dead_letter_back_within_the_grace_period()
 {
    let queues = Queues::quorum("qq-dead-shutdown", 3).await;
    let us = fake_segment(200, Duration::from_secs(1)).await;
    let mut config = config(&queues, Some(&us), None);
    config.amqp.declare = false;
    config.retry.max_hold_s = 60;
    config.shutdown.grace_period_s = 3;
    let app = spawn_app(config).await;
    app.wait_until("consuming", WITHIN, |a| a.health.readiness().is_ok())
        .await;
    queues.set_dead_letter_queue(false).await;
    // The bad message comes first: its tag is the lowest, and after the cancel the
    // others' acks wait for it.
    queues.publish(["not json"]).await;
    let ids = publish_sessions(&queues, "g", 20).await;
    app.wait_until("every delivery arrived", WITHIN, |a| {
        a.metric("segment_bridge_deliveries_received_total") >= 21.0
    })
    .await;
    // The dead letter is being retried (its queue is missing) and the 20 are at Segment.
    app.stop().await;
    wait_all_tracked(&us, &ids, WITHIN).await;
    queues.set_dead_letter_queue(true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let back = queues.take_main().await;
    assert_eq!(
        back.len(),
        1,
        "only the bad message is back; every accepted session was acknowledged"
    );
    assert_eq!(back[0].0, b"not json");
    assert_eq!(
        segment_bridge::amqp::headers::delivery_count(&back[0].1),
        Some(0),
        "it is a fresh copy: no delivery spent"
    );
}

/// A dead letter the broker nacks (its queue full, `reject-publish`) replaces the
/// dead-letter channel with a fresh one before the retry, and lands once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_dead_letter_gets_a_fresh_channel_and_lands_once_there_is_room() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let queues = Queues::new("dl-nack").await;
    queues.set_dead_letter_queue(false).await;
    let mut full = FieldTable::default();
    full.insert("x-max-length".into(), AMQPValue::LongInt(0));
    full.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let channel = queues.channel().await;
    channel
        .queue_declare(
            queues.dead.as_str().into(),
            QueueDeclareOptions::durable(),
            full,
        )
        .await
        .unwrap();
    let us = FakeSegment::ok().await;
    let mut config = config(&queues, Some(&us), None);
    config.amqp.declare = false;
    let app = spawn_app(config).await;
    app.wait_until("consuming", WITHIN, |a| a.health.readiness().is_ok())
        .await;
    let bad: Vec<String> = (0..2).map(|i| format!("not json {i}")).collect();
    queues.publish(&bad).await;
    app.wait_until("a nacked dead letter replaced its channel", WITHIN, |a| {
        a.metric("segment_bridge_amqp_channel_replacements_total") >= 1.0
    })
    .await;
    queues.set_dead_letter_queue(false).await;
    queues.set_dead_letter_queue(true).await;
    // A refused dead letter is tried again after 1, 2, 4, … up to 30 s, one at a time:
    // on a busy machine the second may be in a long wait when the queue gets room.
    queues.wait_ready((0, 2), Duration::from_secs(45)).await;
    app.stop().await;
    let mut bodies: Vec<String> = queues
        .take_dead()
        .await
        .iter()
        .map(|(b, _)| String::from_utf8(b.clone()).unwrap())
        .collect();
    bodies.sort();
    assert_eq!(bodies, bad, "exactly one copy of each");
}

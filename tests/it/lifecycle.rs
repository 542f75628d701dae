//! The worker's life: signals, a lost broker connection, the hold limit, a Segment that is
//! down, and a restart after a refused write key.
//!
//! Tests of signals and of start-up run the real binary (`segment-bridge run`) as a child
//! process; the others run the worker in-process so that they can read its metrics
//! directly. Broker-side events (a closed connection, refused permissions) are made with
//! `rabbitmqctl`, on a user of the test's own where permissions change.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(15);

// 1. Signals -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_midway_through_a_slow_stream_sends_what_is_held_and_exits_0_within_the_grace_period()
 {
    let queues = Queues::new("sigterm-stream").await;
    // 4 requests of 5 sessions in flight, 400 ms each: 50 sessions/s, so the 400 sessions
    // the worker takes at once cannot all be sent within the 3 s grace period.
    let us = fake_segment(200, Duration::from_millis(400)).await;
    let ids = session_ids("t", 400);
    let mut daemon = daemon(
        &queues,
        &us,
        &[
            ("SEGMENT__MAX_BATCH_EVENTS", "10"),
            ("SHUTDOWN__GRACE_PERIOD_S", "3"),
        ],
    );
    daemon.wait_ready(WAIT).await;
    queues.publish(bodies(&ids)).await;
    us.wait_accepted(40, WITHIN).await;

    let signalled = daemon.signal("TERM");
    let (status, exited) = daemon.wait_exit(Duration::from_secs(10)).await;
    let log = daemon.stderr();
    assert_eq!(status.code(), Some(0), "exit code 0 after SIGTERM:\n{log}");
    assert!(
        exited - signalled < Duration::from_secs(3) + Duration::from_millis(1500),
        "exited {:?} after SIGTERM, grace period 3 s:\n{log}",
        exited - signalled
    );

    let accepted = tracked(&us.accepted());
    let back = take_back(&queues, &us, ids.len()).await;
    assert!(
        !accepted.is_empty() && accepted.len() < ids.len(),
        "the signal came midway: {} of {} accepted",
        accepted.len(),
        ids.len()
    );
    let back_set: BTreeSet<String> = back.iter().cloned().collect();
    assert_eq!(back.len(), back_set.len(), "each message back once");
    let lost: Vec<_> = all(&ids)
        .difference(&accepted)
        .filter(|id| !back_set.contains(*id))
        .cloned()
        .collect();
    assert!(lost.is_empty(), "sessions lost: {lost:?}\n{log}");
    // The grace period runs out with requests under way: only their sessions (at most 4
    // requests of 5) may be both taken by Segment and redelivered; every other accepted
    // session was acknowledged.
    let both: Vec<_> = accepted.intersection(&back_set).collect();
    assert!(
        both.len() <= 20,
        "sessions Segment accepted were not acknowledged before the exit: {both:?}\n{log}"
    );
    // What it held when the signal came (batches waiting for a request slot, the batch
    // being gathered) was sent after it, not dropped.
    assert!(
        us.requests().iter().any(|r| r.at > signalled),
        "nothing was sent after SIGTERM:\n{log}"
    );
    assert_eq!(queues.ready().await, (0, 0), "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_flushes_a_batch_still_waiting_for_its_flush_interval_and_exits_0() {
    let queues = Queues::new("sigint-flush").await;
    let us = FakeSegment::ok().await;
    let ids = session_ids("i", 3);
    let mut daemon = daemon(
        &queues,
        &us,
        &[
            ("SEGMENT__FLUSH_INTERVAL_MS", "20000"),
            // No early flush when the stream goes quiet: the batch must still be waiting.
            ("SEGMENT__FLUSH_IDLE_MS", "0"),
            ("SHUTDOWN__GRACE_PERIOD_S", "5"),
        ],
    );
    daemon.wait_ready(WAIT).await;
    queues.publish(bodies(&ids)).await;
    eventually("the daemon took 3 sessions", WITHIN, async || {
        daemon
            .metric("segment_bridge_deliveries_received_total")
            .await
            >= 3.0
    })
    .await;
    assert!(us.requests().is_empty(), "the batch waits for its interval");

    let signalled = daemon.signal("INT");
    let (status, exited) = daemon.wait_exit(Duration::from_secs(10)).await;
    let log = daemon.stderr();
    assert_eq!(status.code(), Some(0), "exit code 0 after SIGINT:\n{log}");
    assert!(
        exited - signalled < Duration::from_secs(3),
        "the held batch goes at once, not after its 20 s interval: took {:?}\n{log}",
        exited - signalled
    );
    assert_eq!(tracked(&us.accepted()), all(&ids), "{log}");
    assert_eq!(us.accepted().len(), 6, "sent once");
    assert_eq!(queues.ready().await, (0, 0), "acknowledged before exiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_segment_is_down_exits_0_within_the_grace_period_and_every_session_goes_back_to_the_queue()
 {
    let queues = Queues::new("sigterm-down").await;
    let us = fake_segment(503, Duration::ZERO).await;
    let ids = session_ids("d", 30);
    let mut daemon = daemon(&queues, &us, &[("SHUTDOWN__GRACE_PERIOD_S", "2")]);
    daemon.wait_ready(WAIT).await;
    queues.publish(bodies(&ids)).await;
    let done = wait_until(WITHIN, async || us.requests().len() >= 3).await;
    assert!(done.is_ok(), "the daemon never tried Segment");
    assert_eq!(queues.ready().await.0, 0, "the daemon holds all 30");

    let signalled = daemon.signal("TERM");
    let (status, exited) = daemon.wait_exit(Duration::from_secs(10)).await;
    let log = daemon.stderr();
    assert_eq!(status.code(), Some(0), "exit code 0 after SIGTERM:\n{log}");
    let took = exited - signalled;
    assert!(
        took < Duration::from_secs(2) + Duration::from_millis(1500),
        "exited {took:?} after SIGTERM, grace period 2 s:\n{log}"
    );
    assert!(us.accepted().is_empty());
    queues.wait_ready((30, 0), Duration::from_secs(5)).await;
    let back = session_ids_of(&queues.take_main().await);
    assert_eq!(all(&back), all(&ids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_midway_a_new_worker_delivers_every_session_at_least_once() {
    let queues = Queues::new("kill9").await;
    let us = fake_segment(200, Duration::from_millis(100)).await;
    let ids = session_ids("k", 100);
    let mut daemon = daemon(&queues, &us, &[("SEGMENT__MAX_BATCH_EVENTS", "10")]);
    daemon.wait_ready(WAIT).await;
    queues.publish(bodies(&ids)).await;
    us.wait_accepted(20, WITHIN).await;

    daemon.signal("KILL");
    let (status, _) = daemon.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), None, "killed by the signal");
    let before = tracked(&us.accepted());
    assert!(
        !before.is_empty() && before.len() < ids.len(),
        "killed midway: {} of {} accepted",
        before.len(),
        ids.len()
    );

    let app = spawn_app(config(&queues, Some(&us), None)).await;
    let done = wait_until(WITHIN, async || tracked(&us.accepted()) == all(&ids)).await;
    assert!(
        done.is_ok(),
        "sessions never delivered: {:?}",
        all(&ids)
            .difference(&tracked(&us.accepted()))
            .collect::<Vec<_>>()
    );
    assert!(
        app.metric("segment_bridge_deliveries_received_total") > 0.0,
        "the new worker took the killed one's deliveries"
    );
    wait_drained(&queues.main).await;
    app.stop().await;
    assert_eq!(queues.ready().await, (0, 0));
    let accepted = us.accepted();
    let track_ids: BTreeSet<_> = accepted
        .iter()
        .filter(|e| e["type"] == "track")
        .map(|e| e["messageId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        track_ids.len(),
        ids.len(),
        "a session sent twice carries the same messageId both times"
    );
}

// 2. A lost broker connection -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_by_the_broker_is_reopened_and_consumption_resumes() {
    let queues = Queues::new("conn-closed").await;
    let us = fake_segment(200, Duration::from_millis(200)).await;
    let mut config = config(&queues, Some(&us), None);
    config.segment.max_batch_events = 10;
    config.segment.max_in_flight = 2;
    let app = spawn_app(config).await;
    app.wait_until("connected", WITHIN, |a| {
        a.metric("segment_bridge_amqp_connected") == 1.0
    })
    .await;
    let connection = worker_connection(&queues.main).await;
    let ids = publish_sessions(&queues, "c", 200).await;
    us.wait_accepted(20, WITHIN).await;

    rabbitmqctl(&["close_connection", &connection, "closed by a test"]).await;
    let closed = Instant::now();
    let before = tracked(&us.accepted());
    assert!(
        before.len() < ids.len(),
        "the connection was closed midway: {} of {} accepted",
        before.len(),
        ids.len()
    );
    app.wait_until("it reconnects", WITHIN, |a| {
        a.metric("segment_bridge_amqp_connections_total") >= 2.0
    })
    .await;
    let done = wait_until(WITHIN, async || tracked(&us.accepted()) == all(&ids)).await;
    assert!(
        done.is_ok(),
        "{} of {} sessions delivered after the reconnect",
        tracked(&us.accepted()).len(),
        ids.len()
    );
    assert!(
        us.requests().iter().any(|r| r.at > closed),
        "it sent more after the connection was closed"
    );
    app.wait_until("ready again", WITHIN, |a| {
        a.metric("segment_bridge_amqp_connected") == 1.0
    })
    .await;
    assert_eq!(app.probe("/readyz").await.0, 200);
    wait_drained(&queues.main).await;
    app.stop().await;
    assert_eq!(queues.ready().await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_the_broker_refuses_is_not_ready_until_it_reconnects_and_then_delivers_everything()
{
    let queues = Queues::new("conn-refused").await;
    let user = BrokerUser::new().await;
    let us = FakeSegment::ok().await;
    let mut config = config(&queues, Some(&us), None);
    config.amqp.url = SecretString::from(user.url());
    let app = spawn_app(config).await;
    app.wait_until("connected", WITHIN, |a| {
        a.metric("segment_bridge_amqp_connected") == 1.0
    })
    .await;
    let first = session_ids("a", 20);
    queues.publish(bodies(&first)).await;
    us.wait_accepted(40, WITHIN).await;
    assert_eq!(app.probe("/readyz").await.0, 200);

    // The broker drops the worker and refuses it until its permissions come back.
    user.deny().await;
    assert_eq!(
        user.close_connections().await,
        2,
        "a consuming and a publishing connection per worker"
    );
    app.wait_until("it notices", WITHIN, |a| {
        a.metric("segment_bridge_amqp_connected") == 0.0
    })
    .await;
    let (status, why) = app.probe("/readyz").await;
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("not connected"), "{why}");
    assert_eq!(app.probe("/healthz").await.0, 200, "alive all the same");
    let second = session_ids("b", 20);
    queues.publish(bodies(&second)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(queues.ready().await, (20, 0), "nothing consumed meanwhile");
    assert_eq!(app.probe("/readyz").await.0, 503);

    user.allow().await;
    app.wait_until("it reconnects", WITHIN, |a| {
        a.metric("segment_bridge_amqp_connections_total") >= 2.0
    })
    .await;
    let everything: Vec<String> = first.iter().chain(&second).cloned().collect();
    let done = wait_until(WITHIN, async || tracked(&us.accepted()) == all(&everything)).await;
    assert!(done.is_ok(), "not everything delivered");
    assert_eq!(app.probe("/readyz").await.0, 200);
    wait_drained(&queues.main).await;
    app.stop().await;
    assert_eq!(queues.ready().await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_while_the_broker_refuses_it_stays_up_not_ready_and_consumes_once_let_in()
{
    let queues = Queues::new("start-refused").await;
    let user = BrokerUser::new().await;
    user.deny().await;
    let us = FakeSegment::ok().await;
    let ids = publish_sessions(&queues, "s", 10).await;
    let url = user.url();
    let mut daemon = daemon(
        &queues,
        &us,
        &[("AMQP__URL", &url), ("SHUTDOWN__GRACE_PERIOD_S", "5")],
    );
    let done = wait_until(WITHIN, async || {
        daemon.get("/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
    assert!(done.is_ok(), "no side port:\n{}", daemon.stderr());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, why) = daemon.get("/readyz").await.unwrap();
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("not connected"), "{why}");
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "it keeps trying"
    );
    assert_eq!(queues.ready().await, (10, 0));

    user.allow().await;
    daemon.wait_ready(WAIT).await;
    let done = wait_until(WITHIN, async || tracked(&us.accepted()) == all(&ids)).await;
    assert!(done.is_ok(), "not delivered:\n{}", daemon.stderr());
    daemon.signal("TERM");
    let (status, _) = daemon.wait_exit(Duration::from_secs(7)).await;
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    assert_eq!(queues.ready().await, (0, 0));
}

// 3. The hold limit ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_held_past_max_hold_are_requeued_and_delivered_once_segment_recovers() {
    let queues = Queues::new("max-hold").await;
    // Down for 2.5 s from the first request, then up.
    let first: Arc<Mutex<Option<Instant>>> = Arc::default();
    let us = {
        let first = first.clone();
        FakeSegment::start(move |_, _| {
            let at = *first.lock().unwrap().get_or_insert_with(Instant::now);
            Reply::status(if at.elapsed() < Duration::from_millis(2500) {
                503
            } else {
                200
            })
        })
        .await
    };
    let mut config = config(&queues, Some(&us), None);
    config.retry.max_hold_s = 1;
    let app = spawn_app(config).await;
    let ids = publish_sessions(&queues, "h", 20).await;

    app.wait_until("held deliveries are requeued", WITHIN, |a| {
        a.metric(r#"segment_bridge_deliveries_requeued_total{cause="max_hold"}"#) > 0.0
    })
    .await;
    let requeued_after = first.lock().unwrap().unwrap().elapsed();
    assert!(
        us.accepted().is_empty() && requeued_after < Duration::from_millis(2500),
        "requeued after about 1 s, while Segment was still down (after {requeued_after:?})"
    );
    let done = wait_until(WITHIN, async || tracked(&us.accepted()) == all(&ids)).await;
    assert!(done.is_ok(), "not delivered after the recovery");
    assert!(
        app.metric("segment_bridge_deliveries_received_total") > 20.0,
        "the requeued deliveries came back from the broker"
    );
    wait_drained(&queues.main).await;
    app.stop().await;
    assert_eq!(queues.ready().await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_delivery_stays_unacknowledged_past_max_hold_not_even_one_waiting_behind_others() {
    let queues = Queues::new("max-hold-backlog").await;
    let (us, up) = FakeSegment::down_until_up().await;
    // One session per request, one request at a time: most of the prefetch window waits
    // behind the batch being retried.
    let mut config = config(&queues, Some(&us), None);
    config.amqp.prefetch = 50;
    config.segment.max_batch_events = 2;
    config.segment.max_in_flight = 1;
    config.retry.max_hold_s = 1;
    let app = spawn_app(config).await;
    app.wait_until("connected", WITHIN, |a| {
        a.metric("segment_bridge_amqp_connected") == 1.0
    })
    .await;
    let ids = publish_sessions(&queues, "q", 50).await;
    // From here on the worker holds all 50, unacknowledged.
    queues.wait_ready((0, 0), Duration::from_secs(2)).await;
    let held_since = Instant::now();

    tokio::time::sleep(Duration::from_millis(3500)).await;
    // Every session not yet tried at Segment has been with the worker since `held_since`,
    // over 3 times max_hold, unless it was requeued (and taken again) meanwhile: so each
    // needs at least one requeue of its own.
    let requeued = app.metric(r#"segment_bridge_deliveries_requeued_total{cause="max_hold"}"#);
    let tried = tracked(
        &us.requests()
            .iter()
            .flat_map(|r| r.events())
            .collect::<Vec<_>>(),
    );
    let untried = ids.len() - tried.len();
    let held = held_since.elapsed();

    // Recover and clean up first, so that a failure leaves no worker behind.

    up.store(true, Ordering::SeqCst);
    let done = wait_until(WITHIN, async || tracked(&us.accepted()) == all(&ids)).await;
    assert!(done.is_ok(), "not delivered after the recovery");
    wait_drained(&queues.main).await;
    app.stop().await;
    assert!(
        requeued >= untried as f64,
        "{untried} sessions held for {held:?} without being sent or requeued \
         (retry.max_hold_s = 1; only {requeued} requeues): deliveries waiting behind a \
         retried batch are held past the hold limit"
    );
}

// 4. Segment down ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_segment_is_down_the_worker_holds_no_more_than_prefetch_and_delivers_all_after_recovery()
 {
    let queues = Queues::new("bounded").await;
    let (us, up) = FakeSegment::down_until_up().await;
    let mut config = config(&queues, Some(&us), None);
    config.amqp.prefetch = 50;
    let app = spawn_app(config).await;
    let ids = publish_sessions(&queues, "m", 300).await;

    let done = wait_until(WITHIN, async || us.requests().len() >= 5).await;
    assert!(done.is_ok(), "the worker never tried Segment");
    for _ in 0..5 {
        let (ready, dead) = queues.ready().await;
        assert!(ready >= 250, "the worker took {} of 300", 300 - ready);
        assert_eq!(dead, 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.metric("segment_bridge_deliveries_received_total"),
        50.0,
        "it holds exactly a prefetch window"
    );
    let attempted: usize = us
        .requests()
        .iter()
        .map(|r| r.events().len())
        .max()
        .unwrap();
    assert!(attempted <= 100, "no batch beyond the 50 held sessions");

    up.store(true, Ordering::SeqCst);
    let done = wait_until(WITHIN, async || tracked(&us.accepted()) == all(&ids)).await;
    assert!(
        done.is_ok(),
        "{} of 300 delivered after the recovery",
        tracked(&us.accepted()).len()
    );
    wait_drained(&queues.main).await;
    app.stop().await;
    assert_eq!(queues.ready().await, (0, 0));
}

// 5. A refused write key, then a restart ------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_refused_write_key_a_restarted_worker_with_a_good_key_delivers_everything() {
    let queues = Queues::new("key-restart").await;
    let ids = publish_sessions(&queues, "w", 25).await;

    let refused = FakeSegment::start(|_, _| Reply::status(401)).await;
    let app = spawn_app(config(&queues, Some(&refused), None)).await;
    app.wait_until("the key is refused", WITHIN, |a| {
        a.metric(r#"segment_bridge_region_misconfigured{region="us"}"#) == 1.0
    })
    .await;
    queues.wait_ready((25, 0), WITHIN).await;
    app.stop().await;
    assert!(refused.accepted().is_empty());
    assert_eq!(
        queues.ready().await,
        (25, 0),
        "all back, none dead-lettered"
    );

    let us = FakeSegment::ok().await;
    let app = spawn_app(config(&queues, Some(&us), None)).await;
    let done = wait_until(WITHIN, async || tracked(&us.accepted()) == all(&ids)).await;
    assert!(done.is_ok(), "not delivered after the restart");
    assert_eq!(app.probe("/readyz").await.0, 200);
    assert_eq!(
        app.metric(r#"segment_bridge_sessions_total{outcome="delivered"}"#),
        25.0
    );
    wait_drained(&queues.main).await;
    app.stop().await;
    assert_eq!(queues.ready().await, (0, 0));
    assert_eq!(us.accepted().len(), 50, "each session once");
}

/// The worker with `amqp.url` a list whose first node is down: it consumes from the other
/// at start-up and after its connections are closed, and logs the node (never the
/// password).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_first_of_two_nodes_down_the_worker_connects_and_reconnects_to_the_other() {
    let queues = Queues::new("host-list").await;
    let user = BrokerUser::new().await;
    let us = FakeSegment::ok().await;
    let urls = format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", user.url());
    let mut daemon = daemon(&queues, &us, &[("AMQP__URL", urls.as_str())]);
    daemon.wait_ready(WITHIN).await;
    let ids = session_ids("h", 6);
    queues.publish(bodies(&ids[..3])).await;
    wait_all_tracked(&us, &ids[..3], WITHIN).await;

    // Two connections (consuming, publishing) per link, each in its own shuffled order:
    // over four links the node that is down comes first 1 - 1/256 of the time.
    for round in 2..=4 {
        assert!(user.close_connections().await >= 1);
        let start = Instant::now();
        while daemon.metric("segment_bridge_amqp_connections_total").await < f64::from(round) {
            assert!(
                start.elapsed() < WITHIN,
                "no reconnect:\n{}",
                daemon.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daemon.wait_ready(WITHIN).await;
    }
    queues.publish(bodies(&ids[3..])).await;
    wait_all_tracked(&us, &ids, WITHIN).await;
    let _ = daemon.signal("TERM");
    let _ = daemon.wait_exit(Duration::from_secs(10)).await;
    let log = daemon.stderr();
    assert!(log.contains("127.0.0.1:5672"), "the node is logged:\n{log}");
    assert!(!log.contains(":secret@"), "no password in the log:\n{log}");
    // The node that is down was skipped within each connect, never waited out.
    assert!(
        log.contains("trying the next one") && !log.contains("Cannot consume from RabbitMQ"),
        "{log}"
    );
}

//! Tests against a RabbitMQ cluster of the test's own (three nodes on this machine, see
//! `harness.rs`), opt-in: without `SEGMENT_BRIDGE_TEST_CLUSTER=1` every test says it is
//! skipped and passes. They take minutes and two cores, and one cluster runs at a time.
//!
//! They check `amqps://` with a test CA (`amqp.tls_ca_file`, `SSL_CERT_FILE`), and what a
//! node loss costs: the workers and the intake on host lists or behind haproxy, the
//! quorum queue leader's node killed under load; nothing may be lost, and the intake's
//! refusals must end within seconds. They print how long, and how many, webhooks were
//! refused after each kill. `.ci/run` turns them on.

mod harness;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::block_in_place;

use harness::{Cluster, Forwarder, Haproxy, Options};

const SECRET: &str = "cluster-test-jebbit-secret-5b1f0e";
/// Webhooks per second, as in the issue's measurement.
const RATE: u32 = 25;
/// How long after a kill the node is started again: 15 s (as in the issue), or
/// `SEGMENT_BRIDGE_TEST_CLUSTER_DOWN_S` seconds.
fn restart_after() -> Duration {
    let secs = std::env::var("SEGMENT_BRIDGE_TEST_CLUSTER_DOWN_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    Duration::from_secs(secs)
}

/// The TLS listener works with the test CA (`openssl s_client`, then lapin with the CA
/// given as its `cert_chain`), and lapin without the CA refuses the certificate. (And
/// the harness closes client connections.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_tls_listener_presents_a_certificate_of_the_test_ca() {
    if !harness::enabled("tls") {
        return;
    }
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(Options {
            nodes: 1,
            tls: true,
        })
    })
    .await
    .unwrap();
    let tls = cluster.tls.clone().unwrap();
    let port = cluster.nodes[0].tls_port.unwrap();
    let verify = block_in_place(|| harness::s_client_verify(port, &tls.ca));
    println!(
        "TLS node {} up in {:.1} s; amqps on {port}; {verify}; CA {}",
        cluster.nodes[0].name,
        cluster.formed_in.as_secs_f64(),
        tls.ca.display()
    );
    assert_eq!(verify, "Verify return code: 0 (ok)");

    let url = cluster.nodes[0].amqps_url().unwrap();
    let amqps = |ca: Option<String>| {
        let url = url.clone();
        async move {
            lapin::DefaultConnectionBuilder::new()
                .unwrap()
                .with_uri_str(url)
                .with_tls_config(lapin::tcp::OwnedTLSConfig {
                    identity: None,
                    cert_chain: ca,
                })
                .connect()
                .await
        }
    };
    let ca = std::fs::read_to_string(&tls.ca).unwrap();
    let conn = amqps(Some(ca)).await.expect("amqps with the test CA");
    conn.create_channel().await.expect("a channel over TLS");
    block_in_place(|| cluster.close_all_connections());
    let deadline = Instant::now() + Duration::from_secs(10);
    while conn.status().connected() {
        assert!(Instant::now() < deadline, "close_all_connections closes it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = amqps(None).await.expect_err("no amqps without the test CA");
    println!("amqps without the test CA: {refused}");

    // The project's connect: the CA from amqp.tls_ca_file, the node in a list whose
    // first entry is down.
    let mut amqp = segment_bridge::config::Amqp {
        url: format!("amqp://guest:guest@127.0.0.1:1/%2f,{url}").into(),
        tls_ca_file: Some(tls.ca.clone()),
        ..Default::default()
    };
    let conn = segment_bridge::amqp::connect(&amqp)
        .await
        .expect("amqps with amqp.tls_ca_file");
    conn.create_channel().await.expect("a channel over TLS");
    let _ = conn.close(200, "OK".into()).await;
    amqp.tls_ca_file = None;
    amqp.url = url.clone().into();
    let refused = segment_bridge::amqp::connect(&amqp)
        .await
        .expect_err("no amqps without the CA");
    println!("connect without amqp.tls_ca_file: {refused}");

    // The intake binary, the CA through SSL_CERT_FILE (the system store's override).
    let queue = format!("sb-cluster.tls.{}", std::process::id());
    cluster.declare_quorum(0, &queue, 20).await;
    let intake = Bridge::start(
        &cluster,
        "intake",
        &url,
        &queue,
        &[
            ("INTAKE__LISTEN", local(harness::free_port()).to_string()),
            ("INTAKE__SOURCES__JEBBIT_EU__KIND", "jebbit".into()),
            ("INTAKE__SOURCES__JEBBIT_EU__SECRET", SECRET.into()),
        ],
        None,
        &[("SSL_CERT_FILE", tls.ca.to_str().unwrap())],
    );
    intake.wait_ready(Duration::from_secs(30)).await;
    println!(
        "the intake over amqps with SSL_CERT_FILE:\n  {}",
        intake.rabbit_log()
    );
    intake.stop();
}

/// The intake's refusals after a kill must end within this long. Measured: see the test.
const REFUSAL_BOUND: Duration = Duration::from_secs(5);

/// A node loss with webhooks flowing: a 3-node cluster, a quorum queue (delivery limit
/// 20) led by node 1, two workers consuming it on a host list of all three nodes and
/// delivering to a fake Segment, webhooks at 25/s. Twice the queue leader's node is killed
/// (-9) and started again 15 s later (see [`restart_after`]):
///
/// 1. the intake behind haproxy (or, where it is not installed, a TCP forwarder), its
///    connection on the leader's node: it reconnects to another node, where (RabbitMQ 3.10) the channel's first
///    publish to the queue, its leader's node being down, makes the channel nack every
///    publish;
/// 2. made deterministic: the intake on a host list of the two followers, idle (its
///    channel has not published) until the kill, then sending at once: its first publish
///    comes while the leader's node is down, so its channel is poisoned. The test checks
///    that this state was reached (a channel replacement).
///
/// Asserts: the intake's refusals end within [`REFUSAL_BOUND`] of each kill (the killed
/// node being down for 15 s), and nothing is lost: every webhook answered 2xx reaches
/// Segment.
///
/// Before channel replacement (RabbitMQ 3.10.8, 2 shared cores, 7 runs): behind the
/// forwarder, the intake reconnected within 0.3 s, then every publish was nacked and
/// answered 503 until 1.3-4.6 s after the killed node's restart began: 16.4-19.7 s and
/// 409-488 refusals with 15 s down, 41.5 s and 1,035 refusals with 40 s down (once in 7
/// runs it did not happen). On a follower's node whose channel had published before the
/// kill: no refusal. On the leader's node only (one URL): refused until the node was back
/// and the reconnect backoff had run, 22.8-41.3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_webhook_is_lost_and_refusals_end_within_seconds_of_a_leader_kill() {
    if !harness::enabled("leader kill") {
        return;
    }
    let queue = format!("sb-cluster.sessions.{}", std::process::id());
    let mut cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(Options {
            nodes: 3,
            tls: false,
        })
    })
    .await
    .unwrap();
    println!(
        "cluster of {:?} formed in {:.1} s; RabbitMQ {}",
        cluster.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
        cluster.formed_in.as_secs_f64(),
        cluster.ctl_ok(0, &["version"]).trim()
    );
    cluster.declare_quorum(0, &queue, 20).await;
    let leader = block_in_place(|| cluster.await_settled(&queue, Duration::from_secs(30)));
    assert_eq!(leader, 0, "the declaring node leads the queue");

    let segment = FakeSegment::start().await;
    let all_nodes: Vec<String> = cluster.nodes.iter().map(|n| n.amqp_url()).collect();
    let workers: Vec<Bridge> = (0..2)
        .map(|_| Bridge::worker(&cluster, &all_nodes.join(","), &queue, &segment))
        .collect();
    for worker in &workers {
        worker.wait_ready(Duration::from_secs(30)).await;
    }
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));

    // 1. Through a load balancer, on the leader's node first: haproxy when installed
    //    (.ci/run installs it), the harness's forwarder otherwise.
    let mut ports: Vec<u16> = cluster.nodes.iter().map(|n| n.amqp_port).collect();
    ports.rotate_left(leader);
    let haproxy = Haproxy::start(&cluster.root, &ports);
    let forwarder = Forwarder::start(ports).await;
    let (label, balancer) = match &haproxy {
        Some(haproxy) => (
            "intake behind haproxy, connected to the leader's node",
            haproxy.amqp_url(),
        ),
        None => (
            "intake behind a forwarder (no haproxy), connected to the leader's node",
            forwarder.amqp_url(),
        ),
    };
    let intake = Bridge::intake(&cluster, &balancer, &queue);
    intake.wait_ready(Duration::from_secs(30)).await;
    let sender = tokio::spawn(send(intake.addr, outcomes.clone(), 0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window1 = kill_and_measure(&mut cluster, &queue, leader, &outcomes, label).await;
    sender.abort();
    let replaced1 = intake
        .metric("segment_bridge_amqp_channel_replacements_total")
        .await;
    println!(
        "[{label}] channel replacements: {replaced1}; the intake's log:\n  {}",
        intake.rabbit_log()
    );
    intake.stop();
    drop((forwarder, haproxy));

    // 2. An idle intake on the followers, sending from the moment of the kill.
    let leader = block_in_place(|| cluster.await_settled(&queue, Duration::from_secs(60)));
    let followers: Vec<String> = (0..cluster.nodes.len())
        .filter(|&i| i != leader)
        .map(|i| cluster.nodes[i].amqp_url())
        .collect();
    let label = "idle intake on the followers' host list, sending from the kill";
    let intake = Bridge::intake(&cluster, &followers.join(","), &queue);
    intake.wait_ready(Duration::from_secs(30)).await;
    let window2 = {
        let sending = outcomes.clone();
        let addr = intake.addr;
        let go_now = Arc::new(tokio::sync::Notify::new());
        let go = go_now.clone();
        let sender = tokio::spawn(async move {
            go.notified().await;
            send(addr, sending, 1_000_000).await
        });
        let window =
            kill_and_measure_with(&mut cluster, &queue, leader, &outcomes, label, Some(go_now))
                .await;
        sender.abort();
        window
    };
    let replaced2 = intake
        .metric("segment_bridge_amqp_channel_replacements_total")
        .await;
    let poisoned = std::fs::read_to_string(&intake.log)
        .unwrap_or_default()
        .contains("(nack)");
    println!(
        "[{label}] channel replacements: {replaced2}; the intake's log:\n  {}",
        intake.rabbit_log()
    );
    intake.stop();
    // Requests under way end within the client's timeout.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Nothing lost: every webhook answered 2xx reached Segment.
    let accepted: BTreeSet<u64> = outcomes
        .lock()
        .unwrap()
        .iter()
        .filter(|o| ok(o.status))
        .map(|o| o.id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let missing = loop {
        let delivered = segment.delivered();
        let missing: Vec<u64> = accepted.difference(&delivered).copied().collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "answered 2xx: {}; delivered to Segment: {} distinct ({} events in {} requests); \
         missing: {}",
        accepted.len(),
        segment.delivered().len(),
        segment.events(),
        segment.requests(),
        missing.len()
    );
    for worker in workers {
        worker.stop();
    }
    assert!(
        missing.is_empty(),
        "lost: {} webhooks answered 2xx never reached Segment, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    for (window, label) in [
        (window1, "behind the forwarder"),
        (window2, "idle on the followers"),
    ] {
        assert!(
            window <= REFUSAL_BOUND,
            "{label}: webhooks were refused for {window:?} after the kill, more than {REFUSAL_BOUND:?}"
        );
    }
    // The broker refused (nack) a publish of the idle intake: its retries were needed.
    assert!(
        poisoned,
        "the idle intake saw no nack after the kill: the scenario did not happen"
    );
}

/// One answer of the intake, or `None` for no answer (connection refused, timeout).
struct Outcome {
    id: u64,
    sent: Instant,
    answered: Instant,
    status: Option<u16>,
}

async fn kill_and_measure(
    cluster: &mut Cluster,
    queue: &str,
    kill: usize,
    outcomes: &Arc<Mutex<Vec<Outcome>>>,
    label: &str,
) -> Duration {
    kill_and_measure_with(cluster, queue, kill, outcomes, label, None).await
}

/// Kills node `kill` (-9) while webhooks are sent (`go` is notified right after the kill,
/// for a sender waiting for it), starts it again after [`restart_after`], waits until
/// answers have been 2xx for 3 s, and prints the refusals after the kill. How long after
/// the kill the last refusal was answered (zero without refusals).
async fn kill_and_measure_with(
    cluster: &mut Cluster,
    queue: &str,
    kill: usize,
    outcomes: &Arc<Mutex<Vec<Outcome>>>,
    label: &str,
    go: Option<Arc<tokio::sync::Notify>>,
) -> Duration {
    let killed_node = cluster.nodes[kill].name.clone();
    let killed = block_in_place(|| cluster.kill9(kill));
    let killed_at = time::OffsetDateTime::now_utc();
    if let Some(go) = go {
        go.notify_one();
    }
    // Which node the queue's record names as leader, while the killed node is down.
    let via = (kill + 1) % cluster.nodes.len();
    let mut leaders = Vec::new();
    while killed.elapsed() < restart_after() {
        let leader = block_in_place(|| cluster.leader(via, queue));
        if leaders.last().map(|(_, l)| *l) != Some(leader) {
            leaders.push((killed.elapsed().as_secs_f64(), leader));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let leaders: Vec<String> = leaders
        .iter()
        .map(|(t, l)| {
            format!(
                "+{t:.1} s: {}",
                l.map_or("none".into(), |l| cluster.nodes[l].name.clone())
            )
        })
        .collect();
    println!(
        "[{label}] killed at {}; the queue's leader as the record says: {}",
        killed_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap(),
        leaders.join(", ")
    );
    let restart_began = killed.elapsed();
    block_in_place(|| cluster.restart(kill));
    let restarted = killed.elapsed();
    // Until 3 s of 2xx answers in a row (at most 60 s after the restart).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let recent_ok = {
            let o = outcomes.lock().unwrap();
            let since = Instant::now() - Duration::from_secs(3);
            let recent: Vec<_> = o.iter().filter(|o| o.sent > since).collect();
            recent.len() > 30 && recent.iter().all(|o| ok(o.status))
        };
        if recent_ok || Instant::now() > deadline {
            break;
        }
    }
    block_in_place(|| cluster.await_settled(queue, Duration::from_secs(60)));

    let o = outcomes.lock().unwrap();
    // Answered after the kill (in flight at it, or sent after it).
    let after: Vec<_> = o.iter().filter(|o| o.answered >= killed).collect();
    let refused: Vec<_> = after.iter().filter(|o| !ok(o.status)).collect();
    let secs = |t: Instant| t.saturating_duration_since(killed).as_secs_f64();
    let first = refused.iter().map(|o| o.answered).min().map_or(0.0, secs);
    let last = refused
        .iter()
        .map(|o| o.answered)
        .max()
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(killed));
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for o in &refused {
        let key = o.status.map_or("no answer".into(), |s| s.to_string());
        *statuses.entry(key).or_default() += 1;
    }
    println!(
        "[{label}] killed {killed_node} (-9); its restart began at +{:.1} s, it was up at \
         +{:.1} s. Answered after the kill: {}, refused {} {statuses:?}, the first at \
         +{first:.1} s, the last at +{:.1} s.",
        restart_began.as_secs_f64(),
        restarted.as_secs_f64(),
        after.len(),
        refused.len(),
        last.as_secs_f64(),
    );
    last
}

/// A log line without its terminal colours.
fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // `ESC [ ... m`
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn ok(status: Option<u16>) -> bool {
    status.is_some_and(|s| (200..300).contains(&s))
}

/// Sends a signed Jebbit webhook every 1/[`RATE`] s, each on a connection of its own,
/// without waiting for answers, until aborted. Each names a lead of its own,
/// `w<id>@cluster.test`, ids counting from `first_id`.
async fn send(addr: SocketAddr, outcomes: Arc<Mutex<Vec<Outcome>>>, first_id: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for id in first_id.. {
        tick.tick().await;
        let outcomes = outcomes.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            let status = tokio::time::timeout(Duration::from_secs(20), post_webhook(addr, id))
                .await
                .ok()
                .and_then(Result::ok);
            let answered = Instant::now();
            outcomes.lock().unwrap().push(Outcome {
                id,
                sent,
                answered,
                status,
            });
        });
    }
}

/// A Jebbit webhook (the fixture's shape) for the lead `w<id>@cluster.test`.
fn webhook(id: u64) -> Vec<u8> {
    format!(
        r#"{{"data":{{"email":"w{id}@cluster.test","opt_in":"true","outcome":"cluster"}},"event":{{"event_number":0}}}}"#
    )
    .into_bytes()
}

/// The `x-jebbit-signature` of `body` at time `t`: base64 (standard, padded) of the
/// HMAC-SHA256 of `<t>.<body>`.
fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("t={t},v1={sig}")
}

/// POSTs [`webhook`]`(id)`, signed now, to `/webhooks/jebbit_eu`; the answer's status.
async fn post_webhook(addr: SocketAddr, id: u64) -> std::io::Result<u16> {
    let body = webhook(id);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let head = format!(
        "POST /webhooks/jebbit_eu HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nx-jebbit-signature: {}\r\nConnection: close\r\n\r\n",
        body.len(),
        signature(SECRET, t, &body)
    );
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    status_of(&mut stream).await
}

async fn status_of(stream: &mut TcpStream) -> std::io::Result<u16> {
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let line = String::from_utf8_lossy(&answer);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:.80}")))
}

/// A `segment-bridge` child process: the intake (one Jebbit source) or the worker.
struct Bridge {
    child: Child,
    log: std::path::PathBuf,
    /// The intake's webhook listener (the worker has none: the probes' address).
    addr: SocketAddr,
    probes: SocketAddr,
}

impl Bridge {
    /// The intake on `url` (one node, or several separated by commas).
    fn intake(cluster: &Cluster, url: &str, queue: &str) -> Bridge {
        let addr = local(harness::free_port());
        Bridge::start(
            cluster,
            "intake",
            url,
            queue,
            &[
                ("INTAKE__LISTEN", addr.to_string()),
                ("INTAKE__SOURCES__JEBBIT_EU__KIND", "jebbit".into()),
                ("INTAKE__SOURCES__JEBBIT_EU__SECRET", SECRET.into()),
                ("INTAKE__SOURCES__JEBBIT_EU__REGION", "eu".into()),
            ],
            Some(addr),
            &[],
        )
    }

    /// The worker on `url`, delivering both regions to `segment`.
    fn worker(cluster: &Cluster, url: &str, queue: &str, segment: &FakeSegment) -> Bridge {
        let mut settings = vec![
            ("SEGMENT__COMPRESSION", "none".to_owned()),
            ("SEGMENT__FLUSH_INTERVAL_MS", "100".to_owned()),
            ("RETRY__INITIAL_BACKOFF_MS", "50".to_owned()),
            ("RETRY__MAX_BACKOFF_MS", "1000".to_owned()),
            // Quorum queues count redeliveries; 20 is the test queue's limit.
            ("AMQP__DELIVERY_LIMIT", "20".to_owned()),
        ];
        settings.extend([
            ("SEGMENT__US__ENDPOINT", segment.url()),
            ("SEGMENT__US__WRITE_KEY", "cluster-us-key".to_owned()),
            ("SEGMENT__EU__ENDPOINT", segment.url()),
            ("SEGMENT__EU__WRITE_KEY", "cluster-eu-key".to_owned()),
        ]);
        Bridge::start(cluster, "run", url, queue, &settings, None, &[])
    }

    fn start(
        cluster: &Cluster,
        command: &str,
        url: &str,
        queue: &str,
        settings: &[(&str, String)],
        addr: Option<SocketAddr>,
        env: &[(&str, &str)],
    ) -> Bridge {
        let probes = local(harness::free_port());
        let config = cluster.root.join("empty.toml");
        std::fs::write(&config, "").unwrap();
        let log = cluster
            .root
            .join(format!("{command}-{}.log", probes.port()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_segment-bridge"));
        for (key, _) in std::env::vars() {
            if key.starts_with("SEGMENT_BRIDGE__") {
                cmd.env_remove(key);
            }
        }
        let common = [
            ("AMQP__URL", url.to_owned()),
            ("AMQP__QUEUE", queue.to_owned()),
            ("AMQP__DEAD_LETTER_QUEUE", format!("{queue}.dead")),
            ("SERVER__LISTEN", probes.to_string()),
        ];
        for (key, value) in common.iter().chain(settings) {
            cmd.env(format!("SEGMENT_BRIDGE__{key}"), value);
        }
        let child = cmd
            .arg(command)
            .arg("--config")
            .arg(&config)
            .current_dir(&cluster.root)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the segment-bridge binary starts");
        Bridge {
            child,
            log,
            addr: addr.unwrap_or(probes),
            probes,
        }
    }

    async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if get(self.probes, "/readyz").await.ok().map(|(s, _)| s) == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One series of its /metrics (0 when absent).
    async fn metric(&self, series: &str) -> f64 {
        let (_, text) = get(self.probes, "/metrics").await.unwrap_or_default();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    }

    /// Its log about RabbitMQ, without terminal colours: the connection's and channels'
    /// lines, and the refused webhooks counted by reason, the first and last of each.
    fn rabbit_log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut lines = Vec::new();
        let mut refused = std::collections::BTreeMap::<String, (usize, String, String)>::new();
        for line in text.lines().map(strip_colours) {
            if line.contains("Webhook not queued")
                && let Some((_, error)) = line.split_once("error=")
            {
                let at = line.split_whitespace().next().unwrap_or("").to_owned();
                let e = refused
                    .entry(error.to_owned())
                    .or_insert((0, at.clone(), at.clone()));
                e.0 += 1;
                e.2 = at;
                continue;
            }
            if line.contains("RabbitMQ") && !line.contains("Webhook not queued") {
                lines.push(line);
            }
        }
        if lines.len() > 30 {
            let skipped = lines.len() - 30;
            lines.drain(10..10 + skipped);
            lines.insert(10, format!("({skipped} lines)"));
        }
        for (error, (n, first, last)) in refused {
            lines.push(format!("refused {n}x, {first} .. {last}: {error}"));
        }
        lines.join("\n  ")
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A stand-in for Segment's batch endpoint: answers 200 and keeps the leads
/// (`w<id>@cluster.test`) of every event it took.
struct FakeSegment {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Seen {
    leads: BTreeSet<u64>,
    events: usize,
    requests: usize,
}

impl FakeSegment {
    async fn start() -> FakeSegment {
        use axum::routing::post;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let state = seen.clone();
        let app = axum::Router::new().route(
            "/v1/batch",
            post(move |body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let batch: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    let events = batch["batch"].as_array().cloned().unwrap_or_default();
                    let mut seen = state.lock().unwrap();
                    seen.requests += 1;
                    seen.events += events.len();
                    for event in &events {
                        leads_in(event, &mut seen.leads);
                    }
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeSegment { addr, seen, server }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/batch", self.addr)
    }

    fn delivered(&self) -> BTreeSet<u64> {
        self.seen.lock().unwrap().leads.clone()
    }

    fn events(&self) -> usize {
        self.seen.lock().unwrap().events
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().requests
    }
}

impl Drop for FakeSegment {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Every `w<id>@cluster.test` among the strings of `value`.
fn leads_in(value: &serde_json::Value, leads: &mut BTreeSet<u64>) {
    match value {
        serde_json::Value::String(s) => {
            if let Some(id) = s
                .strip_prefix('w')
                .and_then(|s| s.strip_suffix("@cluster.test"))
                .and_then(|id| id.parse().ok())
            {
                leads.insert(id);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| leads_in(v, leads)),
        serde_json::Value::Object(map) => map.values().for_each(|v| leads_in(v, leads)),
        _ => {}
    }
}

/// GET `path`: the status and the body.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:.80}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

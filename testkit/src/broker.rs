//! The local RabbitMQ (127.0.0.1:5672, guest/guest), shared with other test runs and
//! benchmarks: connecting, per-test queues deleted on drop, the broker lock that keeps
//! tests which change the broker apart, `rabbitmqctl` (blocking and async), users of a
//! test's own, and guards that put a stopped or reconfigured broker back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::eventually::wait_until;

/// The local broker, as every test and benchmark reaches it.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long the helpers here wait for the broker.
pub const WAIT: Duration = Duration::from_secs(15);

/// The variable that lets tests restart or reconfigure the local broker.
pub const RESTART_VAR: &str = "SEGMENT_BRIDGE_TEST_BROKER_RESTART";

/// Whether tests may restart or reconfigure the local broker (`RESTART_VAR=1`); says why
/// a test is skipped when they may not. A developer's broker is not theirs to restart.
pub fn restarts_allowed() -> bool {
    let allowed = std::env::var(RESTART_VAR).is_ok_and(|v| v == "1");
    if !allowed {
        eprintln!("skipped: set {RESTART_VAR}=1 to run (restarts the local RabbitMQ)");
    }
    allowed
}

pub async fn connect() -> Connection {
    match Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) => panic!(
            "these tests need RabbitMQ at 127.0.0.1:5672 (guest/guest) and cannot reach it: {e}. \
             Start it with `rabbitmq-server -detached` (`.ci/run` does this) and run the tests again."
        ),
    }
}

/// A connection to the local broker and a channel on it in confirm mode.
pub async fn open_confirm_channel() -> (Connection, Channel) {
    let conn = connect().await;
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, channel)
}

/// Publishes straight onto `queue` (the dead-letter queue, say), each with a confirm.
pub async fn put(queue: &str, messages: &[(Vec<u8>, BasicProperties)]) {
    let (conn, channel) = open_confirm_channel().await;
    for (body, properties) in messages {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties.clone(),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }
    let _ = conn.close(200, "OK".into()).await;
}

/// Takes (gets and acknowledges) every message ready in `queue`.
pub async fn take(channel: &Channel, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        let d = m.delivery;
        channel
            .basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();
        out.push((d.data, d.properties));
    }
    out
}

/// A name no other test, run or process uses: `<pid>-<counter>-<nanos>`.
pub fn unique() -> String {
    format!(
        "{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Declares the durable queue `name` with `arguments` on `channel`.
pub async fn declare_durable(
    channel: &Channel,
    name: &str,
    arguments: FieldTable,
) -> lapin::Result<()> {
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), arguments)
        .await
        .map(drop)
}

/// The arguments of a quorum queue that drops a message after `delivery_limit` returns.
pub fn quorum_arguments(delivery_limit: i64) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(delivery_limit),
    );
    arguments
}

/// A main queue and a dead-letter queue with names no other test or run uses, deleted
/// when dropped.
pub struct Queues {
    pub main: String,
    pub dead: String,
    /// Reopened when a broker restart closed it.
    link: tokio::sync::Mutex<(Connection, Channel)>,
    _lock: BrokerLock,
}

impl Queues {
    /// A classic main queue and dead-letter queue.
    pub async fn new(test: &str) -> Queues {
        Queues::declare(test, FieldTable::default()).await
    }

    /// A quorum main queue that drops a message after `delivery_limit` returns (RabbitMQ
    /// 4.x's default limit is 20), and a classic dead-letter queue.
    pub async fn quorum(test: &str, delivery_limit: i64) -> Queues {
        Queues::declare(test, quorum_arguments(delivery_limit)).await
    }

    /// The test's own channel (in confirm mode), reopened if it was closed.
    pub async fn channel(&self) -> Channel {
        let mut link = self.link.lock().await;
        if !link.1.status().connected() {
            *link = open_confirm_channel().await;
        }
        link.1.clone()
    }

    async fn declare(test: &str, main_arguments: FieldTable) -> Queues {
        let unique = unique();
        let lock = BrokerLock::shared();
        let q = Queues {
            main: format!("sb-test.{test}.{unique}"),
            dead: format!("sb-test.{test}.{unique}.dead"),
            link: tokio::sync::Mutex::new(open_confirm_channel().await),
            _lock: lock,
        };
        for (name, arguments) in [(&q.main, main_arguments), (&q.dead, FieldTable::default())] {
            declare_durable(&q.channel().await, name, arguments)
                .await
                .unwrap();
        }
        q
    }

    pub async fn publish<I, B>(&self, bodies: I)
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        let channel = self.channel().await;
        let mut confirms = FuturesUnordered::new();
        for body in bodies {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        self.main.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_ref(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
            if confirms.len() > 500 {
                assert!(confirms.next().await.unwrap().unwrap().is_ack());
            }
        }
        while let Some(c) = confirms.next().await {
            assert!(c.unwrap().is_ack());
        }
    }

    pub async fn publish_with(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel()
            .await
            .basic_publish(
                "".into(),
                self.main.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }

    /// Messages ready in (main, dead). Unacknowledged ones are not counted.
    pub async fn ready(&self) -> (u32, u32) {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let channel = self.channel().await;
        let mut counts = [0; 2];
        for (i, name) in [&self.main, &self.dead].into_iter().enumerate() {
            counts[i] = channel
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
                .unwrap()
                .message_count();
        }
        (counts[0], counts[1])
    }

    /// Waits until the ready counts are `want`.
    pub async fn wait_ready(&self, want: (u32, u32), within: Duration) {
        let mut got = (0, 0);
        let seen = &mut got;
        let done = wait_until(within, async || {
            *seen = self.ready().await;
            *seen == want
        })
        .await;
        assert!(done.is_ok(), "queues hold {got:?} ready, not {want:?}");
    }

    /// Deletes the dead-letter queue (to make dead-lettering fail), or declares it again.
    pub async fn set_dead_letter_queue(&self, exists: bool) {
        let channel = self.channel().await;
        if exists {
            declare_durable(&channel, &self.dead, FieldTable::default())
                .await
                .unwrap();
        } else {
            channel
                .queue_delete(self.dead.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
    }

    /// Takes every message of the dead-letter queue.
    pub async fn take_dead(&self) -> Vec<(Vec<u8>, BasicProperties)> {
        self.take(&self.dead.clone()).await
    }

    /// Takes every message of the main queue.
    pub async fn take_main(&self) -> Vec<(Vec<u8>, BasicProperties)> {
        self.take(&self.main.clone()).await
    }

    async fn take(&self, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
        take(&self.channel().await, queue).await
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        delete_queues(vec![self.main.clone(), self.dead.clone()]);
    }
}

/// Deletes `names` on the local broker, blocking, from a thread with a runtime and a
/// connection of its own: it works from `Drop`, while the caller's runtime is busy or a
/// test is panicking. Errors are ignored (the queue may already be gone).
pub fn delete_queues(names: Vec<String>) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let url = AMQP_URL;
            let properties = lapin::ConnectionProperties::default();
            let Ok(conn) = lapin::Connection::connect(url, properties).await else {
                return;
            };
            if let Ok(channel) = conn.create_channel().await {
                for name in names {
                    let _ = channel
                        .queue_delete(name.as_str().into(), Default::default())
                        .await;
                }
            }
            let _ = conn.close(200, "OK".into()).await;
        });
    })
    .join();
}

/// The local broker is shared by every test, by other test runs and by the benchmarks. A
/// test that changes the broker itself (a restart, a broker-wide setting) holds this lock
/// exclusively; every `Queues` of the tests holds it shared. The lock is a `flock` on a file in the
/// temporary directory, so it keeps test binaries and processes apart as well as threads.
/// A process that holds it exclusively takes no shared lock besides (that would wait for
/// itself).
pub struct BrokerLock {
    _file: Option<std::fs::File>,
    exclusive: bool,
}

/// How many exclusive locks this process holds.
static EXCLUSIVE: AtomicUsize = AtomicUsize::new(0);

/// The lock's file, in the temporary directory: the same for tests, benchmarks and soak.
pub fn path() -> std::path::PathBuf {
    std::env::temp_dir().join("segment-bridge-tests.broker.lock")
}

impl BrokerLock {
    fn file() -> std::fs::File {
        let path = path();
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open the broker lock {}: {e}", path.display()))
    }

    /// Held by every test that uses the broker as it is.
    pub fn shared() -> BrokerLock {
        if EXCLUSIVE.load(Ordering::SeqCst) > 0 {
            return BrokerLock {
                _file: None,
                exclusive: false,
            };
        }
        let file = BrokerLock::file();
        file.lock_shared().expect("the shared broker lock");
        BrokerLock {
            _file: Some(file),
            exclusive: false,
        }
    }

    /// Held by a test that changes the broker: no other test uses it meanwhile. It blocks
    /// the thread until every other holder is done.
    pub fn exclusive() -> BrokerLock {
        let file = BrokerLock::file();
        file.lock().expect("the exclusive broker lock");
        EXCLUSIVE.fetch_add(1, Ordering::SeqCst);
        BrokerLock {
            _file: Some(file),
            exclusive: true,
        }
    }
}

impl Drop for BrokerLock {
    fn drop(&mut self) {
        if self.exclusive {
            EXCLUSIVE.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Runs a blocking command (`rabbitmqctl`, `kill`) off the async runtime; returns stdout.
pub async fn command(program: &str, args: &[&str]) -> String {
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(&program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

pub async fn rabbitmqctl(args: &[&str]) -> String {
    command("rabbitmqctl", args).await
}

/// Messages in `queue`, ready and unacknowledged, as `rabbitmqctl list_queues` counts
/// them; `None` if there is no such queue.
pub async fn queue_messages(queue: &str) -> Option<u64> {
    rabbitmqctl(&[
        "list_queues",
        "name",
        "messages",
        "--quiet",
        "--no-table-headers",
    ])
    .await
    .lines()
    .filter_map(|l| l.split_once('\t'))
    .find(|(name, _)| name.trim() == queue)
    .and_then(|(_, n)| n.trim().parse().ok())
}

/// Waits until `queue` holds no message, ready or unacknowledged: the worker has settled
/// every delivery it took, redelivered copies included.
pub async fn wait_drained(queue: &str) {
    let mut messages = None;
    let held = &mut messages;
    let done = wait_until(WAIT, async || {
        *held = queue_messages(queue).await;
        *held == Some(0)
    })
    .await;
    assert!(
        done.is_ok(),
        "{queue} still holds {messages:?} messages, ready or unacknowledged"
    );
}

/// The broker's id of the connection of the worker consuming `queue`, for
/// `rabbitmqctl close_connection`.
pub async fn worker_connection(queue: &str) -> String {
    find_worker_connection(queue)
        .await
        .unwrap_or_else(|| panic!("no connection consumes {queue}"))
}

/// [`worker_connection`], or `None` while no connection consumes `queue` (a worker
/// between two connections). It is found by its name (`segment-bridge/<version>
/// <queue>`) if the worker names it so, else through the consumer on `queue`, its channel
/// and that channel's connection.
pub async fn find_worker_connection(queue: &str) -> Option<String> {
    let list = async |what: &[&str]| {
        rabbitmqctl(&[what, &["--quiet", "--no-table-headers"]].concat()).await
    };
    let connections = list(&["list_connections", "pid", "name"]).await;
    let by_name = connections
        .lines()
        .find(|l| l.contains(queue))
        .and_then(|l| l.split_whitespace().next());
    if let Some(pid) = by_name {
        return Some(pid.to_owned());
    }
    let consumers = list(&["list_consumers", "queue_name", "channel_pid"]).await;
    let channel = consumers
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(q, _)| q.trim() == queue)
        .map(|(_, ch)| ch.trim().to_owned())?;
    let channels = list(&["list_channels", "pid", "connection"]).await;
    channels
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(ch, _)| ch.trim() == channel)
        .map(|(_, conn)| conn.trim().to_owned())
}

/// A RabbitMQ user of the test's own, deleted when dropped: its permissions can be taken
/// away without disturbing other tests, which all connect as guest.
pub struct BrokerUser {
    name: String,
}

impl BrokerUser {
    pub async fn new() -> BrokerUser {
        let name = format!("sb-test-{}", unique());
        rabbitmqctl(&["add_user", &name, "secret"]).await;
        let user = BrokerUser { name };
        user.allow().await;
        user
    }

    pub fn url(&self) -> String {
        format!("amqp://{}:secret@127.0.0.1:5672/%2f", self.name)
    }

    pub async fn allow(&self) {
        rabbitmqctl(&["set_permissions", "-p", "/", &self.name, ".*", ".*", ".*"]).await;
    }

    pub async fn deny(&self) {
        rabbitmqctl(&["clear_permissions", "-p", "/", &self.name]).await;
    }

    /// Closes this user's connections from the broker's side; returns how many.
    pub async fn close_connections(&self) -> usize {
        let connections = rabbitmqctl(&[
            "list_connections",
            "pid",
            "user",
            "--quiet",
            "--no-table-headers",
        ])
        .await;
        let pids: Vec<String> = connections
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(_, user)| user.trim() == self.name)
            .map(|(pid, _)| pid.trim().to_owned())
            .collect();
        for pid in &pids {
            rabbitmqctl(&["close_connection", pid, "closed by a segment-bridge test"]).await;
        }
        pids.len()
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// Runs `rabbitmqctl` and waits for it, from a destructor too.
pub fn rabbitmqctl_blocking(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The broker's application stopped (`rabbitmqctl stop_app`) until [`start`](Self::start)
/// or until dropped.
pub struct StoppedBroker {
    started: bool,
}

impl StoppedBroker {
    pub async fn stop() -> StoppedBroker {
        // The guard first: whatever happens next, its drop starts the broker again.
        let guard = StoppedBroker { started: false };
        tokio::task::spawn_blocking(|| rabbitmqctl_blocking(&["stop_app"]))
            .await
            .unwrap()
            .expect("the broker stops");
        guard
    }

    pub async fn start(mut self) {
        self.started = true;
        tokio::task::spawn_blocking(start_broker)
            .await
            .unwrap()
            .expect("the broker starts again");
    }
}

pub fn start_broker() -> Result<String, String> {
    rabbitmqctl_blocking(&["start_app"])?;
    rabbitmqctl_blocking(&["await_startup", "--timeout", "60"])
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        if !self.started
            && let Err(e) = start_broker()
        {
            eprintln!("could not start the broker again: {e}; run `rabbitmqctl start_app`");
        }
    }
}

/// Broker-wide settings of the `rabbit` application, changed for one test and put back
/// (or unset, if they were unset) when dropped.
pub struct BrokerSettings {
    previous: Vec<(&'static str, Option<String>)>,
}

impl BrokerSettings {
    /// Each setting's old value is in the guard before the setting changes, so that a
    /// failure halfway still restores what was changed.
    pub fn set(settings: &[(&'static str, &'static str)]) -> BrokerSettings {
        let mut guard = BrokerSettings {
            previous: Vec::new(),
        };
        for (key, value) in settings {
            let now =
                rabbitmqctl_blocking(&["eval", &format!("application:get_env(rabbit, {key}).")])
                    .expect("the setting can be read");
            // `{ok,1800000}` or `undefined`.
            let was = now
                .trim()
                .strip_prefix("{ok,")
                .and_then(|v| v.strip_suffix('}'))
                .map(str::to_owned);
            guard.previous.push((key, was));
            rabbitmqctl_blocking(&[
                "eval",
                &format!("application:set_env(rabbit, {key}, {value})."),
            ])
            .expect("the setting can be changed");
        }
        guard
    }
}

impl Drop for BrokerSettings {
    fn drop(&mut self) {
        for (key, was) in &self.previous {
            let expr = match was {
                Some(value) => format!("application:set_env(rabbit, {key}, {value})."),
                None => format!("application:unset_env(rabbit, {key})."),
            };
            if let Err(e) = rabbitmqctl_blocking(&["eval", &expr]) {
                eprintln!(
                    "could not restore the broker setting {key}: {e}; run: rabbitmqctl eval '{expr}'"
                );
            }
        }
    }
}

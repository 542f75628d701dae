//! RabbitMQ nodes of the test's own on this machine: a cluster of N nodes (or one node,
//! with a TLS listener), started as the current user from the package's own scripts,
//! with node names, ports, data, logs, configuration and Erlang cookie of their own. The
//! machine's broker (`rabbit@localhost` on 5672) is never touched. Plain std (and
//! haproxy, when installed, as a load balancer), tokio (a TCP forwarder), lapin (a few
//! AMQP helpers) and serde_json (`cluster_status`), no project code: it can move into a
//! shared test kit.
//!
//! Found on RabbitMQ 3.10.8 (Debian): `/etc/rabbitmq/rabbitmq-env.conf` (the machine
//! broker's node name) is kept out with `RABBITMQ_CONF_ENV_FILE`; the default distribution
//! port (AMQP port + 20000) could collide, so it is set; the node name is not on the beam
//! process's command line (nodes are found by an environment marker instead); the
//! `rabbitmq-server` script runs the beam process as its child and waits for it;
//! `rabbitmqctl await_startup` fails at once until the node has registered with epmd.
//!
//! [`Cluster`] owns everything it started: dropping it (also while a test panics) stops
//! every node, kills what is left of them and removes the temporary directory. One
//! cluster at a time on the machine: [`Cluster::start`] holds an `flock` on
//! [`LOCK_PATH`] until dropped.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The variable that turns the cluster tests on.
pub const ENV: &str = "SEGMENT_BRIDGE_TEST_CLUSTER";
/// Held exclusively while a cluster runs, so that two cluster tests never overlap.
pub const LOCK_PATH: &str = "/tmp/segment-bridge-cluster.lock";
/// The package's own scripts: the wrappers in /usr/sbin switch to the `rabbitmq` user
/// and its cookie.
const SCRIPTS: &str = "/usr/lib/rabbitmq/bin";
/// Set on every node process (its value: the cluster's directory), so that a node left
/// over by a killed test run can be found and killed by the next one.
const MARKER: &str = "SEGMENT_BRIDGE_CLUSTER_NODE";
/// The distribution ports of the CLI tools (rabbitmqctl and friends), away from the
/// default 35672-35682 that the machine broker's tools use.
const CTL_DIST_PORTS: (u16, u16) = (46150, 46190);
/// How long a node may take to boot (2 shared cores).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether the cluster tests are on; if not, says so (the test then returns early).
pub fn enabled(test: &str) -> bool {
    if std::env::var(ENV).as_deref() == Ok("1") {
        true
    } else {
        println!("{test}: skipped: set {ENV}=1 to run");
        false
    }
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Nodes; the second and later join the first.
    pub nodes: usize,
    /// A TLS listener on the first node, with a test CA generated with `openssl`.
    pub tls: bool,
}

/// The test CA and the server certificate (for `localhost` and 127.0.0.1), PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One node of the test's own.
#[derive(Debug)]
pub struct Node {
    /// `sbt<i>_<pid>@localhost` (short names).
    pub name: String,
    pub amqp_port: u16,
    pub dist_port: u16,
    /// With `Options::tls`, on the first node only.
    pub tls_port: Option<u16>,
    dir: PathBuf,
    /// The `rabbitmq-server` script, whose child is the node's beam process.
    child: Option<Child>,
}

impl Node {
    /// The guest user may only connect from the loopback interface, which is where the
    /// node listens.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The `amqps://` URL of the TLS listener (for `localhost`, the certificate's name).
    pub fn amqps_url(&self) -> Option<String> {
        self.tls_port
            .map(|p| format!("amqps://guest:guest@localhost:{p}/%2f"))
    }

    /// The node's log file, for a failure message.
    pub fn log(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }
}

/// Nodes of the test's own, clustered; stopped and removed when dropped.
pub struct Cluster {
    pub root: PathBuf,
    pub nodes: Vec<Node>,
    pub tls: Option<TlsFiles>,
    /// How long starting and joining took.
    pub formed_in: Duration,
    _lock: File,
}

/// A free port on the loopback interface, for a node to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Starts `options.nodes` nodes in parallel, waits for each, joins the second and
    /// later to the first and checks that the cluster has them all running. Blocking:
    /// call it from `spawn_blocking` in an async test.
    pub fn start(options: Options) -> Cluster {
        assert!(options.nodes >= 1);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .unwrap_or_else(|e| panic!("cannot open {LOCK_PATH}: {e}"));
        lock.lock().expect("the cluster lock");
        // Holding the lock, any marked node still alive is a leftover of a killed run.
        kill_marked(None);

        let started = Instant::now();
        let root = std::env::temp_dir().join(format!(
            "segment-bridge-cluster.{}",
            segment_bridge_testkit::broker::unique()
        ));
        fs::create_dir_all(&root).unwrap();
        let mut cluster = Cluster {
            root,
            nodes: Vec::new(),
            tls: None,
            formed_in: Duration::ZERO,
            _lock: lock,
        };
        // From here on, a panic drops `cluster`, which cleans up what was started.
        cluster.prepare(&options);
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        thread::scope(|s| {
            let waits: Vec<_> = (0..cluster.nodes.len())
                .map(|i| {
                    let c = &cluster;
                    s.spawn(move || c.await_startup(i))
                })
                .collect();
            for w in waits {
                w.join().unwrap();
            }
        });
        let first = cluster.nodes[0].name.clone();
        for i in 1..cluster.nodes.len() {
            cluster.ctl_ok(i, &["stop_app"]);
            cluster.ctl_ok(i, &["join_cluster", &first]);
            cluster.ctl_ok(i, &["start_app"]);
        }
        for i in 0..cluster.nodes.len() {
            cluster.ctl_ok(i, &["await_startup", "--timeout", "120"]);
        }
        let running = cluster.running_nodes(0);
        assert_eq!(
            running.len(),
            cluster.nodes.len(),
            "the cluster runs every node: {running:?}"
        );
        cluster.formed_in = started.elapsed();
        cluster
    }

    /// Directories, the cookie, the plugins file (none: no management or Prometheus
    /// listener), each node's rabbitmq.conf; the certificates with `tls`.
    fn prepare(&mut self, options: &Options) {
        let root = self.root.clone();
        let cookie = root.join(".erlang.cookie");
        fs::write(&cookie, format!("SBTCOOKIE{}", std::process::id())).unwrap();
        set_mode(&cookie, 0o400);
        fs::write(root.join("enabled_plugins"), "[].\n").unwrap();
        // Read instead of /etc/rabbitmq/rabbitmq-env.conf (the machine broker's).
        fs::write(root.join("rabbitmq-env.conf"), "").unwrap();
        if options.tls {
            self.tls = Some(make_certificates(&root));
        }
        for i in 0..options.nodes {
            let dir = root.join(format!("node{}", i + 1));
            fs::create_dir_all(dir.join("mnesia")).unwrap();
            fs::create_dir_all(dir.join("log")).unwrap();
            let amqp_port = free_port();
            let mut dist_port = free_port();
            while dist_port == amqp_port {
                dist_port = free_port();
            }
            let mut conf = format!("listeners.tcp.default = 127.0.0.1:{amqp_port}\n");
            let tls_port = match (&self.tls, i) {
                (Some(tls), 0) => {
                    let port = free_port();
                    conf.push_str(&format!(
                        "listeners.ssl.default = 127.0.0.1:{port}\n\
                         ssl_options.cacertfile = {}\n\
                         ssl_options.certfile = {}\n\
                         ssl_options.keyfile = {}\n\
                         ssl_options.verify = verify_none\n\
                         ssl_options.fail_if_no_peer_cert = false\n",
                        tls.ca.display(),
                        tls.cert.display(),
                        tls.key.display()
                    ));
                    Some(port)
                }
                _ => None,
            };
            fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
            self.nodes.push(Node {
                name: format!("sbt{}_{}@localhost", i + 1, std::process::id()),
                amqp_port,
                dist_port,
                tls_port,
                dir,
                child: None,
            });
        }
    }

    /// Starts node `i`'s server (again, after a kill or a stop: same name, ports, data).
    fn spawn(&mut self, i: usize) {
        let root = self.root.clone();
        let node = &mut self.nodes[i];
        let out = File::create(node.dir.join("stdout.log")).unwrap();
        let mut cmd = Command::new(format!("{SCRIPTS}/rabbitmq-server"));
        clean_env(&mut cmd, &root);
        cmd.env(MARKER, &root)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_USE_LONGNAME", "false")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                root.join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            // Absent: keeps /etc/rabbitmq/advanced.config out.
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                node.dir.join("advanced.config"),
            )
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        node.child = Some(cmd.spawn().expect("rabbitmq-server starts"));
    }

    /// Waits until node `i` has booted; fails fast (with its log) if it exited.
    fn await_startup(&self, i: usize) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            // Fails at once while the node is not registered with epmd yet.
            match self.ctl(i, &["await_startup", "--timeout", "120"]) {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "{} did not start: {e}\n{}",
                        self.nodes[i].name,
                        self.tail(i)
                    )
                }
                Err(_) => {}
            }
            if !self.beam_alive(i) {
                panic!(
                    "{} exited while booting:\n{}",
                    self.nodes[i].name,
                    self.tail(i)
                );
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// Whether node `i`'s script (and so its beam process) still runs.
    fn beam_alive(&self, i: usize) -> bool {
        match &self.nodes[i].child {
            Some(child) => {
                Path::new(&format!("/proc/{}", child.id())).exists() && {
                    // A zombie is dead.
                    let stat = fs::read_to_string(format!("/proc/{}/stat", child.id()))
                        .unwrap_or_default();
                    !stat.contains(") Z ")
                }
            }
            None => false,
        }
    }

    /// The end of node `i`'s console output and log, for a failure message.
    pub fn tail(&self, i: usize) -> String {
        let mut text = String::new();
        for path in [self.nodes[i].dir.join("stdout.log"), self.nodes[i].log()] {
            let all = fs::read_to_string(&path).unwrap_or_default();
            let start = all.len().saturating_sub(3000);
            let start = (start..all.len())
                .find(|&b| all.is_char_boundary(b))
                .unwrap_or(0);
            text.push_str(&format!("--- {}\n{}\n", path.display(), &all[start..]));
        }
        text
    }

    /// Runs a CLI tool of the package (`rabbitmqctl`, `rabbitmq-queues`, ...) against
    /// node `i`, with the cluster's cookie.
    pub fn tool(&self, tool: &str, i: usize, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(format!("{SCRIPTS}/{tool}"));
        clean_env(&mut cmd, &self.root);
        let out = cmd
            .arg("-n")
            .arg(&self.nodes[i].name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {tool}: {e}"))?;
        outcome(&format!("{tool} -n {} {args:?}", self.nodes[i].name), out)
    }

    /// `rabbitmqctl -n <node i> args...`.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<String, String> {
        self.tool("rabbitmqctl", i, args)
    }

    /// Like [`ctl`](Self::ctl), panicking on failure.
    pub fn ctl_ok(&self, i: usize, args: &[&str]) -> String {
        self.ctl(i, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The nodes node `i` sees running in its cluster.
    pub fn running_nodes(&self, i: usize) -> Vec<String> {
        let status = self.ctl_ok(i, &["cluster_status", "--formatter", "json"]);
        let status: serde_json::Value = serde_json::from_str(&status)
            .unwrap_or_else(|e| panic!("cluster_status: {e}: {status}"));
        status["running_nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The index of the node holding `queue`'s leader, asked of node `via`.
    pub fn leader(&self, via: usize, queue: &str) -> Option<usize> {
        let out = self
            .ctl(
                via,
                &["list_queues", "-q", "--no-table-headers", "name", "leader"],
            )
            .ok()?;
        let leader = out.lines().find_map(|line| {
            let mut cols = line.split_whitespace();
            (cols.next() == Some(queue)).then(|| cols.next().unwrap_or("").to_owned())
        })?;
        self.nodes.iter().position(|n| n.name == leader)
    }

    /// The OS pid of node `i`'s beam process, as the node itself reports it.
    pub fn os_pid(&self, i: usize) -> Result<u32, String> {
        let out = self.ctl(i, &["eval", "os:getpid()."])?;
        out.trim()
            .trim_matches('"')
            .parse()
            .map_err(|e| format!("os:getpid() answered {out:?}: {e}"))
    }

    /// `kill -9` of node `i`'s beam process (its pid asked of the node first); when the
    /// signal was sent.
    pub fn kill9(&mut self, i: usize) -> Instant {
        let pid = self.os_pid(i).unwrap_or_else(|e| panic!("{e}"));
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        let killed = Instant::now();
        assert!(status.success(), "kill -9 {pid}");
        if let Some(child) = self.nodes[i].child.take() {
            // The script waiting for the beam process exits with it (and reaps it).
            reap(child, Duration::from_secs(10));
        }
        killed
    }

    /// A graceful stop of node `i` (`rabbitmqctl stop`: the whole node, not the app).
    pub fn stop(&mut self, i: usize) {
        self.ctl_ok(i, &["stop"]);
        if let Some(child) = self.nodes[i].child.take() {
            reap(child, Duration::from_secs(30));
        }
    }

    /// Starts node `i` again after [`kill9`](Self::kill9) or [`stop`](Self::stop) and
    /// waits until it has booted (it rejoins the cluster from its data).
    pub fn restart(&mut self, i: usize) {
        assert!(!self.beam_alive(i), "{} still runs", self.nodes[i].name);
        self.spawn(i);
        self.await_startup(i);
    }

    /// Closes every client connection on every running node.
    pub fn close_all_connections(&self) {
        for i in 0..self.nodes.len() {
            if self.beam_alive(i) {
                self.ctl_ok(i, &["close_all_connections", "closed by the test"]);
            }
        }
    }

    /// Waits until every node runs and `queue` has a leader; its index.
    pub fn await_settled(&self, queue: &str, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let running = self.running_nodes(0).len() == self.nodes.len();
            if running && let Some(leader) = self.leader(0, queue) {
                return leader;
            }
            assert!(Instant::now() < deadline, "the cluster did not settle");
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// Declares a quorum queue through node `i` (whose node then holds the leader), with
    /// a delivery limit.
    pub async fn declare_quorum(&self, i: usize, queue: &str, delivery_limit: i64) {
        let conn = self.connect(i).await;
        let channel = conn.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions::durable(),
                segment_bridge_testkit::broker::quorum_arguments(delivery_limit),
            )
            .await
            .unwrap();
        let _ = conn.close(200, "OK".into()).await;
    }

    /// Messages ready in `queue`, asked through node `i` (a passive declare).
    pub async fn message_count(&self, i: usize, queue: &str) -> u32 {
        let conn = self.connect(i).await;
        let channel = conn.create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let count = channel
            .queue_declare(queue.into(), passive, Default::default())
            .await
            .unwrap()
            .message_count();
        let _ = conn.close(200, "OK".into()).await;
        count
    }

    async fn connect(&self, i: usize) -> lapin::Connection {
        lapin::Connection::connect(&self.nodes[i].amqp_url(), Default::default())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.nodes[i].name))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Every node at once: `rabbitmqctl stop` waits for the node to halt.
        thread::scope(|s| {
            for i in 0..self.nodes.len() {
                if self.beam_alive(i) {
                    let this = &*self;
                    s.spawn(move || {
                        if let Err(e) = this.ctl(i, &["stop"]) {
                            eprintln!("stopping {}: {e}", this.nodes[i].name);
                        }
                    });
                }
            }
        });
        for node in &mut self.nodes {
            if let Some(child) = node.child.take() {
                reap(child, Duration::from_secs(15));
            }
        }
        kill_marked(Some(&self.root));
        if let Err(e) = fs::remove_dir_all(&self.root) {
            eprintln!("cannot remove {}: {e}", self.root.display());
        }
    }
}

/// Waits for a node's `rabbitmq-server` script to exit, which it does when its beam
/// process has exited (the script starts the beam process in the background and waits
/// for it, to relay signals); kills the script after `within`. Killing it earlier would
/// leave the beam process's zombie to init.
fn reap(mut child: Child, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The environment of a node or a CLI tool: no inherited RabbitMQ or Erlang setting,
/// the cluster's cookie (in `HOME`) and env file, the CLI tools' distribution ports.
fn clean_env(cmd: &mut Command, root: &Path) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("RABBITMQ_") || key.starts_with("ERL_") {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("HOME", root)
        .env("RABBITMQ_CONF_ENV_FILE", root.join("rabbitmq-env.conf"))
        .env("RABBITMQ_CTL_DIST_PORT_MIN", CTL_DIST_PORTS.0.to_string())
        .env("RABBITMQ_CTL_DIST_PORT_MAX", CTL_DIST_PORTS.1.to_string())
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8");
}

fn outcome(what: &str, out: Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Kills (-9) every process carrying the node marker, or only those of the cluster in
/// `root`: a node that would not stop, or one left over by a killed test run.
fn kill_marked(root: Option<&Path>) {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let mut environ = Vec::new();
        if File::open(format!("/proc/{pid}/environ"))
            .and_then(|mut f| f.read_to_end(&mut environ))
            .is_err()
        {
            continue;
        }
        let marked = environ.split(|&b| b == 0).any(|var| {
            let var = String::from_utf8_lossy(var);
            match var.strip_prefix(MARKER).and_then(|v| v.strip_prefix('=')) {
                Some(value) => root.is_none_or(|r| Path::new(value) == r),
                None => false,
            }
        });
        if marked {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A test CA and a server certificate for `localhost` and 127.0.0.1 signed by it, made
/// with the `openssl` CLI into `dir`.
pub fn make_certificates(dir: &Path) -> TlsFiles {
    let ca = segment_bridge_testkit::tls::test_ca(dir);
    let (cert, key) = segment_bridge_testkit::tls::server_certificate(
        dir,
        "server",
        "DNS:localhost,IP:127.0.0.1",
    );
    TlsFiles { ca, cert, key }
}

/// `openssl s_client` against `port` trusting only `ca`, checking the name `localhost`:
/// its `Verify return code` line.
pub fn s_client_verify(port: u16, ca: &Path) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost", "-verify_hostname", "localhost"])
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find(|l| l.trim_start().starts_with("Verify return code"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| {
            format!(
                "no verify line: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// A TCP forwarder standing in for a load balancer in front of the cluster: each client
/// connection goes to the first of `backends` that accepts one, and is closed when its
/// backend's is (a killed node), so that the client reconnects, and lands on the next
/// node. Stops when dropped.
pub struct Forwarder {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    pub async fn start(backends: Vec<u16>) -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Dropped with this task: the connections end with the forwarder.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let backends = backends.clone();
                connections.spawn(async move {
                    for port in backends {
                        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
                        if let Ok(Ok(mut backend)) =
                            tokio::time::timeout(Duration::from_secs(1), connect).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                            return;
                        }
                    }
                });
            }
        });
        Forwarder { addr, task }
    }

    /// The AMQP URL of the forwarder.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// haproxy (Debian's package) in front of the cluster, in TCP mode on the loopback
/// interface: each client connection goes to the first node in `backends` that its
/// health checks (every 500 ms) find up; a connection a node refuses is sent to another
/// (`option redispatch`). Run as a child process with a configuration in
/// `dir`; stopped when dropped. `None` when haproxy is not installed.
pub struct Haproxy {
    pub port: u16,
    child: Child,
}

impl Haproxy {
    pub fn start(dir: &Path, backends: &[u16]) -> Option<Haproxy> {
        let binary = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, p)| format!("  server n{i} 127.0.0.1:{p} check inter 500ms fall 1 rise 2\n"))
            .collect();
        let config = dir.join(format!("haproxy-{port}.cfg"));
        fs::write(
            &config,
            format!(
                "global\n  maxconn 512\ndefaults\n  mode tcp\n  timeout connect 1s\n  \
                 retries 2\n  option redispatch 1\n  \
                 timeout client 1h\n  timeout server 1h\nfrontend amqp\n  \
                 bind 127.0.0.1:{port}\n  default_backend nodes\nbackend nodes\n  \
                 balance first\n{servers}"
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join(format!("haproxy-{port}.log"))).unwrap())
            .spawn()
            .expect("haproxy starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {port}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        Some(Haproxy { port, child })
    }

    /// The AMQP URL of haproxy's frontend.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

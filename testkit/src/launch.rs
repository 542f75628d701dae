//! The `segment-bridge` binary as a child process: configured by the environment only
//! (none of the caller's `SEGMENT_BRIDGE*` or `RUST_LOG`), in an empty working directory
//! of its own (so no `config.toml` is read by accident), its output captured, killed when
//! dropped. A library cannot name the binary (`env!("CARGO_BIN_EXE_…")` exists only in
//! the tests and benches of its own package): the caller passes its path.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::eventually::{eventually_some, wait_until, wait_until_blocking};

/// One invocation of the binary, built up before it starts.
pub struct Bridge {
    cmd: Command,
    dir: tempfile::TempDir,
    probes: Option<SocketAddr>,
}

/// A free local port, for a child process to listen on.
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Bridge {
    /// `bin args…`, with a clean environment for the service and an empty directory.
    pub fn new(bin: impl AsRef<OsStr>, args: &[&str]) -> Bridge {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(args).current_dir(dir.path());
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("SEGMENT_BRIDGE") || k == "RUST_LOG" {
                cmd.env_remove(&key);
            }
        }
        Bridge {
            cmd,
            dir,
            probes: None,
        }
    }

    /// Sets `SEGMENT_BRIDGE__<key>`.
    pub fn set(&mut self, key: &str, value: &str) -> &mut Bridge {
        self.cmd.env(format!("SEGMENT_BRIDGE__{key}"), value);
        self
    }

    /// Removes an environment variable set before (a default of a test's helper).
    pub fn env_remove(&mut self, key: &str) -> &mut Bridge {
        self.cmd.env_remove(key);
        self
    }

    /// Sets any environment variable.
    pub fn env(&mut self, key: &str, value: &str) -> &mut Bridge {
        self.cmd.env(key, value);
        self
    }

    /// The queues the service uses (`amqp.queue`, `amqp.dead_letter_queue`).
    pub fn queues(&mut self, queues: &crate::broker::Queues) -> &mut Bridge {
        self.set("AMQP__QUEUE", &queues.main)
            .set("AMQP__DEAD_LETTER_QUEUE", &queues.dead)
    }

    /// A region (`us`, `eu`) with an endpoint and a write key.
    pub fn region(&mut self, region: &str, endpoint: &str, key: &str) -> &mut Bridge {
        let r = region.to_uppercase();
        self.set(&format!("SEGMENT__{r}__ENDPOINT"), endpoint)
            .set(&format!("SEGMENT__{r}__WRITE_KEY"), key)
    }

    /// One more argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Bridge {
        self.cmd.arg(arg);
        self
    }

    /// `--config <file>`, the file written with `text` in the working directory.
    pub fn config_file(&mut self, text: &str) -> &mut Bridge {
        let path = self.path("config.toml");
        std::fs::write(&path, text).unwrap();
        self.cmd.arg("--config").arg(path);
        self
    }

    /// The side port (`server.listen`) on a free port, for [`Running::get`] and
    /// [`Running::wait_ready`].
    pub fn probes(&mut self) -> SocketAddr {
        let addr = free_port();
        self.set("SERVER__LISTEN", &addr.to_string());
        self.probes = Some(addr);
        addr
    }

    /// A file in the working directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs to completion, feeding `stdin`; killed and failed after `within`.
    pub async fn output(self, stdin: &[u8], within: Duration) -> Output {
        let stdin = stdin.to_vec();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut running = self.start(Stdio::piped());
            let mut input = running.child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let _ = input.write_all(&stdin);
            });
            let status = running.wait(within);
            Output {
                status,
                stdout: running.stdout_all(),
                stderr: running.stderr(),
                took: started.elapsed(),
            }
        })
        .await
        .unwrap()
    }

    /// Starts it in the background, standard input closed.
    pub fn spawn(self) -> Running {
        self.start(Stdio::null())
    }

    /// Starts it in the background, standard input a pipe ([`Running::stdin`]).
    pub fn spawn_with_stdin(self) -> Running {
        self.start(Stdio::piped())
    }

    fn start(mut self, stdin: Stdio) -> Running {
        let mut child = self
            .cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the segment-bridge binary starts");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stdout_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
            stderr,
            readers: vec![stdout_reader, stderr_reader],
            probes: self.probes.map(|a| format!("http://{a}")),
            http: segment_bridge::segment::http_client(Duration::from_secs(5)).unwrap(),
            _dir: self.dir,
        }
    }
}

/// What a finished run printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Output {
    /// Standard output, then standard error.
    pub fn both(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A running child process; killed when dropped while still running.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stdout line read so far.
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    probes: Option<String>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its standard input, if it was started with one ([`Bridge::spawn_with_stdin`]).
    pub fn stdin(&mut self) -> Option<&mut std::process::ChildStdin> {
        self.child.stdin.as_mut()
    }

    /// The next line of standard output, or `None` at the deadline or end of output.
    pub fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = self.lines.recv_timeout(left).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`…); returns when it was sent.
    pub fn signal(&self, signal: &str) -> Instant {
        let sent = Instant::now();
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
        sent
    }

    /// SIGTERM; returns when it was sent.
    pub fn terminate(&self) -> Instant {
        self.signal("TERM")
    }

    /// SIGKILL, and waits for the end.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the exit, blocking; kills the child and fails after `within`.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let mut status = None;
        let _ = wait_until_blocking(within, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        match status {
            Some(status) => {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                status
            }
            None => {
                self.kill();
                panic!(
                    "segment-bridge did not exit within {within:?}; stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// Waits for the exit without blocking the runtime; returns the status and when it
    /// was seen. Fails after `within` (and the drop kills the child).
    pub async fn wait_exit(&mut self, within: Duration) -> (ExitStatus, Instant) {
        let (child, stderr) = (&mut self.child, &self.stderr);
        let status = eventually_some(
            within,
            async || child.try_wait().unwrap().map(|s| (s, Instant::now())),
            || {
                format!(
                    "segment-bridge did not exit within {within:?}:\n{}",
                    stderr.lock().unwrap()
                )
            },
        )
        .await;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// Every stdout line, including those not yet read by `next_line`; call after a wait.
    pub fn stdout_all(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.iter().map(|l| format!("{l}\n")).collect()
    }

    /// What it wrote to standard error so far (its log).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// GETs `path` on the side port ([`Bridge::probes`]); `None` if nothing answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let probes = self.probes.as_ref().expect("started with Bridge::probes");
        let r = self.http.get(format!("{probes}{path}")).send().await.ok()?;
        Some((r.status().as_u16(), r.text().await.ok()?))
    }

    /// Waits until `/readyz` answers 200; fails with the log after `within`.
    pub async fn wait_ready(&self, within: Duration) {
        let ready = wait_until(within, async || {
            self.get("/readyz").await.map(|r| r.0) == Some(200)
        })
        .await;
        assert!(
            ready.is_ok(),
            "segment-bridge did not become ready within {within:?}:\n{}",
            self.stderr()
        );
    }

    /// One series of its `/metrics`; 0 when absent or unreachable.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.map(|r| r.1).unwrap_or_default();
        crate::app::metric(&text, series)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

//! What the integration tests (`tests/it`, `tests/broker`) and the soak benchmark
//! (`benches/soak.rs`) share about the local broker: the lock that keeps tests that change
//! it apart from the others, and deleting queues from a destructor. They include this file.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

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
            let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
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
    #[allow(dead_code)]
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

//! The tokio runtimes the binary runs on: one thread (tokio's current-thread scheduler)
//! for the worker and the operator commands, and a thread per core for the intake.
//!
//! Measured on the 2-core development machine with the broker beside it (README,
//! Performance): lapin reads and parses frames on an I/O thread of its own whatever the
//! runtime, and the pipeline's own work is one consuming task (parse, map, batch) with a
//! sender task per region and the acker, all of it short. With worker threads, each
//! hand-over between those tasks was a cross-thread wake-up (futex, epoll), and the
//! worker spent a sixth of its CPU parking and unparking threads; on one thread the hops
//! are local, parking fell from 2.8 to 1.1 µs per session, and the CPU per session by
//! about 15% at the same throughput. A pod
//! that has more cores runs more replicas (KEDA scales on the queue length) rather than
//! more threads in one.

/// The runtime for the worker and the operator commands. The benchmarks build the
/// worker's with it too, so that they measure what runs.
pub fn build() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The runtime of the intake: tokio's multi-thread scheduler, one thread per core (or
/// `TOKIO_WORKER_THREADS`). Its requests are independent of each other and each verifies
/// an HMAC; they spread over the cores, unlike the worker's one pipeline.
pub fn build_intake() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

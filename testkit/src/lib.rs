//! What segment-bridge's integration tests (`tests/it`, `tests/broker`) and benchmarks
//! (`benches/`) share, in one place instead of a copy per file:
//!
//! - [`broker`]: the local RabbitMQ: connecting, per-test queues, the broker lock,
//!   `rabbitmqctl`, publishing and taking messages;
//! - [`segment`]: the fake Segment the tests talk to, and what to read out of the events
//!   it accepted; and the benchmarks' fast counting sink ([`segment::Sink`]);
//! - [`sessions`]: the benchmarks' realistic, deterministic sessions, and the pure path
//!   (parse, map) run over them;
//! - [`app`]: the worker started in-process through [`segment_bridge::app::WorkerApp`],
//!   configured for a test's queues and fakes;
//! - [`launch`]: the `segment-bridge` binary as a child process;
//! - [`eventually`]: waiting for a condition instead of hand-written polling loops;
//! - [`stats`]: medians, percentiles and what `/proc` says about a process;
//! - [`jebbit`]: the signature Jebbit puts on a webhook;
//! - [`bench`]: the benchmark programs' error type, option parsers and exit code;
//! - [`tls`]: a test CA and server certificates, made with `openssl`.
//!
//! A dev-only crate: nothing here is part of the service.

pub mod app;
pub mod bench;
pub mod broker;
pub mod eventually;
pub mod jebbit;
pub mod launch;
pub mod segment;
pub mod sessions;
pub mod stats;
pub mod tls;

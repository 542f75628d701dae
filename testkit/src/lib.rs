//! What segment-bridge's integration tests (`tests/it`, `tests/broker`) and benchmarks
//! (`benches/`) share, in one place instead of a copy per file:
//!
//! - [`broker`]: the local RabbitMQ: connecting, per-test queues, the broker lock,
//!   `rabbitmqctl`, publishing and taking messages;
//! - [`segment`]: the fake Segment the tests talk to, which also serves benchmarks as a
//!   fast counting sink, and what to read out of the events it accepted;
//! - [`app`]: the worker started in-process through [`segment_bridge::app::WorkerApp`],
//!   configured for a test's queues and fakes;
//! - [`launch`]: the `segment-bridge` binary as a child process;
//! - [`eventually`]: waiting for a condition instead of hand-written polling loops;
//! - [`stats`]: medians, percentiles and what `/proc` says about a process;
//! - [`jebbit`]: the signature Jebbit puts on a webhook.
//!
//! A dev-only crate: nothing here is part of the service.

pub mod app;
pub mod broker;
pub mod eventually;
pub mod jebbit;
pub mod launch;
pub mod segment;
pub mod stats;

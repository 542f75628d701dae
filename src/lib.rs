//! segment-bridge forwards collected quiz and survey sessions from a RabbitMQ queue to
//! Segment's HTTP Tracking API, as one Identify and one `Survey Completed` Track event per
//! session, acknowledging each delivery only after Segment accepted both of its events.
//! Its `intake` command is the queue's front door: it receives the webhooks that put the
//! sessions there.
//!
//! # Layout
//! - [`config`]: `config.toml` + `SEGMENT_BRIDGE__*` environment, validated into typed values.
//! - [`session`]: the three input shapes (canonical, Jebbit webhook, JotUrl lead) → a
//!   validated [`session::Session`].
//! - [`events`]: session + mapping options → serialised Identify and Track (pure).
//! - [`batch`]: one region's batch: fits / push / full / take / split (pure).
//! - [`ack`]: which acknowledgements to send for deliveries finished out of order (pure).
//! - [`segment`]: the HTTP client, classifying responses into outcomes, backoff.
//! - [`consumer`]: RabbitMQ connections, queues, tickets: ack / hand back / dead-letter.
//! - [`worker`]: the wiring: deliveries → sessions → events → batches → send → settle.
//! - [`health`]: the side port, `/healthz`, `/readyz`, `/metrics`.
//! - [`runtime`]: the tokio runtimes: one thread for the worker (measured), one per core for the intake.
//! - [`metrics`]: metric names, help texts and handles.
//! - [`tools`]: the operator commands `preview`, `publish`, `replay-dead` and `check`.
//! - [`intake`]: the `intake` command: Jebbit and JotUrl webhooks onto the queue, with
//!   publisher confirms (signature, body, routes, publisher, metrics).
//! - [`headers`]: the AMQP headers the intake writes and the worker reads.
#![forbid(unsafe_code)]

pub mod ack;
pub mod batch;
pub mod config;
pub mod consumer;
pub mod events;
pub mod headers;
pub mod health;
pub mod intake;
pub mod metrics;
pub mod runtime;
pub mod segment;
pub mod session;
pub mod tools;
pub mod worker;

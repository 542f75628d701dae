//! segment-bridge forwards collected quiz and survey sessions from a RabbitMQ queue to
//! Segment's HTTP Tracking API, as one Identify and one `Survey Completed` Track event per
//! session, acknowledging each delivery only after Segment accepted both of its events.
//! Its `intake` command is the queue's front door: it receives the webhooks that put the
//! sessions there.
//!
//! # Layout
//! Two programs (the intake: HTTP → RabbitMQ; the worker: RabbitMQ → Segment) around a
//! pure core.
//!
//! The pure core (no I/O, no clock):
//! - [`domain`]: the types everyone shares: [`domain::Region`], [`domain::Email`].
//! - [`session`]: the three input shapes (canonical, Jebbit webhook, JotUrl lead) → a
//!   validated [`session::Session`].
//! - [`events`]: session + mapping options → serialised Identify and Track.
//! - [`batch`]: one region's batch: fits / push / full / take / split.
//! - [`backoff`]: how long to wait before the next attempt, for every retry loop.
//!
//! The edges:
//! - [`config`]: `config.toml` + `SEGMENT_BRIDGE__*` environment, validated into typed
//!   values; the only judge of a configuration.
//! - [`amqp`]: RabbitMQ primitives both programs share: connect, confirm channels,
//!   publishing, headers.
//! - [`segment`]: the HTTP sink, classifying Segment's answers into outcomes.
//! - [`worker`]: the `run` program: consume loop, batching, senders, settlement (ack /
//!   hand back / dead-letter).
//! - [`intake`]: the `intake` program: Jebbit and JotUrl webhooks onto the queue, with
//!   publisher confirms.
//! - [`app`]: building and running each program; the one start-up path shared by the
//!   binary, the tests and the benches.
//! - [`health`], [`metrics`]: the side port (`/healthz`, `/readyz`, `/metrics`) and the
//!   worker's metrics.
//! - [`tools`]: the operator commands `preview`, `publish`, `replay-dead` and `check`.
//! - [`onboard`]: the onboarding commands `jebbit …` and `joturl token`: Jebbit's
//!   Integrations API, JotUrl URL tokens, handing a source's secret to the intake.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod app;
pub mod backoff;
pub mod batch;
pub mod config;
pub mod domain;
pub mod events;
pub mod health;
pub mod intake;
pub mod metrics;
pub mod onboard;
pub mod segment;
pub mod session;
pub mod tools;
pub mod worker;

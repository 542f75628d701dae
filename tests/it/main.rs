//! Integration tests: one binary, against the local RabbitMQ and real HTTP servers.
//! Every test uses its own queues (deleted afterwards) and ports.

mod delivery;
mod fake_jebbit;
mod helpers;
mod intake;
mod lifecycle;
mod onboard;
mod quorum;
mod tls;
mod tools;

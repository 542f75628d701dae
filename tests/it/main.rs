//! Integration tests: one binary, against the local RabbitMQ and real HTTP servers.
//! Every test uses its own queues (deleted afterwards) and ports.

mod broker_lock;
mod delivery;
mod helpers;
mod intake;
mod lifecycle;
mod quorum;
mod tls;
mod tools;

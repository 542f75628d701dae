//! RabbitMQ primitives both programs share: connecting (to one of `amqp.url`'s nodes, over
//! TLS with `amqp.tls_ca_file` when the URL is `amqps://`), making sure a queue exists,
//! confirm channels, publishing as mandatory and reading a publisher confirm. The headers
//! the programs write and read are in [`headers`].
//!
//! lapin does not recover connections by itself (its default): each program notices a
//! lost one and opens a new one, and the worker's ack bookkeeping relies on each
//! channel's delivery tags starting at 1.

pub mod headers;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use lapin::{Confirmation, PublisherConfirm};
use secrecy::ExposeSecret;
use std::sync::Arc;
use std::time::Duration;

use crate::config;

/// How long one node may take to accept a connection before the next one is tried. lapin's
/// connect has no timeout of its own: a node that drops packets would hang it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to one of the nodes named by `amqp.url`. lapin does not recover connections by
/// itself (its default): the worker notices a lost one and opens a new link, and the ack
/// bookkeeping relies on each channel's delivery tags starting at 1.
pub async fn connect(amqp: &config::Amqp) -> lapin::Result<Connection> {
    connect_as(amqp, concat!("segment-bridge/", env!("CARGO_PKG_VERSION"))).await
}

/// [`connect`], with the name the broker shows for the connection.
///
/// The nodes of `amqp.url` are tried in a shuffled order, each for at most
/// [`CONNECT_TIMEOUT`], until one accepts: a new order on every call, so that the clients
/// of a cluster spread over its nodes, and a node that is down costs one refused (or timed
/// out) attempt. The node connected to is logged as host:port; the error of the last
/// node tried is returned when none accepts.
pub async fn connect_as(amqp: &config::Amqp, name: &str) -> lapin::Result<Connection> {
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(name.as_bytes()));
    let tls = match &amqp.tls_ca_file {
        Some(path) => OwnedTLSConfig {
            identity: None,
            cert_chain: Some(std::fs::read_to_string(path).map_err(|e| {
                lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(std::io::Error::new(
                    e.kind(),
                    format!("amqp.tls_ca_file {}: {e}", path.display()),
                ))))
            })?),
        },
        None => OwnedTLSConfig::default(),
    };
    let mut urls = amqp.urls();
    shuffle(&mut urls);
    let mut last = None;
    for url in &urls {
        let node = node_of(url.expose_secret());
        let connecting = lapin::DefaultConnectionBuilder::new()?
            .with_uri_str(url.expose_secret().to_owned())
            .with_properties(properties.clone())
            .with_tls_config(tls.clone());
        let error = match tokio::time::timeout(CONNECT_TIMEOUT, connecting.connect()).await {
            Ok(Ok(connection)) => {
                tracing::info!(node = %node, connection = name, "Connected to RabbitMQ.");
                return Ok(connection);
            }
            Ok(Err(e)) => e,
            Err(_) => lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer from the broker",
            )))),
        };
        if urls.len() > 1 {
            tracing::warn!(node = %node, error = %error, "Cannot connect to this RabbitMQ node; trying the next one.");
        }
        last = Some(error);
    }
    Err(last.expect("amqp.url names at least one node"))
}

/// `host:port` of an AMQP URL, for logs: never its user or password.
pub fn node_of(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "(not an AMQP URL)".into(),
    }
}

/// Shuffles `items` in place (Fisher-Yates), seeded by the standard library's per-process
/// random hash keys and the clock: an even spread, not a secret.
fn shuffle<T>(items: &mut [T]) {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let mut state = hasher.finish() | 1;
    for i in (1..items.len()).rev() {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = (state % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Makes sure `queue` exists. An existing queue is used as it is, whatever its arguments
/// (quorum, limits); a missing one is declared durable with no arguments when `declare`
/// is set, and is an error otherwise.
pub async fn ensure_queue(conn: &Connection, queue: &str, declare: bool) -> lapin::Result<()> {
    // A passive declare that fails closes its channel, so it gets one of its own.
    let probe = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let found = probe
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    if found.is_ok() {
        let _ = probe.close(200, "OK".into()).await;
        return Ok(());
    }
    if !declare {
        return found.map(drop);
    }
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "OK".into()).await;
    Ok(())
}

/// A new channel on `connection`, in confirm mode.
pub async fn confirm_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes to `queue` through the default exchange, as mandatory: a queue that does not
/// exist makes the confirmation fail instead of the message vanishing.
pub async fn publish_mandatory(
    channel: &Channel,
    queue: &ShortString,
    body: &[u8],
    properties: BasicProperties,
) -> lapin::Result<PublisherConfirm> {
    channel
        .basic_publish(
            "".into(),
            queue.clone(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
}

/// Why a publish is not known to be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unconfirmed {
    /// `basic.nack`: the broker refused it. A quorum queue's client on RabbitMQ 3.10 can
    /// keep refusing on a channel whose first publish came while the queue's leader node
    /// was down; a fresh channel is not affected (see the publishers).
    #[error("the broker refused the message (nack)")]
    Nack,
    #[error("the broker returned the message: no such queue")]
    Returned,
    #[error("the channel is not in confirm mode")]
    NotConfirmMode,
    /// The channel or connection failed before the confirm came.
    #[error("{0}")]
    Failed(String),
}

/// Waits for the broker's confirmation of one publish.
pub async fn confirmed(confirm: PublisherConfirm) -> Result<(), Unconfirmed> {
    match confirm.await {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => Err(Unconfirmed::Returned),
        Ok(Confirmation::Nack(_)) => Err(Unconfirmed::Nack),
        Ok(Confirmation::NotRequested) => Err(Unconfirmed::NotConfirmMode),
        Err(e) => Err(Unconfirmed::Failed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_named_by_host_and_port_only() {
        assert_eq!(
            node_of("amqps://user:s3cret@rabbit-1.example:5671/%2f"),
            "rabbit-1.example:5671"
        );
        assert_eq!(node_of("amqp://u:p@h"), "h:5672");
        assert!(!node_of("nonsense:s3cret").contains("s3cret"));
    }

    #[test]
    fn a_shuffle_keeps_every_item_and_varies_the_first() {
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut v = [1, 2, 3];
            shuffle(&mut v);
            let mut sorted = v;
            sorted.sort();
            assert_eq!(sorted, [1, 2, 3]);
            firsts.insert(v[0]);
        }
        assert_eq!(firsts.len(), 3);
    }
}

//! RabbitMQ primitives both programs share: connecting, making sure a queue exists,
//! confirm channels, publishing as mandatory and reading a publisher confirm. The headers
//! the programs write and read are in [`headers`].
//!
//! lapin does not recover connections by itself (its default): each program notices a
//! lost one and opens a new one, and the worker's ack bookkeeping relies on each
//! channel's delivery tags starting at 1.

pub mod headers;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use lapin::{Confirmation, PublisherConfirm};
use secrecy::ExposeSecret;

use crate::config;

/// Connects to the broker named by `amqp.url`. lapin does not recover connections by
/// itself (its default): the worker notices a lost one and opens a new link, and the ack
/// bookkeeping relies on each channel's delivery tags starting at 1.
pub async fn connect(amqp: &config::Amqp) -> lapin::Result<Connection> {
    connect_as(amqp, concat!("segment-bridge/", env!("CARGO_PKG_VERSION"))).await
}

/// [`connect`], with the name the broker shows for the connection.
pub async fn connect_as(amqp: &config::Amqp, name: &str) -> lapin::Result<Connection> {
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(name.as_bytes()));
    Connection::connect(amqp.url.expose_secret(), properties).await
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

/// Waits for the broker's confirmation of one publish.
pub async fn confirmed(confirm: PublisherConfirm) -> Result<(), String> {
    match confirm.await {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => {
            Err("the broker returned the message: no such queue".into())
        }
        Ok(Confirmation::Nack(_)) => Err("the broker refused the message (nack)".into()),
        Ok(Confirmation::NotRequested) => Err("the channel is not in confirm mode".into()),
        Err(e) => Err(e.to_string()),
    }
}

//! AMQP publishing with publisher confirms and reconnection.
//!
//! [`Publisher`] owns at most one connection and one confirm-mode channel. Any failure drops
//! them; the next call reconnects (the caller, e.g. the outbox relay, backs off between
//! attempts). Publishing succeeds only when the broker has confirmed every message, so a
//! caller may delete what it published only after `publish_confirmed` returns `Ok`.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::db::redact_url;

/// One event ready to go on the wire.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    pub message_id: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub timestamp_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused (nacked) a published message")]
    Nacked,
}

pub struct Publisher {
    url: String,
    exchange: String,
    connection_name: String,
    state: Option<(Connection, Channel)>,
}

impl Publisher {
    pub fn new(url: &str, exchange: &str, connection_name: &str) -> Self {
        Self {
            url: url.to_owned(),
            exchange: exchange.to_owned(),
            connection_name: connection_name.to_owned(),
            state: None,
        }
    }

    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    async fn channel(&mut self) -> Result<Channel, lapin::Error> {
        if let Some((conn, ch)) = &self.state {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
            self.state = None;
        }
        let conn = connect(&self.url, &self.connection_name).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        declare_exchange(&ch, &self.exchange).await?;
        tracing::info!(url = %redact_url(&self.url), exchange = %self.exchange, "AMQP publisher connected");
        self.state = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Publishes every message (persistent, JSON) and waits until the broker confirmed all.
    pub async fn publish_confirmed(
        &mut self,
        messages: &[OutgoingMessage],
    ) -> Result<(), PublishError> {
        let result = self.try_publish(messages).await;
        if result.is_err() {
            self.state = None;
        }
        result
    }

    async fn try_publish(&mut self, messages: &[OutgoingMessage]) -> Result<(), PublishError> {
        let ch = self.channel().await?;
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(ShortString::from(m.message_id.as_str()))
                .with_type(ShortString::from(m.routing_key.as_str()))
                .with_timestamp(m.timestamp_secs);
            let confirm = ch
                .basic_publish(
                    self.exchange.as_str().into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &m.body,
                    props,
                )
                .await?;
            confirms.push(confirm);
        }
        for c in confirms {
            let confirmation = c.await?;
            if confirmation.is_nack() {
                return Err(PublishError::Nacked);
            }
        }
        Ok(())
    }
}

/// Opens a connection with a name visible in the broker's management tools.
pub async fn connect(url: &str, connection_name: &str) -> Result<Connection, lapin::Error> {
    let opts =
        ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
    Connection::connect(url, opts).await
}

/// Declares the durable topic exchange events go to.
pub async fn declare_exchange(ch: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

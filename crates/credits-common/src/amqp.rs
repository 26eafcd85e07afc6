//! AMQP publishing with publisher confirms and reconnection.
//!
//! [`Publisher`] owns at most one connection and one confirm-mode channel. Any failure drops
//! them; the next call reconnects (the caller, e.g. the outbox relay, backs off between
//! attempts). Publishing succeeds only when the broker has confirmed every message, so a
//! caller may delete what it published only after `publish_confirmed` returns `Ok`.
//!
//! `AMQP_URL` may name several nodes of a cluster, comma-separated: [`connect`] tries them
//! in turn, each connection starting from the node after the one the previous connection
//! started from, so a reconnect after a node's loss moves to a live node.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::db::redact_url;

/// One event ready to go on the wire.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    pub message_id: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub timestamp_secs: u64,
    /// The W3C trace context the event was written in, sent as the `traceparent` header.
    pub traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused (nacked) a published message")]
    Nacked,
    #[error("the broker did not confirm within {0:?}")]
    TimedOut(std::time::Duration),
}

/// What the broker did with one confirmed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Routed to at least one queue and confirmed.
    Routed,
    /// Published `mandatory` and returned: no queue is bound for its routing key. The
    /// broker kept nothing; the caller must keep the message.
    Unroutable,
}

/// Longest a publish and its confirms may take before the connection is given up (a
/// broker that stopped its app can accept TCP and never answer).
pub const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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

    /// Drops the connection; the next publish connects and declares everything again.
    pub fn reset(&mut self) {
        self.state = None;
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
        let mut ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        declare_exchange(&ch, &self.exchange).await?;
        if !declare_parking_queue(&ch, &self.parking_queue()).await? {
            // A parking queue declared classic by an earlier release: used as it is (its
            // type cannot change in place; docs/operations.md says how to move it).
            ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            ch.queue_declare(
                self.parking_queue().as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            tracing::warn!(queue = %self.parking_queue(), "the parking queue exists with other arguments than a quorum queue's (a classic queue from an earlier release, kept on one broker node): used as it is; see docs/operations.md to make it a quorum queue");
        }
        tracing::info!(url = %redact_url(&self.url), exchange = %self.exchange, "AMQP publisher connected");
        self.state = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Publishes every message (persistent, JSON, `mandatory`) to the exchange and waits
    /// until the broker confirmed all, within [`PUBLISH_TIMEOUT`]; says per message whether
    /// a queue received it.
    pub async fn publish_confirmed(
        &mut self,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<Delivery>, PublishError> {
        let exchange = self.exchange.clone();
        self.publish_to(&exchange, messages, |m| m.routing_key.clone())
            .await
    }

    /// Publishes messages that no queue would receive to the durable parking queue
    /// `<exchange>.unrouted` (through the default exchange), where they are kept for an
    /// operator to replay; their routing key stays in their `type` property.
    pub async fn park(
        &mut self,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<Delivery>, PublishError> {
        let queue = self.parking_queue();
        self.publish_to("", messages, |_| queue.clone()).await
    }

    pub fn parking_queue(&self) -> String {
        format!("{}.unrouted", self.exchange)
    }

    async fn publish_to(
        &mut self,
        exchange: &str,
        messages: &[OutgoingMessage],
        routing_key: impl Fn(&OutgoingMessage) -> String,
    ) -> Result<Vec<Delivery>, PublishError> {
        let sent = async {
            let ch = self.channel().await?;
            send(&ch, exchange, messages, routing_key).await
        };
        let result = tokio::time::timeout(PUBLISH_TIMEOUT, sent)
            .await
            .unwrap_or(Err(PublishError::TimedOut(PUBLISH_TIMEOUT)));
        if result.is_err() {
            self.state = None;
        }
        result
    }
}

/// Publishes every message on `ch` and waits for all the broker's confirms.
async fn send(
    ch: &Channel,
    exchange: &str,
    messages: &[OutgoingMessage],
    routing_key: impl Fn(&OutgoingMessage) -> String,
) -> Result<Vec<Delivery>, PublishError> {
    let mut confirms = Vec::with_capacity(messages.len());
    for m in messages {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(m.message_id.as_str()))
            .with_type(ShortString::from(m.routing_key.as_str()))
            .with_timestamp(m.timestamp_secs);
        let props = match &m.traceparent {
            Some(tp) => {
                let mut headers = FieldTable::default();
                headers.insert(
                    crate::trace::HEADER.into(),
                    AMQPValue::LongString(tp.as_str().into()),
                );
                props.with_headers(headers)
            }
            None => props,
        };
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key(m).as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &m.body,
                props,
            )
            .await?;
        confirms.push(confirm);
    }
    // lapin hangs a returned message on whichever confirm it resolves next, not on the
    // one it belongs to: a `basic.return` is sent at routing time, the ack of an earlier
    // persistent message only after its fsync, so the return of message 2 can arrive
    // first and be attached to message 1's ack (and a `multiple` ack resolves its tags in
    // no set order). Which messages came back is therefore read from the returned
    // messages' own ids, over the whole batch; reading it per confirm once published a
    // routed event twice and deleted an unroutable one as if a queue had it.
    let mut returned = std::collections::HashSet::new();
    for c in confirms {
        match c.await? {
            lapin::Confirmation::Ack(None) | lapin::Confirmation::NotRequested => {}
            lapin::Confirmation::Ack(Some(m)) => {
                returned.insert(returned_id(&m));
            }
            lapin::Confirmation::Nack(_) => {
                return Err(PublishError::Nacked);
            }
        }
    }
    Ok(messages.iter().map(|m| delivery_of(m, &returned)).collect())
}

/// The id a returned message was published with (`None` if it had none: ours always do).
fn returned_id(m: &lapin::message::BasicReturnMessage) -> Option<String> {
    m.delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
}

/// A message is unroutable exactly when the broker returned a message with its id.
fn delivery_of(
    m: &OutgoingMessage,
    returned: &std::collections::HashSet<Option<String>>,
) -> Delivery {
    if returned.contains(&Some(m.message_id.clone())) {
        Delivery::Unroutable
    } else {
        Delivery::Routed
    }
}

/// How long one broker node may take to accept a connection before the next is tried.
const NODE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the next connection starts in a list of nodes (spreads connections, and moves a
/// reconnect on to the next node).
static NEXT_NODE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The broker nodes an `AMQP_URL` names: one URL, or several separated by commas.
pub fn broker_urls(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// Opens a connection with a name visible in the broker's management tools, to the first
/// node of `urls` ([`broker_urls`]) that accepts it within [`NODE_CONNECT_TIMEOUT`],
/// starting from a different node each call; the last node's error when none does.
pub async fn connect(urls: &str, connection_name: &str) -> Result<Connection, lapin::Error> {
    let nodes = broker_urls(urls);
    if nodes.len() <= 1 {
        return connect_one(urls.trim(), connection_name).await;
    }
    let start = NEXT_NODE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut last = None;
    for i in 0..nodes.len() {
        let url = nodes[(start + i) % nodes.len()];
        let attempt = tokio::time::timeout(NODE_CONNECT_TIMEOUT, connect_one(url, connection_name));
        let e = match attempt.await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => e,
            Err(_) => lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", NODE_CONNECT_TIMEOUT.as_secs()),
            )),
        };
        tracing::warn!(node = %redact_url(url), error = %e, "AMQP node unreachable; trying the next");
        last = Some(e);
    }
    Err(last.unwrap_or_else(|| {
        lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "AMQP_URL names no broker",
        ))
    }))
}

/// One node. `amqps://` speaks TLS and verifies the broker's certificate against the
/// system's CAs, or against the PEM file named by `AMQP_TLS_CA_FILE` (a private CA).
async fn connect_one(url: &str, connection_name: &str) -> Result<Connection, lapin::Error> {
    let opts =
        ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
    let ca_file = std::env::var("AMQP_TLS_CA_FILE")
        .ok()
        .filter(|f| !f.is_empty());
    match ca_file {
        Some(file) if url.starts_with("amqps://") => {
            let pem = std::fs::read_to_string(&file).map_err(|e| {
                lapin::Error::from(std::io::Error::new(
                    e.kind(),
                    format!("AMQP_TLS_CA_FILE {file}: {e}"),
                ))
            })?;
            let tls = lapin::tcp::OwnedTLSConfig {
                identity: None,
                cert_chain: Some(pem),
            };
            Connection::connect_with_config(url, opts, tls, lapin::runtime::default_runtime()?)
                .await
        }
        _ => Connection::connect(url, opts).await,
    }
}

/// Declares the durable parking queue `queue` as a quorum queue (replicated across a
/// cluster's nodes, so a node's loss loses no parked event). False when it exists as
/// another type (406 PRECONDITION_FAILED: the channel is closed by the broker).
async fn declare_parking_queue(ch: &Channel, queue: &str) -> Result<bool, lapin::Error> {
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    let declared = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            quorum,
        )
        .await;
    match declared {
        Ok(_) => Ok(true),
        Err(e) if is_precondition_failed(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the broker refused a declaration as inequivalent to what exists (406).
fn is_precondition_failed(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
}

/// Declares a queue only this connection uses (deleted with it) and binds it to every event
/// of `exchange` matching `pattern` — a tap or a sink. `args`: queue arguments (e.g.
/// `x-max-length`).
pub async fn declare_private_queue(
    ch: &Channel,
    exchange: &str,
    queue: &str,
    pattern: &str,
    args: FieldTable,
) -> Result<(), lapin::Error> {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    declare_exchange(ch, exchange).await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        pattern.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
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

/// The trace context a delivery was published in (its `traceparent` header), if valid.
pub fn traceparent_of(props: &BasicProperties) -> Option<crate::trace::TraceContext> {
    let value = props
        .headers()
        .as_ref()?
        .inner()
        .get(crate::trace::HEADER)?;
    match value {
        AMQPValue::LongString(s) => crate::trace::parent_from(Some(s.as_bytes())),
        // Some clients (.NET, Java) send header strings as byte arrays.
        AMQPValue::ByteArray(b) => crate::trace::parent_from(Some(b.as_slice())),
        _ => None,
    }
}

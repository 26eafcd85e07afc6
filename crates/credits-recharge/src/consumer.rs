//! The event consumer: a durable quorum queue bound to the events the worker acts on, with
//! a dead-letter exchange for messages it cannot parse. It acknowledges a message only
//! after its effect is committed; transient failures are requeued after a pause (the
//! quorum queue's delivery limit dead-letters a message that keeps failing), and it
//! reconnects with backoff when the broker goes away.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use credits_common::db::redact_url;

use crate::domain::{DisabledReason, RechargeError};
use crate::worker::Recharge;

pub const DEAD_LETTER_EXCHANGE: &str = "credits.dlx";
pub const BINDINGS: [&str; 3] = [
    "ledger.balance.threshold_crossed",
    "payments.payment_method.default_changed",
    "payments.payment_method.removed",
];

#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub amqp_url: String,
    pub exchange: String,
    pub queue: String,
    pub prefetch: u16,
    pub connection_name: String,
}

#[derive(Debug, Deserialize)]
struct Envelope {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    account_id: String,
    #[serde(default)]
    data: serde_json::Value,
}

enum Outcome {
    Done,
    Poison(String),
    Retry(String),
}

/// Declares the exchange, the dead-letter exchange and queue, and the work queue.
pub async fn declare(ch: &Channel, cfg: &ConsumerConfig) -> Result<(), lapin::Error> {
    credits_common::amqp::declare_exchange(ch, &cfg.exchange).await?;
    ch.exchange_declare(
        DEAD_LETTER_EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let dlq = format!("{}.dlq", cfg.queue);
    ch.queue_declare(
        dlq.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum.clone(),
    )
    .await?;
    ch.queue_bind(
        dlq.as_str().into(),
        DEAD_LETTER_EXCHANGE.into(),
        cfg.queue.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut args = quorum;
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(DEAD_LETTER_EXCHANGE)),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(cfg.queue.as_str())),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(50));
    ch.queue_declare(
        cfg.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    for key in BINDINGS {
        ch.queue_bind(
            cfg.queue.as_str().into(),
            cfg.exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

pub async fn run(worker: Arc<Recharge>, cfg: ConsumerConfig, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match consume(&worker, &cfg, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(amqp_url = %redact_url(&cfg.amqp_url), queue = %cfg.queue, "event consumer lost RabbitMQ: {e}; reconnecting in {:.1}s", backoff.as_secs_f32());
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    _ = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    tracing::info!("event consumer stopped");
}

async fn consume(
    worker: &Arc<Recharge>,
    cfg: &ConsumerConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let conn = credits_common::amqp::connect(&cfg.amqp_url, &cfg.connection_name).await?;
    let ch = conn.create_channel().await?;
    declare(&ch, cfg).await?;
    ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = ch
        .basic_consume(
            cfg.queue.as_str().into(),
            cfg.connection_name.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %cfg.queue, "event consumer connected");
    // Deliveries are handled concurrently (at most `prefetch` unacknowledged at once):
    // events of different accounts are independent, and decisions for one account
    // serialise on its settings row.
    let mut in_flight = tokio::task::JoinSet::new();
    let result = loop {
        let next = tokio::select! {
            d = deliveries.next() => d,
            _ = shutdown.cancelled() => break Ok(()),
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => break Err(e.into()),
            None => break Err(anyhow::anyhow!("the broker ended the consumer")),
        };
        let worker = worker.clone();
        let shutdown = shutdown.clone();
        in_flight.spawn(async move {
            let acked = match handle(&worker, &delivery.data).await {
                Outcome::Done => delivery.ack(BasicAckOptions::default()).await,
                Outcome::Poison(why) => {
                    tracing::warn!(reason = %why, "unparseable event dead-lettered");
                    metrics::counter!("credits_recharge_dead_lettered_total").increment(1);
                    delivery
                        .nack(BasicNackOptions {
                            requeue: false,
                            ..Default::default()
                        })
                        .await
                }
                Outcome::Retry(why) => {
                    tracing::warn!(reason = %why, "event processing failed; requeued");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {},
                        _ = shutdown.cancelled() => {},
                    }
                    delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await
                }
            };
            if let Err(e) = acked {
                // The broker redelivers an unacknowledged message; its effect is idempotent.
                tracing::warn!(error = %e, "could not acknowledge an event");
            }
        });
    };
    // Let handlers that already started finish (their effects commit either way).
    while in_flight.join_next().await.is_some() {}
    result
}

async fn handle(worker: &Arc<Recharge>, body: &[u8]) -> Outcome {
    let env: Envelope = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => return Outcome::Poison(format!("not an event envelope: {e}")),
    };
    if env.id.is_empty() || env.account_id.is_empty() {
        return Outcome::Poison("event without id or account_id".to_owned());
    }
    let result = match env.kind.as_str() {
        "ledger.balance.threshold_crossed" => {
            worker
                .decide_and_start(&env.account_id, "threshold_crossed", Some(&env.id))
                .await
        }
        "payments.payment_method.default_changed" => {
            match env.data.get("type").and_then(|t| t.as_str()) {
                Some("CARD") => Ok(()),
                Some(_) => {
                    worker
                        .disable_for_event(
                            &env.account_id,
                            DisabledReason::DEFAULT_PAYMENT_METHOD_NOT_CARD,
                            &env.id,
                        )
                        .await
                }
                None => return Outcome::Poison("default_changed without data.type".to_owned()),
            }
        }
        "payments.payment_method.removed" => {
            match env.data.get("was_default").and_then(|t| t.as_bool()) {
                Some(true) => {
                    worker
                        .disable_for_event(
                            &env.account_id,
                            DisabledReason::NO_DEFAULT_PAYMENT_METHOD,
                            &env.id,
                        )
                        .await
                }
                Some(false) => Ok(()),
                None => return Outcome::Poison("removed without data.was_default".to_owned()),
            }
        }
        other => {
            tracing::debug!(kind = other, "event type not handled; acknowledged");
            Ok(())
        }
    };
    match result {
        Ok(()) => Outcome::Done,
        Err(RechargeError::Unavailable(m)) | Err(RechargeError::Internal(m)) => Outcome::Retry(m),
        Err(e) => {
            tracing::warn!(event_id = %env.id, account_id = %env.account_id, error = %e, "event could not be applied; acknowledged");
            Outcome::Done
        }
    }
}

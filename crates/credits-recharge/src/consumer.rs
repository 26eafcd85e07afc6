//! The event consumer: a durable quorum queue bound to the events the worker acts on, with
//! a dead-letter exchange for messages it cannot parse.
//!
//! A crossing is acknowledged only after a local transaction recorded it: decided at once
//! when the ledger answers within 500 ms (`Recharge::on_crossing`), else (the ledger slow
//! or away, auto-recharge off, settings changing) as a due balance check
//! (`Recharge::record_crossing`) that any replica's sweeper carries out, so a crossing
//! never depends on the ledger being up nor on the queue's delivery limit. A message that cannot be handled *yet* (our database or payments away, a peer
//! refusing our token) is kept unacknowledged and retried here with backoff for as long as
//! it takes, never requeued towards the delivery limit and never dead-lettered: only a
//! message that cannot be parsed goes to the DLQ. The consumer re-declares its queue and
//! reconnects with backoff when the broker goes away or the queue is deleted.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use credits_common::db::redact_url;
use credits_common::events::{Envelope, Event, EventParseError, PaymentMethodType};

use crate::domain::RechargeError;
use crate::worker::Recharge;

pub const DEAD_LETTER_EXCHANGE: &str = "credits.dlx";
pub const BINDINGS: [&str; 4] = [
    "ledger.balance.threshold_crossed",
    "payments.payment_method.default_changed",
    "payments.payment_method.removed",
    "payments.charge.disputed",
];

#[derive(Clone)]
pub struct ConsumerConfig {
    pub amqp_url: String,
    pub exchange: String,
    pub queue: String,
    pub prefetch: u16,
    pub connection_name: String,
}

/// The broker URL redacted: its password never shows.
impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("amqp_url", &credits_common::db::redact_url(&self.amqp_url))
            .field("exchange", &self.exchange)
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("connection_name", &self.connection_name)
            .finish()
    }
}

/// Backoff of an event that cannot be applied yet: first pause, and the longest.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(15);
/// After this many tries in a row the retry is logged as an error (a dependency is down).
const RETRIES_BEFORE_ERROR: u32 = 10;

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

/// `credits_recharge_queue_messages{queue}`: the events waiting in the work queue (the
/// consumers' lag) and in its dead-letter queue, read every few seconds while connected.
async fn queue_gauges(
    conn: std::sync::Arc<lapin::Connection>,
    queue: String,
    stop: CancellationToken,
) {
    let dlq = format!("{queue}.dlq");
    loop {
        for (name, role) in [(&queue, "work"), (&dlq, "dead_letter")] {
            // A passive declare that fails closes its channel: one channel per probe.
            let Ok(ch) = conn.create_channel().await else {
                return;
            };
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            if let Ok(q) = ch
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
            {
                metrics::gauge!("credits_recharge_queue_messages", "queue" => role)
                    .set(f64::from(q.message_count()));
            }
            let _ = ch.close(200, "gauge read".into()).await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

async fn consume(
    worker: &Arc<Recharge>,
    cfg: &ConsumerConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let conn = std::sync::Arc::new(
        credits_common::amqp::connect(&cfg.amqp_url, &cfg.connection_name).await?,
    );
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
    // Handlers holding an event they cannot apply yet give it back (unacknowledged) when
    // this connection ends, so the consumer reconnects at once instead of waiting for them.
    let connection = shutdown.child_token();
    tokio::spawn(queue_gauges(
        conn.clone(),
        cfg.queue.clone(),
        connection.clone(),
    ));
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
        let shutdown = connection.clone();
        // The event is handled in the producer's trace (its `traceparent` header).
        let kind = delivery.properties.kind().as_ref().map(|k| k.as_str());
        let (span, cx) = credits_common::trace::span(
            &format!("consume {}", kind.unwrap_or("event")),
            "consumer",
            credits_common::amqp::traceparent_of(&delivery.properties),
        );
        let handling = async move {
            let mut backoff = RETRY_FIRST;
            let mut tries = 0u32;
            let acked = loop {
                match handle(&worker, &delivery.data).await {
                    Outcome::Done => break delivery.ack(BasicAckOptions::default()).await,
                    Outcome::Poison(why) => {
                        tracing::warn!(reason = %why, "unparseable event dead-lettered");
                        metrics::counter!("credits_recharge_dead_lettered_total").increment(1);
                        break delivery
                            .nack(BasicNackOptions {
                                requeue: false,
                                ..Default::default()
                            })
                            .await;
                    }
                    Outcome::Retry(why) => {
                        tries += 1;
                        metrics::counter!("credits_recharge_event_retries_total").increment(1);
                        if tries == RETRIES_BEFORE_ERROR {
                            tracing::error!(reason = %why, tries, "an event still cannot be applied: a dependency is down; holding it and retrying");
                        } else {
                            tracing::warn!(reason = %why, tries, "event cannot be applied yet; retrying in {:.1}s", backoff.as_secs_f32());
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {},
                            // Left unacknowledged: the broker hands it to the next consumer.
                            _ = shutdown.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                }
            };
            if let Err(e) = acked {
                // The broker redelivers an unacknowledged message; its effect is idempotent.
                tracing::warn!(error = %e, "could not acknowledge an event");
            }
        };
        in_flight.spawn(credits_common::trace::scope(cx, handling.instrument(span)));
    };
    // Let handlers that already started finish (their effects commit either way); those
    // still waiting on a dependency stop waiting.
    connection.cancel();
    while in_flight.join_next().await.is_some() {}
    result
}

/// What a body asks of this consumer: an event to act on, one to acknowledge unread (a type
/// the contract added after this build), or poison — not JSON, not the envelope, an id that
/// is not a UUID, an account id that breaks the contract, data that is not its type's.
fn classify(body: &[u8]) -> Result<Option<Envelope>, String> {
    match Envelope::parse(body) {
        Ok(env) => Ok(Some(env)),
        Err(EventParseError::UnknownType { kind, .. }) => {
            tracing::debug!(kind, "event type not handled; acknowledged");
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn handle(worker: &Arc<Recharge>, body: &[u8]) -> Outcome {
    let env = match classify(body) {
        Ok(Some(env)) => env,
        Ok(None) => return Outcome::Done,
        Err(why) => return Outcome::Poison(why),
    };
    let account = env.account_id.as_str();
    let event_id = env.id.to_string();
    let result = match &env.event {
        Event::BalanceThresholdCrossed(_) => worker.on_crossing(account, &event_id).await,
        Event::PaymentMethodDefaultChanged(changed) => match changed.method_type {
            PaymentMethodType::Card => Ok(()),
            _ => worker.apply_method_event(account, &event_id).await,
        },
        Event::PaymentMethodRemoved(removed) => {
            if removed.was_default {
                worker.apply_method_event(account, &event_id).await
            } else {
                Ok(())
            }
        }
        Event::ChargeDisputed(d) => {
            worker
                .apply_dispute_event(account, &event_id, &d.status)
                .await
        }
        // In the contract, but not what this worker acts on (its queue is bound to BINDINGS
        // only); listed so that a new event is a decision here, not a silent ack.
        Event::AccountSuspended(_)
        | Event::AccountReactivated(_)
        | Event::AccountActivated(_)
        | Event::HoldCreated(_)
        | Event::HoldCaptured(_)
        | Event::HoldReleased(_)
        | Event::HoldExpired(_)
        | Event::BalanceAlert(_)
        // An expiry that needs a top-up publishes its own threshold crossing (R29).
        | Event::CreditsExpired(_)
        | Event::ChargeSucceeded(_)
        | Event::ChargeFailed(_)
        | Event::ChargeActionRequired(_)
        | Event::ChargeRefunded(_)
        | Event::AttemptSucceeded(_)
        | Event::AttemptFailed(_)
        | Event::SettingsDisabled(_)
        | Event::LimitReached(_) => {
            tracing::debug!(
                kind = env.event.routing_key(),
                "event type not handled; acknowledged"
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => Outcome::Done,
        Err(RechargeError::Unavailable(m)) | Err(RechargeError::Internal(m)) => Outcome::Retry(m),
        Err(e) => {
            // A well-formed event about something that no longer applies (an account the
            // ledger does not know, …): nothing to do, and retrying would not change that.
            tracing::warn!(event_id = %env.id, account_id = %account, error = %e, "event does not apply; acknowledged");
            Outcome::Done
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{BINDINGS, classify};
    use credits_common::events::Event;

    const ID: &str = "0190a5b0-0000-7000-8000-000000000001";

    #[test]
    fn only_well_formed_envelopes_are_accepted() {
        let ok = format!(
            r#"{{"id":"{ID}","type":"payments.payment_method.removed","occurred_at":"2026-11-25T00:27:37Z","account_id":"acme","data":{{"payment_method_id":"pm_1","was_default":true,"type":"CARD"}}}}"#
        );
        assert!(classify(ok.as_bytes()).unwrap().is_some());
        for bad in [
            &b"not json"[..],
            br#"{"id":"","type":"x","account_id":"acme"}"#,
            br#"{"id":"nul\u0000","type":"x","occurred_at":"2026-11-25T00:27:37Z","account_id":"acme"}"#,
            br#"{"id":"0190a5b0-0000-7000-8000-000000000001","type":"x","occurred_at":"2026-11-25T00:27:37Z","account_id":"a b"}"#,
            br#"{"id":"0190a5b0-0000-7000-8000-000000000001","type":"x"}"#,
            br#"[]"#,
            // A type this worker acts on, without the data it needs.
            br#"{"id":"0190a5b0-0000-7000-8000-000000000001","type":"payments.payment_method.removed","occurred_at":"2026-11-25T00:27:37Z","account_id":"acme","data":{}}"#,
        ] {
            assert!(classify(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn an_event_type_this_build_does_not_know_is_acknowledged_not_dead_lettered() {
        let body = format!(
            r#"{{"id":"{ID}","type":"ledger.something.new","occurred_at":"2026-11-25T00:27:37Z","account_id":"acme","data":{{}}}}"#
        );
        assert!(classify(body.as_bytes()).unwrap().is_none());
    }

    #[test]
    fn the_queue_is_bound_only_to_contract_routing_keys() {
        for key in BINDINGS {
            assert!(Event::ROUTING_KEYS.contains(&key), "{key}");
        }
    }
}

//! The recharge dead-letter queue (`<queue>.dlq`), for operators: list what is in it and
//! replay it into the work queue (`credits dlq list|replay`, docs/operations.md).
//!
//! An event lands there when recharge cannot parse it (a poison message) or after the
//! queue's delivery limit. Replaying publishes it again to the work queue only (through
//! the default exchange, properties kept), so no other consumer of the exchange sees it
//! twice; recharge applies each event id once, so a replay of one already applied is a
//! no-op. A message leaves the dead-letter queue only after the broker confirmed its
//! copy in the work queue.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;

/// One dead-lettered message, as `list` shows it.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    /// The event type (`ledger.balance.threshold_crossed`, …) when the publisher set it.
    pub event_type: Option<String>,
    /// Why the broker dead-lettered it (`rejected`, `delivery_limit`, …) and how often.
    pub reason: Option<String>,
    pub count: Option<i64>,
    pub body: Vec<u8>,
}

fn dlq_of(queue: &str) -> String {
    format!("{queue}.dlq")
}

fn first_death(props: &lapin::BasicProperties) -> (Option<String>, Option<i64>) {
    let Some(headers) = props.headers() else {
        return (None, None);
    };
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return (None, None);
    };
    let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() else {
        return (None, None);
    };
    let reason = match first.inner().get("reason") {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
        _ => None,
    };
    let count = match first.inner().get("count") {
        Some(AMQPValue::LongLongInt(n)) => Some(*n),
        Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
        _ => None,
    };
    (reason, count)
}

/// Up to `limit` messages of the dead-letter queue of `queue`, oldest first. Nothing is
/// taken: they return to the queue when the channel closes.
pub async fn list(amqp_url: &str, queue: &str, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let conn = credits_common::amqp::connect(amqp_url, "credits-dlq-list").await?;
    let ch = conn.create_channel().await?;
    let dlq = dlq_of(queue);
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(m) = ch
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let p = &m.delivery.properties;
        let (reason, count) = first_death(p);
        out.push(DeadLetter {
            message_id: p.message_id().as_ref().map(|s| s.to_string()),
            event_type: p.kind().as_ref().map(|s| s.to_string()),
            reason,
            count,
            body: m.delivery.data.clone(),
        });
    }
    // Unacknowledged: closing the channel gives every message back, in order.
    ch.close(200, "listed".into()).await?;
    conn.close(200, "done".into()).await?;
    Ok(out)
}

/// Moves the dead-lettered messages of `queue` (only the one with `message_id`, when
/// given) back into `queue`; returns how many. Each is acknowledged out of the dead-letter
/// queue only once the broker confirmed its copy.
pub async fn replay(
    amqp_url: &str,
    queue: &str,
    message_id: Option<&str>,
) -> anyhow::Result<usize> {
    let conn = credits_common::amqp::connect(amqp_url, "credits-dlq-replay").await?;
    let get = conn.create_channel().await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let dlq = dlq_of(queue);
    let mut moved = 0;
    // At most what was there when we started: a message that dies again is not looped on.
    let mut left: Option<u32> = None;
    loop {
        if left == Some(0) {
            break;
        }
        let Some(m) = get
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        left = Some(left.unwrap_or(m.message_count + 1) - 1);
        let d = m.delivery;
        let id = d.properties.message_id().as_ref().map(|s| s.to_string());
        if message_id.is_some_and(|want| id.as_deref() != Some(want)) {
            continue; // not this one: returned to the queue when the channel closes
        }
        let confirm = publish
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &d.data,
                d.properties.clone(),
            )
            .await?
            .await?;
        let routed = matches!(confirm, lapin::Confirmation::Ack(None));
        if !routed {
            anyhow::bail!(
                "{queue}: the broker did not take the replayed message {id:?}; it stays in {dlq}"
            );
        }
        d.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    get.close(200, "replayed".into()).await?;
    conn.close(200, "done".into()).await?;
    Ok(moved)
}

//! The transactional outbox relay (STYLE habit 7).
//!
//! Each daemon writes its events to its own `outbox` table in the same transaction as the
//! change they report (so an event exists if and only if the change committed). This relay
//! moves them to RabbitMQ: it claims a batch with `FOR UPDATE SKIP LOCKED` (replicas never
//! publish the same row concurrently), publishes with confirms, and deletes the rows only
//! after the broker confirmed them. A crash between confirm and delete republishes: events
//! are at-least-once and consumers de-duplicate by event id.
//!
//! The relay wakes on `NOTIFY credits_outbox` (sent by writers of events) and also polls, so
//! a lost notification only delays an event by the poll interval.
//!
//! Expected table (created by each daemon's migrations):
//! `outbox(seq bigint identity primary key, event_id uuid, routing_key text,
//!         payload jsonb, created_at timestamptz)`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::amqp::{OutgoingMessage, Publisher};
use crate::db::redact_url;

pub const NOTIFY_CHANNEL: &str = "credits_outbox";
const BATCH: i64 = 200;

/// The JSON envelope of every event (SPEC §3).
#[derive(Debug, Serialize)]
pub struct Envelope<'a, T: Serialize> {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub occurred_at: DateTime<Utc>,
    pub account_id: &'a str,
    pub data: T,
}

/// Writes one event into the outbox inside the caller's transaction, and asks the relay to
/// wake when that transaction commits (NOTIFY is delivered at commit, never on rollback).
pub async fn enqueue<T: Serialize>(
    tx: &mut Transaction<'_, Postgres>,
    routing_key: &str,
    account_id: &str,
    data: T,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    let envelope = Envelope {
        id,
        kind: routing_key,
        occurred_at: Utc::now(),
        account_id,
        data,
    };
    let payload = serde_json::to_value(&envelope).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query("INSERT INTO outbox (event_id, routing_key, payload) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(routing_key)
        .bind(payload)
        .execute(&mut **tx)
        .await?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(&mut **tx)
        .await?;
    Ok(id)
}

pub struct RelayConfig {
    pub amqp_url: String,
    pub exchange: String,
    pub connection_name: String,
    pub poll_interval: Duration,
}

/// Runs until `shutdown` is cancelled. Never returns an error: every failure is logged and
/// retried with backoff.
pub async fn run_relay(pool: PgPool, cfg: RelayConfig, shutdown: CancellationToken) {
    let mut publisher = Publisher::new(&cfg.amqp_url, &cfg.exchange, &cfg.connection_name);
    let mut listener: Option<PgListener> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        match relay_batch(&pool, &mut publisher).await {
            Ok(n) if n > 0 => {
                backoff = Duration::from_millis(100);
                metrics::counter!("credits_outbox_published_total").increment(n as u64);
                continue; // there may be more
            }
            Ok(_) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(
                    amqp_url = %redact_url(&cfg.amqp_url),
                    "outbox relay cannot publish: {e}; retrying in {:.1}s",
                    backoff.as_secs_f32()
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    _ = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        }
        // Idle: wait for a notification, the poll interval, or shutdown.
        if listener.is_none() {
            listener = match PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen(NOTIFY_CHANNEL).await {
                    Ok(()) => Some(l),
                    Err(_) => None,
                },
                Err(_) => None,
            };
        }
        let wait = async {
            match listener.as_mut() {
                Some(l) => l.recv().await.map(|_| ()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = wait => if r.is_err() { listener = None; },
            _ = tokio::time::sleep(cfg.poll_interval) => {},
            _ = shutdown.cancelled() => break,
        }
    }
    tracing::info!("outbox relay stopped");
}

#[derive(sqlx::FromRow)]
struct Row {
    seq: i64,
    event_id: Uuid,
    routing_key: String,
    payload: serde_json::Value,
    created_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Publish(#[from] crate::amqp::PublishError),
}

/// Publishes and deletes one batch; returns how many rows it relayed.
async fn relay_batch(pool: &PgPool, publisher: &mut Publisher) -> Result<usize, RelayError> {
    let mut tx = pool.begin().await?;
    // The shared relay queries the outbox at run time: every daemon owns its own copy of
    // the table, so there is no single schema to check them against at compile time.
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, event_id, routing_key, payload, created_at FROM outbox \
         ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let messages: Vec<OutgoingMessage> = rows
        .iter()
        .map(|r| OutgoingMessage {
            message_id: r.event_id.to_string(),
            routing_key: r.routing_key.clone(),
            body: r.payload.to_string().into_bytes(),
            timestamp_secs: r.created_at.timestamp().max(0) as u64,
        })
        .collect();
    publisher.publish_confirmed(&messages).await?;
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    sqlx::query("DELETE FROM outbox WHERE seq = ANY($1)")
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    for r in &rows {
        tracing::debug!(event_id = %r.event_id, routing_key = %r.routing_key, "event published");
    }
    Ok(rows.len())
}

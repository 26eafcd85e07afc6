//! The transactional outbox relay (STYLE habit 7).
//!
//! Each daemon writes its events to its own `outbox` table in the same transaction as the
//! change they report (so an event exists if and only if the change committed). This relay
//! moves them to RabbitMQ: it claims a batch (`claimed_until`, chosen with `FOR UPDATE SKIP
//! LOCKED` so replicas never take the same rows) and commits, publishes `mandatory` with
//! confirms under a timeout, and deletes the rows only after the broker confirmed that a
//! queue received them, in its next claim's statement (one commit for both) — no
//! transaction is held open across broker I/O. An event returned
//! as unroutable (no queue bound, e.g. a consumer's queue was deleted) is kept and retried
//! with backoff; after `park_after` it is parked in `<exchange>.unrouted` instead of being
//! dropped. A crash between confirm and delete republishes: events are at-least-once and
//! consumers de-duplicate by event id.
//!
//! The relay wakes on `NOTIFY credits_outbox` (sent by writers of events) and also polls, so
//! a lost notification only delays an event by the poll interval.
//!
//! Expected table (created by each daemon's migrations):
//! `outbox(seq bigint identity primary key, event_id uuid, routing_key text,
//!         payload jsonb, created_at timestamptz, traceparent text)`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::amqp::{Delivery, OutgoingMessage, Publisher};
use crate::db::redact_url;
use crate::events::{self, Event};

pub const NOTIFY_CHANNEL: &str = "credits_outbox";
const BATCH: i64 = 200;

/// Writes one event into the outbox inside the caller's transaction, and asks the relay to
/// wake when that transaction commits (NOTIFY is delivered at commit, never on rollback).
/// The row keeps the current trace context ([`crate::trace`]), which the relay sends on.
/// The body is the contract's envelope ([`crate::events::Envelope`]) with a fresh v7 id.
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    account_id: &str,
    event: &Event,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    let payload = events::body(id, Utc::now(), account_id, event)
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query(
        "INSERT INTO outbox (event_id, routing_key, payload, traceparent) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(event.routing_key())
    .bind(payload)
    .bind(crate::trace::current_header())
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
    /// How long an event that no queue receives is retried before it is parked in
    /// `<exchange>.unrouted` (kept there for an operator, and deleted from the outbox).
    pub park_after: Duration,
}

/// How long a relay owns the rows it claimed; past it another relay may take them.
const CLAIM: Duration = Duration::from_secs(60);
/// Backoff of an event returned as unroutable: first wait, and the longest.
const UNROUTABLE_FIRST: Duration = Duration::from_secs(5);
const UNROUTABLE_MAX: Duration = Duration::from_secs(120);
/// How often the depth and age gauges are refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);

/// Runs until `shutdown` is cancelled. Never returns an error: every failure is logged and
/// retried with backoff.
pub async fn run_relay(pool: PgPool, cfg: RelayConfig, shutdown: CancellationToken) {
    let mut publisher = Publisher::new(&cfg.amqp_url, &cfg.exchange, &cfg.connection_name);
    let mut listener: Option<PgListener> = None;
    let mut backoff = Duration::from_millis(100);
    let mut gauges_at = tokio::time::Instant::now();
    // Published, not yet deleted: deleted by the next claim, in its statement (one commit
    // for both), which runs one poll interval later at the latest (or after a database
    // error's backoff, at most 10 s) — well inside the 60 s claim.
    let mut published: Vec<i64> = Vec::new();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        if gauges_at.elapsed() >= GAUGE_EVERY {
            gauges_at = tokio::time::Instant::now();
            record_gauges(&pool, &cfg.connection_name).await;
        }
        match relay_batch(&pool, &mut publisher, &cfg, &mut published).await {
            Ok(n) if n > 0 => {
                backoff = Duration::from_millis(100);
                metrics::counter!("credits_outbox_published_total").increment(n as u64);
                // A full batch: there may be more at once. Otherwise what committed since is
                // announced to the listener (kept between waits), so an empty claim is not
                // spent to find out.
                if n >= BATCH as usize || listener.is_none() {
                    continue;
                }
            }
            Ok(_) => backoff = Duration::from_millis(100),
            Err(e) => {
                metrics::counter!("credits_outbox_relay_errors_total").increment(1);
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
        // Commits announced together are claimed together: one claim, not one per
        // notification already waiting.
        if let Some(l) = listener.as_mut() {
            for _ in 0..BATCH {
                if !matches!(
                    tokio::time::timeout(Duration::ZERO, l.recv()).await,
                    Ok(Ok(_))
                ) {
                    break;
                }
            }
        }
    }
    if !published.is_empty()
        && let Err(e) = sqlx::query("DELETE FROM outbox WHERE seq = ANY($1)")
            .bind(&published)
            .execute(&pool)
            .await
    {
        tracing::warn!(error = %e, "could not delete published outbox rows; their claim expires and they are published again");
    }
    tracing::info!("outbox relay stopped");
}

/// `credits_outbox_depth` and `credits_outbox_oldest_age_seconds` (label `relay`: the
/// daemon's relay, several of which share a process under `credits up`).
async fn record_gauges(pool: &PgPool, relay: &str) {
    // The daemon's pool, seen from its relay: connections in use and idle.
    let idle = pool.num_idle() as f64;
    metrics::gauge!("credits_db_pool_connections", "relay" => relay.to_owned(), "state" => "idle")
        .set(idle);
    metrics::gauge!("credits_db_pool_connections", "relay" => relay.to_owned(), "state" => "in_use")
        .set((f64::from(pool.size()) - idle).max(0.0));
    let row: Result<(i64, Option<f64>), sqlx::Error> = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8 FROM outbox",
    )
    .fetch_one(pool)
    .await;
    if let Ok((depth, age)) = row {
        let relay = relay.to_owned();
        metrics::gauge!("credits_outbox_depth", "relay" => relay.clone()).set(depth as f64);
        metrics::gauge!("credits_outbox_oldest_age_seconds", "relay" => relay)
            .set(age.unwrap_or(0.0).max(0.0));
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    seq: i64,
    event_id: Uuid,
    routing_key: String,
    payload: serde_json::Value,
    created_at: DateTime<Utc>,
    attempts: i32,
    first_returned_at: Option<DateTime<Utc>>,
    traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Publish(#[from] crate::amqp::PublishError),
}

fn message(r: &Row) -> OutgoingMessage {
    OutgoingMessage {
        message_id: r.event_id.to_string(),
        routing_key: r.routing_key.clone(),
        body: r.payload.to_string().into_bytes(),
        timestamp_secs: r.created_at.timestamp().max(0) as u64,
        traceparent: r.traceparent.clone(),
    }
}

/// Relays one batch: claim (and commit, deleting what the batch before published), publish,
/// and leave what a queue received in `published` for the next claim to delete; returns how
/// many rows it took on. No transaction is open while the broker is talked to.
async fn relay_batch(
    pool: &PgPool,
    publisher: &mut Publisher,
    cfg: &RelayConfig,
    published: &mut Vec<i64>,
) -> Result<usize, RelayError> {
    // The shared relay queries the outbox at run time: every daemon owns its own copy of
    // the table, so there is no single schema to check them against at compile time.
    let mut rows: Vec<Row> = sqlx::query_as(
        "WITH done AS (DELETE FROM outbox WHERE seq = ANY($3))
         UPDATE outbox SET claimed_until = now() + make_interval(secs => $2)
         WHERE seq IN (SELECT seq FROM outbox
                       WHERE next_attempt_at <= now()
                         AND (claimed_until IS NULL OR claimed_until < now())
                         AND seq <> ALL($3)
                       ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING seq, event_id, routing_key, payload, created_at, attempts, first_returned_at,
                   traceparent",
    )
    .bind(BATCH)
    .bind(CLAIM.as_secs_f64())
    .bind(&*published)
    .fetch_all(pool)
    .await?;
    published.clear();
    if rows.is_empty() {
        return Ok(0);
    }
    rows.sort_by_key(|r| r.seq);
    let messages: Vec<OutgoingMessage> = rows.iter().map(message).collect();
    let deliveries = match publisher.publish_confirmed(&messages).await {
        Ok(d) => d,
        Err(e) => {
            release(pool, &rows).await;
            return Err(e.into());
        }
    };
    let mut routed = Vec::new();
    let mut returned = Vec::new();
    for (r, d) in rows.iter().zip(&deliveries) {
        match d {
            Delivery::Routed => routed.push(r),
            Delivery::Unroutable => returned.push(r),
        }
    }
    // Returned long enough: kept in the parking queue instead, then deleted here.
    let now = Utc::now();
    let park_after = chrono::Duration::from_std(cfg.park_after).unwrap_or(chrono::Duration::MAX);
    let (to_park, mut to_retry): (Vec<&Row>, Vec<&Row>) = returned
        .into_iter()
        .partition(|r| r.first_returned_at.is_some_and(|t| now - t >= park_after));
    if !to_park.is_empty() {
        let parked: Vec<OutgoingMessage> = to_park.iter().map(|r| message(r)).collect();
        match publisher.park(&parked).await {
            Ok(d) if d.iter().all(|d| *d == Delivery::Routed) => {
                for r in &to_park {
                    tracing::warn!(event_id = %r.event_id, routing_key = %r.routing_key, queue = %publisher.parking_queue(), "no queue takes this event; parked");
                }
                metrics::counter!("credits_outbox_parked_total").increment(to_park.len() as u64);
                routed.extend(to_park);
            }
            // The parking queue itself is gone or refused: keep them, back off, and
            // declare it again on a fresh channel.
            Ok(_) => {
                publisher.reset();
                to_retry.extend(to_park);
            }
            Err(e) => {
                tracing::warn!(error = %e, "parking unroutable events failed; they stay in the outbox");
                to_retry.extend(to_park);
            }
        }
    }
    published.extend(routed.iter().map(|r| r.seq));
    for r in &routed {
        tracing::debug!(event_id = %r.event_id, routing_key = %r.routing_key, "event published");
    }
    // One statement for every returned row (a backlog of unroutable events must not cost a
    // round trip each, or it delays the events behind it).
    let mut retry_seqs = Vec::with_capacity(to_retry.len());
    let mut retry_waits = Vec::with_capacity(to_retry.len());
    for r in &to_retry {
        // Jittered (×0.5 to ×1.5): a backlog returned together must not come back together,
        // or its retries arrive in bursts that crowd out the events behind them.
        let jitter = 0.5 + (Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
        let wait = UNROUTABLE_FIRST
            .saturating_mul(2u32.saturating_pow(r.attempts.clamp(0, 16) as u32))
            .min(UNROUTABLE_MAX)
            .mul_f64(jitter);
        if r.attempts == 0 {
            tracing::warn!(event_id = %r.event_id, routing_key = %r.routing_key, "no queue is bound for this event; kept and retried");
        }
        retry_seqs.push(r.seq);
        retry_waits.push(wait.as_secs_f64());
    }
    if !to_retry.is_empty() {
        sqlx::query(
            "UPDATE outbox o SET claimed_until = NULL, attempts = o.attempts + 1,
                                 first_returned_at = COALESCE(o.first_returned_at, now()),
                                 next_attempt_at = now() + make_interval(secs => r.wait)
             FROM unnest($1::bigint[], $2::float8[]) AS r(seq, wait)
             WHERE o.seq = r.seq",
        )
        .bind(&retry_seqs)
        .bind(&retry_waits)
        .execute(pool)
        .await?;
    }
    if !to_retry.is_empty() {
        metrics::counter!("credits_outbox_unroutable_total").increment(to_retry.len() as u64);
    }
    Ok(rows.len())
}

/// Gives claimed rows back at once after a failed publish (their claim would expire anyway).
async fn release(pool: &PgPool, rows: &[Row]) {
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    if let Err(e) = sqlx::query("UPDATE outbox SET claimed_until = NULL WHERE seq = ANY($1)")
        .bind(&seqs)
        .execute(pool)
        .await
    {
        tracing::warn!(error = %e, "could not release claimed outbox rows; their claim expires");
    }
}

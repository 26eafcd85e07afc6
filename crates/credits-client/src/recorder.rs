//! [`UsageRecorder`]: many concurrent `record()` calls of a gateway multiplexed onto one
//! `StreamUsage` stream, each resolving when its item is durable — the same guarantee as
//! `RecordUsage` (the ledger answers an item after its group commit), at the cost of one
//! stream instead of one call per request.
//!
//! - Items go out in the order `record()` was called and the ledger answers in that order,
//!   so the oldest unanswered item owns the next answer; an item's own error (an unknown
//!   account, a key reused for another request) is that item's answer.
//! - When the stream ends or breaks — the ledger's stream limits, a restart, the network —
//!   the items sent and not answered are sent again, in order, on a new stream: their
//!   idempotency keys make the repeat safe (R12), and an item that was posted is answered
//!   as the first posting. Only a refusal of the stream as a whole (`UNAUTHENTICATED`,
//!   `PERMISSION_DENIED`, `INVALID_ARGUMENT`, `UNIMPLEMENTED`) fails the unanswered items
//!   with it instead.
//! - An item unanswered for `give_up_after` (the ledger down or silent that long) fails
//!   with `Unavailable`; sending it again with the same key is safe. A stream that answers
//!   nothing for that long is abandoned for a new one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::ClientError;
use crate::ledger::Ledger;
use crate::types::{UsageRecord, UsageRecorded};

/// How a [`UsageRecorder`] sends.
#[derive(Clone, Copy, Debug)]
pub struct RecorderConfig {
    /// Items sent and not yet answered, at most (the ledger answers up to 512 of one
    /// stream at once; more only queue there).
    pub window: usize,
    /// How long an item may go unanswered before it fails as `Unavailable`.
    pub give_up_after: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig {
            window: 512,
            give_up_after: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(20),
            reconnect_max: Duration::from_secs(1),
        }
    }
}

type Reply = oneshot::Sender<Result<UsageRecorded, ClientError>>;

struct Item {
    usage: UsageRecord,
    reply: Reply,
    since: Instant,
}

/// Usage from a gateway over one stream. Cheap to clone; clones share the stream; it
/// closes when the last clone is dropped and every item has its answer.
#[derive(Clone, Debug)]
pub struct UsageRecorder {
    tx: mpsc::Sender<Item>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Item").finish_non_exhaustive()
    }
}

impl UsageRecorder {
    /// Starts the recorder on `ledger` (a clone of [`crate::Client::ledger`]). Needs a
    /// Tokio runtime.
    pub fn start(ledger: Ledger, cfg: RecorderConfig) -> UsageRecorder {
        let (tx, rx) = mpsc::channel(cfg.window.max(1));
        tokio::spawn(run(ledger, cfg, rx));
        UsageRecorder { tx }
    }

    /// Records `usage`; resolves when it is durable (or with its error), as
    /// [`Ledger::record_usage`] would.
    pub async fn record(&self, usage: UsageRecord) -> Result<UsageRecorded, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Item {
                usage,
                reply,
                since: Instant::now(),
            })
            .await
            .map_err(|_| unavailable("the usage recorder stopped"))?;
        answer
            .await
            .map_err(|_| unavailable("the usage recorder stopped"))?
    }
}

/// A stream's end that sending the same items again cannot change.
fn refused_as_a_whole(e: &ClientError) -> bool {
    matches!(
        e.code(),
        tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::InvalidArgument
            | tonic::Code::Unimplemented
    )
}

fn unavailable(message: impl Into<String>) -> ClientError {
    ClientError::Unavailable {
        message: message.into(),
    }
}

async fn run(ledger: Ledger, cfg: RecorderConfig, mut rx: mpsc::Receiver<Item>) {
    let window = cfg.window.max(1);
    // Sent on the current stream (or to be sent again on the next), not yet answered, in
    // order.
    let mut unanswered: VecDeque<Item> = VecDeque::new();
    let mut backoff = cfg.reconnect_min;
    let mut open = true;
    loop {
        if unanswered.is_empty() {
            // Nothing in flight: wait for work before opening a stream.
            match rx.recv().await {
                Some(item) => unanswered.push_back(item),
                None => return,
            }
        }
        // Whatever queued meanwhile (an outage) goes on the new stream at once.
        while unanswered.len() < window {
            match rx.try_recv() {
                Ok(item) => unanswered.push_back(item),
                Err(_) => break,
            }
        }
        let (out, outbound) = mpsc::channel::<UsageRecord>(window);
        let stream = ledger
            .stream_usage_items(tokio_stream::wrappers::ReceiverStream::new(outbound))
            .await;
        let ended: ClientError = match stream {
            Err(e) => e,
            Ok(results) => {
                let mut results = std::pin::pin!(results);
                // What was unanswered on the last stream goes first, in order.
                for item in &unanswered {
                    let _ = out.send(item.usage.clone()).await;
                }
                loop {
                    if !open && unanswered.is_empty() {
                        return;
                    }
                    // The oldest item's patience bounds a stream that answers nothing (a
                    // half-open connection): past it, start again.
                    let patience = unanswered
                        .front()
                        .map(|i| i.since + cfg.give_up_after)
                        .unwrap_or_else(|| Instant::now() + cfg.give_up_after);
                    tokio::select! {
                        biased;
                        _ = tokio::time::sleep_until(patience.into()) => {
                            break unavailable("the ledger answered nothing in time");
                        }
                        r = results.next() => match r {
                            Some(Ok(answer)) => {
                                backoff = cfg.reconnect_min;
                                let Some(item) = unanswered.pop_front() else {
                                    break unavailable("the ledger answered an item never sent");
                                };
                                match answer {
                                    // A transient failure of this item alone (the
                                    // database for a moment): sent again, as a retried
                                    // RecordUsage would be.
                                    Err(e) if e.is_retryable() && item.since.elapsed() < cfg.give_up_after => {
                                        let usage = item.usage.clone();
                                        unanswered.push_back(item);
                                        let _ = out.send(usage).await;
                                    }
                                    answer => {
                                        let _ = item.reply.send(answer);
                                    }
                                }
                            }
                            Some(Err(e)) => break e,
                            None => break unavailable("the ledger ended the usage stream"),
                        },
                        next = rx.recv(), if open && unanswered.len() < window => match next {
                            Some(item) => {
                                let usage = item.usage.clone();
                                unanswered.push_back(item);
                                let _ = out.send(usage).await;
                            }
                            None => open = false,
                        },
                    }
                }
            }
        };
        if refused_as_a_whole(&ended) {
            // Refused as a whole (a token, a permission, a request the ledger cannot
            // read): every unanswered item fails with it. Anything else (a reset
            // connection, a proxy's error) is sent again: the keys make that safe.
            for item in unanswered.drain(..) {
                let _ = item.reply.send(Err(ended.clone()));
            }
        } else {
            // Items waiting longer than `give_up_after` fail; the rest go on a new stream.
            let (late, rest): (VecDeque<Item>, VecDeque<Item>) = unanswered
                .drain(..)
                .partition(|i| i.since.elapsed() >= cfg.give_up_after);
            unanswered = rest;
            for item in late {
                let _ = item.reply.send(Err(unavailable(format!(
                    "usage not answered within {} s ({ended}); sending it again with the same idempotency key is safe",
                    cfg.give_up_after.as_secs()
                ))));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(cfg.reconnect_max);
        }
        if !open && unanswered.is_empty() {
            return;
        }
    }
}

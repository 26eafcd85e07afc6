//! Group commit for postings (TigerBeetle-style batching).
//!
//! Concurrent `RecordUsage` calls are queued; a few workers each take everything queued
//! (up to a cap) and post it with one `ledger_post` batch statement: one round trip, one
//! transaction, one WAL flush for many debits. Under load a commit carries dozens of
//! debits, which is how the ledger beats one-transaction-per-debit; when idle a debit goes
//! alone with one channel hop of added latency. Results go back to each caller; per-item
//! outcomes (not found, idempotency conflict, replay) stay per item.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use crate::domain::{LedgerError, Posted, PostingRequest};
use crate::store::Store;

type Reply = oneshot::Sender<Result<Posted, LedgerError>>;

#[derive(Clone)]
pub struct Coalescer {
    tx: mpsc::Sender<(PostingRequest, Reply)>,
}

/// How postings are gathered into statements.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// Batch posters (`GROUP_COMMIT_WORKERS`).
    pub workers: usize,
    /// The most postings one statement carries (`GROUP_COMMIT_MAX`).
    pub max_batch: usize,
    /// Batches posted at once before the next one lingers (`GROUP_COMMIT_PARALLEL`).
    pub parallel: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            workers: 4,
            max_batch: 128,
            parallel: DEFAULT_PARALLEL,
        }
    }
}

impl Coalescer {
    /// Starts `workers` batch posters taking up to `max_batch` postings each.
    pub fn start(store: Store, batching: Batching) -> Coalescer {
        let (workers, max_batch) = (batching.workers.max(1), batching.max_batch.max(1));
        let parallel = batching.parallel.max(1);
        let (tx, rx) = mpsc::channel(max_batch * workers * 4);
        let rx = Arc::new(Mutex::new(rx));
        let flight = Arc::new(InFlight::default());
        for _ in 0..workers {
            tokio::spawn(worker(
                store.clone(),
                rx.clone(),
                max_batch,
                parallel,
                flight.clone(),
            ));
        }
        Coalescer { tx }
    }

    pub async fn post(&self, req: PostingRequest) -> Result<Posted, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((req, reply))
            .await
            .map_err(|_| LedgerError::Unavailable("ledger is shutting down".into()))?;
        answer
            .await
            .map_err(|_| LedgerError::Unavailable("ledger is shutting down".into()))?
    }
}

/// Batches being posted, and a signal when one ends.
#[derive(Default)]
struct InFlight {
    batches: AtomicUsize,
    ended: Notify,
}

/// A batch smaller than `max_batch / LINGER_BELOW` waits (at most `LINGER`) for more
/// postings while `parallel` batches are being posted — not when fewer are (an idle ledger
/// posts a lone debit at once).
const LINGER_BELOW: usize = 2;
const LINGER: Duration = Duration::from_millis(5);
/// Batches posted at once before another lingers (`GROUP_COMMIT_PARALLEL`). One: a batch's
/// fixed cost (~0.8 ms of PostgreSQL's CPU, most of a small batch's) is paid once for
/// everything that arrives while the one before is posted. With two, 64 unary callers made
/// batches of 16 on average; with one, of 30, for 6-10 % more usage per second on two cores
/// (docs/benchmarks.md). A database with many cores to spare may want more at once.
pub const DEFAULT_PARALLEL: usize = 1;

async fn worker(
    store: Store,
    rx: Arc<Mutex<mpsc::Receiver<(PostingRequest, Reply)>>>,
    max_batch: usize,
    parallel: usize,
    flight: Arc<InFlight>,
) {
    loop {
        let mut batch = Vec::with_capacity(max_batch);
        {
            // Wait for one posting, then take whatever else is already queued.
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(job) => batch.push(job),
                None => return,
            }
            drain(&mut rx, &mut batch, max_batch);
            // A statement's fixed cost (~0.8 ms of PostgreSQL's CPU, profiled) is most of a
            // small batch's: while other batches are being posted anyway, this one gathers
            // the postings that arrive until one of them ends, so the database spends its
            // time on debits, not on statements (docs/benchmarks.md).
            let deadline = tokio::time::Instant::now() + LINGER;
            while batch.len() < max_batch / LINGER_BELOW {
                // Made before the count is read: a batch ending in between still wakes it.
                let ended = flight.ended.notified();
                if flight.batches.load(Ordering::Acquire) < parallel {
                    break;
                }
                tokio::select! {
                    job = rx.recv() => match job {
                        Some(job) => {
                            batch.push(job);
                            drain(&mut rx, &mut batch, max_batch);
                        }
                        None => break,
                    },
                    _ = ended => break,
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        metrics::histogram!("credits_ledger_group_commit_size").record(batch.len() as f64);
        let (reqs, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        flight.batches.fetch_add(1, Ordering::AcqRel);
        let results = store.post_batch_isolated(&reqs).await;
        flight.batches.fetch_sub(1, Ordering::AcqRel);
        flight.ended.notify_waiters();
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

/// Takes what is already queued, up to `max_batch` in all.
fn drain(
    rx: &mut mpsc::Receiver<(PostingRequest, Reply)>,
    batch: &mut Vec<(PostingRequest, Reply)>,
    max_batch: usize,
) {
    while batch.len() < max_batch {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

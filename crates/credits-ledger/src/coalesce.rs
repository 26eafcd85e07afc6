//! Group commit for postings (TigerBeetle-style batching).
//!
//! Concurrent `RecordUsage` calls are queued; a few workers each take everything queued
//! (up to a cap) and post it with one `ledger_post` batch statement: one round trip, one
//! transaction, one WAL flush for many debits. Under load a commit carries dozens of
//! debits, which is how the ledger beats one-transaction-per-debit; when idle a debit goes
//! alone with one channel hop of added latency. Results go back to each caller; per-item
//! outcomes (not found, idempotency conflict, replay) stay per item.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::domain::{LedgerError, Posted, PostingRequest};
use crate::store::Store;

type Reply = oneshot::Sender<Result<Posted, LedgerError>>;

#[derive(Clone)]
pub struct Coalescer {
    tx: mpsc::Sender<(PostingRequest, Reply)>,
}

impl Coalescer {
    /// Starts `workers` batch posters taking up to `max_batch` postings each.
    pub fn start(store: Store, workers: usize, max_batch: usize) -> Coalescer {
        let (workers, max_batch) = (workers.max(1), max_batch.max(1));
        let (tx, rx) = mpsc::channel(max_batch * workers * 4);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers {
            tokio::spawn(worker(store.clone(), rx.clone(), max_batch));
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

async fn worker(
    store: Store,
    rx: Arc<Mutex<mpsc::Receiver<(PostingRequest, Reply)>>>,
    max_batch: usize,
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
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        metrics::histogram!("credits_ledger_group_commit_size").record(batch.len() as f64);
        let (reqs, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        for (reply, result) in replies
            .into_iter()
            .zip(store.post_batch_isolated(&reqs).await)
        {
            let _ = reply.send(result);
        }
    }
}

//! R31: the access feed on this replica — one poller reading what committed since its last
//! read (on any replica, `store::feed`), keeping `CheckAccess`'s view current and fanning
//! the changes out to every `WatchAccess` stream; and the streams themselves.
//!
//! A stream is: the watched accounts' states (or, resuming, the changes since the client's
//! cursor) read at one snapshot, then every change the poller reads, with a sync point
//! (a cursor) after the first part and then at least every `heartbeat` while the poller is
//! current. Handing over from the first part to the poller's changes loses nothing: the
//! stream subscribes before its snapshot is taken, so every change committed after the
//! snapshot arrives through the subscription; changes the subscription repeats from
//! before it carry lower versions, which clients drop (an account's version only rises).
//! A sync point's cursor names a snapshot up to which every change was sent: the snapshot
//! of the first part, or of the latest poll begun after the first part was read.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::access::AccessViews;
use crate::domain::{AccessChange, FeedCursor, LedgerError};
use crate::store::Store;

/// How the feed is run on this replica.
#[derive(Clone, Copy, Debug)]
pub struct FeedConfig {
    /// How often the poller reads the feed (`ACCESS_FEED_POLL_MS`).
    pub poll_every: Duration,
    /// How long the feed keeps changes for resuming streams (`ACCESS_FEED_RETENTION_SECS`).
    pub retention: Duration,
    /// Streams served at once by this replica (`WATCH_ACCESS_MAX_STREAMS`).
    pub max_streams: usize,
    /// The longest gap between a stream's sync points while the poller is current.
    pub heartbeat: Duration,
    /// R28: the longest one stream lives before the client resumes on a new one
    /// (`WATCH_ACCESS_MAX_SECS`).
    pub max_lifetime: Duration,
}

pub const DEFAULT_POLL_MS: u64 = 10;
pub const DEFAULT_RETENTION_SECS: u64 = 300;
pub const DEFAULT_MAX_STREAMS: usize = 256;
pub const DEFAULT_WATCH_MAX_SECS: u64 = 3600;

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            poll_every: Duration::from_millis(DEFAULT_POLL_MS),
            retention: Duration::from_secs(DEFAULT_RETENTION_SECS),
            max_streams: DEFAULT_MAX_STREAMS,
            heartbeat: Duration::from_secs(1),
            max_lifetime: Duration::from_secs(DEFAULT_WATCH_MAX_SECS),
        }
    }
}

/// What one poll read, shared by every stream.
#[derive(Debug)]
struct Batch {
    poll: u64,
    cursor: Arc<str>,
    changes: Vec<AccessChange>,
    /// The feed was pruned past the poller (it could not read for longer than the
    /// retention): streams must start again from a snapshot.
    reset: bool,
}

/// One item of a `WatchAccess` stream.
#[derive(Clone, Debug)]
pub enum WatchItem {
    Change(AccessChange),
    /// Every change up to this cursor was sent.
    Sync(String),
}

/// Why a stream ended (the client resumes with its last cursor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEnd {
    /// It fell too far behind the poller (a slow reader).
    Lagged,
    /// The feed restarted after the poller lost it for longer than the retention.
    Reset,
    /// R28: it reached its lifetime.
    Lifetime,
    /// The ledger is stopping.
    Stopping,
}

#[derive(Clone)]
pub struct Feed {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    feed_id: String,
    views: AccessViews,
    batches: broadcast::Sender<Arc<Batch>>,
    streams: Arc<Semaphore>,
    cfg: FeedConfig,
    /// Streams end (UNAVAILABLE, resume elsewhere) when the ledger stops.
    shutdown: CancellationToken,
}

/// Batches a stream may be behind before it is ended as lagging: at the default poll
/// interval, about ten seconds.
const LAG_BATCHES: usize = 1024;

impl Feed {
    /// Reads the feed's id and starts the poller (until `shutdown`).
    pub async fn start(
        store: Store,
        views: AccessViews,
        cfg: FeedConfig,
        shutdown: CancellationToken,
    ) -> Result<(Feed, tokio::task::JoinHandle<()>), LedgerError> {
        let feed_id = store.feed_id().await?;
        let start = store.feed_now().await?;
        let (batches, _) = broadcast::channel(LAG_BATCHES);
        let feed = Feed {
            inner: Arc::new(Inner {
                store,
                feed_id,
                views,
                batches,
                streams: Arc::new(Semaphore::new(cfg.max_streams)),
                cfg,
                shutdown: shutdown.clone(),
            }),
        };
        let poller = tokio::spawn(feed.clone().poll(start, shutdown));
        Ok((feed, poller))
    }

    fn cursor(&self, snapshot: &str) -> String {
        FeedCursor {
            feed_id: self.inner.feed_id.clone(),
            snapshot: snapshot.to_owned(),
        }
        .to_string()
    }

    async fn poll(self, mut prev: String, shutdown: CancellationToken) {
        let inner = &self.inner;
        let mut last_sent = Instant::now();
        let mut failing_since: Option<Instant> = None;
        // (when, xmin) of past snapshots, one a second: what the pruner may delete below.
        let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut pruned_at = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(inner.cfg.poll_every) => {}
            }
            let poll = inner.views.begin_poll();
            let read = match inner.store.feed_poll(&prev).await {
                Ok(p) => p,
                Err(e) => {
                    inner.views.distrust();
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(error = %e, "access feed: cannot read; CheckAccess reads the database and watchers get no sync points until it can");
                    }
                    continue;
                }
            };
            if let Some(t) = failing_since.take() {
                tracing::info!(
                    after_ms = t.elapsed().as_millis() as u64,
                    "access feed: reading again"
                );
            }
            prev = read.snapshot;
            let cursor: Arc<str> = self.cursor(&prev).into();
            if !read.resumable {
                tracing::warn!(
                    "access feed: pruned past this replica's last read; views emptied, watchers start again"
                );
                inner.views.drop_all();
                let _ = inner.batches.send(Arc::new(Batch {
                    poll,
                    cursor,
                    changes: Vec::new(),
                    reset: true,
                }));
                continue;
            }
            inner.views.apply(poll, &read.changes);
            inner.views.current();
            let now = chrono::Utc::now();
            for c in &read.changes {
                let lag = (now - c.at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                metrics::histogram!("credits_ledger_access_feed_lag_seconds").record(lag);
            }
            metrics::counter!("credits_ledger_access_feed_changes_total")
                .increment(read.changes.len() as u64);
            if !read.changes.is_empty() || last_sent.elapsed() >= inner.cfg.heartbeat {
                last_sent = Instant::now();
                let _ = inner.batches.send(Arc::new(Batch {
                    poll,
                    cursor,
                    changes: read.changes,
                    reset: false,
                }));
            }
            if let Some(xmin) = snapshot_xmin(&prev)
                && samples
                    .back()
                    .is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(1))
            {
                samples.push_back((Instant::now(), xmin));
            }
            if pruned_at.elapsed() >= Duration::from_secs(10) {
                pruned_at = Instant::now();
                let mut below = None;
                while samples
                    .front()
                    .is_some_and(|(t, _)| t.elapsed() >= inner.cfg.retention)
                {
                    below = samples.pop_front().map(|(_, x)| x);
                }
                if let Some(below) = below {
                    match inner.store.feed_prune(below).await {
                        Ok(n) if n > 0 => tracing::debug!(rows = n, "access feed pruned"),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "access feed: pruning failed; retrying")
                        }
                    }
                }
                metrics::gauge!("credits_ledger_access_view_accounts")
                    .set(inner.views.len() as f64);
            }
        }
    }

    /// Opens a stream of the accounts `accounts` (`None`: all), resuming after `since`
    /// when the feed still holds what followed it (else from a snapshot). Fails when this
    /// replica already serves `max_streams` streams.
    pub fn watch(
        &self,
        accounts: Option<HashSet<String>>,
        since: Option<FeedCursor>,
    ) -> Result<mpsc::Receiver<Result<WatchItem, WatchFailure>>, WatchFailure> {
        let permit = self
            .inner
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| WatchFailure::TooMany(self.inner.cfg.max_streams))?;
        // Subscribed before the first part is read: nothing committed after its snapshot is
        // missed.
        let mut batches = self.inner.batches.subscribe();
        let (out, rx) = mpsc::channel(1024);
        let feed = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let inner = &feed.inner;
            let deadline = tokio::time::Instant::now() + inner.cfg.max_lifetime;
            let ids: Option<Vec<String>> = accounts.as_ref().map(|s| s.iter().cloned().collect());
            let started = {
                let out = out.clone();
                inner
                    .store
                    .watch_start(&inner.feed_id, ids.as_deref(), since.as_ref(), |c| {
                        let out = out.clone();
                        async move { out.send(Ok(WatchItem::Change(c))).await.is_ok() }
                    })
                    .await
            };
            let started = match started {
                Ok(s) => s,
                Err(e) => {
                    let _ = out.send(Err(WatchFailure::Ledger(e))).await;
                    return;
                }
            };
            metrics::counter!("credits_ledger_watch_streams_total",
                "start" => if started.resumed { "resumed" } else { "snapshot" })
            .increment(1);
            // Polls begun from here on read at a snapshot newer than the first part's.
            let after = inner.views.polls_begun();
            let mut cursor: Arc<str> = feed.cursor(&started.snapshot).into();
            if out
                .send(Ok(WatchItem::Sync(cursor.to_string())))
                .await
                .is_err()
            {
                return;
            }
            let mut synced = Instant::now();
            let end = loop {
                let batch = tokio::select! {
                    _ = out.closed() => return,
                    _ = inner.shutdown.cancelled() => break WatchEnd::Stopping,
                    _ = tokio::time::sleep_until(deadline) => break WatchEnd::Lifetime,
                    b = batches.recv() => b,
                };
                let batch = match batch {
                    Ok(b) => b,
                    Err(broadcast::error::RecvError::Lagged(_)) => break WatchEnd::Lagged,
                    Err(broadcast::error::RecvError::Closed) => break WatchEnd::Stopping,
                };
                if batch.reset {
                    break WatchEnd::Reset;
                }
                let mut sent = false;
                for c in &batch.changes {
                    if accounts.as_ref().is_none_or(|a| a.contains(&c.account_id)) {
                        sent = true;
                        if out.send(Ok(WatchItem::Change(c.clone()))).await.is_err() {
                            return;
                        }
                    }
                }
                if batch.poll > after {
                    cursor = batch.cursor.clone();
                }
                if sent || synced.elapsed() >= inner.cfg.heartbeat / 2 {
                    synced = Instant::now();
                    if out
                        .send(Ok(WatchItem::Sync(cursor.to_string())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            };
            metrics::counter!("credits_ledger_watch_ends_total", "why" => end.as_str())
                .increment(1);
            let _ = out.send(Err(WatchFailure::Ended(end))).await;
        });
        Ok(rx)
    }

    pub fn config(&self) -> &FeedConfig {
        &self.inner.cfg
    }
}

/// Why a stream could not start or went on no longer.
#[derive(Debug)]
pub enum WatchFailure {
    TooMany(usize),
    Ledger(LedgerError),
    Ended(WatchEnd),
}

impl WatchEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchEnd::Lagged => "lagged",
            WatchEnd::Reset => "reset",
            WatchEnd::Lifetime => "lifetime",
            WatchEnd::Stopping => "stopping",
        }
    }
}

/// The xmin of a snapshot in its text form (`xmin:xmax:xip`).
fn snapshot_xmin(snapshot: &str) -> Option<u64> {
    snapshot.split(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_snapshots_xmin_is_its_first_number() {
        assert_eq!(super::snapshot_xmin("734:740:735,736"), Some(734));
        assert_eq!(super::snapshot_xmin("nonsense"), None);
    }
}

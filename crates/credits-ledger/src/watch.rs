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
            // Sync points at least every second: the poller's beat, at most one poll late.
            heartbeat: Duration::from_millis(500),
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
    /// The feed's id, in every cursor; a new one after a failover.
    feed_id: std::sync::RwLock<String>,
    views: AccessViews,
    batches: broadcast::Sender<Arc<Batch>>,
    streams: Arc<Semaphore>,
    /// First parts read at once: each holds a database connection and a snapshot while
    /// its client takes it.
    first_parts: Arc<Semaphore>,
    /// A prune is running on this replica.
    pruning: Arc<std::sync::atomic::AtomicBool>,
    cfg: FeedConfig,
    /// Streams end (UNAVAILABLE, resume elsewhere) when the ledger stops.
    shutdown: CancellationToken,
}

/// Batches a stream may be behind before it is ended as lagging: at the default poll
/// interval, about ten seconds.
const LAG_BATCHES: usize = 1024;
/// First parts read at once on one replica (the others wait their turn).
const FIRST_PARTS: usize = 4;
/// The longest a first part may take (its client reading it); then the stream ends to be
/// resumed.
const FIRST_PART_DEADLINE: Duration = Duration::from_secs(120);
/// The longest one update may wait for a client that does not read; then the stream ends
/// as lagging.
const SEND_DEADLINE: Duration = Duration::from_secs(10);
/// The least time between two sync points of a busy stream.
const SYNC_EVERY: Duration = Duration::from_millis(100);

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
                feed_id: std::sync::RwLock::new(feed_id),
                views,
                batches,
                streams: Arc::new(Semaphore::new(cfg.max_streams)),
                first_parts: Arc::new(Semaphore::new(FIRST_PARTS)),
                pruning: Arc::default(),
                cfg,
                shutdown: shutdown.clone(),
            }),
        };
        let poller = tokio::spawn(feed.clone().poll(start, shutdown));
        Ok((feed, poller))
    }

    fn feed_id(&self) -> String {
        self.inner
            .feed_id
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn cursor(&self, snapshot: &str) -> String {
        FeedCursor {
            feed_id: self.feed_id(),
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
            let read = match inner.store.feed_poll(&prev, &self.feed_id()).await {
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
            if !read.resumable {
                // Pruned past this replica's last read, or the feed moved on after a
                // failover (made new here, or by another replica).
                let id = if read.moved {
                    inner.store.feed_new_timeline().await
                } else {
                    inner.store.feed_id().await
                };
                let Ok(id) = id else {
                    inner.views.distrust();
                    continue;
                };
                let renewed = id != self.feed_id();
                *inner.feed_id.write().unwrap_or_else(|e| e.into_inner()) = id;
                if renewed {
                    tracing::warn!(
                        "access feed: a new feed after a failover (the server is on a new timeline); views emptied, watchers start again"
                    );
                } else {
                    tracing::warn!(
                        "access feed: pruned past this replica's last read; views emptied, watchers start again"
                    );
                }
                inner.views.drop_all();
                let _ = inner.batches.send(Arc::new(Batch {
                    poll,
                    cursor: self.cursor(&prev).into(),
                    changes: Vec::new(),
                    reset: true,
                }));
                continue;
            }
            let cursor: Arc<str> = self.cursor(&prev).into();
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
            if let xmin @ 1.. = Visible::parse(&prev).xmin
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
                // Beside the poller, never in its way; one at a time.
                if let Some(below) = below
                    && !inner
                        .pruning
                        .swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    let (store, pruning) = (inner.store.clone(), inner.pruning.clone());
                    tokio::spawn(async move {
                        match store.feed_prune(below).await {
                            Ok(n) if n > 0 => tracing::debug!(rows = n, "access feed pruned"),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "access feed: pruning failed; retrying")
                            }
                        }
                        pruning.store(false, std::sync::atomic::Ordering::Release);
                    });
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
            let first = async {
                let _turn = inner.first_parts.acquire().await;
                let out = out.clone();
                inner
                    .store
                    .watch_start(ids.as_deref(), since.as_ref(), |c| {
                        let out = out.clone();
                        async move { out.send(Ok(WatchItem::Change(c))).await.is_ok() }
                    })
                    .await
            };
            let started = tokio::select! {
                _ = inner.shutdown.cancelled() => Err(WatchFailure::Ended(WatchEnd::Stopping)),
                r = tokio::time::timeout(FIRST_PART_DEADLINE, first) => match r {
                    Ok(Ok(s)) => Ok(s),
                    Ok(Err(e)) => Err(WatchFailure::Ledger(e)),
                    Err(_) => Err(WatchFailure::Ended(WatchEnd::Lagged)),
                },
            };
            let started = match started {
                Ok(s) => s,
                Err(e) => {
                    let _ = tokio::time::timeout(SEND_DEADLINE, out.send(Err(e))).await;
                    return;
                }
            };
            // What the first part already holds: changes of transactions visible in its
            // snapshot (polls that read before it, fanned out after the subscription) are
            // not sent again.
            let seen = Visible::parse(&started.snapshot);
            metrics::counter!("credits_ledger_watch_streams_total",
                "start" => if started.resumed { "resumed" } else { "snapshot" })
            .increment(1);
            // Polls begun from here on read at a snapshot newer than the first part's.
            let after = inner.views.polls_begun();
            let mut cursor: Arc<str> = FeedCursor {
                feed_id: started.feed_id.clone(),
                snapshot: started.snapshot.clone(),
            }
            .to_string()
            .into();
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
                let mut stuck = false;
                for c in &batch.changes {
                    if accounts.as_ref().is_none_or(|a| a.contains(&c.account_id))
                        && !seen.includes(c.xid)
                    {
                        sent = true;
                        let send = out.send(Ok(WatchItem::Change(c.clone())));
                        match tokio::time::timeout(SEND_DEADLINE, send).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return,
                            Err(_) => {
                                stuck = true;
                                break;
                            }
                        }
                    }
                }
                if stuck {
                    break WatchEnd::Lagged;
                }
                if batch.poll > after {
                    cursor = batch.cursor.clone();
                }
                if (sent && synced.elapsed() >= SYNC_EVERY)
                    || synced.elapsed() >= inner.cfg.heartbeat / 2
                {
                    synced = Instant::now();
                    let send = out.send(Ok(WatchItem::Sync(cursor.to_string())));
                    match tokio::time::timeout(SEND_DEADLINE, send).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => break WatchEnd::Lagged,
                    }
                }
            };
            metrics::counter!("credits_ledger_watch_ends_total", "why" => end.as_str())
                .increment(1);
            let end = out.send(Err(WatchFailure::Ended(end)));
            let _ = tokio::time::timeout(SEND_DEADLINE, end).await;
        });
        Ok(rx)
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

/// Which transactions a snapshot (text form `xmin:xmax:xip,…`) saw committed.
struct Visible {
    xmin: u64,
    xmax: u64,
    running: HashSet<u64>,
}

impl Visible {
    fn parse(snapshot: &str) -> Visible {
        let mut parts = snapshot.split(':');
        let mut num = || parts.next().and_then(|p| p.parse::<u64>().ok());
        let (xmin, xmax) = (num().unwrap_or(0), num().unwrap_or(0));
        let running = snapshot
            .rsplit(':')
            .next()
            .unwrap_or("")
            .split(',')
            .filter_map(|x| x.parse().ok())
            .collect();
        Visible {
            xmin,
            xmax,
            running,
        }
    }

    /// Whether transaction `xid` (0: not from the feed) was visible in the snapshot.
    fn includes(&self, xid: u64) -> bool {
        xid != 0 && (xid < self.xmin || (xid < self.xmax && !self.running.contains(&xid)))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_change_visible_in_the_first_parts_snapshot_is_not_sent_again() {
        let v = super::Visible::parse("100:110:103,107");
        assert!(v.includes(99));
        assert!(v.includes(104));
        assert!(!v.includes(103), "running then");
        assert!(!v.includes(107));
        assert!(!v.includes(110), "began after");
        assert!(!v.includes(0), "not from the feed");
        let none = super::Visible::parse("100:100:");
        assert!(none.includes(99) && !none.includes(100));
    }

    #[test]
    fn a_snapshots_xmin_is_its_first_number() {
        assert_eq!(super::Visible::parse("734:740:735,736").xmin, 734);
        assert_eq!(super::Visible::parse("nonsense").xmin, 0);
    }
}

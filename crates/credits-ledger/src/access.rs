//! `CheckAccess` from memory (the gateway's hot path): an in-process view of each account's
//! access and available balance, filled from the database on a miss and dropped whenever
//! the account changes — by this replica or by any other on the same database.
//!
//! How it stays correct with several ledger replicas:
//! - every change of access, every threshold crossing and every hold (all of them go
//!   through `ledger_move`) calls `pg_notify('credits_access', account_id)` in its
//!   transaction: PostgreSQL delivers it on commit, once per account per transaction, to
//!   every replica listening. A plain debit or credit that changes neither access nor a
//!   threshold does not notify: a notifying transaction holds a database-wide lock through
//!   its commit, which would serialise the group commit (measured: usage-spread −40 %);
//! - each replica listens and drops those accounts; this replica also drops an account as
//!   soon as its own write returns, before it answers;
//! - a read that raced a change must not re-install the old state: a global epoch is bumped
//!   by every drop, and a value read from the database is kept only if no drop happened
//!   while it was read;
//! - if the listening connection is lost, notifications may have been missed: the whole
//!   view is dropped, and until the listener is back every `CheckAccess` reads the database.
//!
//! Staleness bound, on a replica other than the writer: access (`allowed`), holds and the
//! available balance after a hold are seen once the notification arrives (LISTEN/NOTIFY's
//! commit-to-delivery latency, milliseconds); the balance after a plain debit or credit
//! within `MAX_AGE` (1 s). On the writing replica, exact. Both measured by
//! `check_access_on_one_replica_sees_another_replicas_change_r16`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::domain::{AccessView, AccountId, LedgerError};
use crate::store::Store;

/// The notification channel every account change is announced on.
pub const CHANNEL: &str = "credits_access";
/// The longest an entry is trusted: the bound on how stale another replica's plain
/// debits and credits (which do not notify) can leave the balance here.
pub const MAX_AGE: Duration = Duration::from_secs(1);

#[derive(Clone, Default)]
pub struct AccessViews {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    map: RwLock<HashMap<String, (AccessView, Instant)>>,
    epoch: AtomicU64,
    /// False until the listener is connected, and again whenever it is lost.
    listening: AtomicBool,
}

impl AccessViews {
    /// The account's view: from memory when fresh, else from the database (and kept if
    /// nothing changed meanwhile).
    pub async fn get(&self, store: &Store, id: &AccountId) -> Result<AccessView, LedgerError> {
        if self.inner.listening.load(Ordering::Acquire)
            && let Ok(map) = self.inner.map.read()
            && let Some((view, at)) = map.get(id.as_str())
            && at.elapsed() < MAX_AGE
        {
            metrics::counter!("credits_ledger_access_view_total", "result" => "hit").increment(1);
            return Ok(*view);
        }
        metrics::counter!("credits_ledger_access_view_total", "result" => "miss").increment(1);
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        let view = store.access(id).await?;
        if self.inner.listening.load(Ordering::Acquire)
            && let Ok(mut map) = self.inner.map.write()
            && self.inner.epoch.load(Ordering::Acquire) == epoch
        {
            map.insert(id.as_str().to_owned(), (view, Instant::now()));
        }
        Ok(view)
    }

    /// The account changed: forget it.
    pub fn drop_account(&self, id: &str) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut map) = self.inner.map.write() {
            map.remove(id);
        }
    }

    fn drop_all(&self) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut map) = self.inner.map.write() {
            map.clear();
        }
    }

    /// Listens for account changes until `shutdown`; reconnects (dropping everything) when
    /// the connection is lost.
    pub async fn listen(self, pool: PgPool, shutdown: CancellationToken) {
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen(CHANNEL).await {
                    Ok(()) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "access view: cannot listen; reading the database");
                        if wait(&shutdown).await {
                            return;
                        }
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "access view: cannot connect the listener; reading the database");
                    if wait(&shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            // Whatever changed while nobody listened is unknown: start empty.
            self.drop_all();
            self.inner.listening.store(true, Ordering::Release);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) => self.drop_account(n.payload()),
                        // The connection was lost (and may have missed notifications).
                        Ok(None) | Err(_) => {
                            self.inner.listening.store(false, Ordering::Release);
                            self.drop_all();
                            tracing::warn!("access view: listener lost; reading the database until it is back");
                            break;
                        }
                    },
                }
            }
        }
    }
}

/// Waits a moment before trying again; true when shutting down.
async fn wait(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(Duration::from_millis(500)) => false,
    }
}

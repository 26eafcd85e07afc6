//! `CheckAccess` from memory (the gateway's hot path): an in-process view of each account's
//! access and available balance, filled from the database on a miss and then kept current
//! by the access feed (`watch::Feed`, R31) — by this replica's writes and every other's —
//! instead of expiring.
//!
//! How it stays correct with several ledger replicas:
//! - every committed change of an account's balance, held amount or access is in the feed
//!   with the account's new `version`; this replica's poller reads what committed since its
//!   previous read (every `ACCESS_FEED_POLL_MS`) and replaces each entry held here by a
//!   newer version — never by an older one, so a late poll or a slow read cannot roll an
//!   entry back;
//! - an account enters the view only by a database read (a `CheckAccess` miss), kept only
//!   if no poll was applied while it was read (that poll may have carried a newer change
//!   of this account, which an absent entry could not take); so an account this replica
//!   was never asked about is read from the database, exactly;
//! - this replica also drops an account as soon as its own write returns, before it
//!   answers: the caller reads its own write. The drop leaves a mark naming the polls begun
//!   by then: their changes may be older than the write and do not re-install the account;
//!   a later poll's (which began after the write committed) or a database read does;
//! - a database read that raced a drop does not re-install the old state: a global epoch
//!   is bumped by every drop, and a value read is kept only if no drop happened meanwhile;
//! - entries are trusted only while the poller is current (a successful poll within
//!   `TRUST`): while it cannot read the feed, every `CheckAccess` reads the database. When
//!   it is back, its first poll brings everything committed since its last one (the feed is
//!   a table, not a notification that can be missed); if the feed was pruned past it, the
//!   view is emptied.
//!
//! Staleness bound, on a replica other than the writer: the poll interval plus the poll
//! (milliseconds; measured by `check_access_on_one_replica_sees_another_replicas_change_r16`
//! and the bench's staleness figures). On the writing replica, exact.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::domain::{AccessChange, AccessView, AccountId, LedgerError};
use crate::store::Store;

/// How long after the poller's last successful read the entries are trusted.
pub const TRUST: Duration = Duration::from_millis(500);
/// The default most accounts one replica's view holds (`ACCESS_VIEW_MAX_ACCOUNTS`); past
/// it, misses are answered from the database without being kept.
pub const DEFAULT_MAX_ACCOUNTS: usize = 200_000;

#[derive(Clone)]
pub struct AccessViews {
    inner: Arc<Inner>,
}

#[derive(Clone, Copy)]
enum Slot {
    View(AccessView),
    /// Written here while this many polls had begun; only a later poll or a database read
    /// fills it again.
    Dropped(u64),
}

struct Inner {
    map: RwLock<HashMap<String, Slot>>,
    epoch: AtomicU64,
    /// Polls applied (a database read that raced one is not kept).
    applied: AtomicU64,
    /// Polls of the feed begun (the poller's count; `begin_poll`).
    polls: AtomicU64,
    /// Milliseconds after `base` until which entries are trusted (0: not yet).
    trusted_until: AtomicU64,
    base: Instant,
    max_accounts: usize,
}

impl Default for AccessViews {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_MAX_ACCOUNTS)
    }
}

impl AccessViews {
    pub fn with_capacity(max_accounts: usize) -> Self {
        AccessViews {
            inner: Arc::new(Inner {
                map: RwLock::new(HashMap::new()),
                epoch: AtomicU64::new(0),
                applied: AtomicU64::new(0),
                polls: AtomicU64::new(0),
                trusted_until: AtomicU64::new(0),
                base: Instant::now(),
                max_accounts,
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        self.inner.base.elapsed().as_millis() as u64
    }

    fn trusted(&self) -> bool {
        self.now_ms() < self.inner.trusted_until.load(Ordering::Acquire)
    }

    /// The poller is about to read the feed: its number (from 1).
    pub fn begin_poll(&self) -> u64 {
        self.inner.polls.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Polls begun so far.
    pub fn polls_begun(&self) -> u64 {
        self.inner.polls.load(Ordering::Acquire)
    }

    /// The poller read the feed: entries are current for another `TRUST`.
    pub fn current(&self) {
        let until = self.now_ms() + TRUST.as_millis() as u64;
        self.inner.trusted_until.store(until, Ordering::Release);
    }

    /// The poller cannot read the feed: from now on every `CheckAccess` reads the
    /// database until it can.
    pub fn distrust(&self) {
        self.inner.trusted_until.store(0, Ordering::Release);
    }

    /// The account's view: from memory while the feed keeps it current, else from the
    /// database (and kept if nothing changed meanwhile).
    pub async fn get(&self, store: &Store, id: &AccountId) -> Result<AccessView, LedgerError> {
        if self.trusted()
            && let Ok(map) = self.inner.map.read()
            && let Some(Slot::View(view)) = map.get(id.as_str())
        {
            metrics::counter!("credits_ledger_access_view_total", "result" => "hit").increment(1);
            return Ok(*view);
        }
        metrics::counter!("credits_ledger_access_view_total", "result" => "miss").increment(1);
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        let applied = self.inner.applied.load(Ordering::Acquire);
        let view = store.access(id).await?;
        if let Ok(mut map) = self.inner.map.write()
            && self.inner.epoch.load(Ordering::Acquire) == epoch
            && self.inner.applied.load(Ordering::Acquire) == applied
        {
            let full = map.len() >= self.inner.max_accounts;
            match map.get_mut(id.as_str()) {
                Some(Slot::View(held)) if held.version >= view.version => {}
                Some(slot) => *slot = Slot::View(view),
                None if !full => {
                    map.insert(id.as_str().to_owned(), Slot::View(view));
                }
                None => {}
            }
        }
        Ok(view)
    }

    /// Changes read by poll number `poll`: every account held moves to its newer version.
    pub fn apply(&self, poll: u64, changes: &[AccessChange]) {
        if changes.is_empty() {
            return;
        }
        if let Ok(mut map) = self.inner.map.write() {
            self.inner.applied.fetch_add(1, Ordering::AcqRel);
            for c in changes {
                match map.get_mut(c.account_id.as_str()) {
                    Some(Slot::View(held)) if held.version < c.view.version => {
                        *held = c.view;
                    }
                    Some(Slot::View(_)) => {}
                    Some(slot) => {
                        if let Slot::Dropped(at) = *slot
                            && poll > at
                        {
                            *slot = Slot::View(c.view);
                        }
                    }
                    None => {}
                }
            }
        }
    }

    /// The account changed here: forget it until a poll begun after now, or a database
    /// read, brings it back.
    pub fn drop_account(&self, id: &str) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        let mark = Slot::Dropped(self.polls_begun());
        if let Ok(mut map) = self.inner.map.write() {
            if let Some(slot) = map.get_mut(id) {
                *slot = mark;
            } else if map.len() < self.inner.max_accounts {
                map.insert(id.to_owned(), mark);
            }
        }
    }

    /// What the feed said since is unknown (it was pruned past the poller): start empty.
    pub fn drop_all(&self) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut map) = self.inner.map.write() {
            map.clear();
        }
    }

    /// Accounts held (for the gauge).
    pub fn len(&self) -> usize {
        self.inner.map.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::{Access, BillingMode};
    use credits_common::Money;

    fn change(id: &str, version: i64, balance: i64) -> AccessChange {
        AccessChange {
            account_id: id.into(),
            view: AccessView {
                access: Access::ACTIVE,
                billing_mode: BillingMode::PREPAID,
                balance: Money::new(balance.into()),
                held: Money::ZERO,
                version,
            },
            at: chrono::Utc::now(),
            xid: 0,
        }
    }

    fn held(v: &AccessViews, id: &str) -> Option<(i64, bool)> {
        v.inner.map.read().unwrap().get(id).map(|s| match s {
            Slot::View(x) => (x.version, true),
            Slot::Dropped(p) => (*p as i64, false),
        })
    }

    /// What a database read installs.
    fn read(v: &AccessViews, c: &AccessChange) {
        v.inner
            .map
            .write()
            .unwrap()
            .insert(c.account_id.clone(), Slot::View(c.view));
    }

    #[test]
    fn a_change_never_rolls_an_entry_back_and_a_drop_refuses_polls_begun_before_it() {
        let v = AccessViews::with_capacity(10);
        let p1 = v.begin_poll();
        // Accounts never read here are not taken from the feed.
        v.apply(p1, &[change("a", 5, 10)]);
        assert_eq!(held(&v, "a"), None);
        read(&v, &change("a", 4, 11));
        v.apply(p1, &[change("a", 5, 10)]);
        assert_eq!(held(&v, "a"), Some((5, true)));
        // An older version (a late poll) is ignored.
        v.apply(p1, &[change("a", 4, 11)]);
        assert_eq!(held(&v, "a"), Some((5, true)));
        v.apply(p1, &[change("a", 6, 9)]);
        assert_eq!(held(&v, "a"), Some((6, true)));
        // Written here while poll 2 was running: poll 2's changes may predate the write.
        let p2 = v.begin_poll();
        v.drop_account("a");
        v.apply(p2, &[change("a", 7, 8)]);
        assert_eq!(held(&v, "a"), Some((p2 as i64, false)));
        let p3 = v.begin_poll();
        v.apply(p3, &[change("a", 8, 7)]);
        assert_eq!(held(&v, "a"), Some((8, true)));
    }

    #[test]
    fn a_drop_leaves_no_mark_past_the_capacity() {
        let v = AccessViews::with_capacity(2);
        read(&v, &change("a", 1, 1));
        read(&v, &change("b", 1, 1));
        v.drop_account("c");
        assert_eq!(v.len(), 2);
        assert_eq!(held(&v, "c"), None);
    }
}

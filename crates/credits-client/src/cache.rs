//! [`AccessCache`] (R31): the gateway's answer to "may this request run" from memory, kept
//! current by one `WatchAccess` stream per process.
//!
//! - [`AccessCache::start`] opens the stream in the background; the first part fills the
//!   cache, then every change moves it. An account's update replaces what the cache holds
//!   only when its `seq` is higher, so a repeat after a resume never rolls it back.
//! - The cache is *current* while sync points keep arriving (the ledger sends one at least
//!   every second while it reads its feed): [`AccessCacheConfig::max_silence`] without one
//!   — the stream broke and could not be resumed by then, or the ledger cannot read its
//!   feed — and the cache counts as disconnected. (A stream the ledger ends to be resumed
//!   — its lifetime, a restart — is back within milliseconds and never reaches that.)
//! - Disconnected — before the first sync point, or silent for longer — the
//!   cache answers by [`DisconnectedPolicy`]: deny everything, or let each account that
//!   had access when last seen run work worth up to a grace amount until the stream is
//!   current again.
//! - A broken stream is reopened with backoff, resuming after the last sync point's cursor
//!   (the ledger sends only what changed since, or a fresh snapshot when it no longer
//!   holds that). A cursor of another ledger database (the feed was replaced) empties the
//!   cache and starts again from a snapshot.
//!
//! [`AccessCache::allowed`] is a hash lookup under a read lock of one of 64 shards: no
//! allocation, no await, no network, no clock read (a watchdog task turns the cache
//! disconnected when sync points stop). Accounts are held by a 128-bit hash of their id
//! (two independently seeded foldhash hashes, seeds random per process), not by the id itself: a
//! lookup touches no string on the heap, and an entry is 64 bytes. Two ids colliding on
//! all 128 bits is a chance of about 10⁻²⁷ with a million accounts; the seeds are secret
//! to the process, so no id can be chosen to collide.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use credits_common::Money;
use credits_common::ids::AccountId;
use foldhash::quality::RandomState;
use futures_util::StreamExt;

use crate::ledger::Ledger;
use crate::types::{Access, AccessUpdate, BillingMode, WatchEvent};

/// An account as the cache keys it: a 128-bit hash of its id.
type Key = u128;
/// The map's hasher: the key already is a random hash; its low 64 bits are used as is.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, k: u128) {
        self.0 = k as u64;
    }
}

type Map<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;
const SHARDS: usize = 64;

/// What the cache answers while it is not current.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectedPolicy {
    /// Nothing is allowed.
    Deny,
    /// An account that had access when last seen may run work worth up to this much in
    /// total (the sum of the costs asked) until the stream is current again; accounts
    /// never seen, or last seen without access, are denied. The amount is the most the
    /// platform risks per account during an outage of the ledger.
    Grace(Money),
}

/// Called with every update the cache applies, and when it was received (for metrics:
/// `received - changed_at` is how stale the cache was).
pub type OnUpdate = Arc<dyn Fn(&AccessUpdate, chrono::DateTime<chrono::Utc>) + Send + Sync>;
/// Called when the cache empties itself to start again from a snapshot (the ledger's feed
/// changed: another database, or a new feed after a failover). The updates of that
/// snapshot skip the changes made meanwhile: each account's `seq` may jump.
pub type OnReset = Arc<dyn Fn() + Send + Sync>;

/// How an [`AccessCache`] watches.
#[derive(Clone)]
pub struct AccessCacheConfig {
    /// The accounts to watch; empty: every account (new ones included).
    pub accounts: Vec<AccountId>,
    pub disconnected: DisconnectedPolicy,
    /// The longest time without a sync point before the cache counts as disconnected.
    pub max_silence: Duration,
    /// Backoff between reconnection attempts: from `min`, doubling, up to `max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub on_update: Option<OnUpdate>,
    pub on_reset: Option<OnReset>,
}

impl Default for AccessCacheConfig {
    fn default() -> Self {
        AccessCacheConfig {
            accounts: Vec::new(),
            disconnected: DisconnectedPolicy::Deny,
            max_silence: Duration::from_secs(3),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            on_update: None,
            on_reset: None,
        }
    }
}

impl std::fmt::Debug for AccessCacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessCacheConfig")
            .field("accounts", &self.accounts.len())
            .field("disconnected", &self.disconnected)
            .field("max_silence", &self.max_silence)
            .finish_non_exhaustive()
    }
}

/// One account as the cache holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedAccess {
    pub access: Access,
    pub billing_mode: BillingMode,
    pub balance: Money,
    pub available_balance: Money,
    pub seq: u64,
}

impl CachedAccess {
    fn allows(&self, cost: Money) -> bool {
        self.access == Access::Active
            && (self.billing_mode == BillingMode::Contract || self.available_balance >= cost)
    }
}

/// What [`AccessCache::status`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheStatus {
    /// A sync point arrived within `max_silence`.
    pub current: bool,
    /// Accounts held.
    pub accounts: usize,
    /// Streams opened after the first.
    pub reconnects: u64,
    /// The last reason a stream could not be opened or ended.
    pub last_error: Option<String>,
}

/// The in-process access cache. Cheap to clone; clones share the cache; the stream stops
/// when the last clone is dropped.
#[derive(Clone)]
pub struct AccessCache {
    shared: Arc<Shared>,
    _task: Arc<AbortOnDrop>,
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

struct Shared {
    shards: Vec<RwLock<Map<CachedAccess>>>,
    /// The two halves of a key.
    seeds: (RandomState, RandomState),
    /// Milliseconds after `base` of the last sync point (0: none yet).
    synced_at: AtomicU64,
    /// A sync point within `max_silence` (kept by `mark_synced` and the watchdog).
    fresh: AtomicBool,
    base: Instant,
    max_silence: Duration,
    policy: DisconnectedPolicy,
    /// What each account was allowed while disconnected (Grace only).
    spent: Mutex<Map<Money>>,
    reconnects: AtomicU64,
    last_error: Mutex<Option<String>>,
    synced: tokio::sync::Notify,
}

impl Shared {
    fn new(max_silence: Duration, policy: DisconnectedPolicy) -> Shared {
        Shared {
            shards: (0..SHARDS).map(|_| RwLock::new(Map::default())).collect(),
            seeds: (RandomState::default(), RandomState::default()),
            synced_at: AtomicU64::new(0),
            fresh: AtomicBool::new(false),
            base: Instant::now(),
            max_silence,
            policy,
            spent: Mutex::new(Map::default()),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(None),
            synced: tokio::sync::Notify::new(),
        }
    }

    fn key(&self, account: &str) -> Key {
        (u128::from(self.seeds.0.hash_one(account)) << 64)
            | u128::from(self.seeds.1.hash_one(account))
    }

    fn shard(&self, key: Key) -> &RwLock<Map<CachedAccess>> {
        &self.shards[((key >> 64) as usize) % SHARDS]
    }

    fn lookup(&self, account: &str) -> (Key, Option<CachedAccess>) {
        let key = self.key(account);
        let held = self
            .shard(key)
            .read()
            .ok()
            .and_then(|m| m.get(&key).copied());
        (key, held)
    }

    fn current(&self) -> bool {
        self.fresh.load(Ordering::Acquire)
    }

    /// The watchdog's look: silent for longer than `max_silence`, the cache is no longer
    /// current.
    fn check_silence(&self) {
        let at = self.synced_at.load(Ordering::Acquire);
        if at == 0
            || (self.base.elapsed().as_millis() as u64).saturating_sub(at)
                > self.max_silence.as_millis() as u64
        {
            self.fresh.store(false, Ordering::Release);
        }
    }

    fn apply(&self, u: &AccessUpdate) -> bool {
        let key = self.key(u.account_id.as_str());
        let Ok(mut shard) = self.shard(key).write() else {
            return false;
        };
        let new = CachedAccess {
            access: u.access,
            billing_mode: u.billing_mode,
            balance: u.balance,
            available_balance: u.available_balance,
            seq: u.seq,
        };
        match shard.get_mut(&key) {
            Some(held) if held.seq >= u.seq => false,
            Some(held) => {
                *held = new;
                true
            }
            None => {
                shard.insert(key, new);
                true
            }
        }
    }

    fn clear(&self) {
        // Not current until the new first part is in.
        self.fresh.store(false, Ordering::Release);
        self.synced_at.store(0, Ordering::Release);
        for s in &self.shards {
            if let Ok(mut s) = s.write() {
                s.clear();
            }
        }
    }

    fn mark_synced(&self) {
        let now = (self.base.elapsed().as_millis() as u64).max(1);
        self.synced_at.store(now, Ordering::Release);
        self.fresh.store(true, Ordering::Release);
        if let Ok(mut spent) = self.spent.lock()
            && !spent.is_empty()
        {
            spent.clear();
        }
        self.synced.notify_waiters();
    }

    fn note_error(&self, e: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e);
        }
    }
}

impl AccessCache {
    /// Starts watching through `ledger` (a clone of [`crate::Client::ledger`]); returns at
    /// once: until the first sync point the cache is disconnected (see
    /// [`AccessCache::wait_current`]). Needs a Tokio runtime.
    pub fn start(ledger: Ledger, cfg: AccessCacheConfig) -> AccessCache {
        let shared = Arc::new(Shared::new(cfg.max_silence, cfg.disconnected));
        let tick =
            (cfg.max_silence / 10).clamp(Duration::from_millis(5), Duration::from_millis(100));
        let watched = shared.clone();
        let watchdog = tokio::spawn(async move {
            let mut every = tokio::time::interval(tick);
            loop {
                every.tick().await;
                watched.check_silence();
            }
        });
        let task = tokio::spawn(run(ledger, cfg, shared.clone()));
        AccessCache {
            shared,
            _task: Arc::new(AbortOnDrop(vec![task, watchdog])),
        }
    }

    /// May `account` start work costing `cost` now (R16: access allowed and, prepaid, the
    /// available balance covers it)? From memory. While the cache is not current, by its
    /// [`DisconnectedPolicy`]. An account the cache does not hold is denied.
    pub fn allowed(&self, account: &str, cost: Money) -> bool {
        let s = &self.shared;
        let (key, held) = s.lookup(account);
        if s.current() {
            return held.is_some_and(|a| a.allows(cost));
        }
        match (s.policy, held) {
            (DisconnectedPolicy::Grace(grace), Some(a)) if a.access == Access::Active => {
                let Ok(mut spent) = s.spent.lock() else {
                    return false;
                };
                let used = spent.get(&key).copied().unwrap_or_default();
                if used + cost <= grace {
                    spent.insert(key, used + cost);
                    true
                } else {
                    false
                }
            }
            _ => false,
        }
    }

    /// The account as the cache holds it (possibly stale: see [`AccessCache::is_current`]).
    pub fn get(&self, account: &str) -> Option<CachedAccess> {
        self.shared.lookup(account).1
    }

    /// Whether the cache is current (a sync point within `max_silence`, as the watchdog
    /// last looked: it looks ten times per `max_silence`, at most every 100 ms).
    pub fn is_current(&self) -> bool {
        self.shared.current()
    }

    /// Waits until the cache is current, up to `timeout`; false if it is not by then.
    pub async fn wait_current(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.synced.notified();
            if self.is_current() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_current();
            }
        }
    }

    pub fn status(&self) -> CacheStatus {
        let s = &self.shared;
        CacheStatus {
            current: s.current(),
            accounts: s
                .shards
                .iter()
                .map(|m| m.read().map(|m| m.len()).unwrap_or(0))
                .sum(),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            last_error: s.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

/// The feed id inside a cursor (`v1.<feed id>.<snapshot>`): a different one means another
/// ledger database.
fn feed_of(cursor: &str) -> Option<&str> {
    cursor.strip_prefix("v1.")?.split('.').next()
}

async fn run(ledger: Ledger, cfg: AccessCacheConfig, s: Arc<Shared>) {
    let mut cursor: Option<String> = None;
    let mut backoff = cfg.reconnect_min;
    let mut opened = 0u64;
    loop {
        if opened > 0 {
            s.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        opened += 1;
        let feed_before = cursor.as_deref().and_then(feed_of).map(str::to_owned);
        let ended = match ledger.watch_access(&cfg.accounts, cursor.as_deref()).await {
            Err(e) => {
                if e.code() == tonic::Code::InvalidArgument {
                    cursor = None;
                }
                e.to_string()
            }
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                let mut first_sync = true;
                loop {
                    // A half-open connection sends nothing, not even an end: after twice the
                    // silence the ledger never keeps, start again.
                    let next = tokio::time::timeout(cfg.max_silence * 2, stream.next()).await;
                    let Ok(next) = next else {
                        break "no sync point from the ledger; reconnecting".to_owned();
                    };
                    match next {
                        Some(Ok(WatchEvent::Update(u))) => {
                            if s.apply(&u)
                                && let Some(f) = &cfg.on_update
                            {
                                f(&u, chrono::Utc::now());
                            }
                        }
                        Some(Ok(WatchEvent::Sync { cursor: c })) => {
                            if first_sync {
                                first_sync = false;
                                // The first sync point names the feed this stream read:
                                // another database's versions mean nothing to what is
                                // held, so start again from a snapshot of it.
                                if let Some(before) = &feed_before
                                    && feed_of(&c) != Some(before.as_str())
                                {
                                    s.clear();
                                    if let Some(f) = &cfg.on_reset {
                                        f();
                                    }
                                    cursor = None;
                                    break "the ledger's access feed changed (another database); starting again from a snapshot".to_owned();
                                }
                                backoff = cfg.reconnect_min;
                            }
                            cursor = Some(c);
                            s.mark_synced();
                        }
                        Some(Err(e)) => {
                            // A cursor the ledger refuses (it cannot read it) is dropped:
                            // the next stream starts from a snapshot.
                            if e.code() == tonic::Code::InvalidArgument {
                                cursor = None;
                            }
                            break e.to_string();
                        }
                        None => break "the ledger ended the stream".to_owned(),
                    }
                }
            }
        };
        s.note_error(ended);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(cfg.reconnect_max);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn shared(policy: DisconnectedPolicy) -> AccessCache {
        let shared = Arc::new(Shared::new(Duration::from_secs(3), policy));
        AccessCache {
            shared,
            _task: Arc::new(AbortOnDrop(Vec::new())),
        }
    }

    fn update(id: &str, seq: u64, access: Access, available: &str) -> AccessUpdate {
        let m = Money::parse_signed("x", available).unwrap();
        AccessUpdate {
            account_id: AccountId::parse(id).unwrap(),
            billing_mode: BillingMode::Prepaid,
            access,
            balance: m,
            held: Money::ZERO,
            available_balance: m,
            seq,
            changed_at: None,
        }
    }

    fn money(s: &str) -> Money {
        Money::parse_signed("x", s).unwrap()
    }

    #[tokio::test]
    async fn connected_answers_follow_the_newest_update_and_r16() {
        let c = shared(DisconnectedPolicy::Deny);
        c.shared.apply(&update("a", 2, Access::Active, "5"));
        // Before the first sync point: disconnected, Deny.
        assert!(!c.allowed("a", money("1")));
        c.shared.mark_synced();
        assert!(c.allowed("a", money("5")));
        assert!(!c.allowed("a", money("5.01")));
        assert!(!c.allowed("unknown", Money::ZERO));
        // An older update (a repeat after a resume) does not roll it back.
        assert!(!c.shared.apply(&update("a", 1, Access::Suspended, "0")));
        assert!(c.allowed("a", money("1")));
        c.shared.apply(&update("a", 3, Access::Suspended, "0"));
        assert!(!c.allowed("a", Money::ZERO));
        let mut contract = update("k", 1, Access::Active, "-50");
        contract.billing_mode = BillingMode::Contract;
        c.shared.apply(&contract);
        assert!(c.allowed("k", money("1000")));
    }

    #[tokio::test]
    async fn disconnected_grace_lets_each_account_run_up_to_the_grace_then_denies() {
        let c = shared(DisconnectedPolicy::Grace(money("1.00")));
        c.shared.apply(&update("a", 1, Access::Active, "100"));
        c.shared.apply(&update("b", 1, Access::Active, "100"));
        c.shared.apply(&update("s", 1, Access::Suspended, "0"));
        // Never synced: disconnected.
        assert!(c.allowed("a", money("0.60")));
        assert!(c.allowed("a", money("0.40")));
        assert!(!c.allowed("a", money("0.01")), "past the grace");
        assert!(c.allowed("b", money("1.00")), "per account");
        assert!(!c.allowed("s", Money::ZERO), "last seen without access");
        assert!(!c.allowed("never-seen", Money::ZERO));
        // Current again: the grace spent is forgotten, answers are the cache's.
        c.shared.mark_synced();
        assert!(c.allowed("a", money("50")));
        c.shared.synced_at.store(0, Ordering::Release);
        c.shared.check_silence();
        assert!(
            c.allowed("a", money("1.00")),
            "a new outage has a new grace"
        );
    }

    #[test]
    fn a_cursor_names_its_feed() {
        assert_eq!(feed_of("v1.abc.1:2:"), Some("abc"));
        assert_eq!(feed_of("nonsense"), None);
    }
}

//! R31 scenarios: what a gateway sees — usage through the `UsageRecorder` and through
//! unary calls at 64 and 512 callers, how stale its `AccessCache` is under load, and the
//! cache at a million accounts (time to fill, memory, lookups).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credits_client::{
    AccessCache, AccessCacheConfig, AccountId, Ledger, RecorderConfig, UsageRecorder,
};

use crate::Args;
use crate::load::{self, Stats};

/// Usage from `callers` concurrent callers sharing one `UsageRecorder` (one stream).
pub async fn recorder(
    a: &Args,
    name: &str,
    callers: usize,
    ledger: Ledger,
    accounts: Arc<Vec<AccountId>>,
    run: &str,
) -> Stats {
    let rec = UsageRecorder::start(ledger, RecorderConfig::default());
    let n = accounts.len().max(1);
    let run = run.to_owned();
    let mut s = load::run(name, callers, a.duration(), 1, move |w, i| {
        let rec = rec.clone();
        let acct = accounts[(w * 7919 + i as usize * 104_729) % n].clone();
        let key = format!("{run}-rec{callers}-{w}-{i}");
        async move {
            let u = crate::scenarios::usage(acct, crate::scenarios::tiny(), &key)?;
            rec.record(u).await.map(|_| ()).map_err(|e| e.to_string())
        }
    })
    .await;
    s.note = format!(
        "{callers} callers, one UsageRecorder (one StreamUsage stream); each record() resolves when durable"
    );
    s
}

/// Unary `RecordUsage` from `callers` callers (usage-spread's shape at another
/// concurrency).
pub async fn unary(
    a: &Args,
    name: &str,
    callers: usize,
    pool: Arc<crate::scenarios::Pool<Ledger>>,
    accounts: Arc<Vec<AccountId>>,
    run: &str,
) -> Stats {
    let n = accounts.len().max(1);
    let run = run.to_owned();
    let mut s = load::run(name, callers, a.duration(), 1, move |w, i| {
        let l = pool.get(w);
        let acct = accounts[(w * 7919 + i as usize * 104_729) % n].clone();
        let key = format!("{run}-u{callers}-{w}-{i}");
        async move {
            let u = crate::scenarios::usage(acct, crate::scenarios::tiny(), &key)?;
            l.record_usage(&u)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    s.note = format!("{callers} callers, unary RecordUsage over 8 connections");
    s
}

/// An `AccessCache` of every account watching while usage-spread's load runs: how long
/// after a change was written the cache applied it (p50/p99 are that staleness), and how
/// many updates a second it took in.
pub async fn staleness(
    a: &Args,
    pool: Arc<crate::scenarios::Pool<Ledger>>,
    accounts: Arc<Vec<AccountId>>,
    run: &str,
) -> anyhow::Result<Stats> {
    let lag = Arc::new(Mutex::new(load::histogram()));
    let l = lag.clone();
    let cache = AccessCache::start(
        pool.get(0),
        AccessCacheConfig {
            on_update: Some(Arc::new(move |u, received| {
                if let Some(at) = u.changed_at {
                    let us = (received - at).num_microseconds().unwrap_or(0).max(1) as u64;
                    if let Ok(mut h) = l.lock() {
                        let _ = h.record(us);
                    }
                }
            })),
            ..Default::default()
        },
    );
    let started = Instant::now();
    if !cache.wait_current(Duration::from_secs(120)).await {
        anyhow::bail!(
            "the access cache did not become current: {:?}",
            cache.status()
        );
    }
    let fill = started.elapsed();
    // Only what changes under load counts, not the first part.
    if let Ok(mut h) = lag.lock() {
        h.reset();
    }
    let load = unary(
        a,
        "usage-spread-watched",
        a.concurrency,
        pool,
        accounts,
        run,
    )
    .await;
    let h = lag
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| load::histogram());
    let mut s = load::stats_from(
        "watch-staleness",
        &h,
        h.len(),
        0,
        Duration::from_secs_f64(load.seconds),
        1,
    );
    s.note = format!(
        "AccessCache of all accounts during usage-spread ({:.0} debits/s): time from a change's write (just before its commit) to the cache applying it; first part of {} accounts in {:.2} s",
        load.throughput,
        cache.status().accounts,
        fill.as_secs_f64()
    );
    Ok(s)
}

/// A million accounts (written straight into the ledger's database), then an
/// `AccessCache` of every account in this process: the time its first part takes, the
/// memory it adds, and lookups from two threads.
pub async fn cache_million(a: &Args, ledger: Ledger) -> anyhow::Result<Stats> {
    let Some(url) = &a.ledger_database_url else {
        anyhow::bail!("cache-1m needs --ledger-database-url");
    };
    const N: usize = 1_000_000;
    let pool = sqlx::PgPool::connect(url).await?;
    sqlx::query(&format!(
        "INSERT INTO accounts (account_id, billing_mode, access, balance)
         SELECT 'million-' || g, 'PREPAID', 'ACTIVE', 100 FROM generate_series(1, {N}) g
         ON CONFLICT DO NOTHING"
    ))
    .execute(&pool)
    .await?;
    pool.close().await;
    let ids: Vec<String> = (1..=N).map(|g| format!("million-{g}")).collect();
    let before = load::rss_mib(std::process::id()).unwrap_or(0.0);
    let started = Instant::now();
    let cache = AccessCache::start(ledger, AccessCacheConfig::default());
    if !cache.wait_current(Duration::from_secs(600)).await {
        anyhow::bail!(
            "the access cache did not become current: {:?}",
            cache.status()
        );
    }
    let fill = started.elapsed();
    let held = cache.status().accounts;
    let after = load::rss_mib(std::process::id()).unwrap_or(0.0);
    let per_million = (after - before) * 1_000_000.0 / held.max(1) as f64;
    // Lookups: two threads (the machine's cores), each over the ids in its own order.
    let ids = Arc::new(ids);
    let threads = 2;
    let per_thread = 20_000_000usize;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (cache, ids) = (cache.clone(), ids.clone());
            std::thread::spawn(move || {
                let cost = credits_client::Money::new(rust_decimal::Decimal::new(1, 2));
                let mut allowed = 0u64;
                for i in 0..per_thread {
                    let id = &ids[(i * 7919 + t * 104_729) % ids.len()];
                    allowed += cache.allowed(id, cost) as u64;
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for h in handles {
        allowed += h.join().unwrap_or(0);
    }
    let secs = t0.elapsed().as_secs_f64();
    let lookups = (threads * per_thread) as f64;
    Ok(Stats {
        name: "cache-1m".into(),
        ops: lookups as u64,
        seconds: secs,
        throughput: lookups / secs,
        note: format!(
            "{held} accounts: first part in {:.1} s ({:.0} accounts/s), +{:.0} MiB resident ({per_million:.0} MiB per 1M accounts); {threads} threads: {:.0} ns per lookup per thread, {allowed} allowed",
            fill.as_secs_f64(),
            held as f64 / fill.as_secs_f64(),
            after - before,
            secs * 1e9 / (lookups / threads as f64),
        ),
        ..Default::default()
    })
}

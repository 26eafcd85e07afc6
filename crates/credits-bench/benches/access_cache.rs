//! R31: how fast a gateway's `AccessCache` answers, and what it costs in memory.
//!
//! `cargo bench -p credits-bench --bench access_cache` starts a real ledger in-process on a
//! fresh database of the local PostgreSQL (`CREDITS_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432`), writes `ACCESS_CACHE_BENCH_ACCOUNTS` accounts
//! (default 1,000,000) straight into it, fills an `AccessCache` of every account through
//! `WatchAccess`, reports the time that took and the resident memory it added, then
//! measures `allowed()` from one thread and from two at once. A benchmark: it asserts
//! nothing about time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use credits_client::{AccessCache, AccessCacheConfig, Client, ClientConfig, Money};
use criterion::{Criterion, criterion_group, criterion_main};

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0)
        / 1024.0
}

struct Setup {
    cache: AccessCache,
    ids: Arc<Vec<String>>,
    _rt: tokio::runtime::Runtime,
}

fn setup() -> Setup {
    let n: usize = std::env::var("ACCESS_CACHE_BENCH_ACCOUNTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let base = std::env::var("CREDITS_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let db = format!("credits_cache_bench_{}", std::process::id());
    let url = format!("{}/{db}", base.trim_end_matches('/'));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (cache, fill) = rt.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let cfg = credits_ledger::Config::new(&url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        let app = credits_ledger::App::build(cfg, &shutdown).await.unwrap();
        sqlx::query(&format!(
            "INSERT INTO accounts (account_id, billing_mode, access, balance)
             SELECT 'acct-' || g, 'PREPAID', 'ACTIVE', 100 FROM generate_series(1, {n}) g"
        ))
        .execute(app.pool())
        .await
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(app.run(listener, shutdown.clone()));
        let client = Client::connect(ClientConfig {
            ledger_url: format!("http://{addr}"),
            ..ClientConfig::local()
        })
        .unwrap();
        let before = rss_mib();
        let t = Instant::now();
        let cache = AccessCache::start(client.ledger().clone(), AccessCacheConfig::default());
        assert!(cache.wait_current(Duration::from_secs(600)).await);
        let fill = t.elapsed();
        let added = rss_mib() - before;
        eprintln!(
            "AccessCache of {n} accounts: filled through WatchAccess in {:.2} s ({:.0} accounts/s); +{added:.0} MiB resident ({:.0} bytes per account, {:.0} MiB per 1M accounts)",
            fill.as_secs_f64(),
            n as f64 / fill.as_secs_f64(),
            added * 1_048_576.0 / n as f64,
            added * 1_000_000.0 / n as f64,
        );
        (cache, fill)
    });
    let _ = fill;
    let ids = Arc::new((1..=n).map(|g| format!("acct-{g}")).collect::<Vec<_>>());
    Setup {
        cache,
        ids,
        _rt: rt,
    }
}

fn lookups(c: &mut Criterion) {
    let s = setup();
    let cost = Money::new(rust_decimal::Decimal::new(1, 2));
    let n = s.ids.len();
    let mut g = c.benchmark_group("access_cache");
    // A gateway's hot set: 10,000 accounts asked about again and again (their ids and
    // entries stay in the CPU's caches).
    let mut i = 0usize;
    let hot = 10_000.min(n);
    g.bench_function("allowed, one thread, 10k hot accounts", |b| {
        b.iter(|| {
            i = (i + 7919) % hot;
            std::hint::black_box(s.cache.allowed(&s.ids[i], cost))
        })
    });
    // Every account in turn, at random: each lookup misses the CPU's caches (for the id
    // too, read from a vector of a million strings).
    g.bench_function("allowed, one thread, all accounts", |b| {
        b.iter(|| {
            i = (i + 104_729) % n;
            std::hint::black_box(s.cache.allowed(&s.ids[i], cost))
        })
    });
    // Two threads at once (the machine's cores): the time per iteration is for one lookup
    // on each thread.
    g.bench_function("allowed, two threads at once, all accounts", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            let handles: Vec<_> = (0..2)
                .map(|k| {
                    let (cache, ids) = (s.cache.clone(), s.ids.clone());
                    std::thread::spawn(move || {
                        let mut j = k * 7919;
                        for _ in 0..iters {
                            j = (j + 104_729) % ids.len();
                            std::hint::black_box(cache.allowed(&ids[j], cost));
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            t.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);

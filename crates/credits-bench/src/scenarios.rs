//! The benchmark scenarios, run in one go against one system.

use std::sync::Arc;
use std::time::{Duration, Instant};

use credits_client::{
    AccountId, AutoRechargeChange, BillingMode, CardDetails, Client, ClientConfig, ClientError,
    CreditSource, CreditsToAdd, Entry, EntryKind, IdempotencyKey, Ledger, Money, NewPaymentMethod,
    RetryPolicy, UsageCategory, UsageRecord,
};
use futures_util::StreamExt;

use crate::Args;
use crate::load::{self, Stats};
use crate::pgbench;

/// A few channels shared round-robin: one HTTP/2 connection caps throughput on its own.
struct Pool<T: Clone> {
    clients: Vec<T>,
}

impl<T: Clone> Pool<T> {
    fn get(&self, i: usize) -> T {
        self.clients[i % self.clients.len()].clone()
    }
}

/// A client of the system under test. Calls are sent once: a benchmark counts failures,
/// it does not hide them behind retries.
fn client(a: &Args) -> anyhow::Result<Client> {
    Ok(Client::connect(ClientConfig {
        ledger_url: a.ledger.clone(),
        payments_url: a.payments.clone(),
        recharge_url: a.recharge.clone(),
        token: a.token.clone(),
        timeout: credits_client::DEFAULT_TIMEOUT,
        retry: RetryPolicy::none(),
    })?)
}

fn ledger_pool(a: &Args) -> anyhow::Result<Pool<Ledger>> {
    let clients = (0..8)
        .map(|_| client(a).map(|c| c.ledger().clone()))
        .collect::<Result<_, _>>()?;
    Ok(Pool { clients })
}

type HealthClient = tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>;

/// Health clients of the ledger over as many connections as [`ledger_pool`].
fn health_pool(a: &Args) -> anyhow::Result<Pool<HealthClient>> {
    let clients = (0..8)
        .map(|_| {
            let ch = tonic::transport::Endpoint::from_shared(a.ledger.clone())?
                .tcp_nodelay(true)
                .connect_lazy();
            Ok(HealthClient::new(ch))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Pool { clients })
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// `StreamUsage` from one caller: a single stream kept full for `duration` (the client
/// library's window of items in flight is the server's), spread over the accounts.
async fn stream_usage(
    ledger: &Ledger,
    accounts: Arc<Vec<AccountId>>,
    run: &str,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let n = accounts.len().max(1);
    let deadline = Instant::now() + duration;
    let run = run.to_owned();
    let items = futures_util::stream::iter(0u64..)
        .take_while(move |_| futures_util::future::ready(Instant::now() < deadline))
        .filter_map(move |i| {
            let acct = accounts[(i as usize * 104_729) % n].clone();
            let r = usage(acct, tiny(), &format!("{run}-stream-{i}")).ok();
            futures_util::future::ready(r)
        });
    let started = Instant::now();
    let mut results = ledger.stream_usage(items).await?;
    let (mut ok, mut errors) = (0u64, 0u64);
    while let Some(r) = results.next().await {
        match r {
            Ok(_) => ok += 1,
            Err(_) => errors += 1,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Stats {
        name: "stream-usage".into(),
        ops: ok,
        errors,
        seconds,
        throughput: ok as f64 / seconds,
        note: "one StreamUsage stream, one caller; items pipelined, so no per-item latency".into(),
        ..Default::default()
    })
}

/// Parses an id, amount or key the bench made up itself.
fn ours<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("bench {what}: {e}"))
}

fn usage(account: AccountId, amount: Money, key: &str) -> Result<UsageRecord, String> {
    Ok(UsageRecord {
        account_id: account,
        category: UsageCategory::ApiRequests,
        amount,
        idempotency_key: ours("key", IdempotencyKey::parse(key))?,
        description: String::new(),
    })
}

/// The amount of one usage debit in the load scenarios.
fn tiny() -> Money {
    Money::new(rust_decimal::Decimal::new(125, 6))
}

/// Runs `setup` on every account (with its index, for the pool), `concurrency` at a
/// time; the first failure to come back.
async fn set_up_each<F, Fut, E>(ids: &[AccountId], concurrency: usize, setup: F) -> Result<(), E>
where
    F: FnMut((usize, AccountId)) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let results: Vec<Result<(), E>> = futures_util::stream::iter(ids.iter().cloned().enumerate())
        .map(setup)
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Creates `n` accounts funded with a large grant so usage never suspends them.
async fn funded_accounts(
    pool: &Pool<Ledger>,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<AccountId>> {
    let ids: Vec<AccountId> = (0..n)
        .map(|i| AccountId::parse(&format!("{prefix}-{i}")))
        .collect::<Result<_, _>>()?;
    let fund = Money::new(rust_decimal::Decimal::new(1_000_000, 0));
    let key = IdempotencyKey::parse("fund")?;
    set_up_each(&ids, 64, |(i, id)| {
        let (l, key) = (pool.get(i), key.clone());
        async move {
            l.create_account(&id, BillingMode::Prepaid, "").await?;
            l.add_credits(&CreditsToAdd {
                account_id: id,
                amount: fund,
                source: CreditSource::Purchase,
                reference: "bench".into(),
                idempotency_key: key,
                description: String::new(),
            })
            .await?;
            Ok::<_, ClientError>(())
        }
    })
    .await?;
    Ok(ids)
}

pub async fn run_all(a: &Args) -> anyhow::Result<Vec<Stats>> {
    let pool = Arc::new(ledger_pool(a)?);
    let run = run_id();
    let mut out = Vec::new();
    let spread_accounts = if a.wants("usage-spread")
        || a.wants("check-access")
        || a.wants("usage-batch")
        || a.wants("stream-usage")
    {
        eprintln!("setting up {} funded accounts…", a.accounts);
        Arc::new(funded_accounts(&pool, &format!("bench-{run}"), a.accounts).await?)
    } else {
        Arc::new(Vec::new())
    };
    let n = spread_accounts.len().max(1);

    if a.wants("pgbench-spread") || a.wants("usage-spread") {
        eprintln!("pgbench baseline (spread)…");
        out.push(pgbench::run(a, "pgbench-spread", a.accounts).await?);
    }
    if a.wants("usage-spread") {
        eprintln!("usage-spread…");
        let (p, accts, r) = (pool.clone(), spread_accounts.clone(), run.clone());
        let s = scenario(a, "usage-spread", 1, move |w, i| {
            let l = p.get(w);
            let acct = accts[(w * 7919 + i as usize * 104_729) % n].clone();
            let key = format!("{r}-s-{w}-{i}");
            async move { outcome(l.record_usage(&usage(acct, tiny(), &key)?).await) }
        })
        .await;
        out.push(s);
    }
    if a.wants("stream-usage") {
        eprintln!("stream-usage…");
        out.push(with_rss(
            a,
            stream_usage(&pool.get(0), spread_accounts.clone(), &run, a.duration()).await?,
        ));
    }
    if a.wants("usage-hot") {
        eprintln!("usage-hot…");
        let hot = funded_accounts(&pool, &format!("bench-{run}-hot"), 1)
            .await?
            .remove(0);
        if a.wants("usage-spread") || a.wants("pgbench-hot") {
            out.push(pgbench::run(a, "pgbench-hot", 1).await?);
        }
        let (p, r) = (pool.clone(), run.clone());
        let s = scenario(a, "usage-hot", 1, move |w, i| {
            let l = p.get(w);
            let (acct, key) = (hot.clone(), format!("{r}-h-{w}-{i}"));
            async move { outcome(l.record_usage(&usage(acct, tiny(), &key)?).await) }
        })
        .await;
        out.push(s);
    }
    if a.wants("usage-batch") {
        eprintln!("usage-batch…");
        let (p, accts, r, size) = (pool.clone(), spread_accounts.clone(), run.clone(), a.batch);
        let mut s = scenario(a, "usage-batch", size as u64, move |w, i| {
            let l = p.get(w);
            let items: Result<Vec<_>, String> = (0..size)
                .map(|k| {
                    usage(
                        accts[(w * 31 + i as usize * 131 + k * 7) % n].clone(),
                        tiny(),
                        &format!("{r}-b-{w}-{i}-{k}"),
                    )
                })
                .collect();
            async move {
                let res = l
                    .record_usage_batch(&items?)
                    .await
                    .map_err(|e| e.to_string())?;
                match res.into_iter().find_map(Result::err) {
                    Some(bad) => Err(format!("batch item failed: {bad}")),
                    None => Ok(()),
                }
            }
        })
        .await;
        s.note = format!("{} items per call; throughput counts items", a.batch);
        out.push(s);
    }
    if a.wants("check-access") {
        eprintln!("check-access…");
        let (p, accts) = (pool.clone(), spread_accounts.clone());
        let s = scenario(a, "check-access", 1, move |w, i| {
            let l = p.get(w);
            let acct = accts[(w * 7919 + i as usize * 104_729) % n].clone();
            async move { outcome(l.check_access(&acct).await) }
        })
        .await;
        out.push(s);
    }
    if a.wants("health-check") || a.wants("check-access") {
        // The transport's own limit: an RPC that does no work, called the same way.
        eprintln!("health-check…");
        let health = health_pool(a)?;
        let s = scenario(a, "health-check", 1, move |w, _| {
            let mut h = health.get(w);
            let req = tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            };
            async move { outcome(h.check(req).await) }
        })
        .await;
        out.push(s);
    }
    if a.wants("recharge-latency") {
        eprintln!("recharge-latency ({} accounts)…", a.recharge_accounts);
        out.push(with_rss(a, recharge_latency(a, &pool, &run).await?));
    }
    // Last: its hundreds of thousands of rows in another database would otherwise leave
    // checkpoints and vacuum to the scenarios that follow it.
    if a.wants("ceiling") || a.wants("usage-spread") || a.wants("stream-usage") {
        eprintln!("the store's ceiling: the ledger's batch SQL, then a set-based statement…");
        out.push(pgbench::ceiling(a, "ceiling-ledger-batch", false).await?);
        out.push(pgbench::ceiling(a, "ceiling-set-based", true).await?);
    }
    Ok(out)
}

/// Runs `op` as scenario `name` (`items` per call) at the configured concurrency and
/// duration; its stats with the daemons' memory afterwards.
async fn scenario<F, Fut>(a: &Args, name: &str, items: u64, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    with_rss(
        a,
        load::run(name, a.concurrency, a.duration(), items, op).await,
    )
}

/// A call's outcome as the load counts it.
fn outcome<T>(r: Result<T, impl ToString>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.to_string())
}

fn with_rss(a: &Args, mut s: Stats) -> Stats {
    for spec in &a.pids {
        if let Some((name, pid)) = spec.split_once('=')
            && let Ok(pid) = pid.parse::<u32>()
            && let Some(mib) = load::rss_mib(pid)
        {
            s.rss_mib.push((name.to_owned(), mib));
        }
    }
    s
}

/// 500 accounts with auto-recharge each cross their threshold once; the latency is from
/// the crossing `RecordUsage` returning to the top-up credit being visible in the ledger.
async fn recharge_latency(a: &Args, pool: &Pool<Ledger>, run: &str) -> anyhow::Result<Stats> {
    let c = client(a)?;
    let (payments, recharge) = (c.payments(), c.recharge());
    let ids: Vec<AccountId> = (0..a.recharge_accounts)
        .map(|i| AccountId::parse(&format!("rc-{run}-{i}")))
        .collect::<Result<_, _>>()?;
    let card = NewPaymentMethod::Card(CardDetails {
        number: "4242424242424242".into(),
        exp_month: 12,
        exp_year: 2034,
        cvc: "123".into(),
    });
    let buy = IdempotencyKey::parse("buy")?;
    let settings = AutoRechargeChange::Enable {
        threshold: Money::new(rust_decimal::Decimal::new(10, 0)),
        target: Money::new(rust_decimal::Decimal::new(50, 0)),
        monthly_limit: None,
    };
    // Setup: account, card, $25 purchase, auto-recharge below 10 up to 50.
    set_up_each(&ids, 32, |(i, id)| {
        let l = pool.get(i);
        let (card, buy) = (&card, &buy);
        async move {
            l.create_account(&id, BillingMode::Prepaid, "").await?;
            payments.add_payment_method(&id, card, true).await?;
            payments
                .purchase_credits(
                    &id,
                    Money::new(rust_decimal::Decimal::new(2500, 2)),
                    None,
                    buy,
                )
                .await?;
            recharge.set_auto_recharge(&id, settings).await?;
            Ok::<_, ClientError>(())
        }
    })
    .await?;
    let crossing_usage = Money::new(rust_decimal::Decimal::new(1501, 2));
    let mut h = load::histogram();
    let start = Instant::now();
    // Latency is measured on the ledger's own clock: from the crossing entry to the
    // top-up credit entry (both `created_at` of committed rows), so the probe's polling,
    // which only detects completion, does not load the machine it measures.
    let timings: Vec<Result<Duration, String>> =
        futures_util::stream::iter(ids.clone().into_iter().enumerate())
            .map(|(i, id)| {
                let l = pool.get(i);
                async move {
                    l.record_usage(&usage(id.clone(), crossing_usage, "cross")?)
                        .await
                        .map_err(|e| e.to_string())?;
                    let t = Instant::now();
                    loop {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let entries = l
                            .list_entries(&id, 10, None)
                            .await
                            .map_err(|e| e.to_string())?
                            .items;
                        let crossing = entries.iter().find(|e| e.idempotency_key == "cross");
                        let credit = entries
                            .iter()
                            .find(|e| e.kind == EntryKind::Credit(CreditSource::AutoRecharge));
                        if let (Some(c), Some(t)) = (crossing, credit) {
                            return Ok(between(c, t));
                        }
                        if t.elapsed() > Duration::from_secs(60) {
                            return Err(format!("{id}: no top-up within 60 s"));
                        }
                    }
                }
            })
            .buffer_unordered(a.concurrency)
            .collect()
            .await;
    let elapsed = start.elapsed();
    let mut errors = 0;
    for t in &timings {
        match t {
            Ok(d) => {
                let _ = h.record(d.as_micros().max(1) as u64);
            }
            Err(_) => errors += 1,
        }
    }
    // Charges must equal crossings: count top-up charges per account.
    let mut top_ups = 0usize;
    for id in &ids {
        let charges = payments.list_charges(id, 50, None).await?.items;
        top_ups += charges
            .iter()
            .filter(|c| c.description.starts_with("auto-recharge"))
            .count();
    }
    let mut s = load::stats_from("recharge-latency", &h, h.len(), errors, elapsed, 1);
    s.note = format!(
        "crossings {}, top-up charges {} ({})",
        ids.len(),
        top_ups,
        if top_ups == ids.len() {
            "equal"
        } else {
            "MISMATCH"
        }
    );
    Ok(s)
}

/// Time from one entry to a later one, zero if they are out of order.
fn between(first: &Entry, then: &Entry) -> Duration {
    (then.created_at - first.created_at)
        .to_std()
        .unwrap_or_default()
}

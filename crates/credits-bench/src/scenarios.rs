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
use crate::gateway;
use crate::load::{self, Stats};
use crate::pgbench;

/// A few channels shared round-robin: one HTTP/2 connection caps throughput on its own.
pub(crate) struct Pool<T: Clone> {
    clients: Vec<T>,
}

impl<T: Clone> Pool<T> {
    pub(crate) fn get(&self, i: usize) -> T {
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

pub(crate) fn usage(account: AccountId, amount: Money, key: &str) -> Result<UsageRecord, String> {
    Ok(UsageRecord {
        account_id: account,
        category: UsageCategory::ApiRequests,
        amount,
        idempotency_key: ours("key", IdempotencyKey::parse(key))?,
        description: String::new(),
    })
}

/// The amount of one usage debit in the load scenarios.
pub(crate) fn tiny() -> Money {
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

/// A queue that takes every event of the bench's exchange and keeps only the newest: what
/// a deployment's other consumers (audit, analytics, the portal's mail) are to the outbox
/// relays. Without one, every event no consumer binds (the activation of each of the
/// 10,000 accounts, every charge…) is returned by the broker and retried with backoff for
/// ten minutes, a background load no deployment has. Deleted with the connection.
async fn sink_every_event() -> anyhow::Result<Option<lapin::Connection>> {
    use lapin::types::{AMQPValue, FieldTable};
    let (Ok(url), Ok(exchange)) = (std::env::var("AMQP_URL"), std::env::var("CREDITS_EXCHANGE"))
    else {
        return Ok(None);
    };
    let conn = credits_common::amqp::connect(&url, "credits-bench-sink").await?;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    let queue = format!("{exchange}.sink");
    credits_common::amqp::declare_private_queue(&ch, &exchange, &queue, "#", args).await?;
    Ok(Some(conn))
}

pub async fn run_all(a: &Args) -> anyhow::Result<Vec<Stats>> {
    let pool = Arc::new(ledger_pool(a)?);
    let run = run_id();
    let _sink = sink_every_event().await?;
    let mut out = Vec::new();
    let spread_accounts = if a.wants("usage-spread")
        || a.wants("usage-spread-512")
        || a.wants("recorder-64")
        || a.wants("recorder-512")
        || a.wants("watch-staleness")
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
    if a.wants("usage-spread-512") {
        eprintln!("usage-spread-512…");
        let s = gateway::unary(
            a,
            "usage-spread-512",
            512,
            pool.clone(),
            spread_accounts.clone(),
            &run,
        )
        .await;
        out.push(with_rss(a, s));
    }
    for callers in [64, 512] {
        let name = format!("recorder-{callers}");
        if a.wants(&name) {
            eprintln!("{name}…");
            let s = gateway::recorder(
                a,
                &name,
                callers,
                pool.get(callers),
                spread_accounts.clone(),
                &run,
            )
            .await;
            out.push(with_rss(a, s));
        }
    }
    if a.wants("watch-staleness") {
        eprintln!("watch-staleness…");
        let s = gateway::staleness(a, pool.clone(), spread_accounts.clone(), &run).await?;
        out.push(with_rss(a, s));
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
    if a.wants("cache-1m") {
        eprintln!("cache-1m (a million accounts, then an AccessCache of all)…");
        out.push(with_rss(a, gateway::cache_million(a, pool.get(1)).await?));
    }
    if a.wants("recharge-latency") {
        eprintln!("recharge-latency ({} accounts)…", a.recharge_accounts);
        out.push(with_rss(a, recharge_latency(a, &pool, &run).await?));
    }
    for rate in open_rates(a) {
        out.push(with_rss(a, recharge_open(a, &pool, &run, rate).await?));
    }
    // Last: its hundreds of thousands of rows in another database would otherwise leave
    // checkpoints and vacuum to the scenarios that follow it.
    if a.wants("ceiling") || a.wants("usage-spread") || a.wants("stream-usage") {
        use pgbench::Ceiling;
        eprintln!(
            "the store's ceiling: the ledger's batch SQL, the row-by-row batch, then a set-based statement…"
        );
        out.push(pgbench::ceiling(a, "ceiling-ledger-batch", Ceiling::LedgerBatch).await?);
        out.push(pgbench::ceiling(a, "ceiling-row-by-row", Ceiling::RowByRow).await?);
        out.push(pgbench::ceiling(a, "ceiling-set-based", Ceiling::SetBased).await?);
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

/// The card every auto-recharge account pays with.
fn test_card() -> NewPaymentMethod {
    NewPaymentMethod::Card(CardDetails {
        number: "4242424242424242".into(),
        exp_month: 12,
        exp_year: 2034,
        cvc: "123".into(),
    })
}

/// The idempotency key of each account's one crossing debit.
const CROSSING_KEY: &str = "cross";

/// The debit that takes a set-up account from $25 to below its $10 threshold.
fn crossing_usage() -> Money {
    Money::new(rust_decimal::Decimal::new(1501, 2))
}

/// How long a crossing's top-up may take before it counts as missing.
const TOP_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// Creates `n` accounts `<prefix>-<i>`, each with a card, a $25 purchase and
/// auto-recharge below $10 up to $50; 32 at a time, not timed.
async fn auto_recharge_accounts(
    a: &Args,
    pool: &Pool<Ledger>,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<AccountId>> {
    let c = client(a)?;
    let (payments, recharge) = (c.payments(), c.recharge());
    let ids: Vec<AccountId> = (0..n)
        .map(|i| AccountId::parse(&format!("{prefix}-{i}")))
        .collect::<Result<_, _>>()?;
    let card = test_card();
    let buy = IdempotencyKey::parse("buy")?;
    let settings = AutoRechargeChange::Enable {
        threshold: Money::new(rust_decimal::Decimal::new(10, 0)),
        target: Money::new(rust_decimal::Decimal::new(50, 0)),
        monthly_limit: None,
    };
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
    Ok(ids)
}

/// A crossing's top-up as the journal shows it: the time from the crossing debit to the
/// first auto-recharge credit (both `created_at` of committed rows, the ledger's clock),
/// and how many auto-recharge credits the account has.
type TopUp = (Duration, usize);

/// The top-up of an account from its newest journal entries; `None` until both the
/// crossing and a top-up are there.
fn top_up_of(entries: &[Entry]) -> Option<TopUp> {
    let crossing = entries.iter().find(|e| e.idempotency_key == CROSSING_KEY)?;
    let credits: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Credit(CreditSource::AutoRecharge))
        .collect();
    // Newest first: the first top-up is the last one listed.
    let first = credits.last()?;
    Some((between(crossing, first), credits.len()))
}

/// 500 accounts with auto-recharge each cross their threshold once, all at once; the
/// latency is from the crossing entry to the top-up credit entry in the ledger.
async fn recharge_latency(a: &Args, pool: &Pool<Ledger>, run: &str) -> anyhow::Result<Stats> {
    let c = client(a)?;
    let payments = c.payments();
    let ids = auto_recharge_accounts(a, pool, &format!("rc-{run}"), a.recharge_accounts).await?;
    let crossing_usage = crossing_usage();
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
                    l.record_usage(&usage(id.clone(), crossing_usage, CROSSING_KEY)?)
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
                        if let Some((d, _)) = top_up_of(&entries) {
                            return Ok(d);
                        }
                        if t.elapsed() > TOP_UP_TIMEOUT {
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
        "burst: all at once; crossings {}, top-up charges {} ({})",
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

/// The offered rates of the open-loop recharge scenarios, crossings per second; each is
/// scenario `recharge-open-<rate>`.
const OPEN_RATES: [u32; 4] = [10, 50, 100, 200];

/// The open-loop rates to run: [`OPEN_RATES`] by default, else every
/// `recharge-open-<rate>` named in `--scenarios` (any rate, to look for the limit).
fn open_rates(a: &Args) -> Vec<u32> {
    if a.scenarios == "all" {
        return OPEN_RATES.to_vec();
    }
    let mut rates: Vec<u32> = a
        .scenarios
        .split(',')
        .filter_map(|s| s.trim().strip_prefix("recharge-open-")?.parse().ok())
        .filter(|&r| r > 0)
        .collect();
    rates.sort_unstable();
    rates.dedup();
    rates
}

/// Most crossings (so accounts to set up) of one open-loop scenario.
const MAX_OPEN_CROSSINGS: usize = 5_000;

/// Recharge latency as users meet it: accounts cross their threshold at a fixed rate,
/// open loop (each crossing is sent at its scheduled time, however long the earlier
/// ones take), for the configured duration. Each account crosses once. The latency of a
/// crossing is from its debit entry to its top-up credit entry, on the ledger's clock.
/// The throughput is the achieved rate of crossing debits; a top-up not there within
/// [`TOP_UP_TIMEOUT`] of the last crossing is an error.
async fn recharge_open(
    a: &Args,
    pool: &Pool<Ledger>,
    run: &str,
    rate: u32,
) -> anyhow::Result<Stats> {
    let name = format!("recharge-open-{rate}");
    let wanted = (f64::from(rate) * a.duration().as_secs_f64()).round() as usize;
    let n = wanted.clamp(1, MAX_OPEN_CROSSINGS);
    eprintln!("{name}: setting up {n} auto-recharge accounts…");
    let ids = auto_recharge_accounts(a, pool, &format!("ro{rate}-{run}"), n).await?;
    // Let the set-up's own events (purchases, settings) drain before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let costs_idle = crate::cost::snapshot(a).await?;
    let costs_before = crate::cost::snapshot(a).await?;
    eprintln!("{name}: {n} crossings at {rate}/s…");

    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now();
    let mut ticks = tokio::time::interval_at(start.into(), period);
    // A tick the bench itself was late for is sent at once: the schedule, not the
    // answers, sets the pace.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = Vec::with_capacity(n);
    for (i, id) in ids.iter().cloned().enumerate() {
        let scheduled = start + period * i as u32;
        ticks.tick().await;
        let l = pool.get(i);
        sent.push(tokio::spawn(async move {
            let r = async {
                l.record_usage(&usage(id, crossing_usage(), CROSSING_KEY)?)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            // From the crossing's scheduled time, so a late send is counted too.
            (r.map(|_| ()), scheduled.elapsed(), Instant::now())
        }));
    }
    let mut debit = load::histogram();
    let mut crossed = Vec::with_capacity(n);
    let (mut errors, mut first_error) = (0u64, None::<String>);
    let mut last_done = start;
    for (i, task) in sent.into_iter().enumerate() {
        match task.await {
            Ok((Ok(()), took, done)) => {
                let _ = debit.record(took.as_micros().max(1) as u64);
                last_done = last_done.max(done);
                crossed.push(i);
            }
            Ok((Err(e), _, _)) => {
                errors += 1;
                first_error.get_or_insert(format!("crossing: {e}"));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("crossing task: {e}"));
            }
        }
    }
    // The schedule spans n periods; a crossing debit still running past it stretches it.
    let window = (period * n as u32).max(last_done - start);
    let achieved = crossed.len() as f64 / window.as_secs_f64();

    // Only now look for the top-ups, a few accounts at a time: the latencies come from
    // the journal, so the probe need not run (and load the system) while crossings do.
    let deadline = Instant::now() + TOP_UP_TIMEOUT;
    let mut h = load::histogram();
    let (mut top_ups, mut extra) = (0usize, 0usize);
    let mut pending = crossed;
    let mut probes = 0u64;
    loop {
        probes += pending.len() as u64;
        let seen: Vec<(usize, Result<Option<TopUp>, String>)> =
            futures_util::stream::iter(pending.iter().copied())
                .map(|i| {
                    let (l, id) = (pool.get(i), ids[i].clone());
                    async move {
                        let r = l.list_entries(&id, 10, None).await;
                        (i, r.map(|p| top_up_of(&p.items)).map_err(|e| e.to_string()))
                    }
                })
                .buffer_unordered(8)
                .collect()
                .await;
        pending.clear();
        for (i, r) in seen {
            match r {
                Ok(Some((d, credits))) => {
                    let _ = h.record(d.as_micros().max(1) as u64);
                    top_ups += 1;
                    extra += credits - 1;
                }
                Ok(None) => pending.push(i),
                Err(e) => {
                    // A failed look-up is tried again; only a missing top-up counts.
                    pending.push(i);
                    first_error.get_or_insert(format!("ListEntries (retried): {e}"));
                }
            }
        }
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let missing = pending.len();
    errors += missing as u64;
    if let Some(&i) = pending.first() {
        first_error.get_or_insert(format!(
            "{}: no top-up within {} s",
            ids[i],
            TOP_UP_TIMEOUT.as_secs()
        ));
    }

    let mut s = load::stats_from(&name, &h, h.len(), errors, window, 1);
    s.throughput = achieved;
    let ms = |q: f64| debit.value_at_quantile(q) as f64 / 1000.0;
    s.note = format!(
        "open loop: offered {rate}/s, achieved {achieved:.1}/s; crossings {n}, top-ups {top_ups}{}{}; \
         crossing RecordUsage from its scheduled time p50 {:.1} ms, p99 {:.1} ms{}",
        if missing > 0 {
            format!(", {missing} MISSING")
        } else {
            String::new()
        },
        if extra > 0 {
            format!(", {extra} EXTRA top-ups")
        } else {
            String::new()
        },
        ms(0.50),
        ms(0.99),
        if wanted > n {
            format!("; capped at {MAX_OPEN_CROSSINGS} crossings")
        } else {
            String::new()
        },
    );
    if let (Some(idle), Some(before)) = (costs_idle, costs_before)
        && let Some(after) = crate::cost::snapshot(a).await?
    {
        let own = [("RecordUsage", n as u64), ("ListEntries", probes)];
        s.note.push_str(&format!(
            "; per top-up (the crossing and the probe's reads excluded): {}",
            crate::cost::per_unit(&idle, &before, &after, top_ups, &own)
        ));
    }
    if let Some(e) = first_error {
        s.note.push_str(&format!("; first error: {e}"));
    }
    Ok(s)
}

/// Time from one entry to a later one, zero if they are out of order.
fn between(first: &Entry, then: &Entry) -> Duration {
    (then.created_at - first.created_at)
        .to_std()
        .unwrap_or_default()
}

//! The six scenarios of the benchmark issue, run in one go against one system.

use std::sync::Arc;
use std::time::{Duration, Instant};

use credits_common::grpc::{AuthChannel, lazy_channel};
use credits_proto::ledger::v1 as lpb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1 as ppb;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use credits_proto::recharge::v1 as rpb;
use credits_proto::recharge::v1::auto_recharge_service_client::AutoRechargeServiceClient;
use futures_util::StreamExt;

use crate::Args;
use crate::load::{self, Stats};
use crate::pgbench;

type Ledger = LedgerServiceClient<AuthChannel>;

/// A few channels shared round-robin: one HTTP/2 connection caps throughput on its own.
struct Pool<T: Clone> {
    clients: Vec<T>,
}

impl<T: Clone> Pool<T> {
    fn get(&self, i: usize) -> T {
        self.clients[i % self.clients.len()].clone()
    }
}

fn ledger_pool(a: &Args) -> anyhow::Result<Pool<Ledger>> {
    let clients = (0..8)
        .map(|_| lazy_channel(&a.ledger, a.token.as_deref()).map(LedgerServiceClient::new))
        .collect::<Result<_, _>>()?;
    Ok(Pool { clients })
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

fn usage(account: String, amount: &str, key: String) -> lpb::RecordUsageRequest {
    lpb::RecordUsageRequest {
        account_id: account,
        category: lpb::UsageCategory::ApiRequests as i32,
        amount: amount.to_owned(),
        idempotency_key: key,
        description: String::new(),
    }
}

/// Creates `n` accounts funded with a large grant so usage never suspends them.
async fn funded_accounts(
    pool: &Pool<Ledger>,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let results: Vec<anyhow::Result<()>> =
        futures_util::stream::iter(ids.clone().into_iter().enumerate())
            .map(|(i, id)| {
                let mut l = pool.get(i);
                async move {
                    l.create_account(lpb::CreateAccountRequest {
                        account_id: id.clone(),
                        billing_mode: lpb::BillingMode::Prepaid as i32,
                        display_name: String::new(),
                    })
                    .await?;
                    l.add_credits(lpb::AddCreditsRequest {
                        account_id: id.clone(),
                        amount: "1000000".into(),
                        source: lpb::CreditSource::Purchase as i32,
                        reference: "bench".into(),
                        idempotency_key: "fund".into(),
                        description: String::new(),
                    })
                    .await?;
                    Ok(())
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
    for r in results {
        r?;
    }
    Ok(ids)
}

pub async fn run_all(a: &Args) -> anyhow::Result<Vec<Stats>> {
    let pool = Arc::new(ledger_pool(a)?);
    let run = run_id();
    let mut out = Vec::new();
    let spread_accounts =
        if a.wants("usage-spread") || a.wants("check-access") || a.wants("usage-batch") {
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
        let s = load::run(
            "usage-spread",
            a.concurrency,
            a.duration(),
            1,
            move |w, i| {
                let mut l = p.get(w);
                let acct = accts[(w * 7919 + i as usize * 104_729) % n].clone();
                let key = format!("{r}-s-{w}-{i}");
                async move {
                    l.record_usage(usage(acct, "0.000125", key))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            },
        )
        .await;
        out.push(with_rss(a, s));
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
        let s = load::run("usage-hot", a.concurrency, a.duration(), 1, move |w, i| {
            let mut l = p.get(w);
            let (acct, key) = (hot.clone(), format!("{r}-h-{w}-{i}"));
            async move {
                l.record_usage(usage(acct, "0.000125", key))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await;
        out.push(with_rss(a, s));
    }
    if a.wants("usage-batch") {
        eprintln!("usage-batch…");
        let (p, accts, r, size) = (pool.clone(), spread_accounts.clone(), run.clone(), a.batch);
        let s = load::run(
            "usage-batch",
            a.concurrency,
            a.duration(),
            size as u64,
            move |w, i| {
                let mut l = p.get(w);
                let items: Vec<_> = (0..size)
                    .map(|k| {
                        usage(
                            accts[(w * 31 + i as usize * 131 + k * 7) % n].clone(),
                            "0.000125",
                            format!("{r}-b-{w}-{i}-{k}"),
                        )
                    })
                    .collect();
                async move {
                    let res = l
                        .record_usage_batch(lpb::RecordUsageBatchRequest { items })
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    match res.results.iter().find(|r| {
                        matches!(
                            r.result,
                            Some(lpb::record_usage_batch_result::Result::Error(_))
                        )
                    }) {
                        Some(bad) => Err(format!("batch item failed: {bad:?}")),
                        None => Ok(()),
                    }
                }
            },
        )
        .await;
        let mut s = with_rss(a, s);
        s.note = format!("{} items per call; throughput counts items", a.batch);
        out.push(s);
    }
    if a.wants("check-access") {
        eprintln!("check-access…");
        let (p, accts) = (pool.clone(), spread_accounts.clone());
        let s = load::run(
            "check-access",
            a.concurrency,
            a.duration(),
            1,
            move |w, i| {
                let mut l = p.get(w);
                let acct = accts[(w * 7919 + i as usize * 104_729) % n].clone();
                async move {
                    l.check_access(lpb::CheckAccessRequest { account_id: acct })
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            },
        )
        .await;
        out.push(with_rss(a, s));
    }
    if a.wants("recharge-latency") {
        eprintln!("recharge-latency ({} accounts)…", a.recharge_accounts);
        out.push(with_rss(a, recharge_latency(a, &pool, &run).await?));
    }
    Ok(out)
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
    let payments: PaymentsServiceClient<AuthChannel> =
        PaymentsServiceClient::new(lazy_channel(&a.payments, a.token.as_deref())?);
    let recharge: AutoRechargeServiceClient<AuthChannel> =
        AutoRechargeServiceClient::new(lazy_channel(&a.recharge, a.token.as_deref())?);
    let ids: Vec<String> = (0..a.recharge_accounts)
        .map(|i| format!("rc-{run}-{i}"))
        .collect();
    // Setup: account, card, $25 purchase, auto-recharge below 10 up to 50.
    let setup: Vec<anyhow::Result<()>> =
        futures_util::stream::iter(ids.clone().into_iter().enumerate())
            .map(|(i, id)| {
                let (mut l, mut p, mut r) = (pool.get(i), payments.clone(), recharge.clone());
                async move {
                    l.create_account(lpb::CreateAccountRequest {
                        account_id: id.clone(),
                        ..Default::default()
                    })
                    .await?;
                    p.add_payment_method(ppb::AddPaymentMethodRequest {
                        account_id: id.clone(),
                        method: Some(ppb::add_payment_method_request::Method::Card(
                            ppb::CardDetails {
                                number: "4242424242424242".into(),
                                exp_month: 12,
                                exp_year: 2034,
                                cvc: "123".into(),
                            },
                        )),
                        make_default: true,
                    })
                    .await?;
                    p.purchase_credits(ppb::PurchaseCreditsRequest {
                        account_id: id.clone(),
                        amount: "25.00".into(),
                        payment_method_id: String::new(),
                        idempotency_key: "buy".into(),
                    })
                    .await?;
                    r.set_auto_recharge(rpb::SetAutoRechargeRequest {
                        account_id: id.clone(),
                        enabled: true,
                        threshold: "10".into(),
                        target: "50".into(),
                    })
                    .await?;
                    Ok(())
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
    for s in setup {
        s?;
    }
    let mut h = load::histogram();
    let start = Instant::now();
    // Latency is measured on the ledger's own clock: from the crossing entry to the
    // top-up credit entry (both `created_at` of committed rows), so the probe's polling,
    // which only detects completion, does not load the machine it measures.
    let timings: Vec<Result<Duration, String>> =
        futures_util::stream::iter(ids.clone().into_iter().enumerate())
            .map(|(i, id)| {
                let mut l = pool.get(i);
                async move {
                    l.record_usage(usage(id.clone(), "15.01", "cross".into()))
                        .await
                        .map_err(|e| e.to_string())?;
                    let t = Instant::now();
                    loop {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let entries = l
                            .list_entries(lpb::ListEntriesRequest {
                                account_id: id.clone(),
                                page_size: 10,
                                page_token: String::new(),
                            })
                            .await
                            .map_err(|e| e.to_string())?
                            .into_inner()
                            .entries;
                        let at = |e: &lpb::Entry| {
                            e.created_at
                                .as_ref()
                                .map(|t| Duration::new(t.seconds as u64, t.nanos as u32))
                        };
                        let crossing = entries
                            .iter()
                            .find(|e| e.idempotency_key == "cross")
                            .and_then(at);
                        let credit = entries
                            .iter()
                            .find(|e| e.source == lpb::CreditSource::AutoRecharge as i32)
                            .and_then(at);
                        if let (Some(c), Some(t)) = (crossing, credit) {
                            return Ok(t.saturating_sub(c));
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
    let mut p = payments.clone();
    for id in &ids {
        let charges = p
            .list_charges(ppb::ListChargesRequest {
                account_id: id.clone(),
                page_size: 50,
                page_token: String::new(),
            })
            .await?
            .into_inner()
            .charges;
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

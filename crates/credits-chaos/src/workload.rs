//! The workload: prepaid accounts with auto-recharge (some with declining cards, some that
//! switch their default to ACH mid-run), usage from concurrent callers, purchases with
//! reused idempotency keys, replays of acknowledged usage, and threshold changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credits_common::grpc::{AuthChannel, lazy_channel};
use credits_proto::ledger::v1 as lpb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1 as ppb;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use credits_proto::recharge::v1 as rpb;
use credits_proto::recharge::v1::auto_recharge_service_client::AutoRechargeServiceClient;
use lapin::options::BasicPublishOptions;

use crate::Cluster;
use crate::rng::Rng;

#[derive(Clone)]
pub struct Clients {
    pub ledger: LedgerServiceClient<AuthChannel>,
    pub payments: Vec<PaymentsServiceClient<AuthChannel>>,
    pub recharge: Vec<AutoRechargeServiceClient<AuthChannel>>,
}

impl Clients {
    /// Every client sends the cluster's bearer token (`AttachToken`, inside `lazy_channel`).
    pub fn new(c: &Cluster) -> anyhow::Result<Clients> {
        let token = Some(c.token.as_str());
        Ok(Clients {
            ledger: LedgerServiceClient::new(lazy_channel(&c.ledger.url(), token)?),
            payments: c
                .payments
                .iter()
                .map(|p| lazy_channel(&p.url(), token).map(PaymentsServiceClient::new))
                .collect::<Result<_, _>>()?,
            recharge: c
                .recharge
                .iter()
                .map(|r| lazy_channel(&r.url(), token).map(AutoRechargeServiceClient::new))
                .collect::<Result<_, _>>()?,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Good,
    Declining,
    AchSwitcher,
}

#[derive(Clone, Debug)]
pub struct Account {
    pub id: String,
    pub kind: Kind,
    pub bank_method: Option<String>,
}

/// Retries a call through transient failures (the faults have not started yet, but a
/// daemon may still be warming up).
async fn retry<T, F, Fut>(mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..50 {
        match f().await {
            Ok(v) => return Ok(v),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown
                        | tonic::Code::Internal
                ) =>
            {
                last = Some(s);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(s),
        }
    }
    Err(last.unwrap_or_else(|| tonic::Status::unavailable("retries exhausted")))
}

fn card(number: &str) -> Option<ppb::add_payment_method_request::Method> {
    Some(ppb::add_payment_method_request::Method::Card(
        ppb::CardDetails {
            number: number.into(),
            exp_month: 12,
            exp_year: 2034,
            cvc: "123".into(),
        },
    ))
}

pub async fn setup(c: &Clients, n: usize, rng: &mut Rng) -> anyhow::Result<Vec<Account>> {
    let mut out = Vec::new();
    for i in 0..n {
        let kind = match rng.below(10) {
            0 => Kind::Declining,
            1 => Kind::AchSwitcher,
            _ => Kind::Good,
        };
        let id = format!("acct-{i}");
        let (l, p, r) = (
            c.ledger.clone(),
            c.payments[i % 2].clone(),
            c.recharge[i % 2].clone(),
        );
        retry(|| {
            let mut l = l.clone();
            let id = id.clone();
            async move {
                l.create_account(lpb::CreateAccountRequest {
                    account_id: id.clone(),
                    ..Default::default()
                })
                .await
            }
        })
        .await?;
        retry(|| {
            let mut p = p.clone();
            let id = id.clone();
            async move {
                p.add_payment_method(ppb::AddPaymentMethodRequest {
                    account_id: id.clone(),
                    method: card("4242424242424242"),
                    make_default: true,
                })
                .await
            }
        })
        .await?;
        retry(|| {
            let mut p = p.clone();
            let id = id.clone();
            async move {
                p.purchase_credits(ppb::PurchaseCreditsRequest {
                    account_id: id.clone(),
                    amount: "50.00".into(),
                    payment_method_id: String::new(),
                    idempotency_key: "initial".into(),
                })
                .await
            }
        })
        .await?;
        let mut bank_method = None;
        match kind {
            Kind::Declining => {
                retry(|| {
                    let mut p = p.clone();
                    let id = id.clone();
                    async move {
                        p.add_payment_method(ppb::AddPaymentMethodRequest {
                            account_id: id.clone(),
                            method: card("4000000000000002"),
                            make_default: true,
                        })
                        .await
                    }
                })
                .await?;
            }
            Kind::AchSwitcher => {
                let m = retry(|| {
                    let mut p = p.clone();
                    let id = id.clone();
                    async move {
                        p.add_payment_method(ppb::AddPaymentMethodRequest {
                            account_id: id.clone(),
                            method: Some(ppb::add_payment_method_request::Method::UsBankAccount(
                                ppb::UsBankAccountDetails {
                                    routing_number: "110000000".into(),
                                    account_number: "000123456789".into(),
                                    holder_name: "Chaos".into(),
                                },
                            )),
                            make_default: false,
                        })
                        .await
                    }
                })
                .await?;
                bank_method = Some(m.into_inner().payment_method_id);
            }
            Kind::Good => {}
        }
        retry(|| {
            let mut r = r.clone();
            let id = id.clone();
            async move {
                r.set_auto_recharge(rpb::SetAutoRechargeRequest {
                    account_id: id.clone(),
                    enabled: true,
                    threshold: "10".into(),
                    target: "50".into(),
                })
                .await
            }
        })
        .await?;
        out.push(Account {
            id,
            kind,
            bank_method,
        });
    }
    Ok(out)
}

/// What the driver saw.
#[derive(Default, Debug)]
pub struct Report {
    pub usage_acked: usize,
    pub usage_replays_ok: usize,
    pub purchases_ok: usize,
    pub switched_to_ach: usize,
    pub thresholds_set: usize,
    pub errors: HashMap<String, usize>,
    /// (account, idempotency key) of every RecordUsage acknowledged.
    pub acked: Vec<(String, String)>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} usage acknowledged, {} usage replays answered, {} purchases answered, {} accounts switched to ACH, {} threshold changes answered, errors {:?}",
            self.usage_acked,
            self.usage_replays_ok,
            self.purchases_ok,
            self.switched_to_ach,
            self.thresholds_set,
            self.errors
        )
    }
}

pub async fn drive(
    c: Clients,
    accounts: Vec<Account>,
    workers: usize,
    mut rng: Rng,
    until: Instant,
) -> Report {
    let report = Arc::new(Mutex::new(Report::default()));
    let switched = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let accounts = Arc::new(accounts);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (c, accounts, report, switched, mut rng) = (
            c.clone(),
            accounts.clone(),
            report.clone(),
            switched.clone(),
            rng.fork(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut mine: Vec<(String, String, String)> = Vec::new();
            while Instant::now() < until {
                n += 1;
                let acct = &accounts[rng.below(accounts.len() as u64) as usize];
                let roll = rng.below(100);
                let outcome: Result<&'static str, tonic::Status> = if roll < 86 {
                    let amount = format!("{}.{:02}", rng.below(5), rng.below(100));
                    let amount = if amount == "0.00" {
                        "0.01".to_owned()
                    } else {
                        amount
                    };
                    let key = format!("u-{w}-{n}");
                    let mut l = c.ledger.clone();
                    let r = l
                        .record_usage(lpb::RecordUsageRequest {
                            account_id: acct.id.clone(),
                            category: lpb::UsageCategory::ApiRequests as i32,
                            amount: amount.clone(),
                            idempotency_key: key.clone(),
                            description: String::new(),
                        })
                        .await;
                    if r.is_ok() {
                        mine.push((acct.id.clone(), key.clone(), amount));
                        if let Ok(mut rep) = report.lock() {
                            rep.usage_acked += 1;
                            rep.acked.push((acct.id.clone(), key));
                        }
                    }
                    r.map(|_| "usage")
                } else if roll < 92 {
                    // Manual purchases with reused keys: the same key always carries the same amount.
                    let k = rng.below(3);
                    let mut p = c.payments[rng.below(2) as usize].clone();
                    p.purchase_credits(ppb::PurchaseCreditsRequest {
                        account_id: acct.id.clone(),
                        amount: format!("{}.00", 10 + k),
                        payment_method_id: String::new(),
                        idempotency_key: format!("buy-{k}"),
                    })
                    .await
                    .map(|_| "purchase")
                } else if roll < 94 && acct.kind == Kind::AchSwitcher {
                    let first = switched
                        .lock()
                        .map(|mut s| s.insert(acct.id.clone()))
                        .unwrap_or(false);
                    if first {
                        let mut p = c.payments[rng.below(2) as usize].clone();
                        let r = p
                            .set_default_payment_method(ppb::SetDefaultPaymentMethodRequest {
                                account_id: acct.id.clone(),
                                payment_method_id: acct.bank_method.clone().unwrap_or_default(),
                            })
                            .await;
                        if r.is_err()
                            && let Ok(mut s) = switched.lock()
                        {
                            s.remove(&acct.id);
                        }
                        r.map(|_| "switch")
                    } else {
                        Ok("noop")
                    }
                } else if roll == 94 && acct.kind == Kind::Good {
                    // Move the threshold between $10 and $12 through either replica:
                    // concurrent changes, and changes cut by faults, are what can leave
                    // the ledger watching another threshold than the settings hold (7).
                    let mut r = c.recharge[rng.below(2) as usize].clone();
                    r.set_auto_recharge(rpb::SetAutoRechargeRequest {
                        account_id: acct.id.clone(),
                        enabled: true,
                        threshold: if rng.below(2) == 0 { "10" } else { "12" }.into(),
                        target: "50".into(),
                    })
                    .await
                    .map(|_| "threshold")
                } else if let Some((id, key, amount)) = mine
                    .get(rng.below(mine.len().max(1) as u64) as usize)
                    .cloned()
                {
                    // Replay an acknowledged debit: must answer, and must not post twice.
                    let mut l = c.ledger.clone();
                    l.record_usage(lpb::RecordUsageRequest {
                        account_id: id,
                        category: lpb::UsageCategory::ApiRequests as i32,
                        amount,
                        idempotency_key: key,
                        description: String::new(),
                    })
                    .await
                    .map(|_| "replay")
                } else {
                    Ok("noop")
                };
                if let Ok(mut rep) = report.lock() {
                    match outcome {
                        Ok("purchase") => rep.purchases_ok += 1,
                        Ok("replay") => rep.usage_replays_ok += 1,
                        Ok("threshold") => rep.thresholds_set += 1,
                        Ok(_) => {}
                        Err(s) => *rep.errors.entry(format!("{:?}", s.code())).or_default() += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(5 + rng.below(20))).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut rep = std::mem::take(&mut *report.lock().unwrap_or_else(|e| e.into_inner()));
    rep.switched_to_ach = switched.lock().map(|s| s.len()).unwrap_or(0);
    rep
}

/// A message no consumer can parse, published like any event.
pub async fn publish_poison(amqp_url: &str, exchange: &str, key: &str) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    credits_common::amqp::declare_exchange(&ch, exchange).await?;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        b"\x00 chaos poison, not JSON",
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await?
    .await?;
    let _ = conn.close(0, "done".into()).await;
    Ok(())
}

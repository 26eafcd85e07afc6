//! The workload: prepaid accounts with auto-recharge (some with declining cards, some that
//! switch their default to ACH mid-run), usage from concurrent callers, purchases with
//! reused idempotency keys, replays of acknowledged usage, threshold changes, and holds
//! (R15): some captured below, at or above their amount, some released, some left to
//! expire. Refunds of purchases through `RefundCharge` (R27); with Stripe, cards are
//! tokens made at the processor, some need 3-D Secure, and the customer confirms some of
//! the payments that waited for it (R25).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credits_client::{
    AccountId, AutoRechargeChange, BankAccountDetails, BillingMode, CardDetails, Client,
    ClientConfig, ClientError, Code, HoldRequest, IdempotencyKey, Ledger, Money, NewPaymentMethod,
    Payments, Recharge, RetryPolicy, UsageCategory, UsageRecord,
};
use lapin::options::BasicPublishOptions;

use crate::Cluster;

/// Every workload call that failed so far, for a fault to count those refused while it
/// lasted (`--ha`'s failovers).
pub static ERRORS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
use crate::rng::Rng;
use crate::stripe::Api;

#[derive(Clone)]
pub struct Clients {
    /// One per ledger replica; the workload alternates between them.
    pub ledger: Vec<Ledger>,
    pub payments: Vec<Payments>,
    pub recharge: Vec<Recharge>,
}

impl Clients {
    /// One typed client per payments/recharge replica pair, every one sending the
    /// cluster's bearer token. None of them retries (`RetryPolicy::none()`): each call is
    /// sent once, so every failure the faults cause reaches the report's tally. The
    /// ledger facade is the first client's; the others' ledger channels are lazy and never
    /// dialled, so all callers share one ledger connection.
    pub fn new(c: &Cluster) -> anyhow::Result<Clients> {
        anyhow::ensure!(
            !c.payments.is_empty() && c.payments.len() == c.recharge.len(),
            "one recharge replica per payments replica"
        );
        let replicas = c
            .payments
            .iter()
            .zip(&c.recharge)
            .zip(&c.ledger)
            .map(|((p, r), l)| {
                Client::connect(ClientConfig {
                    ledger_url: l.url(),
                    payments_url: p.url(),
                    recharge_url: r.url(),
                    token: Some(c.token.clone()),
                    timeout: credits_client::DEFAULT_TIMEOUT,
                    retry: RetryPolicy::none(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Clients {
            ledger: replicas.iter().map(|r| r.ledger().clone()).collect(),
            payments: replicas.iter().map(|r| r.payments().clone()).collect(),
            recharge: replicas.iter().map(|r| r.recharge().clone()).collect(),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Good,
    Declining,
    AchSwitcher,
    /// Stripe runs (no ACH at the emulator) in the switchers' place: a card whose
    /// off-session payments need 3-D Secure.
    ThreeDs,
}

#[derive(Clone, Debug)]
pub struct Account {
    pub id: AccountId,
    pub kind: Kind,
    pub bank_method: Option<String>,
    /// R18 alert thresholds (such accounts get no holds, so that every crossing is in
    /// the journal for invariant 9).
    pub alerts: Vec<Money>,
    /// R19.
    pub monthly_limit: Option<Money>,
}

/// Alert thresholds of the accounts that have them (every fifth good account).
pub const ALERTS: [&str; 3] = ["40", "25", "5"];
/// The monthly auto-recharge limit of the accounts that have one (every fifth good
/// account): small enough that a 45 s run spends it and skips top-ups.
pub const MONTHLY_LIMIT: &str = "100";

/// Retries a call through transient failures (the faults have not started yet, but a
/// daemon may still be warming up). The harness's own loop, not the client's policy: it
/// also retries `UNKNOWN` and `INTERNAL`, and calls the client sends only once.
async fn retry<T, F, Fut>(mut f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut last = None;
    for _ in 0..50 {
        match f().await {
            Ok(v) => return Ok(v),
            // An answer the client cannot read came from a service that did the work:
            // sending it again would not be retrying a transient failure.
            Err(e @ ClientError::BadResponse { .. }) => return Err(e),
            Err(e)
                if matches!(
                    e.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Internal
                ) =>
            {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Unavailable {
        message: "retries exhausted".into(),
    }))
}

/// Whether the service acknowledged a call: it answered OK, even if the client could not
/// read the answer ([`ClientError::BadResponse`]).
fn acknowledged<T>(r: &Result<T, ClientError>) -> bool {
    matches!(r, Ok(_) | Err(ClientError::BadResponse { .. }))
}

/// The name a failure is tallied under in [`Report::errors`]: its gRPC code as `Debug`
/// spells it (`Unavailable`, `DeadlineExceeded`, …), as before the typed client; an answer
/// the client could not read, which used to count as a success, as `BadResponse`, so it
/// is not mistaken for the server's `Internal`.
fn error_name(e: &ClientError) -> String {
    match e {
        ClientError::BadResponse { .. } => "BadResponse".to_owned(),
        e => format!("{:?}", e.code()),
    }
}

/// A card: its raw details for the sandbox; with Stripe, a token made at the processor
/// (as Stripe.js makes it), since raw details are refused there (R24).
async fn card(stripe: Option<&Api>, number: &str) -> anyhow::Result<NewPaymentMethod> {
    Ok(match stripe {
        Some(api) => NewPaymentMethod::ProcessorToken(api.card(number).await?),
        None => NewPaymentMethod::Card(CardDetails {
            number: number.into(),
            exp_month: 12,
            exp_year: 2034,
            cvc: "123".into(),
        }),
    })
}

fn money(field: &str, s: &str) -> Result<Money, ClientError> {
    Ok(Money::parse_positive(field, s)?)
}

fn key(s: &str) -> Result<IdempotencyKey, ClientError> {
    Ok(IdempotencyKey::parse(s)?)
}

/// Auto-recharge on: below `threshold`, back up to $50, under the account's limit.
fn enable(
    threshold: &str,
    monthly_limit: Option<Money>,
) -> Result<AutoRechargeChange, ClientError> {
    Ok(AutoRechargeChange::Enable {
        threshold: money("threshold", threshold)?,
        target: money("target", "50")?,
        monthly_limit,
    })
}

pub async fn setup(
    c: &Clients,
    n: usize,
    rng: &mut Rng,
    stripe: Option<&Api>,
) -> anyhow::Result<Vec<Account>> {
    let mut out = Vec::new();
    for i in 0..n {
        let kind = match (rng.below(10), stripe) {
            (0, _) => Kind::Declining,
            (1, None) => Kind::AchSwitcher,
            (1, Some(_)) => Kind::ThreeDs,
            _ => Kind::Good,
        };
        let id = AccountId::parse(&format!("acct-{i}"))?;
        let (l, p, r) = (&c.ledger[i % 2], &c.payments[i % 2], &c.recharge[i % 2]);
        let id_ = &id;
        retry(move || l.create_account(id_, BillingMode::Prepaid, "")).await?;
        let good_card = card(stripe, "4242424242424242").await?;
        retry(|| p.add_payment_method(id_, &good_card, true)).await?;
        let (initial, initial_key) = (money("amount", "50.00")?, key("initial")?);
        retry(|| p.purchase_credits(id_, initial, None, &initial_key)).await?;
        let mut bank_method = None;
        match kind {
            Kind::Declining => {
                // Stripe's test card that attaches and then declines every charge.
                let number = if stripe.is_some() {
                    "4000000000000341"
                } else {
                    "4000000000000002"
                };
                let declining = card(stripe, number).await?;
                retry(|| p.add_payment_method(id_, &declining, true)).await?;
            }
            Kind::ThreeDs => {
                let three_ds = card(stripe, "4000002500003155").await?;
                retry(|| p.add_payment_method(id_, &three_ds, true)).await?;
            }
            Kind::AchSwitcher => {
                let bank = NewPaymentMethod::UsBankAccount(BankAccountDetails {
                    routing_number: "110000000".into(),
                    account_number: "000123456789".into(),
                    holder_name: "Chaos".into(),
                });
                let m = retry(|| p.add_payment_method(id_, &bank, false)).await?;
                bank_method = Some(m.payment_method_id);
            }
            Kind::Good => {}
        }
        let (alerts, monthly_limit) = match (kind, i % 5) {
            (Kind::Good, 1) => (
                ALERTS
                    .iter()
                    .map(|t| money("threshold", t))
                    .collect::<Result<Vec<_>, _>>()?,
                None,
            ),
            (Kind::Good, 2) => (Vec::new(), Some(money("monthly_limit", MONTHLY_LIMIT)?)),
            _ => (Vec::new(), None),
        };
        if !alerts.is_empty() {
            let alerts_ = &alerts;
            retry(|| l.set_balance_alerts(id_, alerts_)).await?;
        }
        let on = enable("10", monthly_limit)?;
        retry(|| r.set_auto_recharge(id_, on)).await?;
        out.push(Account {
            id,
            kind,
            bank_method,
            alerts,
            monthly_limit,
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
    pub holds_created: usize,
    /// Holds refused for want of available balance or access (R15): an answer, not a fault.
    pub holds_refused: usize,
    pub holds_captured: usize,
    pub holds_released: usize,
    pub refunds_ok: usize,
    /// Refunds refused for want of balance or of charge left (R27): answers, not faults.
    pub refunds_refused: usize,
    /// Payments that waited for 3-D Secure, confirmed by the customer (R25).
    pub confirmed: usize,
    /// R29: grants answered (most expiring within seconds, racing usage and faults).
    pub grants_ok: usize,
    pub errors: HashMap<String, usize>,
    /// (account, idempotency key) of every RecordUsage acknowledged.
    pub acked: Vec<(String, String)>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} usage acknowledged, {} usage replays answered, {} purchases answered, {} accounts switched to ACH, {} threshold changes answered, holds {} created / {} refused / {} captured / {} released (the rest left to expire), refunds {} made / {} refused, {} payments confirmed after 3-D Secure, {} grants, errors {:?}",
            self.usage_acked,
            self.usage_replays_ok,
            self.purchases_ok,
            self.switched_to_ach,
            self.thresholds_set,
            self.holds_created,
            self.holds_refused,
            self.holds_captured,
            self.holds_released,
            self.refunds_ok,
            self.refunds_refused,
            self.confirmed,
            self.grants_ok,
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
    stripe: Option<Api>,
) -> Report {
    let report = Arc::new(Mutex::new(Report::default()));
    let switched = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let accounts = Arc::new(accounts);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (c, accounts, report, switched, mut rng, stripe) = (
            c.clone(),
            accounts.clone(),
            report.clone(),
            switched.clone(),
            rng.fork(),
            stripe.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            // This worker's acknowledged usage, replayed as sent.
            let mut mine: Vec<UsageRecord> = Vec::new();
            // This worker's holds to end: (account, hold id, how it ends). The ending is
            // fixed at creation, so a repeat after a lost answer asks the same.
            let mut held: Vec<(AccountId, String, Ending)> = Vec::new();
            // This worker's answered purchases: (account, charge id), to refund from.
            let mut bought: Vec<(AccountId, String)> = Vec::new();
            while Instant::now() < until {
                n += 1;
                let acct = &accounts[rng.below(accounts.len() as u64) as usize];
                // Every other step on the other ledger replica: a hold may be created on
                // one and captured on the other, a debit replayed on the other.
                let ledger = &c.ledger[(n % 2) as usize];
                let roll = rng.below(100);
                let outcome: Result<&'static str, ClientError> = if (78..86).contains(&roll) {
                    hold_step(ledger, acct, &mut held, &mut rng, w, n).await
                } else if roll < 86 {
                    let amount = format!("{}.{:02}", rng.below(5), rng.below(100));
                    let amount = if amount == "0.00" {
                        "0.01".to_owned()
                    } else {
                        amount
                    };
                    let key_ = format!("u-{w}-{n}");
                    match (money("amount", &amount), key(&key_)) {
                        (Ok(amount), Ok(idempotency_key)) => {
                            let usage = UsageRecord {
                                account_id: acct.id.clone(),
                                category: UsageCategory::ApiRequests,
                                amount,
                                idempotency_key,
                                description: String::new(),
                            };
                            let r = ledger.record_usage(&usage).await;
                            if acknowledged(&r) {
                                mine.push(usage);
                                if let Ok(mut rep) = report.lock() {
                                    rep.usage_acked += 1;
                                    rep.acked.push((acct.id.to_string(), key_));
                                }
                            }
                            r.map(|_| "usage")
                        }
                        (Err(e), _) | (_, Err(e)) => Err(e),
                    }
                } else if roll < 92 {
                    // Manual purchases with reused keys: the same key always carries the same amount.
                    let k = rng.below(3);
                    let p = &c.payments[rng.below(2) as usize];
                    match (
                        money("amount", &format!("{}.00", 10 + k)),
                        key(&format!("buy-{k}")),
                    ) {
                        (Ok(amount), Ok(reused)) => p
                            .purchase_credits(&acct.id, amount, None, &reused)
                            .await
                            .map(|purchase| {
                                bought.push((acct.id.clone(), purchase.charge.charge_id));
                                "purchase"
                            }),
                        (Err(e), _) | (_, Err(e)) => Err(e),
                    }
                } else if roll == 92 && acct.kind != Kind::AchSwitcher {
                    grant_step(ledger, acct, &mut rng, w, n).await
                } else if roll < 94 && acct.kind == Kind::AchSwitcher {
                    let first = switched
                        .lock()
                        .map(|mut s| s.insert(acct.id.clone()))
                        .unwrap_or(false);
                    if first {
                        let p = &c.payments[rng.below(2) as usize];
                        let r = p
                            .set_default_payment_method(
                                &acct.id,
                                acct.bank_method.as_deref().unwrap_or_default(),
                            )
                            .await;
                        if !acknowledged(&r)
                            && let Ok(mut s) = switched.lock()
                        {
                            s.remove(&acct.id);
                        }
                        r.map(|_| "switch")
                    } else {
                        Ok("noop")
                    }
                } else if roll == 95 && !bought.is_empty() {
                    let (account, charge) = &bought[rng.below(bought.len() as u64) as usize];
                    let p = &c.payments[rng.below(2) as usize];
                    refund_step(p, account, charge, &mut rng, w, n).await
                } else if (96..98).contains(&roll)
                    && acct.kind == Kind::ThreeDs
                    && let Some(api) = &stripe
                {
                    let p = &c.payments[rng.below(2) as usize];
                    confirm_step(p, api, &acct.id).await
                } else if roll == 94 && acct.kind == Kind::Good {
                    // Move the threshold between $10 and $12 through either replica:
                    // concurrent changes, and changes cut by faults, are what can leave
                    // the ledger watching another threshold than the settings hold (7).
                    let r = &c.recharge[rng.below(2) as usize];
                    match enable(
                        if rng.below(2) == 0 { "10" } else { "12" },
                        acct.monthly_limit,
                    ) {
                        Ok(change) => r
                            .set_auto_recharge(&acct.id, change)
                            .await
                            .map(|_| "threshold"),
                        Err(e) => Err(e),
                    }
                } else if let Some(usage) = mine
                    .get(rng.below(mine.len().max(1) as u64) as usize)
                    .cloned()
                {
                    // Replay an acknowledged debit: must answer, and must not post twice.
                    ledger.record_usage(&usage).await.map(|_| "replay")
                } else {
                    Ok("noop")
                };
                if let Ok(mut rep) = report.lock() {
                    match outcome {
                        Ok("purchase") => rep.purchases_ok += 1,
                        Ok("replay") => rep.usage_replays_ok += 1,
                        Ok("threshold") => rep.thresholds_set += 1,
                        Ok("hold") => rep.holds_created += 1,
                        Ok("hold_refused") => rep.holds_refused += 1,
                        Ok("captured") => rep.holds_captured += 1,
                        Ok("released") => rep.holds_released += 1,
                        Ok("refund") => rep.refunds_ok += 1,
                        Ok("refund_refused") => rep.refunds_refused += 1,
                        Ok("confirmed") => rep.confirmed += 1,
                        Ok("grant") => rep.grants_ok += 1,
                        Ok(_) => {}
                        Err(e) => {
                            ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            *rep.errors.entry(error_name(&e)).or_default() += 1
                        }
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

/// R29: a grant of $5–$24 through either replica, three in four expiring 1–8 s from now
/// (so expiries race usage, holds and the faults), the rest never; a lost answer is
/// retried with its key and terms, which must answer the first grant.
async fn grant_step(
    ledger: &credits_client::Ledger,
    acct: &Account,
    rng: &mut Rng,
    w: usize,
    n: u64,
) -> Result<&'static str, ClientError> {
    let expires_at = (rng.below(4) != 0).then(|| {
        chrono::Utc::now() + chrono::Duration::milliseconds(1000 + rng.below(7000) as i64)
    });
    let grant = credits_client::CreditsToGrant {
        account_id: acct.id.clone(),
        amount: money(
            "amount",
            &format!("{}.{:02}", 5 + rng.below(20), rng.below(100)),
        )?,
        idempotency_key: key(&format!("g-{w}-{n}"))?,
        reason: "Chaos grant".into(),
        expires_at,
        priority: rng.below(3) as i32,
    };
    retry(|| ledger.grant_credits(&grant))
        .await
        .map(|_| "grant")
}

/// R27: part of a purchase refunded (a key of its own; a repeat after a lost answer is
/// the client's business, tallied as the failure it was).
async fn refund_step(
    p: &Payments,
    account: &AccountId,
    charge: &str,
    rng: &mut Rng,
    w: usize,
    n: u64,
) -> Result<&'static str, ClientError> {
    let amount = money(
        "amount",
        &format!("{}.{:02}", 1 + rng.below(2), rng.below(100)),
    )?;
    match p
        .refund_charge(
            account,
            charge,
            amount,
            &key(&format!("rf-{w}-{n}"))?,
            "chaos",
        )
        .await
    {
        Ok(_) => Ok("refund"),
        // More than the charge has left, or than the balance holds: an answer.
        Err(ClientError::FailedPrecondition { .. } | ClientError::InvalidArgument { .. }) => {
            Ok("refund_refused")
        }
        Err(e) => Err(e),
    }
}

/// R25: the customer confirms a payment that waited for 3-D Secure — at Stripe (what
/// Stripe.js does on the page), then `ConfirmCharge`.
async fn confirm_step(
    p: &Payments,
    api: &Api,
    account: &AccountId,
) -> Result<&'static str, ClientError> {
    let page = p.list_charges(account, 20, None).await?;
    let Some(waiting) = page
        .items
        .iter()
        .find(|ch| ch.action_required && ch.status == credits_client::ChargeStatus::Failed)
    else {
        return Ok("noop");
    };
    let Some(secret) = waiting.client_secret.as_deref() else {
        return Ok("noop");
    };
    // The intent's id is the client secret's prefix (`pi_…_secret_…`).
    let Some((pi, _)) = secret.split_once("_secret_") else {
        return Ok("noop");
    };
    if api.authenticate(pi, secret).await.is_err() {
        return Ok("noop");
    }
    p.confirm_charge(account, &waiting.charge_id)
        .await
        .map(|_| "confirmed")
}

/// How a chaos hold ends: captured for this amount, released, or left to expire.
#[derive(Clone, Debug)]
enum Ending {
    Capture(Money),
    Release,
}

/// One hold operation: end one of this worker's holds (half the time, when it has one), or
/// create one on `acct` — 1/4 with a 2 s life and never ended (the ledger expires it), the
/// rest to be captured below, at or above the amount, or released.
async fn hold_step(
    ledger: &Ledger,
    acct: &Account,
    held: &mut Vec<(AccountId, String, Ending)>,
    rng: &mut Rng,
    w: usize,
    n: u64,
) -> Result<&'static str, ClientError> {
    if !acct.alerts.is_empty() {
        return Ok("noop");
    }
    if !held.is_empty() && rng.below(2) == 0 {
        let i = rng.below(held.len() as u64) as usize;
        let (account, hold_id, ending) = held[i].clone();
        let r = match &ending {
            Ending::Capture(amount) => ledger
                .capture_hold(&account, &hold_id, *amount, "chaos job")
                .await
                .map(|_| "captured"),
            Ending::Release => ledger
                .release_hold(&account, &hold_id)
                .await
                .map(|_| "released"),
        };
        match &r {
            // Ended (perhaps by expiry first): done with it. A transient failure keeps it,
            // to be asked again the same way.
            Ok(_) | Err(ClientError::FailedPrecondition { .. }) => {
                held.swap_remove(i);
            }
            Err(_) => {}
        }
        return match r {
            Err(ClientError::FailedPrecondition { .. }) => Ok("noop"),
            r => r,
        };
    }
    let cents = 100 + rng.below(500);
    let amount = money("amount", &format!("{}.{:02}", cents / 100, cents % 100))?;
    let expire = rng.below(4) == 0;
    let req = HoldRequest {
        account_id: acct.id.clone(),
        amount,
        category: UsageCategory::FineTuning,
        idempotency_key: key(&format!("h-{w}-{n}"))?,
        description: "chaos job".into(),
        ttl_seconds: Some(if expire { 2 } else { 600 }),
    };
    match ledger.create_hold(&req).await {
        Ok(h) => {
            if !expire {
                let ending = match rng.below(4) {
                    0 => Ending::Release,
                    1 => Ending::Capture(amount),
                    2 => Ending::Capture(money("amount", &format!("0.{:02}", 1 + rng.below(99)))?),
                    _ => Ending::Capture(amount + money("amount", "1.25")?),
                };
                held.push((acct.id.clone(), h.hold_id, ending));
            }
            Ok("hold")
        }
        Err(ClientError::FailedPrecondition { .. }) => Ok("hold_refused"),
        Err(e) => Err(e),
    }
}

/// A message no consumer can parse, published like any event.
pub async fn publish_poison(amqp_url: &str, exchange: &str, key: &str) -> anyhow::Result<()> {
    let conn = credits_common::amqp::connect(amqp_url, "credits-chaos").await?;
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

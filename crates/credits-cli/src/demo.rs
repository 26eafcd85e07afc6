//! `credits demo`: the product's story end to end against a running system — buy credits,
//! turn on auto-recharge, burn usage past the threshold, watch exactly one top-up land,
//! reserve a fine-tuning job with a hold and watch the top-up it triggers land before the
//! job's capture, then make a bank account the default and watch auto-recharge turn itself
//! off.

#![allow(clippy::print_stdout)] // the story is this command's output

use std::time::Duration;

use credits_client::{
    AccountId, AttemptStatus, AutoRechargeChange, BankAccountDetails, BillingMode, CardDetails,
    Client, ClientError, HoldRequest, IdempotencyKey, Money, NewPaymentMethod, UsageCategory,
    UsageRecord,
};

use crate::output::{self, Out};

const WAIT: Duration = Duration::from_secs(30);

async fn poll<T, F, Fut>(what: &str, mut f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, ClientError>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ClientError::DeadlineExceeded {
                message: format!("demo: gave up waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A demo amount; the literals below are valid, so this never fails.
fn dollars(s: &str) -> Result<Money, ClientError> {
    Ok(Money::parse_non_negative("amount", s)?)
}

pub async fn run(c: &Client, account: Option<String>) -> Result<(), ClientError> {
    let table = Out { json: false };
    let id = account
        .unwrap_or_else(|| format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let acct = AccountId::parse(&id)?;
    let key = |k: &str| IdempotencyKey::parse(&format!("demo-{id}-{k}"));

    let a = c
        .ledger()
        .create_account(&acct, BillingMode::Prepaid, "Demo Co")
        .await?;
    println!(
        "1. Created prepaid account {id}: balance {}, access {} (no free trial, R3)",
        a.balance, a.access
    );

    let card = c
        .payments()
        .add_payment_method(
            &acct,
            &NewPaymentMethod::Card(CardDetails {
                number: "4242424242424242".into(),
                exp_month: 12,
                exp_year: 2034,
                cvc: "123".into(),
            }),
            true,
        )
        .await?;
    println!(
        "2. Added card {} ****{} as the default payment method",
        card.brand, card.last4
    );

    let p = c
        .payments()
        .purchase_credits(&acct, dollars("25.00")?, None, &key("buy")?)
        .await?;
    let access = c.ledger().check_access(&acct).await?;
    println!(
        "3. Bought $25.00 (charge {}): balance {}, API access allowed: {}",
        p.charge.charge_id,
        p.balance.map(|b| b.to_wire()).unwrap_or_default(),
        access.allowed
    );

    let s = c
        .recharge()
        .set_auto_recharge(
            &acct,
            AutoRechargeChange::Enable {
                threshold: dollars("10")?,
                target: dollars("50")?,
                monthly_limit: None,
            },
        )
        .await?;
    let shown = |m: Option<Money>| m.map(|m| m.to_wire()).unwrap_or_default();
    println!(
        "4. Auto-recharge on: when the balance goes below ${}, bring it back up to ${}",
        shown(s.threshold),
        shown(s.target)
    );

    let mut balance = String::new();
    for (i, amount) in ["5.00", "5.00", "5.01"].iter().enumerate() {
        let u = c
            .ledger()
            .record_usage(&UsageRecord {
                account_id: acct.clone(),
                category: UsageCategory::ApiRequests,
                amount: dollars(amount)?,
                idempotency_key: key(&format!("usage-{i}"))?,
                description: "demo traffic".into(),
            })
            .await?;
        balance = u.balance.to_wire();
    }
    println!("5. Recorded $15.01 of API usage: balance {balance}, below the $10.00 threshold");

    let recharge = c.recharge().clone();
    let attempt = poll("the top-up", || {
        let (r, acct) = (recharge.clone(), acct.clone());
        async move {
            let page = r.list_recharge_attempts(&acct, 10, None).await?;
            Ok(page.items.into_iter().find(|a| {
                matches!(
                    a.status,
                    AttemptStatus::Succeeded | AttemptStatus::Failed | AttemptStatus::Skipped
                )
            }))
        }
    })
    .await?;
    let account = c.ledger().get_account(&acct).await?;
    println!(
        "6. Auto-recharge charged the card once: ${} (attempt {}, charge {}); balance now {}",
        attempt.amount,
        attempt.attempt_id,
        attempt.charge_id.as_deref().unwrap_or_default(),
        account.balance
    );
    let charges = c.payments().list_charges(&acct, 10, None).await?;
    println!("\n   Charges:");
    table.list(
        &charges.items.iter().map(output::charge).collect::<Vec<_>>(),
        &["charge_id", "status", "amount", "description"],
    );
    let attempts = c.recharge().list_recharge_attempts(&acct, 10, None).await?;
    println!("\n   Recharge attempts:");
    table.list(
        &attempts
            .items
            .iter()
            .map(output::attempt)
            .collect::<Vec<_>>(),
        &["attempt_id", "status", "balance_at_trigger", "amount"],
    );

    // R15/R17: a fine-tuning job is reserved before it runs; the hold takes the available
    // balance below the threshold, so the top-up lands before the job is priced.
    let hold = c
        .ledger()
        .create_hold(&HoldRequest {
            account_id: acct.clone(),
            amount: dollars("45.00")?,
            category: UsageCategory::FineTuning,
            idempotency_key: key("fine-tune")?,
            description: "fine-tuning job ft-demo".into(),
            ttl_seconds: None,
        })
        .await?;
    let held = c.ledger().get_account(&acct).await?;
    println!(
        "\n7. Reserved $45.00 for a fine-tuning job (hold {}): balance {}, held {}, available {}",
        hold.hold_id, held.balance, held.held, held.available_balance
    );
    let top_up = poll("the top-up for the hold", || {
        let (r, acct) = (recharge.clone(), acct.clone());
        async move {
            let page = r.list_recharge_attempts(&acct, 10, None).await?;
            let done = page
                .items
                .iter()
                .filter(|a| {
                    matches!(
                        a.status,
                        AttemptStatus::Succeeded | AttemptStatus::Failed | AttemptStatus::Skipped
                    )
                })
                .count();
            Ok((done >= 2).then(|| page.items.into_iter().next()).flatten())
        }
    })
    .await?;
    let topped = c.ledger().get_account(&acct).await?;
    println!(
        "8. The hold crossed the threshold: auto-recharge charged ${} (target − available, R17); balance {}, available {}",
        top_up.amount, topped.balance, topped.available_balance
    );
    let captured = c
        .ledger()
        .capture_hold(
            &acct,
            &hold.hold_id,
            dollars("43.20")?,
            "fine-tuning job ft-demo: 4.32M tokens",
        )
        .await?;
    println!(
        "9. The job finished and cost $43.20: captured as usage entry {}; balance {}, available {}",
        captured.entry.entry_id, captured.balance, captured.available_balance
    );

    let bank = c
        .payments()
        .add_payment_method(
            &acct,
            &NewPaymentMethod::UsBankAccount(BankAccountDetails {
                routing_number: "110000000".into(),
                account_number: "000123456789".into(),
                holder_name: "Demo Co".into(),
            }),
            true,
        )
        .await?;
    println!(
        "\n10. Made bank account ****{} (ACH) the default payment method",
        bank.last4
    );
    let settings = poll("auto-recharge to turn off", || {
        let (r, acct) = (recharge.clone(), acct.clone());
        async move {
            let s = r.get_auto_recharge(&acct).await?;
            Ok((!s.enabled).then_some(s))
        }
    })
    .await?;
    println!(
        "11. Auto-recharge turned itself off: enabled={}, reason {} (R10: cards only)",
        settings.enabled, settings.disabled_reason
    );
    let last = c.ledger().get_account(&acct).await?;
    println!(
        "\nDemo complete for account {id}: final balance {}",
        last.balance
    );
    Ok(())
}

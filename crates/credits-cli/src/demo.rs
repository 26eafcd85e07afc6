//! `credits demo`: the product's story end to end against a running system — buy credits,
//! turn on auto-recharge, burn usage past the threshold, watch exactly one top-up land,
//! then make a bank account the default and watch auto-recharge turn itself off.

#![allow(clippy::print_stdout)] // the story is this command's output

use std::time::Duration;

use credits_proto::ledger::v1 as lpb;
use credits_proto::payments::v1 as ppb;
use credits_proto::recharge::v1 as rpb;

use crate::ops::Clients;
use crate::output::{self, Out};

const WAIT: Duration = Duration::from_secs(30);

async fn poll<T, F, Fut>(what: &str, mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(tonic::Status::deadline_exceeded(format!(
                "demo: gave up waiting for {what}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(c: &mut Clients, account: Option<String>) -> Result<(), tonic::Status> {
    let table = Out { json: false };
    let id = account
        .unwrap_or_else(|| format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let key = |k: &str| format!("demo-{id}-{k}");

    let a = c
        .ledger
        .create_account(lpb::CreateAccountRequest {
            account_id: id.clone(),
            billing_mode: lpb::BillingMode::Prepaid as i32,
            display_name: "Demo Co".into(),
        })
        .await?
        .into_inner();
    println!(
        "1. Created prepaid account {id}: balance {}, access {} (no free trial, R3)",
        a.balance,
        output::account(&a)["access"].as_str().unwrap_or("")
    );

    let card = c
        .payments
        .add_payment_method(ppb::AddPaymentMethodRequest {
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
        .await?
        .into_inner();
    println!(
        "2. Added card {} ****{} as the default payment method",
        card.brand, card.last4
    );

    let p = c
        .payments
        .purchase_credits(ppb::PurchaseCreditsRequest {
            account_id: id.clone(),
            amount: "25.00".into(),
            payment_method_id: String::new(),
            idempotency_key: key("buy"),
        })
        .await?
        .into_inner();
    let access = c
        .ledger
        .check_access(lpb::CheckAccessRequest {
            account_id: id.clone(),
        })
        .await?
        .into_inner();
    println!(
        "3. Bought $25.00 (charge {}): balance {}, API access allowed: {}",
        p.charge.map(|c| c.charge_id).unwrap_or_default(),
        p.balance,
        access.allowed
    );

    let s = c
        .recharge
        .set_auto_recharge(rpb::SetAutoRechargeRequest {
            account_id: id.clone(),
            enabled: true,
            threshold: "10".into(),
            target: "50".into(),
        })
        .await?
        .into_inner();
    println!(
        "4. Auto-recharge on: when the balance goes below ${}, bring it back up to ${}",
        s.threshold, s.target
    );

    let mut balance = String::new();
    for (i, amount) in ["5.00", "5.00", "5.01"].iter().enumerate() {
        let u = c
            .ledger
            .record_usage(lpb::RecordUsageRequest {
                account_id: id.clone(),
                category: lpb::UsageCategory::ApiRequests as i32,
                amount: (*amount).into(),
                idempotency_key: key(&format!("usage-{i}")),
                description: "demo traffic".into(),
            })
            .await?
            .into_inner();
        balance = u.balance;
    }
    println!("5. Recorded $15.01 of API usage: balance {balance}, below the $10.00 threshold");

    let recharge = c.recharge.clone();
    let attempt = poll("the top-up", || {
        let mut r = recharge.clone();
        let id = id.clone();
        async move {
            let list = r
                .list_recharge_attempts(rpb::ListRechargeAttemptsRequest {
                    account_id: id,
                    page_size: 10,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            Ok(list.attempts.into_iter().find(|a| {
                a.status == rpb::AttemptStatus::Succeeded as i32
                    || a.status == rpb::AttemptStatus::Failed as i32
            }))
        }
    })
    .await?;
    let account = c
        .ledger
        .get_account(lpb::GetAccountRequest {
            account_id: id.clone(),
        })
        .await?
        .into_inner();
    println!(
        "6. Auto-recharge charged the card once: ${} (attempt {}, charge {}); balance now {}",
        attempt.amount, attempt.attempt_id, attempt.charge_id, account.balance
    );
    let charges = c
        .payments
        .list_charges(ppb::ListChargesRequest {
            account_id: id.clone(),
            page_size: 10,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    println!("\n   Charges:");
    table.list(
        &charges
            .charges
            .iter()
            .map(output::charge)
            .collect::<Vec<_>>(),
        &["charge_id", "status", "amount", "description"],
    );
    let attempts = c
        .recharge
        .list_recharge_attempts(rpb::ListRechargeAttemptsRequest {
            account_id: id.clone(),
            page_size: 10,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    println!("\n   Recharge attempts:");
    table.list(
        &attempts
            .attempts
            .iter()
            .map(output::attempt)
            .collect::<Vec<_>>(),
        &["attempt_id", "status", "balance_at_trigger", "amount"],
    );

    let bank = c
        .payments
        .add_payment_method(ppb::AddPaymentMethodRequest {
            account_id: id.clone(),
            method: Some(ppb::add_payment_method_request::Method::UsBankAccount(
                ppb::UsBankAccountDetails {
                    routing_number: "110000000".into(),
                    account_number: "000123456789".into(),
                    holder_name: "Demo Co".into(),
                },
            )),
            make_default: true,
        })
        .await?
        .into_inner();
    println!(
        "\n7. Made bank account ****{} (ACH) the default payment method",
        bank.last4
    );
    let settings = poll("auto-recharge to turn off", || {
        let mut r = recharge.clone();
        let id = id.clone();
        async move {
            let s = r
                .get_auto_recharge(rpb::GetAutoRechargeRequest { account_id: id })
                .await?
                .into_inner();
            Ok((!s.enabled).then_some(s))
        }
    })
    .await?;
    println!(
        "8. Auto-recharge turned itself off: enabled={}, reason {} (R10: cards only)",
        settings.enabled,
        output::auto_recharge(&settings)["disabled_reason"]
            .as_str()
            .unwrap_or("")
    );
    println!(
        "\nDemo complete for account {id}: final balance {}",
        account.balance
    );
    Ok(())
}

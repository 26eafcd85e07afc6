//! The product's first minutes through the typed client: connect, create a prepaid
//! account, add a card, buy credits, record usage, check access.
//!
//! ```text
//! credits up &                                  # the three daemons on their default ports
//! cargo run -p credits-client --example usage   # CREDITS_LEDGER_URL etc. to point elsewhere
//! ```

#![allow(clippy::print_stdout)] // an example prints what it does

use credits_client::{
    AccountId, BillingMode, CardDetails, Client, ClientConfig, IdempotencyKey, Money,
    NewPaymentMethod, UsageCategory, UsageRecord,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = |name: &str, default: String| std::env::var(name).unwrap_or(default);
    let local = ClientConfig::local();
    let client = Client::connect(ClientConfig {
        ledger_url: env("CREDITS_LEDGER_URL", local.ledger_url.clone()),
        payments_url: env("CREDITS_PAYMENTS_URL", local.payments_url.clone()),
        recharge_url: env("CREDITS_RECHARGE_URL", local.recharge_url.clone()),
        token: std::env::var("CREDITS_AUTH_TOKEN").ok(),
        ..local
    })?;

    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let acct = AccountId::parse(&format!("example-{run}"))?;
    let key = |k: &str| IdempotencyKey::parse(&format!("example-{run}-{k}"));

    let account = client
        .ledger()
        .create_account(&acct, BillingMode::Prepaid, "Example Co")
        .await?;
    println!(
        "created {}: balance {}, access {} (R3: no free trial)",
        account.account_id, account.balance, account.access
    );

    let card = client
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
    println!("added {} ****{} as the default", card.brand, card.last4);

    let bought = client
        .payments()
        .purchase_credits(
            &acct,
            Money::parse_positive("amount", "25.00")?,
            None,
            &key("buy")?,
        )
        .await?;
    println!(
        "bought $25.00: charge {} {}, balance {}",
        bought.charge.charge_id,
        bought.charge.status,
        bought.balance.map(|b| b.to_wire()).unwrap_or_default()
    );

    let used = client
        .ledger()
        .record_usage(&UsageRecord {
            account_id: acct.clone(),
            category: UsageCategory::ApiRequests,
            amount: Money::parse_positive("amount", "1.25")?,
            idempotency_key: key("usage-1")?,
            description: "example traffic".into(),
        })
        .await?;
    println!("recorded $1.25 of usage: balance {}", used.balance);

    let access = client.ledger().check_access(&acct).await?;
    println!(
        "access {}: API calls allowed: {}",
        access.access, access.allowed
    );

    let entries = client.ledger().list_entries(&acct, 10, None).await?;
    for e in &entries.items {
        println!(
            "  {} {:<13} {:>10}  balance after {}",
            e.kind.as_str(),
            e.kind.detail(),
            e.amount,
            e.balance_after
        );
    }
    Ok(())
}

//! Real money through Stripe (R23-R27): the payments daemon with its Stripe connector,
//! against `localstripe` (a third-party Stripe emulator started per test), a real ledger,
//! PostgreSQL and RabbitMQ.
//!
//! Where the emulator cannot show a path — refunds made in Stripe's dashboard and disputes
//! (it sends no `charge.*` events and has no `/v1/disputes`) — the test posts the event
//! itself, signed with the endpoint's secret, as `stripe trigger` does; each such test says
//! so. The emulator answers a 3-D Secure card with `requires_action` (Stripe answers 402
//! `authentication_required`): both are mapped to the same outcome (unit tests in
//! `stripe.rs` cover Stripe's form).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use credits_proto::ledger::v1 as lpb;
use credits_proto::payments::v1 as ppb;
use credits_tests::stripe::{LocalStripe, event, post_raw};
use credits_tests::*;
use serde_json::json;
use tonic::Code;

struct World {
    stripe: LocalStripe,
    ledger: Ledger,
    payments: Payments,
    webhook_url: String,
}

impl World {
    async fn start() -> World {
        let stripe = LocalStripe::start().await;
        let ledger = Ledger::start().await;
        let payments = Payments::start(PaymentsOptions {
            stripe: Some(stripe.config()),
            ..PaymentsOptions::for_ledger(&ledger)
        })
        .await;
        let webhook_url = format!(
            "http://{}/webhooks/stripe",
            payments
                .http_addr
                .expect("payments serves webhooks with Stripe")
        );
        stripe.send_webhooks_to(&webhook_url).await;
        World {
            stripe,
            ledger,
            payments,
            webhook_url,
        }
    }

    async fn account(&self, id: &str) {
        let mut l = self.ledger.client().await;
        l.create_account(lpb::CreateAccountRequest {
            account_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    /// The customer's browser gives `number` to Stripe; payments gets the `pm_…`.
    async fn add_card(&self, id: &str, number: &str) -> ppb::PaymentMethod {
        let pm = self.stripe.card(number).await;
        self.payments
            .client()
            .await
            .add_payment_method(ppb::AddPaymentMethodRequest {
                account_id: id.into(),
                processor_token: pm,
                make_default: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn buy(&self, id: &str, amount: &str, key: &str) -> ppb::PurchaseCreditsResponse {
        self.payments
            .client()
            .await
            .purchase_credits(ppb::PurchaseCreditsRequest {
                account_id: id.into(),
                amount: amount.into(),
                idempotency_key: key.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn entries(&self, id: &str) -> Vec<lpb::Entry> {
        self.ledger
            .client()
            .await
            .list_entries(lpb::ListEntriesRequest {
                account_id: id.into(),
                page_size: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries
    }

    async fn balance(&self, id: &str) -> String {
        self.ledger
            .client()
            .await
            .get_account(lpb::GetAccountRequest {
                account_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .balance
    }

    async fn charge(&self, id: &str, charge_id: &str) -> ppb::Charge {
        self.payments
            .client()
            .await
            .get_charge(ppb::GetChargeRequest {
                account_id: id.into(),
                charge_id: charge_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn refund(
        &self,
        charge_id: &str,
        amount: &str,
        key: &str,
    ) -> Result<ppb::Refund, tonic::Status> {
        self.payments
            .client()
            .await
            .refund_charge(ppb::RefundChargeRequest {
                account_id: "acme".into(),
                charge_id: charge_id.into(),
                amount: amount.into(),
                idempotency_key: key.into(),
                reason: String::new(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// "acme" with a Visa added through Stripe and $25 bought; the purchase's charge id.
    async fn funded(&self) -> String {
        self.account("acme").await;
        self.add_card("acme", "4242424242424242").await;
        self.buy("acme", "25.00", "buy-1")
            .await
            .charge
            .unwrap()
            .charge_id
    }

    /// The refunds Stripe holds for an intent.
    async fn refunds_at_stripe(&self, pi: &serde_json::Value) -> Vec<serde_json::Value> {
        let path = format!("/v1/refunds?payment_intent={}", pi["id"].as_str().unwrap());
        self.stripe.get(&path).await["data"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Usage of `amount` on "acme" (key `key`).
    async fn spend(&self, amount: &str, key: &str) {
        self.ledger
            .client()
            .await
            .record_usage(lpb::RecordUsageRequest {
                account_id: "acme".into(),
                category: lpb::UsageCategory::ApiRequests as i32,
                amount: amount.into(),
                idempotency_key: key.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn processor_events(&self) -> i64 {
        let mut db = self.payments.db().await;
        sqlx::query_scalar("SELECT count(*) FROM processor_events")
            .fetch_one(&mut db)
            .await
            .unwrap()
    }

    /// The emulator's PaymentIntent for our charge, found by the metadata we sent.
    async fn intent_of(&self, charge_id: &str) -> serde_json::Value {
        let list = self.stripe.get("/v1/payment_intents?limit=100").await;
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|pi| pi["metadata"]["charge_id"] == charge_id)
            .cloned()
            .unwrap_or_else(|| panic!("no PaymentIntent for {charge_id}: {list}"))
    }

    async fn stop(self) {
        self.payments.stop().await;
        self.ledger.stop().await;
    }
}

/// The processor charge (`ch_…`) of an intent (`latest_charge`: an id or the object).
fn latest_charge(pi: &serde_json::Value) -> String {
    let c = &pi["latest_charge"];
    c["id"].as_str().or(c.as_str()).unwrap().to_owned()
}

fn kinds(entries: &[lpb::Entry], kind: lpb::EntryKind) -> Vec<&lpb::Entry> {
    entries.iter().filter(|e| e.kind == kind as i32).collect()
}

async fn eventually<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within 10 s: {what}");
}

#[tokio::test]
async fn a_purchase_is_charged_through_stripe_and_credited_once_r23_r24_r25() {
    let w = World::start().await;
    w.account("acme").await;
    // What the billing page's Stripe.js needs.
    let si = w
        .payments
        .client()
        .await
        .create_setup_intent(ppb::CreateSetupIntentRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        si.client_secret.starts_with("seti_"),
        "{}",
        si.client_secret
    );
    assert_eq!(si.publishable_key, credits_tests::stripe::PUBLISHABLE_KEY);

    let pm = w.add_card("acme", "4242424242424242").await;
    assert_eq!((pm.brand.as_str(), pm.last4.as_str()), ("visa", "4242"));
    assert_eq!((pm.exp_month, pm.exp_year), (12, 2031));
    assert!(pm.is_default);
    // One processor customer per account, created once, and the card is attached to it.
    let mut db = w.payments.db().await;
    let customers: Vec<(String,)> =
        sqlx::query_as("SELECT customer_id FROM processor_customers WHERE account_id = 'acme'")
            .fetch_all(&mut db)
            .await
            .unwrap();
    assert_eq!(customers.len(), 1);
    let second = w.add_card("acme", "5555555555554444").await;
    // (The emulator calls every card a Visa; Stripe says `mastercard` here.)
    assert_eq!(second.last4, "4444");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM processor_customers")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(count, 1, "the second card reuses the account's customer");

    let p = w.buy("acme", "25.00", "buy-1").await;
    let charge = p.charge.unwrap();
    assert_eq!(
        charge.status,
        ppb::ChargeStatus::Succeeded as i32,
        "{charge:?}"
    );
    assert_eq!(p.balance, "25.00");
    let pi = w.intent_of(&charge.charge_id).await;
    assert_eq!(pi["amount"], 2500);
    assert_eq!(pi["status"], "succeeded");
    assert_eq!(pi["customer"], customers[0].0.as_str());
    assert!(pi["payment_method"].as_str().unwrap().starts_with("pm_"));

    // The emulator's payment_intent.succeeded webhook arrives after the answer: recorded,
    // and it credits nothing more.
    eventually("the webhook is recorded", || async {
        w.processor_events().await >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let entries = w.entries("acme").await;
    assert_eq!(
        kinds(&entries, lpb::EntryKind::Credit).len(),
        1,
        "{entries:?}"
    );
    assert_eq!(w.balance("acme").await, "25.00");
    // The same key again: the same charge, no second PaymentIntent.
    let again = w.buy("acme", "25.00", "buy-1").await;
    assert_eq!(again.charge.unwrap().charge_id, charge.charge_id);
    let list = w.stripe.get("/v1/payment_intents?limit=100").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    w.stop().await;
}

#[tokio::test]
async fn card_data_and_foreign_tokens_are_refused_and_change_nothing_r24() {
    let w = World::start().await;
    w.account("acme").await;
    w.account("evil").await;
    let theirs = w.add_card("acme", "4242424242424242").await;
    let mut c = w.payments.client().await;
    let raw = ppb::AddPaymentMethodRequest {
        account_id: "evil".into(),
        method: Some(ppb::add_payment_method_request::Method::Card(
            ppb::CardDetails {
                number: "4242424242424242".into(),
                exp_month: 12,
                exp_year: 2031,
                cvc: "123".into(),
            },
        )),
        ..Default::default()
    };
    let e = c.add_payment_method(raw.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("processor_token"), "{}", e.message());
    // A token of another customer's card (acme's, attached to acme's customer).
    let mut db = w.payments.db().await;
    let acme_token: String =
        sqlx::query_scalar("SELECT processor_token FROM payment_methods WHERE account_id = 'acme'")
            .fetch_one(&mut db)
            .await
            .unwrap();
    let stolen = c
        .add_payment_method(ppb::AddPaymentMethodRequest {
            account_id: "evil".into(),
            processor_token: acme_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), Code::InvalidArgument, "{stolen:?}");
    assert!(
        stolen.message().contains("another customer"),
        "{}",
        stolen.message()
    );
    for (token, why) in [
        ("pm_doesnotexist", "unknown"),
        ("pm_1/../../v1/customers", "path"),
        ("pm_1?expand=x", "query"),
    ] {
        let e = c
            .add_payment_method(ppb::AddPaymentMethodRequest {
                account_id: "evil".into(),
                processor_token: token.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{why}: {e:?}");
    }
    // Both a token and card details.
    let both = c
        .add_payment_method(ppb::AddPaymentMethodRequest {
            processor_token: "pm_x".into(),
            ..raw
        })
        .await
        .unwrap_err();
    assert_eq!(both.code(), Code::InvalidArgument);
    let evil_methods: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payment_methods WHERE account_id = 'evil'")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(
        evil_methods, 0,
        "nothing was stored for the refused requests"
    );
    let _ = theirs;
    w.stop().await;
}

#[tokio::test]
async fn a_declined_card_fails_the_purchase_with_the_processors_reason_r25() {
    let w = World::start().await;
    w.account("acme").await;
    // Attaches fine, declines when charged.
    w.add_card("acme", "4000000000000341").await;
    let p = w.buy("acme", "25.00", "buy-1").await;
    let charge = p.charge.unwrap();
    assert_eq!(charge.status, ppb::ChargeStatus::Failed as i32);
    assert_eq!(charge.failure_code, "card_declined");
    assert!(p.entry.is_none());
    assert_eq!(w.balance("acme").await, "0.00");
    // Declined at the customer's bank when added: refused, nothing stored.
    let pm = w.stripe.card("4000000000000002").await;
    let e = w
        .payments
        .client()
        .await
        .add_payment_method(ppb::AddPaymentMethodRequest {
            account_id: "acme".into(),
            processor_token: pm,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    w.stop().await;
}

#[tokio::test]
async fn a_purchase_the_bank_wants_confirmed_is_credited_once_after_the_customer_confirms_r25() {
    let w = World::start().await;
    w.account("acme").await;
    w.add_card("acme", "4000002500003155").await;
    let tap = EventTap::bind(&w.ledger.exchange, "payments.charge.#").await;
    let p = w.buy("acme", "25.00", "buy-3ds").await;
    let charge = p.charge.unwrap();
    assert_eq!(charge.status, ppb::ChargeStatus::Failed as i32);
    assert_eq!(charge.failure_code, "authentication_required");
    assert!(charge.action_required);
    assert!(charge.client_secret.contains("_secret_"), "{charge:?}");
    assert_eq!(w.balance("acme").await, "0.00");
    let mut tap = tap;
    let ev = tap
        .expect("payments.charge.action_required", Duration::from_secs(10))
        .await;
    assert_eq!(ev["data"]["charge_id"], charge.charge_id.as_str());
    // Not confirmed yet: refused, nothing changes.
    let mut c = w.payments.client().await;
    let early = c
        .confirm_charge(ppb::ConfirmChargeRequest {
            account_id: "acme".into(),
            charge_id: charge.charge_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");
    // The customer confirms on-session (what Stripe.js confirmCardPayment does).
    let pi = w.intent_of(&charge.charge_id).await;
    w.stripe
        .post(
            &format!(
                "/v1/payment_intents/{}/_authenticate",
                pi["id"].as_str().unwrap()
            ),
            &[
                ("client_secret", &charge.client_secret),
                ("success", "true"),
            ],
        )
        .await;
    let confirmed = c
        .confirm_charge(ppb::ConfirmChargeRequest {
            account_id: "acme".into(),
            charge_id: charge.charge_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirmed.status, ppb::ChargeStatus::Succeeded as i32);
    assert!(!confirmed.action_required && confirmed.client_secret.is_empty());
    // The webhook for the same payment arrives too (and a second confirmation): one credit.
    eventually("the succeeded webhook is acted on", || async {
        let mut db = w.payments.db().await;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM processor_events WHERE type = 'payment_intent.succeeded' AND processed_at IS NOT NULL",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        n == 1
    })
    .await;
    c.confirm_charge(ppb::ConfirmChargeRequest {
        account_id: "acme".into(),
        charge_id: charge.charge_id.clone(),
    })
    .await
    .unwrap();
    let entries = w.entries("acme").await;
    let credits = kinds(&entries, lpb::EntryKind::Credit);
    assert_eq!(credits.len(), 1, "{entries:?}");
    assert_eq!(credits[0].reference, charge.charge_id);
    assert_eq!(w.balance("acme").await, "25.00");
    w.stop().await;
}

#[tokio::test]
async fn webhooks_that_do_not_verify_get_400_and_change_nothing_r26() {
    let w = World::start().await;
    let charge_id = w.funded().await;
    let pi = w.intent_of(&charge_id).await;
    let ch = latest_charge(&pi);
    eventually("the emulator's own webhooks are recorded", || async {
        let mut db = w.payments.db().await;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM processor_events WHERE type = 'payment_intent.succeeded'",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        n == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let recorded = w.processor_events().await;
    // A refund of the whole charge, made "in the dashboard" (the emulator sends no
    // charge.refunded; the event is posted by the test).
    w.stripe
        .post(
            "/v1/refunds",
            &[
                ("payment_intent", pi["id"].as_str().unwrap()),
                ("amount", "1000"),
            ],
        )
        .await;
    let refunded = event(
        "evt_forged_1",
        "charge.refunded",
        json!({"id": ch, "object": "charge"}),
    );
    let body = serde_json::to_vec(&refunded).unwrap();
    let now = chrono::Utc::now().timestamp();
    let good = credits_payments::stripe::sign(
        credits_tests::stripe::WEBHOOK_SECRET.as_bytes(),
        now,
        &body,
    );
    let forged = credits_payments::stripe::sign(b"whsec_not_ours", now, &body);
    let stale = credits_payments::stripe::sign(
        credits_tests::stripe::WEBHOOK_SECRET.as_bytes(),
        now - 301,
        &body,
    );
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    for (sig, b, why) in [
        (None, &body, "no signature"),
        (Some(forged.as_str()), &body, "another secret"),
        (Some(stale.as_str()), &body, "older than 300 s"),
        (Some(good.as_str()), &tampered, "body changed after signing"),
        (Some("t=1,v1=zz"), &body, "garbage"),
    ] {
        assert_eq!(post_raw(&w.webhook_url, b, sig).await, 400, "{why}");
    }
    assert_eq!(
        w.processor_events().await,
        recorded,
        "nothing recorded for refused requests"
    );
    assert_eq!(w.balance("acme").await, "25.00", "nothing debited");
    // Signed with two v1 values (Stripe rolling its secret), one of them ours: accepted.
    let two = format!("{},v1={}", forged, &good[good.find("v1=").unwrap() + 3..]);
    assert_eq!(post_raw(&w.webhook_url, &body, Some(&two)).await, 200);
    assert_eq!(w.balance("acme").await, "15.00");
    w.stop().await;
}

#[tokio::test]
async fn a_refund_made_in_the_dashboard_is_debited_once_whatever_is_redelivered_r26() {
    let w = World::start().await;
    let charge_id = w.funded().await;
    let pi = w.intent_of(&charge_id).await;
    let ch = latest_charge(&pi);
    // The dashboard refunds $10 (the emulator sends no charge.refunded: posted by the test,
    // signed as Stripe signs, three times under two event ids, as Stripe may).
    w.stripe
        .post(
            "/v1/refunds",
            &[
                ("payment_intent", pi["id"].as_str().unwrap()),
                ("amount", "1000"),
            ],
        )
        .await;
    let now = chrono::Utc::now().timestamp();
    for id in ["evt_refund_1", "evt_refund_1", "evt_refund_2"] {
        let e = event(id, "charge.refunded", json!({"id": ch, "object": "charge"}));
        assert_eq!(w.stripe.deliver(&w.webhook_url, &e, now).await, 200);
    }
    let entries = w.entries("acme").await;
    let refunds = kinds(&entries, lpb::EntryKind::Refund);
    assert_eq!(refunds.len(), 1, "{entries:?}");
    assert_eq!(refunds[0].amount, "10.00");
    assert_eq!(refunds[0].reference, charge_id);
    assert_eq!(w.balance("acme").await, "15.00");
    assert_eq!(w.charge("acme", &charge_id).await.refunded_amount, "10.00");
    w.stop().await;
}

#[tokio::test]
async fn refund_charge_debits_first_refunds_at_stripe_and_refuses_past_the_charge_or_the_balance_r27()
 {
    let w = World::start().await;
    let charge_id = w.funded().await;
    let mut c = w.payments.client().await;
    let refund = |amount: &str, key: &str| ppb::RefundChargeRequest {
        account_id: "acme".into(),
        charge_id: charge_id.clone(),
        amount: amount.into(),
        idempotency_key: key.into(),
        reason: "customer asked".into(),
    };
    let r = c
        .refund_charge(refund("10.00", "rf-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ppb::RefundStatus::RefundSucceeded as i32, "{r:?}");
    assert!(!r.ledger_entry_id.is_empty());
    assert_eq!(w.balance("acme").await, "15.00");
    // At Stripe, keyed by our refund id.
    let pi = w.intent_of(&charge_id).await;
    let refunds = w
        .stripe
        .get(&format!(
            "/v1/refunds?payment_intent={}",
            pi["id"].as_str().unwrap()
        ))
        .await;
    let at_stripe = refunds["data"].as_array().unwrap();
    assert_eq!(at_stripe.len(), 1);
    assert_eq!(at_stripe[0]["amount"], 1000);
    assert_eq!(at_stripe[0]["metadata"]["refund_id"], r.refund_id.as_str());
    // The same key: the same refund. The same key, another amount: ALREADY_EXISTS.
    let again = c
        .refund_charge(refund("10.00", "rf-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.refund_id, r.refund_id);
    let e = c.refund_charge(refund("11.00", "rf-1")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // Above what is left of the charge ($15).
    let e = c.refund_charge(refund("15.01", "rf-2")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // Above the available balance: spend $12 first, $3 left.
    w.spend("12.00", "use-1").await;
    let e = c.refund_charge(refund("5.00", "rf-3")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("available"), "{}", e.message());
    // Bad input.
    for (amount, why) in [
        ("0", "zero"),
        ("-1", "negative"),
        ("1.001", "fractions of a cent"),
        ("abc", "not a number"),
    ] {
        let e = c.refund_charge(refund(amount, "rf-4")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{why}");
    }
    // Nothing of the refused ones changed anything.
    assert_eq!(w.balance("acme").await, "3.00");
    let entries = w.entries("acme").await;
    assert_eq!(kinds(&entries, lpb::EntryKind::Refund).len(), 1);
    assert_eq!(w.charge("acme", &charge_id).await.refunded_amount, "10.00");
    assert_eq!(w.refunds_at_stripe(&pi).await.len(), 1);
    w.stop().await;
}

#[tokio::test]
async fn a_dispute_debits_once_even_below_zero_and_a_won_one_credits_back_once_r26() {
    let w = World::start().await;
    let charge_id = w.funded().await;
    w.spend("5.00", "use-1").await;
    let tap = EventTap::bind(&w.ledger.exchange, "payments.charge.disputed").await;
    let pi = w.intent_of(&charge_id).await;
    let ch = latest_charge(&pi);
    // The emulator has no disputes: the events are posted by the test, signed as Stripe
    // signs them; the closing arrives first, then the opening twice.
    let dispute = |status: &str| {
        json!({"id": "dp_test_1", "object": "dispute", "amount": 2500, "currency": "usd",
               "charge": ch, "payment_intent": pi["id"], "status": status})
    };
    let now = chrono::Utc::now().timestamp();
    let created = event(
        "evt_dp_1",
        "charge.dispute.created",
        dispute("needs_response"),
    );
    assert_eq!(w.stripe.deliver(&w.webhook_url, &created, now).await, 200);
    assert_eq!(w.stripe.deliver(&w.webhook_url, &created, now).await, 200);
    let entries = w.entries("acme").await;
    let disputes = kinds(&entries, lpb::EntryKind::Dispute);
    assert_eq!(disputes.len(), 1, "{entries:?}");
    assert_eq!(disputes[0].amount, "25.00");
    assert_eq!(w.balance("acme").await, "-5.00");
    let acct = w
        .ledger
        .client()
        .await
        .get_account(lpb::GetAccountRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        acct.access,
        lpb::Access::Suspended as i32,
        "below zero suspends"
    );
    let mut tap = tap;
    let ev = tap
        .expect("payments.charge.disputed", Duration::from_secs(10))
        .await;
    assert_eq!(ev["data"]["dispute_id"], "dp_test_1");
    // Won: credited back once, however often it is said.
    let won = event("evt_dp_2", "charge.dispute.closed", dispute("won"));
    for _ in 0..2 {
        assert_eq!(w.stripe.deliver(&w.webhook_url, &won, now).await, 200);
    }
    let also = event("evt_dp_3", "charge.dispute.closed", dispute("won"));
    assert_eq!(w.stripe.deliver(&w.webhook_url, &also, now).await, 200);
    let entries = w.entries("acme").await;
    assert_eq!(kinds(&entries, lpb::EntryKind::Dispute).len(), 1);
    let back: Vec<_> = kinds(&entries, lpb::EntryKind::Credit)
        .into_iter()
        .filter(|e| e.source == lpb::CreditSource::Adjustment as i32)
        .collect();
    assert_eq!(back.len(), 1, "{entries:?}");
    assert_eq!(w.balance("acme").await, "20.00");
    w.stop().await;
}

/// Found by the chaos soak: a dispute or refund event for a payment whose intent id payments
/// had not recorded yet (its answer lost, the replica killed) was dropped as "not ours".
/// The charge is found by the ids payments put in the intent's metadata.
#[tokio::test]
async fn events_for_a_payment_whose_answer_was_lost_still_reach_the_ledger_r26() {
    let w = World::start().await;
    let charge_id = w.funded().await;
    let pi = w.intent_of(&charge_id).await;
    let ch = latest_charge(&pi);
    // As if the charge's answer had never been recorded.
    let mut db = w.payments.db().await;
    sqlx::query("UPDATE charges SET processor_charge_id = NULL WHERE charge_id = $1")
        .bind(&charge_id)
        .execute(&mut db)
        .await
        .unwrap();
    let refund = w
        .stripe
        .post(
            "/v1/refunds",
            &[
                ("payment_intent", pi["id"].as_str().unwrap()),
                ("amount", "500"),
            ],
        )
        .await;
    let now = chrono::Utc::now().timestamp();
    let charge = w.stripe.get(&format!("/v1/charges/{ch}")).await;
    let refunded = event("evt_lost_r", "charge.refunded", charge);
    assert_eq!(w.stripe.deliver(&w.webhook_url, &refunded, now).await, 200);
    let dispute = json!({"id": "dp_lost", "object": "dispute", "amount": 1000, "currency": "usd",
                         "charge": ch, "payment_intent": pi["id"], "status": "needs_response"});
    let opened = event("evt_lost_d", "charge.dispute.created", dispute);
    assert_eq!(w.stripe.deliver(&w.webhook_url, &opened, now).await, 200);
    let entries = w.entries("acme").await;
    let refunds = kinds(&entries, lpb::EntryKind::Refund);
    assert_eq!(refunds.len(), 1, "{entries:?}");
    assert_eq!(refunds[0].amount, "5.00");
    assert!(
        refunds[0]
            .idempotency_key
            .ends_with(refund["id"].as_str().unwrap()),
        "{:?}",
        refunds[0]
    );
    assert_eq!(
        kinds(&entries, lpb::EntryKind::Dispute).len(),
        1,
        "{entries:?}"
    );
    assert_eq!(w.balance("acme").await, "10.00");
    w.stop().await;
}

#[tokio::test]
async fn a_dispute_seen_closed_before_opened_still_nets_to_nothing_r26() {
    let w = World::start().await;
    let charge_id = w.funded().await;
    let pi = w.intent_of(&charge_id).await;
    let d = |status: &str| {
        json!({"id": "dp_test_2", "object": "dispute", "amount": 1000, "currency": "usd",
               "payment_intent": pi["id"], "status": status})
    };
    let now = chrono::Utc::now().timestamp();
    let closed = event("evt_c", "charge.dispute.closed", d("won"));
    let opened = event("evt_o", "charge.dispute.created", d("needs_response"));
    assert_eq!(w.stripe.deliver(&w.webhook_url, &closed, now).await, 200);
    assert_eq!(w.stripe.deliver(&w.webhook_url, &opened, now).await, 200);
    let entries = w.entries("acme").await;
    assert_eq!(kinds(&entries, lpb::EntryKind::Dispute).len(), 1);
    assert_eq!(w.balance("acme").await, "25.00");
    w.stop().await;
}

/// R23: the payments binary does not guess a processor, and a Stripe one needs its keys.
#[test]
fn the_payments_binary_refuses_to_start_without_a_processor_named_r23() {
    let bin = credits_tests::procs::bin("credits-payments");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(&bin);
        cmd.env_clear()
            .env("DATABASE_URL", "postgres://127.0.0.1:9/none")
            .env("METRICS_ADDR", "off");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run credits-payments");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&[]);
    assert!(!ok);
    assert!(err.contains("PAYMENTS_PROCESSOR"), "{err}");
    let (ok, err) = run(&[("PAYMENTS_PROCESSOR", "stripe")]);
    assert!(!ok);
    assert!(err.contains("STRIPE_SECRET_KEY"), "{err}");
    let (ok, err) = run(&[("PAYMENTS_PROCESSOR", "paypal")]);
    assert!(!ok);
    assert!(err.contains("paypal"), "{err}");
}

/// R12/R27 under a race: the same refund sent eight times at once is one refund, one debit,
/// one refund at Stripe — never an error for the late ones.
#[tokio::test]
async fn concurrent_duplicates_of_one_refund_refund_once_r12_r27() {
    let w = World::start().await;
    let charge_id = w.funded().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = w.payments.client().await;
        let charge_id = charge_id.clone();
        tasks.push(tokio::spawn(async move {
            c.refund_charge(ppb::RefundChargeRequest {
                account_id: "acme".into(),
                charge_id,
                amount: "25.00".into(),
                idempotency_key: "rf-all".into(),
                reason: String::new(),
            })
            .await
            .map(|r| r.into_inner().refund_id)
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(
            t.await
                .unwrap()
                .expect("every duplicate is answered with the refund"),
        );
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let entries = w.entries("acme").await;
    assert_eq!(kinds(&entries, lpb::EntryKind::Refund).len(), 1);
    assert_eq!(w.balance("acme").await, "0.00");
    let pi = w.intent_of(&charge_id).await;
    assert_eq!(w.refunds_at_stripe(&pi).await.len(), 1);
    w.stop().await;
}

/// R26: a dispute takes back at most what refunds left of the charge; an inquiry
/// (`warning_*`) moves no money and changes nothing. (Posted by the test: the emulator has
/// no disputes.)
#[tokio::test]
async fn a_dispute_takes_back_only_what_refunds_left_and_an_inquiry_nothing_r26() {
    let w = World::start().await;
    let charge_id = w.funded().await;
    w.refund(&charge_id, "20.00", "rf-1").await.unwrap();
    let pi = w.intent_of(&charge_id).await;
    let d = |id: &str, status: &str| {
        json!({"id": id, "object": "dispute", "amount": 2500, "currency": "usd",
               "payment_intent": pi["id"], "status": status})
    };
    let now = chrono::Utc::now().timestamp();
    let inquiry = event(
        "evt_w",
        "charge.dispute.created",
        d("dp_inquiry", "warning_needs_response"),
    );
    assert_eq!(w.stripe.deliver(&w.webhook_url, &inquiry, now).await, 200);
    assert_eq!(
        kinds(&w.entries("acme").await, lpb::EntryKind::Dispute).len(),
        0
    );
    assert_eq!(w.balance("acme").await, "5.00");
    let real = event(
        "evt_d",
        "charge.dispute.created",
        d("dp_real", "needs_response"),
    );
    assert_eq!(w.stripe.deliver(&w.webhook_url, &real, now).await, 200);
    let entries = w.entries("acme").await;
    let disputes = kinds(&entries, lpb::EntryKind::Dispute);
    assert_eq!(disputes.len(), 1, "{entries:?}");
    assert_eq!(
        disputes[0].amount, "5.00",
        "the $20 refunded already is not taken twice"
    );
    assert_eq!(w.balance("acme").await, "0.00");
    // And nothing is left to refund.
    let e = w.refund(&charge_id, "0.01", "rf-2").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    w.stop().await;
}

/// R24: a token with the sandbox is refused as what it is: the wrong kind of input.
#[tokio::test]
async fn the_sandbox_refuses_a_processor_token_as_invalid_r24() {
    let ledger = Ledger::start().await;
    let payments = Payments::start(PaymentsOptions::for_ledger(&ledger)).await;
    ledger
        .client()
        .await
        .create_account(lpb::CreateAccountRequest {
            account_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut c = payments.client().await;
    let e = c
        .add_payment_method(ppb::AddPaymentMethodRequest {
            account_id: "acme".into(),
            processor_token: "pm_123".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .create_setup_intent(ppb::CreateSetupIntentRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    payments.stop().await;
    ledger.stop().await;
}

/// R28: the webhook endpoint does not wait on a slow client forever: a request head that
/// never ends is dropped after the header-read timeout (10 s), like the billing page's.
#[tokio::test]
async fn the_webhook_endpoint_drops_a_request_head_that_never_ends_r28() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::start().await;
    let addr = w
        .webhook_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: ")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a half-sent request held the webhook endpoint"
    );
    w.stop().await;
}

/// R28: only requests that fail their signature spend an address's budget (60 a minute):
/// past it they get 429, while correctly signed events from the same address are still
/// taken — Stripe's deliveries are never the ones refused, even behind a shared proxy.
#[tokio::test]
async fn only_failed_signatures_are_rate_limited_at_the_webhook_endpoint_r28() {
    let w = World::start().await;
    let forged = event(
        "evt_forged",
        "payment_intent.succeeded",
        json!({"id": "pi_x"}),
    );
    let body = serde_json::to_vec(&forged).unwrap();
    // The budget refills at one a second: well past 60 requests, refusals come.
    let mut codes = Vec::new();
    for _ in 0..100 {
        codes.push(post_raw(&w.webhook_url, &body, Some("t=1,v1=00")).await);
    }
    assert!(codes[..60].iter().all(|c| *c == 400), "{codes:?}");
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.iter().all(|c| *c == 400 || *c == 429), "{codes:?}");
    let now = chrono::Utc::now().timestamp();
    let signed = event("evt_signed", "customer.created", json!({"id": "cus_x"}));
    assert_eq!(w.stripe.deliver(&w.webhook_url, &signed, now).await, 200);
    assert_eq!(
        w.processor_events().await,
        1,
        "only the signed event was recorded"
    );
    w.stop().await;
}

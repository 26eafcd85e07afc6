//! Payments integration tests: a real ledger and a real payments daemon in process, on
//! port 0, with their own databases and exchange, over real gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use credits_proto::ledger::v1 as lpb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1 as pb;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use credits_tests::{EventTap, Ledger, Payments, PaymentsOptions, eventually};
use tonic::Code;
use tonic::transport::Channel;

type Pay = PaymentsServiceClient<Channel>;
type Led = LedgerServiceClient<Channel>;

const WAIT: Duration = Duration::from_secs(15);

struct Env {
    ledger: Ledger,
    payments: Payments,
    l: Led,
    p: Pay,
}

async fn env() -> Env {
    let ledger = Ledger::start().await;
    let payments = Payments::start(PaymentsOptions::for_ledger(&ledger)).await;
    let mut l = ledger.client().await;
    let p = payments.client().await;
    l.create_account(lpb::CreateAccountRequest {
        account_id: "acme".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    Env {
        ledger,
        payments,
        l,
        p,
    }
}

impl Env {
    async fn stop(self) {
        self.payments.stop().await;
        self.ledger.stop().await;
    }

    async fn balance(&mut self, account: &str) -> String {
        self.l
            .get_account(lpb::GetAccountRequest {
                account_id: account.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .balance
    }

    async fn sandbox_charges(&self) -> i64 {
        let mut db = self.payments.db().await;
        sqlx::query_scalar("SELECT count(*) FROM sandbox_charges")
            .fetch_one(&mut db)
            .await
            .unwrap()
    }
}

fn card(number: &str) -> pb::add_payment_method_request::Method {
    pb::add_payment_method_request::Method::Card(pb::CardDetails {
        number: number.into(),
        exp_month: 12,
        exp_year: 2034,
        cvc: "123".into(),
    })
}

fn bank() -> pb::add_payment_method_request::Method {
    pb::add_payment_method_request::Method::UsBankAccount(pb::UsBankAccountDetails {
        routing_number: "110000000".into(),
        account_number: "000123456789".into(),
        holder_name: "Jane Roe".into(),
    })
}

async fn add(
    p: &mut Pay,
    account: &str,
    method: pb::add_payment_method_request::Method,
    make_default: bool,
) -> pb::PaymentMethod {
    p.add_payment_method(pb::AddPaymentMethodRequest {
        account_id: account.into(),
        method: Some(method),
        make_default,
    })
    .await
    .unwrap()
    .into_inner()
}

fn charge_req(amount: &str, method: &str, key: &str) -> pb::ChargeRequest {
    pb::ChargeRequest {
        account_id: "acme".into(),
        amount: amount.into(),
        payment_method_id: method.into(),
        idempotency_key: key.into(),
        description: "test".into(),
    }
}

fn purchase_req(amount: &str, key: &str) -> pb::PurchaseCreditsRequest {
    pb::PurchaseCreditsRequest {
        account_id: "acme".into(),
        amount: amount.into(),
        payment_method_id: String::new(),
        idempotency_key: key.into(),
    }
}

#[tokio::test]
async fn each_sandbox_test_card_has_its_outcome() {
    let mut e = env().await;
    let mut tap = EventTap::bind(&e.ledger.exchange, "payments.charge.*").await;
    let cases = [
        ("4242424242424242", "visa", pb::ChargeStatus::Succeeded, ""),
        (
            "5555555555554444",
            "mastercard",
            pb::ChargeStatus::Succeeded,
            "",
        ),
        (
            "4000000000000002",
            "visa",
            pb::ChargeStatus::Failed,
            "card_declined",
        ),
        (
            "4000000000009995",
            "visa",
            pb::ChargeStatus::Failed,
            "insufficient_funds",
        ),
        (
            "4000000000000069",
            "visa",
            pb::ChargeStatus::Failed,
            "expired_card",
        ),
    ];
    for (i, (number, brand, status, code)) in cases.iter().enumerate() {
        let pm = add(&mut e.p, "acme", card(number), false).await;
        assert_eq!(pm.brand, *brand);
        assert_eq!(pm.last4, number[12..]);
        let c =
            e.p.charge(charge_req("10.00", &pm.payment_method_id, &format!("k{i}")))
                .await
                .unwrap()
                .into_inner();
        assert_eq!(c.status, *status as i32, "{number}");
        assert_eq!(c.failure_code, *code, "{number}");
        assert_eq!(c.amount, "10.00");
        let kind = if *status == pb::ChargeStatus::Succeeded {
            "payments.charge.succeeded"
        } else {
            "payments.charge.failed"
        };
        let ev = tap.next_of(kind, WAIT).await.expect(kind);
        assert_eq!(ev["data"]["charge_id"], c.charge_id);
        assert_eq!(ev["data"]["failure_code"], *code);
        assert_eq!(ev["data"]["amount"], "10.00");
    }

    // processing_error is transient: the first try is UNAVAILABLE, the retry with the same
    // key succeeds, and only one charge exists at the processor.
    let pm = add(&mut e.p, "acme", card("4000000000000119"), false).await;
    let err =
        e.p.charge(charge_req("7.00", &pm.payment_method_id, "flaky"))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("processing_error"),
        "{}",
        err.message()
    );
    let c =
        e.p.charge(charge_req("7.00", &pm.payment_method_id, "flaky"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(c.status, pb::ChargeStatus::Succeeded as i32);
    assert_eq!(e.sandbox_charges().await, 6);
    e.stop().await;
}

#[tokio::test]
async fn exactly_one_default_moves_with_make_default_and_set_default_r10() {
    let mut e = env().await;
    let mut tap = EventTap::bind(&e.ledger.exchange, "payments.payment_method.*").await;
    let visa = add(&mut e.p, "acme", card("4242424242424242"), false).await;
    assert!(visa.is_default, "the first method becomes the default");
    let ev = tap
        .next_of("payments.payment_method.default_changed", WAIT)
        .await
        .unwrap();
    assert_eq!(ev["data"]["payment_method_id"], visa.payment_method_id);
    assert_eq!(ev["data"]["type"], "CARD");

    let ach = add(&mut e.p, "acme", bank(), false).await;
    assert!(!ach.is_default);
    assert_eq!(ach.r#type, pb::PaymentMethodType::UsBankAccount as i32);
    assert_eq!(ach.last4, "6789");

    let ach =
        e.p.set_default_payment_method(pb::SetDefaultPaymentMethodRequest {
            account_id: "acme".into(),
            payment_method_id: ach.payment_method_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ach.is_default);
    let ev = tap
        .next_of("payments.payment_method.default_changed", WAIT)
        .await
        .unwrap();
    assert_eq!(ev["data"]["type"], "US_BANK_ACCOUNT");

    let mc = add(&mut e.p, "acme", card("5555555555554444"), true).await;
    assert!(mc.is_default, "make_default moves the default");
    let ev = tap
        .next_of("payments.payment_method.default_changed", WAIT)
        .await
        .unwrap();
    assert_eq!(ev["data"]["payment_method_id"], mc.payment_method_id);

    let list =
        e.p.list_payment_methods(pb::ListPaymentMethodsRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.payment_methods.len(), 3);
    assert_eq!(
        list.payment_methods.iter().filter(|m| m.is_default).count(),
        1
    );

    // Removing the default leaves no default, and the event says so.
    e.p.remove_payment_method(pb::RemovePaymentMethodRequest {
        account_id: "acme".into(),
        payment_method_id: mc.payment_method_id.clone(),
    })
    .await
    .unwrap();
    let ev = tap
        .next_of("payments.payment_method.removed", WAIT)
        .await
        .unwrap();
    assert_eq!(ev["data"]["payment_method_id"], mc.payment_method_id);
    assert_eq!(ev["data"]["was_default"], true);
    let list =
        e.p.list_payment_methods(pb::ListPaymentMethodsRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.payment_methods.len(), 2);
    assert!(list.payment_methods.iter().all(|m| !m.is_default));
    let err =
        e.p.charge(charge_req("10.00", "", "no-default"))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("no default payment method"));

    let err =
        e.p.set_default_payment_method(pb::SetDefaultPaymentMethodRequest {
            account_id: "acme".into(),
            payment_method_id: mc.payment_method_id,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "a removed method cannot become the default"
    );
    e.stop().await;
}

#[tokio::test]
async fn purchase_credits_the_ledger_once_and_activates_the_account_r3() {
    let mut e = env().await;
    add(&mut e.p, "acme", card("4242424242424242"), false).await;
    let r =
        e.p.purchase_credits(purchase_req("25.00", "buy-1"))
            .await
            .unwrap()
            .into_inner();
    let charge = r.charge.unwrap();
    assert_eq!(charge.status, pb::ChargeStatus::Succeeded as i32);
    let entry = r.entry.unwrap();
    assert_eq!(entry.amount, "25.00");
    assert_eq!(entry.reference, charge.charge_id);
    assert_eq!(entry.source, lpb::CreditSource::Purchase as i32);
    assert_eq!(r.balance, "25.00");
    let acc =
        e.l.check_access(lpb::CheckAccessRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(acc.allowed);

    // The same key again: the first result, no second charge or credit.
    let again =
        e.p.purchase_credits(purchase_req("25.00", "buy-1"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(again.charge.unwrap().charge_id, charge.charge_id);
    assert_eq!(again.entry.unwrap().entry_id, entry.entry_id);
    let err =
        e.p.purchase_credits(purchase_req("30.00", "buy-1"))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(e.sandbox_charges().await, 1);
    assert_eq!(e.balance("acme").await, "25.00");

    // A declined card buys nothing.
    let declined = add(&mut e.p, "acme", card("4000000000000002"), true).await;
    let r =
        e.p.purchase_credits(purchase_req("10.00", "buy-2"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.charge.unwrap().status, pb::ChargeStatus::Failed as i32);
    assert!(r.entry.is_none());
    assert_eq!(e.balance("acme").await, "25.00");
    let charges =
        e.p.list_charges(pb::ListChargesRequest {
            account_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(charges.charges.len(), 2);
    assert_eq!(
        charges.charges[0].payment_method_id, declined.payment_method_id,
        "newest first"
    );
    e.stop().await;
}

#[tokio::test]
async fn concurrent_duplicate_purchases_charge_once_r12() {
    let mut e = env().await;
    add(&mut e.p, "acme", card("4242424242424242"), false).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut p = e.p.clone();
        tasks.push(tokio::spawn(async move {
            p.purchase_credits(purchase_req("12.34", "same")).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let r = t
            .await
            .unwrap()
            .expect("every duplicate answers")
            .into_inner();
        ids.insert(r.charge.unwrap().charge_id);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(e.sandbox_charges().await, 1);
    assert_eq!(e.balance("acme").await, "12.34");
    let entries =
        e.l.list_entries(lpb::ListEntriesRequest {
            account_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entries.entries.len(), 1);
    e.stop().await;
}

#[tokio::test]
async fn purchase_below_minimum_changes_nothing_r3() {
    let mut e = env().await;
    add(&mut e.p, "acme", card("4242424242424242"), false).await;
    let err =
        e.p.purchase_credits(purchase_req("4.99", "small"))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("at least $5.00"),
        "{}",
        err.message()
    );
    let err =
        e.p.purchase_credits(purchase_req("5.001", "frac"))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("amount"));
    assert_eq!(e.sandbox_charges().await, 0);
    let mut db = e.payments.db().await;
    let charges: i64 = sqlx::query_scalar("SELECT count(*) FROM charges")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(charges, 0);
    assert_eq!(e.balance("acme").await, "0.00");
    // Exactly the minimum is fine.
    let r =
        e.p.purchase_credits(purchase_req("5.00", "min"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.balance, "5.00");
    e.stop().await;
}

#[tokio::test]
async fn purchase_interrupted_after_the_charge_completes_on_restart() {
    let ledger = Ledger::start().await;
    let slow = PaymentsOptions {
        sandbox_latency: Duration::from_millis(1500),
        ..PaymentsOptions::for_ledger(&ledger)
    };
    let payments = Payments::start(slow).await;
    let mut l = ledger.client().await;
    l.create_account(lpb::CreateAccountRequest {
        account_id: "acme".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let p = payments.client().await;
    let mut e = Env {
        ledger,
        payments,
        l,
        p,
    };
    add(&mut e.p, "acme", card("4242424242424242"), false).await;
    // The ledger goes down while the processor is charging the card.
    let mut p = e.p.clone();
    let purchase =
        tokio::spawn(async move { p.purchase_credits(purchase_req("25.00", "buy")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ledger_opts = e.ledger.restart_options();
    let exchange = e.ledger.exchange.clone();
    e.ledger.stop().await;
    let err = purchase.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message()
            .contains("succeeded but crediting the ledger failed"),
        "{}",
        err.message()
    );
    // Payments goes down too, with a succeeded, uncredited charge on its books.
    let payments_db = e.payments.database_url.clone();
    let ledger_url = format!("http://{}", ledger_opts.addr.unwrap());
    e.payments.stop().await;

    let ledger = Ledger::start_with(ledger_opts).await;
    let payments = Payments::start(PaymentsOptions {
        database_url: Some(payments_db),
        ledger_url,
        exchange,
        ach_settle: Duration::from_secs(1),
        auth_token: None,
        sandbox_latency: Duration::ZERO,
    })
    .await;
    let mut l = ledger.client().await;
    let balance = eventually(WAIT, "the purchase to be credited", || {
        let mut l = l.clone();
        async move {
            let b = l
                .get_account(lpb::GetAccountRequest {
                    account_id: "acme".into(),
                })
                .await
                .ok()?
                .into_inner()
                .balance;
            (b != "0.00").then_some(b)
        }
    })
    .await;
    assert_eq!(balance, "25.00");
    // The client's retry gets the same charge and the same entry.
    let mut p = payments.client().await;
    let r = p
        .purchase_credits(purchase_req("25.00", "buy"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.balance, "25.00");
    let entries = l
        .list_entries(lpb::ListEntriesRequest {
            account_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1, "one credit");
    assert_eq!(entries[0].reference, r.charge.unwrap().charge_id);
    let mut db = payments.db().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sandbox_charges")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(n, 1, "one charge");
    payments.stop().await;
    ledger.stop().await;
}

#[tokio::test]
async fn ach_purchase_credits_only_after_settling() {
    let mut e = env().await;
    let mut tap = EventTap::bind(&e.ledger.exchange, "payments.charge.*").await;
    add(&mut e.p, "acme", bank(), false).await;
    let r =
        e.p.purchase_credits(purchase_req("20.00", "ach"))
            .await
            .unwrap()
            .into_inner();
    let charge = r.charge.unwrap();
    assert_eq!(charge.status, pb::ChargeStatus::Pending as i32);
    assert!(r.entry.is_none(), "no entry while the debit is pending");
    assert_eq!(e.balance("acme").await, "0.00");
    assert!(
        tap.drain(Duration::from_millis(500)).await.is_empty(),
        "no charge event while pending"
    );

    let ev = tap
        .next_of("payments.charge.succeeded", WAIT)
        .await
        .expect("settled");
    assert_eq!(ev["data"]["charge_id"], charge.charge_id);
    let balance = eventually(WAIT, "the settled debit to be credited", || {
        let mut l = e.l.clone();
        async move {
            let b = l
                .get_account(lpb::GetAccountRequest {
                    account_id: "acme".into(),
                })
                .await
                .ok()?
                .into_inner()
                .balance;
            (b == "20.00").then_some(b)
        }
    })
    .await;
    assert_eq!(balance, "20.00");
    // The charge records its ledger entry right after the credit lands.
    let c = eventually(WAIT, "the charge to record its ledger entry", || {
        let mut p = e.p.clone();
        let charge_id = charge.charge_id.clone();
        async move {
            let c = p
                .get_charge(pb::GetChargeRequest {
                    account_id: "acme".into(),
                    charge_id,
                })
                .await
                .ok()?
                .into_inner();
            (!c.ledger_entry_id.is_empty()).then_some(c)
        }
    })
    .await;
    assert_eq!(c.status, pb::ChargeStatus::Succeeded as i32);
    let entries =
        e.l.list_entries(lpb::ListEntriesRequest {
            account_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].entry_id, c.ledger_entry_id);
    e.stop().await;
}

#[tokio::test]
async fn bad_payment_input_gets_a_clear_error_and_changes_nothing() {
    let mut e = env().await;
    let bad_cards = [
        ("4242424242424241", 12, 2034, "123", "card.number"),
        ("4242", 12, 2034, "123", "card.number"),
        ("abcd424242424242", 12, 2034, "123", "card.number"),
        ("4242424242424242", 0, 2034, "123", "card.exp_month"),
        ("4242424242424242", 1, 2020, "123", "card.exp_year"),
        ("4242424242424242", 1, 2034, "12a", "card.cvc"),
    ];
    for (number, m, y, cvc, field) in bad_cards {
        let err =
            e.p.add_payment_method(pb::AddPaymentMethodRequest {
                account_id: "acme".into(),
                method: Some(pb::add_payment_method_request::Method::Card(
                    pb::CardDetails {
                        number: number.into(),
                        exp_month: m,
                        exp_year: y,
                        cvc: cvc.into(),
                    },
                )),
                make_default: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{number}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
        assert!(
            !err.message().contains(number) || number.len() < 12,
            "error never echoes a card number"
        );
    }
    let err =
        e.p.add_payment_method(pb::AddPaymentMethodRequest {
            account_id: "acme".into(),
            method: None,
            make_default: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err =
        e.p.add_payment_method(pb::AddPaymentMethodRequest {
            account_id: "acme".into(),
            method: Some(pb::add_payment_method_request::Method::UsBankAccount(
                pb::UsBankAccountDetails {
                    routing_number: "021000021".into(),
                    account_number: "000123456789".into(),
                    holder_name: "Jane".into(),
                },
            )),
            make_default: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "the sandbox knows only its own bank"
    );
    let err =
        e.p.add_payment_method(pb::AddPaymentMethodRequest {
            account_id: "ghost".into(),
            method: Some(card("4242424242424242")),
            make_default: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let pm = add(&mut e.p, "acme", card("4242424242424242"), false).await;
    for (amount, code) in [
        ("1.001", Code::InvalidArgument),
        ("-5", Code::InvalidArgument),
        ("", Code::InvalidArgument),
        ("1e2", Code::InvalidArgument),
    ] {
        let err =
            e.p.charge(charge_req(amount, &pm.payment_method_id, "k"))
                .await
                .unwrap_err();
        assert_eq!(err.code(), code, "{amount:?}");
        assert!(err.message().starts_with("amount"));
    }
    let err =
        e.p.charge(charge_req("1.00", &pm.payment_method_id, ""))
            .await
            .unwrap_err();
    assert!(err.message().starts_with("idempotency_key"));
    let err =
        e.p.charge(charge_req("1.00", "pm_nope", "k"))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        e.p.charge(pb::ChargeRequest {
            account_id: "ghost".into(),
            ..charge_req("1.00", "", "k")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        e.p.list_charges(pb::ListChargesRequest {
            account_id: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let mut db = e.payments.db().await;
    let (methods, charges): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM payment_methods), (SELECT count(*) FROM charges)",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(
        (methods, charges),
        (1, 0),
        "only the one valid card was stored; no charge"
    );
    e.stop().await;
}

#[tokio::test]
async fn amounts_with_trailing_zeros_are_the_same_amount_r22() {
    let mut e = env().await;
    add(&mut e.p, "acme", card("4242424242424242"), true).await;
    let p =
        e.p.purchase_credits(purchase_req("25.000", "buy-1"))
            .await
            .unwrap()
            .into_inner();
    let charge = p.charge.unwrap();
    assert_eq!(charge.amount, "25.00");
    assert_eq!(p.balance, "25.00");
    // The same purchase spelled the canonical way is the same request: a replay.
    let again =
        e.p.purchase_credits(purchase_req("25.00", "buy-1"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(again.charge.unwrap().charge_id, charge.charge_id);
    let c =
        e.p.charge(charge_req("40.010", "", "ch-1"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(c.amount, "40.01");
    let same =
        e.p.charge(charge_req("40.01", "", "ch-1"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(same.charge_id, c.charge_id);
    // Not whole cents however it is spelled.
    let err =
        e.p.charge(charge_req("40.0100001", "", "ch-2"))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(e.sandbox_charges().await, 2);
    assert_eq!(e.balance("acme").await, "25.00");
    e.stop().await;
}

/// A processor whose answers are lost: it makes the charge, then reports a transient
/// error, every time.
struct LostAnswers(credits_payments::processor::Sandbox);

#[tonic::async_trait]
impl credits_payments::processor::PaymentProcessor for LostAnswers {
    async fn tokenize_card(
        &self,
        card: &credits_payments::domain::CardDetails,
    ) -> Result<credits_payments::processor::Tokenized, credits_payments::processor::ProcessorError>
    {
        self.0.tokenize_card(card).await
    }
    async fn tokenize_bank_account(
        &self,
        bank: &credits_payments::domain::BankAccountDetails,
    ) -> Result<credits_payments::processor::Tokenized, credits_payments::processor::ProcessorError>
    {
        self.0.tokenize_bank_account(bank).await
    }
    async fn charge(
        &self,
        token: &str,
        method: credits_payments::domain::MethodType,
        amount: credits_common::Money,
        key: &str,
    ) -> Result<
        credits_payments::processor::ProcessorCharge,
        credits_payments::processor::ProcessorError,
    > {
        self.0.charge(token, method, amount, key).await?;
        Err(credits_payments::processor::ProcessorError::Transient(
            "connection reset after the charge".into(),
        ))
    }
    async fn retrieve(
        &self,
        id: &str,
    ) -> Result<
        credits_payments::processor::ProcessorCharge,
        credits_payments::processor::ProcessorError,
    > {
        self.0.retrieve(id).await
    }
    async fn find_by_key(
        &self,
        key: &str,
    ) -> Result<
        Option<credits_payments::processor::ProcessorCharge>,
        credits_payments::processor::ProcessorError,
    > {
        self.0.find_by_key(key).await
    }
}

#[tokio::test]
async fn a_charge_the_processor_made_is_never_recorded_as_failed() {
    use credits_payments::domain::{
        AccountId, ChargeRequest, ChargeStatus, IdempotencyKey, Purpose,
    };
    let mut e = env().await;
    add(&mut e.p, "acme", card("4242424242424242"), true).await;
    // The daemon's own recovery loop would finish the charge through the honest sandbox;
    // stop it and drive payments directly with the processor that loses its answers.
    let database_url = e.payments.database_url.clone();
    let ledger_url = e.ledger.url();
    e.payments.shutdown.cancel();
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let svc = credits_payments::service::Payments {
        store: credits_payments::store::Store::new(pool.clone()),
        processor: std::sync::Arc::new(LostAnswers(credits_payments::processor::Sandbox::new(
            pool.clone(),
            Default::default(),
        ))),
        ledger: LedgerServiceClient::new(
            credits_common::grpc::lazy_channel(&ledger_url, None).unwrap(),
        ),
        min_purchase: credits_common::Money::parse_positive("m", "5").unwrap(),
    };
    let req = ChargeRequest {
        account_id: AccountId::parse("acme").unwrap(),
        amount: credits_common::Money::parse_positive("amount", "12.34").unwrap(),
        payment_method_id: String::new(),
        idempotency_key: IdempotencyKey::parse("lost-1").unwrap(),
        description: String::new(),
        purpose: Purpose::CHARGE,
    };
    let mut outcome = None;
    for _ in 0..credits_payments::service::MAX_PROCESSOR_ATTEMPTS + 1 {
        match svc.charge(&req).await {
            Ok(c) => {
                outcome = Some(c);
                break;
            }
            Err(err) => assert!(
                matches!(err, credits_common::error::ServiceError::Unavailable(_)),
                "{err}"
            ),
        }
    }
    let charge = outcome.expect("the charge is settled after the retries");
    assert_eq!(
        charge.status,
        ChargeStatus::SUCCEEDED,
        "the processor made it"
    );
    let made: i64 = sqlx::query_scalar("SELECT count(*) FROM sandbox_charges")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(made, 1);
    e.ledger.stop().await;
}

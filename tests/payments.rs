//! Payments integration tests: a real ledger and a real payments daemon in process, on
//! port 0, with their own databases and exchange, over real gRPC, driven through
//! `credits-client` and the shared helpers of `credits_tests::api`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1 as pb;
use credits_tests::api::{
    Api, BillingMode, CardDetails, ChargeStatus, Code, CreditSource, EntryKind, NewPaymentMethod,
    PaymentMethodType, acct, assert_names, assert_says, money,
};
use credits_tests::raw;
use credits_tests::{EventTap, Ledger, NOBODY, Payments, PaymentsOptions, eventually};

const WAIT: Duration = Duration::from_secs(15);
const DEFAULT_CHANGED: &str = "payments.payment_method.default_changed";

/// A ledger and payments with the account "acme" (prepaid, nothing bought).
struct Env {
    ledger: Ledger,
    payments: Payments,
    c: Api,
}

async fn env() -> Env {
    let ledger = Ledger::start().await;
    let payments = Payments::start(PaymentsOptions::for_ledger(&ledger)).await;
    Env::with(ledger, payments).await
}

/// [`env`], with a Visa on file as the default payment method.
async fn env_with_visa() -> Env {
    let e = env().await;
    let visa = e.c.add_card("acme", "4242424242424242", true).await;
    assert!(visa.is_default);
    e
}

impl Env {
    async fn with(ledger: Ledger, payments: Payments) -> Env {
        let c = Api::connect(&ledger.url(), &payments.url(), NOBODY, None);
        c.create_account("acme", BillingMode::Prepaid).await;
        Env {
            ledger,
            payments,
            c,
        }
    }

    async fn stop(self) {
        self.payments.stop().await;
        self.ledger.stop().await;
    }

    async fn sandbox_charges(&self) -> i64 {
        let mut db = self.payments.db().await;
        sqlx::query_scalar("SELECT count(*) FROM sandbox_charges")
            .fetch_one(&mut db)
            .await
            .unwrap()
    }
}

/// A raw `Charge` for "acme", for amounts and keys the typed client refuses to send.
fn raw_charge(amount: &str, method: &str, key: &str) -> pb::ChargeRequest {
    pb::ChargeRequest {
        account_id: "acme".into(),
        amount: amount.into(),
        payment_method_id: method.into(),
        idempotency_key: key.into(),
        description: "test".into(),
        top_up: false,
    }
}

#[tokio::test]
async fn each_sandbox_test_card_has_its_outcome() {
    let e = env().await;
    let mut tap = EventTap::bind(&e.ledger.exchange, "payments.charge.*").await;
    let cases = [
        ("4242424242424242", "visa", ChargeStatus::Succeeded, ""),
        (
            "5555555555554444",
            "mastercard",
            ChargeStatus::Succeeded,
            "",
        ),
        (
            "4000000000000002",
            "visa",
            ChargeStatus::Failed,
            "card_declined",
        ),
        (
            "4000000000009995",
            "visa",
            ChargeStatus::Failed,
            "insufficient_funds",
        ),
        (
            "4000000000000069",
            "visa",
            ChargeStatus::Failed,
            "expired_card",
        ),
    ];
    for (i, (number, brand, status, code)) in cases.iter().enumerate() {
        let pm = e.c.add_card("acme", number, false).await;
        assert_eq!(pm.brand, *brand);
        assert_eq!(pm.last4, number[12..]);
        let c =
            e.c.try_charge("acme", "10.00", &pm.payment_method_id, &format!("k{i}"))
                .await
                .unwrap();
        assert_eq!(c.status, *status, "{number}");
        assert_eq!(c.failure_code.as_deref().unwrap_or(""), *code, "{number}");
        assert_eq!(c.amount, money("10.00"));
        let kind = if *status == ChargeStatus::Succeeded {
            "payments.charge.succeeded"
        } else {
            "payments.charge.failed"
        };
        let ev = tap.expect(kind, WAIT).await;
        assert_eq!(ev["data"]["charge_id"], c.charge_id);
        assert_eq!(ev["data"]["failure_code"], *code);
        assert_eq!(ev["data"]["amount"], "10.00");
    }

    // processing_error is transient: the first try is UNAVAILABLE, the retry with the same
    // key succeeds, and only one charge exists at the processor. (The test client never
    // retries on its own.)
    let pm = e.c.add_card("acme", "4000000000000119", false).await;
    let err =
        e.c.try_charge("acme", "7.00", &pm.payment_method_id, "flaky")
            .await
            .unwrap_err();
    assert_says(&err, Code::Unavailable, "processing_error");
    let c =
        e.c.try_charge("acme", "7.00", &pm.payment_method_id, "flaky")
            .await
            .unwrap();
    assert_eq!(c.status, ChargeStatus::Succeeded);
    assert_eq!(e.sandbox_charges().await, 6);
    e.stop().await;
}

#[tokio::test]
async fn exactly_one_default_moves_with_make_default_and_set_default_r10() {
    let e = env().await;
    let mut tap = EventTap::bind(&e.ledger.exchange, "payments.payment_method.*").await;
    let visa = e.c.add_card("acme", "4242424242424242", false).await;
    assert!(visa.is_default, "the first method becomes the default");
    let ev = tap.expect(DEFAULT_CHANGED, WAIT).await;
    assert_eq!(ev["data"]["payment_method_id"], visa.payment_method_id);
    assert_eq!(ev["data"]["type"], "CARD");

    let ach = e.c.add_bank("acme", false).await;
    assert!(!ach.is_default);
    assert_eq!(ach.method_type, PaymentMethodType::UsBankAccount);
    assert_eq!(ach.last4, "6789");

    let ach = e.c.set_default("acme", &ach.payment_method_id).await;
    assert!(ach.is_default);
    let ev = tap.expect(DEFAULT_CHANGED, WAIT).await;
    assert_eq!(ev["data"]["type"], "US_BANK_ACCOUNT");

    let mc = e.c.add_card("acme", "5555555555554444", true).await;
    assert!(mc.is_default, "make_default moves the default");
    let ev = tap.expect(DEFAULT_CHANGED, WAIT).await;
    assert_eq!(ev["data"]["payment_method_id"], mc.payment_method_id);

    let list = e.c.methods("acme").await;
    assert_eq!(list.len(), 3);
    assert_eq!(list.iter().filter(|m| m.is_default).count(), 1);

    // Removing the default leaves no default, and the event says so.
    e.c.remove_method("acme", &mc.payment_method_id).await;
    let ev = tap.expect("payments.payment_method.removed", WAIT).await;
    assert_eq!(ev["data"]["payment_method_id"], mc.payment_method_id);
    assert_eq!(ev["data"]["was_default"], true);
    let list = e.c.methods("acme").await;
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|m| !m.is_default));
    let err =
        e.c.try_charge("acme", "10.00", "", "no-default")
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("no default payment method"));

    let err =
        e.c.payments()
            .set_default_payment_method(&acct("acme"), &mc.payment_method_id)
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
    let e = env_with_visa().await;
    let r = e.c.buy("acme", "25.00", "buy-1").await;
    let charge = r.charge;
    assert_eq!(charge.status, ChargeStatus::Succeeded);
    let entry = r.entry.unwrap();
    assert_eq!(entry.amount, money("25.00"));
    assert_eq!(entry.reference, charge.charge_id);
    assert_eq!(entry.kind, EntryKind::Credit(CreditSource::Purchase));
    assert_eq!(r.balance, Some(money("25.00")));
    assert!(e.c.access("acme").await.allowed);

    // The same key again: the first result, no second charge or credit.
    let again = e.c.try_buy("acme", "25.00", "buy-1").await.unwrap();
    assert_eq!(again.charge.charge_id, charge.charge_id);
    assert_eq!(again.entry.unwrap().entry_id, entry.entry_id);
    let err = e.c.try_buy("acme", "30.00", "buy-1").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(e.sandbox_charges().await, 1);
    assert_eq!(e.c.balance("acme").await, money("25.00"));

    // A declined card buys nothing.
    let declined = e.c.add_card("acme", "4000000000000002", true).await;
    let r = e.c.try_buy("acme", "10.00", "buy-2").await.unwrap();
    assert_eq!(r.charge.status, ChargeStatus::Failed);
    assert!(r.entry.is_none());
    assert_eq!(e.c.balance("acme").await, money("25.00"));
    let charges = e.c.charges("acme").await;
    assert_eq!(charges.len(), 2);
    assert_eq!(
        charges[0].payment_method_id, declined.payment_method_id,
        "newest first"
    );
    e.stop().await;
}

#[tokio::test]
async fn concurrent_duplicate_purchases_charge_once_r12() {
    let e = env_with_visa().await;
    let purchases =
        e.c.concurrently(20, |c, _| async move {
            c.try_buy("acme", "12.34", "same").await
        })
        .await;
    let mut ids = std::collections::HashSet::new();
    for r in purchases {
        let r = r.expect("every duplicate answers");
        ids.insert(r.charge.charge_id);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(e.sandbox_charges().await, 1);
    assert_eq!(e.c.balance("acme").await, money("12.34"));
    assert_eq!(e.c.entries("acme").await.len(), 1);
    e.stop().await;
}

#[tokio::test]
async fn purchase_below_minimum_changes_nothing_r3() {
    let e = env_with_visa().await;
    let err = e.c.try_buy("acme", "4.99", "small").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("at least $5.00"),
        "{}",
        err.message()
    );
    let err = e.c.try_buy("acme", "5.001", "frac").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("amount"));
    assert_eq!(e.sandbox_charges().await, 0);
    let mut db = e.payments.db().await;
    let charges: i64 = sqlx::query_scalar("SELECT count(*) FROM charges")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(charges, 0);
    assert_eq!(e.c.balance("acme").await, money("0.00"));
    // Exactly the minimum is fine.
    let r = e.c.buy("acme", "5.00", "min").await;
    assert_eq!(r.balance, Some(money("5.00")));
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
    let e = Env::with(ledger, payments).await;
    e.c.add_card("acme", "4242424242424242", false).await;
    // The ledger goes down while the processor is charging the card.
    let c = e.c.clone();
    let purchase = tokio::spawn(async move { c.try_buy("acme", "25.00", "buy").await });
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
        stripe: None,
        call_timeout: None,
    })
    .await;
    let c = Api::connect(&ledger.url(), &payments.url(), NOBODY, None);
    let balance = eventually(WAIT, "the purchase to be credited", || async {
        let b = c.ledger().get_account(&acct("acme")).await.ok()?.balance;
        (b != money("0.00")).then_some(b)
    })
    .await;
    assert_eq!(balance, money("25.00"));
    // The client's retry gets the same charge and the same entry.
    let r = c.try_buy("acme", "25.00", "buy").await.unwrap();
    assert_eq!(r.balance, Some(money("25.00")));
    let entries = c.entries("acme").await;
    assert_eq!(entries.len(), 1, "one credit");
    assert_eq!(entries[0].reference, r.charge.charge_id);
    let mut db = payments.db().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sandbox_charges")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(n, 1, "one charge");
    payments.stop().await;
    ledger.stop().await;
}

/// R10: a top-up sent on the default (empty `payment_method_id`, `top_up`) charges it only
/// when it is a card. A bank default is refused before anything is charged, and the same
/// key later, with a card as the default, charges that card once.
#[tokio::test]
async fn a_top_up_on_the_default_charges_only_a_card_r10() {
    let e = env().await;
    let mut raw = e.payments.client().await;
    let top_up = |key: &str| pb::ChargeRequest {
        top_up: true,
        ..raw_charge("20.00", "", key)
    };
    let bank = e.c.add_bank("acme", true).await;
    assert!(bank.is_default);
    let err = raw.charge(top_up("recharge:att_1")).await.unwrap_err();
    assert_says(&err, Code::FailedPrecondition, "cards only");
    assert_eq!(e.sandbox_charges().await, 0, "nothing charged");
    let mut db = e.payments.db().await;
    let charges: i64 = sqlx::query_scalar("SELECT count(*) FROM charges")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(charges, 0, "nothing recorded");
    // A plain charge on the same default is not a top-up: R10 does not apply to it.
    let plain = raw
        .charge(raw_charge("20.00", "", "plain"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain.payment_method_id, bank.payment_method_id);

    let visa = e.c.add_card("acme", "4242424242424242", true).await;
    let first = raw
        .charge(top_up("recharge:att_1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.payment_method_id, visa.payment_method_id);
    assert_eq!(first.status, pb::ChargeStatus::Succeeded as i32);
    // A resend under the key is answered with that charge, even once the default moved.
    e.c.set_default("acme", &bank.payment_method_id).await;
    let again = raw
        .charge(top_up("recharge:att_1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.charge_id, first.charge_id);
    assert_eq!(again.payment_method_id, visa.payment_method_id);
    e.stop().await;
}

#[tokio::test]
async fn ach_purchase_credits_only_after_settling() {
    let e = env().await;
    let mut tap = EventTap::bind(&e.ledger.exchange, "payments.charge.*").await;
    e.c.add_bank("acme", false).await;
    let r = e.c.try_buy("acme", "20.00", "ach").await.unwrap();
    let charge = r.charge;
    assert_eq!(charge.status, ChargeStatus::Pending);
    assert!(r.entry.is_none(), "no entry while the debit is pending");
    assert_eq!(e.c.balance("acme").await, money("0.00"));
    tap.expect_none(Duration::from_millis(500), "no charge event while pending")
        .await;

    let ev = tap
        .next_of("payments.charge.succeeded", WAIT)
        .await
        .expect("settled");
    assert_eq!(ev["data"]["charge_id"], charge.charge_id);
    let balance = eventually(WAIT, "the settled debit to be credited", || async {
        let b = e.c.ledger().get_account(&acct("acme")).await.ok()?.balance;
        (b == money("20.00")).then_some(b)
    })
    .await;
    assert_eq!(balance, money("20.00"));
    // The charge records its ledger entry right after the credit lands.
    let c = eventually(WAIT, "the charge to record its ledger entry", || async {
        let c =
            e.c.payments()
                .get_charge(&acct("acme"), &charge.charge_id)
                .await
                .ok()?;
        c.ledger_entry_id.is_some().then_some(c)
    })
    .await;
    assert_eq!(c.status, ChargeStatus::Succeeded);
    let entries = e.c.entries("acme").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(Some(&entries[0].entry_id), c.ledger_entry_id.as_ref());
    e.stop().await;
}

#[tokio::test]
async fn bad_payment_input_gets_a_clear_error_and_changes_nothing() {
    let e = env().await;
    // A good card with one thing wrong: (the field named, what it is set to).
    let good = || CardDetails {
        number: "4242424242424242".into(),
        exp_month: 12,
        exp_year: 2034,
        cvc: "123".into(),
    };
    let bad_cards: Vec<(&str, CardDetails)> = vec![
        (
            "card.number",
            CardDetails {
                number: "4242424242424241".into(),
                ..good()
            },
        ),
        (
            "card.number",
            CardDetails {
                number: "4242".into(),
                ..good()
            },
        ),
        (
            "card.number",
            CardDetails {
                number: "abcd424242424242".into(),
                ..good()
            },
        ),
        (
            "card.exp_month",
            CardDetails {
                exp_month: 0,
                ..good()
            },
        ),
        (
            "card.exp_year",
            CardDetails {
                exp_month: 1,
                exp_year: 2020,
                ..good()
            },
        ),
        (
            "card.cvc",
            CardDetails {
                cvc: "12a".into(),
                ..good()
            },
        ),
    ];
    for (field, details) in bad_cards {
        let number = details.number.clone();
        let number = number.as_str();
        let card = NewPaymentMethod::Card(details);
        let err =
            e.c.payments()
                .add_payment_method(&acct("acme"), &card, false)
                .await
                .unwrap_err();
        assert_names(&err, Code::InvalidArgument, field, number);
        assert!(
            !err.message().contains(number) || number.len() < 12,
            "error never echoes a card number"
        );
    }
    // Raw prost from here on where the typed client cannot send the request: no method
    // at all, amounts it refuses to parse, an empty idempotency key.
    let mut raw = e.payments.client().await;
    let err = raw
        .add_payment_method(pb::AddPaymentMethodRequest {
            account_id: "acme".into(),
            method: None,
            make_default: false,
            processor_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let unknown_bank = NewPaymentMethod::UsBankAccount(credits_tests::api::BankAccountDetails {
        routing_number: "021000021".into(),
        account_number: "000123456789".into(),
        holder_name: "Jane".into(),
    });
    let err =
        e.c.payments()
            .add_payment_method(&acct("acme"), &unknown_bank, false)
            .await
            .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "the sandbox knows only its own bank"
    );
    let err =
        e.c.payments()
            .add_payment_method(
                &acct("ghost"),
                &credits_tests::api::card("4242424242424242"),
                false,
            )
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let pm = e.c.add_card("acme", "4242424242424242", false).await;
    for (amount, code) in [
        ("1.001", Code::InvalidArgument),
        ("-5", Code::InvalidArgument),
        ("", Code::InvalidArgument),
        ("1e2", Code::InvalidArgument),
    ] {
        let err = raw
            .charge(raw_charge(amount, &pm.payment_method_id, "k"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{amount:?}");
        assert!(err.message().starts_with("amount"));
    }
    let err = raw
        .charge(raw_charge("1.00", &pm.payment_method_id, ""))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("idempotency_key"));
    let err =
        e.c.try_charge("acme", "1.00", "pm_nope", "k")
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = e.c.try_charge("ghost", "1.00", "", "k").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        e.c.payments()
            .list_charges(&acct("ghost"), 0, None)
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

/// Raw prost for the spellings: the typed client would send "25.000" as "25.00", and this
/// checks that the service itself treats them as one amount.
#[tokio::test]
async fn amounts_with_trailing_zeros_are_the_same_amount_r22() {
    let e = env_with_visa().await;
    let mut raw = e.payments.client().await;
    let p = raw
        .purchase_credits(raw::purchase("acme", "25.000", "buy-1"))
        .await
        .unwrap()
        .into_inner();
    let charge = p.charge.unwrap();
    assert_eq!(charge.amount, "25.00");
    assert_eq!(p.balance, "25.00");
    // The same purchase spelled the canonical way is the same request: a replay.
    let again = e.c.try_buy("acme", "25.00", "buy-1").await.unwrap();
    assert_eq!(again.charge.charge_id, charge.charge_id);
    let c = raw
        .charge(raw_charge("40.010", "", "ch-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.amount, "40.01");
    let same = e.c.try_charge("acme", "40.01", "", "ch-1").await.unwrap();
    assert_eq!(same.charge_id, c.charge_id);
    // Not whole cents however it is spelled.
    let err = raw
        .charge(raw_charge("40.0100001", "", "ch-2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(e.sandbox_charges().await, 2);
    assert_eq!(e.c.balance("acme").await, money("25.00"));
    e.stop().await;
}

/// A processor whose answers are lost: it makes the charge, then reports a transient
/// error, every time.
struct LostAnswers(credits_payments::processor::Sandbox);

#[tonic::async_trait]
impl credits_payments::processor::PaymentProcessor for LostAnswers {
    fn name(&self) -> &'static str {
        "lost-answers"
    }
    fn takes_raw_details(&self) -> bool {
        true
    }
    async fn tokenize_card(&self, card: &CardDetailsIn) -> Result<Tokenized, ProcessorError> {
        self.0.tokenize_card(card).await
    }
    async fn tokenize_bank_account(
        &self,
        bank: &credits_payments::domain::BankAccountDetails,
    ) -> Result<Tokenized, ProcessorError> {
        self.0.tokenize_bank_account(bank).await
    }
    async fn create_customer(&self, account: &str) -> Result<Option<String>, ProcessorError> {
        self.0.create_customer(account).await
    }
    async fn attach_method(
        &self,
        customer: &str,
        token: &str,
    ) -> Result<credits_payments::processor::AttachedMethod, ProcessorError> {
        self.0.attach_method(customer, token).await
    }
    async fn create_setup_intent(
        &self,
        customer: &str,
    ) -> Result<credits_payments::processor::SetupIntent, ProcessorError> {
        self.0.create_setup_intent(customer).await
    }
    async fn charge(
        &self,
        input: &credits_payments::processor::ChargeInput<'_>,
    ) -> Result<ProcessorCharge, ProcessorError> {
        self.0.charge(input).await?;
        Err(ProcessorError::Transient(
            "connection reset after the charge".into(),
        ))
    }
    async fn retrieve(&self, id: &str) -> Result<ProcessorCharge, ProcessorError> {
        self.0.retrieve(id).await
    }
    async fn find_by_key(
        &self,
        input: &credits_payments::processor::ChargeInput<'_>,
    ) -> Result<Option<ProcessorCharge>, ProcessorError> {
        self.0.find_by_key(input).await
    }
    async fn refund(
        &self,
        id: &str,
        amount: credits_common::Money,
        refund_id: &str,
    ) -> Result<credits_payments::processor::ProcessorRefund, ProcessorError> {
        self.0.refund(id, amount, refund_id).await
    }
    async fn find_refund(
        &self,
        id: &str,
        refund_id: &str,
    ) -> Result<Option<credits_payments::processor::ProcessorRefund>, ProcessorError> {
        self.0.find_refund(id, refund_id).await
    }
}

use credits_payments::domain::CardDetails as CardDetailsIn;
use credits_payments::processor::{ProcessorCharge, ProcessorError, Tokenized};

#[tokio::test]
async fn a_charge_the_processor_made_is_never_recorded_as_failed() {
    use credits_payments::domain::{
        AccountId, ChargeRequest, ChargeStatus, IdempotencyKey, Purpose,
    };
    let e = env_with_visa().await;
    // The daemon's own recovery loop would finish the charge through the honest sandbox;
    // stop it and drive payments directly with the processor that loses its answers.
    let database_url = e.payments.database_url.clone();
    let ledger_url = e.ledger.url();
    e.payments.shutdown.cancel();
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let svc = credits_payments::service::Payments::new(
        credits_payments::store::Store::new(pool.clone()),
        std::sync::Arc::new(LostAnswers(credits_payments::processor::Sandbox::new(
            pool.clone(),
            Default::default(),
        ))),
        LedgerServiceClient::new(credits_common::grpc::lazy_channel(&ledger_url, None).unwrap()),
        credits_common::Money::parse_positive("m", "5").unwrap(),
    );
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
                matches!(err, credits_payments::domain::PaymentsError::Unavailable(_)),
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

/// R28: an account holds at most 25 payment methods — the 26th is refused in words and
/// nothing is added — and the list is paged, in the order the methods were added.
#[tokio::test]
async fn payment_methods_are_bounded_per_account_and_listed_in_pages_r28() {
    let e = env().await;
    let mut added = Vec::new();
    for _ in 0..25 {
        added.push(
            e.c.add_card("acme", "4242424242424242", false)
                .await
                .payment_method_id,
        );
    }
    let refused =
        e.c.payments()
            .add_payment_method(
                &acct("acme"),
                &credits_tests::api::card("4242424242424242"),
                false,
            )
            .await
            .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    assert!(
        refused
            .message()
            .starts_with("payment methods: an account has at most 25"),
        "{refused}"
    );
    assert_eq!(e.c.methods("acme").await.len(), 25, "nothing added");

    // Pages of 10: 10, 10, 5, in the order added, each token leading to the next.
    let p = e.c.payments();
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut sizes = Vec::new();
    loop {
        let page = p
            .list_payment_methods_page(&acct("acme"), 10, token.as_deref())
            .await
            .unwrap();
        sizes.push(page.items.len());
        seen.extend(page.items.into_iter().map(|m| m.payment_method_id));
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(seen, added);
    // A bad page token is INVALID_ARGUMENT naming it.
    let bad = p
        .list_payment_methods_page(&acct("acme"), 10, Some("not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("page_token"), "{bad}");

    // Removing one makes room for one.
    e.c.remove_method("acme", &added[3]).await;
    e.c.add_card("acme", "4242424242424242", false).await;
    assert_eq!(e.c.methods("acme").await.len(), 25);
    e.stop().await;
}

/// R28: no call runs forever. A purchase whose processor is slower than the daemon's call
/// deadline ends `CANCELLED` ("Timeout expired") at the deadline — and, the outcome being
/// unknown to the caller, nothing is lost: the charge completes, is credited once, and
/// the caller's repeat with the same key answers it.
#[tokio::test]
async fn a_call_past_the_deadline_is_cut_and_its_purchase_still_completes_once_r28() {
    // The card goes on file through a quick processor; then payments restarts on the same
    // database with a processor slower than its call deadline.
    let e = env_with_visa().await;
    let database_url = e.payments.database_url.clone();
    e.payments.stop().await;
    let payments = Payments::start(PaymentsOptions {
        database_url: Some(database_url),
        sandbox_latency: Duration::from_millis(2500),
        call_timeout: Some(Duration::from_secs(1)),
        ..PaymentsOptions::for_ledger(&e.ledger)
    })
    .await;
    let c = Api::connect(&e.ledger.url(), &payments.url(), NOBODY, None);
    let cut = c.try_buy("acme", "25.00", "slow").await.unwrap_err();
    assert_eq!(cut.code(), Code::Cancelled, "{cut}");
    assert!(cut.message().contains("Timeout expired"), "{cut}");
    let balance = eventually(WAIT, "the purchase to be credited", || async {
        let b = c.ledger().get_account(&acct("acme")).await.ok()?.balance;
        (b != money("0.00")).then_some(b)
    })
    .await;
    assert_eq!(balance, money("25.00"));
    let mut db = payments.db().await;
    let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM sandbox_charges")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(charged, 1, "charged once");
    assert_eq!(c.entries("acme").await.len(), 1, "credited once");
    payments.stop().await;
    e.ledger.stop().await;
}

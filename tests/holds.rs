//! Holds (R15–R17) over real gRPC, PostgreSQL and RabbitMQ: reserve, capture, release,
//! expiry, access and crossings on the available balance, the top-up it triggers, and the
//! balance invariants under concurrency.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use credits_tests::api::{
    Access, BillingMode, Code, CreditSource, EntryKind, HoldStatus, UsageCategory, acct, money,
};
use credits_tests::{Ledger, System, eventually};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_hold_reserves_the_available_balance_and_a_capture_posts_the_final_cost_r15() {
    let (ledger, mut tap, c) = Ledger::tapped_with_prepaid("ledger.hold.*", "acme", "100").await;

    let h = c.hold("acme", "40", "job-1").await;
    assert_eq!((h.status, h.amount), (HoldStatus::Active, money("40")));
    assert_eq!(h.category, UsageCategory::FineTuning);
    let a = c.account("acme").await;
    assert_eq!(
        (a.balance, a.held, a.available_balance),
        (money("100"), money("40"), money("60"))
    );
    // R16: work of a given cost may start only when the available balance covers it.
    let check = |cost: &'static str| {
        let c = c.clone();
        async move {
            c.ledger()
                .check_access_for(&acct("acme"), Some(money(cost)))
                .await
                .unwrap()
        }
    };
    assert!(check("60").await.allowed);
    let no = check("60.01").await;
    assert!(!no.allowed);
    assert_eq!((no.held, no.available_balance), (money("40"), money("60")));

    // More than is available: refused, nothing changes.
    let e = c
        .try_hold("acme", "60.01", "job-2", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains("insufficient available balance"),
        "{e}"
    );
    assert_eq!(c.holds("acme").await.len(), 1);
    assert_eq!(c.account("acme").await.held, money("40"));

    // The final cost may exceed the hold: served work is always recorded.
    let cap = c.try_capture("acme", &h.hold_id, "55").await.unwrap();
    assert_eq!(cap.hold.status, HoldStatus::Captured);
    assert_eq!(cap.hold.captured_amount, Some(money("55")));
    assert_eq!(cap.entry.kind, EntryKind::Usage(UsageCategory::FineTuning));
    assert_eq!(cap.entry.reference, h.hold_id);
    assert_eq!(cap.entry.amount, money("55"));
    assert_eq!(
        (cap.balance, cap.available_balance),
        (money("45"), money("45"))
    );
    assert_eq!(
        cap.hold.entry_id.as_deref(),
        Some(cap.entry.entry_id.as_str())
    );

    // Repeating the capture answers the first result, balances included, even after
    // later postings; any other ending is refused.
    c.use_credits("acme", "5", "u-after").await;
    let again = c.try_capture("acme", &h.hold_id, "55").await.unwrap();
    assert_eq!(again, cap);
    let e = c.try_capture("acme", &h.hold_id, "50").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let e = c
        .ledger()
        .capture_hold(
            &acct("acme"),
            &h.hold_id,
            money("55"),
            "another description",
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let e = c.try_release("acme", &h.hold_id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let entries = c.entries("acme").await;
    assert_eq!(
        entries.len(),
        3,
        "the purchase, one capture, one later debit"
    );
    assert_eq!(entries[1].reference, h.hold_id);
    assert_eq!(c.balance("acme").await, money("40"));

    let created = tap.expect("ledger.hold.created", WAIT).await;
    assert_eq!(created["data"]["hold_id"], h.hold_id);
    assert_eq!(created["data"]["amount"], "40.00");
    let captured = tap.expect("ledger.hold.captured", WAIT).await;
    assert_eq!(captured["data"]["captured_amount"], "55.00");
    assert_eq!(captured["data"]["entry_id"], cap.entry.entry_id);
    tap.expect_none(Duration::from_millis(500), "one event per ending")
        .await;
    ledger.stop().await;
}

#[tokio::test]
async fn release_ends_a_hold_with_no_entry_and_expiry_is_the_ledgers_own_r15() {
    let (ledger, mut tap, c) = Ledger::tapped_with_prepaid("ledger.hold.*", "acme", "100").await;

    let h = c.hold("acme", "30", "job-1").await;
    let r = c.release("acme", &h.hold_id).await;
    assert_eq!(r.status, HoldStatus::Released);
    assert!(r.ended_at.is_some());
    let again = c.release("acme", &h.hold_id).await;
    assert_eq!(
        again.ended_at, r.ended_at,
        "a repeat answers the first result"
    );
    let e = c.try_capture("acme", &h.hold_id, "1").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // Left alone, a hold expires by itself within seconds of expires_at.
    let short = c.try_hold("acme", "20", "job-2", Some(1)).await.unwrap();
    assert_eq!(c.account("acme").await.held, money("20"));
    let expired = eventually(WAIT, "the hold to expire", || {
        let c = c.clone();
        let id = short.hold_id.clone();
        async move {
            let h = c.ledger().get_hold(&acct("acme"), &id).await.unwrap();
            (h.status == HoldStatus::Expired).then_some(h)
        }
    })
    .await;
    let late = (expired.ended_at.unwrap() - expired.expires_at).num_milliseconds();
    assert!(
        (0..5000).contains(&late),
        "expired {late} ms after expires_at"
    );
    let a = c.account("acme").await;
    assert_eq!((a.held, a.available_balance), (money("0"), money("100")));
    let e = c
        .try_capture("acme", &short.hold_id, "20")
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "a capture after expiry: {e}"
    );
    assert_eq!(
        c.entries("acme").await.len(),
        1,
        "no entry for a release or an expiry"
    );

    let keys: Vec<String> = tap.drain_field(Duration::from_secs(2), "type").await;
    assert_eq!(
        keys,
        [
            "ledger.hold.created",
            "ledger.hold.released",
            "ledger.hold.created",
            "ledger.hold.expired"
        ]
    );
    ledger.stop().await;
}

#[tokio::test]
async fn a_hold_crosses_the_threshold_and_suspends_on_the_available_balance_r16_r17() {
    let (ledger, mut tap, c) = Ledger::tapped_with_prepaid("ledger.#", "acme", "20").await;
    c.set_threshold("acme", "10").await;
    tap.expect("ledger.account.activated", WAIT).await;

    let h1 = c.hold("acme", "15", "job-1").await;
    let crossed = tap.expect("ledger.balance.threshold_crossed", WAIT).await;
    assert_eq!(crossed["data"]["hold_id"], h1.hold_id);
    assert_eq!(crossed["data"]["available_before"], "20.00");
    assert_eq!(crossed["data"]["available_after"], "5.00");
    assert_eq!(crossed["data"]["balance_after"], "20.00");

    // Holding what is left leaves nothing available: suspended (R16).
    let h2 = c.hold("acme", "5", "job-2").await;
    tap.expect("ledger.account.suspended", WAIT).await;
    let a = c.access("acme").await;
    assert_eq!((a.access, a.allowed), (Access::Suspended, false));
    assert_eq!(a.balance, money("20"));
    let e = c.try_hold("acme", "1", "job-3", None).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // Releasing gives it back.
    c.release("acme", &h2.hold_id).await;
    tap.expect("ledger.account.reactivated", WAIT).await;
    assert!(c.access("acme").await.allowed);
    // A capture below the hold makes the rest available again; no second crossing while
    // the available balance stays below the threshold.
    c.try_capture("acme", &h1.hold_id, "12").await.unwrap();
    let a = c.account("acme").await;
    assert_eq!((a.balance, a.available_balance), (money("8"), money("8")));
    let rest: Vec<String> = tap.drain_field(Duration::from_secs(1), "type").await;
    assert!(
        !rest.iter().any(|k| k == "ledger.balance.threshold_crossed"),
        "{rest:?}"
    );

    // Contract accounts always get their hold.
    c.create_account("bigco", BillingMode::Contract).await;
    let h = c.hold("bigco", "1000", "job-1").await;
    assert_eq!(h.status, HoldStatus::Active);
    assert_eq!(c.account("bigco").await.available_balance, money("-1000"));
    ledger.stop().await;
}

#[tokio::test]
async fn bad_hold_requests_get_a_clear_error_and_change_nothing_r12_r21() {
    let (ledger, c) = Ledger::with_prepaid("acme", "100").await;
    let h = c.hold("acme", "10", "job-1").await;
    // R12: same key and request, same hold; another request under the key is refused.
    assert_eq!(c.hold("acme", "10", "job-1").await.hold_id, h.hold_id);
    let e = c.try_hold("acme", "11", "job-1", None).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");

    let mut raw = ledger.client().await;
    let base = credits_proto::ledger::v1::CreateHoldRequest {
        account_id: "acme".into(),
        amount: "5".into(),
        category: credits_proto::ledger::v1::UsageCategory::FineTuning as i32,
        idempotency_key: "job-x".into(),
        description: String::new(),
        ttl_seconds: 0,
    };
    let cases = [
        ("ttl_seconds", {
            let mut r = base.clone();
            r.ttl_seconds = 604_801;
            r
        }),
        ("ttl_seconds", {
            let mut r = base.clone();
            r.ttl_seconds = -1;
            r
        }),
        ("amount", {
            let mut r = base.clone();
            r.amount = "0".into();
            r
        }),
        ("amount", {
            let mut r = base.clone();
            r.amount = "1.0000000001".into();
            r
        }),
        ("category", {
            let mut r = base.clone();
            r.category = 0;
            r
        }),
        ("description", {
            let mut r = base.clone();
            r.description = "bad\u{0}".into();
            r
        }),
        ("idempotency_key", {
            let mut r = base.clone();
            r.idempotency_key = String::new();
            r
        }),
    ];
    for (field, req) in cases {
        let s = raw.create_hold(req).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{field}: {s:?}");
        assert!(s.message().starts_with(field), "{field}: {}", s.message());
    }
    for id in ["", "not-a-uuid"] {
        let s = raw
            .capture_hold(credits_proto::ledger::v1::CaptureHoldRequest {
                account_id: "acme".into(),
                hold_id: id.into(),
                amount: "1".into(),
                description: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(s.message().starts_with("hold_id"), "{s:?}");
    }
    let ghost = uuid::Uuid::new_v4().to_string();
    let e = c
        .ledger()
        .get_hold(&acct("acme"), &ghost)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    // A hold is found only on its own account.
    c.create_account("other", BillingMode::Prepaid).await;
    let e = c.try_capture("other", &h.hold_id, "1").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = c.try_hold("ghost", "1", "k", None).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    assert_eq!(
        c.holds("acme").await.len(),
        1,
        "nothing stored by a bad request"
    );
    let a = c.account("acme").await;
    assert_eq!((a.balance, a.held), (money("100"), money("10")));
    ledger.stop().await;
}

/// Holds, captures (below, at and above), releases, expiries and debits on one account from
/// many callers: every hold ends once, balance = sum of the journal, held = sum of the
/// active holds.
#[tokio::test]
async fn holds_keep_the_balance_invariants_under_concurrency_r15() {
    let (ledger, c) = Ledger::with_account("acme", BillingMode::Contract).await;
    c.add_credits("acme", "1000", CreditSource::Grant, "grant-1")
        .await;
    c.concurrently(8, |c, w| async move {
        for i in 0..15 {
            let k = format!("w{w}-{i}");
            let ttl = (i % 5 == 0).then_some(1);
            let h = c.try_hold("acme", "3.5", &k, ttl).await.unwrap();
            c.use_credits("acme", "0.25", &format!("{k}-use")).await;
            match i % 4 {
                0 => drop(c.try_capture("acme", &h.hold_id, "2").await),
                1 => drop(c.try_capture("acme", &h.hold_id, "3.5").await),
                2 => drop(c.try_capture("acme", &h.hold_id, "5.125").await),
                _ => drop(c.try_release("acme", &h.hold_id).await),
            }
            // A racing second ending of the same hold: it never ends twice.
            let _ = c.try_release("acme", &h.hold_id).await;
        }
    })
    .await;
    // Let the one-second holds that were not ended expire.
    eventually(WAIT, "every hold to end", || {
        let c = c.clone();
        async move {
            let hs = c.holds("acme").await;
            hs.iter()
                .all(|h| h.status != HoldStatus::Active)
                .then_some(())
        }
    })
    .await;

    let mut db = ledger.db().await;
    let (balance, journal, held, active): (
        rust_decimal::Decimal,
        rust_decimal::Decimal,
        rust_decimal::Decimal,
        rust_decimal::Decimal,
    ) = sqlx::query_as(
        "SELECT a.balance,
                    (SELECT coalesce(sum(CASE WHEN kind = 'CREDIT' THEN amount ELSE -amount END), 0)
                       FROM entries e WHERE e.account_id = a.account_id),
                    a.held,
                    (SELECT coalesce(sum(amount), 0) FROM holds h
                      WHERE h.account_id = a.account_id AND h.status = 'ACTIVE')
               FROM accounts a WHERE a.account_id = 'acme'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(balance, journal, "balance = sum of the journal");
    assert_eq!(held, active, "held = sum of active holds");
    assert_eq!(held, rust_decimal::Decimal::ZERO);
    // Each captured hold has exactly one entry; no other hold has any.
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM holds h
          WHERE (SELECT count(*) FROM entries e WHERE e.reference = h.hold_id::text)
                <> CASE WHEN h.status = 'CAPTURED' THEN 1 ELSE 0 END",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(bad, 0);
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM holds GROUP BY status ORDER BY status")
            .fetch_all(&mut db)
            .await
            .unwrap();
    assert_eq!(
        statuses.iter().map(|s| s.1).sum::<i64>(),
        120,
        "{statuses:?}"
    );
    ledger.stop().await;
}

/// R17: a hold that takes the available balance below the threshold is topped up to
/// `target − available` before the job's capture.
#[tokio::test]
async fn a_hold_below_the_threshold_is_topped_up_to_target_minus_available_r17() {
    let sys = System::start(1).await;
    let c = sys.api();
    c.funded("acme").await; // $25, auto-recharge below 10 up to 50
    let h = c.hold("acme", "20", "fine-tune-1").await; // available 5
    let attempts = c.settled_attempts("acme", 1).await;
    assert_eq!(attempts[0].amount, money("45.00"), "50 − 5");
    assert_eq!(attempts[0].balance_at_trigger, money("5.00"));
    let a = c.account("acme").await;
    assert_eq!(
        (a.balance, a.held, a.available_balance),
        (money("70.00"), money("20"), money("50.00"))
    );
    let cap = c.try_capture("acme", &h.hold_id, "18.40").await.unwrap();
    assert_eq!(cap.available_balance, money("51.60"));
    sys.stop().await;
}

//! Spending controls over real gRPC, PostgreSQL and RabbitMQ: balance alerts (R18) and the
//! monthly auto-recharge limit (R19), with the month turned by moving recharge's clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use credits_tests::api::{
    AttemptStatus, AutoRechargeChange, BillingMode, Code, CreditSource, acct, money,
};
use credits_tests::{Ledger, System, eventually};

const WAIT: Duration = Duration::from_secs(20);

fn thresholds(v: &serde_json::Value) -> String {
    v["data"]["threshold"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn alerts_fire_once_per_threshold_per_crossing_under_concurrent_debits_r18() {
    let (ledger, mut tap, c) =
        Ledger::tapped_with_prepaid("ledger.balance.alert", "acme", "100").await;
    let stored = c
        .ledger()
        .set_balance_alerts(
            &acct("acme"),
            &[money("40"), money("80"), money("20.000"), money("60")],
        )
        .await
        .unwrap();
    assert_eq!(
        stored,
        [money("80"), money("60"), money("40"), money("20")],
        "highest first"
    );

    // 90 concurrent debits of $1 go through group commit in batches: 100 → 10 crosses all
    // four thresholds, each exactly once, whatever batch carries the crossing.
    c.concurrently(90, |c, i| async move {
        c.use_credits("acme", "1", &format!("u{i}")).await;
    })
    .await;
    assert_eq!(c.balance("acme").await, money("10"));
    let mut alerts = tap.drain(Duration::from_secs(2)).await;
    alerts.sort_by_key(|a| std::cmp::Reverse(money(a["data"]["threshold"].as_str().unwrap())));
    assert_eq!(
        alerts.iter().map(thresholds).collect::<Vec<_>>(),
        ["80.00", "60.00", "40.00", "20.00"]
    );
    for a in &alerts {
        let t = money(a["data"]["threshold"].as_str().unwrap());
        let before = money(a["data"]["available_before"].as_str().unwrap());
        let after = money(a["data"]["available_after"].as_str().unwrap());
        assert!(before >= t && after < t, "{a}");
        assert_eq!(
            before.as_decimal() - after.as_decimal(),
            rust_decimal::Decimal::ONE
        );
        assert!(a["data"]["entry_id"].is_string(), "{a}");
    }

    // Rising back above a threshold re-arms it; staying below fires nothing.
    c.add_credits("acme", "90", CreditSource::Grant, "grant-1")
        .await; // 100
    tap.expect_none(
        Duration::from_millis(500),
        "no alert while above every threshold",
    )
    .await;
    c.use_credits("acme", "25", "u-big").await; // 75: crosses 80 only
    let a = tap.expect("ledger.balance.alert", WAIT).await;
    assert_eq!(thresholds(&a), "80.00");
    // A hold moves the available balance too: 75 → 35 crosses 60 and 40.
    let h = c.hold("acme", "40", "job-1").await;
    let mut by_hold: Vec<_> = tap.drain(Duration::from_secs(1)).await;
    by_hold.sort_by_key(thresholds);
    assert_eq!(
        by_hold.iter().map(thresholds).collect::<Vec<_>>(),
        ["40.00", "60.00"]
    );
    assert!(by_hold.iter().all(|a| a["data"]["hold_id"] == h.hold_id));
    ledger.stop().await;
}

#[tokio::test]
async fn bad_alert_thresholds_are_refused_naming_the_field_and_store_nothing_r18() {
    let (ledger, c) = Ledger::with_account("acme", BillingMode::Prepaid).await;
    c.ledger()
        .set_balance_alerts(&acct("acme"), &[money("10")])
        .await
        .unwrap();
    let mut raw = ledger.client().await;
    let cases: [(&[&str], &str); 5] = [
        (&["1", "2", "3", "4", "5", "6"], "thresholds:"),
        (&["5", "-1"], "thresholds[1]"),
        (&["10", "10.00"], "thresholds[1]"),
        (&["abc"], "thresholds[0]"),
        (&["1.0000000001"], "thresholds[0]"),
    ];
    for (ts, field) in cases {
        let s = raw
            .set_balance_alerts(credits_proto::ledger::v1::SetBalanceAlertsRequest {
                account_id: "acme".into(),
                thresholds: ts.iter().map(|t| t.to_string()).collect(),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{ts:?}: {s:?}");
        assert!(s.message().starts_with(field), "{ts:?}: {}", s.message());
    }
    assert_eq!(c.account("acme").await.alert_thresholds, [money("10")]);
    let e = c
        .ledger()
        .set_balance_alerts(&acct("ghost"), &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Empty clears.
    c.ledger()
        .set_balance_alerts(&acct("acme"), &[])
        .await
        .unwrap();
    assert!(c.account("acme").await.alert_thresholds.is_empty());
    ledger.stop().await;
}

async fn limit(c: &credits_tests::api::Api, id: &str, monthly_limit: Option<&str>) {
    let change = AutoRechargeChange::Enable {
        threshold: money("10"),
        target: money("50"),
        monthly_limit: monthly_limit.map(money),
    };
    c.recharge()
        .set_auto_recharge(&acct(id), change)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_monthly_limit_reduces_then_skips_top_ups_until_the_month_turns_r19() {
    let (sys, mut tap, c) = System::tapped("recharge.#").await;
    c.funded("acme").await; // $25, below 10 up to 50
    limit(&c, "acme", Some("60")).await;

    c.use_credits("acme", "15.01", "u1").await; // 9.99 → +40.01 (20 of 60 left… 19.99)
    let a = c.settled_attempts("acme", 1).await;
    assert_eq!(a[0].amount, money("40.01"));
    c.use_credits("acme", "40.01", "u2").await; // 9.99: 40.01 due, 19.99 left ≥ $5: reduced
    let a = c.settled_attempts("acme", 2).await;
    assert_eq!(
        (a[0].status, a[0].amount),
        (AttemptStatus::Succeeded, money("19.99"))
    );
    assert_eq!(c.balance("acme").await, money("29.98"));

    c.use_credits("acme", "20", "u3").await; // 9.98: 40.02 due, nothing left: skipped
    let a = c.settled_attempts("acme", 3).await;
    assert_eq!(a[0].status, AttemptStatus::Skipped);
    assert_eq!(a[0].failure_code.as_deref(), Some("monthly_limit_reached"));
    assert_eq!(a[0].amount, money("40.02"), "the due amount, not charged");
    let ev = tap.expect("recharge.limit_reached", WAIT).await;
    assert_eq!(ev["data"]["monthly_limit"], "60.00");
    assert_eq!(ev["data"]["charged_this_month"], "60.00");
    assert_eq!(ev["data"]["due_amount"], "40.02");
    let s = c.recharge_settings("acme").await;
    assert!(s.enabled, "a skipped top-up never turns auto-recharge off");
    assert_eq!(s.consecutive_failures, 0, "nor counts as a failure (R11)");
    assert_eq!(
        (s.monthly_limit, s.charged_this_month),
        (Some(money("60")), money("60"))
    );
    assert_eq!(
        c.charges("acme").await.len(),
        3,
        "the purchase and two top-ups"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        c.balance("acme").await,
        money("9.98"),
        "nothing more this month"
    );

    // The month turns: still below the threshold, so it is topped up with no new crossing.
    sys.recharge_opts
        .clock
        .advance(Duration::from_secs(32 * 86_400));
    let topped = eventually(WAIT, "the top-up when the month turns", || {
        let c = c.clone();
        async move {
            let a = c.attempts("acme").await;
            (a[0].status == AttemptStatus::Succeeded && a[0].trigger == "month_turned").then_some(a)
        }
    })
    .await;
    assert_eq!(
        topped
            .iter()
            .filter(|a| a.status == AttemptStatus::Skipped)
            .count(),
        1,
        "one skip for the one crossing; the re-checks wait for the month's turn"
    );
    assert_eq!(topped[0].amount, money("40.02"));
    assert_eq!(c.balance("acme").await, money("50.00"));
    assert_eq!(
        c.recharge_settings("acme").await.charged_this_month,
        money("40.02")
    );
    sys.stop().await;
}

#[tokio::test]
async fn a_monthly_limit_below_the_minimum_purchase_is_refused_and_stores_nothing_r19() {
    let (sys, c) = System::with_funded(1, "acme").await;
    let mut raw = sys.recharge[0].client().await;
    for bad in ["4.99", "0", "-5", "abc", "1e3"] {
        let s = raw
            .set_auto_recharge(credits_proto::recharge::v1::SetAutoRechargeRequest {
                account_id: "acme".into(),
                enabled: true,
                threshold: "10".into(),
                target: "50".into(),
                monthly_limit: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{bad}: {s:?}");
        assert!(
            s.message().starts_with("monthly_limit"),
            "{bad}: {}",
            s.message()
        );
    }
    let s = c.recharge_settings("acme").await;
    assert_eq!(s.monthly_limit, None);
    // The smallest valid limit is the minimum purchase; disabling keeps it.
    limit(&c, "acme", Some("5")).await;
    let off = c.disable_recharge("acme").await;
    assert_eq!(off.monthly_limit, Some(money("5")));
    sys.stop().await;
}

//! Recharge integration tests: ledger, payments and one or two recharge replicas in
//! process, against the real PostgreSQL and RabbitMQ, over real gRPC, driven through
//! `credits-client` and the shared helpers of `credits_tests::api`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use credits_proto::recharge::v1 as pb;
use credits_tests::api::{
    Api, AttemptStatus, BillingMode, Code, CreditSource, DisabledReason, EntryKind, acct,
    assert_names, dec, money,
};
use credits_tests::{
    Ledger, Recharge, System, eventually, publish_raw, queue_depth, wait_queue_empty,
};
use rust_decimal::Decimal;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn the_seed_walkthrough_charges_once_to_reach_the_target_r8() {
    let (sys, mut tap, c) = System::tapped("recharge.#").await;
    c.funded("acme").await;
    let r = c.use_credits("acme", "15.01", "u1").await;
    assert_eq!(r.balance, money("9.99"));
    let attempts = c.settled_attempts("acme", 1).await;
    assert_eq!(attempts.len(), 1);
    let a = &attempts[0];
    assert_eq!(a.status, AttemptStatus::Succeeded);
    assert_eq!(a.amount, money("40.01"));
    assert_eq!(a.balance_at_trigger, money("9.99"));
    assert_eq!(a.trigger, "threshold_crossed");
    assert_eq!(c.balance("acme").await, money("50.00"));
    let charge_id = a.charge_id.clone().expect("the top-up's charge");
    let charges = c.charges("acme").await;
    assert_eq!(charges.len(), 2, "the purchase and exactly one top-up");
    assert_eq!(charges[0].amount, money("40.01"));
    assert_eq!(charges[0].charge_id, charge_id);
    let entries = c.entries("acme").await;
    assert_eq!(
        entries[0].kind,
        EntryKind::Credit(CreditSource::AutoRecharge)
    );
    assert_eq!(entries[0].reference, charge_id);
    let ev = tap.expect("recharge.attempt.succeeded", WAIT).await;
    assert_eq!(ev["data"]["attempt_id"], a.attempt_id);
    assert_eq!(ev["data"]["amount"], "40.01");
    assert_eq!(ev["data"]["charge_id"], charge_id);
    sys.stop().await;
}

#[tokio::test]
async fn top_ups_round_up_to_the_cent_r8() {
    let (sys, c) = System::with_funded(1, "acme").await;
    c.use_credits("acme", "15.005", "u1").await; // 9.995
    let a = c.settled_attempts("acme", 1).await;
    assert_eq!(a[0].amount, money("40.01"), "40.005 rounds up");
    assert_eq!(c.balance("acme").await, money("50.005"));
    sys.stop().await;
}

#[tokio::test]
async fn enabling_below_the_threshold_tops_up_at_once_r7() {
    let (sys, c) = System::connected(1).await;
    c.funded_with("acme", "5555555555554444", "8.00").await;
    let a = c.settled_attempts("acme", 1).await;
    assert_eq!(a[0].trigger, "enabled_below_threshold");
    assert_eq!(a[0].amount, money("42.00"));
    assert_eq!(c.balance("acme").await, money("50.00"));
    sys.stop().await;
}

#[tokio::test]
async fn usage_that_outruns_a_top_up_gets_another_r9() {
    let (sys, c) = System::with_funded(1, "acme").await;
    // Crosses, then usage lands before the top-up does: the first top-up (decided at 9.00)
    // leaves the balance below the threshold, so another follows.
    c.use_credits("acme", "16", "u1").await; // 9.00
    c.use_credits("acme", "45", "u2").await; // -36.00 (or 4.00 if the top-up landed)
    let attempts = c.settled_at_or_above("acme", 1, "10", WAIT).await;
    assert!(
        attempts
            .iter()
            .all(|a| a.status == AttemptStatus::Succeeded)
    );
    let topped: Decimal = attempts.iter().map(|a| a.amount.as_decimal()).sum();
    assert_eq!(
        c.balance("acme").await.as_decimal(),
        dec("25") - dec("61") + topped
    );
    sys.stop().await;
}

/// Found by credits-chaos: the ledger was killed just as a top-up landed, the re-check that
/// R9 needs failed, and the account stayed below its threshold with nothing scheduled.
#[tokio::test]
async fn the_re_check_after_a_top_up_survives_losing_the_worker_r9() {
    // A slow processor lets usage land before the top-up; the worker skips its immediate
    // re-check as a crash right after the success commit would.
    let sys = System::start_with(1, Duration::from_millis(2000), true).await;
    let c = sys.api();
    c.funded("acme").await;
    c.use_credits("acme", "16", "u1").await; // 9.00: crossing, top-up of 41.00 decided
    eventually(WAIT, "the first top-up to be in flight", || async {
        (!c.attempts("acme").await.is_empty()).then_some(())
    })
    .await;
    c.use_credits("acme", "45", "u2").await; // -36.00 before it lands: no new crossing
    let attempts = c.settled_at_or_above("acme", 2, "10", WAIT).await;
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(attempts[1].trigger, "threshold_crossed");
    assert_eq!(attempts[1].amount, money("41.00"));
    assert_eq!(attempts[0].trigger, "still_below_threshold");
    assert_eq!(attempts[0].balance_at_trigger, money("5.00"));
    assert_eq!(attempts[0].amount, money("45.00"));
    assert_eq!(c.balance("acme").await, money("50.00"));
    sys.stop().await;
}

#[tokio::test]
async fn settings_are_validated_r5_r6() {
    let (sys, c) = System::connected(1).await;
    c.with_card("acme", BillingMode::Prepaid, "4242424242424242")
        .await;
    let never = c.recharge_settings("acme").await;
    assert!(!never.enabled);
    assert_eq!(never.disabled_reason, DisabledReason::None);
    // Turning off what was never on succeeds and stores nothing.
    let off = c.disable_recharge("acme").await;
    assert!(!off.enabled);
    assert_eq!(off.disabled_reason, DisabledReason::None);
    // Raw prost: the typed client refuses a negative, empty or exponent amount before
    // sending, and re-spells "0.000"; the service's own validation is what is checked.
    let mut raw = sys.recharge[0].client().await;
    for (t, g, field) in [
        ("10", "10", "target"),
        ("10", "14.99", "target"),
        ("-1", "50", "threshold"),
        ("", "50", "threshold"),
        ("10", "1e2", "target"),
        ("10", "", "target"),
        // R6: a balance that stops at exactly 0.00 never goes below a threshold of 0.
        ("0", "5", "threshold"),
        ("0.000", "50", "threshold"),
    ] {
        let err = raw
            .set_auto_recharge(pb::SetAutoRechargeRequest {
                account_id: "acme".into(),
                enabled: true,
                threshold: t.into(),
                target: g.into(),
                monthly_limit: String::new(),
            })
            .await
            .unwrap_err();
        assert_names(&err, Code::InvalidArgument, field, &format!("{t} {g}"));
    }
    assert!(
        !c.recharge_settings("acme").await.enabled,
        "nothing changed"
    );
    assert!(
        c.enable_recharge("acme", "0.01", "5.01").await.is_ok(),
        "the smallest threshold, exactly the minimum apart"
    );

    c.with_card("bigco", BillingMode::Contract, "4242424242424242")
        .await;
    let err = c.enable_recharge("bigco", "10", "50").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("contract"));
    let err = c
        .recharge()
        .get_auto_recharge(&acct("ghost"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c.enable_recharge("ghost", "10", "50").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    sys.stop().await;
}

#[tokio::test]
async fn ach_default_refuses_enabling_and_turns_auto_recharge_off_r10() {
    let (sys, mut tap, c) = System::tapped("recharge.settings.disabled").await;
    c.create_account("acme", BillingMode::Prepaid).await;
    let ach = c.add_bank("acme", false).await;
    let err = c.enable_recharge("acme", "10", "50").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("US bank account"),
        "{}",
        err.message()
    );

    // A card as default works even with the bank account on file.
    let visa = c.add_card("acme", "4242424242424242", true).await;
    c.buy("acme", "25.00", "b").await;
    assert!(c.enable_recharge("acme", "10", "50").await.unwrap().enabled);

    // Making the bank account the default turns it off, with the reason recorded.
    c.set_default("acme", &ach.payment_method_id).await;
    let ev = tap.expect("recharge.settings.disabled", WAIT).await;
    assert_eq!(ev["data"]["reason"], "DEFAULT_PAYMENT_METHOD_NOT_CARD");
    let s = c.recharge_settings("acme").await;
    assert!(!s.enabled);
    assert_eq!(
        s.disabled_reason,
        DisabledReason::DefaultPaymentMethodNotCard
    );

    // Back to the card: it stays off until the user turns it on.
    c.set_default("acme", &visa.payment_method_id).await;
    c.use_credits("acme", "20", "u1").await; // crosses while off
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!c.recharge_settings("acme").await.enabled);
    assert!(
        c.attempts("acme").await.is_empty(),
        "crossings while off create no attempt"
    );

    // Removing the default card turns it off with NO_DEFAULT_PAYMENT_METHOD.
    c.enable_recharge("acme", "1", "50").await.unwrap();
    c.remove_method("acme", &visa.payment_method_id).await;
    let ev = tap.expect("recharge.settings.disabled", WAIT).await;
    assert_eq!(ev["data"]["reason"], "NO_DEFAULT_PAYMENT_METHOD");
    assert_eq!(
        c.recharge_settings("acme").await.disabled_reason,
        DisabledReason::NoDefaultPaymentMethod
    );
    sys.stop().await;
}

#[tokio::test]
async fn three_declined_top_ups_turn_auto_recharge_off_r11() {
    let (sys, mut tap, c) = System::tapped("recharge.#").await;
    c.with_card("acme", BillingMode::Prepaid, "4000000000000002")
        .await;
    c.enable_recharge("acme", "10", "50").await.unwrap(); // balance 0: below the threshold at once
    let ev = tap.expect("recharge.settings.disabled", WAIT).await;
    assert_eq!(ev["data"]["reason"], "REPEATED_FAILURES");
    let attempts = c.settled_attempts("acme", 3).await;
    assert_eq!(attempts.len(), 3);
    for a in &attempts {
        assert_eq!(a.status, AttemptStatus::Failed);
        assert_eq!(a.failure_code.as_deref(), Some("card_declined"));
        assert!(a.charge_id.is_some(), "the declined charge is recorded");
    }
    // Exactly one recharge.attempt.failed event per failed attempt, with the processor's code.
    let mut failed = Vec::new();
    while failed.len() < 3 {
        match tap.next_of("recharge.attempt.failed", WAIT).await {
            Some(ev) => failed.push(ev),
            None => break,
        }
    }
    failed.extend(
        tap.drain(Duration::from_millis(500))
            .await
            .into_iter()
            .filter(|e| e["type"] == "recharge.attempt.failed"),
    );
    let s = c.recharge_settings("acme").await;
    assert!(!s.enabled);
    assert_eq!(s.disabled_reason, DisabledReason::RepeatedFailures);
    assert_eq!(s.consecutive_failures, 3);
    assert_eq!(failed.len(), 3, "{failed:#?}");
    assert!(
        failed
            .iter()
            .all(|e| e["data"]["failure_code"] == "card_declined")
    );
    let mut ids: Vec<_> = failed
        .iter()
        .map(|e| e["data"]["attempt_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three distinct attempts");
    assert_eq!(c.balance("acme").await, money("0.00"));

    // insufficient_funds is recorded with its own code.
    c.with_card("poor", BillingMode::Prepaid, "4000000000009995")
        .await;
    c.enable_recharge("poor", "10", "50").await.unwrap();
    let a = c.settled_attempts("poor", 1).await;
    assert_eq!(
        a.last().unwrap().failure_code.as_deref(),
        Some("insufficient_funds")
    );
    sys.stop().await;
}

#[tokio::test]
async fn the_same_threshold_event_delivered_five_times_charges_once() {
    let (sys, mut tap, c) = System::tapped("ledger.balance.threshold_crossed").await;
    c.funded("acme").await;
    c.use_credits("acme", "15.01", "u1").await;
    let ev = tap.expect("ledger.balance.threshold_crossed", WAIT).await;
    let mut body = ev.clone();
    body.as_object_mut().unwrap().remove("_amqp");
    let body = serde_json::to_vec(&body).unwrap();
    for _ in 0..5 {
        publish_raw(
            &sys.ledger.exchange,
            "ledger.balance.threshold_crossed",
            &body,
        )
        .await;
    }
    let a = c.settled_attempts("acme", 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.attempts("acme").await.len(), 1);
    assert_eq!(a[0].amount, money("40.01"));
    assert_eq!(c.charges("acme").await.len(), 2);
    assert_eq!(c.balance("acme").await, money("50.00"));
    sys.stop().await;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_the_worker_keeps_working() {
    let (sys, c) = System::with_funded(1, "acme").await;
    publish_raw(
        &sys.ledger.exchange,
        "ledger.balance.threshold_crossed",
        b"{not json",
    )
    .await;
    publish_raw(&sys.ledger.exchange, "payments.payment_method.default_changed", br#"{"id":"x","type":"payments.payment_method.default_changed","account_id":"acme","data":{}}"#).await;
    let dlq = format!("{}.dlq", sys.recharge_opts.queue);
    let depth = eventually(WAIT, "poison messages in the dead-letter queue", || {
        let dlq = dlq.clone();
        async move {
            let n = queue_depth(&dlq).await;
            (n >= 2).then_some(n)
        }
    })
    .await;
    assert_eq!(depth, 2);
    c.use_credits("acme", "15.01", "u1").await;
    let a = c.settled_attempts("acme", 1).await;
    assert_eq!(a[0].status, AttemptStatus::Succeeded);
    assert_eq!(c.balance("acme").await, money("50.00"));

    // The operator's view (`credits dlq list`): both, why, how often; nothing taken.
    let queue = &sys.recharge_opts.queue;
    let amqp = credits_tests::AMQP_URL;
    let listed = credits_recharge::dlq::list(amqp, queue, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|d| d.reason.as_deref() == Some("rejected") && d.count == Some(1)),
        "{listed:?}"
    );
    assert!(listed.iter().any(|d| d.body == b"{not json"));
    assert_eq!(queue_depth(&dlq).await, 2);
    // `credits dlq replay --id` of an id that is not there moves nothing.
    assert_eq!(
        credits_recharge::dlq::replay(amqp, queue, Some("nope"))
            .await
            .unwrap(),
        0
    );
    assert_eq!(queue_depth(&dlq).await, 2);
    // Replayed, they reach the worker again, which dead-letters them again: a second death.
    assert_eq!(
        credits_recharge::dlq::replay(amqp, queue, None)
            .await
            .unwrap(),
        2
    );
    eventually(
        WAIT,
        "both poison messages dead-lettered a second time",
        || async {
            let l = credits_recharge::dlq::list(amqp, queue, 10).await.unwrap();
            (l.len() == 2 && l.iter().all(|d| d.count == Some(2))).then_some(())
        },
    )
    .await;
    sys.stop().await;
}

#[tokio::test]
async fn a_worker_killed_between_charge_and_credit_resumes_with_one_charge_and_one_credit() {
    let mut sys = System::start(0).await;
    let crashing = Recharge::start(credits_tests::RechargeOptions {
        stop_after_charge: true,
        ..sys.recharge_opts.clone()
    })
    .await;
    let c = Api::connect(
        &sys.ledger.url(),
        &sys.payments.url(),
        &crashing.url(),
        None,
    );
    c.funded("acme").await;
    c.use_credits("acme", "15.01", "u1").await;
    // The card is charged, then the worker "dies" before crediting.
    let charges = eventually(WAIT, "the top-up charge", || async {
        let ch = c.charges("acme").await;
        (ch.len() == 2).then_some(ch)
    })
    .await;
    assert_eq!(charges[0].amount, money("40.01"));
    assert_eq!(c.balance("acme").await, money("9.99"), "not credited yet");
    crashing.stop().await;

    // A healthy worker on the same database resumes the attempt with the same keys.
    sys.recharge
        .push(Recharge::start(sys.recharge_opts.clone()).await);
    let c = sys.api();
    let a = c.settled_attempts("acme", 1).await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].status, AttemptStatus::Succeeded);
    assert_eq!(c.balance("acme").await, money("50.00"));
    assert_eq!(c.charges("acme").await.len(), 2, "one top-up charge");
    let credits = c
        .entries("acme")
        .await
        .into_iter()
        .filter(|e| e.kind == EntryKind::Credit(CreditSource::AutoRecharge))
        .count();
    assert_eq!(credits, 1, "one top-up credit");
    sys.stop().await;
}

#[tokio::test]
async fn a_usage_storm_with_two_replicas_charges_exactly_what_it_credits() {
    let (sys, c) = System::with_funded(2, "acme").await;
    c.concurrently(200, |c, i| async move {
        // Spread the storm over ~2 s so the balance crosses the threshold again and
        // again while top-ups are landing.
        tokio::time::sleep(Duration::from_millis(i as u64 * 10)).await;
        c.use_credits("acme", "1.37", &format!("storm-{i}")).await;
    })
    .await;
    // Quiescence: nothing in flight and the balance back at or above the threshold.
    let attempts = c
        .settled_at_or_above("acme", 1, "10", Duration::from_secs(60))
        .await;
    let succeeded: Vec<_> = attempts
        .iter()
        .filter(|a| a.status == AttemptStatus::Succeeded)
        .collect();
    assert_eq!(
        succeeded.len(),
        attempts.len(),
        "no failures with a good card"
    );
    // How many top-ups depends on how fast they land against the storm (a loaded machine
    // makes fewer, larger ones, R9); at least two shows a crossing after a top-up.
    assert!(
        succeeded.len() >= 2,
        "the storm crossed the threshold repeatedly ({} top-ups)",
        succeeded.len()
    );
    let top_up_charges: Vec<_> = c
        .charges("acme")
        .await
        .into_iter()
        .filter(|ch| ch.description.starts_with("auto-recharge"))
        .collect();
    let entries = c.entries("acme").await;
    let top_up_credits: Vec<_> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Credit(CreditSource::AutoRecharge))
        .collect();
    assert_eq!(
        top_up_charges.len(),
        succeeded.len(),
        "charges = attempts succeeded"
    );
    assert_eq!(
        top_up_credits.len(),
        succeeded.len(),
        "credits = attempts succeeded"
    );
    let mut charge_ids: Vec<_> = top_up_charges
        .iter()
        .map(|ch| ch.charge_id.clone())
        .collect();
    let mut credit_refs: Vec<_> = top_up_credits.iter().map(|e| e.reference.clone()).collect();
    charge_ids.sort();
    credit_refs.sort();
    assert_eq!(charge_ids, credit_refs, "every charge has its credit");
    let topped: Decimal = succeeded.iter().map(|a| a.amount.as_decimal()).sum();
    let used = dec("1.37") * Decimal::from(200);
    assert_eq!(
        c.balance("acme").await.as_decimal(),
        dec("25") + topped - used,
        "balance = purchases + top-ups - usage"
    );
    // The processor agrees: one sandbox charge per top-up plus the purchase.
    let mut db = sys.payments.db().await;
    let processor_charges: i64 = sqlx::query_scalar("SELECT count(*) FROM sandbox_charges")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(processor_charges as usize, succeeded.len() + 1);
    sys.stop().await;
}

/// The ledger's threshold for the account, read from its database.
async fn ledger_threshold(sys: &System, id: &str) -> Option<Decimal> {
    let mut db = sys.ledger.db().await;
    sqlx::query_scalar("SELECT threshold FROM accounts WHERE account_id = $1")
        .bind(id)
        .fetch_one(&mut db)
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_settings_changes_leave_ledger_and_settings_agreeing_r6() {
    let (sys, c) = System::connected(2).await;
    let accounts: Vec<String> = (0..10).map(|i| format!("acct-{i}")).collect();
    for id in &accounts {
        c.funded(id).await;
    }
    let mut calls = Vec::new();
    for id in &accounts {
        for (i, threshold) in ["10", "11", "12", "13"].into_iter().enumerate() {
            // Through both replicas, as two browser tabs or two services would.
            let r = Api::connect(
                &sys.ledger.url(),
                &sys.payments.url(),
                &sys.recharge[i % 2].url(),
                None,
            );
            let id = id.clone();
            calls.push(tokio::spawn(async move {
                r.enable_recharge(&id, threshold, "50").await.map(|_| ())
            }));
        }
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    for id in &accounts {
        let s = c.recharge_settings(id).await;
        assert!(s.enabled);
        assert_eq!(
            ledger_threshold(&sys, id).await,
            s.threshold.map(|t| t.as_decimal()),
            "{id}: the ledger follows the stored settings"
        );
    }
    sys.stop().await;
}

#[tokio::test]
async fn the_reconciler_repairs_a_ledger_threshold_that_drifted() {
    let (sys, c) = System::with_funded(1, "acme").await;
    c.enable_recharge("acme", "10", "50").await.unwrap();
    // Something outside recharge (an operator, a half-applied save) moves the threshold.
    c.set_threshold("acme", "3").await;
    let repaired = eventually(WAIT, "the reconciler to repair the threshold", || async {
        (ledger_threshold(&sys, "acme").await == Some(dec("10"))).then_some(())
    })
    .await;
    assert_eq!(repaired, ());
    sys.stop().await;
}

/// A funded "acme" (auto-recharge below 10 up to 50) whose only recharge worker has
/// stopped.
async fn funded_while_recharge_is_away() -> (System, Api) {
    let (mut sys, c) = System::with_funded(1, "acme").await;
    c.enable_recharge("acme", "10", "50").await.unwrap();
    sys.recharge.pop().unwrap().stop().await;
    (sys, c)
}

/// Waits until the ledger's outbox is empty: what it recorded has gone to the broker.
async fn crossing_left_the_ledger(ledger: &Ledger) {
    eventually(
        WAIT,
        "the crossing to leave the ledger's outbox",
        || async { (ledger.outbox_len().await == 0).then_some(()) },
    )
    .await;
}

/// With a recharge worker back, the crossing (seen as `trigger`) is topped up to the
/// target; then everything stops.
async fn topped_up_then_stop(sys: System, trigger: &str) {
    let c = sys.api();
    let a = c.settled_attempts("acme", 1).await;
    assert_eq!(a[0].status, AttemptStatus::Succeeded);
    assert_eq!(a[0].trigger, trigger);
    assert_eq!(c.balance("acme").await, money("50.00"));
    sys.stop().await;
}

#[tokio::test]
async fn a_crossing_is_acknowledged_once_recorded_and_topped_up_after_a_ledger_outage() {
    let (sys, c) = funded_while_recharge_is_away().await;
    let System {
        ledger,
        payments,
        recharge_opts,
        ..
    } = sys;
    // Recharge is away while the crossing happens, then the ledger goes away too.
    c.use_credits("acme", "15.01", "u1").await;
    // The crossing has left the ledger (it waits in the queue) before the ledger goes.
    crossing_left_the_ledger(&ledger).await;
    let restart = ledger.restart_options();
    ledger.stop().await;
    let recharge = Recharge::start(recharge_opts.clone()).await;
    // The crossing is acknowledged with the ledger still down: it is recorded as due.
    wait_queue_empty(
        &recharge_opts.queue,
        WAIT,
        "the crossing to be acknowledged",
    )
    .await;
    let url = recharge_opts.database_url.clone();
    let due = eventually(WAIT, "the crossing to be recorded as a due check", || {
        let url = url.clone();
        async move {
            let mut db = credits_tests::pg_connect(&url).await;
            let due: Option<String> =
                sqlx::query_scalar("SELECT due_trigger FROM settings WHERE account_id = 'acme'")
                    .fetch_one(&mut db)
                    .await
                    .unwrap();
            due
        }
    })
    .await;
    assert_eq!(due, "threshold_crossed");
    // Acknowledged: nothing ready nor waiting for an ack in the queue.
    wait_queue_empty(
        &recharge_opts.queue,
        WAIT,
        "the crossing to be acknowledged",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ledger = credits_tests::Ledger::start_with(restart).await;
    let sys = System {
        ledger,
        payments,
        recharge: vec![recharge],
        recharge_opts,
    };
    topped_up_then_stop(sys, "threshold_crossed").await;
}

#[tokio::test]
async fn a_crossing_lost_upstream_is_found_by_the_reconciler_r9() {
    let (mut sys, c) = funded_while_recharge_is_away().await;
    // The queue is gone while the crossing is published: the event is parked, not lost
    // from the outbox, but it never reaches recharge.
    credits_tests::delete_queues(&sys.recharge_opts.queue).await;
    c.use_credits("acme", "15.01", "u1").await;
    crossing_left_the_ledger(&sys.ledger).await;
    sys.recharge
        .push(Recharge::start(sys.recharge_opts.clone()).await);
    topped_up_then_stop(sys, "found_below_threshold").await;
}

#[tokio::test]
async fn a_late_bank_default_event_does_not_undo_a_newer_choice_r10() {
    let (sys, c) = System::with_funded(1, "acme").await;
    let bank = c.add_bank("acme", true).await;
    eventually(
        WAIT,
        "the bank default to turn auto-recharge off",
        || async { (!c.recharge_settings("acme").await.enabled).then_some(()) },
    )
    .await;
    // The user switches back to a card and turns auto-recharge on again ...
    let visa = c.add_card("acme", "5555555555554444", true).await;
    c.enable_recharge("acme", "10", "50").await.unwrap();
    // ... and only now does an old "default is a bank account" event arrive.
    let late = serde_json::json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "payments.payment_method.default_changed",
        "occurred_at": "2026-01-01T00:00:00Z",
        "account_id": "acme",
        "data": { "payment_method_id": bank.payment_method_id, "type": "US_BANK_ACCOUNT" },
    });
    publish_raw(
        &sys.ledger.exchange,
        "payments.payment_method.default_changed",
        &serde_json::to_vec(&late).unwrap(),
    )
    .await;
    wait_queue_empty(
        &sys.recharge_opts.queue,
        WAIT,
        "the late event to be consumed",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = c.recharge_settings("acme").await;
    assert!(s.enabled, "the newer choice stands: {s:?}");
    assert!(!visa.payment_method_id.is_empty());
    sys.stop().await;
}

/// The system's recharge database, migrated by a recharge that is not left running, with
/// auto-recharge on for "acme" (threshold 10, target 50).
async fn recharge_db_with_acme(sys: &System) -> sqlx::PgPool {
    let opts = sys.recharge_opts.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let cfg = credits_recharge::Config::new(
        &opts.database_url,
        credits_tests::AMQP_URL,
        &opts.ledger_url,
        &opts.payments_url,
    );
    drop(credits_recharge::App::build(cfg, &shutdown).await.unwrap());
    let pool = sqlx::PgPool::connect(&opts.database_url).await.unwrap();
    sqlx::query("INSERT INTO settings (account_id, enabled, threshold, target) VALUES ('acme', true, 10, 50)")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

/// R9 after a success: the check is due when the balance read after the credit is still
/// below the current threshold, when the ledger sent none, or when a crossing was parked
/// while the attempt ran; not otherwise. A crossing parks only while an attempt is in
/// flight.
#[tokio::test]
async fn a_success_rechecks_only_when_usage_outran_it_or_a_crossing_waited_r9() {
    use credits_common::Money;
    use credits_recharge::store::Store;
    let sys = System::start(0).await;
    let pool = recharge_db_with_acme(&sys).await;
    let m = |s: &str| Money::new(s.parse::<Decimal>().unwrap());
    let due = || async {
        sqlx::query_as::<_, (Option<String>, bool)>(
            "SELECT due_trigger, retry_at IS NOT NULL FROM settings WHERE account_id = 'acme'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    // A success's own transaction: whether it made the re-check due.
    let succeed = |available: Option<Money>| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let due = Store::after_success(&mut tx, "acme", available)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            due
        }
    };
    for (available, want) in [
        (Some(m("50.00")), false),
        (Some(m("10.00")), false),
        (Some(m("9.99")), true),
        (None, true),
    ] {
        sqlx::query("UPDATE settings SET due_trigger = NULL, retry_at = NULL")
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(succeed(available).await, want, "{available:?}");
        let (trigger, scheduled) = due().await;
        assert_eq!(trigger.is_some(), want);
        assert_eq!(scheduled, want);
    }

    // No attempt in flight: a crossing is not parked (it is decided as usual).
    sqlx::query("UPDATE settings SET due_trigger = NULL, retry_at = NULL")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(!Store::park_due(&mut tx, "acme", "ev-1").await.unwrap());
    tx.commit().await.unwrap();
    assert_eq!(due().await, (None, false));
    // In flight: parked, left alone by the sweeper, and due once the attempt succeeds even
    // though the credit left the balance above the threshold.
    sqlx::query("INSERT INTO attempts (attempt_id, account_id, trigger, balance_at_trigger, amount, status) VALUES ('att_1', 'acme', 'threshold_crossed', 9.99, 40.01, 'CHARGING')")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(Store::park_due(&mut tx, "acme", "ev-2").await.unwrap());
    tx.commit().await.unwrap();
    assert_eq!(due().await, (Some("threshold_crossed".into()), false));
    let store = Store::new(pool.clone());
    assert!(
        store.due_checks(100, 0.0).await.unwrap().is_empty(),
        "a parked check waits for the attempt"
    );
    assert!(succeed(Some(m("50.00"))).await);
    assert_eq!(due().await, (Some("still_below_threshold".into()), true));

    // A crossing recorded as a due check (the ledger was slow) and then found with the
    // attempt in flight is parked the same way, and re-checked after the success.
    sqlx::query("UPDATE settings SET due_trigger = NULL, retry_at = NULL")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(
        Store::mark_due(
            &mut tx,
            "acme",
            credits_recharge::domain::Trigger::ThresholdCrossed,
            Some("ev-3")
        )
        .await
        .unwrap()
    );
    tx.commit().await.unwrap();
    let revision: i64 = sqlx::query_scalar("SELECT revision FROM settings")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    // A park from a read older than the row does nothing.
    Store::park_due_at(&mut conn, "acme", revision - 1)
        .await
        .unwrap();
    assert_eq!(due().await, (Some("threshold_crossed".into()), true));
    Store::park_due_at(&mut conn, "acme", revision)
        .await
        .unwrap();
    drop(conn);
    assert_eq!(due().await, (Some("threshold_crossed".into()), false));
    assert!(succeed(Some(m("50.00"))).await);
    assert_eq!(due().await, (Some("still_below_threshold".into()), true));
    sys.stop().await;
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_cannot_move_the_attempt_on() {
    use credits_recharge::domain::AttemptStatus;
    use credits_recharge::store::Store;
    let sys = System::start(0).await;
    let c = sys.api(); // no recharge replica: only the ledger is called
    c.create_account("acme", BillingMode::Prepaid).await;
    // A recharge database with one in-flight attempt, and no worker to take it.
    let pool = recharge_db_with_acme(&sys).await;
    sqlx::query("INSERT INTO attempts (attempt_id, account_id, trigger, balance_at_trigger, amount, status) VALUES ('att_1', 'acme', 'threshold_crossed', 9.99, 40.01, 'PENDING')")
        .execute(&pool)
        .await
        .unwrap();
    let store = Store::new(pool.clone());
    let first = store
        .claim("att_1", Duration::from_millis(100))
        .await
        .unwrap()
        .expect("first worker takes the lease");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = store
        .claim("att_1", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the lease ran out: another worker takes it");
    // The first worker wakes up (it was paused past its lease): every write is refused.
    assert!(!store.defer(&first, Duration::from_secs(1)).await.unwrap());
    let mut tx = pool.begin().await.unwrap();
    assert!(
        Store::finish(&mut tx, &first, AttemptStatus::FAILED, None, "x", 0.0)
            .await
            .unwrap()
            .is_none()
    );
    tx.rollback().await.unwrap();
    // The current owner's writes go through.
    assert!(store.defer(&second, Duration::ZERO).await.unwrap());
    let mut tx = pool.begin().await.unwrap();
    assert!(
        Store::finish(
            &mut tx,
            &second,
            AttemptStatus::SUCCEEDED,
            Some("ch_1"),
            "",
            0.0
        )
        .await
        .unwrap()
        .is_some()
    );
    tx.commit().await.unwrap();
    sys.stop().await;
}

/// The trace id of an event as the tap saw it (its `traceparent` AMQP header).
fn trace_of(ev: &serde_json::Value) -> Option<String> {
    let tp = ev["_amqp"]["traceparent"].as_str()?;
    Some(tp.split('-').nth(1)?.to_owned())
}

/// One trace runs from the gateway's `RecordUsage` through the crossing event, the recharge
/// decision, the charge and the credit: each event of the top-up carries the trace id the
/// gateway sent (W3C `traceparent` on gRPC, in the outbox, on AMQP), and calls made
/// without one start traces of their own.
#[tokio::test]
async fn one_trace_runs_from_the_usage_through_the_crossing_to_the_top_up() {
    let (sys, mut tap, c) = System::tapped("#").await;
    c.funded("acme").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(credits_tests::raw::usage("acme", "15.01", "u1", "chat"));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    sys.ledger.client().await.record_usage(req).await.unwrap();
    c.settled_attempts("acme", 1).await;

    let want = [
        "ledger.balance.threshold_crossed",
        "payments.charge.succeeded",
        "recharge.attempt.succeeded",
    ];
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while want
        .iter()
        .any(|k| !seen.iter().any(|(kind, t)| kind == k && t == trace_id))
        && tokio::time::Instant::now() < deadline
    {
        for ev in tap.drain(Duration::from_millis(200)).await {
            let kind = ev["type"].as_str().unwrap_or_default().to_owned();
            seen.push((kind, trace_of(&ev).unwrap_or_default()));
        }
    }
    for kind in want {
        assert!(
            seen.iter().any(|(k, t)| k == kind && t == trace_id),
            "{kind} in the gateway's trace: {seen:#?}"
        );
    }
    // The purchase before it ran in a trace of its own (the client sent none) — one that
    // went on from payments into the ledger's AddCredits, whose SQL wrote the activation.
    let purchase = seen
        .iter()
        .find(|(k, _)| k == "payments.charge.succeeded")
        .expect("the purchase's charge");
    assert_ne!(purchase.1, trace_id, "{seen:#?}");
    assert_eq!(purchase.1.len(), 32, "{seen:#?}");
    let activated = seen
        .iter()
        .find(|(k, _)| k == "ledger.account.activated")
        .expect("the purchase's activation");
    assert_eq!(activated.1, purchase.1, "{seen:#?}");

    // A malformed traceparent is ignored, never refused: the call starts its own trace.
    for junk in [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".to_owned(),
        format!("ff-{trace_id}-00f067aa0ba902b7-01"),
        "x".repeat(8000),
    ] {
        let mut req = tonic::Request::new(credits_tests::raw::usage(
            "acme",
            "0.01",
            &junk[..8],
            "chat",
        ));
        req.metadata_mut()
            .insert("traceparent", junk.parse().unwrap());
        sys.ledger.client().await.record_usage(req).await.unwrap();
    }
    sys.stop().await;
}

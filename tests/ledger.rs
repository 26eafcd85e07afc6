//! Ledger integration tests: an in-process ledger on port 0, its own database and
//! exchange, the machine's real PostgreSQL and RabbitMQ, driven over real gRPC through
//! `credits-client` and the shared helpers of `credits_tests::api`. Raw prost remains
//! only for what a typed client cannot send (invalid amounts, unknown enum numbers,
//! control characters in keys, bytes that are not UTF-8).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use credits_proto::ledger::v1 as pb;
use credits_tests::api::{
    Access, Api, BillingMode, Code, CreditSource, CreditsToAdd, EntryKind, UsageCategory, acct,
    assert_says, dec, key, money, usage,
};
use credits_tests::raw;
use credits_tests::{
    EventTap, Ledger, LedgerOptions, NOBODY, channel, health_status, kill_amqp_connections,
};
use rust_decimal::Decimal;
use tonic_health::pb::health_check_response::ServingStatus;

const EVENT_WAIT: Duration = Duration::from_secs(10);

/// A raw usage request, for input the typed client refuses to send.
fn usage_req(id: &str, amount: &str, key: &str) -> pb::RecordUsageRequest {
    raw::usage(id, amount, key, "chat completions")
}

/// Balance recomputed from the journal in SQL, for the "balance = sum of journal" invariant.
async fn journal_sum(ledger: &Ledger, id: &str) -> (Decimal, Decimal) {
    let mut db = ledger.db().await;
    sqlx::query_as::<_, (Decimal, Decimal)>(
        "SELECT a.balance, COALESCE(sum(CASE e.kind WHEN 'CREDIT' THEN e.amount ELSE -e.amount END), 0)
         FROM accounts a LEFT JOIN entries e USING (account_id) WHERE a.account_id = $1 GROUP BY a.balance",
    )
    .bind(id)
    .fetch_one(&mut db)
    .await
    .unwrap()
}

#[tokio::test]
async fn new_prepaid_account_has_no_access_until_first_purchase_r3() {
    let ledger = Ledger::start().await;
    let c = ledger.api();
    // Raw prost: the typed client always names a billing mode; an unspecified one must
    // default to prepaid.
    ledger
        .client()
        .await
        .create_account(pb::CreateAccountRequest {
            account_id: "acme".into(),
            billing_mode: pb::BillingMode::Unspecified as i32,
            display_name: "acme Inc.".into(),
        })
        .await
        .unwrap();
    let acct = c.account("acme").await;
    assert_eq!(acct.billing_mode, BillingMode::Prepaid);
    assert_eq!(acct.access, Access::PendingFirstPurchase);
    assert_eq!(acct.balance, money("0.00"));
    assert!(!c.access("acme").await.allowed);

    // A grant is not a purchase: still no access.
    c.add_credits("acme", "3.00", CreditSource::Grant, "grant-1")
        .await;
    let a = c.access("acme").await;
    assert!(!a.allowed);
    assert_eq!(a.access, Access::PendingFirstPurchase);

    let r = c
        .add_credits("acme", "25.00", CreditSource::Purchase, "buy-1")
        .await;
    assert_eq!(r.balance, money("28.00"));
    let a = c.access("acme").await;
    assert!(a.allowed);
    assert_eq!(a.access, Access::Active);
    ledger.stop().await;
}

/// Several broker nodes in `AMQP_URL` (a cluster's, comma-separated): the relay connects
/// to one that answers, skipping a node that refuses, so events still go out; the logs name
/// every node without its password.
#[tokio::test]
async fn events_go_out_through_a_live_node_when_the_url_names_several() {
    let dead = "amqp://guest:guest@127.0.0.1:1/%2f";
    let ledger = Ledger::start_with(LedgerOptions {
        amqp_url: Some(format!("{dead}, {}", credits_tests::AMQP_URL)),
        ..Default::default()
    })
    .await;
    let mut tap = EventTap::bind(&ledger.exchange, "ledger.account.*").await;
    let c = ledger.api();
    // Each connection starts from the next node: whichever the relay met first, a few
    // events make it try both.
    for i in 0..3 {
        c.prepaid(&format!("acme-{i}"), "5.00").await;
        let ev = tap.expect("ledger.account.activated", EVENT_WAIT).await;
        assert_eq!(ev["account_id"], format!("acme-{i}"));
        kill_amqp_connections(&ledger.connection_name).await;
    }
    ledger.stop().await;
}

#[tokio::test]
async fn unrouted_events_are_parked_in_a_quorum_queue_or_in_the_classic_one_already_there() {
    // Nothing bound to a fresh exchange: the account's events are parked, in a queue
    // replicated across a cluster's nodes.
    let ledger = Ledger::start().await;
    ledger.api().prepaid("acme", "5.00").await;
    let parking = format!("{}.unrouted", ledger.exchange);
    credits_tests::eventually(EVENT_WAIT, "an event parked", || async {
        (credits_tests::try_queue_depth(&parking).await >= Some(1)).then_some(())
    })
    .await;
    assert_eq!(credits_tests::queue_type(&parking).await, "quorum");
    ledger.stop().await;
    credits_tests::delete_queues(&parking).await;

    // One an earlier release declared classic cannot change type in place: it is used as
    // it is, and nothing is lost.
    let exchange = credits_tests::unique("credits.events.test");
    let parking = format!("{exchange}.unrouted");
    credits_tests::declare_classic_queue(&parking).await;
    let ledger = Ledger::start_with(LedgerOptions {
        exchange: Some(exchange),
        ..Default::default()
    })
    .await;
    ledger.api().prepaid("acme", "5.00").await;
    credits_tests::eventually(
        EVENT_WAIT,
        "an event parked in the classic queue",
        || async { (credits_tests::try_queue_depth(&parking).await >= Some(1)).then_some(()) },
    )
    .await;
    assert_eq!(credits_tests::queue_type(&parking).await, "classic");
    ledger.stop().await;
    credits_tests::delete_queues(&parking).await;
}

#[tokio::test]
async fn usage_past_zero_is_recorded_suspends_and_credits_reactivate_r4() {
    let (ledger, mut tap, c) =
        Ledger::tapped_with_prepaid("ledger.account.*", "acme", "5.00").await;
    tap.expect("ledger.account.activated", EVENT_WAIT).await;

    let r = c.use_credits("acme", "4.999999999", "u1").await;
    assert!(r.allowed);
    assert_eq!(r.balance, money("0.000000001"));
    // Served usage is recorded even though it takes the balance below zero.
    let r = c.use_credits("acme", "2", "u2").await;
    assert!(!r.allowed);
    assert_eq!(r.balance, money("-1.999999999"));
    assert_eq!(r.entry.balance_after, money("-1.999999999"));
    assert_eq!(c.access("acme").await.access, Access::Suspended);
    let ev = tap.expect("ledger.account.suspended", EVENT_WAIT).await;
    assert_eq!(ev["data"]["balance"], "-1.999999999");

    // Exactly zero is still suspended.
    c.add_credits("acme", "1.999999999", CreditSource::Adjustment, "adj-1")
        .await;
    assert!(!c.access("acme").await.allowed);
    c.add_credits("acme", "0.01", CreditSource::Purchase, "buy-2")
        .await;
    assert!(c.access("acme").await.allowed);
    let ev = tap.expect("ledger.account.reactivated", EVENT_WAIT).await;
    assert_eq!(ev["account_id"], "acme");
    assert_eq!(ev["data"]["balance"], "0.01");
    ledger.stop().await;
}

#[tokio::test]
async fn contract_accounts_are_never_suspended_r5() {
    let ledger = Ledger::start().await;
    let mut tap = EventTap::bind(&ledger.exchange, "ledger.account.*").await;
    let c = ledger.api();
    let acct = c.create_account("bigco", BillingMode::Contract).await;
    assert_eq!(acct.access, Access::Active);
    let r = c.use_credits("bigco", "1000.50", "u1").await;
    assert!(r.allowed);
    assert_eq!(r.balance, money("-1000.50"));
    assert!(c.access("bigco").await.allowed);
    tap.expect_none(
        Duration::from_secs(1),
        "contract accounts get no access events",
    )
    .await;
    ledger.stop().await;
}

#[tokio::test]
async fn create_account_is_idempotent_but_refuses_different_settings() {
    let ledger = Ledger::start().await;
    let c = ledger.api();
    let a = c.create_account("acme", BillingMode::Prepaid).await;
    let b = c.create_account("acme", BillingMode::Prepaid).await;
    assert_eq!(a.created_at, b.created_at);
    let err = c
        .ledger()
        .create_account(&acct("acme"), BillingMode::Contract, "acme Inc.")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = c.ledger().get_account(&acct("nobody")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    ledger.stop().await;
}

#[tokio::test]
async fn same_key_same_request_returns_first_result_different_request_is_rejected_r12() {
    let (ledger, c) = Ledger::with_prepaid("acme", "10").await;
    c.create_account("other", BillingMode::Prepaid).await;
    let first = c.use_credits("acme", "1.25", "req-1").await;
    c.use_credits("acme", "1", "req-2").await;
    let again = c.use_credits("acme", "1.250", "req-1").await;
    assert_eq!(first.entry, again.entry, "replay returns the first entry");
    assert_eq!(again.entry.balance_after, money("8.75"));

    let err = c
        .try_use_credits("acme", "2.00", "req-1")
        .await
        .unwrap_err();
    assert_says(&err, Code::AlreadyExists, "idempotency_key");
    // A credit reusing a usage key is a different request too.
    let err = c
        .ledger()
        .add_credits(&CreditsToAdd {
            account_id: acct("acme"),
            amount: money("1.25"),
            source: CreditSource::Grant,
            reference: String::new(),
            idempotency_key: key("req-1"),
            description: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(c.access("acme").await.balance, money("7.75"));
    assert_eq!(c.entries("acme").await.len(), 3);

    // Keys are scoped per account.
    c.add_credits("other", "5", CreditSource::Purchase, "buy")
        .await;
    assert_eq!(
        c.use_credits("other", "1", "req-1").await.balance,
        money("4.00")
    );
    ledger.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_duplicates_post_once_r12() {
    let (ledger, c) = Ledger::with_prepaid("acme", "100").await;
    let ids = c
        .concurrently(50, |c, i| async move {
            if i % 2 == 0 {
                c.try_use_credits("acme", "0.5", "dup")
                    .await
                    .map(|r| r.entry.entry_id)
            } else {
                c.ledger()
                    .add_credits(&CreditsToAdd {
                        account_id: acct("acme"),
                        amount: money("7"),
                        source: CreditSource::Purchase,
                        reference: "ch_1".into(),
                        idempotency_key: key("dup-credit"),
                        description: String::new(),
                    })
                    .await
                    .map(|r| r.entry.entry_id)
            }
        })
        .await;
    let mut usage_ids = std::collections::HashSet::new();
    let mut credit_ids = std::collections::HashSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let id = id.expect("every duplicate succeeds");
        if i % 2 == 0 {
            usage_ids.insert(id)
        } else {
            credit_ids.insert(id)
        };
    }
    assert_eq!(usage_ids.len(), 1);
    assert_eq!(credit_ids.len(), 1);
    assert_eq!(c.entries("acme").await.len(), 3);
    assert_eq!(c.access("acme").await.balance, money("106.50"));
    ledger.stop().await;
}

#[tokio::test]
async fn concurrent_usage_on_one_account_keeps_balance_equal_to_journal() {
    let (ledger, c) = Ledger::with_prepaid("hot", "50").await;
    c.concurrently(200, |c, i| async move {
        c.use_credits("hot", "0.333333333", &format!("u{i}")).await
    })
    .await;
    let expected = dec("50") - dec("0.333333333") * Decimal::from(200);
    assert_eq!(c.access("hot").await.balance.as_decimal(), expected);
    let (balance, sum) = journal_sum(&ledger, "hot").await;
    assert_eq!(balance, sum);
    assert_eq!(balance, expected);
    // balance_after forms an unbroken chain: each entry's balance_after follows from the
    // previous one, so no two postings raced on a stale balance.
    let mut entries = c.entries("hot").await;
    entries.reverse();
    let mut running = Decimal::ZERO;
    for e in &entries {
        let amt = e.amount.as_decimal();
        running += if matches!(e.kind, EntryKind::Credit(_)) {
            amt
        } else {
            -amt
        };
        assert_eq!(e.balance_after.as_decimal(), running);
    }
    ledger.stop().await;
}

#[tokio::test]
async fn threshold_crossing_publishes_exactly_one_event_per_crossing_r7() {
    let (ledger, mut tap, c) = Ledger::tapped_with_prepaid("ledger.balance.#", "acme", "25").await;
    let t = c.set_threshold("acme", "10").await;
    assert_eq!(t.threshold, Some(money("10.00")));
    assert_eq!(
        c.account("acme").await.balance_threshold,
        Some(money("10.00"))
    );

    c.use_credits("acme", "15", "u1").await; // 10.00: at the threshold is not below it
    let crossing = c.use_credits("acme", "0.01", "u2").await; // 9.99: crossing
    c.use_credits("acme", "1", "u3").await; // 8.99: already below, no event
    c.add_credits("acme", "20", CreditSource::AutoRecharge, "top-1")
        .await; // 28.99
    c.use_credits("acme", "30", "u4").await; // -1.01: second crossing

    let events = tap.drain(Duration::from_secs(3)).await;
    let crossings: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "ledger.balance.threshold_crossed")
        .collect();
    assert_eq!(crossings.len(), 2, "{events:#?}");
    let first = crossings[0];
    assert_eq!(first["account_id"], "acme");
    assert_eq!(first["data"]["threshold"], "10.00");
    assert_eq!(first["data"]["balance_before"], "10.00");
    assert_eq!(first["data"]["balance_after"], "9.99");
    assert_eq!(first["data"]["entry_id"], crossing.entry.entry_id);
    assert_eq!(first["_amqp"]["message_id"], first["id"]);
    assert_eq!(first["_amqp"]["type"], "ledger.balance.threshold_crossed");
    assert_eq!(first["_amqp"]["content_type"], "application/json");
    assert_eq!(first["_amqp"]["delivery_mode"], 2);
    assert_eq!(crossings[1]["data"]["balance_after"], "-1.01");

    // Cleared: no more crossings.
    c.ledger()
        .clear_balance_threshold(&acct("acme"), None)
        .await
        .unwrap();
    c.add_credits("acme", "50", CreditSource::Purchase, "buy-2")
        .await;
    c.use_credits("acme", "45", "u5").await;
    tap.expect_none(Duration::from_secs(1), "cleared: no crossing")
        .await;
    ledger.stop().await;
}

/// The relay deletes what the broker says a queue took and keeps what it returned, so the
/// publisher must say it per message. The broker returns an unroutable message at once but
/// acks a persistent one after writing it, so a return often arrives before the ack of an
/// earlier message; the client library hangs it on that ack. Read per confirm, a routed
/// event was taken as returned (and published twice) and the returned one as routed (and
/// lost). Batches mixing both, several times over, catch that.
#[tokio::test]
async fn the_publisher_tells_returned_messages_from_routed_ones_by_id() {
    use credits_common::amqp::{Delivery, OutgoingMessage, Publisher};
    let exchange = credits_tests::unique("pub");
    let mut tap = EventTap::bind(&exchange, "kept.#").await;
    let mut publisher = Publisher::new(credits_tests::AMQP_URL, &exchange, "publisher-test");
    let mut kept = std::collections::BTreeSet::new();
    for batch in 0..8 {
        let messages: Vec<OutgoingMessage> = (0..64)
            .map(|i| {
                let id = format!("{batch}-{i}");
                // An irregular mix, so returns and acks interleave differently per batch.
                let routed = (i * 7 + batch) % 3 != 0;
                OutgoingMessage {
                    routing_key: if routed { "kept.x" } else { "lost.x" }.to_owned(),
                    body: serde_json::json!({ "id": id, "type": "t" })
                        .to_string()
                        .into_bytes(),
                    message_id: id,
                    timestamp_secs: 0,
                    traceparent: None,
                }
            })
            .collect();
        let deliveries = publisher.publish_confirmed(&messages).await.unwrap();
        assert_eq!(deliveries.len(), messages.len());
        for (m, d) in messages.iter().zip(&deliveries) {
            let expected = if m.routing_key == "kept.x" {
                kept.insert(m.message_id.clone());
                Delivery::Routed
            } else {
                Delivery::Unroutable
            };
            assert_eq!(*d, expected, "message {} ({})", m.message_id, m.routing_key);
        }
    }
    let received: Vec<String> = tap.drain_field(Duration::from_secs(2), "id").await;
    let unique: std::collections::BTreeSet<String> = received.iter().cloned().collect();
    assert_eq!(received.len(), unique.len(), "a message arrived twice");
    assert_eq!(unique, kept);
    credits_tests::delete_queues(&publisher.parking_queue()).await;
}

#[tokio::test]
async fn outbox_events_survive_a_rabbitmq_connection_drop() {
    let (ledger, mut tap, c) = Ledger::tapped_with_prepaid("ledger.#", "acme", "20").await;
    tap.expect("ledger.account.activated", EVENT_WAIT).await;
    c.set_threshold("acme", "10").await;

    assert!(
        kill_amqp_connections(&ledger.connection_name).await >= 1,
        "the relay's connection was found and closed"
    );
    c.use_credits("acme", "15", "u1").await;
    let ev = tap
        .next_of("ledger.balance.threshold_crossed", Duration::from_secs(30))
        .await;
    assert!(
        ev.is_some(),
        "the crossing recorded while the connection was down is published after reconnecting"
    );
    // The relay deletes a row once the broker confirms it, which may land just after a
    // consumer already holds the event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ledger.outbox_len().await > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ledger.outbox_len().await, 0, "outbox drained");
    ledger.stop().await;
}

#[tokio::test]
async fn entries_list_newest_first_with_pages_r13() {
    let (ledger, c) = Ledger::with_prepaid("acme", "10").await;
    for i in 0..6 {
        c.use_credits("acme", "0.1", &format!("u{i}")).await;
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = c
            .ledger()
            .list_entries(&acct("acme"), 3, token.as_deref())
            .await
            .unwrap();
        pages += 1;
        seen.extend(page.items);
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);
    assert!(pages >= 3);
    let keys: Vec<_> = seen.iter().map(|e| e.idempotency_key.as_str()).collect();
    assert_eq!(keys, ["u5", "u4", "u3", "u2", "u1", "u0", "buy"]);
    assert_eq!(seen[6].kind, EntryKind::Credit(CreditSource::Purchase));
    assert_eq!(seen[6].reference, "ch_buy");
    assert_eq!(seen[0].kind, EntryKind::Usage(UsageCategory::ApiRequests));
    ledger.stop().await;
}

/// Raw prost: one item's amount ("-1") is one the typed client refuses to send.
#[tokio::test]
async fn usage_batch_answers_each_item_in_order() {
    let (ledger, api) = Ledger::with_prepaid("b", "10").await;
    let mut c = ledger.client().await;
    api.prepaid("a", "10").await;
    let items = vec![
        usage_req("b", "1", "k1"),
        usage_req("a", "2", "k1"),
        usage_req("a", "-1", "k2"),    // invalid amount
        usage_req("ghost", "1", "k1"), // unknown account
        usage_req("b", "1.5", "k2"),
        usage_req("b", "1", "k1"), // replay of item 0
        usage_req("b", "9", "k1"), // same key, different request
    ];
    let res = c
        .record_usage_batch(pb::RecordUsageBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    use pb::record_usage_batch_result::Result as R;
    let ok = |i: usize| match &res[i].result {
        Some(R::Ok(r)) => r.clone(),
        other => panic!("item {i}: {other:?}"),
    };
    let err = |i: usize| match &res[i].result {
        Some(R::Error(s)) => s.clone(),
        other => panic!("item {i}: {other:?}"),
    };
    assert_eq!(res.len(), 7);
    assert_eq!(ok(0).balance, "9.00");
    assert_eq!(ok(1).balance, "8.00");
    assert_eq!(err(2).code, Code::InvalidArgument as i32);
    assert!(err(2).message.contains("amount"));
    assert_eq!(err(3).code, Code::NotFound as i32);
    assert_eq!(ok(4).entry.unwrap().balance_after, "7.50");
    assert_eq!(ok(5).entry, ok(0).entry);
    assert_eq!(err(6).code, Code::AlreadyExists as i32);
    assert_eq!(api.access("b").await.balance, money("7.50"));
    ledger.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing_spec_4() {
    let (ledger, api) = Ledger::with_prepaid("acme", "10").await;
    let mut c = ledger.client().await;

    let bad_amounts = [
        "",
        "-1",
        "0",
        "0.00",
        "NaN",
        "Infinity",
        "1e3",
        "1E-3",
        "1.0000000001",
        "+1",
        " 1",
        "1,5",
        "99999999999999999999999999999999999999999",
        "0x10",
        "١",
    ];
    for amount in bad_amounts {
        let err = c
            .record_usage(usage_req("acme", amount, "bad"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "usage amount {amount:?}");
        assert!(
            err.message().starts_with("amount:"),
            "{amount:?}: {}",
            err.message()
        );
        let err = c
            .add_credits(raw::credit(
                "acme",
                amount,
                pb::CreditSource::Purchase,
                "bad",
            ))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "credit amount {amount:?}"
        );
        assert!(err.message().starts_with("amount:"));
    }
    let cases: Vec<(pb::RecordUsageRequest, &str)> = vec![
        (usage_req("", "1", "k"), "account_id"),
        (usage_req("bad id!", "1", "k"), "account_id"),
        (usage_req(&"x".repeat(65), "1", "k"), "account_id"),
        (usage_req("acme", "1", ""), "idempotency_key"),
        (usage_req("acme", "1", &"k".repeat(256)), "idempotency_key"),
        (
            pb::RecordUsageRequest {
                category: 0,
                ..usage_req("acme", "1", "k")
            },
            "category",
        ),
        (
            pb::RecordUsageRequest {
                category: 99,
                ..usage_req("acme", "1", "k")
            },
            "category",
        ),
        (
            pb::RecordUsageRequest {
                description: "d".repeat(1025),
                ..usage_req("acme", "1", "k")
            },
            "description",
        ),
    ];
    for (req, field) in cases {
        let err = c.record_usage(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = c
        .add_credits(raw::credit("acme", "1", pb::CreditSource::Unspecified, "k"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("source"));
    for threshold in ["-1", "", "abc", "1e2"] {
        let err = c
            .set_balance_threshold(pb::SetBalanceThresholdRequest {
                account_id: "acme".into(),
                threshold: threshold.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{threshold:?}");
        assert!(err.message().starts_with("threshold"));
    }
    let err = c
        .create_account(pb::CreateAccountRequest {
            account_id: "x".into(),
            billing_mode: 7,
            display_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("billing_mode"));
    for (size, token) in [(-1, ""), (10, "garbage"), (10, "-5")] {
        let err = c
            .list_entries(pb::ListEntriesRequest {
                account_id: "acme".into(),
                page_size: size,
                page_token: token.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    // An unknown account is NOT_FOUND wherever it is named.
    let unknown = [
        c.record_usage(usage_req("ghost", "1", "k")).await.map(drop),
        c.check_access(pb::CheckAccessRequest {
            account_id: "ghost".into(),
            amount: String::new(),
        })
        .await
        .map(drop),
        c.set_balance_threshold(pb::SetBalanceThresholdRequest {
            account_id: "ghost".into(),
            threshold: "1".into(),
            ..Default::default()
        })
        .await
        .map(drop),
    ];
    for answer in unknown {
        assert_eq!(answer.unwrap_err().code(), Code::NotFound);
    }

    // Nothing changed: one entry (the purchase), same balance, no stray accounts.
    assert_eq!(api.entries("acme").await.len(), 1);
    assert_eq!(api.access("acme").await.balance, money("10.00"));
    let mut db = ledger.db().await;
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(accounts, 1);
    ledger.stop().await;
}

#[tokio::test]
async fn the_journal_is_append_only() {
    let (ledger, c) = Ledger::with_prepaid("acme", "10").await;
    let mut db = ledger.db().await;
    for sql in [
        "UPDATE entries SET amount = 1000",
        "DELETE FROM entries",
        "TRUNCATE entries CASCADE",
    ] {
        let err = sqlx::query(sql).execute(&mut db).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(c.entries("acme").await[0].amount, money("10.00"));
    ledger.stop().await;
}

#[tokio::test]
async fn bearer_token_guards_every_rpc_but_health_check() {
    const TOKEN: &str = "s3cret-s3cret-s3cret-s3cret-s3cret";
    let ledger = Ledger::start_with(LedgerOptions {
        auth_token: Some(TOKEN.into()),
        ..Default::default()
    })
    .await;
    let with = |token: Option<&str>| Api::connect(&ledger.url(), NOBODY, NOBODY, token);
    let check = |c: Api| async move { c.ledger().check_access(&acct("acme")).await };
    let err = check(with(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        check(with(Some("wrong"))).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        check(with(Some(TOKEN))).await.unwrap_err().code(),
        Code::NotFound,
        "authenticated, account unknown"
    );

    // Health is not in the typed client (it is not part of the product's contract).
    let status = health_status(&ledger.url(), "credits.ledger.v1.LedgerService").await;
    assert_eq!(
        status,
        Some(ServingStatus::Serving),
        "health's Check (probes) needs no token"
    );
    // R28: its Watch, a stream that stays open, is a call like any other.
    let watch = |token: Option<&'static str>| {
        let url = ledger.url();
        async move {
            let ch = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
                service: "credits.ledger.v1.LedgerService".into(),
            });
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            tonic_health::pb::health_client::HealthClient::new(ch)
                .watch(req)
                .await
                .map(|_| ())
        }
    };
    assert_eq!(
        watch(None).await.unwrap_err().code(),
        Code::Unauthenticated,
        "an unauthenticated Watch stream"
    );
    watch(Some(TOKEN)).await.expect("Watch with the token");
    ledger.stop().await;
}

/// R28 (R21 extended): display text refuses bidirectional overrides and zero-width
/// characters — `"\u{202e}emca"` shows as "acme" — and the refusal creates nothing.
#[tokio::test]
async fn display_names_refuse_bidi_overrides_and_zero_width_characters_r28() {
    let ledger = Ledger::start().await;
    let mut c = ledger.client().await;
    for (i, name) in ["\u{202e}emca", "pay\u{200b}pal", "Acme\u{2066}Inc"]
        .iter()
        .enumerate()
    {
        let id = format!("spoof-{i}");
        let e = c
            .create_account(pb::CreateAccountRequest {
                account_id: id.clone(),
                billing_mode: pb::BillingMode::Prepaid as i32,
                display_name: (*name).into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name:?}");
        assert!(e.message().starts_with("display_name:"), "{}", e.message());
        let missing = c
            .get_account(pb::GetAccountRequest { account_id: id })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
    }
    // Right-to-left text is a name like any other.
    c.create_account(pb::CreateAccountRequest {
        account_id: "rtl".into(),
        billing_mode: pb::BillingMode::Prepaid as i32,
        display_name: "شركة أكمي".into(),
    })
    .await
    .unwrap();
    ledger.stop().await;
}

/// Raw prost: the typed client refuses a control character in an idempotency key before
/// sending; the service's own refusal is what is checked.
#[tokio::test]
async fn text_fields_with_nul_or_control_characters_are_invalid_and_change_nothing_r21() {
    let (ledger, api) = Ledger::with_prepaid("acme", "10").await;
    let mut c = ledger.client().await;
    let mut bad = usage_req("acme", "1", "u-nul");
    bad.description = "chat\0completions".into();
    let e = c.record_usage(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("description:"), "{}", e.message());
    let e = c
        .record_usage(usage_req("acme", "1", "key\u{1}"))
        .await
        .unwrap_err();
    assert!(
        e.message().starts_with("idempotency_key:"),
        "{}",
        e.message()
    );
    let e = c
        .create_account(pb::CreateAccountRequest {
            account_id: "bell".into(),
            display_name: "Bell\u{7}".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("display_name:"), "{}", e.message());
    let e = c
        .add_credits(pb::AddCreditsRequest {
            reference: "line\nbreak".into(),
            ..raw::credit("acme", "1", pb::CreditSource::Grant, "g1")
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("reference:"), "{}", e.message());
    // Tab and newline are fine in a description.
    let mut ok = usage_req("acme", "1", "u-ok");
    ok.description = "line 1\n\tline 2".into();
    c.record_usage(ok).await.unwrap();
    assert_eq!(api.entries("acme").await.len(), 2, "only the good debit");
    assert_eq!(api.access("acme").await.balance, money("9.00"));
    ledger.stop().await;
}

/// Call `n` of a race on "acme": an even one debits well-formed usage, which must be
/// recorded; an odd one sends a NUL, which must be refused as invalid.
async fn good_or_evil_debit(c: Api, n: usize) {
    let i = n / 2;
    if n.is_multiple_of(2) {
        c.try_use_credits("acme", "0.01", &format!("good-{i}"))
            .await
            .expect("a good debit is recorded");
    } else {
        let mut r = usage("acme", "0.01", &format!("evil-{i}"));
        r.description = "\0".into();
        let e = c.ledger().record_usage(&r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
}

#[tokio::test]
async fn one_callers_bad_input_never_fails_another_callers_debit_r21() {
    let (ledger, c) = Ledger::with_prepaid("acme", "1000").await;
    // 100 good callers, each racing an evil one.
    c.concurrently(200, good_or_evil_debit).await;
    let items: Vec<_> = (0..10)
        .map(|i| {
            let mut r = usage("acme", "0.01", &format!("batch-{i}"));
            if i == 3 {
                r.description = "nul\0".into();
            }
            r
        })
        .collect();
    let results = c.ledger().record_usage_batch(&items).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(_) => assert_ne!(i, 3),
            Err(e) => {
                assert_eq!(i, 3);
                assert_eq!(e.code(), Code::InvalidArgument);
            }
        }
    }
    assert_eq!(
        c.access("acme").await.balance,
        money("998.91"),
        "109 debits of 0.01"
    );
    ledger.stop().await;
}

/// The edge refuses bad text before it reaches the database, so to prove the group commit
/// itself isolates a failure this posts below the edge: one item the database refuses
/// (NUL) in a batch of good ones.
#[tokio::test]
async fn group_commit_isolates_an_item_the_database_refuses_r21() {
    use credits_common::Money;
    use credits_ledger::domain::{
        AccountId, IdempotencyKey, Posting, PostingRequest, UsageCategory,
    };
    let (ledger, c) = Ledger::with_prepaid("acme", "100").await;
    let pool = sqlx::PgPool::connect(&ledger.database_url).await.unwrap();
    let store = credits_ledger::store::Store::new(pool);
    let reqs: Vec<PostingRequest> = (0..20)
        .map(|i| PostingRequest {
            account_id: AccountId::parse("acme").unwrap(),
            posting: Posting::Usage(UsageCategory::API_REQUESTS),
            amount: Money::parse_positive("amount", "1").unwrap(),
            reference: String::new(),
            description: if i == 7 {
                "bad\0".into()
            } else {
                String::new()
            },
            idempotency_key: IdempotencyKey::parse(&format!("k{i}")).unwrap(),
            traceparent: None,
            expires_at: None,
            priority: 0,
        })
        .collect();
    let results = store.post_batch_isolated(&reqs).await;
    assert_eq!(results.len(), 20);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_ok(), i != 7, "item {i}: {:?}", r.as_ref().err());
    }
    // (Posted below this replica's edge, like another replica's write: read the account,
    // not the access view, which follows such writes through the feed.)
    assert_eq!(c.balance("acme").await, money("81.00"));
    let (balance, sum) = journal_sum(&ledger, "acme").await;
    assert_eq!(balance, sum);
    ledger.stop().await;
}

#[tokio::test]
async fn scoped_tokens_limit_each_role_and_the_gateway_cannot_mint_credits() {
    let dir = std::env::temp_dir().join(credits_tests::unique("tokens"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(
        &file,
        "gateway gw-0123456789abcdef0123456789abcdef\nbilling bill-0123456789abcdef0123456789abcdef\ninternal int-0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let ledger = Ledger::start_with(LedgerOptions {
        auth_tokens_file: Some(file),
        ..Default::default()
    })
    .await;
    let with = |token: &str| Api::connect(&ledger.url(), NOBODY, NOBODY, Some(token));
    with("bill-0123456789abcdef0123456789abcdef")
        .ledger()
        .create_account(&acct("acme"), BillingMode::Prepaid, "")
        .await
        .unwrap();
    // R28: a CONTRACT account may go below zero without limit: internal only, and the
    // refusal creates nothing.
    let e = with("bill-0123456789abcdef0123456789abcdef")
        .ledger()
        .create_account(&acct("bigco"), BillingMode::Contract, "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().starts_with("billing_mode:"), "{}", e.message());
    let internal = with("int-0123456789abcdef0123456789abcdef");
    assert_eq!(
        internal
            .ledger()
            .get_account(&acct("bigco"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "the refused CONTRACT account was not created"
    );
    internal
        .ledger()
        .create_account(&acct("bigco"), BillingMode::Contract, "")
        .await
        .expect("internal opens CONTRACT accounts");
    let grant = CreditsToAdd {
        account_id: acct("acme"),
        amount: money("1000"),
        source: CreditSource::Grant,
        reference: String::new(),
        idempotency_key: key("free-money"),
        description: String::new(),
    };
    for token in [
        "gw-0123456789abcdef0123456789abcdef",
        "bill-0123456789abcdef0123456789abcdef",
    ] {
        let e = with(token).ledger().add_credits(&grant).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{token}: {}", e.message());
    }
    let e = with("nobody-0123456789abcdef0123456789abcdef")
        .ledger()
        .add_credits(&grant)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let r = with("gw-0123456789abcdef0123456789abcdef")
        .use_credits("acme", "1", "u1")
        .await;
    assert_eq!(r.balance, money("-1.00"), "the gateway records usage");
    let r = with("int-0123456789abcdef0123456789abcdef")
        .ledger()
        .add_credits(&grant)
        .await
        .unwrap();
    assert_eq!(r.balance, money("999.00"), "internal may add credits");
    assert_eq!(
        with("bill-0123456789abcdef0123456789abcdef")
            .ledger()
            .set_balance_threshold(&acct("acme"), money("10"), None)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    ledger.stop().await;
}

#[tokio::test]
async fn reflection_v1alpha_is_served_beside_v1() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let ledger = Ledger::start().await;
    let channel = channel(&ledger.url()).await;
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "credits.ledger.v1.LedgerService"),
        "{names:?}"
    );
    ledger.stop().await;
}

/// `GetAccountRequest` with its `account_id` (field 1) as raw bytes, so a test can send
/// what a typed client never would: a string field that is not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGetAccount {
    #[prost(bytes = "vec", tag = "1")]
    account_id: Vec<u8>,
}

#[tokio::test]
async fn a_text_field_that_is_not_utf8_is_invalid_not_internal_r21() {
    let ledger = Ledger::start().await;
    let channel = channel(&ledger.url()).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/credits.ledger.v1.LedgerService/GetAccount");
    let codec: tonic_prost::ProstCodec<RawGetAccount, pb::Account> =
        tonic_prost::ProstCodec::default();
    let err = grpc
        .unary(
            tonic::Request::new(RawGetAccount {
                account_id: vec![b'a', 0xff, 0xfe],
            }),
            path,
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    ledger.stop().await;
}

/// The golden test of the event contract: what the ledger's SQL (`ledger_event`) publishes,
/// through the real outbox relay and RabbitMQ, parses into `credits_common::events` with the
/// expected variant and fields, and carries a UUID v7 id like every Rust publisher's.
#[tokio::test]
async fn ledger_events_are_the_contract_type_with_v7_ids() {
    use credits_common::Money;
    use credits_common::events::{
        AccountBalance, Envelope, Event, SCHEMA_VERSION, ThresholdCrossed,
    };

    let money = |s: &str| Money::parse_signed("amount", s).unwrap();
    // Buying 25 activates the account.
    let (ledger, mut tap, c) = Ledger::tapped_with_prepaid("ledger.#", "acme", "25").await;
    c.set_threshold("acme", "10").await;
    let crossing = c.use_credits("acme", "15.01", "u1").await; // 9.99: crossed
    c.use_credits("acme", "10", "u2").await; // -0.01: suspended
    c.add_credits("acme", "0.02", CreditSource::Purchase, "buy-2")
        .await; // reactivated
    let entry_id: uuid::Uuid = crossing.entry.entry_id.parse().unwrap();

    let expected = [
        Event::AccountActivated(AccountBalance {
            balance: money("25.00"),
            available_balance: Some(money("25.00")),
        }),
        Event::BalanceThresholdCrossed(ThresholdCrossed {
            threshold: money("10.00"),
            balance_before: money("25.00"),
            balance_after: money("9.99"),
            available_before: Some(money("25.00")),
            available_after: Some(money("9.99")),
            entry_id: Some(entry_id),
            hold_id: None,
        }),
        Event::AccountSuspended(AccountBalance {
            balance: money("-0.01"),
            available_balance: Some(money("-0.01")),
        }),
        Event::AccountReactivated(AccountBalance {
            balance: money("0.01"),
            available_balance: Some(money("0.01")),
        }),
    ];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut last_ms = 0;
    for want in expected {
        let key = want.routing_key();
        let ev = tap.expect(key, EVENT_WAIT).await;
        let body = ev["_amqp"]["body"].as_str().unwrap();
        let env = Envelope::parse(body.as_bytes()).unwrap_or_else(|e| panic!("{key}: {e}: {body}"));
        assert_eq!(env.event, want, "{body}");
        assert_eq!(env.account_id.as_str(), "acme");
        assert_eq!(env.schema_version, SCHEMA_VERSION, "{body}");
        assert_eq!(ev["_amqp"]["message_id"], env.id.to_string());
        assert_eq!(ev["_amqp"]["type"], key);
        assert_eq!(env.id.get_version_num(), 7, "{key} id {}", env.id);
        // A v7 id carries its time: the moment the event was written, in order.
        let (secs, nanos) = env.id.get_timestamp().unwrap().to_unix();
        let id_ms = secs as i64 * 1000 + i64::from(nanos / 1_000_000);
        let at_ms = env.occurred_at.timestamp_millis();
        assert!(
            (id_ms - at_ms).abs() < 5_000 && (id_ms - now_ms).abs() < 60_000,
            "{key}: id time {id_ms}, occurred_at {at_ms}, now {now_ms}"
        );
        assert!(id_ms >= last_ms, "{key}: ids are time-ordered");
        last_ms = id_ms;
        // What the type writes back is what the SQL wrote.
        let mut sql: serde_json::Value = serde_json::from_str(body).unwrap();
        let mut typed = env.to_value().unwrap();
        for v in [&mut sql, &mut typed] {
            v.as_object_mut().unwrap().remove("occurred_at");
        }
        assert_eq!(typed, sql, "{key}");
    }
    ledger.stop().await;
}

/// R28: a `StreamUsage` call carries a bounded number of items for a bounded time. Past
/// either, the server answers what it read and ends the stream `UNAVAILABLE`, saying so;
/// the client sends what has no result on a new stream (keys make that safe). A stream the
/// client ends within the bounds ends OK.
#[tokio::test]
async fn stream_usage_streams_are_bounded_in_items_and_lifetime_r28() {
    use futures_util::StreamExt;
    let ledger = Ledger::start_with(LedgerOptions {
        stream_limits: Some(credits_ledger::grpc::StreamLimits {
            max_items: 3,
            max_lifetime: Duration::from_secs(2),
        }),
        ..Default::default()
    })
    .await;
    let c = ledger.api();
    c.create_account("acme", BillingMode::Contract).await;
    let items: Vec<_> = (0..5)
        .map(|i| usage("acme", "0.01", &format!("s{i}")))
        .collect();
    let results: Vec<_> = c
        .ledger()
        .stream_usage(futures_util::stream::iter(items.clone()))
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(results.len(), 4, "3 results, then the end: {results:?}");
    assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
    let end = results[3].as_ref().unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end}");
    assert!(end.message().contains("open a new stream"), "{end}");
    assert_eq!(c.account("acme").await.balance.as_decimal(), dec("-0.03"));
    // The rest on a new stream: the client's part of the contract.
    let rest: Vec<_> = c
        .ledger()
        .stream_usage(futures_util::stream::iter(items[3..].to_vec()))
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert!(rest.iter().all(Result::is_ok), "{rest:?}");
    assert_eq!(c.account("acme").await.balance.as_decimal(), dec("-0.05"));
    // Exactly the limit, then the client ends the stream: all answered, no false "cut".
    let exact: Vec<_> = (0..3)
        .map(|i| usage("acme", "0.01", &format!("x{i}")))
        .collect();
    let answered: Vec<_> = c
        .ledger()
        .stream_usage(futures_util::stream::iter(exact))
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(answered.len(), 3, "{answered:?}");
    assert!(answered.iter().all(Result::is_ok), "{answered:?}");
    // A stream kept open past its lifetime is ended by the server.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(usage("acme", "0.01", "t0")).await.unwrap();
    let mut answers = c
        .ledger()
        .stream_usage(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    assert!(answers.next().await.unwrap().is_ok());
    let ended = tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .expect("the server ends a stream past its lifetime")
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable, "{ended}");
    drop(tx);
    ledger.stop().await;
}

/// `StreamUsage`: one result per request, in order, every item through the group commit; a
/// bad item is that item's result, never the stream's; replays answer the first entry.
#[tokio::test]
async fn stream_usage_answers_every_item_in_order_through_group_commit() {
    use futures_util::StreamExt;
    let (ledger, c) = Ledger::with_account("acme", BillingMode::Contract).await;
    c.create_account("beta", BillingMode::Contract).await;
    let mut items = Vec::new();
    for i in 0..600 {
        let id = match i {
            250 => "ghost", // unknown account: NOT_FOUND in place
            _ if i % 2 == 0 => "acme",
            _ => "beta",
        };
        // Item 400 repeats item 10's key and request: the first entry again.
        let k = if i == 400 {
            "k10".to_owned()
        } else {
            format!("k{i}")
        };
        items.push(usage(id, "0.01", &k));
    }
    let results: Vec<_> = c
        .ledger()
        .stream_usage(futures_util::stream::iter(items.clone()))
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(results.len(), 600);
    for (i, r) in results.iter().enumerate() {
        match i {
            250 => {
                let e = r.as_ref().unwrap_err();
                assert_eq!(e.code(), Code::NotFound, "{e}");
                assert!(e.message().starts_with("stream[250]"), "{e}");
            }
            _ => {
                let ok = r.as_ref().unwrap_or_else(|e| panic!("item {i}: {e}"));
                assert_eq!(
                    ok.entry.account_id, items[i].account_id,
                    "item {i} in order"
                );
            }
        }
    }
    let first = results[10].as_ref().unwrap();
    assert_eq!(
        results[400].as_ref().unwrap().entry.entry_id,
        first.entry.entry_id
    );
    // 599 answered OK, one of them a replay: 598 entries, $5.98.
    let a = c.account("acme").await.balance;
    let b = c.account("beta").await.balance;
    assert_eq!(a.as_decimal() + b.as_decimal(), dec("-5.98"));
    // A malformed item (NUL in its description) is refused in place; the stream goes on.
    let mut raw = ledger.client().await;
    let req = |k: &str, d: &str| pb::RecordUsageRequest {
        description: d.into(),
        ..usage_req("acme", "0.01", k)
    };
    let out: Vec<_> = raw
        .stream_usage(futures_util::stream::iter(vec![
            req("raw-1", ""),
            req("raw-2", "bad\u{0}"),
            req("raw-3", ""),
        ]))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let codes: Vec<_> = out
        .iter()
        .map(|r| match &r.as_ref().unwrap().result {
            Some(pb::record_usage_batch_result::Result::Ok(_)) => 0,
            Some(pb::record_usage_batch_result::Result::Error(s)) => s.code,
            None => -1,
        })
        .collect();
    assert_eq!(codes, [0, tonic::Code::InvalidArgument as i32, 0]);
    ledger.stop().await;
}

/// `CheckAccess` answers from each replica's memory; a change made through another replica
/// on the same database reaches it through the access feed within milliseconds (R16, R31).
#[tokio::test]
async fn check_access_on_one_replica_sees_another_replicas_change_r16() {
    let a = Ledger::start().await;
    let b = a.another_replica().await;
    let (ca, cb) = (a.api(), b.api());
    ca.prepaid("acme", "10").await;
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        // B has the account in memory…
        assert!(cb.access("acme").await.allowed, "round {round}");
        assert!(cb.access("acme").await.allowed, "round {round}");
        // …A suspends it (available 10 → 0 with a hold), then B must see it.
        let h = ca.hold("acme", "10", &format!("job-{round}")).await;
        let t = std::time::Instant::now();
        loop {
            if !cb.access("acme").await.allowed {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "replica B still allows after {:?}",
                t.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        worst = worst.max(t.elapsed());
        // A's own view is exact at once: its write dropped the account before answering.
        assert!(!ca.access("acme").await.allowed);
        ca.release("acme", &h.hold_id).await;
        let t = std::time::Instant::now();
        while !cb.access("acme").await.allowed {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "round {round}: B never reactivated"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        worst = worst.max(t.elapsed());
    }
    eprintln!("access view: the other replica saw each change within {worst:?}");
    // A plain debit (no access change, no crossing) is in the feed like any change: the
    // other replica's balance follows as fast.
    let before = cb.access("acme").await.balance;
    ca.use_credits("acme", "1", "plain-debit").await;
    let t = std::time::Instant::now();
    while cb.access("acme").await.balance == before {
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "B's balance still stale after {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "access view: a plain debit reached the other replica after {:?}",
        t.elapsed()
    );
    assert_eq!(
        ca.access("acme").await.balance,
        money("9"),
        "the writer is exact at once"
    );
    b.stop().await;
    a.stop().await;
}

/// docs/scaling.md: the data shards by account, so every query on a per-account table
/// names its account: an INSERT writes `account_id`, any other statement filters on
/// `account_id = …` / `account_id IN …`. The exceptions are the sweeps, listed with their
/// reason: they scan by time on purpose (sharded, they run on every shard). A new query
/// outside the list fails.
/// Reads every compile-time-checked query in `.sqlx/`.
#[test]
fn hot_queries_are_keyed_by_account() {
    const PER_ACCOUNT: &[&str] = &[
        "accounts",
        "entries",
        "holds",
        "lots",
        "usage_rollups",
        "payment_methods",
        "charges",
        "settings",
        "attempts",
    ];
    /// Sweeps: (a fragment of the query, why it is not keyed by account).
    const EXCEPTIONS: &[(&str, &str)] = &[
        (
            "lease_until <= now()",
            "sweep: attempts whose lease ran out, on any account",
        ),
        (
            "retry_at <= now()",
            "sweep: due balance checks, on any account",
        ),
        (
            "expires_at <= now()",
            "sweep: holds past their expiry (R15)",
        ),
        (
            "next_expiry <= now()",
            "sweep: accounts with credits past their expiry (R29)",
        ),
        (
            "where charge_id in ( select charge_id from charges where ((status in",
            "sweep: the payments recovery loop",
        ),
        (
            "from charges where processor_charge_id = $1",
            "R26: a processor's refund or dispute names only its payment (on a sharded store: a small processor-id → account index)",
        ),
        (
            "with a as ( insert into accounts",
            "CreateAccount: an insert of the new account_id ($1) and its first access-feed row (R31)",
        ),
        (
            "from settings where enabled",
            "sweep: the reconciler's pass over enabled settings",
        ),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.sqlx");
    let keyed = |q: &str| {
        if q.starts_with("insert") {
            q.contains("account_id")
        } else {
            [
                "account_id =",
                "account_id in",
                "account_id=any",
                "account_id = any",
            ]
            .iter()
            .any(|k| q.contains(k))
        }
    };
    let mut unkeyed = Vec::new();
    let mut read = 0;
    for f in std::fs::read_dir(&dir).unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let q = v["query"].as_str().unwrap().to_lowercase();
        let q = q.split_whitespace().collect::<Vec<_>>().join(" ");
        read += 1;
        let touches = PER_ACCOUNT.iter().any(|t| {
            ["from", "join", "update", "into"]
                .iter()
                .any(|kw| q.contains(&format!("{kw} {t} ")) || q.ends_with(&format!("{kw} {t}")))
        });
        if touches && !keyed(&q) && !EXCEPTIONS.iter().any(|(s, _)| q.contains(s)) {
            unkeyed.push(q);
        }
    }
    assert!(read > 20, "read only {read} queries from {}", dir.display());
    assert!(
        unkeyed.is_empty(),
        "queries on per-account tables without account_id:\n{}",
        unkeyed.join("\n")
    );
}

/// The set-based batch (`ledger_post_batch`, what group commit sends) against the
/// row-by-row `ledger_post`: two ledgers with the same accounts (thresholds, alerts, a
/// hold, pending, contract, suspended, a used key), one posts a batch through
/// `RecordUsageBatch`, the other the same items one by one in SQL. Every item's answer,
/// every account, every account's journal and every event must be the same.
#[tokio::test]
async fn set_based_batch_answers_and_publishes_what_posting_one_by_one_would() {
    let (a, b) = (Ledger::start().await, Ledger::start().await);
    let mut taps = Vec::new();
    for l in [&a, &b] {
        let mut tap = EventTap::bind(&l.exchange, "ledger.#").await;
        let c = l.api();
        c.prepaid("thr", "30").await;
        c.set_threshold("thr", "10").await;
        c.ledger()
            .set_balance_alerts(&acct("thr"), &[money("25"), money("15"), money("5")])
            .await
            .unwrap();
        c.prepaid("held", "20").await;
        c.hold("held", "12", "h1").await;
        c.set_threshold("held", "5").await;
        c.create_account("pend", BillingMode::Prepaid).await;
        c.create_account("contract", BillingMode::Contract).await;
        c.add_credits("contract", "5", CreditSource::Grant, "g")
            .await;
        c.set_threshold("contract", "3").await;
        c.prepaid("susp", "1").await;
        c.use_credits("susp", "2", "u0").await;
        c.prepaid("rep", "50").await;
        c.use_credits("rep", "1", "old").await;
        c.use_credits("rep", "2", "old2").await;
        c.prepaid("alone", "10").await;
        // The set-up's events are all published (and so in the tap's queue) once the
        // outbox is empty; they are not part of the comparison.
        credits_tests::eventually(EVENT_WAIT, "the set-up's events published", || async {
            (l.outbox_len().await == 0).then_some(())
        })
        .await;
        tap.drain(Duration::from_millis(300)).await;
        taps.push(tap);
    }
    let items = [
        ("thr", "6", "k1"),      // 30 → 24: alert 25
        ("held", "3", "k1"),     // available 8 → 5: not below 5
        ("rep", "1", "old"),     // replay
        ("thr", "6", "k2"),      // 24 → 18
        ("ghost", "1", "k1"),    // no such account
        ("rep", "2", "k9"),      // posts
        ("thr", "3", "k3"),      // 18 → 15: at 15, not below
        ("thr", "1", "k3b"),     // 15 → 14: alert 15 (from exactly 15)
        ("held", "6", "k2"),     // available 5 → -1: crossing, suspended
        ("pend", "1", "k1"),     // stays pending
        ("thr", "10", "k4"),     // 14 → 4: crossing 10, alert 5
        ("contract", "4", "k1"), // 5 → 1: crossing, never suspended
        ("susp", "1", "k1"),     // stays suspended
        ("rep", "7", "old2"),    // conflict
        ("thr", "5", "k5"),      // 4 → -1: suspended
        ("alone", "10", "k1"),   // 10 → 0: suspended
        ("thr", "1", "k6"),      // -1 → -2: nothing
    ];
    // No two items share (account, key): the batch goes the set-based way (twins go
    // through ledger_post per item, see `Store::post_batch`).
    let pairs: std::collections::HashSet<_> = items.iter().map(|(id, _, k)| (id, k)).collect();
    assert_eq!(pairs.len(), items.len());
    let records: Vec<_> = items.iter().map(|(id, amt, k)| usage(id, amt, k)).collect();
    let batch = a.api().ledger().record_usage_batch(&records).await.unwrap();
    let got: Vec<String> = batch
        .iter()
        .map(|r| match r {
            Ok(u) => format!(
                "ok {} {} {}",
                u.entry.balance_after.as_decimal(),
                u.balance.as_decimal(),
                u.allowed
            ),
            Err(e) => format!("{:?}", e.code()),
        })
        .collect();
    let mut db = b.db().await;
    let mut want = Vec::new();
    for (id, amt, k) in items {
        let row: (String, Option<Decimal>, Option<Decimal>, Option<String>) = sqlx::query_as(
            "SELECT outcome, balance_after, balance, access
             FROM ledger_post($1, 'USAGE', 'API_REQUESTS', NULL, $2::numeric, '', '', $3)",
        )
        .bind(id)
        .bind(amt)
        .bind(k)
        .fetch_one(&mut db)
        .await
        .unwrap();
        want.push(match row.0.as_str() {
            "posted" | "replayed" => format!(
                "ok {} {} {}",
                row.1.unwrap(),
                row.2.unwrap(),
                row.3.as_deref() == Some("ACTIVE")
            ),
            "not_found" => format!("{:?}", Code::NotFound),
            _ => format!("{:?}", Code::AlreadyExists),
        });
    }
    assert_eq!(got, want, "every item answers as if posted one by one");
    assert_eq!(
        got.iter().filter(|g| g.starts_with("ok")).count(),
        15,
        "{got:?}"
    );

    async fn state(l: &Ledger) -> (Vec<(String, Decimal, Decimal, String)>, Vec<String>) {
        let mut db = l.db().await;
        let accounts = sqlx::query_as(
            "SELECT account_id, balance, held, access FROM accounts ORDER BY account_id",
        )
        .fetch_all(&mut db)
        .await
        .unwrap();
        // The journal in seq order: request order, each account's balance_after chain
        // following seq.
        let journal = sqlx::query_scalar(
            "SELECT concat_ws(' ', account_id, kind, amount, balance_after, idempotency_key)
             FROM entries ORDER BY seq",
        )
        .fetch_all(&mut db)
        .await
        .unwrap();
        (accounts, journal)
    }
    assert_eq!(state(&a).await, state(&b).await, "accounts and journals");

    let mut events = Vec::new();
    for tap in &mut taps {
        let seen: Vec<String> = tap
            .drain(Duration::from_secs(3))
            .await
            .into_iter()
            .map(|mut e| {
                e["data"].as_object_mut().unwrap().remove("entry_id");
                format!("{} {} {}", e["account_id"], e["type"], e["data"])
            })
            .collect();
        // In outbox order: one relay publishes in seq order.
        events.push(seen);
    }
    assert_eq!(events[0], events[1], "the same events, in the same order");
    for kind in [
        "ledger.balance.threshold_crossed",
        "ledger.balance.alert",
        "ledger.account.suspended",
    ] {
        assert!(
            events[0].iter().any(|e| e.contains(kind)),
            "{kind} among {:?}",
            events[0]
        );
    }
    assert_eq!(events[0].len(), 9, "{:#?}", events[0]);
    a.stop().await;
    b.stop().await;
}

/// A batch waiting for one account's lock must not post to an account created meanwhile,
/// which it never locked (a concurrent posting there would be overwritten): that item
/// answers NOT_FOUND, and every balance stays equal to its journal.
#[tokio::test]
async fn a_batch_does_not_post_to_an_account_created_while_it_waited_for_a_lock() {
    let (ledger, c) = Ledger::with_prepaid("busy", "10").await;
    let mut blocker = ledger.db().await;
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE account_id = 'busy' FOR UPDATE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let batch = {
        let c = c.clone();
        tokio::spawn(async move {
            c.ledger()
                .record_usage_batch(&[usage("busy", "1", "b1"), usage("late", "1", "b1")])
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.prepaid("late", "100").await;
    c.use_credits("late", "30", "u1").await;
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    let results = batch.await.unwrap();
    assert_eq!(results[0].as_ref().unwrap().balance, money("9"));
    assert_eq!(
        results[1].as_ref().map(|_| ()).unwrap_err().code(),
        Code::NotFound,
        "{:?}",
        results[1]
    );
    for id in ["busy", "late"] {
        let (balance, journal) = journal_sum(&ledger, id).await;
        assert_eq!(balance, journal, "{id}");
    }
    assert_eq!(c.balance("late").await, money("70"));
    ledger.stop().await;
}

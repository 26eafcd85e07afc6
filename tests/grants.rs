//! R29 grants, burn order and expiry; R30 usage summaries from rollups. Real PostgreSQL,
//! real RabbitMQ, the ledger over gRPC (two replicas where it matters).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chrono::{DateTime, Utc};
use credits_client::{
    BillingMode, Code, CreditSource, CreditsToGrant, Granularity, UsageCategory, UsageRecord,
};
use credits_proto::ledger::v1 as pb;
use credits_tests::api::{Api, assert_names, credits, dec, key, money, usage};
use credits_tests::{Ledger, LedgerOptions};
use rust_decimal::Decimal;

fn grant(id: &str, amount: &str, k: &str, expires_at: Option<DateTime<Utc>>) -> CreditsToGrant {
    CreditsToGrant {
        account_id: credits_tests::api::acct(id),
        amount: money(amount),
        idempotency_key: key(k),
        reason: format!("grant {k}"),
        expires_at,
        priority: 0,
    }
}

/// What each lot still holds, in the order GetAccount lists them (burn order), by reason
/// (grants) or "purchase".
async fn lots(c: &Api, id: &str) -> Vec<(String, Decimal)> {
    let a = c.account(id).await;
    a.grants
        .iter()
        .chain(&a.expiring_purchases)
        .map(|g| (g.reason.clone(), g.remaining.as_decimal()))
        .collect()
}

/// Balance = journal, and what the lots hold (with the usage pending on them drawn) = the
/// balance where it is positive (the chaos invariant of R29, read from the database).
async fn assert_books_balance(ledger: &Ledger) {
    let mut db = ledger.db().await;
    let bad: Vec<(String, Decimal, Decimal, Decimal)> = sqlx::query_as(
        "SELECT a.account_id, a.balance,
                coalesce((SELECT sum(CASE WHEN e.kind = 'CREDIT' THEN e.amount ELSE -e.amount END)
                          FROM entries e WHERE e.account_id = a.account_id), 0),
                coalesce((SELECT sum(n.remaining) FROM ledger_lots_now(a.account_id) n), 0)
         FROM accounts a",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    for (id, balance, journal, lots) in bad {
        assert_eq!(balance, journal, "{id}: balance ≠ journal");
        assert_eq!(lots, balance.max(Decimal::ZERO), "{id}: lots ≠ balance");
    }
}

/// Grants first, then purchased credits; within grants the earliest expiry first, then
/// the lower priority; a capture draws the same way, and money going back to the customer
/// (a refund) takes purchased credits first.
#[tokio::test]
async fn usage_draws_grants_first_earliest_expiry_first_then_purchases_r29() {
    let (ledger, c) = Ledger::with_prepaid("acme", "20").await;
    let soon = Utc::now() + chrono::Duration::days(1);
    let later = Utc::now() + chrono::Duration::days(2);
    c.ledger()
        .grant_credits(&grant("acme", "5", "later", Some(later)))
        .await
        .unwrap();
    c.ledger()
        .grant_credits(&grant("acme", "3", "soon", Some(soon)))
        .await
        .unwrap();
    let mut never_low = grant("acme", "4", "never-p1", None);
    never_low.priority = 1;
    c.ledger().grant_credits(&never_low).await.unwrap();
    c.ledger()
        .grant_credits(&grant("acme", "2", "never-p0", None))
        .await
        .unwrap();
    assert_eq!(c.balance("acme").await, money("34"));
    let names = |v: &[(String, Decimal)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&lots(&c, "acme").await),
        [
            "grant soon",
            "grant later",
            "grant never-p0",
            "grant never-p1"
        ],
        "burn order"
    );
    // RecordUsage: 4 → the soonest grant (3), then 1 of the next.
    c.use_credits("acme", "4", "u1").await;
    assert_eq!(
        lots(&c, "acme").await,
        [
            ("grant later".into(), dec("4")),
            ("grant never-p0".into(), dec("2")),
            ("grant never-p1".into(), dec("4")),
        ]
    );
    // A batch (group commit's set-based statement): 5 across two items.
    let batch = c
        .ledger()
        .record_usage_batch(&[usage("acme", "2.5", "b1"), usage("acme", "2.5", "b2")])
        .await
        .unwrap();
    assert!(batch.iter().all(Result::is_ok), "{batch:?}");
    assert_eq!(
        lots(&c, "acme").await,
        [
            ("grant never-p0".into(), dec("1")),
            ("grant never-p1".into(), dec("4")),
        ]
    );
    // A capture draws like usage: the last grants, then purchased credits.
    let h = c.hold("acme", "6", "job").await;
    c.ledger()
        .capture_hold(
            &credits_tests::api::acct("acme"),
            &h.hold_id,
            money("6"),
            "",
        )
        .await
        .unwrap();
    let a = c.account("acme").await;
    assert!(a.grants.is_empty(), "{:?}", a.grants);
    assert_eq!(a.balance, money("19"));
    assert_books_balance(&ledger).await;

    // A refund takes purchased credits before grants.
    let (ledger, c) = Ledger::with_prepaid("beta", "10").await;
    c.ledger()
        .grant_credits(&grant("beta", "5", "promo", None))
        .await
        .unwrap();
    let mut raw = ledger.client().await;
    raw.debit_credits(pb::DebitCreditsRequest {
        account_id: "beta".into(),
        amount: "4".into(),
        kind: pb::DebitKind::Refund as i32,
        reference: "rf_1".into(),
        idempotency_key: "rf_1".into(),
        description: "refund".into(),
        require_available: true,
    })
    .await
    .unwrap();
    assert_eq!(lots(&c, "beta").await, [("grant promo".into(), dec("5"))]);
    let mut db = ledger.db().await;
    let purchased: Decimal = sqlx::query_scalar(
        "SELECT remaining FROM lots WHERE account_id = 'beta' AND source = 'PURCHASE'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(purchased, dec("6"));
    assert_books_balance(&ledger).await;
}

/// Usage past zero is debt; a credit that arrives then pays it first and its lot holds
/// only what is left above zero.
#[tokio::test]
async fn a_credit_after_debt_pays_the_debt_before_it_holds_anything_r29() {
    let (ledger, c) = Ledger::with_prepaid("acme", "5").await;
    c.use_credits("acme", "8", "u1").await;
    assert_eq!(c.balance("acme").await, money("-3"));
    c.ledger()
        .grant_credits(&grant("acme", "2", "small", None))
        .await
        .unwrap();
    assert!(
        lots(&c, "acme").await.is_empty(),
        "a grant that only pays debt holds nothing"
    );
    c.ledger()
        .grant_credits(&grant("acme", "10", "big", None))
        .await
        .unwrap();
    assert_eq!(lots(&c, "acme").await, [("grant big".into(), dec("9"))]);
    assert_eq!(c.balance("acme").await, money("9"));
    assert_books_balance(&ledger).await;
}

/// Expiry: one EXPIRY entry of what was left, `ledger.credits.expired`, and the balance's
/// move acted on as for any debit (a threshold crossing here, which starts a top-up).
#[tokio::test]
async fn a_grant_expires_once_with_an_entry_an_event_and_a_crossing_r29() {
    let (ledger, mut tap, c) = Ledger::tapped_with_prepaid("ledger.#", "acme", "5").await;
    c.set_threshold("acme", "10").await;
    let at = Utc::now() + chrono::Duration::seconds(2);
    let g = c
        .ledger()
        .grant_credits(&grant("acme", "10", "trial", Some(at)))
        .await
        .unwrap();
    c.use_credits("acme", "3", "u1").await;
    assert_eq!(lots(&c, "acme").await[0], ("grant trial".into(), dec("7")));

    let expired = tap
        .expect("ledger.credits.expired", Duration::from_secs(10))
        .await;
    let d = &expired["data"];
    assert_eq!(d["amount"], "7.00");
    assert_eq!(d["source"], "GRANT");
    assert_eq!(d["reason"], "grant trial");
    assert_eq!(d["balance"], "5.00");
    let crossing = tap
        .expect("ledger.balance.threshold_crossed", Duration::from_secs(5))
        .await;
    assert_eq!(crossing["data"]["balance_before"], "12.00");
    assert_eq!(crossing["data"]["balance_after"], "5.00");
    assert_eq!(crossing["data"]["entry_id"], d["entry_id"]);
    // The contract type reads it.
    let body = expired["_amqp"]["body"].as_str().unwrap();
    let env = credits_common::events::Envelope::parse(body.as_bytes()).unwrap();
    assert!(matches!(
        env.event,
        credits_common::events::Event::CreditsExpired(_)
    ));

    let entries = c.entries("acme").await;
    let expiry: Vec<_> = entries
        .iter()
        .filter(|e| e.kind == credits_client::EntryKind::Expiry)
        .collect();
    assert_eq!(expiry.len(), 1, "{entries:?}");
    assert_eq!(expiry[0].amount, money("7"));
    assert_eq!(expiry[0].balance_after, money("5"));
    assert_eq!(expiry[0].description, "Grant expired: grant trial");
    assert_eq!(c.balance("acme").await, money("5"));
    assert!(c.account("acme").await.grants.is_empty());
    // Replaying the grant's key answers the first grant; nothing is granted again.
    let again = c
        .ledger()
        .grant_credits(&grant("acme", "10", "trial", Some(at)))
        .await
        .unwrap();
    assert_eq!(again.entry.entry_id, g.entry.entry_id);
    assert_eq!(c.balance("acme").await, money("5"));
    // More time passes: nothing expires twice.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(c.entries("acme").await.len(), entries.len());
    assert!(
        tap.next_of("ledger.credits.expired", Duration::from_millis(500))
            .await
            .is_none()
    );
    assert_books_balance(&ledger).await;
}

/// Many accounts' grants expire at one moment while usage races the expiry through two
/// ledger replicas (each sweeping too): every lot expires exactly once, no usage is drawn
/// from an expired grant, and the books balance.
#[tokio::test]
async fn expiry_happens_exactly_once_under_two_replicas_and_racing_usage_r29() {
    let a = Ledger::start().await;
    let b = a.another_replica().await;
    let (ca, cb) = (a.api(), b.api());
    const N: usize = 30;
    let at = Utc::now() + chrono::Duration::seconds(3);
    for i in 0..N {
        let id = format!("acct{i}");
        ca.prepaid(&id, "5").await;
        ca.ledger()
            .grant_credits(&grant(&id, "2", &format!("g{i}"), Some(at)))
            .await
            .unwrap();
    }
    // Usage on every account through both replicas, from before to after the expiry.
    let mut tasks = Vec::new();
    for (r, c) in [ca.clone(), cb.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for round in 0..12 {
                let items: Vec<UsageRecord> = (0..N)
                    .map(|i| usage(&format!("acct{i}"), "0.05", &format!("r{r}-{round}-{i}")))
                    .collect();
                let results = c.ledger().record_usage_batch(&items).await.unwrap();
                assert!(results.iter().all(Result::is_ok), "{results:?}");
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut db = a.db().await;
    let (expiries, lots_expired, distinct): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM entries WHERE kind = 'EXPIRY'),
                (SELECT count(*) FROM lots WHERE expired_at IS NOT NULL),
                (SELECT count(DISTINCT reference) FROM entries WHERE kind = 'EXPIRY')",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(lots_expired, N as i64, "every grant expired");
    assert_eq!(expiries, N as i64, "one EXPIRY entry per grant");
    assert_eq!(distinct, N as i64);
    // No usage posted after the expiry drew on the expired grant: what expired is exactly
    // the grant minus the usage posted before it.
    let wrong: Vec<(String, Decimal, Decimal)> = sqlx::query_as(
        "SELECT l.account_id, x.amount,
                l.amount - coalesce((SELECT sum(u.amount) FROM entries u
                                     WHERE u.account_id = l.account_id AND u.kind = 'USAGE'
                                       AND u.seq < x.seq), 0)
         FROM lots l JOIN entries x ON x.seq = l.expiry_entry_seq
         WHERE l.source = 'GRANT'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    for (id, expired, expected) in wrong {
        assert_eq!(expired, expected.max(Decimal::ZERO), "{id}");
    }
    assert_books_balance(&a).await;
    b.stop().await;
    a.stop().await;
}

/// R29 with `PURCHASED_CREDITS_EXPIRE_DAYS`: a purchase's credits carry the expiry, are
/// listed as expiring, are drawn before purchases that never expire, and expire like a
/// grant (suspending a prepaid account left at zero).
#[tokio::test]
async fn purchased_credits_expire_after_the_configured_days_r29() {
    let ledger = Ledger::start_with(LedgerOptions {
        purchased_credits_expire_days: Some(365),
        ..Default::default()
    })
    .await;
    let c = ledger.api();
    let before = Utc::now();
    c.prepaid("acme", "10").await;
    let a = c.account("acme").await;
    assert_eq!(a.expiring_purchases.len(), 1, "{a:?}");
    let lot = &a.expiring_purchases[0];
    assert_eq!(lot.source, CreditSource::Purchase);
    let exp = lot.expires_at.unwrap();
    assert!(
        exp >= before + chrono::Duration::days(365)
            && exp <= Utc::now() + chrono::Duration::days(365),
        "{exp}"
    );
    c.use_credits("acme", "4", "u1").await;
    // A year passes (moved in the database: the ledger's clock is the database's).
    let mut db = ledger.db().await;
    sqlx::query(
        "UPDATE lots SET expires_at = now() - interval '1 second' WHERE account_id = 'acme'",
    )
    .execute(&mut db)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE accounts SET next_expiry = now() - interval '1 second' WHERE account_id = 'acme'",
    )
    .execute(&mut db)
    .await
    .unwrap();
    let t = std::time::Instant::now();
    while c.balance("acme").await != money("0") {
        assert!(t.elapsed() < Duration::from_secs(10), "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!c.access("acme").await.allowed, "suspended at zero");
    let e = c.entries("acme").await;
    assert_eq!(e[0].kind, credits_client::EntryKind::Expiry);
    assert_eq!(e[0].amount, money("6"));
    assert_eq!(e[0].description, "Purchased credits expired");
    assert_books_balance(&ledger).await;
}

/// Bad grants are refused with the field named and change nothing; a replay answers the
/// first grant, and the same key with other terms is ALREADY_EXISTS. The gateway role may
/// not grant; billing may.
#[tokio::test]
async fn bad_grants_are_refused_naming_the_field_and_change_nothing_r29() {
    let (ledger, c) = Ledger::with_prepaid("acme", "10").await;
    let mut raw = ledger.client().await;
    let in_30_days = prost_types_ts(Utc::now() + chrono::Duration::days(30));
    let good = || pb::GrantCreditsRequest {
        account_id: "acme".into(),
        amount: "5".into(),
        idempotency_key: "g1".into(),
        reason: "Launch promotion".into(),
        expires_at: Some(in_30_days),
        priority: 0,
    };
    let cases: Vec<(&str, &str, Code, pb::GrantCreditsRequest)> = vec![
        (
            "no reason",
            "reason",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                reason: "  ".into(),
                ..good()
            },
        ),
        (
            "bidi in reason",
            "reason",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                reason: "free \u{202e}gnp.exe".into(),
                ..good()
            },
        ),
        (
            "long reason",
            "reason",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                reason: "x".repeat(201),
                ..good()
            },
        ),
        (
            "past expiry",
            "expires_at",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                expires_at: Some(prost_types_ts(Utc::now() - chrono::Duration::seconds(1))),
                ..good()
            },
        ),
        (
            "bad nanos",
            "expires_at",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                expires_at: Some(prost_types::Timestamp {
                    seconds: 4_000_000_000,
                    nanos: -1,
                }),
                ..good()
            },
        ),
        (
            "year 10000",
            "expires_at",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                expires_at: Some(prost_types::Timestamp {
                    seconds: 253_402_300_800,
                    nanos: 0,
                }),
                ..good()
            },
        ),
        (
            "two centuries",
            "expires_at",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                expires_at: Some(prost_types_ts(
                    Utc::now() + chrono::Duration::days(365 * 200),
                )),
                ..good()
            },
        ),
        (
            "negative priority",
            "priority",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                priority: -1,
                ..good()
            },
        ),
        (
            "huge priority",
            "priority",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                priority: 1_000_001,
                ..good()
            },
        ),
        (
            "zero amount",
            "amount",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                amount: "0".into(),
                ..good()
            },
        ),
        (
            "ten decimals",
            "amount",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                amount: "0.0000000001".into(),
                ..good()
            },
        ),
        (
            "no key",
            "idempotency_key",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                idempotency_key: String::new(),
                ..good()
            },
        ),
        (
            "bad account",
            "account_id",
            Code::InvalidArgument,
            pb::GrantCreditsRequest {
                account_id: "a b".into(),
                ..good()
            },
        ),
    ];
    for (case, field, code, req) in cases {
        let e = raw.grant_credits(req).await.unwrap_err();
        assert_names(&e, code, field, case);
    }
    let e = raw
        .grant_credits(pb::GrantCreditsRequest {
            account_id: "nobody".into(),
            ..good()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(c.entries("acme").await.len(), 1, "nothing changed");
    assert_eq!(c.balance("acme").await, money("10"));

    let first = raw.grant_credits(good()).await.unwrap().into_inner();
    let replay = raw.grant_credits(good()).await.unwrap().into_inner();
    assert_eq!(
        first.entry.unwrap().entry_id,
        replay.entry.unwrap().entry_id
    );
    let other_expiry = pb::GrantCreditsRequest {
        expires_at: Some(prost_types_ts(Utc::now() + chrono::Duration::days(60))),
        ..good()
    };
    assert_eq!(
        raw.grant_credits(other_expiry).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let other_priority = pb::GrantCreditsRequest {
        priority: 7,
        ..good()
    };
    assert_eq!(
        raw.grant_credits(other_priority).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(c.balance("acme").await, money("15"));
    // A grant does not end PENDING_FIRST_PURCHASE (R3: no free trial).
    c.create_account("fresh", BillingMode::Prepaid).await;
    c.ledger()
        .grant_credits(&grant("fresh", "5", "welcome", None))
        .await
        .unwrap();
    let fresh = c.account("fresh").await;
    assert_eq!(fresh.balance, money("5"));
    assert_eq!(fresh.access, credits_client::Access::PendingFirstPurchase);
}

fn prost_types_ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    credits_common::ids::timestamp(t)
}

/// R30's property: for random postings — single, batched, streamed, captured, with
/// replayed keys, conflicting keys, transactions rolled back and a ledger killed and
/// restarted mid-stream — the summary by hour and by day equals the journal's own sums.
#[tokio::test]
async fn the_usage_summary_equals_the_journal_for_random_postings_replays_and_crashes_r30() {
    let seed: u64 = std::env::var("SUMMARY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Utc::now().timestamp_subsec_nanos() as u64 | 1);
    eprintln!("SUMMARY_SEED={seed}");
    let mut rng = Rng(seed);
    let ledger = Ledger::start().await;
    let opts = ledger.restart_options();
    let c = ledger.api();
    let accounts = ["a", "b", "c"];
    for a in accounts {
        c.create_account(a, BillingMode::Contract).await;
    }
    let mut keys: Vec<(String, UsageRecord)> = Vec::new();
    let item = |rng: &mut Rng, keys: &mut Vec<(String, UsageRecord)>| -> UsageRecord {
        // One in five repeats an earlier request exactly (a replay).
        if !keys.is_empty() && rng.below(5) == 0 {
            return keys[rng.below(keys.len() as u64) as usize].1.clone();
        }
        let id = accounts[rng.below(3) as usize];
        let k = format!("k{}", rng.next());
        let r = UsageRecord {
            account_id: credits_tests::api::acct(id),
            category: UsageCategory::ALL[rng.below(5) as usize],
            amount: money(&format!("0.{:06}", 1 + rng.below(999_999))),
            idempotency_key: key(&k),
            description: String::new(),
        };
        keys.push((k, r.clone()));
        r
    };
    let mut ledger = Some(ledger);
    for round in 0..6 {
        if round > 0 {
            // An hour passes: everything posted so far moves an hour back, as if posted an
            // hour earlier, so the next posting on each account finds its running hour
            // ended and moves it to usage_rollups (the journal's append-only guard is lifted
            // for this alone).
            let mut db = ledger.as_ref().unwrap().db().await;
            for sql in [
                "ALTER TABLE entries DISABLE TRIGGER entries_no_update",
                "UPDATE entries SET created_at = created_at - interval '1 hour'",
                "ALTER TABLE entries ENABLE TRIGGER entries_no_update",
                "UPDATE accounts SET roll_hour = roll_hour - interval '1 hour' WHERE roll_hour IS NOT NULL",
                // (in two moves: an hour's key may still be taken when one move is done)
                "UPDATE usage_rollups SET hour = hour - interval '1000 hours'",
                "UPDATE usage_rollups SET hour = hour + interval '999 hours'",
            ] {
                sqlx::query(sql).execute(&mut db).await.unwrap();
            }
        }
        let c = ledger.as_ref().unwrap().api();
        for _ in 0..20 {
            let r = item(&mut rng, &mut keys);
            let _ = c.ledger().record_usage(&r).await.unwrap();
        }
        let batch: Vec<_> = (0..40).map(|_| item(&mut rng, &mut keys)).collect();
        c.ledger().record_usage_batch(&batch).await.unwrap();
        // A conflicting reuse of a key: refused, counted nowhere.
        if let Some((_, first)) = keys.first() {
            let mut other = first.clone();
            other.amount = money("9.99");
            let e = c.ledger().record_usage(&other).await.unwrap_err();
            assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        }
        // A capture.
        let h = c.hold("a", "0.5", &format!("h{round}")).await;
        c.ledger()
            .capture_hold(
                &credits_tests::api::acct("a"),
                &h.hold_id,
                money("0.25"),
                "",
            )
            .await
            .unwrap();
        // A posting whose transaction never commits (a crash before COMMIT).
        {
            let mut db = ledger.as_ref().unwrap().db().await;
            let mut tx = sqlx::Connection::begin(&mut db).await.unwrap();
            sqlx::query("SELECT * FROM ledger_post('b', 'USAGE', 'OTHER', NULL, 5, '', '', $1)")
                .bind(format!("rolled-back-{round}"))
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.rollback().await.unwrap();
        }
        // A stream cut by killing the ledger mid-flight, then the ledger back.
        let items: Vec<_> = (0..200).map(|_| item(&mut rng, &mut keys)).collect();
        let c2 = c.clone();
        let streaming = tokio::spawn(async move {
            use futures_util::StreamExt;
            if let Ok(s) = c2
                .ledger()
                .stream_usage(futures_util::stream::iter(items))
                .await
            {
                let _ = s.collect::<Vec<_>>().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.below(30))).await;
        // Killed: the serving task dropped mid-stream (its group commit's statements are
        // each one transaction, committed or not).
        ledger.take().unwrap().served.task.abort();
        let _ = streaming.await;
        ledger = Some(
            Ledger::start_with(LedgerOptions {
                addr: None,
                ..opts.clone()
            })
            .await,
        );
    }
    let ledger = ledger.unwrap();
    let c = ledger.api();
    let mut db = ledger.db().await;
    let from: DateTime<Utc> = sqlx::query_scalar(
        "SELECT date_trunc('hour', min(created_at), 'UTC') - interval '2 hours' FROM entries",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    let to = from + chrono::Duration::days(2);
    for a in accounts {
        for (granularity, step) in [(Granularity::Hour, 3600i64), (Granularity::Day, 86_400)] {
            let summary = c
                .ledger()
                .usage_summary(&credits_tests::api::acct(a), from, to, granularity)
                .await
                .unwrap();
            let journal: Vec<(DateTime<Utc>, String, Decimal, i64)> = sqlx::query_as(
                "SELECT $2::timestamptz + (extract(epoch FROM created_at - $2::timestamptz)::bigint / $3 * $3) * interval '1 second',
                        category, sum(amount), count(*)
                 FROM entries WHERE account_id = $1 AND kind = 'USAGE'
                 GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .bind(a)
            .bind(from)
            .bind(step)
            .fetch_all(&mut db)
            .await
            .unwrap();
            let got: Vec<_> = summary
                .iter()
                .map(|p| {
                    (
                        p.start,
                        p.category.as_str().to_owned(),
                        p.amount.as_decimal(),
                        p.count,
                    )
                })
                .collect();
            assert!(!journal.is_empty(), "seed {seed}: no usage on {a}");
            assert_eq!(
                got, journal,
                "seed {seed}: summary ≠ journal for {a} by {granularity:?}"
            );
        }
    }
    // The summary is read from rollups (and each running hour) alone: they hold exactly the
    // journal's sums.
    let (rolled, journaled): (Decimal, Decimal) = sqlx::query_as(
        "SELECT (SELECT coalesce(sum(h.amount), 0) FROM accounts a, ledger_usage_hours(a.account_id) h),
                (SELECT coalesce(sum(amount), 0) FROM entries WHERE kind = 'USAGE')",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(rolled, journaled, "seed {seed}");
    // The hours that ended were moved to usage_rollups by the postings that found them ended.
    let hours: i64 = sqlx::query_scalar("SELECT count(DISTINCT hour) FROM usage_rollups")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(hours, 5, "seed {seed}: five ended hours in usage_rollups");
    // Nothing was counted for the conflicting requests or the rolled-back postings.
    let rolled_back: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM entries WHERE idempotency_key LIKE 'rolled-back-%'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(rolled_back, 0);
}

/// GetUsageSummary's range is checked before anything is read.
#[tokio::test]
async fn bad_summary_ranges_are_refused_naming_the_field_r30() {
    let (ledger, c) = Ledger::with_prepaid("acme", "10").await;
    c.use_credits("acme", "1", "u1").await;
    let mut raw = ledger.client().await;
    let hour = |h: i64| {
        Some(prost_types::Timestamp {
            seconds: 1_796_000_400 + h * 3600,
            nanos: 0,
        })
    };
    let good = || pb::GetUsageSummaryRequest {
        account_id: "acme".into(),
        from: hour(0),
        to: hour(24),
        granularity: pb::Granularity::Hour as i32,
    };
    let cases: Vec<(&str, &str, pb::GetUsageSummaryRequest)> = vec![
        (
            "no from",
            "from",
            pb::GetUsageSummaryRequest {
                from: None,
                ..good()
            },
        ),
        (
            "no to",
            "to",
            pb::GetUsageSummaryRequest { to: None, ..good() },
        ),
        (
            "from mid-hour",
            "from",
            pb::GetUsageSummaryRequest {
                from: Some(prost_types::Timestamp {
                    seconds: 1_796_000_401,
                    nanos: 0,
                }),
                ..good()
            },
        ),
        (
            "to with nanos",
            "to",
            pb::GetUsageSummaryRequest {
                to: Some(prost_types::Timestamp {
                    seconds: 1_796_000_400 + 7200,
                    nanos: 5_000,
                }),
                ..good()
            },
        ),
        (
            "from after to",
            "from",
            pb::GetUsageSummaryRequest {
                from: hour(5),
                to: hour(2),
                ..good()
            },
        ),
        (
            "empty range",
            "from",
            pb::GetUsageSummaryRequest {
                from: hour(5),
                to: hour(5),
                ..good()
            },
        ),
        (
            "32 days by the hour",
            "to",
            pb::GetUsageSummaryRequest {
                to: hour(32 * 24),
                ..good()
            },
        ),
        (
            "401 days",
            "to",
            pb::GetUsageSummaryRequest {
                to: hour(401 * 24),
                granularity: pb::Granularity::Day as i32,
                ..good()
            },
        ),
        (
            "unknown granularity",
            "granularity",
            pb::GetUsageSummaryRequest {
                granularity: 9,
                ..good()
            },
        ),
        (
            "year 0",
            "from",
            pb::GetUsageSummaryRequest {
                from: Some(prost_types::Timestamp {
                    seconds: -62_135_596_801,
                    nanos: 0,
                }),
                ..good()
            },
        ),
        (
            "bad account",
            "account_id",
            pb::GetUsageSummaryRequest {
                account_id: String::new(),
                ..good()
            },
        ),
    ];
    for (case, field, req) in cases {
        let e = raw.get_usage_summary(req).await.unwrap_err();
        assert_names(&e, Code::InvalidArgument, field, case);
    }
    let e = raw
        .get_usage_summary(pb::GetUsageSummaryRequest {
            account_id: "nobody".into(),
            ..good()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // A day may start at any hour (a customer's midnight): 24-hour periods from `from`.
    let now = Utc::now();
    let from = DateTime::from_timestamp(now.timestamp() / 3600 * 3600 - 5 * 3600, 0).unwrap();
    let periods = c
        .ledger()
        .usage_summary(
            &credits_tests::api::acct("acme"),
            from,
            from + chrono::Duration::days(1),
            Granularity::Day,
        )
        .await
        .unwrap();
    assert_eq!(periods.len(), 1, "{periods:?}");
    assert_eq!(periods[0].start, from);
    assert_eq!(periods[0].amount, money("1"));
    assert_eq!(periods[0].count, 1);
    assert_eq!(periods[0].category, UsageCategory::ApiRequests);
}

/// A small seeded generator (xorshift64*), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `credits` is used by other suites; here it makes an ADJUSTMENT credit, which is a
/// purchased-class lot without expiry.
#[tokio::test]
async fn adjustments_are_purchased_class_lots_drawn_after_grants_r29() {
    let (ledger, c) = Ledger::with_prepaid("acme", "5").await;
    c.ledger()
        .add_credits(&credits("acme", "3", CreditSource::Adjustment, "adj"))
        .await
        .unwrap();
    c.ledger()
        .grant_credits(&grant("acme", "1", "g", None))
        .await
        .unwrap();
    c.use_credits("acme", "2", "u").await;
    let mut db = ledger.db().await;
    let rows: Vec<(String, Decimal)> =
        sqlx::query_as("SELECT source, remaining FROM ledger_lots_now('acme') ORDER BY ord")
            .fetch_all(&mut db)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("PURCHASE".to_owned(), dec("4")),
            ("ADJUSTMENT".to_owned(), dec("3")),
        ]
    );
    assert_books_balance(&ledger).await;
}

/// The upgrade to release 3 on a journal release 2 wrote: the migration replays each
/// account's journal into lots of two classes — grants and purchased credits, usage taking
/// grants first, refunds purchased credits first, a credit after debt holding only what it
/// left above zero — so a grant made before the upgrade is still never refunded as cash;
/// ledger_after_upgrade() then fills the rollups from the journal, once.
#[tokio::test]
async fn the_upgrade_replays_a_release_2_journal_into_lots_of_both_classes_r29_r30() {
    use sqlx::Connection;
    let url = credits_tests::fresh_database_url("upgrade");
    let (base, name) = url.rsplit_once('/').unwrap();
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/credits-ledger/migrations");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    // Release 2's schema: every migration before release 3's lots.
    let lots = files
        .iter()
        .position(|f| f.to_string_lossy().contains("credit_lots_rollups"))
        .expect("the lots migration");
    for f in &files[..lots] {
        sqlx::raw_sql(&std::fs::read_to_string(f).unwrap())
            .execute(&mut db)
            .await
            .unwrap();
    }
    // What release 2 wrote: accounts and their journals (balance_after chained).
    sqlx::raw_sql(
        "INSERT INTO accounts (account_id, billing_mode, access, balance) VALUES
           ('u1', 'PREPAID', 'ACTIVE', 95), ('u2', 'PREPAID', 'ACTIVE', 3), ('u3', 'PREPAID', 'ACTIVE', 40);
         INSERT INTO entries (account_id, kind, category, source, amount, balance_after, idempotency_key) VALUES
           ('u1', 'CREDIT', NULL, 'PURCHASE', 80, 80, 'a'), ('u1', 'CREDIT', NULL, 'GRANT', 20, 100, 'b'),
           ('u1', 'USAGE', 'API_REQUESTS', NULL, 5, 95, 'c'),
           ('u2', 'CREDIT', NULL, 'PURCHASE', 10, 10, 'a'), ('u2', 'USAGE', 'FINE_TUNING', NULL, 15, -5, 'b'),
           ('u2', 'CREDIT', NULL, 'GRANT', 8, 3, 'c'),
           ('u3', 'CREDIT', NULL, 'PURCHASE', 50, 50, 'a'), ('u3', 'REFUND', NULL, NULL, 10, 40, 'b');",
    )
    .execute(&mut db)
    .await
    .unwrap();
    // The migrations (release 3's lots and what came after), then the functions and what
    // the ledger runs at start-up.
    let mut tx = db.begin().await.unwrap();
    for f in &files[lots..] {
        sqlx::raw_sql(&std::fs::read_to_string(f).unwrap())
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::raw_sql(credits_ledger::FUNCTIONS)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let repaired: i32 = sqlx::query_scalar("SELECT ledger_after_upgrade()")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(
        repaired, 0,
        "the migration's lots add up: nothing to repair"
    );
    let lots: Vec<(String, String, Decimal)> = sqlx::query_as(
        "SELECT account_id, source, remaining FROM lots ORDER BY account_id, source",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(
        lots,
        [
            ("u1".to_owned(), "GRANT".to_owned(), dec("15")),
            ("u1".to_owned(), "PURCHASE".to_owned(), dec("80")),
            ("u2".to_owned(), "GRANT".to_owned(), dec("3")),
            ("u3".to_owned(), "PURCHASE".to_owned(), dec("40")),
        ]
    );
    // A refund of everything is refused: $80 of u1's $95 is purchased credits.
    let (outcome, covered): (String, Decimal) = sqlx::query_as(
        "SELECT outcome, amount FROM ledger_debit_covered('u1', 'REFUND', 95, 'r', 'refund', 'r1')",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!((outcome.as_str(), covered), ("insufficient", dec("80")));
    // The rollups hold release 2's usage, once.
    let usage: Vec<(String, String, Decimal, i64)> = sqlx::query_as(
        "SELECT a.account_id, h.category, sum(h.amount), sum(h.count)::bigint
         FROM accounts a, ledger_usage_hours(a.account_id) h GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(
        usage,
        [
            ("u1".to_owned(), "API_REQUESTS".to_owned(), dec("5"), 1),
            ("u2".to_owned(), "FINE_TUNING".to_owned(), dec("15"), 1),
        ]
    );
    // Running it again does nothing.
    let again: i32 = sqlx::query_scalar("SELECT ledger_after_upgrade()")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(again, 0);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_rollups")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(rows, 2);
    drop(db);
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}

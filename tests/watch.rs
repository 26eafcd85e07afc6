//! R31: `WatchAccess`, the gateway's `AccessCache` and `UsageRecorder`, against real
//! PostgreSQL and real ledgers (two replicas on one database where it matters, ledgers
//! stopped and started on the same address).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use credits_client::{
    AccessCache, AccessCacheConfig, AccessUpdate, DisconnectedPolicy, RecorderConfig,
    UsageRecorder, WatchEvent,
};
use credits_tests::api::*;
use credits_tests::{Ledger, LedgerOptions, eventually};
use futures_util::{Stream, StreamExt};

const WAIT: Duration = Duration::from_secs(20);

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<WatchEvent, ClientError>> + Send>>;

async fn watch(api: &Api, ids: &[&str], cursor: Option<&str>) -> Events {
    let ids: Vec<AccountId> = ids.iter().map(|i| acct(i)).collect();
    Box::pin(
        api.ledger()
            .watch_access(&ids, cursor)
            .await
            .unwrap_or_else(|e| panic!("watch: {e}")),
    )
}

/// The updates up to the next sync point, and its cursor.
async fn until_sync(events: &mut Events) -> (Vec<AccessUpdate>, String) {
    let mut updates = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, events.next()).await {
            Ok(Some(Ok(WatchEvent::Update(u)))) => updates.push(u),
            Ok(Some(Ok(WatchEvent::Sync { cursor }))) => return (updates, cursor),
            other => panic!("the stream ended or stalled before a sync point: {other:?}"),
        }
    }
}

/// Updates (sync points skipped) until `done` says the collected ones are enough.
async fn updates_until(
    events: &mut Events,
    what: &str,
    mut done: impl FnMut(&[AccessUpdate]) -> bool,
) -> Vec<AccessUpdate> {
    let mut got = Vec::new();
    while !done(&got) {
        match tokio::time::timeout(WAIT, events.next()).await {
            Ok(Some(Ok(WatchEvent::Update(u)))) => got.push(u),
            Ok(Some(Ok(WatchEvent::Sync { .. }))) => {}
            other => panic!("{what}: the stream ended or stalled: {other:?}; had {got:#?}"),
        }
    }
    got
}

/// The account's version as the database holds it.
async fn db_version(ledger: &Ledger, id: &str) -> (i64, rust_decimal::Decimal) {
    let mut db = ledger.db().await;
    sqlx::query_as("SELECT version, balance FROM accounts WHERE account_id = $1")
        .bind(id)
        .fetch_one(&mut db)
        .await
        .expect("read the account")
}

#[tokio::test]
async fn a_watch_starts_with_the_states_then_streams_every_change_from_either_replica_in_order_r31()
{
    let a = Ledger::start().await;
    let b = a.another_replica().await;
    let (ca, cb) = (a.api(), b.api());
    ca.prepaid("acme", "10").await;
    ca.create_account("bigco", BillingMode::Contract).await;
    ca.prepaid("other", "5").await;

    let mut events = watch(&ca, &["acme", "bigco"], None).await;
    let (first, _) = until_sync(&mut events).await;
    let by_id: HashMap<_, _> = first
        .iter()
        .map(|u| (u.account_id.as_str().to_owned(), u.clone()))
        .collect();
    assert_eq!(by_id.len(), 2, "{first:#?}");
    let acme = &by_id["acme"];
    assert_eq!(
        (acme.access, acme.balance, acme.available_balance),
        (Access::Active, money("10"), money("10"))
    );
    assert_eq!(acme.billing_mode, BillingMode::Prepaid);
    assert_eq!(by_id["bigco"].billing_mode, BillingMode::Contract);
    assert_eq!(acme.seq as i64, db_version(&a, "acme").await.0);
    let s0 = acme.seq;

    // Changes through both replicas, each awaited: usage, a hold, its release, a credit,
    // usage to below zero (suspends), a credit that reactivates.
    ca.use_credits("acme", "1", "u1").await;
    cb.use_credits("acme", "2", "u2").await;
    let h = cb.hold("acme", "3", "h1").await;
    ca.release("acme", &h.hold_id).await;
    cb.add_credits("acme", "4", CreditSource::Grant, "g1").await;
    ca.use_credits("acme", "12", "u3").await;
    cb.add_credits("acme", "1.5", CreditSource::Purchase, "p1")
        .await;
    // One group-commit statement, two postings: two changes.
    let batch = ca
        .ledger()
        .record_usage_batch(&[usage("acme", "0.1", "b1"), usage("acme", "0.2", "b2")])
        .await
        .expect("batch");
    assert!(batch.iter().all(Result::is_ok), "{batch:?}");
    ca.use_credits("other", "1", "not-watched").await;
    // (balance, held, access) after each change, in order.
    let want = [
        ("9", "0", Access::Active),
        ("7", "0", Access::Active),
        ("7", "3", Access::Active),
        ("7", "0", Access::Active),
        ("11", "0", Access::Active),
        ("-1", "0", Access::Suspended),
        ("0.5", "0", Access::Active),
        ("0.4", "0", Access::Active),
        ("0.2", "0", Access::Active),
    ];
    let got = updates_until(&mut events, "acme's changes", |g| g.len() >= want.len()).await;
    for (i, (u, (bal, held, access))) in got.iter().zip(want).enumerate() {
        assert_eq!(
            u.account_id.as_str(),
            "acme",
            "only watched accounts: {u:?}"
        );
        assert_eq!(
            u.seq,
            s0 + 1 + i as u64,
            "change {i}: every change, in order"
        );
        assert_eq!(
            (u.balance, u.held, u.access),
            (money(bal), money(held), access),
            "change {i}"
        );
        assert_eq!(u.available_balance, u.balance - u.held);
        let at = u.changed_at.expect("changed_at");
        assert!((chrono::Utc::now() - at).num_seconds() < 60);
    }

    // Every account: the first part holds all of them; a new one arrives when created.
    let mut all = watch(&cb, &[], None).await;
    let (first, _) = until_sync(&mut all).await;
    assert_eq!(first.len(), 3, "{first:#?}");
    ca.create_account("newco", BillingMode::Contract).await;
    let got = updates_until(&mut all, "the new account", |g| {
        g.iter().any(|u| u.account_id.as_str() == "newco")
    })
    .await;
    let newco = got
        .iter()
        .find(|u| u.account_id.as_str() == "newco")
        .expect("newco");
    assert_eq!((newco.seq, newco.access), (1, Access::Active));
    drop(events);
    drop(all);
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_stream_resumes_from_its_cursor_after_a_disconnect_and_a_ledger_restart_r31() {
    let a = Ledger::start().await;
    let b = a.another_replica().await;
    let (ca, cb) = (a.api(), b.api());
    for id in ["r1", "r2", "r3"] {
        ca.prepaid(id, "10").await;
    }
    let mut events = watch(&ca, &["r1", "r2", "r3"], None).await;
    let (first, cursor) = until_sync(&mut events).await;
    assert_eq!(first.len(), 3);
    let s0 = first
        .iter()
        .find(|u| u.account_id.as_str() == "r1")
        .expect("r1")
        .seq;
    drop(events);

    // While nobody watches: two changes through the other replica, and the ledger the
    // stream was on restarts.
    cb.use_credits("r1", "1", "while-away-1").await;
    cb.use_credits("r1", "2", "while-away-2").await;
    let opts = a.restart_options();
    a.stop().await;
    let a = Ledger::start_with(opts).await;
    let ca = a.api();

    // Resumed: only what changed since the cursor, in order, then a sync point.
    let mut events = watch(&ca, &["r1", "r2", "r3"], Some(&cursor)).await;
    let (caught_up, cursor2) = until_sync(&mut events).await;
    let seqs: Vec<_> = caught_up
        .iter()
        .map(|u| (u.account_id.as_str().to_owned(), u.seq, u.balance))
        .collect();
    assert_eq!(
        seqs,
        [
            ("r1".to_owned(), s0 + 1, money("9")),
            ("r1".to_owned(), s0 + 2, money("7"))
        ],
        "catch-up"
    );
    assert_ne!(cursor2, cursor);
    // And live changes after it.
    cb.use_credits("r2", "1", "live").await;
    let got = updates_until(&mut events, "live change", |g| !g.is_empty()).await;
    assert_eq!(got[0].account_id.as_str(), "r2");
    assert_eq!(got[0].balance, money("9"));
    drop(events);

    // A cursor the feed was pruned past (here: marked pruned) gets the states instead.
    let mut db = a.db().await;
    sqlx::query("UPDATE access_feed SET pruned_below = pg_current_xact_id()")
        .execute(&mut db)
        .await
        .expect("prune");
    let mut events = watch(&ca, &["r1", "r2", "r3"], Some(&cursor2)).await;
    let (states, _) = until_sync(&mut events).await;
    assert_eq!(states.len(), 3, "a snapshot: {states:#?}");
    drop(events);

    // A cursor of another ledger database is not resumed from either: a snapshot.
    let other = Ledger::start().await;
    other.api().prepaid("r1", "1").await;
    let mut foreign = watch(&other.api(), &["r1"], None).await;
    let (_, foreign_cursor) = until_sync(&mut foreign).await;
    drop(foreign);
    let mut events = watch(&ca, &["r1", "r2", "r3"], Some(&foreign_cursor)).await;
    let (states, _) = until_sync(&mut events).await;
    assert_eq!(states.len(), 3, "a snapshot: {states:#?}");
    drop(events);
    other.stop().await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn after_a_failover_the_feed_starts_anew_and_no_cursor_from_before_is_resumed() {
    let a = Ledger::start().await;
    let b = a.another_replica().await;
    // A replica that does not poll (in time for this test): it cannot have heard of the new
    // feed, so only the database's own check refuses an old cursor there.
    let slow = Ledger::start_with(LedgerOptions {
        addr: None,
        feed: Some(credits_ledger::watch::FeedConfig {
            poll_every: Duration::from_secs(3600),
            ..Default::default()
        }),
        ..a.restart_options()
    })
    .await;
    let (ca, cb) = (a.api(), b.api());
    for id in ["f1", "f2"] {
        ca.prepaid(id, "10").await;
    }
    let mut events = watch(&ca, &["f1", "f2"], None).await;
    let (first, before) = until_sync(&mut events).await;
    assert_eq!(first.len(), 2);
    assert!(ca.access("f1").await.allowed);
    let feed_id = |c: &str| c.split('.').nth(1).expect("a cursor's feed id").to_owned();
    // A gateway's cache watching across it.
    let resets = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let cache = AccessCache::start(ca.ledger().clone(), {
        let resets = resets.clone();
        AccessCacheConfig {
            on_reset: Some(Arc::new(move || {
                resets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })),
            ..Default::default()
        }
    });
    assert!(cache.wait_current(WAIT).await, "{:?}", cache.status());
    assert_eq!(resets.load(std::sync::atomic::Ordering::Relaxed), 0);

    // A standby promoted: the server is on another timeline than the one the feed was
    // recorded on (here the record is moved instead; the ledgers cannot tell the two apart).
    let mut db = a.db().await;
    sqlx::query("UPDATE access_feed SET timeline = 'ffffffff'")
        .execute(&mut db)
        .await
        .expect("move the feed's timeline");
    let renewed: String = eventually(WAIT, "a new feed id on the server's timeline", || {
        let db = a.db();
        async move {
            let (id, same): (String, bool) = sqlx::query_as(
                "SELECT replace(feed_id::text, '-', ''),
                        timeline = substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)
                 FROM access_feed",
            )
            .fetch_one(&mut db.await)
            .await
            .ok()?;
            same.then_some(id)
        }
    })
    .await;
    assert_ne!(renewed, feed_id(&before));

    // The stream open across it is told to start again (it ends, to be resumed).
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(Ok(_)) = events.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream open across the failover ended");

    // A change made meanwhile through the other replica is in every view...
    cb.use_credits("f1", "10", "after-failover").await;
    eventually(
        WAIT,
        "replica A's CheckAccess sees f1 suspended",
        || async { (!ca.access("f1").await.allowed).then_some(()) },
    )
    .await;
    // ...and a cursor from before is answered with the states, not caught up from.
    let mut events = watch(&ca, &["f1", "f2"], Some(&before)).await;
    let (states, after) = until_sync(&mut events).await;
    assert_eq!(states.len(), 2, "a snapshot: {states:#?}");
    assert_eq!(feed_id(&after), renewed);
    let f1 = states
        .iter()
        .find(|u| u.account_id.as_str() == "f1")
        .expect("f1");
    assert_eq!(f1.balance, money("0"));
    drop(events);
    // So is it on the replica that has not polled since.
    let mut events = watch(&slow.api(), &["f1", "f2"], Some(&before)).await;
    let (states, _) = until_sync(&mut events).await;
    assert_eq!(
        states.len(),
        2,
        "a snapshot on the replica that did not poll: {states:#?}"
    );
    drop(events);
    // The cache started again from a snapshot of the new feed, once, and is current.
    eventually(WAIT, "the cache reset to a snapshot", || async {
        (resets.load(std::sync::atomic::Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    assert!(cache.wait_current(WAIT).await, "{:?}", cache.status());
    assert_eq!(resets.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(cache.get("f1").map(|x| x.balance), Some(money("0")));
    slow.stop().await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn bad_watch_requests_are_refused_naming_the_field_r31() {
    let ledger = Ledger::start().await;
    let mut raw = ledger.client().await;
    let lpb = credits_proto::ledger::v1::WatchAccessRequest::default;
    let cases: Vec<(&str, credits_proto::ledger::v1::WatchAccessRequest, &str)> = vec![
        (
            "an id with a space",
            credits_proto::ledger::v1::WatchAccessRequest {
                account_ids: vec!["ok".into(), "not ok".into()],
                ..lpb()
            },
            "account_ids[1]",
        ),
        (
            "too many ids",
            credits_proto::ledger::v1::WatchAccessRequest {
                account_ids: (0..10_001).map(|i| format!("a{i}")).collect(),
                ..lpb()
            },
            "account_ids",
        ),
        (
            "a made-up cursor",
            credits_proto::ledger::v1::WatchAccessRequest {
                resume_cursor: "v1.0123456789abcdef0123456789abcdef.5:3:".into(),
                ..lpb()
            },
            "resume_cursor",
        ),
        (
            "not a cursor",
            credits_proto::ledger::v1::WatchAccessRequest {
                resume_cursor: "'; DROP TABLE accounts; --".into(),
                ..lpb()
            },
            "resume_cursor",
        ),
    ];
    for (case, req, field) in cases {
        let e = raw.watch_access(req).await.expect_err(case);
        assert_names(&e, Code::InvalidArgument, field, case);
    }
    // Accounts that do not exist are simply not in the first part.
    let mut events = watch(&ledger.api(), &["nobody"], None).await;
    let (first, _) = until_sync(&mut events).await;
    assert!(first.is_empty(), "{first:#?}");
    drop(events);
    ledger.stop().await;
}

#[tokio::test]
async fn a_replica_serves_at_most_its_streams_and_ends_them_to_be_resumed_r31() {
    let ledger = Ledger::start_with(LedgerOptions {
        feed: Some(credits_ledger::watch::FeedConfig {
            max_streams: 2,
            max_lifetime: Duration::from_secs(2),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let c = ledger.api();
    c.prepaid("acme", "10").await;
    let mut s1 = watch(&c, &[], None).await;
    let mut s2 = watch(&c, &[], None).await;
    until_sync(&mut s1).await;
    until_sync(&mut s2).await;
    let e = match c.ledger().watch_access(&[], None).await {
        Ok(mut third) => match third.next().await {
            Some(Err(e)) => e,
            other => panic!("a third stream served: {other:?}"),
        },
        Err(e) => e,
    };
    assert_says(&e, Code::ResourceExhausted, "WATCH_ACCESS_MAX_STREAMS");
    // At its lifetime a stream ends with UNAVAILABLE, to be resumed.
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match s1.next().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return e,
                None => panic!("ended without a status"),
            }
        }
    })
    .await
    .expect("the stream ends at its lifetime");
    assert_says(&end, Code::Unavailable, "resume");
    drop(s1);
    drop(s2);
    ledger.stop().await;
}

/// What the cache saw, per account: the seqs it applied, in order.
type Seen = Arc<Mutex<HashMap<String, Vec<u64>>>>;

fn recording() -> (Seen, credits_client::OnUpdate) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let on: credits_client::OnUpdate = Arc::new(move |u: &AccessUpdate, _| {
        s.lock()
            .expect("seen")
            .entry(u.account_id.as_str().to_owned())
            .or_default()
            .push(u.seq);
    });
    (seen, on)
}

#[tokio::test]
async fn the_access_cache_sees_every_change_in_order_through_reconnects_and_restarts_r31() {
    let a = Ledger::start().await;
    let b = a.another_replica().await;
    let (ca, cb) = (a.api(), b.api());
    let ids: Vec<String> = (0..12).map(|i| format!("cache-{i}")).collect();
    for id in &ids {
        ca.prepaid(id, "20").await;
    }
    let (seen, on_update) = recording();
    let cache = AccessCache::start(
        ca.ledger().clone(),
        AccessCacheConfig {
            on_update: Some(on_update),
            ..Default::default()
        },
    );
    assert!(cache.wait_current(WAIT).await, "{:?}", cache.status());
    let first: HashMap<String, u64> = seen
        .lock()
        .expect("seen")
        .iter()
        .map(|(k, v)| (k.clone(), v[0]))
        .collect();
    assert_eq!(first.len(), ids.len());

    // Rounds of changes through both replicas; in the middle the ledger the cache is on
    // stops (changes go on through the other), then comes back on the same address.
    let mut n = 0;
    let mut round = |api: Api, round: usize| {
        let ids = ids.clone();
        n += 1;
        let tag = n;
        async move {
            for (i, id) in ids.iter().enumerate() {
                let k = format!("r{round}-{tag}-{i}");
                match (round + i) % 4 {
                    0 => {
                        api.use_credits(id, "1.25", &k).await;
                    }
                    1 => {
                        let h = api.hold(id, "2", &k).await;
                        api.release(id, &h.hold_id).await;
                    }
                    2 => {
                        api.add_credits(id, "0.5", CreditSource::Grant, &k).await;
                    }
                    _ => {
                        api.use_credits(id, "30", &k).await; // suspends
                        api.add_credits(id, "40", CreditSource::Purchase, &format!("{k}-back"))
                            .await;
                    }
                }
            }
        }
    };
    round(ca.clone(), 0).await;
    round(cb.clone(), 1).await;
    let opts = a.restart_options();
    a.stop().await;
    round(cb.clone(), 2).await;
    let a = Ledger::start_with(opts).await;
    round(a.api(), 3).await;
    round(cb.clone(), 4).await;

    // The cache reaches every account's last version, having applied each version once,
    // in order, with none missing.
    for id in &ids {
        let (version, balance) = db_version(&a, id).await;
        eventually(
            WAIT,
            &format!("the cache reaches {id} v{version}"),
            || async {
                cache
                    .get(id)
                    .filter(|c| c.seq as i64 == version)
                    .map(|c| c.balance)
            },
        )
        .await;
        let held = cache.get(id).expect("held");
        assert_eq!(held.balance.as_decimal(), balance, "{id}");
        let seqs = seen.lock().expect("seen")[id.as_str()].clone();
        let want: Vec<u64> = (first[id.as_str()]..=version as u64).collect();
        assert_eq!(seqs, want, "{id}: every change once, in order");
        assert_eq!(
            cache.allowed(id, money("0.01")),
            balance > rust_decimal::Decimal::ZERO
        );
    }
    assert!(cache.status().reconnects >= 1, "{:?}", cache.status());
    drop(cache);
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn while_disconnected_the_cache_denies_or_allows_up_to_the_grace_r31() {
    let a = Ledger::start().await;
    let c = a.api();
    c.prepaid("rich", "100").await;
    c.prepaid("broke", "1").await;
    c.use_credits("broke", "1", "to-zero").await;
    let cfg = |policy| AccessCacheConfig {
        disconnected: policy,
        max_silence: Duration::from_millis(1500),
        ..Default::default()
    };
    let deny = AccessCache::start(c.ledger().clone(), cfg(DisconnectedPolicy::Deny));
    let grace = AccessCache::start(
        c.ledger().clone(),
        cfg(DisconnectedPolicy::Grace(money("1.00"))),
    );
    for cache in [&deny, &grace] {
        assert!(cache.wait_current(WAIT).await);
        assert!(cache.allowed("rich", money("50")));
        assert!(!cache.allowed("broke", Money::ZERO));
        assert!(!cache.allowed("nobody", Money::ZERO));
    }
    let opts = a.restart_options();
    a.stop().await;
    eventually(WAIT, "both caches count as disconnected", || async {
        (!deny.is_current() && !grace.is_current()).then_some(())
    })
    .await;
    assert!(!deny.allowed("rich", money("0.01")), "deny: nothing runs");
    assert!(grace.allowed("rich", money("0.60")));
    assert!(grace.allowed("rich", money("0.40")));
    assert!(!grace.allowed("rich", money("0.01")), "past the grace");
    assert!(!grace.allowed("broke", Money::ZERO), "last seen suspended");
    assert!(!grace.allowed("nobody", Money::ZERO), "never seen");
    let a = Ledger::start_with(opts).await;
    for cache in [&deny, &grace] {
        assert!(cache.wait_current(WAIT).await, "{:?}", cache.status());
        assert!(cache.allowed("rich", money("50")));
    }
    drop(deny);
    drop(grace);
    a.stop().await;
}

#[tokio::test]
async fn the_usage_recorder_answers_each_record_once_durable_through_stream_limits_and_a_restart_r31()
 {
    let a = Ledger::start_with(LedgerOptions {
        // Streams cut every 150 items: the recorder must carry on on new ones.
        stream_limits: Some(credits_ledger::grpc::StreamLimits {
            max_items: 150,
            max_lifetime: Duration::from_secs(3600),
        }),
        ..Default::default()
    })
    .await;
    let c = a.api();
    for id in ["g1", "g2", "g3"] {
        c.prepaid(id, "1000").await;
    }
    let recorder = UsageRecorder::start(c.ledger().clone(), RecorderConfig::default());
    let opts = a.restart_options();
    let calls: Vec<_> = (0..900)
        .map(|i| {
            let r = recorder.clone();
            tokio::spawn(async move {
                let id = ["g1", "g2", "g3"][i % 3];
                // Paced, so some are in flight when the ledger stops.
                tokio::time::sleep(Duration::from_millis((i / 10) as u64 * 10)).await;
                r.record(usage(id, "0.01", &format!("rec-{i}"))).await
            })
        })
        .collect();
    // The ledger stops and comes back while records are in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = Ledger::start_with(LedgerOptions {
        stream_limits: Some(credits_ledger::grpc::StreamLimits {
            max_items: 150,
            max_lifetime: Duration::from_secs(3600),
        }),
        ..opts
    })
    .await;
    for (i, call) in calls.into_iter().enumerate() {
        let r = call.await.expect("record task");
        let r = r.unwrap_or_else(|e| panic!("record {i}: {e}"));
        assert_eq!(r.entry.amount, money("0.01"));
    }
    // Each durable once: 300 entries per account, the balance 1000 − 3.
    let mut db = a.db().await;
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT account_id, count(*) FROM entries WHERE idempotency_key LIKE 'rec-%'
         GROUP BY account_id ORDER BY account_id",
    )
    .fetch_all(&mut db)
    .await
    .expect("count");
    assert_eq!(
        counts,
        [("g1".into(), 300), ("g2".into(), 300), ("g3".into(), 300)]
    );
    let c = a.api();
    for id in ["g1", "g2", "g3"] {
        assert_eq!(c.balance(id).await, money("997"));
    }

    // An item's own error is its answer; the others on the stream are unaffected.
    let unknown = recorder.record(usage("nobody", "1", "x1"));
    let fine = recorder.record(usage("g1", "1", "x2"));
    let reused = recorder.record(usage("g1", "2", "x2"));
    let (unknown, fine) = tokio::join!(unknown, fine);
    assert_eq!(unknown.expect_err("unknown").code(), Code::NotFound);
    assert_eq!(fine.expect("fine").balance, money("996"));
    assert_eq!(
        reused.await.expect_err("reused").code(),
        Code::AlreadyExists
    );
    drop(recorder);
    a.stop().await;
}

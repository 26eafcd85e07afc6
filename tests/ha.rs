//! #25: the daemons over a PostgreSQL failover pair — `deploy/ha/postgres`, pg_auto_failover
//! with a primary and a synchronous standby on this machine — whose primary is killed
//! (keeper and postgres together, as when its machine dies) while credits, usage and
//! purchases are in flight. Every call is retried under its own idempotency key until it is
//! answered, as a client of a payments system must when an answer is lost.
//!
//! The pair is shared by every run on the machine (its ports are fixed): this file holds
//! one test, and each run has its own databases on it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use credits_client::ClientError;
use credits_tests::api::{Api, CreditSource, credits, dec, usage};
use credits_tests::{Ledger, LedgerOptions, NOBODY, Payments, PaymentsOptions, unique};

const HA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/ha/postgres");

/// Runs `deploy/ha/postgres <args>`; its output, which must be a success.
async fn ha(args: &[&str]) -> String {
    let out = tokio::process::Command::new(HA)
        .args(args)
        .output()
        .await
        .expect("run deploy/ha/postgres");
    assert!(
        out.status.success(),
        "deploy/ha/postgres {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `call` until it answers, for as long as the failure is one a retry may cure (the same
/// request, so the same idempotency key, every time).
async fn answered<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// What one writer had acknowledged: (key, entry or charge id), in order, and how many
/// of them were acknowledged after the primary was killed.
#[derive(Default)]
struct Acked {
    done: Vec<(String, String)>,
    after_kill: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_was_acknowledged_survives_the_primary_s_death_and_nothing_is_charged_twice() {
    let base = ha(&["up"]).await;
    assert!(base.contains(','), "a URL of two hosts: {base}");
    let ledger = Ledger::start_with(LedgerOptions {
        database_url: Some(format!("{base}/{}", unique("credits_t_ha_ledger"))),
        ..Default::default()
    })
    .await;
    let payments = Payments::start(PaymentsOptions {
        database_url: Some(format!("{base}/{}", unique("credits_t_ha_payments"))),
        ..PaymentsOptions::for_ledger(&ledger)
    })
    .await;
    let c = Api::connect(&ledger.url(), &payments.url(), NOBODY, None);
    c.prepaid("acme", "100.00").await;
    c.add_card("acme", "4242424242424242", true).await;

    // Three writers, one per kind of money movement, each call after the last answered.
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = |kind: &'static str| {
        let (c, killed, stop) = (c.clone(), killed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Acked::default();
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let k = format!("{kind}-{i}");
                let after = killed.load(Ordering::Acquire);
                let id = match kind {
                    "credit" => {
                        answered(&k, || async {
                            c.ledger()
                                .add_credits(&credits("acme", "1.00", CreditSource::Purchase, &k))
                                .await
                        })
                        .await
                        .entry
                        .entry_id
                    }
                    "usage" => {
                        answered(&k, || async {
                            c.ledger().record_usage(&usage("acme", "0.10", &k)).await
                        })
                        .await
                        .entry
                        .entry_id
                    }
                    _ => {
                        let p = answered(&k, || c.try_buy("acme", "5.00", &k)).await;
                        assert!(p.entry.is_some(), "{k}: a card purchase is credited: {p:?}");
                        p.charge.charge_id
                    }
                };
                acked.after_kill += usize::from(after);
                acked.done.push((k, id));
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        })
    };
    let writers = [writer("credit"), writer("usage"), writer("purchase")];

    tokio::time::sleep(Duration::from_secs(3)).await;
    let old = ha(&["primary"]).await;
    assert!(old == "1" || old == "2", "a primary: {old:?}");
    let t = Instant::now();
    ha(&["kill", &old]).await;
    // Only what was asked after the primary was gone counts as "after the kill".
    killed.store(true, Ordering::Release);
    // The standby takes over; the writers go on through it.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = ha(&["primary"]).await;
        if !now.is_empty() && now != old {
            break;
        }
        assert!(Instant::now() < deadline, "no failover after 90 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "failover: node {old} killed, another primary after {:?}",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Release);
    let mut acked = Vec::new();
    for w in writers {
        acked.push(w.await.unwrap());
    }
    for (a, kind) in acked.iter().zip(["credits", "usage", "purchases"]) {
        assert!(
            a.after_kill > 0 && a.done.len() > a.after_kill,
            "{kind} acknowledged both before and after the kill: {} of {}",
            a.after_kill,
            a.done.len()
        );
    }

    // Every acknowledged movement is there, once: the balance is exactly what they add to.
    let [credited, used, bought] = [&acked[0], &acked[1], &acked[2]].map(|a| a.done.len());
    let expected = dec("100.00")
        + dec("1.00") * rust_decimal::Decimal::from(credited)
        + dec("5.00") * rust_decimal::Decimal::from(bought)
        - dec("0.10") * rust_decimal::Decimal::from(used);
    assert_eq!(
        c.balance("acme").await.as_decimal(),
        expected,
        "{credited} credits, {used} usages, {bought} purchases"
    );
    // Asked again, each is answered with what it did the first time, not done again.
    for (k, id) in &acked[0].done {
        let again = answered(k, || async {
            c.ledger()
                .add_credits(&credits("acme", "1.00", CreditSource::Purchase, k))
                .await
        })
        .await;
        assert_eq!(&again.entry.entry_id, id, "{k} replayed");
    }
    for (k, id) in &acked[1].done {
        let again = answered(k, || async {
            c.ledger().record_usage(&usage("acme", "0.10", k)).await
        })
        .await;
        assert_eq!(&again.entry.entry_id, id, "{k} replayed");
    }
    for (k, id) in &acked[2].done {
        let again = answered(k, || c.try_buy("acme", "5.00", k)).await;
        assert_eq!(&again.charge.charge_id, id, "{k} replayed");
    }
    assert_eq!(
        c.balance("acme").await.as_decimal(),
        expected,
        "replays changed nothing"
    );
    // One charge per purchase key: nothing charged twice across the failover.
    let charges = c.charges("acme").await;
    assert_eq!(
        charges.len(),
        bought,
        "one charge per acknowledged purchase"
    );

    // The killed node comes back as the standby.
    ha(&["start", &old]).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while tokio::process::Command::new(HA)
        .arg("healthy")
        .status()
        .await
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        assert!(
            Instant::now() < deadline,
            "node {old} did not rejoin as the standby"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    payments.stop().await;
    ledger.stop().await;
}

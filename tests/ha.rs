//! #25: the daemons over a PostgreSQL failover pair — `deploy/ha/postgres`, pg_auto_failover
//! with a primary and a synchronous standby on this machine — whose primary is killed
//! (keeper and postgres together, as when its machine dies) while credits, usage and
//! purchases are in flight. Every call is retried under its own idempotency key until it is
//! answered, as a client of a payments system must when an answer is lost.
//!
//! A second test cuts the primary off the network instead (its namespace's link down): it
//! runs on, and must acknowledge nothing once the standby took over, then come back as the
//! standby.
//!
//! The pair is shared by every run on the machine (its ports are fixed): the tests of this
//! file take turns ([`pair`]), and each has its own databases on it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use credits_client::ClientError;
use credits_tests::api::{Api, CreditSource, credits, dec, usage};
use credits_tests::{Ledger, LedgerOptions, NOBODY, Payments, PaymentsOptions, unique};

const HA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/ha/postgres");

/// The pair, held by one test at a time.
fn pair() -> &'static tokio::sync::Mutex<()> {
    static PAIR: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    PAIR.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// The exit code of `deploy/ha/postgres <args>` (-1 if it had none).
async fn ha_code(args: &[&str]) -> i32 {
    tokio::process::Command::new(HA)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .expect("run deploy/ha/postgres")
        .code()
        .unwrap_or(-1)
}

/// Whether `deploy/ha/postgres <args>` succeeds.
async fn ha_ok(args: &[&str]) -> bool {
    ha_code(args).await == 0
}

/// `deploy/ha/postgres write N`'s answers: acknowledged, refused (a standby), not running,
/// no answer within 1 s.
const ACKNOWLEDGED: i32 = 0;
const REFUSED: i32 = 1;
const NOT_RUNNING: i32 = 2;
const NO_ANSWER: i32 = 137;

/// Restores node N's link when dropped (`deploy/ha/postgres heal N`).
struct Heal(String);

impl Drop for Heal {
    fn drop(&mut self) {
        let _ = std::process::Command::new(HA)
            .args(["heal", &self.0])
            .status();
    }
}

/// Waits until the monitor names a primary other than `old`.
async fn failover_from(old: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = ha(&["primary"]).await;
        if !now.is_empty() && now != old {
            return;
        }
        assert!(Instant::now() < deadline, "no failover after 90 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until node `old` is the standby again (one primary, one secondary).
async fn rejoined(old: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ha_ok(&["healthy"]).await {
        assert!(
            Instant::now() < deadline,
            "node {old} did not rejoin as the standby"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

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

/// A credit of 1.00 to `acme` under key `k`, asked until answered: its entry's id.
async fn credit(c: &Api, k: &str) -> String {
    answered(k, || async {
        c.ledger()
            .add_credits(&credits("acme", "1.00", CreditSource::Purchase, k))
            .await
    })
    .await
    .entry
    .entry_id
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
    let _pair = pair().lock().await;
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
                    "credit" => credit(&c, &k).await,
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
    failover_from(&old).await;
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
        assert_eq!(&credit(&c, k).await, id, "{k} replayed");
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
    rejoined(&old).await;
    payments.stop().await;
    ledger.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_cut_off_acknowledges_nothing_once_replaced_and_rejoins_as_the_standby() {
    let _pair = pair().lock().await;
    let base = ha(&["up"]).await;
    // The table `deploy/ha/postgres write` commits a row to, from inside a node's namespace.
    let mut admin = credits_common::db::connect_primary(&format!("{base}/postgres"))
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS credits_ha_probe (at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    drop(admin);
    let ledger = Ledger::start_with(LedgerOptions {
        database_url: Some(format!("{base}/{}", unique("credits_t_ha_cut"))),
        ..Default::default()
    })
    .await;
    let c = ledger.api();
    c.prepaid("acme", "100.00").await;
    let old = ha(&["primary"]).await;
    // The probe can be acknowledged: the primary, before the cut, does (a few tries: it
    // has 1 s for each, on a busy machine).
    let mut tries = 0;
    while !ha_ok(&["write", &old]).await {
        tries += 1;
        assert!(
            tries < 10,
            "the primary never acknowledged the probe's write"
        );
    }

    // From the cut until the standby is promoted, a client on the old primary's side of the
    // cut (a write from inside its namespace) gets no acknowledgement: first its commits
    // wait for the standby it cannot reach, then it steps down by itself (postgres stopped).
    ha(&["partition", &old]).await;
    // Healed however this test ends: the pair is shared.
    let _heal = Heal(old.clone());
    let cut = Instant::now();
    let mut answers = Vec::new();
    while ha(&["primary"]).await == old || answers.last() != Some(&NOT_RUNNING) {
        let code = ha_code(&["write", &old]).await;
        assert_ne!(
            code,
            ACKNOWLEDGED,
            "split brain: node {old}, cut off, acknowledged a write {:?} after the cut",
            cut.elapsed()
        );
        answers.push(code);
        assert!(
            cut.elapsed() < Duration::from_secs(60),
            "node {old}, cut off, did not step down within 60 s: {answers:?}"
        );
    }
    eprintln!("cut-off node {old}'s answers, one per probe: {answers:?}");
    assert!(
        answers.contains(&NO_ANSWER),
        "the probes reached the cut-off primary while it ran: {answers:?}"
    );
    assert!(
        answers.iter().all(|&a| a == NO_ANSWER || a == NOT_RUNNING),
        "{answers:?}"
    );
    failover_from(&old).await;
    // The ledger moves to the new primary; what it acknowledges from now on is kept.
    let mut acked = Vec::new();
    for i in 0..5 {
        let k = format!("after-cut-{i}");
        let id = credit(&c, &k).await;
        acked.push((k, id));
    }

    ha(&["heal", &old]).await;
    rejoined(&old).await;
    let new = ha(&["primary"]).await;
    assert_ne!(new, old, "the old primary came back as the standby");
    assert_eq!(
        ha_code(&["write", &old]).await,
        REFUSED,
        "the old primary, a standby now, refuses writes"
    );
    // Everything acknowledged is there once, and a retry is answered with the first entry.
    assert_eq!(c.balance("acme").await.as_decimal(), dec("105.00"));
    for (k, id) in &acked {
        assert_eq!(&credit(&c, k).await, id, "{k} replayed");
    }
    assert_eq!(c.balance("acme").await.as_decimal(), dec("105.00"));
    ledger.stop().await;
}

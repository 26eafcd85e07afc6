//! Quiescence and the invariants, read straight from the three databases and the broker.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use sqlx::PgConnection;

use crate::stripe::Dashboard;
use crate::workload::{self, Account, Report};
use crate::{Args, Cluster};

/// A connection to database `name` of `pg` (on the primary, when `pg` names several hosts).
async fn db(pg: &str, name: &str) -> anyhow::Result<PgConnection> {
    Ok(
        credits_common::db::connect_primary(&format!("{}/{name}", pg.trim_end_matches('/')))
            .await?,
    )
}

pub async fn terminate_backends(pg: &str, name: &str) {
    if let Ok(mut c) = db(pg, "postgres").await {
        let _ = sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(name)
            .execute(&mut c)
            .await;
    }
}

/// Drops the run's databases and deletes its queues: the recharge queue, its dead letters,
/// the alerts queue and the exchange's parking queue (quorum queues each hold broker file
/// handles; left behind run after run they exhaust a default broker's).
pub async fn drop_all(pg: &str, dbs: &[String; 3], amqp_url: &str, queue: &str, exchange: &str) {
    if let Ok(mut c) = db(pg, "postgres").await {
        for d in dbs {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{d}\" WITH (FORCE)"))
                .execute(&mut c)
                .await;
        }
    }
    if let Ok(conn) = credits_common::amqp::connect(amqp_url, "credits-chaos").await
        && let Ok(ch) = conn.create_channel().await
    {
        for q in [
            queue.to_owned(),
            format!("{queue}.dlq"),
            alerts_queue(queue),
            format!("{exchange}.unrouted"),
        ] {
            let _ = ch
                .queue_delete(
                    q.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    }
}

/// The queue that collects every `ledger.balance.alert` of the run (invariant 9).
pub fn alerts_queue(queue: &str) -> String {
    format!("{queue}.alerts")
}

/// Declares the durable alert-collecting queue, bound before any usage is recorded.
pub async fn bind_alerts(amqp_url: &str, exchange: &str, queue: &str) -> anyhow::Result<()> {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    let conn = credits_common::amqp::connect(amqp_url, "credits-chaos").await?;
    let ch = conn.create_channel().await?;
    credits_common::amqp::declare_exchange(&ch, exchange).await?;
    let q = alerts_queue(queue);
    // Quorum: on a cluster (`--ha`), a broker node's death must not lose an alert.
    let mut quorum = lapin::types::FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum,
    )
    .await?;
    ch.queue_bind(
        q.as_str().into(),
        exchange.into(),
        "ledger.balance.alert".into(),
        QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await?;
    let _ = conn.close(0, "done".into()).await;
    Ok(())
}

/// Every alert the run published, once each (the relay delivers at least once: a
/// repeat carries the same event id): (account, threshold, entry id).
async fn collect_alerts(
    amqp_url: &str,
    queue: &str,
) -> anyhow::Result<HashSet<(String, Decimal, String)>> {
    let conn = credits_common::amqp::connect(amqp_url, "credits-chaos").await?;
    let ch = conn.create_channel().await?;
    let mut seen = HashSet::new();
    let mut out = HashSet::new();
    while let Some(m) = ch
        .basic_get(
            alerts_queue(queue).as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await?
    {
        let v: serde_json::Value = serde_json::from_slice(&m.delivery.data)?;
        if !seen.insert(v["id"].to_string()) {
            continue;
        }
        let threshold: Decimal = v["data"]["threshold"].as_str().unwrap_or("").parse()?;
        out.insert((
            v["account_id"].as_str().unwrap_or("").to_owned(),
            threshold.normalize(),
            v["data"]["entry_id"].as_str().unwrap_or("").to_owned(),
        ));
    }
    let _ = conn.close(0, "done".into()).await;
    Ok(out)
}

/// What rabbitmqctl says of a queue.
enum QueueState {
    /// (ready, unacknowledged) messages.
    Counts(u64, u64),
    /// The broker answered without it: deleted and not declared again.
    Missing,
    /// No answer (the broker's app is still starting, say).
    Unknown,
}

/// The node `rabbitmqctl` asks: the local one, or a node of the `--ha` cluster.
fn ctl_node(a: &Args) -> Vec<&'static str> {
    if a.ha {
        vec!["-n", crate::ha::CTL_NODE]
    } else {
        Vec::new()
    }
}

async fn queue_counts(a: &Args, queue: &str) -> QueueState {
    let Ok(out) = tokio::process::Command::new("rabbitmqctl")
        .args(ctl_node(a))
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .await
    else {
        return QueueState::Unknown;
    };
    if !out.status.success() {
        return QueueState::Unknown;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue))
    else {
        return QueueState::Missing;
    };
    let mut it = line.split_whitespace().skip(1);
    match (
        it.next().and_then(|n| n.parse().ok()),
        it.next().and_then(|n| n.parse().ok()),
    ) {
        (Some(ready), Some(unacked)) => QueueState::Counts(ready, unacked),
        _ => QueueState::Unknown,
    }
}

async fn scalar(c: &mut PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(c)
        .await
        .unwrap_or(-1)
}

/// Everything that must drain before the books can be checked.
async fn busy(a: &Args, c: &Cluster) -> anyhow::Result<Vec<String>> {
    let mut left = Vec::new();
    for name in &c.dbs {
        let mut conn = db(&a.pg_url, name).await?;
        let n = scalar(&mut conn, "SELECT count(*) FROM outbox").await;
        if n != 0 {
            left.push(format!("{name}: {n} outbox events"));
        }
    }
    // Work that must be finished once the system is quiet: (database, count, what is left).
    let unfinished = [
        (
            1,
            "SELECT count(*) FROM charges WHERE status IN ('PROCESSING','PENDING') OR (purpose = 'PURCHASE' AND status = 'SUCCEEDED' AND ledger_entry_id IS NULL)",
            "unfinished charges",
        ),
        (
            2,
            "SELECT count(*) FROM attempts WHERE status IN ('PENDING','CHARGING')",
            "attempts in flight",
        ),
        (
            0,
            "SELECT count(*) FROM holds WHERE status = 'ACTIVE' AND expires_at <= now()",
            "holds past expiry",
        ),
        (
            1,
            "SELECT count(*) FROM refunds WHERE status = 'PROCESSING'",
            "refunds in flight",
        ),
        (
            1,
            "SELECT count(*) FROM processor_events WHERE processed_at IS NULL",
            "processor events not acted on",
        ),
    ];
    for (i, sql, what) in unfinished {
        let mut conn = db(&a.pg_url, &c.dbs[i]).await?;
        let n = scalar(&mut conn, sql).await;
        if n != 0 {
            left.push(format!("{n} {what}"));
        }
    }
    if let Some(s) = &c.stripe {
        let n = s.relay.pending();
        if n != 0 {
            left.push(format!("{n} webhook deliveries"));
        }
    }
    match queue_counts(a, &c.queue).await {
        QueueState::Counts(0, 0) => {}
        QueueState::Counts(ready, unacked) => {
            left.push(format!("queue: {ready} ready, {unacked} unacked"))
        }
        QueueState::Missing => left.push(format!(
            "queue {} missing (deleted and not declared again)",
            c.queue
        )),
        QueueState::Unknown => left.push("queues cannot be listed".into()),
    }
    Ok(left)
}

/// Accounts with auto-recharge on whose ledger threshold is not their settings threshold:
/// (accounts on, [(account, settings threshold, ledger threshold)]).
#[allow(clippy::type_complexity)]
async fn threshold_drift(
    a: &Args,
    c: &Cluster,
) -> anyhow::Result<(usize, Vec<(String, Decimal, Option<Decimal>)>)> {
    let mut l = db(&a.pg_url, &c.dbs[0]).await?;
    let mut r = db(&a.pg_url, &c.dbs[2]).await?;
    let on: Vec<(String, Decimal)> = sqlx::query_as(
        "SELECT account_id, threshold FROM settings WHERE enabled ORDER BY account_id",
    )
    .fetch_all(&mut r)
    .await?;
    let ledger: HashMap<String, Option<Decimal>> = sqlx::query_as::<_, (String, Option<Decimal>)>(
        "SELECT account_id, threshold FROM accounts",
    )
    .fetch_all(&mut l)
    .await?
    .into_iter()
    .collect();
    // Decimal equality is numeric (10 = 10.00), as the invariant asks.
    let drift = on
        .iter()
        .filter_map(|(acct, t)| {
            let lt = ledger.get(acct).copied().flatten();
            (lt != Some(*t)).then(|| (acct.clone(), *t, lt))
        })
        .collect();
    Ok((on.len(), drift))
}

/// How long threshold drift may last once the faults stop: the recharge daemon's
/// reconciler repairs it within seconds; this leaves it room under a loaded machine.
const DRIFT_ALLOWANCE: Duration = Duration::from_secs(30);

struct Check {
    failed: bool,
}

impl Check {
    fn report(&mut self, ok: bool, what: &str, detail: String) {
        println!("  [{}] {what}: {detail}", if ok { "ok" } else { "FAIL" });
        self.failed |= !ok;
    }
}

pub async fn settle_and_check(
    a: &Args,
    c: &Cluster,
    accounts: &[Account],
    rep: &Report,
    poison: u32,
    t0: Instant,
    dashboard: Option<&Dashboard>,
) -> anyhow::Result<bool> {
    // Quiescence: nothing left to drain twice in a row, one second apart. Threshold drift
    // counts as unfinished work for the first DRIFT_ALLOWANCE: repairing it may cross a
    // threshold and start a top-up, which the books must include.
    let settle_start = Instant::now();
    let deadline = settle_start + Duration::from_secs(a.settle);
    let mut quiet_in_a_row = 0;
    let mut last = Vec::new();
    let mut drift_gone_after: Option<Duration> = None;
    while quiet_in_a_row < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        last = busy(a, c)
            .await
            .unwrap_or_else(|e| vec![format!("cannot read: {e}")]);
        if drift_gone_after.is_none() {
            match threshold_drift(a, c).await {
                Ok((_, d)) if d.is_empty() => drift_gone_after = Some(settle_start.elapsed()),
                Ok((_, d)) if settle_start.elapsed() < DRIFT_ALLOWANCE => {
                    last.push(format!("{} accounts with threshold drift", d.len()))
                }
                Ok(_) => {}
                Err(e) => last.push(format!("cannot read thresholds: {e}")),
            }
        }
        quiet_in_a_row = if last.is_empty() {
            quiet_in_a_row + 1
        } else {
            0
        };
    }
    println!(
        "[{:6.1}s] quiescence: {}",
        t0.elapsed().as_secs_f32(),
        if last.is_empty() {
            "reached".to_owned()
        } else {
            format!("NOT reached: {last:?}")
        }
    );
    let mut ck = Check {
        failed: !last.is_empty(),
    };

    let mut l = db(&a.pg_url, &c.dbs[0]).await?;
    let mut p = db(&a.pg_url, &c.dbs[1]).await?;
    let mut r = db(&a.pg_url, &c.dbs[2]).await?;

    // Payments' charges, the processor's charges, recharge's attempts.
    let charges: Vec<(String, String, String, String, Decimal)> =
        sqlx::query_as("SELECT charge_id, purpose, status, idempotency_key, amount FROM charges")
            .fetch_all(&mut p)
            .await?;
    // The processor's own records: (our charge id, status, amount) of each charge it made.
    let processor: Vec<(String, String, Decimal)> = match &c.stripe {
        Some(s) => s
            .emulator
            .api
            .list_all("/v1/payment_intents")
            .await?
            .iter()
            .map(|pi| {
                (
                    pi["metadata"]["charge_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    pi["status"].as_str().unwrap_or_default().to_uppercase(),
                    Decimal::new(pi["amount"].as_i64().unwrap_or(0), 2),
                )
            })
            .collect(),
        None => {
            sqlx::query_as("SELECT idempotency_key, status, amount FROM sandbox_charges")
                .fetch_all(&mut p)
                .await?
        }
    };
    let attempts: Vec<(String, String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT attempt_id, status, charge_id, trigger_event_id FROM attempts")
            .fetch_all(&mut r)
            .await?;
    let credits: Vec<(String, String, Decimal)> =
        sqlx::query_as("SELECT reference, source, amount FROM entries WHERE kind = 'CREDIT' AND source IN ('PURCHASE','AUTO_RECHARGE')").fetch_all(&mut l).await?;

    println!("invariants:");
    // 1. No crossing charged twice: processor charges ↔ payments charges ↔ attempts/purchases.
    let by_id: HashMap<&str, &(String, String, String, String, Decimal)> =
        charges.iter().map(|c| (c.0.as_str(), c)).collect();
    let orphans = processor
        .iter()
        .filter(|(key, _, _)| !by_id.contains_key(key.as_str()))
        .count();
    let attempt_ids: HashSet<&str> = attempts.iter().map(|a| a.0.as_str()).collect();
    let unexplained = charges
        .iter()
        .filter(|(_, purpose, _, key, _)| match purpose.as_str() {
            "CHARGE" | "TOPUP" => !key
                .strip_prefix("recharge:")
                .is_some_and(|id| attempt_ids.contains(id)),
            _ => !(key == "initial" || key.starts_with("buy-")),
        })
        .count();
    // With Stripe, a succeeded charge needs a succeeded intent (the sandbox records only
    // what it was asked).
    let processed: HashSet<&str> = processor
        .iter()
        .filter(|p| c.stripe.is_none() || p.1 == "SUCCEEDED")
        .map(|p| p.0.as_str())
        .collect();
    let mut intents_per_charge: HashMap<&str, usize> = HashMap::new();
    for (key, _, _) in &processor {
        *intents_per_charge.entry(key.as_str()).or_default() += 1;
    }
    let charged_twice = intents_per_charge.values().filter(|n| **n > 1).count();
    let final_without_processor = charges
        .iter()
        .filter(|c| c.2 == "SUCCEEDED" && !processed.contains(c.0.as_str()))
        .count();
    let mut per_charge: HashMap<&str, usize> = HashMap::new();
    for a in &attempts {
        if let Some(ch) = &a.2 {
            *per_charge.entry(ch.as_str()).or_default() += 1;
        }
    }
    let shared = per_charge.values().filter(|n| **n > 1).count();
    let succeeded_without_charge = attempts
        .iter()
        .filter(|a| a.1 == "SUCCEEDED" && a.2.is_none())
        .count();
    let mut events: HashMap<&str, usize> = HashMap::new();
    for a in &attempts {
        if let Some(e) = &a.3 {
            *events.entry(e.as_str()).or_default() += 1;
        }
    }
    let twice = events.values().filter(|n| **n > 1).count();
    ck.report(
        orphans == 0 && unexplained == 0 && final_without_processor == 0 && shared == 0 && succeeded_without_charge == 0 && twice == 0 && charged_twice == 0,
        "1. every processor charge ↔ one attempt or purchase",
        format!(
            "{} processor charges, {} payments charges, {} attempts; orphan processor charges {orphans}, charges without attempt/purchase {unexplained}, \
             succeeded without processor charge {final_without_processor}, charges shared by attempts {shared}, succeeded attempts without charge {succeeded_without_charge}, \
             crossings with >1 attempt {twice}, charges the processor made more than once {charged_twice}",
            processor.len(), charges.len(), attempts.len()
        ),
    );

    // 2. Every succeeded charge has exactly one ledger credit; no credit lacks a charge.
    let mut credit_count: HashMap<&str, usize> = HashMap::new();
    for (reference, _, _) in &credits {
        *credit_count.entry(reference.as_str()).or_default() += 1;
    }
    let succeeded: Vec<_> = charges.iter().filter(|c| c.2 == "SUCCEEDED").collect();
    let uncredited = succeeded
        .iter()
        .filter(|c| credit_count.get(c.0.as_str()).copied().unwrap_or(0) != 1)
        .count();
    let charge_of = |reference: &String| by_id.get(reference.as_str());
    let credit_without_charge = credits
        .iter()
        .filter(|(reference, _, _)| charge_of(reference).is_none_or(|c| c.2 != "SUCCEEDED"))
        .count();
    let amount_mismatch = credits
        .iter()
        .filter(|(reference, _, amount)| charge_of(reference).is_some_and(|c| c.4 != *amount))
        .count();
    ck.report(
        uncredited == 0 && credit_without_charge == 0 && amount_mismatch == 0,
        "2. succeeded charge ↔ exactly one ledger credit",
        format!("{} succeeded charges, {} credits; not credited exactly once {uncredited}, credits without a succeeded charge {credit_without_charge}, amount mismatches {amount_mismatch}", succeeded.len(), credits.len()),
    );

    // 3. Every acknowledged RecordUsage is in the journal exactly once.
    let usage: Vec<(String, String)> =
        sqlx::query_as("SELECT account_id, idempotency_key FROM entries WHERE kind = 'USAGE' AND idempotency_key IS NOT NULL")
            .fetch_all(&mut l)
            .await?;
    let journal: HashSet<(&str, &str)> = usage
        .iter()
        .map(|(a, k)| (a.as_str(), k.as_str()))
        .collect();
    let missing = rep
        .acked
        .iter()
        .filter(|(a, k)| !journal.contains(&(a.as_str(), k.as_str())))
        .count();
    ck.report(
        missing == 0 && journal.len() == usage.len(),
        "3. acknowledged usage in the journal exactly once",
        format!(
            "{} acknowledged, {} usage entries, missing {missing}, duplicate keys {}",
            rep.acked.len(),
            usage.len(),
            usage.len() - journal.len()
        ),
    );

    // 4. Each balance equals the sum of its journal.
    let off: i64 = scalar(
        &mut l,
        "SELECT count(*) FROM accounts a WHERE a.balance <> COALESCE((SELECT sum(CASE kind WHEN 'CREDIT' THEN amount ELSE -amount END) FROM entries e WHERE e.account_id = a.account_id), 0)",
    )
    .await;
    let chain: i64 = scalar(
        &mut l,
        "SELECT count(*) FROM (SELECT balance_after, lag(balance_after) OVER w AS prev, CASE kind WHEN 'CREDIT' THEN amount ELSE -amount END AS delta, \
         row_number() OVER w AS n FROM entries WINDOW w AS (PARTITION BY account_id ORDER BY seq)) x WHERE (n = 1 AND balance_after <> delta) OR (n > 1 AND balance_after <> prev + delta)",
    )
    .await;
    ck.report(
        off == 0 && chain == 0,
        "4. balance = sum of journal",
        format!(
            "{} accounts, balances off {off}, broken balance_after chains {chain}",
            accounts.len()
        ),
    );

    // 14. R29: what every grant and purchase still holds (the usage pending on them drawn)
    // adds up to the balance (where it is positive: debt is held by no lot), and every
    // expired lot has exactly one EXPIRY entry (none spent twice, none expired twice).
    let lots_off: i64 = scalar(
        &mut l,
        "SELECT count(*) FROM accounts a WHERE greatest(a.balance, 0) <> COALESCE((SELECT sum(n.remaining) FROM ledger_lots_now(a.account_id) n), 0)",
    )
    .await;
    let (expired, expiry_entries, expired_badly): (i64, i64, i64) = (
        scalar(&mut l, "SELECT count(*) FROM lots WHERE expiry_entry_seq IS NOT NULL").await,
        scalar(&mut l, "SELECT count(*) FROM entries WHERE kind = 'EXPIRY'").await,
        scalar(
            &mut l,
            "SELECT count(*) FROM lots x WHERE (x.expiry_entry_seq IS NOT NULL AND x.remaining <> 0)              OR (SELECT count(*) FROM entries e WHERE e.kind = 'EXPIRY' AND e.reference = x.lot_id::text) > 1              OR (x.expires_at <= now() - interval '5 seconds' AND x.remaining > 0)",
        )
        .await,
    );
    let grants: i64 = scalar(&mut l, "SELECT count(*) FROM lots WHERE source = 'GRANT'").await;
    let reached: i64 = scalar(
        &mut l,
        "SELECT count(*) FROM lots WHERE expires_at <= now()",
    )
    .await;
    ck.report(
        lots_off == 0 && expired == expiry_entries && expired_badly == 0,
        "14. lots hold the balance; each expired lot expired once",
        format!(
            "{grants} grants, {reached} lots past their expiry, {expired} of them expired with credits left ({expiry_entries} EXPIRY entries); accounts whose lots ≠ balance {lots_off}, lots expired wrongly or left past their expiry {expired_badly}"
        ),
    );

    // 15. R30: the usage rollups (with each account's running hour) are the journal's usage,
    // per account, hour and category.
    let rollups_off: i64 = scalar(
        &mut l,
        "SELECT count(*) FROM (SELECT account_id, date_trunc('hour', created_at, 'UTC') AS hour, category, sum(amount) AS amount, count(*) AS n          FROM entries WHERE kind = 'USAGE' GROUP BY 1, 2, 3) j          FULL JOIN (SELECT a.account_id, h.hour, h.category, sum(h.amount) AS amount, sum(h.count) AS count FROM accounts a CROSS JOIN LATERAL ledger_usage_hours(a.account_id) h GROUP BY 1, 2, 3) r USING (account_id, hour, category)          WHERE j.amount IS DISTINCT FROM r.amount OR j.n IS DISTINCT FROM r.count",
    )
    .await;
    ck.report(
        rollups_off == 0,
        "15. usage rollups = the journal's usage",
        format!("(account, hour, category) rows that differ: {rollups_off}"),
    );

    // 5. Auto-recharge on ⇒ at or above threshold, or a recorded failed attempt says why not.
    let settings: Vec<(String, Decimal)> =
        sqlx::query_as("SELECT account_id, threshold FROM settings WHERE enabled")
            .fetch_all(&mut r)
            .await?;
    let latest: HashMap<String, String> = sqlx::query_as::<_, (String, String)>("SELECT DISTINCT ON (account_id) account_id, status FROM attempts ORDER BY account_id, seq DESC")
        .fetch_all(&mut r)
        .await?
        .into_iter()
        .collect();
    let balances: HashMap<String, Decimal> =
        sqlx::query_as::<_, (String, Decimal)>("SELECT account_id, balance - held FROM accounts")
            .fetch_all(&mut l)
            .await?
            .into_iter()
            .collect();
    let unexplained_low: Vec<&str> = settings
        .iter()
        .filter(|(acct, threshold)| {
            balances.get(acct).is_some_and(|b| b < threshold)
                && !matches!(
                    latest.get(acct).map(String::as_str),
                    Some("FAILED" | "SKIPPED")
                )
        })
        .map(|(a, _)| a.as_str())
        .collect();
    let off_count: i64 = scalar(&mut r, "SELECT count(*) FROM settings WHERE NOT enabled").await;
    ck.report(
        unexplained_low.is_empty(),
        "5. auto-recharge on ⇒ available balance ≥ threshold or a failed/skipped attempt",
        format!("{} accounts on, {off_count} turned off (ACH / repeated failures); below threshold without explanation: {unexplained_low:?}", settings.len()),
    );

    // 6. Nothing stuck: outboxes empty, queue drained, dead letters = injected poison only.
    let stuck = busy(a, c).await?;
    let dlq = match queue_counts(a, &format!("{}.dlq", c.queue)).await {
        QueueState::Counts(r, u) => r + u,
        QueueState::Missing | QueueState::Unknown => u64::MAX,
    };
    ck.report(
        stuck.is_empty() && dlq == u64::from(poison),
        "6. no stuck event, no unacked message, DLQ = injected poison",
        format!("left: {stuck:?}; dead-lettered {dlq}, poison injected {poison}"),
    );

    // 7. Auto-recharge on ⇒ the ledger watches the same threshold the settings hold
    //    (otherwise crossings fire at the wrong balance, or never).
    let (on, drift) = threshold_drift(a, c).await?;
    let shown: Vec<String> = drift
        .iter()
        .take(5)
        .map(|(acct, t, lt)| {
            format!(
                "{acct}: settings {t}, ledger {}",
                lt.map_or("none".to_owned(), |l| l.to_string())
            )
        })
        .collect();
    ck.report(
        drift.is_empty(),
        "7. auto-recharge on ⇒ ledger threshold = settings threshold",
        format!(
            "{on} accounts on, {} differ; {}{}",
            drift.len(),
            match (drift_gone_after, drift.is_empty()) {
                (Some(t), _) =>
                    format!("no drift {:.0} s after the faults stopped", t.as_secs_f32()),
                (None, true) => format!(
                    "drift repaired only after the {} s allowance",
                    DRIFT_ALLOWANCE.as_secs()
                ),
                (None, false) => format!(
                    "drift still there past the {} s allowance",
                    DRIFT_ALLOWANCE.as_secs()
                ),
            },
            if shown.is_empty() {
                String::new()
            } else {
                format!("; e.g. {}", shown.join("; "))
            }
        ),
    );

    // 8. Holds (R15): held = sum of ACTIVE holds on every account; every hold ended once
    //    (a captured hold has exactly one USAGE entry of its captured amount, any other hold
    //    none); no ACTIVE hold outlives its expiry (checked at quiescence).
    let held_off = scalar(
        &mut l,
        "SELECT count(*) FROM accounts a WHERE a.held <> COALESCE((SELECT sum(amount) FROM holds h WHERE h.account_id = a.account_id AND h.status = 'ACTIVE'), 0)",
    )
    .await;
    let ended_wrong = scalar(
        &mut l,
        "SELECT count(*) FROM holds h WHERE (SELECT count(*) FROM entries e WHERE e.account_id = h.account_id AND e.reference = h.hold_id::text AND e.kind = 'USAGE'          AND (h.status <> 'CAPTURED' OR e.amount = h.captured_amount)) <> CASE WHEN h.status = 'CAPTURED' THEN 1 ELSE 0 END",
    )
    .await;
    let by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM holds GROUP BY status ORDER BY status")
            .fetch_all(&mut l)
            .await?;
    let overdue = scalar(
        &mut l,
        "SELECT count(*) FROM holds WHERE status = 'ACTIVE' AND expires_at <= now()",
    )
    .await;
    ck.report(
        held_off == 0 && ended_wrong == 0 && overdue == 0,
        "8. held = sum of active holds; each hold ended once",
        format!(
            "holds by status {by_status:?}; accounts with held off {held_off}, holds not ended exactly once {ended_wrong}, active past expiry {overdue}"
        ),
    );

    // 9. Alerts (R18): every alert matches a crossing in the journal, and every crossing
    //    has its alert. Accounts with alerts take no holds, so their available balance is
    //    their balance and each entry's move is `balance_after ∓ amount → balance_after`.
    let with_alerts: Vec<&Account> = accounts.iter().filter(|a| !a.alerts.is_empty()).collect();
    let ids: Vec<String> = with_alerts.iter().map(|a| a.id.to_string()).collect();
    let journal: Vec<(String, String, String, Decimal, Decimal)> = sqlx::query_as(
        "SELECT account_id, entry_id::text, kind, amount, balance_after FROM entries
          WHERE account_id = ANY($1) ORDER BY seq",
    )
    .bind(&ids)
    .fetch_all(&mut l)
    .await?;
    let mut crossings = HashSet::new();
    for (acct, entry, kind, amount, after) in &journal {
        // Every kind but a credit is a debit (usage, refund, dispute, expiry).
        let before = if kind == "CREDIT" {
            after - amount
        } else {
            after + amount
        };
        if let Some(a) = with_alerts.iter().find(|a| a.id.as_str() == acct) {
            for t in &a.alerts {
                let t = t.as_decimal();
                if before >= t && *after < t {
                    crossings.insert((acct.clone(), t.normalize(), entry.clone()));
                }
            }
        }
    }
    let alerts = collect_alerts(&a.amqp_url, &c.queue).await?;
    let unmatched = alerts.difference(&crossings).count();
    let unalerted = crossings.difference(&alerts).count();
    ck.report(
        unmatched == 0 && unalerted == 0,
        "9. every alert ↔ a crossing of its threshold in the journal",
        format!(
            "{} accounts with {} thresholds each; {} crossings, {} alerts; alerts without a crossing {unmatched}, crossings without an alert {unalerted}",
            with_alerts.len(),
            workload::ALERTS.len(),
            crossings.len(),
            alerts.len()
        ),
    );

    // 10. Monthly limit (R19): no account's succeeded top-ups in a calendar month exceed
    //     its limit.
    let over = scalar(
        &mut r,
        "SELECT count(*) FROM (SELECT a.account_id FROM attempts a JOIN settings s USING (account_id)
          WHERE a.status = 'SUCCEEDED' AND s.monthly_limit IS NOT NULL
          GROUP BY a.account_id, s.monthly_limit, date_trunc('month', a.completed_at AT TIME ZONE 'UTC')
          HAVING sum(a.amount) > s.monthly_limit) x",
    )
    .await;
    let limited: Vec<(i64, i64, Option<Decimal>)> = sqlx::query_as(
        "SELECT (SELECT count(*) FROM settings WHERE monthly_limit IS NOT NULL),
                (SELECT count(*) FROM attempts WHERE status = 'SKIPPED'),
                (SELECT max(t) FROM (SELECT sum(a.amount) AS t FROM attempts a JOIN settings s USING (account_id)
                  WHERE a.status = 'SUCCEEDED' AND s.monthly_limit IS NOT NULL GROUP BY a.account_id) y)",
    )
    .fetch_all(&mut r)
    .await?;
    let (n_limited, skipped, most) = limited.first().cloned().unwrap_or((0, 0, None));
    ck.report(
        over == 0,
        "10. succeeded top-ups in a month ≤ the monthly limit",
        format!(
            "{n_limited} accounts limited to ${}/month; most charged {}; {skipped} top-ups skipped; months over the limit {over}",
            workload::MONTHLY_LIMIT,
            most.map_or("0".to_owned(), |m| m.to_string())
        ),
    );
    refunds_check(&mut ck, c, &mut l, &mut p).await?;
    if let Some(d) = dashboard {
        stripe_checks(&mut ck, d, &charges, &processor, &credits, &mut l, &mut p).await?;
    }
    Ok(!ck.failed)
}

/// Ledger entries by idempotency key: key → amounts (one each, if all is well).
async fn entries_by_key(
    l: &mut PgConnection,
    kind: &str,
    prefix: &str,
) -> anyhow::Result<HashMap<String, Vec<Decimal>>> {
    let rows: Vec<(String, Decimal)> = sqlx::query_as(
        "SELECT idempotency_key, amount FROM entries WHERE kind = $1 AND idempotency_key LIKE $2 || '%'",
    )
    .bind(kind)
    .bind(prefix)
    .fetch_all(l)
    .await?;
    let mut out: HashMap<String, Vec<Decimal>> = HashMap::new();
    for (k, a) in rows {
        out.entry(k).or_default().push(a);
    }
    Ok(out)
}

/// 11 (R27, R26). Every refund the processor made ↔ exactly one `REFUND` entry of its
/// amount, never undone; every `REFUND` entry without a processor refund was refused and
/// undone by exactly one reversal of its amount.
async fn refunds_check(
    ck: &mut Check,
    c: &Cluster,
    l: &mut PgConnection,
    p: &mut PgConnection,
) -> anyhow::Result<()> {
    // (our refund id, or the processor's for one made at its dashboard; amount).
    let made: Vec<(String, Decimal)> = match &c.stripe {
        Some(s) => s
            .emulator
            .api
            .list_all("/v1/refunds")
            .await?
            .iter()
            .filter(|r| r["status"] == "succeeded" || r["status"] == "pending")
            .map(|r| {
                let ours = r["metadata"]["refund_id"].as_str();
                (
                    ours.or(r["id"].as_str()).unwrap_or_default().to_owned(),
                    Decimal::new(r["amount"].as_i64().unwrap_or(0), 2),
                )
            })
            .collect(),
        None => {
            sqlx::query_as("SELECT refund_key, amount FROM sandbox_refunds")
                .fetch_all(&mut *p)
                .await?
        }
    };
    let debits = entries_by_key(l, "REFUND", "refund:").await?;
    let reversals = entries_by_key(l, "CREDIT", "refund-reversal:").await?;
    let made_ids: HashSet<&str> = made.iter().map(|(id, _)| id.as_str()).collect();
    // One processor refund per id of ours: a second one is a refund made twice.
    let made_twice = made.len() - made_ids.len();
    // A reversal gives credits back: only for a debit of a refund the processor refused.
    let reversals_without_debit = reversals
        .keys()
        .filter(|k| {
            let id = k.trim_start_matches("refund-reversal:");
            !debits.contains_key(&format!("refund:{id}")) || made_ids.contains(id)
        })
        .count();
    let not_debited_once = made
        .iter()
        .filter(|(id, amount)| {
            debits.get(&format!("refund:{id}")).map(Vec::as_slice) != Some(&[*amount][..])
        })
        .count();
    let undone_but_made = made
        .iter()
        .filter(|(id, _)| reversals.contains_key(&format!("refund-reversal:{id}")))
        .count();
    let unexplained_debits = debits
        .iter()
        .filter(|(k, amounts)| {
            let id = k.trim_start_matches("refund:");
            !made_ids.contains(id)
                && reversals.get(&format!("refund-reversal:{id}")) != Some(*amounts)
        })
        .count();
    let by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM refunds GROUP BY status ORDER BY status")
            .fetch_all(&mut *p)
            .await?;
    ck.report(
        not_debited_once == 0
            && undone_but_made == 0
            && unexplained_debits == 0
            && made_twice == 0
            && reversals_without_debit == 0,
        "11. every processor refund ↔ one REFUND entry; a refused one undone once",
        format!(
            "{} processor refunds, {} REFUND entries, {} reversals, payments refunds by status {by_status:?}; \
             not debited exactly once {not_debited_once}, undone though made {undone_but_made}, debits neither made nor undone once {unexplained_debits}, \
             refunds made twice {made_twice}, reversals of no refused debit {reversals_without_debit}",
            made.len(),
            debits.len(),
            reversals.len()
        ),
    );
    Ok(())
}

/// 12 (R25, R26), Stripe runs: every intent that succeeded ↔ its charge succeeded and
/// credited exactly once; every dispute ↔ one `DISPUTE` entry, and a won one ↔ one credit
/// back of the same amount.
#[allow(clippy::too_many_arguments)] // the books already read, passed down once
async fn stripe_checks(
    ck: &mut Check,
    d: &Dashboard,
    charges: &[(String, String, String, String, Decimal)],
    processor: &[(String, String, Decimal)],
    credits: &[(String, String, Decimal)],
    l: &mut PgConnection,
    p: &mut PgConnection,
) -> anyhow::Result<()> {
    let by_id: HashMap<&str, &(String, String, String, String, Decimal)> =
        charges.iter().map(|c| (c.0.as_str(), c)).collect();
    let mut credited: HashMap<&str, Vec<Decimal>> = HashMap::new();
    for (reference, _, amount) in credits {
        credited
            .entry(reference.as_str())
            .or_default()
            .push(*amount);
    }
    let succeeded: Vec<&(String, String, Decimal)> =
        processor.iter().filter(|x| x.1 == "SUCCEEDED").collect();
    let not_succeeded_here = succeeded
        .iter()
        .filter(|(id, _, _)| by_id.get(id.as_str()).is_none_or(|c| c.2 != "SUCCEEDED"))
        .count();
    let not_credited_once = succeeded
        .iter()
        .filter(|(id, _, amount)| {
            by_id.get(id.as_str()).is_some_and(|c| c.1 != "CHARGE")
                && credited.get(id.as_str()).map(Vec::as_slice) != Some(&[*amount][..])
        })
        .count();
    ck.report(
        not_succeeded_here == 0 && not_credited_once == 0,
        "12. every payment intent that succeeded ↔ its charge succeeded, credited exactly once",
        format!(
            "{} intents, {} succeeded; charge not succeeded here {not_succeeded_here}, not credited exactly once (its amount) {not_credited_once}",
            processor.len(),
            succeeded.len()
        ),
    );

    let debits = entries_by_key(l, "DISPUTE", "dispute:").await?;
    let backs = entries_by_key(l, "CREDIT", "dispute-won:").await?;
    let recorded: HashMap<String, Decimal> =
        sqlx::query_as::<_, (String, Decimal)>("SELECT dispute_id, amount FROM disputes")
            .fetch_all(&mut *p)
            .await?
            .into_iter()
            .collect();
    // What refunds left of each payment (by intent): a dispute takes at most that.
    let left: HashMap<String, Decimal> = sqlx::query_as::<_, (String, Decimal)>(
        "SELECT processor_charge_id, amount - refunded_amount FROM charges WHERE processor_charge_id IS NOT NULL",
    )
    .fetch_all(&mut *p)
    .await?
    .into_iter()
    .collect();
    let mut wrong = Vec::new();
    for dp in &d.disputes {
        let debit = debits.get(&format!("dispute:{}", dp.id));
        let back = backs.get(&format!("dispute-won:{}", dp.id));
        let amount = recorded.get(&dp.id);
        let left = left.get(&dp.payment_intent).copied();
        let ok = match (amount, debit.map(Vec::as_slice)) {
            // Recorded: one debit of the recorded amount — what the customer paid, or
            // what refunds left of it when they came first.
            (Some(a), Some([x])) => {
                *x == *a
                    && *a <= Decimal::new(dp.cents, 2)
                    && (*a == Decimal::new(dp.cents, 2) || left.is_some())
                    && match dp.closed_won {
                        Some(true) => back.map(Vec::as_slice) == Some(&[*a][..]),
                        _ => back.is_none(),
                    }
            }
            // Nothing left to take: refunds had returned the whole payment.
            (None, None) => back.is_none() && left == Some(Decimal::ZERO),
            _ => false,
        };
        if !ok {
            wrong.push(dp.id.clone());
        }
    }
    let ours: HashSet<String> = d
        .disputes
        .iter()
        .map(|x| format!("dispute:{}", x.id))
        .collect();
    let foreign = debits.keys().filter(|k| !ours.contains(*k)).count();
    ck.report(
        wrong.is_empty() && foreign == 0,
        "13. every dispute ↔ one DISPUTE entry; a won one ↔ one credit back",
        format!(
            "{} disputes ({} won), {} DISPUTE entries, {} credits back; wrong {wrong:?}, entries of no dispute {foreign}",
            d.disputes.len(),
            d.disputes.iter().filter(|x| x.closed_won == Some(true)).count(),
            debits.len(),
            backs.len()
        ),
    );
    Ok(())
}

/// What an `AccessCache` applied, per account: the seqs, in the order applied.
/// Per account, every update the cache applied: (the cache's reset count when it came, seq).
pub type Applied = std::sync::Arc<std::sync::Mutex<HashMap<String, Vec<(u64, u64)>>>>;

/// How many times the cache emptied itself to start from a snapshot (a new feed after a
/// failover): the first update of each account after one may skip versions.
pub static CACHE_RESETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Invariant 16 (R31): an `AccessCache` that watched every account through the whole soak
/// (on ledger `a`, through its outages and restarts) ends equal to the database — every
/// account at its last version and balance — and applied each account's changes in order
/// with none missing after the first it saw.
pub async fn check_cache(
    a: &Args,
    c: &Cluster,
    cache: &credits_client::AccessCache,
    applied: &Applied,
) -> anyhow::Result<bool> {
    let current = cache.wait_current(Duration::from_secs(30)).await;
    let mut l = db(&a.pg_url, &c.dbs[0]).await?;
    let rows: Vec<(String, i64, Decimal, Decimal)> =
        sqlx::query_as("SELECT account_id, version, balance, held FROM accounts")
            .fetch_all(&mut l)
            .await?;
    // The last changes may still be on their way (a poll, the stream): a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut behind;
    loop {
        behind = rows
            .iter()
            .filter(|(id, version, balance, held)| {
                cache.get(id).is_none_or(|x| {
                    x.seq as i64 != *version
                        || x.balance.as_decimal() != *balance
                        || x.available_balance.as_decimal() != *balance - *held
                })
            })
            .count();
        if behind == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (gaps, changes) = {
        let seen = applied.lock().map(|m| m.clone()).unwrap_or_default();
        // In order, one by one, except across a reset: the stream that reveals a new feed
        // begins with a snapshot (its updates come before the reset is known, so they are
        // the last of their epoch), and the stream after the reset begins with another.
        let first_gap = |s: &Vec<(u64, u64)>| {
            s.windows(3)
                .map(|w| (w[0], w[1], Some(w[2])))
                .chain(s.len().checked_sub(2).map(|i| (s[i], s[i + 1], None)))
                .position(|(a, b, next)| {
                    let last_of_epoch = next.is_some_and(|n| n.0 != b.0);
                    a.0 == b.0 && b.1 != a.1 + 1 && !last_of_epoch
                })
        };
        let mut gapped: Vec<_> = seen
            .iter()
            .filter_map(|(id, s)| first_gap(s).map(|i| (id, s, i)))
            .collect();
        gapped.sort();
        // A few, with what came around the gap ((reset count, seq) as applied), to tell a
        // change lost from a snapshot that came without a reset.
        for (id, s, i) in gapped.iter().take(3) {
            let around = &s[i.saturating_sub(3)..(i + 5).min(s.len())];
            println!("  invariant 16: {id}: applied around its first gap: {around:?}");
        }
        let gaps = gapped.len();
        (gaps, seen.values().map(Vec::len).sum::<usize>())
    };
    let status = cache.status();
    let mut ck = Check { failed: false };
    ck.report(
        current && behind == 0 && gaps == 0,
        "16. the gateway's access cache = the ledger, every change once and in order",
        format!(
            "{} accounts, {changes} updates applied over {} reconnects and {} resets to a snapshot (a new feed after a failover); accounts behind or different {behind}, accounts with a change missing or out of order between resets {gaps}{}",
            rows.len(),
            status.reconnects,
            CACHE_RESETS.load(std::sync::atomic::Ordering::Relaxed),
            if current { "" } else { "; NOT current at the end" }
        ),
    );
    Ok(!ck.failed)
}

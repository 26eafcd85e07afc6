//! The baseline: pgbench running the SQL work of one usage debit — append a journal row,
//! update the balance, read it back — one transaction per debit, on the same PostgreSQL,
//! with the same concurrency and duration. Its TPS is the physical limit of one
//! transaction per debit on this storage.

use std::process::Command;

use crate::Args;
use crate::load::Stats;

const SCHEMA: &str = "
DROP TABLE IF EXISTS bench_entries, bench_accounts;
CREATE TABLE bench_accounts (account_id text PRIMARY KEY, balance numeric NOT NULL);
CREATE TABLE bench_entries (
  seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  entry_id uuid NOT NULL DEFAULT gen_random_uuid(),
  account_id text NOT NULL,
  amount numeric NOT NULL,
  balance_after numeric NOT NULL,
  idempotency_key text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (account_id, idempotency_key));
CREATE INDEX ON bench_entries (account_id, seq DESC);
";

fn script(accounts: usize) -> String {
    format!(
        "\\set aid random(1, {accounts})
BEGIN;
UPDATE bench_accounts SET balance = balance - 0.000125 WHERE account_id = 'a' || :aid RETURNING balance;
INSERT INTO bench_entries (account_id, amount, balance_after, idempotency_key)
  SELECT 'a' || :aid, 0.000125, balance, gen_random_uuid()::text FROM bench_accounts WHERE account_id = 'a' || :aid;
END;
"
    )
}

fn pgbench_path() -> String {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.path().join("bin/pgbench").display().to_string())
        .filter(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| "pgbench".to_owned())
}

/// Runs the pgbench `script` (`-n`, two threads, and `flags`) with `clients` for `seconds`
/// against `url`; its report.
fn pgbench(
    flags: &[&str],
    clients: impl ToString,
    seconds: impl ToString,
    script: &std::path::Path,
    url: &str,
) -> anyhow::Result<String> {
    let out = Command::new(pgbench_path())
        .arg("-n")
        .args(flags)
        .args(["-c", &clients.to_string()])
        .args(["-j", "2", "-T", &seconds.to_string(), "-f"])
        .arg(script)
        .arg(url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

pub async fn run(a: &Args, name: &str, accounts: usize) -> anyhow::Result<Stats> {
    let db = "credits_bench_pgbench";
    let base = a.pg_url.trim_end_matches('/');
    let admin = format!("{base}/postgres");
    let url = format!("{base}/{db}");
    let psql = |url: &str, sql: &str| -> anyhow::Result<()> {
        let out = Command::new("psql")
            .args(["-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let _ = psql(&admin, &format!("CREATE DATABASE {db}"));
    psql(&url, SCHEMA)?;
    psql(
        &url,
        &format!(
            "INSERT INTO bench_accounts SELECT 'a' || g, 1000000 FROM generate_series(1, {accounts}) g"
        ),
    )?;
    psql(&url, "VACUUM ANALYZE")?;
    let file = std::env::temp_dir().join(format!("credits-{name}.sql"));
    std::fs::write(&file, script(accounts))?;
    let text = pgbench(&["-r"], a.concurrency, a.duration, &file, &url)?;
    let number_after = |label: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.contains(label))?
            .split('=')
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let tps = number_after("tps").unwrap_or(0.0);
    let avg = number_after("latency average").unwrap_or(0.0);
    let failed = text
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| l.split(':').nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(Stats {
        name: name.to_owned(),
        ops: (tps * a.duration as f64) as u64,
        errors: failed,
        seconds: a.duration as f64,
        throughput: tps,
        p50_ms: avg,
        note: format!(
            "pgbench -c {} -j 2 -T {} on {} account(s); latency column is pgbench's average",
            a.concurrency, a.duration, accounts
        ),
        ..Default::default()
    })
}

/// How many postings one group-commit statement carries at most (`Batching::max_batch`).
pub const GROUP_COMMIT_BATCH: usize = 128;

/// What a ceiling run sends per statement.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ceiling {
    /// `ledger_post_batch()`: what group commit sends today.
    LedgerBatch,
    /// `ledger_post()` per item, accounts in sorted order: what group commit sent before
    /// the set-based batch (and still sends for a batch with two items on one key).
    RowByRow,
    /// One hand-written set-based statement (no idempotency look-up, no events): a lower
    /// bound of what PostgreSQL can do for this work.
    SetBased,
}

/// The store's ceiling (performance issue, item 1): pgbench executing the ledger's own batch
/// posting over `GROUP_COMMIT_BATCH` items in one statement, exactly what `Store::post_batch`
/// sends, on a fresh database that holds the ledger's current schema and functions (applied
/// by the ledger's own migrator), 4 clients; or one of the other forms of [`Ceiling`].
/// Throughput is debits/s.
pub async fn ceiling(a: &Args, name: &str, form: Ceiling) -> anyhow::Result<Stats> {
    let db = "credits_bench_ceiling";
    let base = a.pg_url.trim_end_matches('/');
    let url = format!("{base}/{db}");
    {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres")).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut admin)
            .await?;
    }
    let pool = sqlx::PgPool::connect(&url).await?;
    credits_ledger::MIGRATOR.run(&pool).await?;
    credits_common::db::apply_functions(
        &pool,
        credits_ledger::FUNCTIONS,
        credits_ledger::FUNCTIONS_VERSION,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await?;
    let accounts = a.accounts.max(1);
    sqlx::query(&format!(
        "INSERT INTO accounts (account_id, billing_mode, access, balance)
         SELECT 'a' || g, 'PREPAID', 'ACTIVE', 1000000000 FROM generate_series(1, {accounts}) g"
    ))
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM ANALYZE accounts")
        .execute(&pool)
        .await?;
    // Flush what the scenarios before wrote, so the ceiling is not measured under their
    // checkpoint.
    sqlx::query("CHECKPOINT").execute(&pool).await?;
    pool.close().await;
    let n = GROUP_COMMIT_BATCH;
    let script = match form {
        Ceiling::SetBased => format!(
            "WITH items AS (
  SELECT 'a' || (floor(random()*{accounts})+1)::int AS aid, 0.000125::numeric AS amount, gen_random_uuid()::text AS key, g AS ord
  FROM generate_series(1,{n}) g),
agg AS (SELECT aid, sum(amount) AS total FROM items GROUP BY aid),
upd AS (UPDATE accounts a SET balance = a.balance - agg.total, updated_at = now() FROM agg WHERE a.account_id = agg.aid RETURNING a.account_id, a.balance + agg.total AS before)
INSERT INTO entries (account_id, kind, category, amount, balance_after, idempotency_key)
SELECT i.aid, 'USAGE', 'API_REQUESTS', i.amount,
       u.before - sum(i.amount) OVER (PARTITION BY i.aid ORDER BY i.ord), i.key
FROM items i JOIN upd u ON u.account_id = i.aid;
"
        ),
        Ceiling::RowByRow => format!(
            "SELECT count(*) FROM (SELECT 'a' || (floor(random()*{accounts})+1)::int AS aid, gen_random_uuid()::text AS k FROM generate_series(1,{n}) ORDER BY 1) i CROSS JOIN LATERAL ledger_post(i.aid, 'USAGE', 'API_REQUESTS', NULL, 0.000125, '', '', i.k) p;
"
        ),
        Ceiling::LedgerBatch => format!(
            "SELECT count(*) FROM ledger_post_batch(
  ARRAY(SELECT 'a' || (floor(random()*{accounts})+1)::int FROM generate_series(1,{n})),
  array_fill('USAGE'::text, ARRAY[{n}]), array_fill('API_REQUESTS'::text, ARRAY[{n}]),
  array_fill(NULL::text, ARRAY[{n}]), array_fill(0.000125::numeric, ARRAY[{n}]),
  array_fill(''::text, ARRAY[{n}]), array_fill(''::text, ARRAY[{n}]),
  ARRAY(SELECT gen_random_uuid()::text FROM generate_series(1,{n})),
  array_fill(NULL::text, ARRAY[{n}]));
"
        ),
    };
    let file = std::env::temp_dir().join(format!("credits-{name}.sql"));
    std::fs::write(&file, script)?;
    let clients = 4;
    let text = pgbench(&[], clients, a.duration, &file, &url)?;
    let tps: f64 = text
        .lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split('=').nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let debits = tps * n as f64;
    Ok(Stats {
        name: name.to_owned(),
        ops: (debits * a.duration as f64) as u64,
        seconds: a.duration as f64,
        throughput: debits,
        note: format!(
            "pgbench -c {clients} -j 2 -T {}: {tps:.1} statements/s × {n} debits, {accounts} accounts, {}",
            a.duration,
            match form {
                Ceiling::SetBased =>
                    "one set-based statement (no idempotency look-up, no events): PostgreSQL's lower bound",
                Ceiling::LedgerBatch =>
                    "the ledger's own batch (ledger_post_batch(), as group commit sends it)",
                Ceiling::RowByRow =>
                    "the row-by-row batch (ledger_post() per item, group commit before the set-based batch)",
            }
        ),
        ..Default::default()
    })
}

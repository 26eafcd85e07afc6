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
    let out = Command::new(pgbench_path())
        .args([
            "-n",
            "-r",
            "-c",
            &a.concurrency.to_string(),
            "-j",
            "2",
            "-T",
            &a.duration.to_string(),
            "-f",
        ])
        .arg(&file)
        .arg(&url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
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

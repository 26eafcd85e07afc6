//! What a scenario costs the system, counted rather than timed (`--count-costs`): the
//! transactions each daemon's database committed (`pg_stat_database.xact_commit`, reads
//! included: every autocommit statement is one) and the RPCs each daemon served
//! (`credits_grpc_requests_total` from its `/metrics`, so `METRICS=on scripts/bench`).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Args;

/// PostgreSQL publishes an idle backend's counters at most every 10 s
/// (`PGSTAT_IDLE_INTERVAL`): a snapshot waits that long so it holds everything before it.
const STATS_SETTLE: Duration = Duration::from_secs(11);

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at: std::time::Instant,
    /// Committed transactions per daemon database ("ledger", "payments", "recharge").
    pub xacts: BTreeMap<String, i64>,
    /// RPCs served, per "daemon Service/Method".
    pub rpcs: BTreeMap<String, f64>,
}

/// Counts so far, once the counters settled; `None` unless `--count-costs`.
pub async fn snapshot(a: &Args) -> anyhow::Result<Option<Snapshot>> {
    if !a.count_costs {
        return Ok(None);
    }
    let Some(url) = &a.ledger_database_url else {
        anyhow::bail!("--count-costs needs --ledger-database-url");
    };
    let Some(prefix) = url
        .rsplit('/')
        .next()
        .and_then(|d| d.strip_suffix("_ledger"))
    else {
        anyhow::bail!("--count-costs: the ledger database's name must end in _ledger");
    };
    tokio::time::sleep(STATS_SETTLE).await;
    let pool = sqlx::PgPool::connect(url).await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT datname::text, xact_commit FROM pg_stat_database WHERE datname LIKE $1 || '\\_%'",
    )
    .bind(prefix)
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    let mut s = Snapshot {
        at: std::time::Instant::now(),
        xacts: BTreeMap::new(),
        rpcs: BTreeMap::new(),
    };
    for (db, n) in rows {
        let daemon = db
            .strip_prefix(prefix)
            .unwrap_or(&db)
            .trim_start_matches('_');
        s.xacts.insert(daemon.to_owned(), n);
    }
    for m in &a.metrics {
        let Some((daemon, addr)) = m.split_once('=') else {
            anyhow::bail!("--metrics takes name=host:port, not {m}");
        };
        for (method, n) in served_rpcs(addr).await? {
            s.rpcs.insert(format!("{daemon} {method}"), n);
        }
    }
    Ok(Some(s))
}

/// `credits_grpc_requests_total` summed per method (over codes), from a daemon's
/// `/metrics` (plain HTTP/1.0).
async fn served_rpcs(addr: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("credits_grpc_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let method = format!("{}/{}", label("service"), label("method"));
        *out.entry(method).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

/// "per top-up: …" from snapshots taken idle, before and after, `per` top-ups, less what
/// the bench itself asked of the ledger (`own`: method → calls, each one transaction) and
/// less what the daemons do when idle (pollers, sweepers: the rate between `idle` and
/// `before`, over the time between `before` and `after`).
pub fn per_unit(
    idle: &Snapshot,
    before: &Snapshot,
    after: &Snapshot,
    per: usize,
    own: &[(&str, u64)],
) -> String {
    let per = per.max(1) as f64;
    let own_total: u64 = own.iter().map(|(_, n)| n).sum();
    let idle_secs = (before.at - idle.at).as_secs_f64().max(1e-3);
    let busy_secs = (after.at - before.at).as_secs_f64();
    let mut parts = Vec::new();
    let mut total = 0.0;
    for (db, n) in &after.xacts {
        let b = before.xacts.get(db).copied().unwrap_or(0);
        let idle_rate = (b - idle.xacts.get(db).copied().unwrap_or(b)) as f64 / idle_secs;
        let mut d = (n - b) as f64 - idle_rate * busy_secs;
        if db == "ledger" {
            d -= own_total as f64;
        }
        total += d;
        parts.push(format!("{db} {:.2}", d / per));
    }
    let mut s = format!("transactions {:.2} ({})", total / per, parts.join(", "));
    if !after.rpcs.is_empty() {
        let mut rpcs = Vec::new();
        let mut all = 0.0;
        for (m, n) in &after.rpcs {
            let mut d = n - before.rpcs.get(m).copied().unwrap_or(0.0);
            for (name, calls) in own {
                if m.starts_with("ledger ") && m.ends_with(&format!("/{name}")) {
                    d -= *calls as f64;
                }
            }
            if d / per >= 0.01 {
                all += d;
                rpcs.push(format!("{m} {:.2}", d / per));
            }
        }
        s.push_str(&format!("; RPCs {:.2} ({})", all / per, rpcs.join(", ")));
    }
    s
}

//! `--ha`: the soak over a PostgreSQL failover pair and a three-node RabbitMQ cluster
//! (`deploy/ha/postgres`, `deploy/ha/rabbitmq`), with the faults of losing a machine: the
//! primary killed (keeper and postgres at once), the primary paused past the failover
//! timeout and resumed, the primary cut off from the network (its namespace's link down)
//! and reconnected — in both it must acknowledge no write once it was replaced, and come
//! back as the standby: no split brain — and a broker node killed. The money invariants
//! are checked as in every soak; this module measures what the faults cost: failover
//! times, requests refused while they lasted, and the longest time `CheckAccess` — and a
//! gateway's cache — could not answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::Cluster;
use crate::rng::Rng;
use crate::workload::{self, Account, Clients};

const PG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/ha/postgres");
const MQ: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/ha/rabbitmq");
/// The cluster node `rabbitmqctl` asks about queues once the faults are over (all three
/// run again by then).
pub const CTL_NODE: &str = "credits-ha1@localhost";
/// The longest a failover or a rejoin may take before the run is called failed.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);

async fn script(path: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(path)
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "{path} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn succeeds(path: &str, args: &[&str]) -> bool {
    tokio::process::Command::new(path)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// The topology, started (or found running): the `DATABASE_URL` base of the pair (two
/// hosts) and the `AMQP_URL` of the cluster (three nodes).
pub async fn up() -> anyhow::Result<(String, String)> {
    let pg = script(PG, &["up"]).await?;
    let mq = script(MQ, &["up"]).await?;
    Ok((pg, mq))
}

/// Node `n` (1-based) of the pair, as a URL of its own.
fn node_url(pg: &str, n: usize) -> String {
    credits_common::db::split_hosts(pg)
        .get(n.saturating_sub(1))
        .cloned()
        .unwrap_or_default()
}

async fn primary() -> Option<usize> {
    script(PG, &["primary"]).await.ok()?.parse().ok()
}

/// The table the harness writes to on a node to learn whether it acknowledges writes (in
/// the `postgres` database, created on the primary at start and so on both nodes).
const PROBE_TABLE: &str = "credits_ha_probe";

/// Creates [`PROBE_TABLE`] through the pair's primary.
pub async fn create_probe_table(pg: &str) -> anyhow::Result<()> {
    let mut c = credits_common::db::connect_primary(&format!("{pg}/postgres")).await?;
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {PROBE_TABLE} (at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(&mut c)
    .await?;
    let _ = c.close().await;
    Ok(())
}

/// Whether node `n` commits a row and acknowledges the commit within `wait`. The commit
/// writes WAL, so with synchronous replication only a primary whose standby follows it (or
/// that the monitor let go on alone) acknowledges it.
async fn acknowledges_writes(pg: &str, n: usize, wait: Duration) -> bool {
    let url = format!("{}/postgres", node_url(pg, n));
    let write = async {
        let mut c = sqlx::PgConnection::connect(&url).await.ok()?;
        let mut tx = c.begin().await.ok()?;
        sqlx::query(&format!("INSERT INTO {PROBE_TABLE} DEFAULT VALUES"))
            .execute(&mut *tx)
            .await
            .ok()?;
        tx.commit().await.ok()?;
        let _ = c.close().await;
        Some(())
    };
    matches!(tokio::time::timeout(wait, write).await, Ok(Some(())))
}

/// What the faults cost.
#[derive(Default, Debug)]
pub struct HaReport {
    pub primary_kills: u32,
    pub primary_pauses: u32,
    pub primary_partitions: u32,
    pub broker_kills: u32,
    pub daemon_kills: u32,
    /// From the fault to another node's acknowledging a write.
    pub failovers: Vec<Duration>,
    /// From the fault to every ledger replica's answering from the database again (its
    /// pool on the new primary).
    pub daemons_back: Vec<Duration>,
    /// From the old primary's return to its being the standby again.
    pub rejoins: Vec<Duration>,
    /// Workload calls refused during each failover.
    pub refused: Vec<usize>,
    /// From a broker node's kill to its being back in the cluster.
    pub broker_rejoins: Vec<Duration>,
    /// Writes an old primary — paused then resumed, or cut off then reconnected —
    /// acknowledged after it was replaced (and not made primary again): split brain. Must
    /// be zero.
    pub split_brain_writes: u32,
    /// Faults whose recovery did not come within [`RECOVERY_LIMIT`].
    pub stuck: Vec<String>,
}

fn stats(v: &[Duration]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    let mut s = v.to_vec();
    s.sort();
    format!(
        "p50 {:.1} s, max {:.1} s ({} of them)",
        s[s.len() / 2].as_secs_f64(),
        s[s.len() - 1].as_secs_f64(),
        s.len()
    )
}

impl std::fmt::Display for HaReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let refused: usize = self.refused.iter().sum();
        writeln!(
            f,
            "ha faults: {} primary kills, {} primary pauses past the failover timeout, {} primary partitions (its link cut), {} broker node kills, {} daemon kills",
            self.primary_kills,
            self.primary_pauses,
            self.primary_partitions,
            self.broker_kills,
            self.daemon_kills
        )?;
        writeln!(
            f,
            "ha failover (fault → a new primary acknowledges a write): {}",
            stats(&self.failovers)
        )?;
        writeln!(
            f,
            "ha ledgers answering from the new primary (fault → GetAccount answered by every replica): {}",
            stats(&self.daemons_back)
        )?;
        writeln!(
            f,
            "ha old primary back as the standby: {}",
            stats(&self.rejoins)
        )?;
        writeln!(
            f,
            "ha workload calls refused during failovers: {refused} in all, at most {} in one",
            self.refused.iter().max().copied().unwrap_or(0)
        )?;
        writeln!(
            f,
            "ha broker node back in the cluster: {}",
            stats(&self.broker_rejoins)
        )?;
        write!(
            f,
            "ha split-brain writes acknowledged by an old primary (paused, or cut off) after it was replaced: {}; recoveries that did not come: {:?}",
            self.split_brain_writes, self.stuck
        )
    }
}

impl HaReport {
    /// No split brain, and every fault recovered.
    pub fn ok(&self) -> bool {
        self.split_brain_writes == 0 && self.stuck.is_empty()
    }
}

/// Waits until `check` holds, up to [`RECOVERY_LIMIT`]; how long it took, or `None`.
async fn until<F, Fut>(mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while t.elapsed() < RECOVERY_LIMIT {
        if check().await {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Injects the machine-loss faults until `until`, one at a time, alternating between the
/// database and the broker, with a daemon killed now and then; each fault is recovered
/// (the old primary a standby again, the broker node back in the cluster) before the next.
pub async fn inject(
    c: &mut Cluster,
    pg: &str,
    ledgers: &[credits_client::Ledger],
    probe: &credits_client::AccountId,
    mut rng: Rng,
    until_t: Instant,
    t0: Instant,
) -> HaReport {
    let mut r = HaReport::default();
    let mut turn = 0u32;
    while Instant::now() < until_t {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(2000))).await;
        if turn.is_multiple_of(2) {
            database_fault(pg, ledgers, probe, &mut rng, &mut r, t0).await;
        } else {
            broker_fault(&mut rng, &mut r, t0).await;
        }
        if rng.below(3) == 0 {
            let n = c.all().len() as u64;
            if let Some(d) = c.all().into_iter().nth(rng.below(n) as usize) {
                println!(
                    "[{:6.1}s] ha fault: kill -9 {} and restart",
                    t0.elapsed().as_secs_f32(),
                    d.spec.name
                );
                let _ = d.restart().await;
                r.daemon_kills += 1;
            }
        }
        turn += 1;
    }
    r
}

async fn database_fault(
    pg: &str,
    ledgers: &[credits_client::Ledger],
    probe: &credits_client::AccountId,
    rng: &mut Rng,
    r: &mut HaReport,
    t0: Instant,
) {
    // (`rng` only spaces the steps.)
    let Some(old) = primary().await else {
        r.stuck.push("no primary before a database fault".into());
        return;
    };
    // Cut off, kill, pause, in turn, so that a short run has every kind.
    let kind = match (r.primary_kills + r.primary_pauses + r.primary_partitions) % 3 {
        0 => DbFault::Partition,
        1 => DbFault::Kill,
        _ => DbFault::Pause,
    };
    let n = old.to_string();
    let errors = workload::ERRORS.load(Ordering::Relaxed);
    let t = Instant::now();
    let (count, args, what) = match kind {
        DbFault::Kill => (
            &mut r.primary_kills,
            "kill",
            "killed (kill -9, keeper and postgres)",
        ),
        DbFault::Pause => (&mut r.primary_pauses, "pause", "paused (SIGSTOP)"),
        DbFault::Partition => (
            &mut r.primary_partitions,
            "partition",
            "cut off from the network (its link down; it runs on)",
        ),
    };
    *count += 1;
    let _ = script(PG, &[args, &n]).await;
    println!(
        "[{:6.1}s] ha fault: PostgreSQL primary (node {old}) {what}",
        t0.elapsed().as_secs_f32(),
    );
    let failover = until(|| async {
        match primary().await {
            Some(p) if p != old => acknowledges_writes(pg, p, Duration::from_secs(2)).await,
            _ => false,
        }
    })
    .await;
    let refused = workload::ERRORS.load(Ordering::Relaxed) - errors;
    match failover {
        Some(d) => {
            println!(
                "[{:6.1}s] ha: failover in {:.1} s ({} workload calls refused meanwhile)",
                t0.elapsed().as_secs_f32(),
                d.as_secs_f64(),
                refused
            );
            r.failovers.push(t.elapsed());
            r.refused.push(refused);
        }
        None => r.stuck.push(format!("no failover from node {old}")),
    }
    let back = until(|| async {
        for l in ledgers {
            let answered = tokio::time::timeout(Duration::from_secs(1), l.get_account(probe)).await;
            if !matches!(answered, Ok(Ok(_))) {
                return false;
            }
        }
        true
    })
    .await;
    let took = back.map(|_| t.elapsed());
    recovery(
        &mut r.daemons_back,
        &mut r.stuck,
        took,
        t0,
        "every ledger answers from the new primary, after the fault",
        "a ledger never answered from the new primary".into(),
    );
    // Cut off, the old primary runs on: a client on its side of the cut (a write from
    // inside its namespace) must get no acknowledgement — its commits wait for a standby
    // that now follows the new primary, and it demotes itself.
    let watch_for = Duration::from_millis(1000 + rng.below(3000));
    if kind == DbFault::Partition {
        split_brain_watch(old, watch_for, r, t0, "the cut-off old primary").await;
    } else {
        tokio::time::sleep(watch_for).await;
    }
    let back = Instant::now();
    match kind {
        DbFault::Kill => {
            let _ = script(PG, &["start", &n]).await;
        }
        DbFault::Pause | DbFault::Partition => {
            let args = if kind == DbFault::Pause {
                "resume"
            } else {
                "heal"
            };
            let _ = script(PG, &[args, &n]).await;
            // While it learns it was demoted, a write it acknowledged would be split brain.
            split_brain_watch(
                old,
                Duration::from_secs(8),
                r,
                t0,
                "the returning old primary",
            )
            .await;
        }
    }
    let took = until(|| succeeds(PG, &["healthy"]))
        .await
        .map(|_| back.elapsed());
    recovery(
        &mut r.rejoins,
        &mut r.stuck,
        took,
        t0,
        &format!("node {old} is the standby again, after"),
        format!("node {old} did not rejoin as the standby"),
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DbFault {
    Kill,
    Pause,
    Partition,
}

/// For `watch`, writes on node `old` from inside its namespace (`deploy/ha/postgres write`,
/// which reaches it even cut off); it was replaced before the watch starts, so each write
/// it acknowledges counts as split brain — unless the monitor made it the primary again
/// meanwhile. (Not "while the monitor names another primary": while the old node rejoins,
/// the new primary passes through states the monitor's `primary` does not name.)
async fn split_brain_watch(old: usize, watch: Duration, r: &mut HaReport, t0: Instant, who: &str) {
    let n = old.to_string();
    let until_t = Instant::now() + watch;
    while Instant::now() < until_t {
        if succeeds(PG, &["write", &n]).await && primary().await != Some(old) {
            r.split_brain_writes += 1;
            println!(
                "[{:6.1}s] ha: SPLIT BRAIN: {who} (node {old}) acknowledged a write",
                t0.elapsed().as_secs_f32()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Records a recovery: how long it took (in `times`, and a line), or that it never came.
fn recovery(
    times: &mut Vec<Duration>,
    stuck: &mut Vec<String>,
    took: Option<Duration>,
    t0: Instant,
    done: &str,
    never: String,
) {
    match took {
        Some(d) => {
            println!(
                "[{:6.1}s] ha: {done} {:.1} s",
                t0.elapsed().as_secs_f32(),
                d.as_secs_f64()
            );
            times.push(d);
        }
        None => stuck.push(never),
    }
}

async fn broker_fault(rng: &mut Rng, r: &mut HaReport, t0: Instant) {
    let node = 1 + rng.below(3);
    let n = node.to_string();
    r.broker_kills += 1;
    let t = Instant::now();
    let _ = script(MQ, &["kill", &n]).await;
    println!(
        "[{:6.1}s] ha fault: RabbitMQ node {node} killed (kill -9)",
        t0.elapsed().as_secs_f32()
    );
    tokio::time::sleep(Duration::from_millis(2000 + rng.below(4000))).await;
    let _ = script(MQ, &["start", &n]).await;
    let took = until(|| succeeds(MQ, &["clustered"]))
        .await
        .map(|_| t.elapsed());
    recovery(
        &mut r.broker_rejoins,
        &mut r.stuck,
        took,
        t0,
        &format!("RabbitMQ node {node} back in the cluster, after"),
        format!("broker node {node} did not rejoin"),
    );
}

/// How long `CheckAccess` (per ledger replica) and a gateway's cache could not answer.
#[derive(Default, Debug, Clone)]
pub struct Availability {
    pub calls: u64,
    pub refused: u64,
    /// Per ledger replica: the longest time between two answered calls.
    pub longest_gap: Vec<Duration>,
    /// The cache answers from memory always; the longest time it was not current.
    pub cache_answers: u64,
    pub cache_longest_not_current: Duration,
}

impl std::fmt::Display for Availability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CheckAccess: {} calls, {} refused, longest window without an answer per ledger replica {:?}; the gateway's cache: {} lookups all answered from memory, longest time not current {:.1} s",
            self.calls,
            self.refused,
            self.longest_gap
                .iter()
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .collect::<Vec<_>>(),
            self.cache_answers,
            self.cache_longest_not_current.as_secs_f64()
        )
    }
}

/// Probes `CheckAccess` on every ledger replica and the cache every 25 ms until `stop`.
pub fn probe_access(
    clients: &Clients,
    accounts: &[Account],
    cache: credits_client::AccessCache,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Availability> {
    let ledgers = clients.ledger.clone();
    let ids: Vec<_> = accounts.iter().map(|a| a.id.clone()).collect();
    tokio::spawn(async move {
        let mut av = Availability {
            longest_gap: vec![Duration::ZERO; ledgers.len()],
            ..Default::default()
        };
        let mut last_ok = vec![Instant::now(); ledgers.len()];
        let mut not_current_since: Option<Instant> = None;
        let mut i = 0usize;
        while !stop.load(Ordering::Acquire) {
            i += 1;
            let id = &ids[i % ids.len().max(1)];
            for (k, l) in ledgers.iter().enumerate() {
                av.calls += 1;
                let answered = matches!(
                    tokio::time::timeout(Duration::from_secs(1), l.check_access(id)).await,
                    Ok(Ok(_))
                );
                if answered {
                    last_ok[k] = Instant::now();
                } else {
                    av.refused += 1;
                }
                av.longest_gap[k] = av.longest_gap[k].max(last_ok[k].elapsed());
            }
            let _ = cache.allowed(id.as_str(), credits_client::Money::ZERO);
            av.cache_answers += 1;
            match (cache.is_current(), not_current_since) {
                (false, None) => not_current_since = Some(Instant::now()),
                (true, Some(t)) => {
                    av.cache_longest_not_current = av.cache_longest_not_current.max(t.elapsed());
                    not_current_since = None;
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if let Some(t) = not_current_since {
            av.cache_longest_not_current = av.cache_longest_not_current.max(t.elapsed());
        }
        av
    })
}

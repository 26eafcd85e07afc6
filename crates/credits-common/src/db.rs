//! Database start-up: create the daemon's database if it is missing, connect, and keep
//! retrying with backoff (one clear line naming the URL each time) while PostgreSQL is
//! unreachable, instead of crashing.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio_util::sync::CancellationToken;

/// The URL with any password replaced, for logs: the one in `user:password@`, and the
/// value of every query parameter that carries one (`?password=`, `sslpassword=`,
/// `token=`, `secret=`, `key=`, …).
pub fn redact_url(url: &str) -> String {
    // Several URLs (a broker cluster's nodes, comma-separated): each on its own.
    let parts: Vec<&str> = url.split(',').collect();
    if parts.len() > 1 && parts.iter().all(|p| p.contains("://")) {
        return parts
            .iter()
            .map(|p| redact_one_url(p.trim()))
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one_url(url)
}

fn redact_one_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => base.to_owned(),
            },
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    let Some(query) = query else {
        return base;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if secret_parameter(k) => format!("{k}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// Whether a URL query parameter holds a secret (by its name, any case).
fn secret_parameter(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "credential",
        "auth",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// Connects to `url`, creating its database first if needed. Retries until it succeeds or
/// `shutdown` is cancelled.
///
/// `url` may name several hosts, libpq's way (`postgres://u@h1:5432,h2:5432/db`): the
/// servers of a failover pair or group. The pool then always writes to the one that
/// accepts writes (libpq's `target_session_attrs=read-write`, implied): see [`Failover`].
pub async fn connect(
    url: &str,
    max_connections: u32,
    shutdown: &CancellationToken,
) -> anyhow::Result<PgPool> {
    let hosts = split_hosts(url)
        .iter()
        .map(|u| {
            PgConnectOptions::from_str(u)
                .map(|o| {
                    o.application_name("credits")
                        .log_statements(tracing::log::LevelFilter::Trace)
                })
                .map_err(|e| anyhow::anyhow!("invalid database URL {}: {e}", redact_url(url)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let failover = (hosts.len() > 1).then(|| Failover::new(hosts.clone()));
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = async {
            let opts = match &failover {
                Some(f) => f.find_primary().await?,
                None => hosts[0].clone(),
            };
            ensure_database(&opts).await?;
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(10));
            match &failover {
                Some(f) => f.pool_options(pool).connect_with(opts).await,
                None => pool.connect_with(opts).await,
            }
        };
        match attempt.await {
            Ok(pool) => {
                if let Some(f) = failover {
                    tokio::spawn(f.watch(pool.clone(), shutdown.clone()));
                }
                return Ok(pool);
            }
            Err(e) => {
                tracing::warn!(
                    "cannot reach PostgreSQL at {}: {e}; retrying in {:.1}s",
                    redact_url(url),
                    delay.as_secs_f32()
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {},
            _ = shutdown.cancelled() => anyhow::bail!("shut down while waiting for PostgreSQL"),
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// One URL per host of a multi-host `DATABASE_URL` (`postgres://u:p@h1:1,h2:2/db?o=v` →
/// `postgres://u:p@h1:1/db?o=v`, `postgres://u:p@h2:2/db?o=v`), in order; libpq's
/// `target_session_attrs` is taken out (a pool of several hosts always wants the writable
/// one). A URL with one host comes back as it is.
pub fn split_hosts(url: &str) -> Vec<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return vec![url.to_owned()];
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    if !hosts.contains(',') {
        return vec![url.to_owned()];
    }
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|kv| !kv.is_empty() && !kv.starts_with("target_session_attrs="))
                .collect();
            if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", kept.join("&"))
            }
        }
        None => tail.to_owned(),
    };
    hosts
        .split(',')
        .filter(|h| !h.trim().is_empty())
        .map(|h| format!("{scheme}://{userinfo}{}{tail}", h.trim()))
        .collect()
}

/// How long one host may take to say whether it takes writes.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the pool's host is checked while all is well.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A pool over several PostgreSQL hosts of which one at a time is the primary (the others
/// standbys, promoted by the failover manager when the primary dies):
/// - the pool opens connections to the host found writable (all asked at once; of two, the
///   one on the newer timeline); a connection that lands on a standby, or on an old
///   primary not yet demoted (an older timeline), is refused and the search started at
///   once;
/// - a watcher checks that host every second and, when it stops taking writes or
///   answering, finds the one that does and points the pool there;
/// - connections opened before that move are closed when next taken from the pool or
///   given back, not reused: after a pause, an old primary's sockets may still look alive.
///
/// A commit whose answer is lost in the failover is an error of the connection class
/// ([`is_connection_error`]): callers answer `UNAVAILABLE`, and a retry under the same
/// idempotency key finds what committed (synchronous replication: an acknowledged commit
/// is on the standby that is promoted).
#[derive(Clone)]
pub struct Failover {
    inner: std::sync::Arc<FailoverInner>,
}

struct FailoverInner {
    hosts: Vec<PgConnectOptions>,
    current: std::sync::atomic::AtomicUsize,
    /// The timeline of the primary the pool writes to: a host on an older one is an old
    /// primary not yet demoted (after a pause or a partition), never written to.
    timeline: std::sync::atomic::AtomicU32,
    /// When the pool last moved to another host.
    moved_at: std::sync::Mutex<std::time::Instant>,
    nudge: tokio::sync::Notify,
}

impl Failover {
    pub fn new(hosts: Vec<PgConnectOptions>) -> Failover {
        Failover {
            inner: std::sync::Arc::new(FailoverInner {
                hosts,
                current: std::sync::atomic::AtomicUsize::new(0),
                timeline: std::sync::atomic::AtomicU32::new(0),
                moved_at: std::sync::Mutex::new(std::time::Instant::now()),
                nudge: tokio::sync::Notify::new(),
            }),
        }
    }

    fn host_name(&self, i: usize) -> String {
        let o = &self.inner.hosts[i];
        format!("{}:{}", o.get_host(), o.get_port())
    }

    /// The host that takes writes, all asked at once: of several (an old primary resumed
    /// before its demotion), the one on the newest timeline; of equals, the current one.
    pub async fn find_primary(&self) -> Result<PgConnectOptions, sqlx::Error> {
        let n = self.inner.hosts.len();
        let start = self
            .inner
            .current
            .load(std::sync::atomic::Ordering::Acquire);
        let answers = futures_util::future::join_all(self.inner.hosts.iter().map(probe)).await;
        let mut best: Option<(usize, u32)> = None;
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            match &answers[i] {
                Ok(Some(t)) if best.is_none_or(|(_, b)| *t > b) => best = Some((i, *t)),
                Ok(Some(_)) => {}
                Ok(None) => {
                    last = Some(sqlx::Error::Protocol(format!(
                        "{} is a standby",
                        self.host_name(i)
                    )))
                }
                Err(e) => last = Some(sqlx::Error::Protocol(format!("{}: {e}", self.host_name(i)))),
            }
        }
        match best {
            Some((i, t)) => {
                self.inner
                    .timeline
                    .fetch_max(t, std::sync::atomic::Ordering::AcqRel);
                self.inner
                    .current
                    .store(i, std::sync::atomic::Ordering::Release);
                Ok(self.inner.hosts[i].clone())
            }
            None => Err(last.unwrap_or(sqlx::Error::PoolClosed)),
        }
    }

    /// Whether a connection opened before the pool last moved (not to be used again).
    fn stale(&self, meta: &sqlx::pool::PoolConnectionMetadata) -> bool {
        let moved_at = *self
            .inner
            .moved_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        std::time::Instant::now()
            .checked_sub(meta.age)
            .is_some_and(|opened| opened < moved_at)
    }

    /// The pool's hooks: refuse a connection to a host that does not take writes or is on an
    /// older timeline than the primary; close, instead of reusing or taking back, one
    /// opened before the last move; ping one taken from the pool, within [`PROBE_TIMEOUT`].
    pub fn pool_options(&self, opts: PgPoolOptions) -> PgPoolOptions {
        let (on_connect, on_acquire, on_release) = (self.clone(), self.clone(), self.clone());
        opts.test_before_acquire(false)
            .after_connect(move |conn, _| {
                let f = on_connect.clone();
                Box::pin(async move {
                    let known = f.inner.timeline.load(std::sync::atomic::Ordering::Acquire);
                    if state(conn).await?.is_some_and(|t| t >= known) {
                        return Ok(());
                    }
                    f.inner.nudge.notify_one();
                    Err(sqlx::Error::Protocol(
                        "connected to a standby or a demoted primary; looking for the primary"
                            .into(),
                    ))
                })
            })
            .before_acquire(move |conn, meta| {
                let f = on_acquire.clone();
                Box::pin(async move {
                    if f.stale(&meta) {
                        return Ok(false);
                    }
                    match tokio::time::timeout(PROBE_TIMEOUT, conn.ping()).await {
                        Ok(r) => r.map(|()| true),
                        Err(_) => Err(sqlx::Error::PoolTimedOut),
                    }
                })
            })
            // Before sqlx's own ping on release (which has no deadline): a connection to
            // the host the pool left is closed, not pinged.
            .after_release(move |_, meta| {
                let stale = on_release.stale(&meta);
                Box::pin(async move { Ok(!stale) })
            })
    }

    /// Keeps `pool` on the writable host until `shutdown`.
    pub async fn watch(self, pool: PgPool, shutdown: CancellationToken) {
        let inner = &self.inner;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(WATCH_EVERY) => {}
                _ = inner.nudge.notified() => {}
            }
            let current = inner.current.load(std::sync::atomic::Ordering::Acquire);
            let known = inner.timeline.load(std::sync::atomic::Ordering::Acquire);
            if matches!(probe(&inner.hosts[current]).await, Ok(Some(t)) if t >= known) {
                continue;
            }
            let started = std::time::Instant::now();
            let Ok(opts) = self.find_primary().await else {
                continue;
            };
            let now = inner.current.load(std::sync::atomic::Ordering::Acquire);
            if now != current {
                // The pool's new target first, then the mark: a connection opened before
                // the mark is closed when next taken or given back.
                pool.set_connect_options(opts);
                *inner.moved_at.lock().unwrap_or_else(|e| e.into_inner()) =
                    std::time::Instant::now();
                metrics::counter!("credits_db_failovers_total").increment(1);
                tracing::warn!(
                    from = %self.host_name(current),
                    to = %self.host_name(now),
                    search_ms = started.elapsed().as_millis() as u64,
                    "PostgreSQL primary moved; the pool follows it"
                );
            }
        }
    }
}

/// The timeline of the server behind `conn` when it takes writes; `None` for a standby
/// or a read-only server.
async fn state(conn: &mut sqlx::PgConnection) -> Result<Option<u32>, sqlx::Error> {
    let (read_only, timeline): (String, Option<String>) = sqlx::query_as(
        "SELECT current_setting('transaction_read_only'),
                CASE WHEN pg_is_in_recovery() THEN NULL
                     ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(match (read_only.as_str(), timeline) {
        ("off", Some(t)) => Some(u32::from_str_radix(&t, 16).unwrap_or(0)),
        _ => None,
    })
}

/// Connects to one host and asks for its [`state`], within [`PROBE_TIMEOUT`].
async fn probe(opts: &PgConnectOptions) -> Result<Option<u32>, sqlx::Error> {
    let check = async {
        let mut conn = match opts.connect().await {
            // The database is created once the primary is found: ask the maintenance one.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
                opts.clone().database("postgres").connect().await?
            }
            other => other?,
        };
        let w = state(&mut conn).await;
        let _ = conn.close().await;
        w
    };
    tokio::time::timeout(PROBE_TIMEOUT, check)
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// Connects to the writable host of `url` (one host or several): for tools and checks
/// that need one connection, not a pool.
pub async fn connect_primary(url: &str) -> Result<sqlx::PgConnection, sqlx::Error> {
    let hosts = split_hosts(url)
        .iter()
        .map(|u| PgConnectOptions::from_str(u))
        .collect::<Result<Vec<_>, _>>()?;
    match hosts.len() {
        1 => hosts[0].connect().await,
        _ => Failover::new(hosts).find_primary().await?.connect().await,
    }
}

/// Runs the daemon's migrations, retrying with backoff (one line each time) while the
/// database blips, as [`connect`] does: a restart of PostgreSQL during start-up delays the
/// daemon, it does not crash it. A migration that fails for any other reason (a bad
/// schema change) is an error at once.
pub async fn migrate(
    migrator: &sqlx::migrate::Migrator,
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    retry_on_blip("migrating", shutdown, || async {
        match migrator.run(pool).await {
            Ok(()) => Ok(()),
            Err(sqlx::migrate::MigrateError::Execute(e)) => Err(e),
            Err(e) => Err(sqlx::Error::Protocol(format!("migration failed: {e}"))),
        }
    })
    .await
}

/// Applies a file of `CREATE OR REPLACE FUNCTION …` (the current text of a schema's
/// functions, at `version`) after the migrations, in one transaction under an advisory
/// lock so that replicas starting together do not race — and only when `version` is newer
/// than the one recorded in `functions_version`, so an older binary restarting during a
/// rolling deploy or a rollback never brings back older bodies. Retried on a database blip
/// like [`migrate`].
pub async fn apply_functions(
    pool: &PgPool,
    sql: &'static str,
    version: i32,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    retry_on_blip("applying functions", shutdown, || async {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('credits_functions'))")
            .execute(&mut *tx)
            .await?;
        let current: Option<i32> =
            sqlx::query_scalar("SELECT version FROM functions_version WHERE singleton")
                .fetch_optional(&mut *tx)
                .await?;
        if current.is_some_and(|c| c >= version) {
            return tx.commit().await;
        }
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO functions_version (singleton, version) VALUES (true, $1)
             ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version",
        )
        .bind(version)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    })
    .await
}

/// Runs a start-up step until it succeeds, retrying with backoff while the database is
/// unreachable; any other error ends it at once.
async fn retry_on_blip<F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    step: F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match step().await {
            Ok(()) => return Ok(()),
            Err(e) if is_connection_error(&e) => {
                tracing::warn!(
                    "database went away while {what}: {e}; retrying in {:.1}s",
                    delay.as_secs_f32()
                );
            }
            Err(e) => return Err(anyhow::anyhow!("{what} failed: {e}")),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {},
            _ = shutdown.cancelled() => anyhow::bail!("shut down while {what}"),
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Creates the database named in `opts` when it does not exist, through the `postgres`
/// maintenance database. Racing creators are fine: "already exists" counts as success.
async fn ensure_database(opts: &PgConnectOptions) -> Result<(), sqlx::Error> {
    let Some(name) = opts.get_database().map(str::to_owned) else {
        return Ok(());
    };
    // Connecting to the database itself is the cheap, common case.
    if let Ok(conn) = opts.connect().await {
        let _ = conn.close().await;
        return Ok(());
    }
    let mut admin = opts.clone().database("postgres").connect().await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_none() {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&sql).execute(&mut admin).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {}
            Err(e) => return Err(e),
        }
    }
    let _ = admin.close().await;
    Ok(())
}

/// True for errors that mean "the database went away", worth a retry rather than a 500.
/// A commit that fails this way may or may not have committed: the caller's retry under
/// the same idempotency key is what settles it.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    ) || matches!(e, sqlx::Error::Database(d) if d.code().as_deref().is_some_and(|c| {
        // 57P: the server shutting down; 08: the connection lost; 25006: a write reached a
        // server that no longer takes writes (a primary demoted in a failover).
        c.starts_with("57P") || c.starts_with("08") || c == "25006"
    }))
}

#[cfg(test)]
mod tests {
    use super::{redact_url, split_hosts};

    #[test]
    fn a_url_of_several_hosts_is_one_url_per_host() {
        assert_eq!(
            split_hosts(
                "postgres://u:p@a:6001,b:6002/credits?target_session_attrs=read-write&sslmode=disable"
            ),
            vec![
                "postgres://u:p@a:6001/credits?sslmode=disable",
                "postgres://u:p@b:6002/credits?sslmode=disable"
            ]
        );
        assert_eq!(
            split_hosts("postgresql://a,b:7/db?target_session_attrs=read-write"),
            vec!["postgresql://a/db", "postgresql://b:7/db"]
        );
        assert_eq!(
            split_hosts("postgres://u@h:1/db?target_session_attrs=read-write"),
            vec!["postgres://u@h:1/db?target_session_attrs=read-write"]
        );
        assert_eq!(split_hosts("postgres://h/db"), vec!["postgres://h/db"]);
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://localhost/db"),
            "postgres://localhost/db"
        );
        assert_eq!(
            redact_url("amqp://u:one@a:5672/%2f, amqp://u:two@b:5673/%2f"),
            "amqp://u:***@a:5672/%2f,amqp://u:***@b:5673/%2f"
        );
    }

    #[test]
    fn passwords_in_query_parameters_never_reach_logs_either() {
        assert_eq!(
            redact_url("postgres://app@db/credits?password=s3cret&sslmode=require"),
            "postgres://app@db/credits?password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://app:a@db/c?sslpassword=x1&PASSWORD=x2&application_name=l"),
            "postgres://app:***@db/c?sslpassword=***&PASSWORD=***&application_name=l"
        );
        assert_eq!(
            redact_url("amqp://h/%2f?auth_token=zz"),
            "amqp://h/%2f?auth_token=***"
        );
        assert!(!redact_url("postgres://h/db?password=hunter2").contains("hunter2"));
    }
}

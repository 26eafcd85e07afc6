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
pub async fn connect(
    url: &str,
    max_connections: u32,
    shutdown: &CancellationToken,
) -> anyhow::Result<PgPool> {
    let opts = PgConnectOptions::from_str(url)
        .map_err(|e| anyhow::anyhow!("invalid database URL {}: {e}", redact_url(url)))?
        .application_name("credits")
        .log_statements(tracing::log::LevelFilter::Trace);
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = async {
            ensure_database(&opts).await?;
            PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts.clone())
                .await
        };
        match attempt.await {
            Ok(pool) => return Ok(pool),
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
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    ) || matches!(e, sqlx::Error::Database(d) if d.code().as_deref().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}

#[cfg(test)]
mod tests {
    use super::redact_url;

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

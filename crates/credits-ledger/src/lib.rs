//! The ledger daemon: the only writer of money movements.
//!
//! It owns accounts, the append-only journal (`entries`), balances, access state (R3–R5)
//! and balance thresholds, in its own PostgreSQL database. Layout:
//! - [`domain`]: types and rules, no I/O;
//! - [`store`]: SQL (one `ledger_post` call per posting);
//! - [`grpc`]: the `LedgerService` edge, wire ↔ domain;
//! - this module: configuration and the [`App`] that wires them with the outbox relay.

pub mod access;
pub mod coalesce;
pub mod domain;
pub mod grpc;
pub mod store;
pub mod watch;

use credits_common::outbox::run_relay;
use credits_proto::ledger::v1::ledger_service_server::LedgerServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The current text of every function of the schema (`sql/functions.sql`), applied after
/// the migrations.
pub static FUNCTIONS: &str = include_str!("../sql/functions.sql");
/// The version of `sql/functions.sql`: raise it with every change of the file, or the
/// databases that already hold this version keep their function bodies.
pub const FUNCTIONS_VERSION: i32 = 17;

pub const DEFAULT_DATABASE_URL: &str = "postgres://localhost/credits_ledger";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9151";

#[derive(Clone, Debug)]
pub struct Config {
    /// What every daemon is configured with: database, broker, tokens, pool, relay.
    pub daemon: credits_common::config::DaemonConfig,
    /// Group commit: batch posters, the most postings one commit carries, and the batches
    /// posted at once before the next one waits for more.
    pub group_commit: coalesce::Batching,
    /// R15: how often this replica looks for holds past `expires_at`.
    pub hold_sweep_every: std::time::Duration,
    /// R28: the most one `StreamUsage` call carries.
    pub stream_limits: grpc::StreamLimits,
    /// R29: days after which purchased credits expire (`PURCHASED_CREDITS_EXPIRE_DAYS`);
    /// `None`: never.
    pub purchased_credits_expire_days: Option<u64>,
    /// R31: the access feed (poll interval, retention, `WatchAccess` limits).
    pub feed: watch::FeedConfig,
    /// The most accounts the `CheckAccess` view holds.
    pub access_view_max_accounts: usize,
}

/// R15: expiry within about a second of `expires_at`.
pub const DEFAULT_HOLD_SWEEP: std::time::Duration = std::time::Duration::from_secs(1);
/// Holds one sweep pass looks at (a full pass is followed by another at once).
const HOLD_SWEEP_BATCH: i64 = 200;

impl Config {
    pub fn new(database_url: &str, amqp_url: &str) -> Self {
        Self {
            daemon: credits_common::config::DaemonConfig::new(
                database_url,
                amqp_url,
                "credits-ledger",
            ),
            group_commit: coalesce::Batching::default(),
            hold_sweep_every: DEFAULT_HOLD_SWEEP,
            stream_limits: grpc::StreamLimits::default(),
            purchased_credits_expire_days: None,
            feed: watch::FeedConfig::default(),
            access_view_max_accounts: access::DEFAULT_MAX_ACCOUNTS,
        }
    }
}

pub struct App {
    cfg: Config,
    pool: PgPool,
}

impl App {
    /// Connects to PostgreSQL (creating the database if missing, retrying while it is
    /// unreachable) and runs migrations.
    pub async fn build(cfg: Config, shutdown: &CancellationToken) -> anyhow::Result<App> {
        let pool = cfg.daemon.connect_database(&MIGRATOR, shutdown).await?;
        credits_common::db::apply_functions(&pool, FUNCTIONS, FUNCTIONS_VERSION, shutdown).await?;
        // R29/R30: what an upgrade leaves to do once the new functions are in place (see
        // ledger_after_upgrade in sql/functions.sql); nothing, but for the first start of a
        // new version.
        let repaired: i32 = sqlx::query_scalar("SELECT ledger_after_upgrade()")
            .fetch_one(&pool)
            .await?;
        if repaired > 0 {
            tracing::warn!(
                accounts = repaired,
                "credit lots made for balances from before them, or repaired after postings that ran the previous functions"
            );
        }
        Ok(App { cfg, pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Serves gRPC on `listener` and relays the outbox until `shutdown` is cancelled.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let relay = tokio::spawn(run_relay(
            self.pool.clone(),
            self.cfg.daemon.relay(""),
            shutdown.clone(),
        ));
        let store = store::Store::new(self.pool.clone());
        let sweeper = tokio::spawn(sweep_holds(
            store.clone(),
            self.cfg.hold_sweep_every,
            shutdown.clone(),
        ));
        let expirer = tokio::spawn(sweep_expiries(
            store.clone(),
            self.cfg.hold_sweep_every,
            shutdown.clone(),
        ));
        let views = access::AccessViews::with_capacity(self.cfg.access_view_max_accounts);
        let (feed, polling) = watch::Feed::start(
            store.clone(),
            views.clone(),
            self.cfg.feed,
            shutdown.clone(),
        )
        .await?;
        let coalescer = coalesce::Coalescer::start(store.clone(), self.cfg.group_commit);
        let svc = LedgerServiceServer::new(
            grpc::LedgerGrpc::new(store, coalescer, views, feed)
                .with_stream_limits(self.cfg.stream_limits)
                .with_purchase_expiry(self.cfg.purchased_credits_expire_days),
        );
        let router = self
            .cfg
            .daemon
            .router(credits_proto::FILE_DESCRIPTOR_SET, svc)
            .await?;
        tracing::info!(addr = %listener.local_addr()?, "ledger listening");
        let served = credits_common::grpc::serve(router, listener, shutdown.clone()).await;
        shutdown.cancel();
        let _ = relay.await;
        let _ = sweeper.await;
        let _ = expirer.await;
        let _ = polling.await;
        self.pool.close().await;
        tracing::info!("ledger stopped");
        served
    }
}

/// R15: expires holds past `expires_at`, on every replica (each hold expires once: the
/// hold row is locked and its status checked by `ledger_hold_end`, one hold per
/// transaction). Database time decides.
/// How often the active-holds gauge is counted.
const HOLDS_GAUGE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

async fn sweep_holds(store: store::Store, every: std::time::Duration, shutdown: CancellationToken) {
    let mut counted_at: Option<tokio::time::Instant> = None;
    loop {
        loop {
            match store.expire_holds(HOLD_SWEEP_BATCH).await {
                Ok((n, full)) => {
                    if n > 0 {
                        metrics::counter!("credits_ledger_holds_total", "ending" => "expired")
                            .increment(n as u64);
                        tracing::info!(expired = n, "holds expired");
                    }
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "hold expiry sweep failed; retrying");
                    break;
                }
            }
        }
        // Holds active (R15), for the dashboard: a scrape's worth of freshness is enough,
        // so counted every HOLDS_GAUGE_EVERY, not on every sweep; a failed read leaves the
        // last value.
        if counted_at.is_none_or(|t| t.elapsed() >= HOLDS_GAUGE_EVERY) {
            counted_at = Some(tokio::time::Instant::now());
            if let Ok(n) =
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM holds WHERE status = 'ACTIVE'")
                    .fetch_one(store.pool())
                    .await
            {
                metrics::gauge!("credits_ledger_holds_active").set(n as f64);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// R29: expires credits past their `expires_at` on accounts no posting touched since (a
/// posting expires what is due on its account first), on every replica: each account is
/// locked by `ledger_expire_account`, and a lot expires once. Database time decides; runs
/// as often as the hold sweep.
async fn sweep_expiries(
    store: store::Store,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    loop {
        loop {
            match store.expire_credits(HOLD_SWEEP_BATCH).await {
                Ok((n, full)) => {
                    if n > 0 {
                        metrics::counter!("credits_ledger_lots_expired_total").increment(n as u64);
                        tracing::info!(expired = n, "credits expired");
                    }
                    // A full page that expired nothing was all accounts busy with postings
                    // (skipped, locked): they expire their own; wait for the next pass.
                    if !full || n == 0 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "credit expiry sweep failed; retrying");
                    break;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// The migrations are history; `sql/functions.sql` is where a reader finds what each
    /// function does today. A function a migration creates and that file does not define
    /// would leave its current text scattered again.
    #[test]
    fn every_schema_function_has_its_current_text_in_functions_sql() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for (i, _) in text.match_indices("FUNCTION ") {
                let before = &text[..i];
                if !before.trim_end().ends_with("CREATE") && !before.trim_end().ends_with("REPLACE")
                {
                    continue;
                }
                let name: String = text[i + 9..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                names.push(name);
            }
        }
        assert!(names.iter().any(|n| n == "ledger_post"), "{names:?}");
        for name in names {
            assert!(
                super::FUNCTIONS.contains(&format!("CREATE OR REPLACE FUNCTION {name}(")),
                "sql/functions.sql lacks {name}"
            );
        }
    }
}

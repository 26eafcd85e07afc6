//! The ledger daemon: the only writer of money movements.
//!
//! It owns accounts, the append-only journal (`entries`), balances, access state (R3–R5)
//! and balance thresholds, in its own PostgreSQL database. Layout:
//! - [`domain`]: types and rules, no I/O;
//! - [`store`]: SQL (one `ledger_post` call per posting);
//! - [`grpc`]: the `LedgerService` edge, wire ↔ domain;
//! - this module: configuration and the [`App`] that wires them with the outbox relay.

pub mod coalesce;
pub mod domain;
pub mod grpc;
pub mod store;

use std::time::Duration;

use credits_common::auth::Policy;
use credits_common::outbox::{RelayConfig, run_relay};
use credits_proto::ledger::v1::ledger_service_server::LedgerServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub const DEFAULT_DATABASE_URL: &str = "postgres://localhost/credits_ledger";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:50051";
pub const DEFAULT_METRICS: &str = "0.0.0.0:9151";

#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    pub amqp_url: String,
    pub exchange: String,
    pub auth_token: Option<String>,
    /// Tokens limited to roles (`CREDITS_AUTH_TOKENS_FILE`), besides `auth_token`.
    pub auth_tokens_file: Option<std::path::PathBuf>,
    pub db_max_connections: u32,
    /// How often the outbox relay looks for events when no notification arrives.
    pub relay_poll: Duration,
    /// Unroutable events are retried this long, then parked (see `outbox`).
    pub outbox_park_after: Duration,
    /// Name of the AMQP connection, as shown by `rabbitmqctl list_connections`.
    pub amqp_connection_name: String,
    /// Group commit: concurrent batch posters, and the most postings one commit carries.
    pub group_commit_workers: usize,
    pub group_commit_max: usize,
}

impl Config {
    pub fn new(database_url: &str, amqp_url: &str) -> Self {
        Self {
            database_url: database_url.to_owned(),
            amqp_url: amqp_url.to_owned(),
            exchange: credits_common::config::DEFAULT_EXCHANGE.to_owned(),
            auth_token: None,
            auth_tokens_file: None,
            db_max_connections: 32,
            relay_poll: Duration::from_millis(500),
            outbox_park_after: Duration::from_secs(
                credits_common::config::DEFAULT_OUTBOX_PARK_AFTER_SECS,
            ),
            amqp_connection_name: "credits-ledger".to_owned(),
            group_commit_workers: 4,
            group_commit_max: 128,
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
        let pool = credits_common::db::connect(&cfg.database_url, cfg.db_max_connections, shutdown)
            .await?;
        credits_common::db::migrate(&MIGRATOR, &pool, shutdown).await?;
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
            RelayConfig {
                amqp_url: self.cfg.amqp_url.clone(),
                exchange: self.cfg.exchange.clone(),
                connection_name: self.cfg.amqp_connection_name.clone(),
                poll_interval: self.cfg.relay_poll,
                park_after: self.cfg.outbox_park_after,
            },
            shutdown.clone(),
        ));
        let policy = Policy::load(
            self.cfg.auth_token.as_deref(),
            self.cfg.auth_tokens_file.as_deref(),
        )?;
        let (router, health) =
            credits_common::grpc::base_router(credits_proto::FILE_DESCRIPTOR_SET, policy)?;
        let store = store::Store::new(self.pool.clone());
        let coalescer = coalesce::Coalescer::start(
            store.clone(),
            self.cfg.group_commit_workers,
            self.cfg.group_commit_max,
        );
        let svc = LedgerServiceServer::new(grpc::LedgerGrpc::new(store, coalescer));
        health
            .set_serving::<LedgerServiceServer<grpc::LedgerGrpc>>()
            .await;
        tracing::info!(addr = %listener.local_addr()?, "ledger listening");
        let served =
            credits_common::grpc::serve(router.add_service(svc), listener, shutdown.clone()).await;
        shutdown.cancel();
        let _ = relay.await;
        self.pool.close().await;
        tracing::info!("ledger stopped");
        served
    }
}

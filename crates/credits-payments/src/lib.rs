//! The payments daemon: payment methods (cards, US bank accounts) with exactly one default
//! per account, charges through a [`processor::PaymentProcessor`] (the built-in sandbox by
//! default), and credit purchases that end in exactly one ledger credit.
//!
//! Layout: [`domain`] (types, validation) → [`store`] (SQL) → [`service`] (use cases,
//! recovery) → [`grpc`] (wire ↔ domain); [`processor`] is the processor boundary.

pub mod domain;
pub mod grpc;
pub mod processor;
pub mod service;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use credits_common::Money;
use credits_common::auth::Policy;
use credits_common::outbox::{RelayConfig, run_relay};
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1::payments_service_server::PaymentsServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::processor::{Sandbox, SandboxConfig};
use crate::service::Payments;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub const DEFAULT_DATABASE_URL: &str = "postgres://localhost/credits_payments";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:50052";
pub const DEFAULT_METRICS: &str = "0.0.0.0:9152";
pub const DEFAULT_LEDGER_URL: &str = "http://127.0.0.1:50051";

#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    pub amqp_url: String,
    pub exchange: String,
    pub auth_token: Option<String>,
    /// Tokens limited to roles (`CREDITS_AUTH_TOKENS_FILE`), besides `auth_token`.
    pub auth_tokens_file: Option<std::path::PathBuf>,
    pub ledger_url: String,
    pub db_max_connections: u32,
    pub min_purchase: Money,
    pub sandbox: SandboxConfig,
    pub relay_poll: Duration,
    /// Unroutable events are retried this long, then parked (see `outbox`).
    pub outbox_park_after: Duration,
    /// How often the recovery loop runs, and how long a charge must sit idle before it
    /// counts as unfinished.
    pub recovery_every: Duration,
    pub recovery_stale_after: Duration,
    pub amqp_connection_name: String,
}

impl Config {
    pub fn new(database_url: &str, amqp_url: &str, ledger_url: &str) -> Self {
        Self {
            database_url: database_url.to_owned(),
            amqp_url: amqp_url.to_owned(),
            exchange: credits_common::config::DEFAULT_EXCHANGE.to_owned(),
            auth_token: None,
            auth_tokens_file: None,
            ledger_url: ledger_url.to_owned(),
            db_max_connections: 32,
            min_purchase: Money::new(rust_decimal::Decimal::new(500, 2)),
            sandbox: SandboxConfig::default(),
            relay_poll: Duration::from_millis(500),
            outbox_park_after: Duration::from_secs(
                credits_common::config::DEFAULT_OUTBOX_PARK_AFTER_SECS,
            ),
            recovery_every: Duration::from_secs(1),
            recovery_stale_after: Duration::from_secs(10),
            amqp_connection_name: "credits-payments".to_owned(),
        }
    }
}

pub struct App {
    cfg: Config,
    pool: PgPool,
}

/// A ledger client that connects lazily (payments starts even while the ledger is down).
pub fn ledger_client(url: &str, token: Option<&str>) -> anyhow::Result<service::LedgerClient> {
    Ok(LedgerServiceClient::new(
        credits_common::grpc::lazy_channel(url, token)?,
    ))
}

impl App {
    pub async fn build(cfg: Config, shutdown: &CancellationToken) -> anyhow::Result<App> {
        let pool = credits_common::db::connect(&cfg.database_url, cfg.db_max_connections, shutdown)
            .await?;
        credits_common::db::migrate(&MIGRATOR, &pool, shutdown).await?;
        Ok(App { cfg, pool })
    }

    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let svc = Arc::new(Payments {
            store: store::Store::new(self.pool.clone()),
            processor: Arc::new(Sandbox::new(self.pool.clone(), self.cfg.sandbox.clone())),
            ledger: ledger_client(&self.cfg.ledger_url, self.cfg.auth_token.as_deref())?,
            min_purchase: self.cfg.min_purchase,
        });
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
        let recovery = tokio::spawn(svc.clone().run_recovery(
            self.cfg.recovery_every,
            self.cfg.recovery_stale_after,
            shutdown.clone(),
        ));
        let policy = Policy::load(
            self.cfg.auth_token.as_deref(),
            self.cfg.auth_tokens_file.as_deref(),
        )?;
        let (router, health) =
            credits_common::grpc::base_router(credits_proto::FILE_DESCRIPTOR_SET, policy)?;
        let server = PaymentsServiceServer::new(grpc::PaymentsGrpc::new(svc));
        health
            .set_serving::<PaymentsServiceServer<grpc::PaymentsGrpc>>()
            .await;
        tracing::info!(addr = %listener.local_addr()?, ledger = %self.cfg.ledger_url, "payments listening");
        let served =
            credits_common::grpc::serve(router.add_service(server), listener, shutdown.clone())
                .await;
        shutdown.cancel();
        let _ = tokio::join!(relay, recovery);
        self.pool.close().await;
        tracing::info!("payments stopped");
        served
    }
}

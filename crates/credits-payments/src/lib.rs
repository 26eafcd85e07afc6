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
use credits_common::outbox::run_relay;
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
    /// What every daemon is configured with: database, broker, tokens, pool, relay.
    pub daemon: credits_common::config::DaemonConfig,
    pub ledger_url: String,
    pub min_purchase: Money,
    pub sandbox: SandboxConfig,
    /// How often the recovery loop runs, and how long a charge must sit idle before it
    /// counts as unfinished.
    pub recovery_every: Duration,
    pub recovery_stale_after: Duration,
}

impl Config {
    pub fn new(database_url: &str, amqp_url: &str, ledger_url: &str) -> Self {
        Self {
            daemon: credits_common::config::DaemonConfig::new(
                database_url,
                amqp_url,
                "credits-payments",
            ),
            ledger_url: ledger_url.to_owned(),
            min_purchase: Money::new(rust_decimal::Decimal::new(500, 2)),
            sandbox: SandboxConfig::default(),
            recovery_every: Duration::from_secs(1),
            recovery_stale_after: Duration::from_secs(10),
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
        let pool = cfg.daemon.connect_database(&MIGRATOR, shutdown).await?;
        Ok(App { cfg, pool })
    }

    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let svc = Arc::new(Payments::new(
            store::Store::new(self.pool.clone()),
            Arc::new(Sandbox::new(self.pool.clone(), self.cfg.sandbox.clone())),
            LedgerServiceClient::new(self.cfg.daemon.peer_channel(&self.cfg.ledger_url)?),
            self.cfg.min_purchase,
        ));
        let relay = tokio::spawn(run_relay(
            self.pool.clone(),
            self.cfg.daemon.relay(""),
            shutdown.clone(),
        ));
        let recovery = tokio::spawn(svc.clone().run_recovery(
            self.cfg.recovery_every,
            self.cfg.recovery_stale_after,
            shutdown.clone(),
        ));
        let server = PaymentsServiceServer::new(grpc::PaymentsGrpc::new(svc));
        let router = self
            .cfg
            .daemon
            .router(credits_proto::FILE_DESCRIPTOR_SET, server)
            .await?;
        tracing::info!(addr = %listener.local_addr()?, ledger = %self.cfg.ledger_url, "payments listening");
        let served = credits_common::grpc::serve(router, listener, shutdown.clone()).await;
        shutdown.cancel();
        let _ = tokio::join!(relay, recovery);
        self.pool.close().await;
        tracing::info!("payments stopped");
        served
    }
}

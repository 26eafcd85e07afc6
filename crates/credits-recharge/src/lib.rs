//! The recharge daemon: auto-recharge settings and exactly one top-up per crossing.
//!
//! Layout: [`domain`] (R6, R8, states) → [`store`] (SQL, the one-in-flight constraint) →
//! [`worker`] (deciding and executing attempts, the sweeper) ← [`consumer`] (RabbitMQ
//! events) and [`grpc`] (`AutoRechargeService`).

pub mod consumer;
pub mod dlq;
pub mod domain;
pub mod grpc;
pub mod ports;
pub mod settings;
pub mod store;
pub mod worker;

use std::sync::Arc;

use credits_common::Money;
use credits_common::outbox::run_relay;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use credits_proto::recharge::v1::auto_recharge_service_server::AutoRechargeServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::worker::{Faults, Recharge, WorkerConfig};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub const DEFAULT_DATABASE_URL: &str = "postgres://localhost/credits_recharge";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50053";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9153";
pub const DEFAULT_PAYMENTS_URL: &str = "http://127.0.0.1:50052";
pub const DEFAULT_QUEUE: &str = "credits.recharge.events";

#[derive(Clone, Debug)]
pub struct Config {
    /// What every daemon is configured with: database, broker, tokens, pool, relay.
    pub daemon: credits_common::config::DaemonConfig,
    pub queue: String,
    pub ledger_url: String,
    pub payments_url: String,
    pub min_purchase: Money,
    pub worker: WorkerConfig,
    pub faults: Faults,
}

impl Config {
    pub fn new(database_url: &str, amqp_url: &str, ledger_url: &str, payments_url: &str) -> Self {
        Self {
            daemon: credits_common::config::DaemonConfig::new(
                database_url,
                amqp_url,
                "credits-recharge",
            ),
            queue: DEFAULT_QUEUE.to_owned(),
            ledger_url: ledger_url.to_owned(),
            payments_url: payments_url.to_owned(),
            min_purchase: Money::new(rust_decimal::Decimal::new(500, 2)),
            worker: WorkerConfig::default(),
            faults: Faults::default(),
        }
    }
}

pub struct App {
    cfg: Config,
    pool: PgPool,
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
        let worker = Arc::new(Recharge::new(
            store::Store::new(self.pool.clone()),
            Arc::new(ports::GrpcLedger(LedgerServiceClient::new(
                self.cfg.daemon.peer_channel(&self.cfg.ledger_url)?,
            ))),
            Arc::new(ports::GrpcPayments(PaymentsServiceClient::new(
                self.cfg.daemon.peer_channel(&self.cfg.payments_url)?,
            ))),
            self.cfg.min_purchase,
            self.cfg.worker.clone(),
            self.cfg.faults.clone(),
        ));
        let relay = tokio::spawn(run_relay(
            self.pool.clone(),
            self.cfg.daemon.relay("-relay"),
            shutdown.clone(),
        ));
        let consumer = tokio::spawn(consumer::run(
            worker.clone(),
            consumer::ConsumerConfig {
                amqp_url: self.cfg.daemon.amqp_url.clone(),
                exchange: self.cfg.daemon.exchange.clone(),
                queue: self.cfg.queue.clone(),
                prefetch: 32,
                connection_name: format!("{}-consumer", self.cfg.daemon.amqp_connection_name),
            },
            shutdown.clone(),
        ));
        let sweeper = tokio::spawn(worker.clone().run_sweeper(shutdown.clone()));
        let server = AutoRechargeServiceServer::new(grpc::RechargeGrpc::new(worker.clone()));
        let router = self
            .cfg
            .daemon
            .router(credits_proto::FILE_DESCRIPTOR_SET, server)
            .await?;
        tracing::info!(addr = %listener.local_addr()?, queue = %self.cfg.queue, "recharge listening");
        let served = credits_common::grpc::serve(router, listener, shutdown.clone()).await;
        shutdown.cancel();
        let _ = tokio::join!(relay, consumer, sweeper);
        worker.drain().await;
        self.pool.close().await;
        tracing::info!("recharge stopped");
        served
    }
}

//! The recharge daemon: auto-recharge settings and exactly one top-up per crossing.
//!
//! Layout: [`domain`] (R6, R8, states) → [`store`] (SQL, the one-in-flight constraint) →
//! [`worker`] (deciding and executing attempts, the sweeper) ← [`consumer`] (RabbitMQ
//! events) and [`grpc`] (`AutoRechargeService`).

pub mod consumer;
pub mod domain;
pub mod grpc;
pub mod ports;
pub mod settings;
pub mod store;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use credits_common::Money;
use credits_common::auth::Policy;
use credits_common::outbox::{RelayConfig, run_relay};
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use credits_proto::recharge::v1::auto_recharge_service_server::AutoRechargeServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::worker::{Faults, Recharge, WorkerConfig};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub const DEFAULT_DATABASE_URL: &str = "postgres://localhost/credits_recharge";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:50053";
pub const DEFAULT_METRICS: &str = "0.0.0.0:9153";
pub const DEFAULT_PAYMENTS_URL: &str = "http://127.0.0.1:50052";
pub const DEFAULT_QUEUE: &str = "credits.recharge.events";

#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    pub amqp_url: String,
    pub exchange: String,
    pub queue: String,
    pub auth_token: Option<String>,
    /// Tokens limited to roles (`CREDITS_AUTH_TOKENS_FILE`), besides `auth_token`.
    pub auth_tokens_file: Option<std::path::PathBuf>,
    pub ledger_url: String,
    pub payments_url: String,
    pub db_max_connections: u32,
    pub min_purchase: Money,
    pub worker: WorkerConfig,
    pub faults: Faults,
    pub relay_poll: Duration,
    /// Unroutable events are retried this long, then parked (see `outbox`).
    pub outbox_park_after: Duration,
    pub amqp_connection_name: String,
}

impl Config {
    pub fn new(database_url: &str, amqp_url: &str, ledger_url: &str, payments_url: &str) -> Self {
        Self {
            database_url: database_url.to_owned(),
            amqp_url: amqp_url.to_owned(),
            exchange: credits_common::config::DEFAULT_EXCHANGE.to_owned(),
            queue: DEFAULT_QUEUE.to_owned(),
            auth_token: None,
            auth_tokens_file: None,
            ledger_url: ledger_url.to_owned(),
            payments_url: payments_url.to_owned(),
            db_max_connections: 32,
            min_purchase: Money::new(rust_decimal::Decimal::new(500, 2)),
            worker: WorkerConfig::default(),
            faults: Faults::default(),
            relay_poll: Duration::from_millis(500),
            outbox_park_after: Duration::from_secs(
                credits_common::config::DEFAULT_OUTBOX_PARK_AFTER_SECS,
            ),
            amqp_connection_name: "credits-recharge".to_owned(),
        }
    }
}

pub struct App {
    cfg: Config,
    pool: PgPool,
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
        let token = self.cfg.auth_token.as_deref();
        let worker = Arc::new(Recharge::new(
            store::Store::new(self.pool.clone()),
            Arc::new(ports::GrpcLedger(LedgerServiceClient::new(
                credits_common::grpc::lazy_channel(&self.cfg.ledger_url, token)?,
            ))),
            Arc::new(ports::GrpcPayments(PaymentsServiceClient::new(
                credits_common::grpc::lazy_channel(&self.cfg.payments_url, token)?,
            ))),
            self.cfg.min_purchase,
            self.cfg.worker.clone(),
            self.cfg.faults.clone(),
        ));
        let relay = tokio::spawn(run_relay(
            self.pool.clone(),
            RelayConfig {
                amqp_url: self.cfg.amqp_url.clone(),
                exchange: self.cfg.exchange.clone(),
                connection_name: format!("{}-relay", self.cfg.amqp_connection_name),
                poll_interval: self.cfg.relay_poll,
                park_after: self.cfg.outbox_park_after,
            },
            shutdown.clone(),
        ));
        let consumer = tokio::spawn(consumer::run(
            worker.clone(),
            consumer::ConsumerConfig {
                amqp_url: self.cfg.amqp_url.clone(),
                exchange: self.cfg.exchange.clone(),
                queue: self.cfg.queue.clone(),
                prefetch: 32,
                connection_name: format!("{}-consumer", self.cfg.amqp_connection_name),
            },
            shutdown.clone(),
        ));
        let sweeper = tokio::spawn(worker.clone().run_sweeper(shutdown.clone()));
        let policy = Policy::load(
            self.cfg.auth_token.as_deref(),
            self.cfg.auth_tokens_file.as_deref(),
        )?;
        let (router, health) =
            credits_common::grpc::base_router(credits_proto::FILE_DESCRIPTOR_SET, policy)?;
        let server = AutoRechargeServiceServer::new(grpc::RechargeGrpc::new(worker.clone()));
        health
            .set_serving::<AutoRechargeServiceServer<grpc::RechargeGrpc>>()
            .await;
        tracing::info!(addr = %listener.local_addr()?, queue = %self.cfg.queue, "recharge listening");
        let served =
            credits_common::grpc::serve(router.add_service(server), listener, shutdown.clone())
                .await;
        shutdown.cancel();
        let _ = tokio::join!(relay, consumer, sweeper);
        worker.drain().await;
        self.pool.close().await;
        tracing::info!("recharge stopped");
        served
    }
}

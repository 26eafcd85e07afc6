//! The payments daemon: payment methods (cards, US bank accounts) with exactly one default
//! per account, charges through a [`processor::PaymentProcessor`] (the built-in sandbox by
//! default), and credit purchases that end in exactly one ledger credit.
//!
//! Layout: [`domain`] (types, validation) → [`store`] (SQL) → [`service`] (use cases,
//! recovery) → [`grpc`] (wire ↔ domain); [`processor`] is the processor boundary.

pub mod domain;
pub mod grpc;
pub mod processor;
pub mod refunds;
pub mod service;
pub mod store;
pub mod stripe;
pub mod webhook;

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
use crate::stripe::{Stripe, StripeConfig};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub const DEFAULT_DATABASE_URL: &str = "postgres://localhost/credits_payments";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50052";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9152";
pub const DEFAULT_LEDGER_URL: &str = "http://127.0.0.1:50051";
/// R26: where processor webhooks are received.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8081";

/// R23: which processor charges. There is no default in the binary: a deployment says.
#[derive(Clone, Debug)]
pub enum ProcessorChoice {
    /// The built-in test processor (test card numbers, nothing is really charged).
    Sandbox(SandboxConfig),
    Stripe(StripeConfig),
}

#[derive(Clone, Debug)]
pub struct Config {
    /// What every daemon is configured with: database, broker, tokens, pool, relay.
    pub daemon: credits_common::config::DaemonConfig,
    pub ledger_url: String,
    pub min_purchase: Money,
    pub processor: ProcessorChoice,
    /// R26: the webhook endpoint's address (served with a real processor); `127.0.0.1:0`
    /// picks a free port (`App::http_addr` says which).
    pub http_listen: std::net::SocketAddr,
    /// How often the recovery loop runs, and how long a charge must sit idle before it
    /// counts as unfinished.
    pub recovery_every: Duration,
    pub recovery_stale_after: Duration,
    /// How long a refund being carried out is left to its caller before recovery may
    /// resume it (at least as long as its processor calls may take).
    pub refund_lease: Duration,
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
            processor: ProcessorChoice::Sandbox(SandboxConfig::default()),
            http_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8081)),
            recovery_every: Duration::from_secs(1),
            recovery_stale_after: Duration::from_secs(10),
            refund_lease: Duration::from_secs_f64(refunds::REFUND_LEASE_SECS),
        }
    }
}

pub struct App {
    cfg: Config,
    pool: PgPool,
    /// The webhook endpoint's listener, bound at build (a real processor only).
    http: Option<TcpListener>,
}

/// A ledger client that connects lazily (payments starts even while the ledger is down).
pub fn ledger_client(url: &str, token: Option<&str>) -> anyhow::Result<service::LedgerClient> {
    Ok(LedgerServiceClient::new(
        credits_common::grpc::lazy_channel(url, token)?,
    ))
}

impl App {
    pub async fn build(cfg: Config, shutdown: &CancellationToken) -> anyhow::Result<App> {
        let http = match &cfg.processor {
            ProcessorChoice::Stripe(_) => {
                // R28: the webhook endpoint is checked like the gRPC and metrics ones.
                credits_common::config::require_auth_off_loopback(
                    !cfg.daemon.policy()?.is_open(),
                    &[("PAYMENTS_HTTP_ADDR", cfg.http_listen)],
                )?;
                Some(TcpListener::bind(cfg.http_listen).await.map_err(|e| {
                    anyhow::anyhow!("PAYMENTS_HTTP_ADDR {}: cannot listen: {e}", cfg.http_listen)
                })?)
            }
            ProcessorChoice::Sandbox(_) => None,
        };
        let pool = cfg.daemon.connect_database(&MIGRATOR, shutdown).await?;
        Ok(App { cfg, pool, http })
    }

    /// Where the webhook endpoint listens (`None` with the sandbox).
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let store = store::Store::new(self.pool.clone());
        let ledger = LedgerServiceClient::new(self.cfg.daemon.peer_channel(&self.cfg.ledger_url)?);
        let (svc, stripe) = match &self.cfg.processor {
            ProcessorChoice::Sandbox(s) => {
                tracing::warn!(
                    "processor: the built-in SANDBOX (test cards; no money moves). Set PAYMENTS_PROCESSOR=stripe to charge for real."
                );
                let sandbox = Arc::new(Sandbox::new(self.pool.clone(), s.clone()));
                (
                    Payments::new(store, sandbox, ledger, self.cfg.min_purchase),
                    None,
                )
            }
            ProcessorChoice::Stripe(s) => {
                tracing::info!(api = %s.api_base, "processor: Stripe");
                let stripe = Arc::new(Stripe::new(s.clone())?);
                (
                    Payments::with_stripe(store, stripe.clone(), ledger, self.cfg.min_purchase),
                    Some(stripe),
                )
            }
        };
        let svc = Arc::new(svc.with_refund_lease(self.cfg.refund_lease));
        let webhooks = match (self.http, stripe) {
            (Some(listener), Some(stripe)) => {
                let app = webhook::router(Arc::new(webhook::Webhooks {
                    payments: svc.clone(),
                    stripe,
                    rate: credits_common::http::RateLimiter::new(webhook::WEBHOOK_RATE_PER_MINUTE),
                }));
                tracing::info!(addr = %listener.local_addr()?, "webhooks listening on /webhooks/stripe");
                let stop = shutdown.clone();
                Some(tokio::spawn(async move {
                    // R28: header-read and request timeouts, a connection limit.
                    let served = credits_common::http::serve(
                        listener,
                        app,
                        credits_common::http::HttpLimits::default(),
                        None,
                        stop,
                    )
                    .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "webhook endpoint failed");
                    }
                }))
            }
            _ => None,
        };
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
        if let Some(w) = webhooks {
            let _ = w.await;
        }
        self.pool.close().await;
        tracing::info!("payments stopped");
        served
    }
}

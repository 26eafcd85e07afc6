//! `credits-recharge`: clap/env → config → telemetry → `App::build(cfg).run(listener, shutdown)`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use credits_common::Money;
use credits_common::config::{CommonArgs, ranged};
use credits_recharge::Config;

#[derive(Parser)]
#[command(version, about = "The credits auto-recharge worker")]
struct Args {
    /// PostgreSQL URL of the recharge database (created if missing).
    #[arg(long, env = "DATABASE_URL", default_value = credits_recharge::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// gRPC listen address.
    #[arg(long, env = "RECHARGE_LISTEN_ADDR", default_value = credits_recharge::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// URL of the ledger's gRPC service.
    #[arg(long, env = "LEDGER_URL", default_value = "http://127.0.0.1:50051")]
    ledger_url: String,
    /// URL of the payments gRPC service.
    #[arg(long, env = "PAYMENTS_URL", default_value = credits_recharge::DEFAULT_PAYMENTS_URL)]
    payments_url: String,
    /// Durable quorum queue the worker consumes (replicas share it).
    #[arg(long, env = "RECHARGE_QUEUE", default_value = credits_recharge::DEFAULT_QUEUE)]
    queue: String,
    /// Smallest credit purchase, in dollars (R6 keeps target - threshold at least this).
    #[arg(long, env = "MIN_PURCHASE", default_value = "5.00")]
    min_purchase: String,
    /// After a declined top-up, seconds until the balance is looked at again.
    #[arg(
        long,
        env = "RECHARGE_RETRY_AFTER_FAILURE_SECS",
        default_value_t = 3600,
        value_parser = ranged::<1, 604_800>
    )]
    retry_after_failure_secs: u64,
    /// How long a worker owns an attempt it executes, in seconds; past it any replica
    /// resumes the attempt (and the first worker's writes are refused).
    #[arg(long, env = "RECHARGE_LEASE_SECS", default_value_t = 30, value_parser = ranged::<2, 3600>)]
    lease_secs: u64,
    /// Seconds between passes of the reconciler (ledger threshold and lost crossings).
    #[arg(long, env = "RECHARGE_RECONCILE_SECS", default_value_t = 60, value_parser = ranged::<1, 86_400>)]
    reconcile_secs: u64,
    #[command(flatten)]
    common: CommonArgs,
}

impl Args {
    /// The daemon's configuration from its flags and environment.
    fn config(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::new(
            &self.database_url,
            &self.common.amqp_url,
            &self.ledger_url,
            &self.payments_url,
        );
        cfg.daemon.apply(&self.common);
        cfg.queue = self.queue.clone();
        cfg.min_purchase = Money::parse_positive("MIN_PURCHASE", &self.min_purchase)?;
        cfg.worker.retry_after_failure = Duration::from_secs(self.retry_after_failure_secs);
        cfg.worker.lease = Duration::from_secs(self.lease_secs);
        cfg.worker.reconcile_every = Duration::from_secs(self.reconcile_secs);
        Ok(cfg)
    }
}

credits_common::daemon_main!(credits_recharge);

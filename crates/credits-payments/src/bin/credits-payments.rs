//! `credits-payments`: clap/env → config → telemetry → `App::build(cfg).run(listener, shutdown)`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use credits_common::Money;
use credits_common::config::{CommonArgs, ranged};
use credits_payments::Config;

#[derive(Parser, Debug)]
#[command(version, about = "The credits payments daemon")]
struct Args {
    /// PostgreSQL URL of the payments database (created if missing).
    #[arg(long, env = "DATABASE_URL", default_value = credits_payments::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// gRPC listen address.
    #[arg(long, env = "PAYMENTS_LISTEN_ADDR", default_value = credits_payments::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// URL of the ledger's gRPC service.
    #[arg(long, env = "LEDGER_URL", default_value = credits_payments::DEFAULT_LEDGER_URL)]
    ledger_url: String,
    /// Smallest credit purchase, in dollars (R3).
    #[arg(long, env = "MIN_PURCHASE", default_value = "5.00")]
    min_purchase: String,
    /// Artificial latency of every sandbox processor call, in milliseconds.
    #[arg(long, env = "SANDBOX_LATENCY_MS", default_value_t = 0, value_parser = ranged::<0, 60_000>)]
    sandbox_latency_ms: u64,
    /// How long sandbox ACH debits stay pending, in milliseconds.
    #[arg(long, env = "SANDBOX_ACH_SETTLE_MS", default_value_t = 5000, value_parser = ranged::<0, 604_800_000>)]
    sandbox_ach_settle_ms: u64,
    #[command(flatten)]
    common: CommonArgs,
}

impl Args {
    /// The daemon's configuration from its flags and environment.
    fn config(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::new(&self.database_url, &self.common.amqp_url, &self.ledger_url);
        cfg.daemon.apply(&self.common);
        cfg.min_purchase = Money::parse_positive("MIN_PURCHASE", &self.min_purchase)?;
        cfg.sandbox.latency = Duration::from_millis(self.sandbox_latency_ms);
        cfg.sandbox.ach_settle_delay = Duration::from_millis(self.sandbox_ach_settle_ms);
        Ok(cfg)
    }
}

credits_common::daemon_main!(credits_payments);

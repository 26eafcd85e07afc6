//! `credits-payments`: clap/env → config → telemetry → `App::build(cfg).run(listener, shutdown)`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use credits_common::Money;
use credits_common::config::{CommonArgs, Secret, ranged};
use credits_payments::processor::SandboxConfig;
use credits_payments::stripe::StripeConfig;
use credits_payments::{Config, ProcessorChoice};

/// R23: the processor is always a deliberate choice.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Processor {
    /// The built-in test processor: test card numbers, no money moves.
    Sandbox,
    /// Stripe (STRIPE_SECRET_KEY, STRIPE_PUBLISHABLE_KEY, STRIPE_WEBHOOK_SECRET).
    Stripe,
}

#[derive(Parser)]
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
    /// Which processor charges: `sandbox` (test cards, nothing is charged) or `stripe`.
    /// Required: a deployment says which.
    #[arg(long, env = "PAYMENTS_PROCESSOR", value_enum)]
    processor: Option<Processor>,
    /// Stripe's secret key (`sk_live_…` / `sk_test_…`).
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
    stripe_secret_key: Option<String>,
    /// Stripe's publishable key, handed to the billing page's Stripe.js.
    #[arg(long, env = "STRIPE_PUBLISHABLE_KEY")]
    stripe_publishable_key: Option<String>,
    /// The signing secret of the webhook endpoint (`whsec_…`).
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    stripe_webhook_secret: Option<String>,
    /// Stripe's API (an emulator's for tests).
    #[arg(long, env = "STRIPE_API_BASE", default_value = credits_payments::stripe::DEFAULT_API_BASE)]
    stripe_api_base: String,
    /// Where processor webhooks are received (`POST /webhooks/stripe`).
    #[arg(long, env = "PAYMENTS_HTTP_ADDR", default_value = credits_payments::DEFAULT_HTTP_LISTEN)]
    http_addr: SocketAddr,
    /// Smallest credit purchase, in dollars (R3).
    #[arg(long, env = "MIN_PURCHASE", default_value = "5.00")]
    min_purchase: String,
    /// Artificial latency of every sandbox processor call, in milliseconds.
    #[arg(long, env = "SANDBOX_LATENCY_MS", default_value_t = 0, value_parser = ranged::<0, 60_000>)]
    sandbox_latency_ms: u64,
    /// How long sandbox ACH debits stay pending, in milliseconds.
    #[arg(long, env = "SANDBOX_ACH_SETTLE_MS", default_value_t = 5000, value_parser = ranged::<0, 604_800_000>)]
    sandbox_ach_settle_ms: u64,
    /// Seconds a refund being carried out is left to its caller before recovery resumes
    /// it: longer than the processor's calls may take (4 tries of 30 s).
    #[arg(long, env = "REFUND_LEASE_SECS", default_value_t = credits_payments::refunds::REFUND_LEASE_SECS as u64, value_parser = ranged::<5, 3600>)]
    refund_lease_secs: u64,
    #[command(flatten)]
    common: CommonArgs,
}

impl Args {
    /// The daemon's configuration from its flags and environment.
    fn config(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::new(&self.database_url, &self.common.amqp_url, &self.ledger_url);
        cfg.daemon.apply(&self.common);
        cfg.min_purchase = Money::parse_positive("MIN_PURCHASE", &self.min_purchase)?;
        cfg.http_listen = self.http_addr;
        cfg.refund_lease = Duration::from_secs(self.refund_lease_secs);
        let processor = self.processor.ok_or_else(|| {
            anyhow::anyhow!(
                "PAYMENTS_PROCESSOR is required: `stripe` to charge for real, or `sandbox` (test cards; no money moves)"
            )
        })?;
        cfg.processor = match processor {
            Processor::Sandbox => ProcessorChoice::Sandbox(SandboxConfig {
                latency: Duration::from_millis(self.sandbox_latency_ms),
                ach_settle_delay: Duration::from_millis(self.sandbox_ach_settle_ms),
                ..SandboxConfig::default()
            }),
            Processor::Stripe => {
                let need = |v: &Option<String>, name: &str| {
                    v.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
                        anyhow::anyhow!("{name} is required with PAYMENTS_PROCESSOR=stripe")
                    })
                };
                ProcessorChoice::Stripe(StripeConfig {
                    secret_key: Secret::new(need(&self.stripe_secret_key, "STRIPE_SECRET_KEY")?),
                    publishable_key: need(&self.stripe_publishable_key, "STRIPE_PUBLISHABLE_KEY")?,
                    webhook_secret: Secret::new(need(
                        &self.stripe_webhook_secret,
                        "STRIPE_WEBHOOK_SECRET",
                    )?),
                    api_base: self.stripe_api_base.clone(),
                })
            }
        };
        Ok(cfg)
    }
}

credits_common::daemon_main!(credits_payments);

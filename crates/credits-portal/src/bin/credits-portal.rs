//! `credits-portal`: clap/env → config → telemetry → `App::build(cfg).run(grpc, http, shutdown)`.

use std::net::SocketAddr;

use clap::Parser;
use credits_client::{ClientConfig, Money};
use credits_common::config::{Secret, ranged};
use credits_common::telemetry::LogFormat;

/// No `Debug`: it holds the signing keys and tokens.
#[derive(Parser)]
#[command(name = "credits-portal", version, about = "The credits billing portal")]
struct Args {
    /// R28: the portal's own database (used links, live sessions); created if missing.
    #[arg(long, env = "PORTAL_DATABASE_URL", default_value = credits_portal::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// gRPC listen address (`PortalService`).
    #[arg(long, env = "PORTAL_LISTEN_ADDR", default_value = credits_portal::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// HTTP listen address of the billing page.
    #[arg(long, env = "PORTAL_HTTP_ADDR", default_value = credits_portal::DEFAULT_HTTP_LISTEN)]
    http_listen: SocketAddr,
    /// The base URL customers' browsers reach the page at; session URLs start with it.
    #[arg(long, env = "PORTAL_PUBLIC_URL", default_value = credits_portal::DEFAULT_PUBLIC_URL)]
    public_url: String,
    /// Signs session links and cookies (HMAC-SHA256; at least 32 bytes). Every replica
    /// needs the same key. Unset: a random key per process.
    #[arg(long, env = "PORTAL_SIGNING_KEY", hide_env_values = true)]
    signing_key: Option<String>,
    /// The key before a rotation: still accepted, never used to sign.
    #[arg(long, env = "PORTAL_PREVIOUS_SIGNING_KEY", hide_env_values = true)]
    previous_signing_key: Option<String>,
    #[arg(long, env = "LEDGER_URL", default_value = credits_client::DEFAULT_LEDGER_URL)]
    ledger_url: String,
    #[arg(long, env = "PAYMENTS_URL", default_value = credits_client::DEFAULT_PAYMENTS_URL)]
    payments_url: String,
    #[arg(long, env = "RECHARGE_URL", default_value = credits_client::DEFAULT_RECHARGE_URL)]
    recharge_url: String,
    /// The portal's own token for calling the services: a `billing`-role token (R28),
    /// never the all-powerful `CREDITS_AUTH_TOKEN`. Checked against
    /// `CREDITS_AUTH_TOKENS_FILE` when one is given.
    #[arg(long, env = "PORTAL_CLIENT_TOKEN", hide_env_values = true)]
    client_token: Option<String>,
    /// When set, `PortalService` needs `authorization: Bearer <token>`.
    #[arg(long, env = "CREDITS_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Scoped tokens (`<role> <token>` lines), as for every daemon.
    #[arg(long, env = "CREDITS_AUTH_TOKENS_FILE")]
    auth_tokens_file: Option<std::path::PathBuf>,
    /// Stripe.js (R24): set when payments charges through Stripe; **Add a card** then hands
    /// the card to Stripe.js, never to us. `https://js.stripe.com/v3/` in production.
    #[arg(long, env = "STRIPE_JS_URL")]
    stripe_js_url: Option<String>,
    /// Smallest credit purchase, in dollars, shown on the page (payments enforces it).
    #[arg(long, env = "MIN_PURCHASE", default_value = "5.00")]
    min_purchase: String,
    /// Seconds a call to a service may take.
    #[arg(long, env = "PORTAL_CLIENT_TIMEOUT_SECS", default_value_t = 10, value_parser = ranged::<1, 300>)]
    client_timeout_secs: u64,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// R28: PEM certificate (chain) the billing page is served with over TLS.
    #[arg(long, env = "PORTAL_TLS_CERT", value_name = "PEM")]
    page_tls_cert: Option<std::path::PathBuf>,
    /// R28: PEM private key of `PORTAL_TLS_CERT`.
    #[arg(long, env = "PORTAL_TLS_KEY", value_name = "PEM")]
    page_tls_key: Option<std::path::PathBuf>,
    /// R28: requests per minute one page session may make (and link opens per address).
    #[arg(long, env = "PORTAL_RATE_PER_MINUTE", default_value_t = credits_portal::DEFAULT_RATE_PER_MINUTE as u64, value_parser = ranged::<1, 100_000>)]
    rate_per_minute: u64,
    /// gRPC TLS: `PortalService` served with it, the portal's calls to the services made
    /// with it (`CREDITS_TLS_CERT`, `CREDITS_TLS_KEY`, `CREDITS_TLS_CA`).
    #[command(flatten)]
    tls: credits_common::tls::TlsArgs,
    /// Address of the Prometheus metrics endpoint (`/metrics`); "off" disables it.
    #[arg(long, env = "METRICS_ADDR", default_value = credits_portal::DEFAULT_METRICS)]
    metrics_addr: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    credits_common::telemetry::init(args.log_format, "info", "credits-portal");
    // R28, before anything listens: no authentication means loopback only; the portal's
    // own token is a billing one.
    let policy = credits_common::auth::Policy::load(
        args.auth_token.as_deref(),
        args.auth_tokens_file.as_deref(),
    )?;
    let mut listeners = vec![
        ("PORTAL_LISTEN_ADDR", args.listen),
        ("PORTAL_HTTP_ADDR", args.http_listen),
    ];
    let metrics: Option<SocketAddr> = match args.metrics_addr.as_str() {
        "off" | "" => None,
        m => Some(
            m.parse()
                .map_err(|e| anyhow::anyhow!("METRICS_ADDR {m:?}: {e}"))?,
        ),
    };
    if let Some(m) = metrics {
        listeners.push(("METRICS_ADDR", m));
    }
    credits_common::config::require_auth_off_loopback(!policy.is_open(), &listeners)?;
    credits_portal::check_client_token(
        args.client_token.as_deref(),
        args.auth_token.as_deref(),
        args.auth_tokens_file.is_some().then_some(&policy),
    )?;
    if let Some(m) = metrics {
        credits_common::config::install_metrics(m)?;
    }
    let shutdown = credits_common::shutdown::on_signal();
    let client = ClientConfig {
        ledger_url: args.ledger_url.clone(),
        payments_url: args.payments_url.clone(),
        recharge_url: args.recharge_url.clone(),
        token: args.client_token.clone().filter(|t| !t.is_empty()),
        timeout: std::time::Duration::from_secs(args.client_timeout_secs),
        ..ClientConfig::local()
    };
    let keys = credits_portal::keys_from(
        args.signing_key.as_deref(),
        args.previous_signing_key.as_deref(),
    )?;
    let mut cfg = credits_portal::Config::new(client, &args.public_url, keys);
    cfg.min_purchase = Money::parse_positive("MIN_PURCHASE", &args.min_purchase)?;
    cfg.auth_token = args.auth_token.filter(|t| !t.is_empty()).map(Secret::new);
    cfg.auth_tokens_file = args.auth_tokens_file.clone();
    cfg.stripe_js_url = args.stripe_js_url.clone().filter(|u| !u.is_empty());
    cfg.database_url = credits_common::config::DatabaseUrl::new(&args.database_url);
    cfg.rate_per_minute = args.rate_per_minute as u32;
    cfg.tls = credits_common::tls::Tls::from(&args.tls);
    cfg.page_tls = match (args.page_tls_cert.clone(), args.page_tls_key.clone()) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => anyhow::bail!("PORTAL_TLS_CERT and PORTAL_TLS_KEY go together: set both or neither"),
    };
    let app = credits_portal::App::build(cfg, &shutdown).await?;
    let grpc = credits_common::config::bind(args.listen).await?;
    let http = credits_common::config::bind(args.http_listen).await?;
    let result = app.run(grpc, http, shutdown).await;
    credits_common::telemetry::flush().await;
    result
}

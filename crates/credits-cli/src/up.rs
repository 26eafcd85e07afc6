//! `credits up`: the four daemons in one process, for local use.

use std::net::SocketAddr;
use std::time::Duration;

use credits_common::Money;
use credits_common::config::Secret;
use tokio_util::sync::CancellationToken;

/// No `Debug`: it holds tokens, keys and URLs with passwords (R28).
#[derive(clap::Args)]
pub struct UpArgs {
    /// PostgreSQL server URL without a database; each daemon uses (and creates)
    /// credits_ledger, credits_payments and credits_recharge on it.
    #[arg(long, env = "CREDITS_PG_URL", default_value = "postgres://localhost")]
    pub pg_url: String,
    /// Database names are <prefix>_ledger, <prefix>_payments, <prefix>_recharge and
    /// <prefix>_portal.
    #[arg(long, env = "CREDITS_DB_PREFIX", default_value = "credits")]
    pub db_prefix: String,
    #[arg(long, env = "AMQP_URL", default_value = credits_common::config::DEFAULT_AMQP_URL)]
    pub amqp_url: String,
    #[arg(long, env = "CREDITS_EXCHANGE", default_value = credits_common::config::DEFAULT_EXCHANGE)]
    pub exchange: String,
    #[arg(long, env = "RECHARGE_QUEUE", default_value = credits_recharge::DEFAULT_QUEUE)]
    pub queue: String,
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub ledger_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub payments_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:50053")]
    pub recharge_addr: SocketAddr,
    #[arg(long, default_value = credits_portal::DEFAULT_LISTEN)]
    pub portal_addr: SocketAddr,
    /// Where the billing page is served.
    #[arg(long, env = "PORTAL_HTTP_ADDR", default_value = credits_portal::DEFAULT_HTTP_LISTEN)]
    pub portal_http_addr: SocketAddr,
    /// The base of the session URLs (default: the page's address on this machine).
    #[arg(long, env = "PORTAL_PUBLIC_URL")]
    pub portal_public_url: Option<String>,
    /// Signs portal sessions; unset, a random key for this run.
    #[arg(long, env = "PORTAL_SIGNING_KEY", hide_env_values = true)]
    pub portal_signing_key: Option<String>,
    /// The portal's token for calling the services: a billing-role token (R28). With only
    /// CREDITS_AUTH_TOKEN set, `credits up` makes one for this run.
    #[arg(long, env = "PORTAL_CLIENT_TOKEN", hide_env_values = true)]
    pub portal_client_token: Option<String>,
    /// One Prometheus endpoint for the whole process; "off" disables it.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9150")]
    pub metrics_addr: String,
    #[arg(long, env = "CREDITS_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Scoped tokens (`<role> <token>` lines), as for each daemon.
    #[arg(long, env = "CREDITS_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<std::path::PathBuf>,
    #[arg(long, env = "MIN_PURCHASE", default_value = "5.00")]
    pub min_purchase: String,
    #[arg(long, env = "SANDBOX_ACH_SETTLE_MS", default_value_t = 5000, value_parser = credits_common::config::ranged::<0, 604_800_000>)]
    pub sandbox_ach_settle_ms: u64,
    #[arg(
        long,
        env = "RECHARGE_RETRY_AFTER_FAILURE_SECS",
        default_value_t = 3600,
        value_parser = credits_common::config::ranged::<1, 604_800>
    )]
    pub retry_after_failure_secs: u64,
    /// The payments processor: `sandbox` (the default here: test cards, no money moves) or
    /// `stripe` (with the keys below; `--stripe-api-base` points at an emulator).
    #[arg(long, env = "PAYMENTS_PROCESSOR", default_value = "sandbox", value_parser = ["sandbox", "stripe"])]
    pub processor: String,
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
    pub stripe_secret_key: Option<String>,
    #[arg(long, env = "STRIPE_PUBLISHABLE_KEY")]
    pub stripe_publishable_key: Option<String>,
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub stripe_webhook_secret: Option<String>,
    #[arg(long, env = "STRIPE_API_BASE", default_value = credits_payments::stripe::DEFAULT_API_BASE)]
    pub stripe_api_base: String,
    /// Stripe.js for the billing page; default: `<stripe-api-base>/js.stripe.com/v3/` for an
    /// emulator, Stripe's own otherwise.
    #[arg(long, env = "STRIPE_JS_URL")]
    pub stripe_js_url: Option<String>,
    /// Where payments receives the processor's webhooks.
    #[arg(long, env = "PAYMENTS_HTTP_ADDR", default_value = credits_payments::DEFAULT_HTTP_LISTEN)]
    pub payments_http_addr: SocketAddr,
}

/// The processor `credits up` runs payments with, and the Stripe.js URL the page then uses.
fn processor(a: &UpArgs) -> anyhow::Result<(credits_payments::ProcessorChoice, Option<String>)> {
    let sandbox =
        credits_payments::ProcessorChoice::Sandbox(credits_payments::processor::SandboxConfig {
            ach_settle_delay: Duration::from_millis(a.sandbox_ach_settle_ms),
            ..Default::default()
        });
    if a.processor == "sandbox" {
        return Ok((sandbox, None));
    }
    let need = |v: &Option<String>, name: &str| {
        v.clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow::anyhow!("{name} is required with --processor stripe"))
    };
    let js = a.stripe_js_url.clone().unwrap_or_else(|| {
        if a.stripe_api_base == credits_payments::stripe::DEFAULT_API_BASE {
            credits_payments::stripe::DEFAULT_JS_URL.to_owned()
        } else {
            format!(
                "{}/js.stripe.com/v3/",
                a.stripe_api_base.trim_end_matches('/')
            )
        }
    });
    Ok((
        credits_payments::ProcessorChoice::Stripe(credits_payments::stripe::StripeConfig {
            secret_key: Secret::new(need(&a.stripe_secret_key, "STRIPE_SECRET_KEY")?),
            publishable_key: need(&a.stripe_publishable_key, "STRIPE_PUBLISHABLE_KEY")?,
            webhook_secret: Secret::new(need(&a.stripe_webhook_secret, "STRIPE_WEBHOOK_SECRET")?),
            api_base: a.stripe_api_base.clone(),
        }),
        Some(js),
    ))
}

/// The service's database on the server `base` (its parameters, if any, kept after it).
fn db(base: &str, prefix: &str, service: &str) -> String {
    let (server, params) = match base.split_once('?') {
        Some((s, p)) => (s, format!("?{p}")),
        None => (base, String::new()),
    };
    format!(
        "{}/{prefix}_{service}{params}",
        server.trim_end_matches('/')
    )
}

/// A local URL peers can dial for an address that may be the wildcard.
fn dial(addr: SocketAddr) -> String {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        addr.ip().to_string()
    };
    format!("http://{host}:{}", addr.port())
}

async fn bind(name: &str, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{name}: cannot listen on {addr}: {e}"))
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    credits_common::telemetry::init(
        credits_common::telemetry::LogFormat::Text,
        "info",
        "credits",
    );
    // R28, before anything listens: no authentication means loopback only.
    let policy =
        credits_common::auth::Policy::load(a.auth_token.as_deref(), a.auth_tokens_file.as_deref())?;
    let metrics: Option<SocketAddr> = match a.metrics_addr.as_str() {
        "off" | "" => None,
        m => Some(
            m.parse()
                .map_err(|e| anyhow::anyhow!("METRICS_ADDR {m:?}: {e}"))?,
        ),
    };
    let mut listeners = vec![
        ("--ledger-addr", a.ledger_addr),
        ("--payments-addr", a.payments_addr),
        ("--recharge-addr", a.recharge_addr),
        ("--portal-addr", a.portal_addr),
        ("PORTAL_HTTP_ADDR", a.portal_http_addr),
    ];
    if a.processor == "stripe" {
        listeners.push(("PAYMENTS_HTTP_ADDR", a.payments_http_addr));
    }
    if let Some(m) = metrics {
        listeners.push(("METRICS_ADDR", m));
    }
    credits_common::config::require_auth_off_loopback(!policy.is_open(), &listeners)?;
    let portal_auth = portal_token(&a, &policy)?;
    if let Some(m) = metrics {
        credits_common::config::install_metrics(m)?;
    }
    let min_purchase = Money::parse_positive("MIN_PURCHASE", &a.min_purchase)?;
    let shutdown = credits_common::shutdown::on_signal();

    // What the three daemons share: the exchange and who may call them.
    let shared = |d: &mut credits_common::config::DaemonConfig| {
        d.exchange = a.exchange.clone();
        d.auth_token = Secret::setting(a.auth_token.as_deref());
        d.auth_tokens_file = portal_auth.tokens_file.clone();
    };
    let mut ledger =
        credits_ledger::Config::new(&db(&a.pg_url, &a.db_prefix, "ledger"), &a.amqp_url);
    shared(&mut ledger.daemon);
    let mut payments = credits_payments::Config::new(
        &db(&a.pg_url, &a.db_prefix, "payments"),
        &a.amqp_url,
        &dial(a.ledger_addr),
    );
    shared(&mut payments.daemon);
    payments.min_purchase = min_purchase;
    let (choice, stripe_js) = processor(&a)?;
    payments.processor = choice;
    payments.http_listen = a.payments_http_addr;
    let mut recharge = credits_recharge::Config::new(
        &db(&a.pg_url, &a.db_prefix, "recharge"),
        &a.amqp_url,
        &dial(a.ledger_addr),
        &dial(a.payments_addr),
    );
    recharge.queue = a.queue.clone();
    shared(&mut recharge.daemon);
    recharge.min_purchase = min_purchase;
    recharge.worker.retry_after_failure = Duration::from_secs(a.retry_after_failure_secs);

    let portal_public = a
        .portal_public_url
        .clone()
        .unwrap_or_else(|| dial(a.portal_http_addr));
    let mut portal = credits_portal::Config::new(
        credits_client::ClientConfig {
            ledger_url: dial(a.ledger_addr),
            payments_url: dial(a.payments_addr),
            recharge_url: dial(a.recharge_addr),
            token: portal_auth.token.clone(),
            ..credits_client::ClientConfig::local()
        },
        &portal_public,
        credits_portal::keys_from(a.portal_signing_key.as_deref(), None)?,
    );
    portal.min_purchase = min_purchase;
    portal.auth_token = Secret::setting(a.auth_token.as_deref());
    portal.auth_tokens_file = portal_auth.tokens_file.clone();
    portal.stripe_js_url = stripe_js;
    portal.database_url =
        credits_common::config::DatabaseUrl::new(db(&a.pg_url, &a.db_prefix, "portal"));

    let (l, p, r, o) = tokio::try_join!(
        credits_ledger::App::build(ledger, &shutdown),
        credits_payments::App::build(payments, &shutdown),
        credits_recharge::App::build(recharge, &shutdown),
        credits_portal::App::build(portal, &shutdown),
    )?;
    let (ll, pl, rl) = (
        bind("ledger", a.ledger_addr).await?,
        bind("payments", a.payments_addr).await?,
        bind("recharge", a.recharge_addr).await?,
    );
    let (ol, oh) = (
        bind("portal", a.portal_addr).await?,
        bind("portal page", a.portal_http_addr).await?,
    );
    banner(&a, &ll, &pl, &rl, &portal_auth)?;
    portal_banner(&ol, &portal_public)?;
    let stop = |token: &CancellationToken| {
        let t = token.clone();
        move |res: anyhow::Result<()>| {
            t.cancel();
            res
        }
    };
    let (lr, pr, rr, or) = tokio::join!(
        async { stop(&shutdown)(l.run(ll, shutdown.clone()).await) },
        async { stop(&shutdown)(p.run(pl, shutdown.clone()).await) },
        async { stop(&shutdown)(r.run(rl, shutdown.clone()).await) },
        async { stop(&shutdown)(o.run(ol, oh, shutdown.clone()).await) },
    );
    credits_common::telemetry::flush().await;
    lr.and(pr).and(rr).and(or)
}

#[allow(clippy::print_stdout)] // the banner is this command's output
fn portal_banner(grpc: &tokio::net::TcpListener, page: &str) -> anyhow::Result<()> {
    println!(
        "  portal    grpc {}   page {page}  (credits portal-session ACCOUNT prints a link)",
        grpc.local_addr()?
    );
    Ok(())
}

#[allow(clippy::print_stdout)] // the banner is this command's output
fn banner(
    a: &UpArgs,
    l: &tokio::net::TcpListener,
    p: &tokio::net::TcpListener,
    r: &tokio::net::TcpListener,
    auth: &PortalAuth,
) -> anyhow::Result<()> {
    println!("credits is up (Ctrl-C stops all four)");
    if a.processor == "sandbox" {
        println!(
            "  processor SANDBOX: test cards only, no money moves (--processor stripe to charge for real)"
        );
    } else {
        println!(
            "  processor Stripe at {}   webhooks http://{}/webhooks/stripe",
            a.stripe_api_base, a.payments_http_addr
        );
    }
    println!(
        "  ledger    grpc {}   db {}",
        l.local_addr()?,
        db(
            &credits_common::db::redact_url(&a.pg_url),
            &a.db_prefix,
            "ledger"
        )
    );
    println!(
        "  payments  grpc {}   db {}",
        p.local_addr()?,
        db(
            &credits_common::db::redact_url(&a.pg_url),
            &a.db_prefix,
            "payments"
        )
    );
    println!(
        "  recharge  grpc {}   db {}",
        r.local_addr()?,
        db(
            &credits_common::db::redact_url(&a.pg_url),
            &a.db_prefix,
            "recharge"
        )
    );
    println!(
        "  events    {} on {}",
        a.exchange,
        credits_common::db::redact_url(&a.amqp_url)
    );
    if a.metrics_addr != "off" {
        println!("  metrics   http://{}/metrics", a.metrics_addr);
    }
    println!("  auth      {}", auth.describe);
    Ok(())
}

/// Who the portal is to the services (R28: a billing-role token, never the internal one).
struct PortalAuth {
    token: Option<String>,
    /// The token file every daemon checks: the operator's, or one made for this run that
    /// lists the portal's billing token.
    tokens_file: Option<std::path::PathBuf>,
    describe: String,
}

fn portal_token(a: &UpArgs, policy: &credits_common::auth::Policy) -> anyhow::Result<PortalAuth> {
    let given = a.portal_client_token.clone().filter(|t| !t.is_empty());
    if policy.is_open() {
        return Ok(PortalAuth {
            token: given,
            tokens_file: None,
            describe: "off (every address is loopback; set CREDITS_AUTH_TOKEN to listen elsewhere)"
                .to_owned(),
        });
    }
    let file_policy = a.auth_tokens_file.is_some().then_some(policy);
    if given.is_some() || a.auth_tokens_file.is_some() {
        credits_portal::check_client_token(given.as_deref(), a.auth_token.as_deref(), file_policy)?;
        return Ok(PortalAuth {
            token: given,
            tokens_file: a.auth_tokens_file.clone(),
            describe: "bearer tokens required (the portal's own is billing-role)".to_owned(),
        });
    }
    // Only the internal token: a billing one for the portal, for this run, in a file
    // only this user can read.
    let token =
        uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string();
    // A directory of our own (a fresh random name, made here, owner-only): nobody else
    // can have prepared it or the file in it.
    let dir = std::env::temp_dir().join(format!("credits-up-{}", uuid::Uuid::new_v4().simple()));
    let mut d = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut d, 0o700);
    d.create(&dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let path = dir.join("tokens");
    write_private(
        &path,
        &format!("# made by `credits up` for this run\nbilling {token}\n"),
    )?;
    Ok(PortalAuth {
        token: Some(token),
        tokens_file: Some(path.clone()),
        describe: format!(
            "bearer token required; the portal calls with a billing-role token made for this run ({})",
            path.display()
        ),
    })
}

/// Writes a file readable by its owner only.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    o.mode(0o600);
    o.open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn database_names_go_before_the_servers_parameters() {
        assert_eq!(
            super::db("postgres://h/?sslmode=require", "credits", "ledger"),
            "postgres://h/credits_ledger?sslmode=require"
        );
        assert_eq!(
            super::db("postgres://h", "c", "payments"),
            "postgres://h/c_payments"
        );
    }
}

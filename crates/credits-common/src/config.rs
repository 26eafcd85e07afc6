//! Configuration pieces shared by the daemons: each binary flattens [`CommonArgs`] into its
//! own clap struct, so every setting is both a flag and an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use crate::telemetry::LogFormat;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_EXCHANGE: &str = "credits.events";
pub const DEFAULT_OUTBOX_PARK_AFTER_SECS: u64 = 600;

#[derive(Clone, clap::Args)]
pub struct CommonArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    pub amqp_url: String,
    /// Topic exchange that events are published to.
    #[arg(long, env = "CREDITS_EXCHANGE", default_value = DEFAULT_EXCHANGE)]
    pub exchange: String,
    /// When set, every RPC but health needs `authorization: Bearer <token>`.
    #[arg(long, env = "CREDITS_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// File of `<role> <token>` lines (roles gateway, billing, internal) limiting each
    /// token to what its role may call; see `credits_common::auth`.
    #[arg(long, env = "CREDITS_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<std::path::PathBuf>,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Most PostgreSQL connections in the daemon's pool.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = DEFAULT_DB_MAX_CONNECTIONS as u64, value_parser = ranged::<1, 1000>)]
    pub db_max_connections: u64,
    /// Seconds an event that no queue receives is retried before it is parked in
    /// `<exchange>.unrouted`.
    #[arg(long, env = "OUTBOX_PARK_AFTER_SECS", default_value_t = DEFAULT_OUTBOX_PARK_AFTER_SECS, value_parser = ranged::<1, 604_800>)]
    pub outbox_park_after_secs: u64,
    /// Address of the Prometheus metrics endpoint (`/metrics`); "off" disables it.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// R28: seconds a call's handler may run before it ends `CANCELLED` (longer than a
    /// payments call with its processor retries).
    #[arg(long, env = "GRPC_CALL_TIMEOUT_SECS", default_value_t = crate::grpc::CALL_TIMEOUT.as_secs(), value_parser = ranged::<1, 3600>)]
    pub grpc_call_timeout_secs: u64,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

impl CommonArgs {
    /// The metrics address, with `default` when unset and `None` when "off".
    pub fn metrics_addr_or(&self, default: SocketAddr) -> anyhow::Result<Option<SocketAddr>> {
        match self.metrics_addr.as_deref() {
            None => Ok(Some(default)),
            Some("off") | Some("") => Ok(None),
            Some(s) => Ok(Some(
                s.parse()
                    .map_err(|e| anyhow::anyhow!("METRICS_ADDR {s:?}: {e}"))?,
            )),
        }
    }
}

/// A clap value parser for a whole number within `MIN..=MAX`, so a zero or absurd setting
/// (`GROUP_COMMIT_WORKERS=0`, a pool of a million connections) is a clear start-up error
/// naming the setting, never a panic later.
pub fn ranged<const MIN: u64, const MAX: u64>(s: &str) -> Result<u64, String> {
    let v: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if (MIN..=MAX).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: must be {MIN} to {MAX}"))
    }
}

/// Buckets of every latency histogram, in seconds: 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global Prometheus recorder with its HTTP listener (`GET /metrics`).
pub fn install_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        // Latency histograms (`*_seconds`) get buckets, so p99 can be computed across
        // replicas with `histogram_quantile`.
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
            LATENCY_BUCKETS,
        )
        .map_err(|e| anyhow::anyhow!("metrics buckets: {e}"))?
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    tracing::info!(%addr, "metrics listening");
    Ok(())
}

/// A daemon binary's start-up: logging, the metrics endpoint (unless "off"), and the
/// shutdown token cancelled by SIGINT/SIGTERM.
pub fn start_daemon(
    common: &CommonArgs,
    default_metrics: &str,
    service: &str,
) -> anyhow::Result<tokio_util::sync::CancellationToken> {
    crate::telemetry::init(common.log_format, "info", service);
    if let Some(addr) = common.metrics_addr_or(default_metrics.parse()?)? {
        install_metrics(addr)?;
    }
    Ok(crate::shutdown::on_signal())
}

/// A daemon binary's life once its flags are parsed: [`start_daemon`], then `build` the app
/// (its configuration taken from the flags) with the shutdown token, bind `listen`, and
/// `run` the app there until shutdown.
pub async fn run_daemon<A, R>(
    common: &CommonArgs,
    default_metrics: &str,
    service: &str,
    listen: SocketAddr,
    build: impl AsyncFnOnce(&tokio_util::sync::CancellationToken) -> anyhow::Result<A>,
    run: impl FnOnce(A, tokio::net::TcpListener, tokio_util::sync::CancellationToken) -> R,
) -> anyhow::Result<()>
where
    R: Future<Output = anyhow::Result<()>>,
{
    // R28, before anything listens: no authentication means loopback only.
    let policy = crate::auth::Policy::load(
        common.auth_token.as_deref(),
        common.auth_tokens_file.as_deref(),
    )?;
    let mut listeners = vec![(listen_setting(service), listen)];
    if let Some(m) = common.metrics_addr_or(default_metrics.parse()?)? {
        listeners.push(("METRICS_ADDR".to_owned(), m));
    }
    let listeners: Vec<(&str, SocketAddr)> =
        listeners.iter().map(|(k, a)| (k.as_str(), *a)).collect();
    require_auth_off_loopback(!policy.is_open(), &listeners)?;
    let shutdown = start_daemon(common, default_metrics, service)?;
    let app = build(&shutdown).await?;
    let listener = bind(listen).await?;
    let result = run(app, listener, shutdown).await;
    crate::telemetry::flush().await;
    result
}

/// The setting of a daemon's gRPC address: `credits-ledger` → `LEDGER_LISTEN_ADDR`.
fn listen_setting(service: &str) -> String {
    format!(
        "{}_LISTEN_ADDR",
        service.trim_start_matches("credits-").to_uppercase()
    )
}

/// R28: a daemon without authentication listens on loopback addresses only. `listeners`
/// are (setting, address); the first that is not loopback refuses start-up, naming it.
pub fn require_auth_off_loopback(
    auth_on: bool,
    listeners: &[(&str, SocketAddr)],
) -> anyhow::Result<()> {
    if auth_on {
        return Ok(());
    }
    match listeners.iter().find(|(_, a)| !a.ip().is_loopback()) {
        Some((setting, addr)) => anyhow::bail!(
            "{setting}={addr} is not a loopback address and no authentication is configured: \
             anyone who can reach it could call every RPC. Set CREDITS_AUTH_TOKEN or \
             CREDITS_AUTH_TOKENS_FILE (docs/security.md), or listen on 127.0.0.1"
        ),
        None => Ok(()),
    }
}

/// The `main` of the binary of daemon crate `$daemon`: parses the binary's clap `Args`
/// (with the fields `common` and `listen`, and `config()` making the daemon's `Config`),
/// then [`run_daemon`] with the crate's `DEFAULT_METRICS` and `App`.
#[macro_export]
macro_rules! daemon_main {
    ($daemon:ident) => {
        #[tokio::main]
        async fn main() -> anyhow::Result<()> {
            let args = <Args as clap::Parser>::parse();
            $crate::config::run_daemon(
                &args.common,
                $daemon::DEFAULT_METRICS,
                &stringify!($daemon).replace('_', "-"),
                args.listen,
                async |shutdown| $daemon::App::build(args.config()?, shutdown).await,
                $daemon::App::run,
            )
            .await
        }
    };
}

/// Binds the gRPC listener, naming the address when it cannot.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::ranged;

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut cfg = super::DaemonConfig::new(
            "postgres://app:db-secret@db/credits_ledger",
            "amqp://guest:mq-secret@mq:5672/%2f",
            "credits-ledger",
        );
        cfg.auth_token = Some(super::Secret::new("token-secret"));
        let shown = format!("{cfg:?}");
        for secret in ["db-secret", "mq-secret", "token-secret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn without_auth_only_loopback_addresses_may_listen_r28() {
        use super::require_auth_off_loopback as check;
        let lo: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let lo6: std::net::SocketAddr = "[::1]:1".parse().unwrap();
        let any: std::net::SocketAddr = "0.0.0.0:9151".parse().unwrap();
        let lan: std::net::SocketAddr = "10.0.0.5:50051".parse().unwrap();
        assert!(check(false, &[("LEDGER_LISTEN_ADDR", lo), ("METRICS_ADDR", lo6)]).is_ok());
        let e = check(false, &[("LEDGER_LISTEN_ADDR", lo), ("METRICS_ADDR", any)]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("METRICS_ADDR=0.0.0.0:9151 is not a loopback"),
            "{e}"
        );
        let e = check(false, &[("LEDGER_LISTEN_ADDR", lan)]).unwrap_err();
        assert!(
            e.to_string().contains("LEDGER_LISTEN_ADDR=10.0.0.5:50051"),
            "{e}"
        );
        assert!(check(true, &[("LEDGER_LISTEN_ADDR", any), ("METRICS_ADDR", lan)]).is_ok());
        assert_eq!(
            super::listen_setting("credits-ledger"),
            "LEDGER_LISTEN_ADDR"
        );
    }

    #[test]
    fn zero_or_absurd_settings_are_refused() {
        assert_eq!(ranged::<1, 64>("4"), Ok(4));
        assert!(ranged::<1, 64>("0").unwrap_err().contains("1 to 64"));
        assert!(ranged::<1, 64>("65").is_err());
        assert!(ranged::<1, 64>("-1").is_err());
        assert!(ranged::<1, 64>("lots").is_err());
    }
}

/// A string setting whose `Debug` output hides what it must (each type says how), with
/// `new` and `expose`.
macro_rules! masked_string {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Self {
                $name(s.into())
            }

            /// The value itself, for the one place that needs it.
            pub fn expose(&self) -> &str {
                &self.0
            }
        }
    };
}

masked_string!(
    /// A secret setting (a bearer token): kept out of `Debug` output and logs.
    Secret
);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// A token setting: none when unset or empty.
    pub fn setting(token: Option<&str>) -> Option<Secret> {
        token.filter(|t| !t.is_empty()).map(Secret::new)
    }
}

masked_string!(
    /// A database URL: its password never shows in `Debug` output.
    DatabaseUrl
);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({})", crate::db::redact_url(&self.0))
    }
}

/// Default pool size of every daemon (`DB_MAX_CONNECTIONS`).
pub const DEFAULT_DB_MAX_CONNECTIONS: u32 = 32;
/// How often an outbox relay looks for events when no notification arrives.
pub const DEFAULT_RELAY_POLL: Duration = Duration::from_millis(500);

/// What every daemon is configured with, once: its database, the broker, the exchange,
/// who may call it, its pool, and its outbox relay. Each daemon's `Config` holds one.
#[derive(Clone)]
pub struct DaemonConfig {
    pub database_url: DatabaseUrl,
    pub amqp_url: String,
    pub exchange: String,
    /// The all-powerful token (`CREDITS_AUTH_TOKEN`); daemons send it to each other.
    pub auth_token: Option<Secret>,
    /// Tokens limited to roles (`CREDITS_AUTH_TOKENS_FILE`).
    pub auth_tokens_file: Option<std::path::PathBuf>,
    pub db_max_connections: u32,
    pub relay_poll: Duration,
    /// Unroutable events are retried this long, then parked (see `outbox`).
    pub outbox_park_after: Duration,
    /// Name of the AMQP connection, as shown by `rabbitmqctl list_connections`.
    pub amqp_connection_name: String,
    /// TLS of the gRPC server and of the clients to peers (off by default).
    pub tls: crate::tls::Tls,
    /// R28: the longest a call's handler may run (`GRPC_CALL_TIMEOUT_SECS`).
    pub call_timeout: Duration,
}

/// Passwords stay out of logs: the database URL and the token mask themselves, and the
/// broker URL is printed redacted.
impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("database_url", &self.database_url)
            .field("amqp_url", &crate::db::redact_url(&self.amqp_url))
            .field("exchange", &self.exchange)
            .field("auth_token", &self.auth_token)
            .field("auth_tokens_file", &self.auth_tokens_file)
            .field("db_max_connections", &self.db_max_connections)
            .field("relay_poll", &self.relay_poll)
            .field("outbox_park_after", &self.outbox_park_after)
            .field("amqp_connection_name", &self.amqp_connection_name)
            .field("tls", &self.tls)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

impl DaemonConfig {
    pub fn new(database_url: &str, amqp_url: &str, connection_name: &str) -> Self {
        Self {
            database_url: DatabaseUrl::new(database_url),
            amqp_url: amqp_url.to_owned(),
            exchange: DEFAULT_EXCHANGE.to_owned(),
            auth_token: None,
            auth_tokens_file: None,
            db_max_connections: DEFAULT_DB_MAX_CONNECTIONS,
            relay_poll: DEFAULT_RELAY_POLL,
            outbox_park_after: Duration::from_secs(DEFAULT_OUTBOX_PARK_AFTER_SECS),
            amqp_connection_name: connection_name.to_owned(),
            tls: crate::tls::Tls::default(),
            call_timeout: crate::grpc::CALL_TIMEOUT,
        }
    }

    /// Takes the shared settings from a binary's flags and environment.
    pub fn apply(&mut self, common: &CommonArgs) {
        self.amqp_url = common.amqp_url.clone();
        self.exchange = common.exchange.clone();
        self.auth_token = Secret::setting(common.auth_token.as_deref());
        self.auth_tokens_file = common.auth_tokens_file.clone();
        self.db_max_connections = common.db_max_connections as u32;
        self.outbox_park_after = Duration::from_secs(common.outbox_park_after_secs);
        self.tls = crate::tls::Tls::from(&common.tls);
        self.call_timeout = Duration::from_secs(common.grpc_call_timeout_secs);
    }

    /// The daemon's router for `service`: its token policy and TLS, health and reflection.
    pub async fn router<S: crate::grpc::GrpcService>(
        &self,
        descriptor_set: &'static [u8],
        service: S,
    ) -> anyhow::Result<crate::grpc::AuthRouter> {
        crate::grpc::service_router(
            descriptor_set,
            self.policy()?,
            &self.tls,
            service,
            self.call_timeout,
        )
        .await
    }

    /// A lazy channel to a peer daemon, with this daemon's token and TLS settings.
    pub fn peer_channel(&self, url: &str) -> anyhow::Result<crate::grpc::AuthChannel> {
        crate::grpc::lazy_channel_with(url, self.peer_token(), &self.tls)
    }

    /// The token table for this daemon's servers.
    pub fn policy(&self) -> anyhow::Result<crate::auth::Policy> {
        crate::auth::Policy::load(
            self.auth_token.as_ref().map(Secret::expose),
            self.auth_tokens_file.as_deref(),
        )
    }

    /// The token this daemon sends to its peers.
    pub fn peer_token(&self) -> Option<&str> {
        self.auth_token.as_ref().map(Secret::expose)
    }

    /// Connects to the daemon's database (created if missing, retried while down) and runs
    /// its migrations (retried on a blip).
    pub async fn connect_database(
        &self,
        migrator: &sqlx::migrate::Migrator,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<sqlx::PgPool> {
        let pool = crate::db::connect(
            self.database_url.expose(),
            self.db_max_connections,
            shutdown,
        )
        .await?;
        crate::db::migrate(migrator, &pool, shutdown).await?;
        Ok(pool)
    }

    /// The outbox relay's settings, under a connection name with `suffix`.
    pub fn relay(&self, suffix: &str) -> crate::outbox::RelayConfig {
        crate::outbox::RelayConfig {
            amqp_url: self.amqp_url.clone(),
            exchange: self.exchange.clone(),
            connection_name: format!("{}{suffix}", self.amqp_connection_name),
            poll_interval: self.relay_poll,
            park_after: self.outbox_park_after,
        }
    }
}

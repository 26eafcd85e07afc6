//! Configuration pieces shared by the daemons: each binary flattens [`CommonArgs`] into its
//! own clap struct, so every setting is both a flag and an environment variable.

use std::net::SocketAddr;

use crate::telemetry::LogFormat;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_EXCHANGE: &str = "credits.events";
pub const DEFAULT_OUTBOX_PARK_AFTER_SECS: u64 = 600;

#[derive(Clone, Debug, clap::Args)]
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
    /// Seconds an event that no queue receives is retried before it is parked in
    /// `<exchange>.unrouted`.
    #[arg(long, env = "OUTBOX_PARK_AFTER_SECS", default_value_t = DEFAULT_OUTBOX_PARK_AFTER_SECS, value_parser = ranged::<1, 604_800>)]
    pub outbox_park_after_secs: u64,
    /// Address of the Prometheus metrics endpoint (`/metrics`); "off" disables it.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,
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

/// Installs the global Prometheus recorder with its HTTP listener (`GET /metrics`).
pub fn install_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
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
) -> anyhow::Result<tokio_util::sync::CancellationToken> {
    crate::telemetry::init(common.log_format, "info");
    if let Some(addr) = common.metrics_addr_or(default_metrics.parse()?)? {
        install_metrics(addr)?;
    }
    Ok(crate::shutdown::on_signal())
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
    fn zero_or_absurd_settings_are_refused() {
        assert_eq!(ranged::<1, 64>("4"), Ok(4));
        assert!(ranged::<1, 64>("0").unwrap_err().contains("1 to 64"));
        assert!(ranged::<1, 64>("65").is_err());
        assert!(ranged::<1, 64>("-1").is_err());
        assert!(ranged::<1, 64>("lots").is_err());
    }
}

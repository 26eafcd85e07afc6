//! `credits-ledger`: clap/env → config → telemetry → `App::build(cfg).run(listener, shutdown)`.

use std::net::SocketAddr;

use clap::Parser;
use credits_common::config::{CommonArgs, ranged};
use credits_ledger::Config;

#[derive(Parser)]
#[command(version, about = "The credits ledger daemon")]
struct Args {
    /// PostgreSQL URL of the ledger's own database (created if missing).
    #[arg(long, env = "DATABASE_URL", default_value = credits_ledger::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// gRPC listen address.
    #[arg(long, env = "LEDGER_LISTEN_ADDR", default_value = credits_ledger::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Group commit: concurrent batch posters.
    #[arg(long, env = "GROUP_COMMIT_WORKERS", default_value_t = 4, value_parser = ranged::<1, 64>)]
    group_commit_workers: u64,
    /// Group commit: most postings one commit carries.
    #[arg(long, env = "GROUP_COMMIT_MAX", default_value_t = 128, value_parser = ranged::<1, 1000>)]
    group_commit_max: u64,
    /// Group commit: batches posted at once before the next one waits (at most 5 ms) to
    /// gather more postings.
    #[arg(long, env = "GROUP_COMMIT_PARALLEL", default_value_t = credits_ledger::coalesce::DEFAULT_PARALLEL as u64, value_parser = ranged::<1, 64>)]
    group_commit_parallel: u64,
    /// R28: the most usage items one `StreamUsage` call carries before the server ends it
    /// (the client sends the rest on a new stream).
    #[arg(long, env = "STREAM_USAGE_MAX_ITEMS", default_value_t = credits_ledger::grpc::STREAM_MAX_ITEMS, value_parser = ranged::<1, 100_000_000>)]
    stream_usage_max_items: u64,
    /// R28: the longest one `StreamUsage` call stays open, in seconds.
    #[arg(long, env = "STREAM_USAGE_MAX_SECS", default_value_t = credits_ledger::grpc::STREAM_MAX_SECS, value_parser = ranged::<1, 86_400>)]
    stream_usage_max_secs: u64,
    /// R29: purchased credits (purchases and top-ups) expire this many days after they were
    /// bought; unset (the default): never.
    #[arg(long, env = "PURCHASED_CREDITS_EXPIRE_DAYS", value_parser = ranged::<1, 36_500>)]
    purchased_credits_expire_days: Option<u64>,
    /// R31: how often each replica reads the access feed (what committed on any replica),
    /// in milliseconds: the bound on how stale `CheckAccess` and `WatchAccess` are.
    #[arg(long, env = "ACCESS_FEED_POLL_MS", default_value_t = credits_ledger::watch::DEFAULT_POLL_MS, value_parser = ranged::<1, 1000>)]
    access_feed_poll_ms: u64,
    /// R31: how long the access feed keeps changes, in seconds: a `WatchAccess` client
    /// away for longer resumes from a snapshot.
    #[arg(long, env = "ACCESS_FEED_RETENTION_SECS", default_value_t = credits_ledger::watch::DEFAULT_RETENTION_SECS, value_parser = ranged::<10, 86_400>)]
    access_feed_retention_secs: u64,
    /// R31: the most `WatchAccess` streams one replica serves at once.
    #[arg(long, env = "WATCH_ACCESS_MAX_STREAMS", default_value_t = credits_ledger::watch::DEFAULT_MAX_STREAMS as u64, value_parser = ranged::<1, 100_000>)]
    watch_access_max_streams: u64,
    /// R28/R31: the longest one `WatchAccess` stream stays open, in seconds (the client
    /// resumes on a new one).
    #[arg(long, env = "WATCH_ACCESS_MAX_SECS", default_value_t = credits_ledger::watch::DEFAULT_WATCH_MAX_SECS, value_parser = ranged::<1, 86_400>)]
    watch_access_max_secs: u64,
    /// The most accounts one replica's `CheckAccess` view holds in memory.
    #[arg(long, env = "ACCESS_VIEW_MAX_ACCOUNTS", default_value_t = credits_ledger::access::DEFAULT_MAX_ACCOUNTS as u64, value_parser = ranged::<0, 100_000_000>)]
    access_view_max_accounts: u64,
    #[command(flatten)]
    common: CommonArgs,
}

impl Args {
    /// The daemon's configuration from its flags and environment.
    fn config(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::new(&self.database_url, &self.common.amqp_url);
        cfg.daemon.apply(&self.common);
        cfg.group_commit = credits_ledger::coalesce::Batching {
            workers: self.group_commit_workers as usize,
            max_batch: self.group_commit_max as usize,
            parallel: self.group_commit_parallel as usize,
        };
        cfg.stream_limits = credits_ledger::grpc::StreamLimits {
            max_items: self.stream_usage_max_items as usize,
            max_lifetime: std::time::Duration::from_secs(self.stream_usage_max_secs),
        };
        cfg.purchased_credits_expire_days = self.purchased_credits_expire_days;
        cfg.feed = credits_ledger::watch::FeedConfig {
            poll_every: std::time::Duration::from_millis(self.access_feed_poll_ms),
            retention: std::time::Duration::from_secs(self.access_feed_retention_secs),
            max_streams: self.watch_access_max_streams as usize,
            max_lifetime: std::time::Duration::from_secs(self.watch_access_max_secs),
            ..credits_ledger::watch::FeedConfig::default()
        };
        cfg.access_view_max_accounts = self.access_view_max_accounts as usize;
        Ok(cfg)
    }
}

credits_common::daemon_main!(credits_ledger);

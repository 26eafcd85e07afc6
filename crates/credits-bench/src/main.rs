//! `credits-bench`: drives a running credits system over gRPC and reports throughput,
//! latency percentiles, errors and each daemon's resident memory, next to a pgbench
//! baseline doing the same SQL work as one usage debit on the same PostgreSQL.
//!
//! A benchmark, not a test: it asserts nothing about time. `scripts/bench` starts the
//! system, runs every scenario and writes `docs/benchmarks.md`.

#![allow(clippy::print_stdout)] // the report is this tool's output

mod cost;
mod gateway;
mod load;
mod pgbench;
mod report;
mod scenarios;

use std::time::Duration;

use clap::Parser;

#[derive(Parser, Clone)]
#[command(name = "credits-bench", about = "Benchmark a running credits system")]
pub struct Args {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub ledger: String,
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    pub payments: String,
    #[arg(long, default_value = "http://127.0.0.1:50053")]
    pub recharge: String,
    #[arg(long, env = "CREDITS_AUTH_TOKEN")]
    pub token: Option<String>,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds each timed scenario runs.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Funded accounts for usage-spread.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: usize,
    /// Accounts with auto-recharge for recharge-latency.
    #[arg(long, default_value_t = 500)]
    pub recharge_accounts: usize,
    /// Items per RecordUsageBatch.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Scenarios to run (comma-separated), or "all". `recharge-open-<rate>` takes any
    /// rate (crossings per second); "all" runs 10, 50 and 100.
    #[arg(long, default_value = "all")]
    pub scenarios: String,
    /// PostgreSQL server (no database) for the pgbench baseline.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub pg_url: String,
    /// Daemon pids for resident memory, as name=pid (repeatable).
    #[arg(long = "pid")]
    pub pids: Vec<String>,
    /// Write the JSON results here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Write a Markdown report here (machine, commands, table).
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    /// The ledger's own database (cache-1m writes a million accounts into it).
    #[arg(long)]
    pub ledger_database_url: Option<String>,
    /// Count what each recharge-open top-up costs: transactions per daemon database and,
    /// with `--metrics`, RPCs per method (waits for PostgreSQL's counters to settle).
    #[arg(long)]
    pub count_costs: bool,
    /// A daemon's metrics address for `--count-costs`, as name=host:port (repeatable).
    #[arg(long = "metrics")]
    pub metrics: Vec<String>,
    /// A label for this run in the report ("before", "after", …).
    #[arg(long, default_value = "")]
    pub label: String,
}

impl Args {
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration)
    }

    pub fn wants(&self, name: &str) -> bool {
        self.scenarios == "all" || self.scenarios.split(',').any(|s| s.trim() == name)
    }
}

/// A load generator on the same two cores should not spend them in glibc's malloc. (The
/// daemons keep the system allocator: mimalloc cost them 20-40 MiB, docs/benchmarks.md.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let results = scenarios::run_all(&args).await?;
    let json = report::to_json(&args, &results);
    report::print_table(&results);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    if let Some(path) = &args.report {
        std::fs::write(path, report::markdown(&args, &results).await?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

//! `credits`: run the whole system locally (`credits up`), operate it over gRPC, or watch
//! the demo story. Thin over the daemon libraries and the typed client (`credits-client`).

mod demo;
mod ops;
mod output;
mod up;

use clap::{Parser, Subcommand};
use credits_client::{ClientError, Code};

#[derive(Parser)]
#[command(
    name = "credits",
    version,
    about = "Prepaid credits: run the daemons, operate accounts, payments and auto-recharge"
)]
struct Cli {
    #[command(flatten)]
    conn: ops::Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run ledger, payments, recharge and the billing portal in one process on their
    /// default ports.
    Up(Box<up::UpArgs>),
    /// Accounts: create, show, entries.
    #[command(subcommand, alias = "account")]
    Accounts(ops::AccountCmd),
    /// Usage: record, summary (R30).
    #[command(subcommand)]
    Usage(ops::UsageCmd),
    /// Grants (R29): add, list.
    #[command(subcommand, alias = "grant")]
    Grants(ops::GrantCmd),
    /// Balance alerts (R18): set, show.
    #[command(subcommand, alias = "alert")]
    Alerts(ops::AlertCmd),
    /// Holds (R15): create, capture, release, show, list.
    #[command(subcommand, alias = "hold")]
    Holds(ops::HoldCmd),
    /// Buy credits with the default (or a named) payment method.
    Purchase {
        account_id: String,
        amount: String,
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        key: Option<String>,
    },
    /// R27: refund unused credits of a purchase or top-up (the credits are debited first).
    Refund {
        account_id: String,
        charge_id: String,
        amount: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Idempotency key (a new one when omitted; give one to retry safely).
        #[arg(long)]
        key: Option<String>,
    },
    /// Payment methods: add-card, add-bank, list, default, remove.
    #[command(subcommand, alias = "method")]
    Methods(ops::MethodCmd),
    /// Auto-recharge: show, set, off, attempts.
    #[command(subcommand)]
    Recharge(ops::RechargeCmd),
    /// Charges of an account, newest first.
    Charges {
        account_id: String,
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
    /// The recharge dead-letter queue: list, replay.
    #[command(subcommand)]
    Dlq(ops::DlqCmd),
    /// Print a billing-page URL for an account's customer (a portal session, R20).
    PortalSession {
        account_id: String,
        /// How long the link works, in seconds (default 3600, at most 86400).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// End every billing-page session of an account and void its unused links (R28).
    PortalRevoke { account_id: String },
    /// Walk the product's story against a running system.
    Demo {
        /// Account id to use (a fresh demo-… id by default).
        #[arg(long)]
        account: Option<String>,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(()) => 0,
        Err(Failure::Rpc(e)) => {
            eprintln!("error: {}: {}", code_name(e.code()), e.message());
            ops::exit_code(e.code())
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

enum Failure {
    Rpc(ClientError),
    Other(anyhow::Error),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Rpc(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

fn code_name(c: Code) -> String {
    // "InvalidArgument" → "INVALID_ARGUMENT", as gRPC documents them.
    let s = format!("{c:?}");
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Cmd::Up(args) = cli.cmd {
        return Ok(up::run(*args).await?);
    }
    let out = output::Out {
        json: cli.conn.json,
    };
    let c = cli.conn.client()?;
    match cli.cmd {
        Cmd::Up(_) => Ok(()),
        Cmd::Accounts(cmd) => Ok(ops::accounts(&c, &out, cmd).await?),
        Cmd::Usage(cmd) => Ok(ops::usage(&c, &out, cmd).await?),
        Cmd::Grants(cmd) => Ok(ops::grants(&c, &out, cmd).await?),
        Cmd::Holds(cmd) => Ok(ops::holds(&c, &out, cmd).await?),
        Cmd::Alerts(cmd) => Ok(ops::alerts(&c, &out, cmd).await?),
        Cmd::Purchase {
            account_id,
            amount,
            method,
            key,
        } => Ok(ops::purchase(&c, &out, account_id, amount, method, key).await?),
        Cmd::Refund {
            account_id,
            charge_id,
            amount,
            reason,
            key,
        } => Ok(ops::refund(&c, &out, account_id, charge_id, amount, reason, key).await?),
        Cmd::Methods(cmd) => Ok(ops::methods(&c, &out, cmd).await?),
        Cmd::Recharge(cmd) => Ok(ops::recharge(&c, &out, cmd).await?),
        Cmd::Charges { account_id, limit } => Ok(ops::charges(&c, &out, account_id, limit).await?),
        Cmd::Dlq(cmd) => Ok(ops::dlq(&out, cmd).await?),
        Cmd::PortalSession { account_id, ttl } => {
            Ok(ops::portal_session(&cli.conn, &out, account_id, ttl).await?)
        }
        Cmd::PortalRevoke { account_id } => {
            Ok(ops::portal_revoke(&cli.conn, &out, account_id).await?)
        }
        Cmd::Demo { account } => Ok(demo::run(&c, account).await?),
    }
}

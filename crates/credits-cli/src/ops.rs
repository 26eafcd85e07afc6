//! Operator subcommands: thin calls through the typed client with readable output and
//! exit codes scripts can trust (see [`exit_code`]).
//!
//! Inputs (account ids, amounts, keys, page sizes) are parsed with the same validators and
//! field names the services use, so a bad one reads exactly as the server would put it.

use clap::Subcommand;
use credits_client::{
    AccountId, AutoRechargeChange, BankAccountDetails, BillingMode, CardDetails, Client,
    ClientConfig, ClientError, Code, CreditsToGrant, Granularity, HoldRequest, IdempotencyKey,
    Money, NewPaymentMethod, RetryPolicy, UsageCategory, UsageRecord,
};

use crate::output::{self, Out};

#[derive(clap::Args, Clone)]
pub struct Conn {
    #[arg(
        long,
        global = true,
        env = "CREDITS_LEDGER_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub ledger: String,
    #[arg(
        long,
        global = true,
        env = "CREDITS_PAYMENTS_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub payments: String,
    #[arg(
        long,
        global = true,
        env = "CREDITS_RECHARGE_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub recharge: String,
    #[arg(
        long,
        global = true,
        env = "CREDITS_PORTAL_URL",
        default_value = credits_client::DEFAULT_PORTAL_URL
    )]
    pub portal: String,
    #[arg(
        long,
        global = true,
        env = "CREDITS_AUTH_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Conn {
    /// A client of the three services. Every call is sent once, as the CLI always did:
    /// an operator sees the first failure and decides whether to run the command again.
    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(ClientConfig {
            ledger_url: self.ledger.clone(),
            payments_url: self.payments.clone(),
            recharge_url: self.recharge.clone(),
            token: self.token.clone(),
            timeout: credits_client::DEFAULT_TIMEOUT,
            retry: RetryPolicy::none(),
        })?)
    }
}

/// `credits dlq list|replay`: the recharge dead-letter queue (docs/operations.md).
#[derive(Subcommand)]
pub enum DlqCmd {
    /// Show what is in the dead-letter queue (nothing is taken).
    List {
        #[command(flatten)]
        at: DlqAt,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Move dead-lettered events back into the work queue (all, or one by its id).
    Replay {
        #[command(flatten)]
        at: DlqAt,
        /// Only the event with this message id.
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(clap::Args)]
pub struct DlqAt {
    #[arg(long, env = "AMQP_URL", default_value = credits_common::config::DEFAULT_AMQP_URL)]
    pub amqp_url: String,
    /// The recharge work queue; its dead letters are in `<queue>.dlq`.
    #[arg(long, env = "RECHARGE_QUEUE", default_value = credits_recharge::DEFAULT_QUEUE)]
    pub queue: String,
}

pub async fn dlq(out: &Out, cmd: DlqCmd) -> anyhow::Result<()> {
    match cmd {
        DlqCmd::List { at, limit } => {
            let rows: Vec<serde_json::Value> = credits_recharge::dlq::list(
                &at.amqp_url,
                &at.queue,
                limit,
            )
            .await?
            .into_iter()
            .map(|d| {
                serde_json::json!({
                    "message_id": d.message_id,
                    "type": d.event_type,
                    "reason": d.reason,
                    "count": d.count,
                    "body": String::from_utf8_lossy(&d.body).chars().take(200).collect::<String>(),
                })
            })
            .collect();
            out.list(&rows, &["message_id", "type", "reason", "count", "body"]);
        }
        DlqCmd::Replay { at, id } => {
            let n = credits_recharge::dlq::replay(&at.amqp_url, &at.queue, id.as_deref()).await?;
            if out.json {
                out.one(&serde_json::json!({ "replayed": n }));
            } else {
                out.say(&format!("replayed {n} event(s) into {}", at.queue));
            }
        }
    }
    Ok(())
}

fn portal_client(conn: &Conn) -> Result<credits_client::Portal, ClientError> {
    credits_client::Portal::connect(
        &conn.portal,
        conn.token.as_deref(),
        credits_client::DEFAULT_TIMEOUT,
    )
    .map_err(|e| ClientError::InvalidArgument {
        message: format!("--portal: {e}"),
    })
}

/// `credits portal-revoke`: ends the account's billing-page sessions (R28).
pub async fn portal_revoke(conn: &Conn, out: &Out, account: String) -> Result<(), ClientError> {
    let n = portal_client(conn)?
        .revoke_portal_sessions(&account_id(&account)?)
        .await?;
    if out.json {
        out.one(&serde_json::json!({ "account_id": account, "revoked": n }));
    } else {
        out.say(&format!(
            "{n} billing-page session(s) of {account} ended; its unused links no longer work"
        ));
    }
    Ok(())
}

/// `credits portal-session`: a billing-page URL for the account's customer (R20).
pub async fn portal_session(
    conn: &Conn,
    out: &Out,
    account: String,
    ttl_secs: Option<u64>,
) -> Result<(), ClientError> {
    let s = portal_client(conn)?
        .create_portal_session(
            &account_id(&account)?,
            ttl_secs.map(std::time::Duration::from_secs),
        )
        .await?;
    if out.json {
        out.one(&serde_json::json!({
            "url": s.url,
            "expires_at": s.expires_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        }));
    } else {
        // The URL alone on stdout, so `open "$(credits portal-session acme)"` works.
        out.say(&s.url);
    }
    Ok(())
}

fn new_key() -> String {
    format!("cli-{}", uuid::Uuid::new_v4())
}

fn account_id(s: &str) -> Result<AccountId, ClientError> {
    Ok(AccountId::parse(s)?)
}

/// The given idempotency key, or a fresh one.
fn key(k: Option<String>) -> Result<IdempotencyKey, ClientError> {
    Ok(IdempotencyKey::parse(&k.unwrap_or_else(new_key))?)
}

/// `--limit`, refused when negative as the server's paging would refuse it.
fn page_size(limit: i32) -> Result<u32, ClientError> {
    credits_common::ids::paging::page_size(limit)?;
    Ok(u32::try_from(limit).unwrap_or_default())
}

#[derive(Subcommand)]
pub enum AccountCmd {
    /// Create an account (prepaid unless --contract).
    Create {
        account_id: String,
        #[arg(long)]
        contract: bool,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Balance, access and threshold of an account.
    Show { account_id: String },
    /// Journal entries, newest first.
    Entries {
        account_id: String,
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
    /// The whole journal of an account as CSV on stdout, newest first (the billing page's
    /// download): signed amounts, text quoted and never a spreadsheet formula.
    Export { account_id: String },
}

#[derive(Subcommand)]
pub enum GrantCmd {
    /// Grant promotional or contractual credits (R29): drawn before purchased credits,
    /// earliest expiry first. A grant does not end PENDING_FIRST_PURCHASE (R3).
    Add {
        account_id: String,
        amount: String,
        /// What the customer sees beside the grant (required).
        #[arg(long)]
        reason: String,
        /// When what is left expires (RFC 3339, e.g. 2027-01-31T00:00:00Z).
        #[arg(long, conflicts_with = "expires_in_days")]
        expires: Option<String>,
        /// Expires at the start (00:00 UTC) of the day this many days from today: the
        /// same instant all day, so a retry with the same --key is the same grant.
        #[arg(long)]
        expires_in_days: Option<u32>,
        /// Lower is drawn first among grants that expire together (0 ..= 1000000).
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Idempotency key (a fresh one when omitted; give one to retry safely).
        #[arg(long)]
        key: Option<String>,
    },
    /// The grants that still hold credits, in the order usage draws them, and purchased
    /// credits that will expire.
    List { account_id: String },
}

#[derive(Subcommand)]
pub enum UsageCmd {
    /// Usage per day (or hour) and category, from the ledger's rollups (R30).
    Summary {
        account_id: String,
        /// How many periods back from now (default 30 days, or 24 hours with --hourly).
        #[arg(long)]
        last: Option<u32>,
        /// By the hour instead of by the day (UTC days).
        #[arg(long)]
        hourly: bool,
        /// CSV on stdout instead of a table.
        #[arg(long)]
        csv: bool,
    },
    /// Record usage that was served.
    Record {
        account_id: String,
        amount: String,
        #[arg(long, value_parser = ["API_REQUESTS", "DEDICATED_ENDPOINTS", "FINE_TUNING", "EVALUATIONS", "OTHER"], default_value = "API_REQUESTS")]
        category: String,
        /// Idempotency key (a fresh one when omitted).
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
}

#[derive(Subcommand)]
pub enum AlertCmd {
    /// Replace the balance alerts (R18): up to 5 thresholds on the available balance;
    /// none clears them.
    Set {
        account_id: String,
        thresholds: Vec<String>,
    },
    Show {
        account_id: String,
    },
}

#[derive(Subcommand)]
pub enum HoldCmd {
    /// Reserve part of the available balance for work priced when it ends (R15).
    Create {
        account_id: String,
        amount: String,
        #[arg(long, value_parser = ["API_REQUESTS", "DEDICATED_ENDPOINTS", "FINE_TUNING", "EVALUATIONS", "OTHER"], default_value = "FINE_TUNING")]
        category: String,
        /// Seconds until the ledger expires it (default 3600, at most 604800).
        #[arg(long)]
        ttl: Option<u32>,
        /// Idempotency key (a fresh one when omitted).
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// End a hold with one usage entry of the final cost.
    Capture {
        account_id: String,
        hold_id: String,
        amount: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// End a hold with no entry.
    Release {
        account_id: String,
        hold_id: String,
    },
    Show {
        account_id: String,
        hold_id: String,
    },
    /// Holds, newest first.
    List {
        account_id: String,
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
}

#[derive(Subcommand)]
pub enum MethodCmd {
    /// Add a card (tokenised by the processor; the number is never stored).
    AddCard {
        account_id: String,
        number: String,
        exp_month: u32,
        exp_year: u32,
        cvc: String,
        #[arg(long)]
        default: bool,
    },
    /// Add a US bank account (ACH).
    AddBank {
        account_id: String,
        routing_number: String,
        account_number: String,
        holder_name: String,
        #[arg(long)]
        default: bool,
    },
    List {
        account_id: String,
    },
    /// Make a method the default.
    Default {
        account_id: String,
        payment_method_id: String,
    },
    Remove {
        account_id: String,
        payment_method_id: String,
    },
}

#[derive(Subcommand)]
pub enum RechargeCmd {
    Show {
        account_id: String,
    },
    /// Turn auto-recharge on: below THRESHOLD, bring the balance up to TARGET.
    Set {
        account_id: String,
        #[arg(long)]
        threshold: String,
        #[arg(long)]
        target: String,
        /// R19: the most auto-recharge may charge per calendar month (UTC).
        #[arg(long)]
        monthly_limit: Option<String>,
    },
    Off {
        account_id: String,
    },
    Attempts {
        account_id: String,
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
}

pub async fn accounts(c: &Client, out: &Out, cmd: AccountCmd) -> Result<(), ClientError> {
    match cmd {
        AccountCmd::Create {
            account_id: id,
            contract,
            name,
        } => {
            let mode = if contract {
                BillingMode::Contract
            } else {
                BillingMode::Prepaid
            };
            let a = c
                .ledger()
                .create_account(&account_id(&id)?, mode, &name)
                .await?;
            out.one(&output::account(&a));
        }
        AccountCmd::Show { account_id: id } => {
            let a = c.ledger().get_account(&account_id(&id)?).await?;
            out.one(&output::account(&a));
        }
        AccountCmd::Entries {
            account_id: id,
            limit,
        } => {
            let id = account_id(&id)?;
            let page = c
                .ledger()
                .list_entries(&id, page_size(limit)?, None)
                .await?;
            out.table(
                &page.items,
                output::entry,
                "created_at kind category_or_source amount balance_after reference",
            );
        }
        AccountCmd::Export { account_id: id } => {
            let id = account_id(&id)?;
            let mut token: Option<String> = None;
            out.print_line(credits_client::csv::ENTRIES_HEADER);
            loop {
                let page = c.ledger().list_entries(&id, 500, token.as_deref()).await?;
                for e in &page.items {
                    out.print_line(&credits_client::csv::entry_row(e));
                }
                match page.next_page_token {
                    Some(t) => token = Some(t),
                    None => break,
                }
            }
        }
    }
    Ok(())
}

/// `--expires` as RFC 3339, or `--expires-in-days` from now.
fn grant_expiry(
    expires: Option<String>,
    in_days: Option<u32>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ClientError> {
    if let Some(days) = in_days {
        if days == 0 {
            return Err(ClientError::InvalidArgument {
                message: "expires_in_days: must be at least 1".into(),
            });
        }
        let day = chrono::Utc::now().date_naive() + chrono::Duration::days(days.into());
        return Ok(day.and_hms_opt(0, 0, 0).map(|t| t.and_utc()));
    }
    expires
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(&s)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|e| ClientError::InvalidArgument {
                    message: format!(
                        "expires_at: not an RFC 3339 time (e.g. 2027-01-31T00:00:00Z): {e}"
                    ),
                })
        })
        .transpose()
}

pub async fn grants(c: &Client, out: &Out, cmd: GrantCmd) -> Result<(), ClientError> {
    match cmd {
        GrantCmd::Add {
            account_id: id,
            amount,
            reason,
            expires,
            expires_in_days,
            priority,
            key: k,
        } => {
            let grant = CreditsToGrant {
                account_id: account_id(&id)?,
                amount: Money::parse_positive("amount", &amount)?,
                idempotency_key: key(k)?,
                reason,
                expires_at: grant_expiry(expires, expires_in_days)?,
                priority,
            };
            let r = c.ledger().grant_credits(&grant).await?;
            let mut v = output::entry(&r.entry);
            v["balance"] = r.balance.to_wire().into();
            out.one(&v);
        }
        GrantCmd::List { account_id: id } => {
            let a = c.ledger().get_account(&account_id(&id)?).await?;
            let lots: Vec<_> = a.grants.iter().chain(&a.expiring_purchases).collect();
            out.table(
                &lots,
                |g| output::grant(g),
                "grant_id source remaining amount expires_at priority reason",
            );
        }
    }
    Ok(())
}

pub async fn usage(c: &Client, out: &Out, cmd: UsageCmd) -> Result<(), ClientError> {
    let (id, amount, category, k, description) = match cmd {
        UsageCmd::Summary {
            account_id: id,
            last,
            hourly,
            csv,
        } => return usage_summary(c, out, &id, last, hourly, csv).await,
        UsageCmd::Record {
            account_id: id,
            amount,
            category,
            key: k,
            description,
        } => (id, amount, category, k, description),
    };
    // In the order the ledger checks them, so the first bad field is the one it would name.
    let account_id = account_id(&id)?;
    let category: UsageCategory = category.parse().map_err(|e| ClientError::InvalidArgument {
        message: format!("category: {e}"),
    })?;
    let amount = Money::parse_positive("amount", &amount)?;
    let r = c
        .ledger()
        .record_usage(&UsageRecord {
            account_id,
            category,
            amount,
            idempotency_key: key(k)?,
            description,
        })
        .await?;
    let mut v = output::entry(&r.entry);
    v["balance"] = r.balance.to_wire().into();
    v["allowed"] = r.allowed.into();
    out.one(&v);
    Ok(())
}

/// R30: the last `last` days (UTC) or hours up to now, by period and category.
async fn usage_summary(
    c: &Client,
    out: &Out,
    id: &str,
    last: Option<u32>,
    hourly: bool,
    csv: bool,
) -> Result<(), ClientError> {
    let id = account_id(id)?;
    let (granularity, step, default, max) = if hourly {
        (Granularity::Hour, chrono::Duration::hours(1), 24, 744)
    } else {
        (Granularity::Day, chrono::Duration::days(1), 30, 400)
    };
    let n = last.unwrap_or(default);
    if !(1..=max).contains(&n) {
        return Err(ClientError::InvalidArgument {
            message: format!("last: must be between 1 and {max}"),
        });
    }
    let now = chrono::Utc::now();
    // The end of the current period (an hour, or a UTC day), so it is included.
    let step_secs = step.num_seconds();
    let to = chrono::DateTime::from_timestamp((now.timestamp() / step_secs + 1) * step_secs, 0)
        .unwrap_or(now);
    let from = to - step * n as i32;
    let periods = c.ledger().usage_summary(&id, from, to, granularity).await?;
    if csv {
        out.print_line(credits_client::csv::PERIODS_HEADER);
        for p in &periods {
            out.print_line(&credits_client::csv::period_row(p));
        }
    } else {
        out.table(&periods, output::period, "start category amount count");
    }
    Ok(())
}

pub async fn alerts(c: &Client, out: &Out, cmd: AlertCmd) -> Result<(), ClientError> {
    let (id, stored) = match cmd {
        AlertCmd::Set {
            account_id: id,
            thresholds,
        } => {
            let account = account_id(&id)?;
            let parsed = thresholds
                .iter()
                .enumerate()
                .map(|(i, t)| Money::parse_non_negative(&format!("thresholds[{i}]"), t))
                .collect::<Result<Vec<_>, _>>()?;
            (id, c.ledger().set_balance_alerts(&account, &parsed).await?)
        }
        AlertCmd::Show { account_id: id } => {
            let a = c.ledger().get_account(&account_id(&id)?).await?;
            (id, a.alert_thresholds)
        }
    };
    let shown: Vec<String> = stored.iter().map(|t| t.to_wire()).collect();
    out.one(&serde_json::json!({ "account_id": id, "alert_thresholds": shown }));
    Ok(())
}

pub async fn holds(c: &Client, out: &Out, cmd: HoldCmd) -> Result<(), ClientError> {
    let l = c.ledger();
    match cmd {
        HoldCmd::Create {
            account_id: id,
            amount,
            category,
            ttl,
            key: k,
            description,
        } => {
            let account_id = account_id(&id)?;
            let amount = Money::parse_positive("amount", &amount)?;
            let category: UsageCategory =
                category.parse().map_err(|e| ClientError::InvalidArgument {
                    message: format!("category: {e}"),
                })?;
            let h = l
                .create_hold(&HoldRequest {
                    account_id,
                    amount,
                    category,
                    idempotency_key: key(k)?,
                    description,
                    ttl_seconds: ttl,
                })
                .await?;
            out.one(&output::hold(&h));
        }
        HoldCmd::Capture {
            account_id: id,
            hold_id,
            amount,
            description,
        } => {
            let id = account_id(&id)?;
            let amount = Money::parse_positive("amount", &amount)?;
            let r = l.capture_hold(&id, &hold_id, amount, &description).await?;
            let mut v = output::hold(&r.hold);
            v["entry_id"] = r.entry.entry_id.into();
            v["balance"] = r.balance.to_wire().into();
            v["available_balance"] = r.available_balance.to_wire().into();
            out.one(&v);
        }
        HoldCmd::Release {
            account_id: id,
            hold_id,
        } => out.one(&output::hold(
            &l.release_hold(&account_id(&id)?, &hold_id).await?,
        )),
        HoldCmd::Show {
            account_id: id,
            hold_id,
        } => out.one(&output::hold(
            &l.get_hold(&account_id(&id)?, &hold_id).await?,
        )),
        HoldCmd::List {
            account_id: id,
            limit,
        } => {
            let page = l
                .list_holds(&account_id(&id)?, page_size(limit)?, None)
                .await?;
            out.table(
                &page.items,
                output::hold,
                "created_at hold_id status amount captured_amount expires_at",
            );
        }
    }
    Ok(())
}

pub async fn purchase(
    c: &Client,
    out: &Out,
    id: String,
    amount: String,
    method: Option<String>,
    k: Option<String>,
) -> Result<(), ClientError> {
    let account = account_id(&id)?;
    let amount = Money::parse_positive("amount", &amount)?;
    let r = c
        .payments()
        .purchase_credits(&account, amount, method.as_deref(), &key(k)?)
        .await?;
    let mut v = output::charge(&r.charge);
    v["ledger_entry_id"] = r.entry.map(|e| e.entry_id).unwrap_or_default().into();
    v["balance"] = r.balance.map(|b| b.to_wire()).unwrap_or_default().into();
    out.one(&v);
    Ok(())
}

pub async fn refund(
    c: &Client,
    out: &Out,
    id: String,
    charge_id: String,
    amount: String,
    reason: String,
    k: Option<String>,
) -> Result<(), ClientError> {
    let account = account_id(&id)?;
    let amount = Money::parse_positive("amount", &amount)?;
    let r = c
        .payments()
        .refund_charge(&account, &charge_id, amount, &key(k)?, &reason)
        .await?;
    let status = match r.status {
        2 => "SUCCEEDED",
        3 => "FAILED",
        _ => "PENDING",
    };
    out.one(&serde_json::json!({
        "refund_id": r.refund_id,
        "charge_id": r.charge_id,
        "amount": r.amount,
        "status": status,
        "ledger_entry_id": r.ledger_entry_id,
        "failure_code": r.failure_code,
    }));
    Ok(())
}

pub async fn methods(c: &Client, out: &Out, cmd: MethodCmd) -> Result<(), ClientError> {
    let added = match cmd {
        MethodCmd::AddCard {
            account_id,
            number,
            exp_month,
            exp_year,
            cvc,
            default,
        } => Some((
            account_id,
            NewPaymentMethod::Card(CardDetails {
                number,
                exp_month,
                exp_year,
                cvc,
            }),
            default,
        )),
        MethodCmd::AddBank {
            account_id,
            routing_number,
            account_number,
            holder_name,
            default,
        } => Some((
            account_id,
            NewPaymentMethod::UsBankAccount(BankAccountDetails {
                routing_number,
                account_number,
                holder_name,
            }),
            default,
        )),
        MethodCmd::List { account_id: id } => {
            let methods = c.payments().list_payment_methods(&account_id(&id)?).await?;
            out.table(
                &methods,
                output::method,
                "payment_method_id type brand last4 expiry is_default",
            );
            None
        }
        MethodCmd::Default {
            account_id: id,
            payment_method_id,
        } => {
            let m = c
                .payments()
                .set_default_payment_method(&account_id(&id)?, &payment_method_id)
                .await?;
            out.one(&output::method(&m));
            None
        }
        MethodCmd::Remove {
            account_id: id,
            payment_method_id,
        } => {
            c.payments()
                .remove_payment_method(&account_id(&id)?, &payment_method_id)
                .await?;
            out.say(&format!("removed {payment_method_id}"));
            None
        }
    };
    if let Some((id, method, make_default)) = added {
        let m = c
            .payments()
            .add_payment_method(&account_id(&id)?, &method, make_default)
            .await?;
        out.one(&output::method(&m));
    }
    Ok(())
}

pub async fn recharge(c: &Client, out: &Out, cmd: RechargeCmd) -> Result<(), ClientError> {
    match cmd {
        RechargeCmd::Show { account_id: id } => {
            let a = c.recharge().get_auto_recharge(&account_id(&id)?).await?;
            out.one(&output::auto_recharge(&a));
        }
        RechargeCmd::Set {
            account_id: id,
            threshold,
            target,
            monthly_limit,
        } => {
            let account = account_id(&id)?;
            let change = AutoRechargeChange::Enable {
                threshold: Money::parse_non_negative("threshold", &threshold)?,
                target: Money::parse_non_negative("target", &target)?,
                monthly_limit: monthly_limit
                    .map(|l| Money::parse_positive("monthly_limit", &l))
                    .transpose()?,
            };
            let a = c.recharge().set_auto_recharge(&account, change).await?;
            out.one(&output::auto_recharge(&a));
        }
        RechargeCmd::Off { account_id: id } => {
            let a = c
                .recharge()
                .set_auto_recharge(&account_id(&id)?, AutoRechargeChange::Disable)
                .await?;
            out.one(&output::auto_recharge(&a));
        }
        RechargeCmd::Attempts {
            account_id: id,
            limit,
        } => {
            let id = account_id(&id)?;
            let page = c
                .recharge()
                .list_recharge_attempts(&id, page_size(limit)?, None)
                .await?;
            out.table(
                &page.items,
                output::attempt,
                "created_at status trigger balance_at_trigger amount charge_id failure_code",
            );
        }
    }
    Ok(())
}

pub async fn charges(c: &Client, out: &Out, id: String, limit: i32) -> Result<(), ClientError> {
    let id = account_id(&id)?;
    let page = c
        .payments()
        .list_charges(&id, page_size(limit)?, None)
        .await?;
    out.table(
        &page.items,
        output::charge,
        "created_at charge_id status amount failure_code description",
    );
    Ok(())
}

/// Exit codes: 0 success, 2 usage error (clap), 3 invalid argument, 4 not found,
/// 5 refused by a rule (failed precondition) or idempotency conflict (already exists),
/// 6 a service unavailable, 7 unauthenticated, 1 anything else.
pub fn exit_code(code: Code) -> i32 {
    match code {
        Code::InvalidArgument | Code::OutOfRange => 3,
        Code::NotFound => 4,
        Code::FailedPrecondition | Code::AlreadyExists => 5,
        Code::Unavailable | Code::DeadlineExceeded => 6,
        Code::Unauthenticated | Code::PermissionDenied => 7,
        _ => 1,
    }
}

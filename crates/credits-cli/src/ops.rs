//! Operator subcommands: thin gRPC calls with readable output and exit codes scripts can
//! trust (see [`exit_code`]).

use clap::Subcommand;
use credits_common::grpc::{AuthChannel, lazy_channel};
use credits_proto::ledger::v1 as lpb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use credits_proto::payments::v1 as ppb;
use credits_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use credits_proto::recharge::v1 as rpb;
use credits_proto::recharge::v1::auto_recharge_service_client::AutoRechargeServiceClient;

use crate::output::{self, Out};

#[derive(clap::Args, Debug, Clone)]
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
        env = "CREDITS_AUTH_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

pub struct Clients {
    pub ledger: LedgerServiceClient<AuthChannel>,
    pub payments: PaymentsServiceClient<AuthChannel>,
    pub recharge: AutoRechargeServiceClient<AuthChannel>,
}

impl Conn {
    pub fn clients(&self) -> anyhow::Result<Clients> {
        let t = self.token.as_deref();
        Ok(Clients {
            ledger: LedgerServiceClient::new(lazy_channel(&self.ledger, t)?),
            payments: PaymentsServiceClient::new(lazy_channel(&self.payments, t)?),
            recharge: AutoRechargeServiceClient::new(lazy_channel(&self.recharge, t)?),
        })
    }
}

fn new_key() -> String {
    format!("cli-{}", uuid::Uuid::new_v4())
}

#[derive(Subcommand, Debug)]
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
}

#[derive(Subcommand, Debug)]
pub enum UsageCmd {
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

#[derive(Subcommand, Debug)]
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

#[derive(Subcommand, Debug)]
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

pub async fn accounts(c: &mut Clients, out: &Out, cmd: AccountCmd) -> Result<(), tonic::Status> {
    match cmd {
        AccountCmd::Create {
            account_id,
            contract,
            name,
        } => {
            let mode = if contract {
                lpb::BillingMode::Contract
            } else {
                lpb::BillingMode::Prepaid
            };
            let a = c
                .ledger
                .create_account(lpb::CreateAccountRequest {
                    account_id,
                    billing_mode: mode as i32,
                    display_name: name,
                })
                .await?
                .into_inner();
            out.one(&output::account(&a));
        }
        AccountCmd::Show { account_id } => {
            let a = c
                .ledger
                .get_account(lpb::GetAccountRequest { account_id })
                .await?
                .into_inner();
            out.one(&output::account(&a));
        }
        AccountCmd::Entries { account_id, limit } => {
            let r = c
                .ledger
                .list_entries(lpb::ListEntriesRequest {
                    account_id,
                    page_size: limit,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            let rows: Vec<_> = r.entries.iter().map(output::entry).collect();
            out.list(
                &rows,
                &[
                    "created_at",
                    "kind",
                    "category_or_source",
                    "amount",
                    "balance_after",
                    "reference",
                ],
            );
        }
    }
    Ok(())
}

pub async fn usage(c: &mut Clients, out: &Out, cmd: UsageCmd) -> Result<(), tonic::Status> {
    let UsageCmd::Record {
        account_id,
        amount,
        category,
        key,
        description,
    } = cmd;
    let category =
        lpb::UsageCategory::from_str_name(&category).unwrap_or(lpb::UsageCategory::Unspecified);
    let r = c
        .ledger
        .record_usage(lpb::RecordUsageRequest {
            account_id,
            category: category as i32,
            amount,
            idempotency_key: key.unwrap_or_else(new_key),
            description,
        })
        .await?
        .into_inner();
    let mut v = r.entry.as_ref().map(output::entry).unwrap_or_default();
    v["balance"] = r.balance.into();
    v["allowed"] = r.allowed.into();
    out.one(&v);
    Ok(())
}

pub async fn purchase(
    c: &mut Clients,
    out: &Out,
    account_id: String,
    amount: String,
    method: Option<String>,
    key: Option<String>,
) -> Result<(), tonic::Status> {
    let r = c
        .payments
        .purchase_credits(ppb::PurchaseCreditsRequest {
            account_id,
            amount,
            payment_method_id: method.unwrap_or_default(),
            idempotency_key: key.unwrap_or_else(new_key),
        })
        .await?
        .into_inner();
    let mut v = r.charge.as_ref().map(output::charge).unwrap_or_default();
    v["ledger_entry_id"] = r.entry.map(|e| e.entry_id).unwrap_or_default().into();
    v["balance"] = r.balance.into();
    out.one(&v);
    Ok(())
}

pub async fn methods(c: &mut Clients, out: &Out, cmd: MethodCmd) -> Result<(), tonic::Status> {
    use ppb::add_payment_method_request::Method;
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
            Method::Card(ppb::CardDetails {
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
            Method::UsBankAccount(ppb::UsBankAccountDetails {
                routing_number,
                account_number,
                holder_name,
            }),
            default,
        )),
        MethodCmd::List { account_id } => {
            let r = c
                .payments
                .list_payment_methods(ppb::ListPaymentMethodsRequest { account_id })
                .await?
                .into_inner();
            let rows: Vec<_> = r.payment_methods.iter().map(output::method).collect();
            out.list(
                &rows,
                &[
                    "payment_method_id",
                    "type",
                    "brand",
                    "last4",
                    "expiry",
                    "is_default",
                ],
            );
            None
        }
        MethodCmd::Default {
            account_id,
            payment_method_id,
        } => {
            let m = c
                .payments
                .set_default_payment_method(ppb::SetDefaultPaymentMethodRequest {
                    account_id,
                    payment_method_id,
                })
                .await?
                .into_inner();
            out.one(&output::method(&m));
            None
        }
        MethodCmd::Remove {
            account_id,
            payment_method_id,
        } => {
            c.payments
                .remove_payment_method(ppb::RemovePaymentMethodRequest {
                    account_id,
                    payment_method_id: payment_method_id.clone(),
                })
                .await?;
            out.say(&format!("removed {payment_method_id}"));
            None
        }
    };
    if let Some((account_id, method, make_default)) = added {
        let m = c
            .payments
            .add_payment_method(ppb::AddPaymentMethodRequest {
                account_id,
                method: Some(method),
                make_default,
            })
            .await?
            .into_inner();
        out.one(&output::method(&m));
    }
    Ok(())
}

pub async fn recharge(c: &mut Clients, out: &Out, cmd: RechargeCmd) -> Result<(), tonic::Status> {
    match cmd {
        RechargeCmd::Show { account_id } => {
            let a = c
                .recharge
                .get_auto_recharge(rpb::GetAutoRechargeRequest { account_id })
                .await?
                .into_inner();
            out.one(&output::auto_recharge(&a));
        }
        RechargeCmd::Set {
            account_id,
            threshold,
            target,
        } => {
            let a = c
                .recharge
                .set_auto_recharge(rpb::SetAutoRechargeRequest {
                    account_id,
                    enabled: true,
                    threshold,
                    target,
                })
                .await?
                .into_inner();
            out.one(&output::auto_recharge(&a));
        }
        RechargeCmd::Off { account_id } => {
            let a = c
                .recharge
                .set_auto_recharge(rpb::SetAutoRechargeRequest {
                    account_id,
                    enabled: false,
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.one(&output::auto_recharge(&a));
        }
        RechargeCmd::Attempts { account_id, limit } => {
            let r = c
                .recharge
                .list_recharge_attempts(rpb::ListRechargeAttemptsRequest {
                    account_id,
                    page_size: limit,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            let rows: Vec<_> = r.attempts.iter().map(output::attempt).collect();
            out.list(
                &rows,
                &[
                    "created_at",
                    "status",
                    "trigger",
                    "balance_at_trigger",
                    "amount",
                    "charge_id",
                    "failure_code",
                ],
            );
        }
    }
    Ok(())
}

pub async fn charges(
    c: &mut Clients,
    out: &Out,
    account_id: String,
    limit: i32,
) -> Result<(), tonic::Status> {
    let r = c
        .payments
        .list_charges(ppb::ListChargesRequest {
            account_id,
            page_size: limit,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    let rows: Vec<_> = r.charges.iter().map(output::charge).collect();
    out.list(
        &rows,
        &[
            "created_at",
            "charge_id",
            "status",
            "amount",
            "failure_code",
            "description",
        ],
    );
    Ok(())
}

/// Exit codes: 0 success, 2 usage error (clap), 3 invalid argument, 4 not found,
/// 5 refused by a rule (failed precondition) or idempotency conflict (already exists),
/// 6 a service unavailable, 7 unauthenticated, 1 anything else.
pub fn exit_code(s: &tonic::Status) -> i32 {
    use tonic::Code;
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => 3,
        Code::NotFound => 4,
        Code::FailedPrecondition | Code::AlreadyExists => 5,
        Code::Unavailable | Code::DeadlineExceeded => 6,
        Code::Unauthenticated | Code::PermissionDenied => 7,
        _ => 1,
    }
}

//! The client's own types: what callers pass in and get back, converted from and to the
//! wire (prost) types here and nowhere else (STYLE habit 2). Amounts are [`Money`], parsed
//! once from the wire string; account ids are [`AccountId`]; enums are small Rust enums
//! spelled as in the contract; timestamps are `DateTime<Utc>`.
//!
//! Reading a response is strict: a missing required field, an unknown enum value or an
//! amount that is not a decimal is a [`ClientError::BadResponse`], never a default.

use std::fmt;

use chrono::{DateTime, Utc};
use credits_common::Money;
use credits_common::ids::{AccountId, IdempotencyKey};
use credits_proto::ledger::v1 as lpb;
use credits_proto::payments::v1 as ppb;
use credits_proto::recharge::v1 as rpb;

use crate::ClientError;

/// A name that is not one of an enum's contract names.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {name:?}")]
pub struct UnknownName {
    pub kind: &'static str,
    pub name: String,
}

/// Declares a contract enum: variants named as the prost ones, `as_str` giving the
/// contract's SCREAMING_SNAKE name, `FromStr` reading it back, and the wire conversions.
macro_rules! wire_enum {
    (
        $(#[$m:meta])*
        $name:ident: $pbm:ident :: $pbe:ident {
            $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $variant),+
        }

        impl $name {
            /// Every value, in the contract's order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The contract's name, as in the proto, the events and the CLI.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            #[allow(dead_code)] // not every enum is sent
            pub(crate) fn to_wire(self) -> i32 {
                match self {
                    $($name::$variant => $pbm::$pbe::$variant as i32),+
                }
            }

            #[allow(dead_code)] // not every enum is received
            pub(crate) fn from_wire(field: &str, v: i32) -> Result<Self, ClientError> {
                match $pbm::$pbe::try_from(v) {
                    $(Ok($pbm::$pbe::$variant) => Ok($name::$variant),)+
                    #[allow(unreachable_patterns)]
                    _ => Err(ClientError::bad_response(format!(
                        "{field}: unexpected {} value {v}",
                        stringify!($name)
                    ))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownName { kind: stringify!($name), name: s.to_owned() }),
                }
            }
        }
    };
}

wire_enum! {
    /// R5: prepaid accounts are suspended at zero; contract accounts never are.
    BillingMode: lpb::BillingMode {
        Prepaid = "PREPAID",
        Contract = "CONTRACT",
    }
}

wire_enum! {
    /// Whether the account may call the API (R3, R4).
    Access: lpb::Access {
        /// A new prepaid account before its first purchase (R3: no free trial).
        PendingFirstPurchase = "PENDING_FIRST_PURCHASE",
        Active = "ACTIVE",
        /// A prepaid balance at or below zero (R4).
        Suspended = "SUSPENDED",
    }
}

wire_enum! {
    /// What usage was for (R2).
    UsageCategory: lpb::UsageCategory {
        ApiRequests = "API_REQUESTS",
        DedicatedEndpoints = "DEDICATED_ENDPOINTS",
        FineTuning = "FINE_TUNING",
        Evaluations = "EVALUATIONS",
        Other = "OTHER",
    }
}

wire_enum! {
    /// Where credits came from.
    CreditSource: lpb::CreditSource {
        Purchase = "PURCHASE",
        AutoRecharge = "AUTO_RECHARGE",
        Grant = "GRANT",
        Adjustment = "ADJUSTMENT",
    }
}

wire_enum! {
    /// R30: how finely a usage summary groups usage.
    Granularity: lpb::Granularity {
        /// 24-hour periods from the summary's start.
        Day = "DAY",
        Hour = "HOUR",
    }
}

wire_enum! {
    /// R15: a hold is active until it ends, once.
    HoldStatus: lpb::HoldStatus {
        Active = "ACTIVE",
        Captured = "CAPTURED",
        Released = "RELEASED",
        Expired = "EXPIRED",
    }
}

wire_enum! {
    PaymentMethodType: ppb::PaymentMethodType {
        Card = "CARD",
        UsBankAccount = "US_BANK_ACCOUNT",
    }
}

wire_enum! {
    ChargeStatus: ppb::ChargeStatus {
        Succeeded = "SUCCEEDED",
        /// Not final: an ACH debit waiting to settle, or a card charge whose processor
        /// call has not completed (send it again with the same idempotency key).
        Pending = "PENDING",
        Failed = "FAILED",
    }
}

wire_enum! {
    /// Why auto-recharge is off (`None` also when it is on, or was never configured).
    DisabledReason: rpb::DisabledReason {
        None = "NONE",
        User = "USER",
        DefaultPaymentMethodNotCard = "DEFAULT_PAYMENT_METHOD_NOT_CARD",
        NoDefaultPaymentMethod = "NO_DEFAULT_PAYMENT_METHOD",
        RepeatedFailures = "REPEATED_FAILURES",
        Disputed = "DISPUTED",
    }
}

wire_enum! {
    AttemptStatus: rpb::AttemptStatus {
        Pending = "PENDING",
        Charging = "CHARGING",
        Succeeded = "SUCCEEDED",
        Failed = "FAILED",
        /// R19: due, but the month's allowance was spent; never charged.
        Skipped = "SKIPPED",
    }
}

/// Which way a journal entry moved the balance, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A debit for served usage.
    Usage(UsageCategory),
    /// A credit.
    Credit(CreditSource),
    /// R27/R26: credits taken back because the money was refunded.
    Refund,
    /// R26: credits taken back because the payment was disputed.
    Dispute,
    /// R29: what was left of a grant or purchase at its expiry.
    Expiry,
}

impl EntryKind {
    /// `USAGE` or `CREDIT`, as in the contract.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Usage(_) => "USAGE",
            EntryKind::Credit(_) => "CREDIT",
            EntryKind::Refund => "REFUND",
            EntryKind::Dispute => "DISPUTE",
            EntryKind::Expiry => "EXPIRY",
        }
    }

    /// The category of a usage entry or the source of a credit, as in the contract.
    pub fn detail(self) -> &'static str {
        match self {
            EntryKind::Usage(c) => c.as_str(),
            EntryKind::Credit(s) => s.as_str(),
            EntryKind::Refund | EntryKind::Dispute | EntryKind::Expiry => "",
        }
    }

    /// Whether the entry added to the balance (a credit) rather than took from it.
    pub fn is_credit(self) -> bool {
        matches!(self, EntryKind::Credit(_))
    }

    fn from_wire(e: &lpb::Entry) -> Result<Self, ClientError> {
        match lpb::EntryKind::try_from(e.kind) {
            Ok(lpb::EntryKind::Usage) => Ok(EntryKind::Usage(UsageCategory::from_wire(
                "entry.category",
                e.category,
            )?)),
            Ok(lpb::EntryKind::Credit) => Ok(EntryKind::Credit(CreditSource::from_wire(
                "entry.source",
                e.source,
            )?)),
            Ok(lpb::EntryKind::Refund) => Ok(EntryKind::Refund),
            Ok(lpb::EntryKind::Dispute) => Ok(EntryKind::Dispute),
            Ok(lpb::EntryKind::Expiry) => Ok(EntryKind::Expiry),
            _ => Err(ClientError::bad_response(format!(
                "entry.kind: unexpected EntryKind value {}",
                e.kind
            ))),
        }
    }
}

// ---- reading the wire -------------------------------------------------------------------

fn signed(field: &str, s: &str) -> Result<Money, ClientError> {
    Money::parse_signed(field, s).map_err(|e| ClientError::bad_response(e.to_string()))
}

fn amount(field: &str, s: &str) -> Result<Money, ClientError> {
    Money::parse_non_negative(field, s).map_err(|e| ClientError::bad_response(e.to_string()))
}

/// An optional amount: the wire's empty string is "none".
fn optional_amount(field: &str, s: &str) -> Result<Option<Money>, ClientError> {
    if s.is_empty() {
        Ok(None)
    } else {
        amount(field, s).map(Some)
    }
}

fn optional_text(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn account_id(field: &str, s: &str) -> Result<AccountId, ClientError> {
    AccountId::parse(s).map_err(|e| ClientError::bad_response(format!("{field}: {e}")))
}

pub(crate) fn timestamp(
    field: &str,
    t: Option<&prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, ClientError> {
    let Some(t) = t else { return Ok(None) };
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .map(Some)
        .ok_or_else(|| ClientError::bad_response(format!("{field}: not a valid timestamp")))
}

fn required_timestamp(
    field: &str,
    t: Option<&prost_types::Timestamp>,
) -> Result<DateTime<Utc>, ClientError> {
    timestamp(field, t)?.ok_or_else(|| ClientError::bad_response(format!("{field}: missing")))
}

pub(crate) fn required<T>(field: &str, v: Option<T>) -> Result<T, ClientError> {
    v.ok_or_else(|| ClientError::bad_response(format!("{field}: missing")))
}

// ---- ledger -----------------------------------------------------------------------------

/// An account of the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub account_id: AccountId,
    pub billing_mode: BillingMode,
    pub display_name: String,
    pub balance: Money,
    pub access: Access,
    pub created_at: DateTime<Utc>,
    /// The registered balance threshold, if any.
    pub balance_threshold: Option<Money>,
    /// The version of the last versioned threshold write.
    pub balance_threshold_version: i64,
    /// R15: the sum of ACTIVE holds.
    pub held: Money,
    /// R15/R16: balance − held; what access and threshold crossings follow.
    pub available_balance: Money,
    /// R18: alert thresholds on the available balance, highest first.
    pub alert_thresholds: Vec<Money>,
    /// R29: grants that still hold credits, in the order usage draws them.
    pub grants: Vec<Grant>,
    /// R29: purchased credits that will expire, soonest first.
    pub expiring_purchases: Vec<Grant>,
}

/// R29: a lot of credits — a grant, or what one purchase added — and what is left of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub grant_id: String,
    pub source: CreditSource,
    pub amount: Money,
    pub remaining: Money,
    /// `None`: never expires.
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: i32,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    /// The CREDIT entry that added it (empty for a balance held before lots existed).
    pub entry_id: String,
}

impl TryFrom<lpb::Grant> for Grant {
    type Error = ClientError;
    fn try_from(g: lpb::Grant) -> Result<Self, ClientError> {
        Ok(Grant {
            source: CreditSource::from_wire("grant.source", g.source)?,
            amount: amount("grant.amount", &g.amount)?,
            remaining: signed("grant.remaining", &g.remaining)?,
            expires_at: timestamp("grant.expires_at", g.expires_at.as_ref())?,
            created_at: required_timestamp("grant.created_at", g.created_at.as_ref())?,
            priority: g.priority,
            grant_id: g.grant_id,
            reason: g.reason,
            entry_id: g.entry_id,
        })
    }
}

/// R29: promotional or contractual credits to grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditsToGrant {
    pub account_id: AccountId,
    /// Greater than zero.
    pub amount: Money,
    pub idempotency_key: IdempotencyKey,
    /// Required: what the customer sees beside the grant.
    pub reason: String,
    /// In the future; `None`: never expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// 0 ..= 1,000,000, lower first among grants that expire together.
    pub priority: i32,
}

impl CreditsToGrant {
    pub(crate) fn to_wire(&self) -> lpb::GrantCreditsRequest {
        lpb::GrantCreditsRequest {
            account_id: self.account_id.to_string(),
            amount: self.amount.to_wire(),
            idempotency_key: self.idempotency_key.as_str().to_owned(),
            reason: self.reason.clone(),
            expires_at: self.expires_at.map(credits_common::ids::timestamp),
            priority: self.priority,
        }
    }
}

/// R30: usage in one period and category.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsagePeriod {
    pub start: DateTime<Utc>,
    pub category: UsageCategory,
    pub amount: Money,
    pub count: i64,
}

impl TryFrom<lpb::UsagePeriod> for UsagePeriod {
    type Error = ClientError;
    fn try_from(p: lpb::UsagePeriod) -> Result<Self, ClientError> {
        Ok(UsagePeriod {
            start: required_timestamp("period.start", p.start.as_ref())?,
            category: UsageCategory::from_wire("period.category", p.category)?,
            amount: amount("period.amount", &p.amount)?,
            count: p.count,
        })
    }
}

/// `held` and `available_balance` as a server sends them; a server from before holds sends
/// neither, which means no holds.
fn held_and_available(
    what: &str,
    balance: Money,
    held: &str,
    available: &str,
) -> Result<(Money, Money), ClientError> {
    let held = optional_amount(&format!("{what}.held"), held)?.unwrap_or_default();
    let available = match available {
        "" => balance - held,
        a => signed(&format!("{what}.available_balance"), a)?,
    };
    Ok((held, available))
}

impl TryFrom<lpb::Account> for Account {
    type Error = ClientError;
    fn try_from(a: lpb::Account) -> Result<Self, ClientError> {
        let balance = signed("account.balance", &a.balance)?;
        let (held, available_balance) =
            held_and_available("account", balance, &a.held, &a.available_balance)?;
        Ok(Account {
            account_id: account_id("account.account_id", &a.account_id)?,
            billing_mode: BillingMode::from_wire("account.billing_mode", a.billing_mode)?,
            balance,
            held,
            available_balance,
            alert_thresholds: a
                .alert_thresholds
                .iter()
                .enumerate()
                .map(|(i, t)| amount(&format!("account.alert_thresholds[{i}]"), t))
                .collect::<Result<_, _>>()?,
            access: Access::from_wire("account.access", a.access)?,
            created_at: required_timestamp("account.created_at", a.created_at.as_ref())?,
            balance_threshold: optional_amount("account.balance_threshold", &a.balance_threshold)?,
            balance_threshold_version: a.balance_threshold_version,
            display_name: a.display_name,
            grants: a
                .grants
                .into_iter()
                .map(Grant::try_from)
                .collect::<Result<_, _>>()?,
            expiring_purchases: a
                .expiring_purchases
                .into_iter()
                .map(Grant::try_from)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// The answer of `CheckAccess`: the gateway's hot path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessCheck {
    /// Access allowed and, when asked with a cost, (prepaid) the available balance covers it.
    pub allowed: bool,
    pub access: Access,
    pub balance: Money,
    pub held: Money,
    pub available_balance: Money,
}

impl TryFrom<lpb::CheckAccessResponse> for AccessCheck {
    type Error = ClientError;
    fn try_from(r: lpb::CheckAccessResponse) -> Result<Self, ClientError> {
        let balance = signed("balance", &r.balance)?;
        let (held, available_balance) =
            held_and_available("check", balance, &r.held, &r.available_balance)?;
        Ok(AccessCheck {
            allowed: r.allowed,
            access: Access::from_wire("access", r.access)?,
            balance,
            held,
            available_balance,
        })
    }
}

/// R31: one account's state as `WatchAccess` streams it: after a change, or as the
/// stream's first part read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessUpdate {
    pub account_id: AccountId,
    pub billing_mode: BillingMode,
    pub access: Access,
    pub balance: Money,
    pub held: Money,
    pub available_balance: Money,
    /// The account's change number: one more per committed change; the highest is the
    /// newest.
    pub seq: u64,
    /// When the change was written (just before its commit).
    pub changed_at: Option<DateTime<Utc>>,
}

/// One item of a `WatchAccess` stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Update(AccessUpdate),
    /// Every change up to here was sent: resume a later stream with `cursor`.
    Sync {
        cursor: String,
    },
}

impl TryFrom<lpb::AccessUpdate> for WatchEvent {
    type Error = ClientError;
    fn try_from(u: lpb::AccessUpdate) -> Result<Self, ClientError> {
        if u.account_id.is_empty() {
            if u.cursor.is_empty() {
                return Err(ClientError::bad_response(
                    "access update: neither an account nor a cursor",
                ));
            }
            return Ok(WatchEvent::Sync { cursor: u.cursor });
        }
        let balance = signed("update.balance", &u.balance)?;
        let (held, available_balance) =
            held_and_available("update", balance, &u.held, &u.available_balance)?;
        let billing_mode = match u.billing_mode {
            0 => BillingMode::Prepaid,
            m => BillingMode::from_wire("update.billing_mode", m)?,
        };
        Ok(WatchEvent::Update(AccessUpdate {
            account_id: account_id("update.account_id", &u.account_id)?,
            billing_mode,
            access: Access::from_wire("update.access", u.access)?,
            balance,
            held,
            available_balance,
            seq: u.seq,
            changed_at: timestamp("update.changed_at", u.changed_at.as_ref())?,
        }))
    }
}

/// A journal entry (append-only, R13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub entry_id: String,
    pub account_id: AccountId,
    pub kind: EntryKind,
    /// Always positive; [`Entry::kind`] says which way it moved the balance.
    pub amount: Money,
    pub balance_after: Money,
    pub reference: String,
    pub created_at: DateTime<Utc>,
    pub description: String,
    pub idempotency_key: String,
}

impl TryFrom<lpb::Entry> for Entry {
    type Error = ClientError;
    fn try_from(e: lpb::Entry) -> Result<Self, ClientError> {
        Ok(Entry {
            account_id: account_id("entry.account_id", &e.account_id)?,
            kind: EntryKind::from_wire(&e)?,
            amount: amount("entry.amount", &e.amount)?,
            balance_after: signed("entry.balance_after", &e.balance_after)?,
            created_at: required_timestamp("entry.created_at", e.created_at.as_ref())?,
            entry_id: e.entry_id,
            reference: e.reference,
            description: e.description,
            idempotency_key: e.idempotency_key,
        })
    }
}

/// Usage to record (R4: always recorded, even past zero).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    pub account_id: AccountId,
    pub category: UsageCategory,
    /// Greater than zero, at most 9 fractional digits.
    pub amount: Money,
    /// Same key, same request: the first result (R12).
    pub idempotency_key: IdempotencyKey,
    pub description: String,
}

impl UsageRecord {
    pub(crate) fn to_wire(&self) -> lpb::RecordUsageRequest {
        lpb::RecordUsageRequest {
            account_id: self.account_id.to_string(),
            category: self.category.to_wire(),
            amount: self.amount.to_wire(),
            idempotency_key: self.idempotency_key.as_str().to_owned(),
            description: self.description.clone(),
        }
    }
}

/// `CreateHold` (R15): reserve `amount` of the available balance for work priced later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldRequest {
    pub account_id: AccountId,
    pub amount: Money,
    pub category: UsageCategory,
    /// Same key, same request: the first hold (R12).
    pub idempotency_key: IdempotencyKey,
    pub description: String,
    /// How long the hold lives before the ledger expires it; `None` = 3600 s, at most a week.
    pub ttl_seconds: Option<u32>,
}

impl HoldRequest {
    pub(crate) fn to_wire(&self) -> lpb::CreateHoldRequest {
        lpb::CreateHoldRequest {
            account_id: self.account_id.to_string(),
            amount: self.amount.to_wire(),
            category: self.category.to_wire(),
            idempotency_key: self.idempotency_key.as_str().to_owned(),
            description: self.description.clone(),
            ttl_seconds: self.ttl_seconds.map(i64::from).unwrap_or(0),
        }
    }
}

/// A hold (R15).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub hold_id: String,
    pub account_id: AccountId,
    pub amount: Money,
    pub category: UsageCategory,
    pub status: HoldStatus,
    /// The final cost, once captured.
    pub captured_amount: Option<Money>,
    /// The capture's USAGE entry, once captured.
    pub entry_id: Option<String>,
    pub description: String,
    pub idempotency_key: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

impl TryFrom<lpb::Hold> for Hold {
    type Error = ClientError;
    fn try_from(h: lpb::Hold) -> Result<Self, ClientError> {
        Ok(Hold {
            account_id: account_id("hold.account_id", &h.account_id)?,
            amount: amount("hold.amount", &h.amount)?,
            category: UsageCategory::from_wire("hold.category", h.category)?,
            status: HoldStatus::from_wire("hold.status", h.status)?,
            captured_amount: optional_amount("hold.captured_amount", &h.captured_amount)?,
            entry_id: optional_text(h.entry_id),
            created_at: required_timestamp("hold.created_at", h.created_at.as_ref())?,
            expires_at: required_timestamp("hold.expires_at", h.expires_at.as_ref())?,
            ended_at: timestamp("hold.ended_at", h.ended_at.as_ref())?,
            hold_id: h.hold_id,
            description: h.description,
            idempotency_key: h.idempotency_key,
        })
    }
}

/// The answer of `CaptureHold`: the hold, its USAGE entry and the balances after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldCaptured {
    pub hold: Hold,
    pub entry: Entry,
    pub balance: Money,
    pub available_balance: Money,
}

impl TryFrom<lpb::CaptureHoldResponse> for HoldCaptured {
    type Error = ClientError;
    fn try_from(r: lpb::CaptureHoldResponse) -> Result<Self, ClientError> {
        Ok(HoldCaptured {
            hold: required("hold", r.hold)?.try_into()?,
            entry: required("entry", r.entry)?.try_into()?,
            balance: signed("balance", &r.balance)?,
            available_balance: signed("available_balance", &r.available_balance)?,
        })
    }
}

/// The answer of `RecordUsage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecorded {
    pub entry: Entry,
    pub balance: Money,
    /// Whether the account still has API access after this usage.
    pub allowed: bool,
}

impl TryFrom<lpb::RecordUsageResponse> for UsageRecorded {
    type Error = ClientError;
    fn try_from(r: lpb::RecordUsageResponse) -> Result<Self, ClientError> {
        Ok(UsageRecorded {
            entry: required("entry", r.entry)?.try_into()?,
            balance: signed("balance", &r.balance)?,
            allowed: r.allowed,
        })
    }
}

/// Credits to add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditsToAdd {
    pub account_id: AccountId,
    /// Greater than zero.
    pub amount: Money,
    pub source: CreditSource,
    /// What the credit is for, e.g. a charge id.
    pub reference: String,
    pub idempotency_key: IdempotencyKey,
    pub description: String,
}

impl CreditsToAdd {
    pub(crate) fn to_wire(&self) -> lpb::AddCreditsRequest {
        lpb::AddCreditsRequest {
            account_id: self.account_id.to_string(),
            amount: self.amount.to_wire(),
            source: self.source.to_wire(),
            reference: self.reference.clone(),
            idempotency_key: self.idempotency_key.as_str().to_owned(),
            description: self.description.clone(),
        }
    }
}

/// The answer of `AddCredits`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditsAdded {
    pub entry: Entry,
    pub balance: Money,
}

impl TryFrom<lpb::AddCreditsResponse> for CreditsAdded {
    type Error = ClientError;
    fn try_from(r: lpb::AddCreditsResponse) -> Result<Self, ClientError> {
        Ok(CreditsAdded {
            entry: required("entry", r.entry)?.try_into()?,
            balance: signed("balance", &r.balance)?,
        })
    }
}

/// The balance threshold now stored, and the version of the last versioned write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceThreshold {
    pub threshold: Option<Money>,
    pub version: i64,
}

impl TryFrom<lpb::BalanceThreshold> for BalanceThreshold {
    type Error = ClientError;
    fn try_from(r: lpb::BalanceThreshold) -> Result<Self, ClientError> {
        Ok(BalanceThreshold {
            threshold: optional_amount("threshold", &r.threshold)?,
            version: r.version,
        })
    }
}

impl TryFrom<lpb::ClearBalanceThresholdResponse> for BalanceThreshold {
    type Error = ClientError;
    fn try_from(r: lpb::ClearBalanceThresholdResponse) -> Result<Self, ClientError> {
        Ok(BalanceThreshold {
            threshold: optional_amount("threshold", &r.threshold)?,
            version: r.version,
        })
    }
}

// ---- pages ------------------------------------------------------------------------------

/// One page of a list, newest first (R13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass this to the same list call for the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

impl<T> Page<T> {
    pub(crate) fn from_wire<W>(items: Vec<W>, next_page_token: String) -> Result<Self, ClientError>
    where
        T: TryFrom<W, Error = ClientError>,
    {
        Ok(Page {
            items: items
                .into_iter()
                .map(T::try_from)
                .collect::<Result<_, _>>()?,
            next_page_token: optional_text(next_page_token),
        })
    }

    /// Whether this is the last page.
    pub fn is_last(&self) -> bool {
        self.next_page_token.is_none()
    }
}

/// The wire's page size: 0 asks for the server's default (50); the server caps it at 500.
pub(crate) fn page_size(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

// ---- payments ---------------------------------------------------------------------------

/// Card details, sent to be tokenised and never stored (R14). `Debug` shows only the
/// last four digits.
#[derive(Clone, PartialEq, Eq)]
pub struct CardDetails {
    pub number: String,
    pub exp_month: u32,
    pub exp_year: u32,
    pub cvc: String,
}

impl fmt::Debug for CardDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last4: String = {
            let digits: Vec<char> = self.number.chars().collect();
            digits[digits.len().saturating_sub(4)..].iter().collect()
        };
        f.debug_struct("CardDetails")
            .field("number", &format_args!("****{last4}"))
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field("cvc", &format_args!("***"))
            .finish()
    }
}

/// A US bank account (ACH). `Debug` masks the account number.
#[derive(Clone, PartialEq, Eq)]
pub struct BankAccountDetails {
    pub routing_number: String,
    pub account_number: String,
    pub holder_name: String,
}

impl fmt::Debug for BankAccountDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BankAccountDetails")
            .field("routing_number", &self.routing_number)
            .field("account_number", &format_args!("***"))
            .field("holder_name", &self.holder_name)
            .finish()
    }
}

/// A payment method to add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NewPaymentMethod {
    Card(CardDetails),
    UsBankAccount(BankAccountDetails),
    /// R24: a payment method the customer's browser made at the processor (`pm_…`).
    ProcessorToken(String),
}

impl NewPaymentMethod {
    /// The request's `method` and `processor_token`.
    pub(crate) fn to_wire(&self) -> (Option<ppb::add_payment_method_request::Method>, String) {
        use ppb::add_payment_method_request::Method;
        let method = match self {
            NewPaymentMethod::ProcessorToken(t) => return (None, t.clone()),
            NewPaymentMethod::Card(c) => Method::Card(ppb::CardDetails {
                number: c.number.clone(),
                exp_month: c.exp_month,
                exp_year: c.exp_year,
                cvc: c.cvc.clone(),
            }),
            NewPaymentMethod::UsBankAccount(b) => {
                Method::UsBankAccount(ppb::UsBankAccountDetails {
                    routing_number: b.routing_number.clone(),
                    account_number: b.account_number.clone(),
                    holder_name: b.holder_name.clone(),
                })
            }
        };
        (Some(method), String::new())
    }
}

/// A card's expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardExpiry {
    pub month: u32,
    pub year: u32,
}

/// A saved payment method: the processor's token stays server-side; brand, last 4 and
/// expiry are what may be shown (R14).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentMethod {
    pub payment_method_id: String,
    pub method_type: PaymentMethodType,
    pub brand: String,
    pub last4: String,
    /// Cards only.
    pub expiry: Option<CardExpiry>,
    pub is_default: bool,
    pub account_id: AccountId,
    pub created_at: DateTime<Utc>,
}

impl TryFrom<ppb::PaymentMethod> for PaymentMethod {
    type Error = ClientError;
    fn try_from(m: ppb::PaymentMethod) -> Result<Self, ClientError> {
        Ok(PaymentMethod {
            method_type: PaymentMethodType::from_wire("payment_method.type", m.r#type)?,
            expiry: (m.exp_month > 0).then_some(CardExpiry {
                month: m.exp_month,
                year: m.exp_year,
            }),
            account_id: account_id("payment_method.account_id", &m.account_id)?,
            created_at: required_timestamp("payment_method.created_at", m.created_at.as_ref())?,
            payment_method_id: m.payment_method_id,
            brand: m.brand,
            last4: m.last4,
            is_default: m.is_default,
        })
    }
}

/// A charge of a payment method (append-only, R13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    pub charge_id: String,
    pub status: ChargeStatus,
    /// The processor's reason for a failed charge (`card_declined`, …).
    pub failure_code: Option<String>,
    /// Whole cents.
    pub amount: Money,
    pub payment_method_id: String,
    pub payment_method_type: PaymentMethodType,
    pub created_at: DateTime<Utc>,
    pub account_id: AccountId,
    pub description: String,
    pub idempotency_key: String,
    /// The ledger entry crediting this charge, for purchases once credited.
    pub ledger_entry_id: Option<String>,
    /// R27: refunded so far.
    pub refunded_amount: Money,
    /// R25: the bank wants the customer to confirm it on-session (`client_secret` is for
    /// Stripe.js `confirmCardPayment`).
    pub action_required: bool,
    pub client_secret: Option<String>,
}

impl TryFrom<ppb::Charge> for Charge {
    type Error = ClientError;
    fn try_from(c: ppb::Charge) -> Result<Self, ClientError> {
        Ok(Charge {
            status: ChargeStatus::from_wire("charge.status", c.status)?,
            amount: amount("charge.amount", &c.amount)?,
            payment_method_type: PaymentMethodType::from_wire(
                "charge.payment_method_type",
                c.payment_method_type,
            )?,
            created_at: required_timestamp("charge.created_at", c.created_at.as_ref())?,
            account_id: account_id("charge.account_id", &c.account_id)?,
            charge_id: c.charge_id,
            failure_code: optional_text(c.failure_code),
            payment_method_id: c.payment_method_id,
            description: c.description,
            idempotency_key: c.idempotency_key,
            ledger_entry_id: optional_text(c.ledger_entry_id),
            refunded_amount: if c.refunded_amount.is_empty() {
                Money::ZERO
            } else {
                amount("charge.refunded_amount", &c.refunded_amount)?
            },
            action_required: c.action_required,
            client_secret: optional_text(c.client_secret),
        })
    }
}

/// The answer of `PurchaseCredits`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Purchase {
    pub charge: Charge,
    /// The credit; `None` while an ACH charge is pending.
    pub entry: Option<Entry>,
    /// The balance after the credit; `None` while an ACH charge is pending.
    pub balance: Option<Money>,
}

impl TryFrom<ppb::PurchaseCreditsResponse> for Purchase {
    type Error = ClientError;
    fn try_from(r: ppb::PurchaseCreditsResponse) -> Result<Self, ClientError> {
        Ok(Purchase {
            charge: required("charge", r.charge)?.try_into()?,
            entry: r.entry.map(Entry::try_from).transpose()?,
            balance: if r.balance.is_empty() {
                None
            } else {
                Some(signed("balance", &r.balance)?)
            },
        })
    }
}

// ---- recharge ---------------------------------------------------------------------------

/// Auto-recharge settings (R6): below `threshold`, bring the balance up to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoRecharge {
    pub account_id: AccountId,
    pub enabled: bool,
    /// `None` for an account that never configured auto-recharge.
    pub threshold: Option<Money>,
    /// `None` for an account that never configured auto-recharge.
    pub target: Option<Money>,
    pub disabled_reason: DisabledReason,
    /// `None` for an account that never configured auto-recharge.
    pub updated_at: Option<DateTime<Utc>>,
    /// Failed top-ups in a row (three turn auto-recharge off, R11).
    pub consecutive_failures: u32,
    /// R19: the most succeeded top-ups may charge in one calendar month (UTC).
    pub monthly_limit: Option<Money>,
    /// R19: what succeeded top-ups charged in the current calendar month (UTC).
    pub charged_this_month: Money,
}

impl TryFrom<rpb::AutoRecharge> for AutoRecharge {
    type Error = ClientError;
    fn try_from(a: rpb::AutoRecharge) -> Result<Self, ClientError> {
        Ok(AutoRecharge {
            account_id: account_id("auto_recharge.account_id", &a.account_id)?,
            enabled: a.enabled,
            threshold: optional_amount("auto_recharge.threshold", &a.threshold)?,
            target: optional_amount("auto_recharge.target", &a.target)?,
            disabled_reason: DisabledReason::from_wire(
                "auto_recharge.disabled_reason",
                a.disabled_reason,
            )?,
            updated_at: timestamp("auto_recharge.updated_at", a.updated_at.as_ref())?,
            consecutive_failures: a.consecutive_failures,
            monthly_limit: optional_amount("auto_recharge.monthly_limit", &a.monthly_limit)?,
            charged_this_month: optional_amount(
                "auto_recharge.charged_this_month",
                &a.charged_this_month,
            )?
            .unwrap_or_default(),
        })
    }
}

/// A change of auto-recharge settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoRechargeChange {
    /// Turn on: when the balance goes below `threshold`, bring it up to `target` (R6:
    /// `0 < threshold < target`, `target - threshold >=` the minimum purchase; R10: the
    /// default payment method must be a card). R19: `monthly_limit`, when set, caps what
    /// succeeded top-ups charge in one calendar month (UTC); at least the minimum purchase.
    Enable {
        threshold: Money,
        target: Money,
        monthly_limit: Option<Money>,
    },
    /// Turn off, keeping the stored amounts.
    Disable,
}

impl AutoRechargeChange {
    pub(crate) fn to_wire(self, account: &AccountId) -> rpb::SetAutoRechargeRequest {
        match self {
            AutoRechargeChange::Enable {
                threshold,
                target,
                monthly_limit,
            } => rpb::SetAutoRechargeRequest {
                account_id: account.to_string(),
                enabled: true,
                threshold: threshold.to_wire(),
                target: target.to_wire(),
                monthly_limit: monthly_limit.map(|m| m.to_wire()).unwrap_or_default(),
            },
            AutoRechargeChange::Disable => rpb::SetAutoRechargeRequest {
                account_id: account.to_string(),
                enabled: false,
                threshold: String::new(),
                target: String::new(),
                monthly_limit: String::new(),
            },
        }
    }
}

/// One auto-recharge top-up (append-only, R13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RechargeAttempt {
    pub attempt_id: String,
    pub account_id: AccountId,
    pub balance_at_trigger: Money,
    pub amount: Money,
    pub status: AttemptStatus,
    pub charge_id: Option<String>,
    pub failure_code: Option<String>,
    /// What decided it: `threshold_crossed`, `enabled_below_threshold`,
    /// `still_below_threshold`, `retry_after_failure`.
    pub trigger: String,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl TryFrom<rpb::RechargeAttempt> for RechargeAttempt {
    type Error = ClientError;
    fn try_from(a: rpb::RechargeAttempt) -> Result<Self, ClientError> {
        Ok(RechargeAttempt {
            account_id: account_id("attempt.account_id", &a.account_id)?,
            balance_at_trigger: signed("attempt.balance_at_trigger", &a.balance_at_trigger)?,
            amount: amount("attempt.amount", &a.amount)?,
            status: AttemptStatus::from_wire("attempt.status", a.status)?,
            created_at: required_timestamp("attempt.created_at", a.created_at.as_ref())?,
            completed_at: timestamp("attempt.completed_at", a.completed_at.as_ref())?,
            attempt_id: a.attempt_id,
            charge_id: optional_text(a.charge_id),
            failure_code: optional_text(a.failure_code),
            trigger: a.trigger,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn wire_entry() -> lpb::Entry {
        lpb::Entry {
            entry_id: "e1".into(),
            account_id: "acct-1".into(),
            kind: lpb::EntryKind::Usage as i32,
            category: lpb::UsageCategory::FineTuning as i32,
            source: 0,
            amount: "0.000125".into(),
            balance_after: "-3.00".into(),
            reference: String::new(),
            created_at: ts(1_795_478_400),
            description: "d".into(),
            idempotency_key: "k".into(),
        }
    }

    #[test]
    fn enum_names_follow_the_contract_both_ways() {
        assert_eq!(
            Access::PendingFirstPurchase.as_str(),
            "PENDING_FIRST_PURCHASE"
        );
        assert_eq!(
            DisabledReason::DefaultPaymentMethodNotCard.to_string(),
            "DEFAULT_PAYMENT_METHOD_NOT_CARD"
        );
        for c in UsageCategory::ALL {
            assert_eq!(c.as_str().parse::<UsageCategory>().unwrap(), *c);
            assert_eq!(UsageCategory::from_wire("c", c.to_wire()).unwrap(), *c);
            // The contract's names are the proto's names.
            let pb = lpb::UsageCategory::try_from(c.to_wire()).unwrap();
            assert_eq!(pb.as_str_name(), c.as_str());
        }
        for s in CreditSource::ALL {
            let pb = lpb::CreditSource::try_from(s.to_wire()).unwrap();
            assert_eq!(pb.as_str_name(), s.as_str());
        }
        assert!("api_requests".parse::<UsageCategory>().is_err());
    }

    #[test]
    fn unspecified_or_unknown_enum_values_are_bad_responses() {
        let e = UsageCategory::from_wire("entry.category", 0).unwrap_err();
        assert!(matches!(e, ClientError::BadResponse { .. }), "{e:?}");
        let e = ChargeStatus::from_wire("charge.status", 42).unwrap_err();
        assert!(e.message().contains("charge.status"), "{e}");
        // NONE is zero and a real value for DisabledReason.
        assert_eq!(
            DisabledReason::from_wire("r", 0).unwrap(),
            DisabledReason::None
        );
    }

    #[test]
    fn entries_read_money_kind_and_time() {
        let e = Entry::try_from(wire_entry()).unwrap();
        assert_eq!(e.kind, EntryKind::Usage(UsageCategory::FineTuning));
        assert_eq!((e.kind.as_str(), e.kind.detail()), ("USAGE", "FINE_TUNING"));
        assert_eq!(e.amount.to_wire(), "0.000125");
        assert_eq!(e.balance_after.to_wire(), "-3.00");
        assert_eq!(e.created_at.to_rfc3339(), "2026-11-24T00:00:00+00:00");
    }

    #[test]
    fn unreadable_responses_are_bad_responses() {
        let mut w = wire_entry();
        w.amount = "1e3".into();
        assert!(matches!(
            Entry::try_from(w),
            Err(ClientError::BadResponse { .. })
        ));
        let mut w = wire_entry();
        w.created_at = None;
        let e = Entry::try_from(w).unwrap_err();
        assert_eq!(e.message(), "entry.created_at: missing");
        let r = lpb::RecordUsageResponse {
            entry: None,
            balance: "1.00".into(),
            allowed: true,
        };
        assert!(UsageRecorded::try_from(r).is_err());
    }

    #[test]
    fn empty_wire_strings_are_none() {
        let a = AutoRecharge::try_from(rpb::AutoRecharge {
            account_id: "acct-1".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((a.threshold, a.target, a.updated_at), (None, None, None));
        assert_eq!(a.disabled_reason, DisabledReason::None);
        let p = Purchase::try_from(ppb::PurchaseCreditsResponse {
            charge: Some(ppb::Charge {
                charge_id: "ch_1".into(),
                status: ppb::ChargeStatus::Pending as i32,
                amount: "25.00".into(),
                payment_method_type: ppb::PaymentMethodType::UsBankAccount as i32,
                created_at: ts(0),
                account_id: "acct-1".into(),
                ..Default::default()
            }),
            entry: None,
            balance: String::new(),
        })
        .unwrap();
        assert_eq!((p.entry, p.balance), (None, None));
        assert_eq!(p.charge.failure_code, None);
        assert_eq!(p.charge.ledger_entry_id, None);
    }

    #[test]
    fn requests_carry_canonical_money_strings() {
        let r = UsageRecord {
            account_id: AccountId::parse("acct-1").unwrap(),
            category: UsageCategory::Evaluations,
            amount: Money::parse_positive("amount", "5").unwrap(),
            idempotency_key: IdempotencyKey::parse("k-1").unwrap(),
            description: String::new(),
        }
        .to_wire();
        assert_eq!(r.amount, "5.00");
        assert_eq!(r.category, lpb::UsageCategory::Evaluations as i32);
        let off = AutoRechargeChange::Disable.to_wire(&AccountId::parse("a").unwrap());
        assert!(!off.enabled && off.threshold.is_empty() && off.target.is_empty());
    }

    #[test]
    fn card_debug_masks_the_number_and_cvc_r14() {
        let c = CardDetails {
            number: "4242424242424242".into(),
            exp_month: 12,
            exp_year: 2034,
            cvc: "123".into(),
        };
        let d = format!("{c:?}");
        assert!(!d.contains("424242424242") && !d.contains("123"), "{d}");
        assert!(d.contains("****4242"), "{d}");
        let b = BankAccountDetails {
            routing_number: "110000000".into(),
            account_number: "000123456789".into(),
            holder_name: "Demo".into(),
        };
        assert!(!format!("{b:?}").contains("000123456789"));
    }

    #[test]
    fn page_tokens_are_optional_and_sizes_fit_the_wire() {
        let p: Page<Entry> = Page::from_wire(vec![wire_entry()], String::new()).unwrap();
        assert!(p.is_last());
        let p: Page<Entry> = Page::from_wire(Vec::<lpb::Entry>::new(), "42".into()).unwrap();
        assert_eq!(p.next_page_token.as_deref(), Some("42"));
        assert_eq!(page_size(u32::MAX), i32::MAX);
        assert_eq!(page_size(20), 20);
    }
}

//! Ledger domain: accounts, entries, the rules of R1–R5 and R12 expressed as types and
//! validated constructors. Knows neither prost nor SQL.

use chrono::{DateTime, Utc};
use credits_common::Money;
use uuid::Uuid;

use credits_common::error::ServiceError;
pub use credits_common::ids::{AccountId, IdempotencyKey, bounded_text, description_text};
use credits_common::text_enum;

text_enum!(
    /// R5: prepaid accounts are suspended at zero; contract accounts never are.
    BillingMode { PREPAID, CONTRACT }
);
text_enum!(
    /// R3/R4: whether the gateway lets the account call the API.
    Access { PENDING_FIRST_PURCHASE, ACTIVE, SUSPENDED }
);
text_enum!(
    /// R2.
    UsageCategory { API_REQUESTS, DEDICATED_ENDPOINTS, FINE_TUNING, EVALUATIONS, OTHER }
);
text_enum!(CreditSource {
    PURCHASE,
    AUTO_RECHARGE,
    GRANT,
    ADJUSTMENT
});
text_enum!(EntryKind {
    USAGE,
    CREDIT,
    REFUND,
    DISPUTE,
    EXPIRY
});
text_enum!(
    /// R15: a hold is ACTIVE until it ends, once, in one of three ways.
    HoldStatus { ACTIVE, CAPTURED, RELEASED, EXPIRED }
);

/// R15: a hold lives 3600 s unless asked otherwise, at most a week.
pub const DEFAULT_HOLD_TTL_SECS: i64 = 3600;
pub const MAX_HOLD_TTL_SECS: i64 = 604_800;

/// A validated `CreateHold`.
#[derive(Clone, Debug)]
pub struct NewHold {
    pub account_id: AccountId,
    pub amount: Money,
    pub category: UsageCategory,
    pub description: String,
    pub idempotency_key: IdempotencyKey,
    pub ttl_seconds: i32,
}

impl NewHold {
    /// `ttl_seconds` as the wire has it: 0 means the default; otherwise 1 ..= a week.
    pub fn ttl(ttl_seconds: i64) -> Result<i32, LedgerError> {
        match ttl_seconds {
            0 => Ok(DEFAULT_HOLD_TTL_SECS as i32),
            t if (1..=MAX_HOLD_TTL_SECS).contains(&t) => Ok(t as i32),
            t => Err(LedgerError::invalid(format!(
                "ttl_seconds: must be between 1 and {MAX_HOLD_TTL_SECS} (0 = {DEFAULT_HOLD_TTL_SECS}); got {t}"
            ))),
        }
    }
}

/// How a caller ends a hold (expiry is the ledger's own).
#[derive(Clone, Debug)]
pub enum HoldEnding {
    Capture { amount: Money, description: String },
    Release,
}

impl HoldEnding {
    pub fn action(&self) -> &'static str {
        match self {
            HoldEnding::Capture { .. } => "CAPTURE",
            HoldEnding::Release => "RELEASE",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Hold {
    pub seq: i64,
    pub hold_id: Uuid,
    pub account_id: AccountId,
    pub amount: Money,
    pub category: UsageCategory,
    pub status: HoldStatus,
    pub captured_amount: Option<Money>,
    pub entry_id: Option<Uuid>,
    /// The capture's entry, by its journal position.
    pub entry_seq: Option<i64>,
    /// The available balance right after the capture.
    pub capture_available: Option<Money>,
    pub description: String,
    pub idempotency_key: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

/// A hold as an ending call left it; for a capture, with its entry and the balances after.
#[derive(Clone, Debug)]
pub struct HoldEnded {
    pub hold: Hold,
    pub entry: Option<Entry>,
    pub balance: Money,
    pub available: Money,
}

impl Access {
    pub fn allows_api(self) -> bool {
        self == Access::ACTIVE
    }
}

#[derive(Clone, Debug)]
pub struct Account {
    pub account_id: AccountId,
    pub billing_mode: BillingMode,
    pub display_name: String,
    pub balance: Money,
    /// R15: the sum of ACTIVE holds.
    pub held: Money,
    pub access: Access,
    pub threshold: Option<Money>,
    pub threshold_version: i64,
    /// R18: highest first.
    pub alert_thresholds: Vec<Money>,
    pub created_at: DateTime<Utc>,
    /// R29: the lots that still hold credits, in burn order (empty where not loaded: a
    /// newly created account has none).
    pub lots: Vec<Lot>,
}

/// R18: at most this many alert thresholds per account.
pub const MAX_ALERTS: usize = 5;

/// R18: validates alert thresholds as the wire spells them (`thresholds[i]` names a bad
/// one) and returns them distinct, highest first.
pub fn alert_thresholds(raw: &[String]) -> Result<Vec<Money>, LedgerError> {
    if raw.len() > MAX_ALERTS {
        return Err(LedgerError::invalid(format!(
            "thresholds: at most {MAX_ALERTS} alert thresholds; got {}",
            raw.len()
        )));
    }
    let mut out: Vec<Money> = Vec::with_capacity(raw.len());
    for (i, t) in raw.iter().enumerate() {
        let m = Money::parse_non_negative(&format!("thresholds[{i}]"), t)?;
        if let Some(j) = out.iter().position(|o| *o == m) {
            return Err(LedgerError::invalid(format!(
                "thresholds[{i}]: {m} is already thresholds[{j}]; thresholds must be distinct"
            )));
        }
        out.push(m);
    }
    out.sort_by(|a, b| b.cmp(a));
    Ok(out)
}

impl Account {
    /// R15: balance − held.
    pub fn available(&self) -> Money {
        self.balance - self.held
    }
}

/// What `CheckAccess` reads: one primary-key row.
#[derive(Clone, Copy, Debug)]
pub struct AccessView {
    pub access: Access,
    pub billing_mode: BillingMode,
    pub balance: Money,
    pub held: Money,
    /// R31: the account's change number (`accounts.version`): one more with every
    /// committed change of balance, held amount or access.
    pub version: i64,
}

/// R31: one account's state after a committed change (or as a snapshot read it), as the
/// access feed carries it.
#[derive(Clone, Debug)]
pub struct AccessChange {
    pub account_id: String,
    pub view: AccessView,
    /// When the change was written (just before its commit); for a snapshot, the
    /// account's last change.
    pub at: DateTime<Utc>,
    /// The writing transaction (0 when read from `accounts`, not the feed).
    pub xid: u64,
}

impl AccessView {
    pub fn available(&self) -> Money {
        self.balance - self.held
    }

    /// R16: may the account start work of this cost now? Access allowed and, on a prepaid
    /// account, the available balance covers it.
    pub fn allows(&self, cost: Option<Money>) -> bool {
        self.access.allows_api()
            && match (self.billing_mode, cost) {
                (BillingMode::PREPAID, Some(c)) => self.available() >= c,
                _ => true,
            }
    }
}

/// The balance threshold as stored, with the version of its last versioned write.
#[derive(Clone, Copy, Debug)]
pub struct StoredThreshold {
    pub threshold: Option<Money>,
    pub version: i64,
}

#[derive(Clone, Debug)]
pub struct NewAccount {
    pub account_id: AccountId,
    pub billing_mode: BillingMode,
    pub display_name: String,
}

/// What a posting does to the balance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posting {
    Usage(UsageCategory),
    Credit(CreditSource),
    /// Credits taken back for money that left (R26, R27) or expired (R29): `REFUND`,
    /// `DISPUTE` or `EXPIRY`, with neither a category nor a source.
    Debit(EntryKind),
}

impl Posting {
    pub fn kind(self) -> EntryKind {
        match self {
            Posting::Usage(_) => EntryKind::USAGE,
            Posting::Credit(_) => EntryKind::CREDIT,
            Posting::Debit(k) => k,
        }
    }
}

/// A validated request to move money.
#[derive(Clone, Debug)]
pub struct PostingRequest {
    pub account_id: AccountId,
    pub posting: Posting,
    pub amount: Money,
    pub reference: String,
    pub description: String,
    pub idempotency_key: IdempotencyKey,
    /// The W3C trace context of the call that asked for it (`credits_common::trace`): the
    /// events this posting causes carry it on.
    pub traceparent: Option<String>,
    /// R29, credits only: when the lot this credit makes expires (`None`: never), and its
    /// priority among grants that expire together (lower first).
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: i32,
}

/// R29: a lot of credits — a grant, or what one purchase added — with what is left of it.
#[derive(Clone, Debug)]
pub struct Lot {
    pub lot_id: Uuid,
    pub source: CreditSource,
    pub amount: Money,
    pub remaining: Money,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: i32,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    /// The CREDIT entry that made it (none for the balance an account held before lots).
    pub entry_id: Option<Uuid>,
}

/// R29: a grant's priority, lower first among grants that expire together.
pub const MAX_GRANT_PRIORITY: i32 = 1_000_000;

/// R30: how finely `GetUsageSummary` groups usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    Day,
    Hour,
}

impl Granularity {
    pub fn seconds(self) -> i64 {
        match self {
            Granularity::Day => 86_400,
            Granularity::Hour => 3_600,
        }
    }

    /// The longest range one summary covers: 400 days, or 31 days by the hour.
    pub fn max_range(self) -> chrono::Duration {
        match self {
            Granularity::Day => chrono::Duration::days(400),
            Granularity::Hour => chrono::Duration::days(31),
        }
    }
}

/// R30: one period's usage in one category.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsagePeriod {
    pub start: DateTime<Utc>,
    pub category: UsageCategory,
    pub amount: Money,
    pub count: i64,
}

/// R30: a validated `GetUsageSummary`: [from, to) on whole hours, at most
/// [`Granularity::max_range`] long.
#[derive(Clone, Debug)]
pub struct SummaryRange {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub granularity: Granularity,
}

impl SummaryRange {
    pub fn new(
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        granularity: Granularity,
    ) -> Result<Self, LedgerError> {
        for (name, t) in [("from", from), ("to", to)] {
            if t.timestamp().rem_euclid(3600) != 0 || t.timestamp_subsec_nanos() != 0 {
                return Err(LedgerError::invalid(format!(
                    "{name}: must be on a whole UTC hour (usage is kept by the hour); got {}",
                    t.to_rfc3339()
                )));
            }
        }
        if from >= to {
            return Err(LedgerError::invalid("from: must be before to"));
        }
        if to - from > granularity.max_range() {
            return Err(LedgerError::invalid(format!(
                "to: at most {} days after from at this granularity",
                granularity.max_range().num_days()
            )));
        }
        Ok(Self {
            from,
            to,
            granularity,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub seq: i64,
    pub entry_id: Uuid,
    pub account_id: AccountId,
    pub posting: Posting,
    pub amount: Money,
    pub balance_after: Money,
    pub reference: String,
    pub description: String,
    pub idempotency_key: String,
    pub created_at: DateTime<Utc>,
}

/// The result of a posting: the entry (new, or the first one for a replayed key), the
/// balance and access after it.
#[derive(Clone, Debug)]
pub struct Posted {
    pub entry: Entry,
    pub balance: Money,
    pub access: Access,
    pub replayed: bool,
}

/// Why the ledger refused or could not carry out a request: one variant per cause. Each
/// cause has one gRPC class (`From<LedgerError> for ServiceError`, matched exhaustively).
#[derive(Clone, Debug, thiserror::Error)]
pub enum LedgerError {
    /// A field breaks a rule (R21, R22, …); the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("account {:?} not found", .0.as_str())]
    AccountNotFound(AccountId),
    /// `CreateAccount` again with other settings (a replay with the same ones succeeds).
    #[error("account {:?} already exists with different settings", .0.as_str())]
    AccountExists(AccountId),
    /// R12: the key was used on this account for a different request.
    #[error(
        "idempotency_key {:?} was already used for a different request on account {:?}",
        .key.as_str(),
        .account.as_str()
    )]
    IdempotencyConflict {
        account: AccountId,
        key: IdempotencyKey,
    },
    /// A write refused by a uniqueness rule of the store.
    #[error("{0}")]
    Conflict(String),
    /// R15: a prepaid account without access, or whose available balance is below the hold.
    #[error(
        "insufficient available balance: account {:?} has {available} available (access {}); this needs {amount}",
        .account.as_str(),
        .access.as_str()
    )]
    InsufficientAvailable {
        account: AccountId,
        available: Money,
        access: Access,
        amount: Money,
    },
    #[error("hold {hold_id:?} not found on account {:?}", .account.as_str())]
    HoldNotFound { account: AccountId, hold_id: String },
    /// R15: the hold ended another way (or a capture of another amount); it ends once.
    #[error("hold {hold_id} has already ended: it is {}{}", .status.as_str(), .detail)]
    HoldEnded {
        hold_id: Uuid,
        status: HoldStatus,
        detail: String,
    },
    /// The database is down or the ledger is shutting down: retry with the same key.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<LedgerError> for ServiceError {
    fn from(e: LedgerError) -> Self {
        let msg = e.to_string();
        match e {
            LedgerError::Invalid(_) => ServiceError::InvalidArgument(msg),
            LedgerError::AccountNotFound(_) | LedgerError::HoldNotFound { .. } => {
                ServiceError::NotFound(msg)
            }
            LedgerError::InsufficientAvailable { .. } | LedgerError::HoldEnded { .. } => {
                ServiceError::FailedPrecondition(msg)
            }
            LedgerError::AccountExists(_)
            | LedgerError::IdempotencyConflict { .. }
            | LedgerError::Conflict(_) => ServiceError::AlreadyExists(msg),
            LedgerError::Unavailable(_) => ServiceError::Unavailable(msg),
            LedgerError::Internal(_) => ServiceError::Internal(msg),
        }
    }
}

credits_common::domain_error!(LedgerError);

/// R31: where a `WatchAccess` stream was: the access feed it came from and the database
/// snapshot up to which it had sent every change. A client resumes with it after a
/// disconnection; opaque to clients (`v1.<feed id>.<xmin>:<xmax>:<running xids>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedCursor {
    pub feed_id: String,
    /// A PostgreSQL `pg_snapshot` in its text form.
    pub snapshot: String,
}

/// The longest cursor accepted (a snapshot lists the transactions running when it was
/// taken: a few hundred at most on a real server).
pub const MAX_CURSOR_LEN: usize = 16 * 1024;

impl FeedCursor {
    /// Parses a cursor as `WatchAccess` issued it; anything else is `INVALID_ARGUMENT`
    /// naming `resume_cursor`.
    pub fn parse(s: &str) -> Result<FeedCursor, LedgerError> {
        let bad = || LedgerError::invalid("resume_cursor: not a cursor this ledger issued");
        if s.len() > MAX_CURSOR_LEN {
            return Err(bad());
        }
        let rest = s.strip_prefix("v1.").ok_or_else(bad)?;
        let (feed_id, snapshot) = rest.split_once('.').ok_or_else(bad)?;
        if feed_id.len() != 32
            || !feed_id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(bad());
        }
        let mut parts = snapshot.split(':');
        let (Some(xmin), Some(xmax), Some(xip), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let number = |t: &str| {
            (!t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u64>().ok())
                .flatten()
        };
        let (Some(lo), Some(hi)) = (number(xmin), number(xmax)) else {
            return Err(bad());
        };
        // PostgreSQL's own rules: xmin <= xmax, neither an invalid (0 mod 2^32) id.
        let valid = |x: u64| x <= i64::MAX as u64 && x as u32 != 0;
        if lo > hi || !valid(lo) || !valid(hi) {
            return Err(bad());
        }
        if !xip.is_empty() {
            let mut last = None;
            for x in xip.split(',') {
                // PostgreSQL's own form: ascending, each in [xmin, xmax).
                let x = number(x).ok_or_else(bad)?;
                if x < lo || x >= hi || last.is_some_and(|l| x <= l) {
                    return Err(bad());
                }
                last = Some(x);
            }
        }
        Ok(FeedCursor {
            feed_id: feed_id.to_owned(),
            snapshot: snapshot.to_owned(),
        })
    }
}

impl std::fmt::Display for FeedCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v1.{}.{}", self.feed_id, self.snapshot)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod error_tests {
    use super::*;

    #[test]
    fn each_cause_has_its_class_and_its_words() {
        let acct = AccountId::parse("acme").unwrap();
        let key = IdempotencyKey::parse("k1").unwrap();
        let s = tonic::Status::from(LedgerError::IdempotencyConflict {
            account: acct.clone(),
            key,
        });
        assert_eq!(s.code(), tonic::Code::AlreadyExists);
        assert_eq!(
            s.message(),
            r#"idempotency_key "k1" was already used for a different request on account "acme""#
        );
        let s = tonic::Status::from(LedgerError::AccountNotFound(acct));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), r#"account "acme" not found"#);
        assert!(LedgerError::Unavailable("db".into()).is_transient());
        assert!(!LedgerError::invalid("amount: x").is_transient());
        // A database outage read through shared code stays transient.
        assert!(LedgerError::from(ServiceError::Unavailable("x".into())).is_transient());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod cursor_tests {
    use super::FeedCursor;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_cursor_round_trips_and_anything_else_is_refused_naming_the_field() {
        for snap in ["10:10:", "10:20:12,15", "3:4294967297:"] {
            let text = format!("v1.{ID}.{snap}");
            let c = FeedCursor::parse(&text).unwrap();
            assert_eq!(c.snapshot, snap);
            assert_eq!(c.to_string(), text);
        }
        for bad in [
            String::new(),
            "v2.x.1:2:".into(),
            format!("v1.{ID}"),
            format!("v1.{}.10:10:", &ID[1..]),
            format!("v1.{}.10:10:", ID.to_uppercase()),
            format!("v1.{ID}.20:10:"),
            format!("v1.{ID}.10:20:25"),
            format!("v1.{ID}.10:20:15,12"),
            format!("v1.{ID}.10:20:12,12"),
            format!("v1.{ID}.10:20:9"),
            format!("v1.{ID}.10:20:x"),
            format!("v1.{ID}.-1:20:"),
            format!("v1.{ID}.10:99999999999999999999999:"),
            format!("v1.{ID}.10:20:12:"),
            format!("v1.{ID}.0:0:"),
            format!("v1.{ID}.10:4294967296:"),
            format!("v1.{ID}.10:20:1{}", "2".repeat(20_000)),
        ] {
            let e = FeedCursor::parse(&bad).unwrap_err();
            assert!(e.to_string().contains("resume_cursor"), "{bad}: {e}");
        }
    }
}

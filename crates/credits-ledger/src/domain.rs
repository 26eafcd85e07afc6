//! Ledger domain: accounts, entries, the rules of R1–R5 and R12 expressed as types and
//! validated constructors. Knows neither prost nor SQL.

use chrono::{DateTime, Utc};
use credits_common::Money;
use uuid::Uuid;

pub use credits_common::error::ServiceError as LedgerError;
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
text_enum!(EntryKind { USAGE, CREDIT });

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
    pub access: Access,
    pub threshold: Option<Money>,
    pub threshold_version: i64,
    pub created_at: DateTime<Utc>,
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
}

impl Posting {
    pub fn kind(self) -> EntryKind {
        match self {
            Posting::Usage(_) => EntryKind::USAGE,
            Posting::Credit(_) => EntryKind::CREDIT,
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

/// The error for an unknown account, worded the same everywhere.
pub fn account_not_found(id: &AccountId) -> LedgerError {
    LedgerError::NotFound(format!("account {:?} not found", id.as_str()))
}

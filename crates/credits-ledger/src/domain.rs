//! Ledger domain: accounts, entries, the rules of R1–R5 and R12 expressed as types and
//! validated constructors. Knows neither prost nor SQL.

use chrono::{DateTime, Utc};
use credits_common::{Money, MoneyError};
use uuid::Uuid;

/// 1–64 of `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(String);

impl AccountId {
    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(AccountId(s.to_owned()))
        } else if s.is_empty() {
            Err(LedgerError::invalid("account_id: is required"))
        } else {
            Err(LedgerError::invalid(format!(
                "account_id: must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-' (got {:?})",
                truncate(s, 80)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client-chosen key, 1–255 characters, scoped per account (R12).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        if s.is_empty() {
            return Err(LedgerError::invalid("idempotency_key: is required"));
        }
        if s.chars().count() > 255 {
            return Err(LedgerError::invalid(
                "idempotency_key: at most 255 characters",
            ));
        }
        Ok(IdempotencyKey(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a free-text field's length.
pub fn bounded_text(field: &str, s: &str, max: usize) -> Result<String, LedgerError> {
    if s.chars().count() > max {
        return Err(LedgerError::invalid(format!(
            "{field}: at most {max} characters"
        )));
    }
    Ok(s.to_owned())
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident),+ $(,)? }) => {
        $(#[$m])*
        // Variants are spelled as in the contract, the database and events.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// The name used in the database and in events.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }

            pub fn from_db(s: &str) -> Result<Self, LedgerError> {
                match s {
                    $(stringify!($variant) => Ok($name::$variant),)+
                    other => Err(LedgerError::Internal(format!(
                        concat!("unknown ", stringify!($name), " {:?} in database"), other))),
                }
            }
        }
    };
}

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
    pub created_at: DateTime<Utc>,
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

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl LedgerError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        LedgerError::InvalidArgument(msg.into())
    }

    pub fn account_not_found(id: &AccountId) -> Self {
        LedgerError::NotFound(format!("account {:?} not found", id.as_str()))
    }
}

impl From<MoneyError> for LedgerError {
    fn from(e: MoneyError) -> Self {
        LedgerError::InvalidArgument(e.to_string())
    }
}

impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> Self {
        if credits_common::db::is_connection_error(&e) {
            return LedgerError::Unavailable(format!("database unavailable: {e}"));
        }
        if let sqlx::Error::Database(d) = &e
            && d.code().as_deref() == Some("23505")
        {
            return LedgerError::AlreadyExists(d.message().to_owned());
        }
        tracing::error!(error = %e, "database error");
        LedgerError::Internal("internal database error".to_owned())
    }
}

impl From<LedgerError> for tonic::Status {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            LedgerError::NotFound(m) => tonic::Status::not_found(m),
            LedgerError::AlreadyExists(m) => tonic::Status::already_exists(m),
            LedgerError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            LedgerError::Unavailable(m) => tonic::Status::unavailable(m),
            LedgerError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_follow_the_contract() {
        assert!(AccountId::parse("acct_42-A").is_ok());
        assert!(AccountId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "has space", "ünï", "a/b", &"a".repeat(65)] {
            let e = AccountId::parse(bad).unwrap_err();
            assert!(e.to_string().starts_with("account_id:"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn idempotency_keys_are_required_and_bounded() {
        assert!(IdempotencyKey::parse("k").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }
}

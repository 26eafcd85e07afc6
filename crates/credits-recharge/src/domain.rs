//! Recharge domain: settings with the rules of R6, attempts and their states, and the
//! top-up amount of R8. No I/O.

use chrono::{DateTime, Utc};
use credits_common::Money;
use credits_common::text_enum;

use credits_common::error::ServiceError;
pub use credits_common::ids::AccountId;

text_enum!(
    /// Why auto-recharge is off (`NONE` while it is on, or never configured).
    DisabledReason { NONE, USER, DEFAULT_PAYMENT_METHOD_NOT_CARD, NO_DEFAULT_PAYMENT_METHOD, REPEATED_FAILURES, DISPUTED }
);
text_enum!(
    /// `SKIPPED`: due, but the month's allowance was spent (R19); never charged.
    AttemptStatus { PENDING, CHARGING, SUCCEEDED, FAILED, SKIPPED }
);

/// R11: this many failed top-ups in a row turn auto-recharge off.
pub const MAX_CONSECUTIVE_FAILURES: i32 = 3;

#[derive(Clone, Debug)]
pub struct Settings {
    pub account_id: String,
    pub enabled: bool,
    pub threshold: Money,
    pub target: Money,
    pub disabled_reason: DisabledReason,
    pub consecutive_failures: i32,
    pub updated_at: DateTime<Utc>,
    /// Version of the last threshold written to the ledger (see the hardening migration).
    pub version: i64,
    /// Bumped by every change of the settings row: a decision commits only at the
    /// revision it read.
    pub revision: i64,
    /// A balance check that is due, and why.
    pub due: Option<Due>,
    /// R19: the most succeeded top-ups may charge in one calendar month (UTC).
    pub monthly_limit: Option<Money>,
}

/// R19: what a due top-up of `due` becomes under a monthly limit, with `charged` already
/// charged this month.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowance {
    /// Charge this (the whole due amount, or what is left of the month's allowance when
    /// that is at least the minimum purchase), rounded down to the cent.
    Charge(Money),
    /// Not charged this month: record a SKIPPED attempt.
    Skip,
}

pub fn allowance(
    due: Money,
    limit: Option<Money>,
    charged: Money,
    min_purchase: Money,
) -> Allowance {
    let Some(limit) = limit else {
        return Allowance::Charge(due);
    };
    let left = (limit - charged).floor_cents();
    if due <= left {
        Allowance::Charge(due)
    } else if left >= min_purchase {
        Allowance::Charge(left)
    } else {
        Allowance::Skip
    }
}

/// "Now" for the monthly limit (R19): the database's clock — one clock for every replica,
/// so a decision never reads an earlier month than a success it follows — plus an offset
/// that only tests move (to turn the month without waiting for it).
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_secs: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Clock {
    /// Seconds added to the database's `now()` wherever R19 reads the time.
    pub fn offset_secs(&self) -> f64 {
        self.offset_secs.load(std::sync::atomic::Ordering::Relaxed) as f64
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: std::time::Duration) {
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        self.offset_secs
            .fetch_add(secs, std::sync::atomic::Ordering::Relaxed);
    }
}

/// R19: a monthly limit must be at least the minimum purchase (else no top-up could ever
/// be charged under it).
pub fn validate_monthly_limit(
    limit: Option<Money>,
    min_purchase: Money,
) -> Result<(), RechargeError> {
    match limit {
        Some(l) if l < min_purchase => Err(RechargeError::invalid(format!(
            "monthly_limit: must be at least the minimum purchase ${min_purchase} (R19); got ${l}"
        ))),
        _ => Ok(()),
    }
}

/// A due balance check: what made it due, and the crossing event if one did.
#[derive(Clone, Debug)]
pub struct Due {
    pub trigger: String,
    pub event_id: Option<String>,
    /// When it is due (now, for a crossing; the month's turn, after a skipped top-up).
    pub at: Option<DateTime<Utc>>,
}

/// Why a balance check (and the attempt it may decide) happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A posting took the balance from at or above the threshold to below it (R7).
    ThresholdCrossed,
    /// Auto-recharge was enabled (R7: enabling while already below tops up).
    EnabledBelowThreshold,
    /// A top-up landed; usage may have outrun it (R9).
    StillBelowThreshold,
    /// The retry delay after a declined top-up passed (R11).
    RetryAfterFailure,
    /// The reconciler found the balance below the threshold with nothing due or in flight
    /// (a crossing lost outside our control, e.g. while the queue was deleted).
    FoundBelowThreshold,
    /// R19: the month turned after a top-up was skipped for the monthly limit.
    MonthTurned,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::ThresholdCrossed => "threshold_crossed",
            Trigger::EnabledBelowThreshold => "enabled_below_threshold",
            Trigger::StillBelowThreshold => "still_below_threshold",
            Trigger::RetryAfterFailure => "retry_after_failure",
            Trigger::FoundBelowThreshold => "found_below_threshold",
            Trigger::MonthTurned => "month_turned",
        }
    }
}

/// An attempt held by one worker: every write it makes shows `owner`, so a worker that
/// lost its lease (paused past it, slow) can no longer move the attempt on.
#[derive(Clone, Debug)]
pub struct Lease {
    pub attempt: Attempt,
    pub owner: uuid::Uuid,
}

/// Validates R6: `0 < threshold < target` and `target - threshold >= min_purchase`, so
/// that every top-up is a valid purchase. A threshold of 0 is refused: a prepaid balance
/// that stops at exactly 0.00 is suspended without ever going *below* 0, so it would never
/// cross it and never be topped up.
pub fn validate_amounts(
    threshold: Money,
    target: Money,
    min_purchase: Money,
) -> Result<(), RechargeError> {
    if !threshold.is_positive() {
        return Err(RechargeError::invalid(
            "threshold: must be greater than zero; a balance that stops at 0.00 never goes below 0 (R6)",
        ));
    }
    if threshold >= target {
        return Err(RechargeError::invalid(format!(
            "target: must be greater than threshold (threshold {threshold}, target {target}) (R6)"
        )));
    }
    if target - threshold < min_purchase {
        return Err(RechargeError::invalid(format!(
            "target: must be at least the minimum purchase (${min_purchase}) above threshold (R6)"
        )));
    }
    Ok(())
}

/// R8: what brings `balance` up to `target`, rounded up to the cent.
pub fn top_up_amount(target: Money, balance: Money) -> Money {
    (target - balance).ceil_to_cents()
}

#[derive(Clone, Debug)]
pub struct Attempt {
    pub seq: i64,
    pub attempt_id: String,
    pub account_id: String,
    pub trigger: String,
    pub balance_at_trigger: Money,
    pub amount: Money,
    pub status: AttemptStatus,
    pub payment_method_id: Option<String>,
    pub charge_id: Option<String>,
    pub failure_code: String,
    pub retries: i32,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl Attempt {
    /// The idempotency key of both the charge and the ledger credit of this attempt: the
    /// same on every retry and every worker.
    pub fn key(&self) -> String {
        format!("recharge:{}", self.attempt_id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m(s: &str) -> Money {
        Money::parse_non_negative("x", s).unwrap()
    }

    #[test]
    fn top_up_reaches_target_rounded_up_r8() {
        assert_eq!(top_up_amount(m("50"), m("9.99")).to_wire(), "40.01");
        assert_eq!(top_up_amount(m("50"), m("9.991")).to_wire(), "40.01");
        assert_eq!(top_up_amount(m("50"), m("9.999999999")).to_wire(), "40.01");
        assert_eq!(
            top_up_amount(m("50"), Money::ZERO - m("3.5")).to_wire(),
            "53.50"
        );
    }

    #[test]
    fn settings_follow_r6() {
        let min = m("5");
        assert!(validate_amounts(m("10"), m("50"), min).is_ok());
        assert!(validate_amounts(m("0.01"), m("5.01"), min).is_ok());
        assert!(validate_amounts(m("0"), m("5"), min).is_err());
        assert!(validate_amounts(m("10"), m("10"), min).is_err());
        assert!(validate_amounts(m("10"), m("9"), min).is_err());
        assert!(validate_amounts(m("10"), m("14.99"), min).is_err());
    }
}

/// Why recharge refused or could not carry out a request: one variant per cause. Each cause
/// has one gRPC class (`From<RechargeError> for ServiceError`, matched exhaustively).
#[derive(Clone, Debug, thiserror::Error)]
pub enum RechargeError {
    /// A field breaks a rule (R6, R21, R22, …); the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("account {:?} not found", .0.as_str())]
    AccountNotFound(AccountId),
    /// R5: contract accounts are invoiced, never topped up.
    #[error(
        "auto-recharge does not apply to contract accounts; they are invoiced under their contract (R5)"
    )]
    ContractAccount,
    /// R10: the default payment method is a bank account.
    #[error(
        "auto-recharge needs a credit or debit card as the default payment method; the default is a US bank account (R10)"
    )]
    DefaultNotCard,
    /// R10: there is no default payment method.
    #[error(
        "auto-recharge needs a default payment method, and the account has none; add a card (R10)"
    )]
    NoDefaultMethod,
    /// A peer (ledger, payments) answered that the request itself cannot be carried out;
    /// its class and words are kept.
    #[error("{0}")]
    PeerRefused(ServiceError),
    /// A write refused by a uniqueness rule of the store.
    #[error("{0}")]
    Conflict(String),
    /// The database or a peer is down, or the settings are being changed concurrently:
    /// retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<RechargeError> for ServiceError {
    fn from(e: RechargeError) -> Self {
        let msg = e.to_string();
        match e {
            RechargeError::Invalid(_) => ServiceError::InvalidArgument(msg),
            RechargeError::AccountNotFound(_) => ServiceError::NotFound(msg),
            RechargeError::ContractAccount
            | RechargeError::DefaultNotCard
            | RechargeError::NoDefaultMethod => ServiceError::FailedPrecondition(msg),
            RechargeError::PeerRefused(class) => class,
            RechargeError::Conflict(_) => ServiceError::AlreadyExists(msg),
            RechargeError::Unavailable(_) => ServiceError::Unavailable(msg),
            RechargeError::Internal(_) => ServiceError::Internal(msg),
        }
    }
}

credits_common::domain_error!(RechargeError);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod error_tests {
    use super::*;

    #[test]
    fn each_cause_has_its_class_and_a_peer_keeps_its_own() {
        for e in [
            RechargeError::ContractAccount,
            RechargeError::DefaultNotCard,
            RechargeError::NoDefaultMethod,
        ] {
            assert_eq!(
                tonic::Status::from(e).code(),
                tonic::Code::FailedPrecondition
            );
        }
        let peer = RechargeError::PeerRefused(ServiceError::NotFound("account gone".into()));
        let s = tonic::Status::from(peer.clone());
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::NotFound, "account gone")
        );
        assert!(!peer.is_transient());
        assert!(RechargeError::Unavailable("payments".into()).is_transient());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod allowance_tests {
    use super::*;

    fn m(s: &str) -> Money {
        Money::parse_non_negative("m", s).unwrap()
    }

    #[test]
    fn a_monthly_limit_reduces_or_skips_a_top_up_r19() {
        let min = m("5");
        assert_eq!(
            allowance(m("40"), None, m("1000"), min),
            Allowance::Charge(m("40"))
        );
        assert_eq!(
            allowance(m("40"), Some(m("100")), m("60"), min),
            Allowance::Charge(m("40"))
        );
        // Reduced to what is left, when that is at least the minimum purchase.
        assert_eq!(
            allowance(m("40"), Some(m("100")), m("80"), min),
            Allowance::Charge(m("20"))
        );
        assert_eq!(
            allowance(m("40"), Some(m("100")), m("95"), min),
            Allowance::Charge(m("5"))
        );
        // Rounded down to the cent: the limit is never passed.
        assert_eq!(
            allowance(m("40"), Some(m("100.009")), m("90"), min),
            Allowance::Charge(m("10.00"))
        );
        assert_eq!(
            allowance(m("40"), Some(m("100")), m("95.01"), min),
            Allowance::Skip
        );
        assert_eq!(
            allowance(m("40"), Some(m("100")), m("100"), min),
            Allowance::Skip
        );
        assert!(validate_monthly_limit(Some(m("4.99")), min).is_err());
        assert!(validate_monthly_limit(Some(m("5")), min).is_ok());
    }
}

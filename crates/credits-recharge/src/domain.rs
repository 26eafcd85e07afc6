//! Recharge domain: settings with the rules of R6, attempts and their states, and the
//! top-up amount of R8. No I/O.

use chrono::{DateTime, Utc};
use credits_common::Money;
use credits_common::text_enum;

pub use credits_common::error::ServiceError as RechargeError;
pub use credits_common::ids::AccountId;

text_enum!(
    /// Why auto-recharge is off (`NONE` while it is on, or never configured).
    DisabledReason { NONE, USER, DEFAULT_PAYMENT_METHOD_NOT_CARD, NO_DEFAULT_PAYMENT_METHOD, REPEATED_FAILURES }
);
text_enum!(AttemptStatus {
    PENDING,
    CHARGING,
    SUCCEEDED,
    FAILED
});

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
}

/// Validates R6: `0 <= threshold < target` and `target - threshold >= min_purchase`, so
/// that every top-up is a valid purchase.
pub fn validate_amounts(
    threshold: Money,
    target: Money,
    min_purchase: Money,
) -> Result<(), RechargeError> {
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
        assert!(validate_amounts(m("0"), m("5"), min).is_ok());
        assert!(validate_amounts(m("10"), m("10"), min).is_err());
        assert!(validate_amounts(m("10"), m("9"), min).is_err());
        assert!(validate_amounts(m("10"), m("14.99"), min).is_err());
    }
}

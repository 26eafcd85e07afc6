//! Payments domain: payment methods (a sum type: card or US bank account), charges and
//! their state machine, and the validation of card and bank details. No I/O.

use chrono::{DateTime, Datelike, Utc};
use credits_common::Money;
use credits_common::text_enum;

use credits_common::error::ServiceError;
pub use credits_common::ids::{AccountId, IdempotencyKey, bounded_text, description_text};

text_enum!(
    /// R10: only cards can back auto-recharge.
    MethodType { CARD, US_BANK_ACCOUNT }
);
text_enum!(
    /// `PROCESSING` is internal (processor outcome not known yet) and reads as `PENDING`
    /// on the wire; `PENDING` is an ACH debit waiting to settle; `REQUIRES_ACTION` (R25)
    /// reads as `FAILED` with `authentication_required` and may still succeed once the
    /// customer confirms on-session.
    ChargeStatus { PROCESSING, PENDING, REQUIRES_ACTION, SUCCEEDED, FAILED }
);
text_enum!(
    /// R27: `PROCESSING` until the processor answered; `FAILED` means the debit was reversed.
    RefundStatus { PROCESSING, SUCCEEDED, FAILED }
);
text_enum!(
    /// Why the charge exists: a plain `Charge`, a `PurchaseCredits` that must end in
    /// exactly one ledger credit, or an auto-recharge top-up (`Charge` with `top_up`),
    /// credited by recharge — or by payments after an on-session confirmation (R25).
    Purpose { CHARGE, PURCHASE, TOPUP }
);

impl ChargeStatus {
    /// Published as finished (`charge.succeeded` / `charge.failed`): a charge waiting for
    /// the customer's confirmation has failed as far as an off-session caller is concerned.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ChargeStatus::SUCCEEDED | ChargeStatus::FAILED | ChargeStatus::REQUIRES_ACTION
        )
    }
}

/// R25: the failure code a charge waiting for the customer reads with.
pub const AUTHENTICATION_REQUIRED: &str = "authentication_required";

/// Card details as they arrive, only ever handed to the processor. `Debug` masks them so
/// that no log line can carry the number or CVC (R14).
pub struct CardDetails {
    pub number: String,
    pub exp_month: u32,
    pub exp_year: u32,
    pub cvc: String,
}

impl std::fmt::Debug for CardDetails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CardDetails(****{}, {:02}/{})",
            self.last4(),
            self.exp_month,
            self.exp_year
        )
    }
}

impl CardDetails {
    /// Validates number (digits, 12–19 long, Luhn), expiry (not in the past) and CVC.
    /// Spaces and dashes in the number are ignored, as card forms allow them.
    pub fn parse(
        number: &str,
        exp_month: u32,
        exp_year: u32,
        cvc: &str,
        now: DateTime<Utc>,
    ) -> Result<Self, PaymentsError> {
        let digits: String = number.chars().filter(|c| *c != ' ' && *c != '-').collect();
        if digits.is_empty() {
            return Err(PaymentsError::invalid("card.number: is required"));
        }
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PaymentsError::invalid(
                "card.number: must contain only digits",
            ));
        }
        if !(12..=19).contains(&digits.len()) {
            return Err(PaymentsError::invalid(
                "card.number: must be 12 to 19 digits",
            ));
        }
        if !luhn_valid(&digits) {
            return Err(PaymentsError::invalid(
                "card.number: is not a valid card number (checksum)",
            ));
        }
        if !(1..=12).contains(&exp_month) {
            return Err(PaymentsError::invalid("card.exp_month: must be 1 to 12"));
        }
        if !(2000..=2100).contains(&exp_year) {
            return Err(PaymentsError::invalid(
                "card.exp_year: must be a four-digit year",
            ));
        }
        if (exp_year as i32, exp_month) < (now.year(), now.month()) {
            return Err(PaymentsError::invalid(
                "card.exp_year: the card has expired",
            ));
        }
        if !(3..=4).contains(&cvc.len()) || !cvc.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PaymentsError::invalid("card.cvc: must be 3 or 4 digits"));
        }
        Ok(CardDetails {
            number: digits,
            exp_month,
            exp_year,
            cvc: cvc.to_owned(),
        })
    }

    pub fn last4(&self) -> &str {
        &self.number[self.number.len().saturating_sub(4)..]
    }
}

pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0u32;
    for (i, b) in digits.bytes().rev().enumerate() {
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum.is_multiple_of(10)
}

pub struct BankAccountDetails {
    pub routing_number: String,
    pub account_number: String,
    pub holder_name: String,
}

impl std::fmt::Debug for BankAccountDetails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BankAccountDetails({}, ****{})",
            self.routing_number,
            self.last4()
        )
    }
}

impl BankAccountDetails {
    pub fn parse(routing: &str, account: &str, holder: &str) -> Result<Self, PaymentsError> {
        if routing.len() != 9 || !routing.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PaymentsError::invalid(
                "us_bank_account.routing_number: must be 9 digits",
            ));
        }
        if !aba_checksum_valid(routing) {
            return Err(PaymentsError::invalid(
                "us_bank_account.routing_number: is not a valid ABA routing number",
            ));
        }
        if !(4..=17).contains(&account.len()) || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PaymentsError::invalid(
                "us_bank_account.account_number: must be 4 to 17 digits",
            ));
        }
        // R21 on what was sent, before trimming: "Jane\r\n" is refused, not cleaned up.
        let holder_name =
            credits_common::ids::display_text("us_bank_account.holder_name", holder, 200)?
                .trim()
                .to_owned();
        if holder_name.is_empty() {
            return Err(PaymentsError::invalid(
                "us_bank_account.holder_name: is required",
            ));
        }
        Ok(BankAccountDetails {
            routing_number: routing.to_owned(),
            account_number: account.to_owned(),
            holder_name,
        })
    }

    pub fn last4(&self) -> &str {
        &self.account_number[self.account_number.len().saturating_sub(4)..]
    }
}

fn aba_checksum_valid(r: &str) -> bool {
    let d: Vec<u32> = r.bytes().map(|b| u32::from(b - b'0')).collect();
    (3 * (d[0] + d[3] + d[6]) + 7 * (d[1] + d[4] + d[7]) + (d[2] + d[5] + d[8])).is_multiple_of(10)
}

#[derive(Debug)]
pub enum NewMethod {
    Card(CardDetails),
    UsBankAccount(BankAccountDetails),
    /// R24: a payment method made at the processor by the customer's browser (`pm_…`).
    Token(String),
}

#[derive(Clone, Debug)]
pub struct PaymentMethod {
    pub payment_method_id: String,
    pub account_id: String,
    pub method_type: MethodType,
    pub brand: String,
    pub last4: String,
    pub exp_month: Option<i32>,
    pub exp_year: Option<i32>,
    pub is_default: bool,
    pub processor_token: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub struct Charge {
    pub seq: i64,
    pub charge_id: String,
    pub account_id: String,
    pub purpose: Purpose,
    pub payment_method_id: String,
    pub payment_method_type: MethodType,
    pub requested_method_id: String,
    pub amount: Money,
    pub description: String,
    pub idempotency_key: String,
    pub status: ChargeStatus,
    pub failure_code: String,
    pub processor_attempts: i32,
    pub ledger_entry_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub refunded_amount: Money,
    pub disputed_amount: Money,
    /// R25: set while the customer's confirmation is outstanding.
    pub action_client_secret: Option<String>,
    /// R25: when the bank first asked for the customer (kept after a confirmation).
    pub action_required_at: Option<DateTime<Utc>>,
    pub processor_charge_id: Option<String>,
}

impl Charge {
    /// Whether payments itself owes this charge its one ledger credit: a purchase, or a
    /// top-up the customer confirmed on-session (recharge gave that one up as failed).
    pub fn credited_by_payments(&self) -> bool {
        self.purpose == Purpose::PURCHASE
            || (self.purpose == Purpose::TOPUP && self.action_required_at.is_some())
    }
}

/// R27: a refund of (part of) a charge.
#[derive(Clone, Debug)]
pub struct Refund {
    pub seq: i64,
    pub refund_id: String,
    pub account_id: String,
    pub charge_id: String,
    pub amount: Money,
    pub reason: String,
    pub idempotency_key: Option<String>,
    pub status: RefundStatus,
    pub failure_code: String,
    pub processor_refund_id: Option<String>,
    pub ledger_entry_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A validated `RefundCharge`.
#[derive(Clone, Debug)]
pub struct RefundRequest {
    pub account_id: AccountId,
    pub charge_id: String,
    pub amount: Money,
    pub idempotency_key: IdempotencyKey,
    pub reason: String,
}

impl RefundRequest {
    /// Whether a stored refund answers this same request (R12).
    pub fn matches(&self, r: &Refund) -> bool {
        r.charge_id == self.charge_id && r.amount == self.amount && r.reason == self.reason
    }
}

/// A validated request to charge.
#[derive(Clone, Debug)]
pub struct ChargeRequest {
    pub account_id: AccountId,
    pub amount: Money,
    /// Empty = the account's default method.
    pub payment_method_id: String,
    pub idempotency_key: IdempotencyKey,
    pub description: String,
    pub purpose: Purpose,
}

impl ChargeRequest {
    /// Whether a stored charge answers this same request (R12).
    pub fn matches(&self, c: &Charge) -> bool {
        // A top-up recorded as a plain charge before top-ups were told apart (or sent by a
        // recharge replica that does not say so yet) is the same request.
        let same_purpose = c.purpose == self.purpose
            || matches!(
                (c.purpose, self.purpose),
                (Purpose::CHARGE, Purpose::TOPUP) | (Purpose::TOPUP, Purpose::CHARGE)
            );
        same_purpose
            && c.amount == self.amount
            && c.requested_method_id == self.payment_method_id
            && c.description == self.description
    }
}

/// Parses a charge amount: positive, whole cents (R1).
pub fn parse_cents(field: &str, s: &str) -> Result<Money, PaymentsError> {
    let m = Money::parse_positive(field, s)?;
    if !m.is_whole_cents() {
        return Err(PaymentsError::invalid(format!(
            "{field}: card and bank charges are whole cents (got {s:?})"
        )));
    }
    Ok(m)
}

pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-24T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn sandbox_test_cards_pass_luhn() {
        for n in [
            "4242424242424242",
            "5555555555554444",
            "4000000000000002",
            "4000000000009995",
            "4000000000000069",
            "4000000000000119",
        ] {
            assert!(luhn_valid(n), "{n}");
        }
        assert!(!luhn_valid("4242424242424241"));
    }

    #[test]
    fn card_validation_names_the_field() {
        let ok = CardDetails::parse("4242 4242 4242 4242", 12, 2030, "123", now()).unwrap();
        assert_eq!(ok.last4(), "4242");
        assert!(
            !format!("{ok:?}").contains("42424242"),
            "Debug masks the number"
        );
        for (n, m, y, c, field) in [
            ("", 1, 2030, "123", "card.number"),
            ("4242x242424242424", 1, 2030, "123", "card.number"),
            ("4242424242424241", 1, 2030, "123", "card.number"),
            ("42424", 1, 2030, "123", "card.number"),
            ("4242424242424242", 13, 2030, "123", "card.exp_month"),
            ("4242424242424242", 10, 2026, "123", "card.exp_year"),
            ("4242424242424242", 1, 2030, "12", "card.cvc"),
        ] {
            let e = CardDetails::parse(n, m, y, c, now()).unwrap_err();
            assert!(e.to_string().starts_with(field), "{n} {m} {y} {c}: {e}");
        }
        assert!(
            CardDetails::parse("4242424242424242", 11, 2026, "123", now()).is_ok(),
            "this month is still valid"
        );
    }

    #[test]
    fn bank_accounts_validate_routing_checksum() {
        assert!(BankAccountDetails::parse("110000000", "000123456789", "Jane Roe").is_ok());
        assert!(BankAccountDetails::parse("110000001", "000123456789", "Jane Roe").is_err());
        assert!(BankAccountDetails::parse("110000000", "12", "Jane Roe").is_err());
        assert!(BankAccountDetails::parse("110000000", "000123456789", " ").is_err());
    }

    #[test]
    fn charges_are_whole_cents() {
        assert!(parse_cents("amount", "40.01").is_ok());
        assert!(parse_cents("amount", "40.011").is_err());
        assert!(parse_cents("amount", "0").is_err());
    }
}

/// Why payments refused or could not carry out a request: one variant per cause. Each cause
/// has one gRPC class (`From<PaymentsError> for ServiceError`, matched exhaustively).
#[derive(Clone, Debug, thiserror::Error)]
pub enum PaymentsError {
    /// A field breaks a rule (R21, R22, card details, …); the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The processor refused the request itself (not a decline, which is a FAILED charge).
    #[error("{0}")]
    ProcessorRejected(String),
    #[error("account {:?} not found", .0.as_str())]
    AccountNotFound(AccountId),
    #[error("payment method {id:?} not found on account {:?}", .account.as_str())]
    MethodNotFound { account: AccountId, id: String },
    #[error("charge {id:?} not found on account {:?}", .account.as_str())]
    ChargeNotFound { account: AccountId, id: String },
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
    #[error(
        "account {:?} has no default payment method; add one or name payment_method_id",
        .0.as_str()
    )]
    NoDefaultMethod(AccountId),
    /// R3: a purchase below the configured minimum.
    #[error("a credit purchase must be at least ${min} (R3); got ${amount}")]
    BelowMinimumPurchase { min: Money, amount: Money },
    /// The ledger, the database or the processor is down: retry with the same key.
    #[error("{0}")]
    Unavailable(String),
    /// A rule refuses it (R24 raw details with a real processor, R27 refund limits, a
    /// charge with nothing to confirm); the words say which.
    #[error("{0}")]
    Refused(String),
    #[error("refund {id:?} not found on account {:?}", .account.as_str())]
    RefundNotFound { account: AccountId, id: String },
    #[error("{0}")]
    Internal(String),
}

impl From<PaymentsError> for ServiceError {
    fn from(e: PaymentsError) -> Self {
        let msg = e.to_string();
        match e {
            PaymentsError::Invalid(_) | PaymentsError::ProcessorRejected(_) => {
                ServiceError::InvalidArgument(msg)
            }
            PaymentsError::AccountNotFound(_)
            | PaymentsError::MethodNotFound { .. }
            | PaymentsError::ChargeNotFound { .. }
            | PaymentsError::RefundNotFound { .. } => ServiceError::NotFound(msg),
            PaymentsError::IdempotencyConflict { .. } | PaymentsError::Conflict(_) => {
                ServiceError::AlreadyExists(msg)
            }
            PaymentsError::NoDefaultMethod(_)
            | PaymentsError::BelowMinimumPurchase { .. }
            | PaymentsError::Refused(_) => ServiceError::FailedPrecondition(msg),
            PaymentsError::Unavailable(_) => ServiceError::Unavailable(msg),
            PaymentsError::Internal(_) => ServiceError::Internal(msg),
        }
    }
}

credits_common::domain_error!(PaymentsError);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod error_tests {
    use super::*;

    #[test]
    fn each_cause_has_its_class_and_its_words() {
        let acct = AccountId::parse("acme").unwrap();
        let cases = [
            (
                PaymentsError::BelowMinimumPurchase {
                    min: Money::parse_positive("m", "5").unwrap(),
                    amount: Money::parse_positive("a", "1").unwrap(),
                },
                tonic::Code::FailedPrecondition,
                "a credit purchase must be at least $5.00 (R3); got $1.00",
            ),
            (
                PaymentsError::NoDefaultMethod(acct.clone()),
                tonic::Code::FailedPrecondition,
                r#"account "acme" has no default payment method; add one or name payment_method_id"#,
            ),
            (
                PaymentsError::MethodNotFound {
                    account: acct.clone(),
                    id: "pm_1".into(),
                },
                tonic::Code::NotFound,
                r#"payment method "pm_1" not found on account "acme""#,
            ),
            (
                PaymentsError::ProcessorRejected("card_number: invalid".into()),
                tonic::Code::InvalidArgument,
                "card_number: invalid",
            ),
        ];
        for (e, code, msg) in cases {
            assert!(!e.is_transient());
            let s = tonic::Status::from(e);
            assert_eq!((s.code(), s.message()), (code, msg));
        }
        assert!(PaymentsError::Unavailable("ledger".into()).is_transient());
    }
}

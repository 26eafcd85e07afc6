//! Raw prost requests, every field as given, for what the typed client refuses to send
//! (amounts it would not parse or would re-spell, empty keys, control characters, unknown
//! enum numbers). Change a field with struct update syntax: `RecordUsageRequest {
//! description: "bad\0".into(), ..raw::usage(..) }`.

use credits_proto::ledger::v1 as lpb;
use credits_proto::payments::v1 as ppb;

/// API-request usage.
pub fn usage(account: &str, amount: &str, key: &str, description: &str) -> lpb::RecordUsageRequest {
    lpb::RecordUsageRequest {
        account_id: account.into(),
        category: lpb::UsageCategory::ApiRequests as i32,
        amount: amount.into(),
        idempotency_key: key.into(),
        description: description.into(),
    }
}

/// A credit with no reference and no description.
pub fn credit(
    account: &str,
    amount: &str,
    source: lpb::CreditSource,
    key: &str,
) -> lpb::AddCreditsRequest {
    lpb::AddCreditsRequest {
        account_id: account.into(),
        amount: amount.into(),
        source: source as i32,
        reference: String::new(),
        idempotency_key: key.into(),
        description: String::new(),
    }
}

/// A purchase with the default payment method.
pub fn purchase(account: &str, amount: &str, key: &str) -> ppb::PurchaseCreditsRequest {
    ppb::PurchaseCreditsRequest {
        account_id: account.into(),
        amount: amount.into(),
        payment_method_id: String::new(),
        idempotency_key: key.into(),
    }
}

//! The event contract (docs/events.md): every event any daemon publishes,
//! as one type. [`Event`] has one variant per routing key and its payload is the `data`
//! object; [`Envelope`] is the message body around it. Publishers build an `Event` and hand
//! it to [`crate::outbox::enqueue`]; consumers call [`Envelope::parse`] and `match` on the
//! event. The ledger writes its events in PL/pgSQL (`ledger_event`, in its migrations); the
//! golden test in `tests/ledger.rs` holds that SQL to this type.
//!
//! Compatibility rules, which the contract promises its consumers: routing keys and field
//! names are never renamed or removed; fields and event types may be added. So a reader
//! ignores fields it does not know, and an event type it does not know is reported as
//! [`EventParseError::UnknownType`] (acknowledge and move on), not as a broken message.
//! `docs/events.md` carries the table of this type; a unit test fails when they differ.

use chrono::{DateTime, Utc};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::Money;
use crate::ids::AccountId;

/// The version of the envelope and payload shapes, sent as `schema_version`. Additions (new
/// events, new fields) do not change it: only a change an old reader could misread would,
/// and the contract rules those out. An envelope without it is version 1 (written before the
/// field existed).
pub const SCHEMA_VERSION: u32 = 1;

/// Declares [`Event`] with its routing keys in one place, so a variant's serde tag and its
/// [`Event::routing_key`] cannot drift apart.
macro_rules! contract {
    ($( $(#[$doc:meta])* $variant:ident($payload:ty) = $key:literal, )+) => {
        /// One event of the contract; serialised adjacently tagged, the routing key in
        /// `type` and the payload in `data`, as in the envelope.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type", content = "data")]
        pub enum Event {
            $( $(#[$doc])* #[serde(rename = $key)] $variant($payload), )+
        }

        impl Event {
            /// Every routing key of the contract, in declaration order.
            pub const ROUTING_KEYS: &'static [&'static str] = &[$($key),+];

            /// The routing key this event is published with (and its `type`).
            pub fn routing_key(&self) -> &'static str {
                match self { $( Event::$variant(_) => $key, )+ }
            }

            /// The `data` fields of a routing key's payload, in declaration order.
            pub fn data_fields(routing_key: &str) -> Option<&'static [&'static str]> {
                match routing_key {
                    $( $key => Some(struct_fields::<$payload>()), )+
                    _ => None,
                }
            }

            fn serialize_data<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self { $( Event::$variant(p) => p.serialize(s), )+ }
            }
        }
    };
}

contract! {
    /// R7/R17: a posting or a hold moved the available balance from at-or-above the
    /// threshold to below it.
    BalanceThresholdCrossed(ThresholdCrossed) = "ledger.balance.threshold_crossed",
    /// R4/R16: a prepaid account's available balance reached zero or below.
    AccountSuspended(AccountBalance) = "ledger.account.suspended",
    /// R4/R16: a suspended account's available balance came back above zero.
    AccountReactivated(AccountBalance) = "ledger.account.reactivated",
    /// R3: a pending account's first purchase granted access (an addition to docs/events.md).
    AccountActivated(AccountBalance) = "ledger.account.activated",
    /// R15.
    HoldCreated(HoldCreated) = "ledger.hold.created",
    /// R15.
    HoldCaptured(HoldCaptured) = "ledger.hold.captured",
    /// R15.
    HoldReleased(HoldEnded) = "ledger.hold.released",
    /// R15.
    HoldExpired(HoldEnded) = "ledger.hold.expired",
    /// R18: the available balance fell below one of the account's alert thresholds.
    BalanceAlert(BalanceAlert) = "ledger.balance.alert",
    /// R29: what was left of a grant or of purchased credits at their expiry was debited
    /// (one `EXPIRY` entry, once per lot).
    CreditsExpired(CreditsExpired) = "ledger.credits.expired",
    PaymentMethodDefaultChanged(DefaultChanged) = "payments.payment_method.default_changed",
    PaymentMethodRemoved(MethodRemoved) = "payments.payment_method.removed",
    ChargeSucceeded(ChargeFinished) = "payments.charge.succeeded",
    ChargeFailed(ChargeFinished) = "payments.charge.failed",
    /// R25: the bank wants the customer to confirm this payment on-session (it was also
    /// published as `payments.charge.failed` with `authentication_required`).
    ChargeActionRequired(ChargeFinished) = "payments.charge.action_required",
    /// R26/R27: (part of) a charge went back to the customer; its credits were debited.
    ChargeRefunded(ChargeRefunded) = "payments.charge.refunded",
    /// R26: the customer's bank disputed a charge (and again when the dispute is won).
    ChargeDisputed(ChargeDisputed) = "payments.charge.disputed",
    AttemptSucceeded(AttemptFinished) = "recharge.attempt.succeeded",
    AttemptFailed(AttemptFinished) = "recharge.attempt.failed",
    SettingsDisabled(SettingsDisabled) = "recharge.settings.disabled",
    /// R19: a due top-up was skipped: the month's allowance is spent.
    LimitReached(LimitReached) = "recharge.limit_reached",
}

// ---- payloads (`data`) ----

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdCrossed {
    pub threshold: Money,
    pub balance_before: Money,
    pub balance_after: Money,
    /// R17: balance − held before and after; what crossed. Equal to the balance without
    /// holds (absent from events written before release 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_before: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_after: Option<Money>,
    /// The entry whose posting crossed (a posting or a capture).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<Uuid>,
    /// The hold whose creation or capture crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<String>,
}

/// The account's balance after the change of access.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccountBalance {
    pub balance: Money,
    /// R16: what access followed (absent from events written before release 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_balance: Option<Money>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldCreated {
    pub hold_id: String,
    pub amount: Money,
    pub category: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldCaptured {
    pub hold_id: String,
    /// What the hold reserved.
    pub amount: Money,
    /// The final cost, posted as `entry_id`.
    pub captured_amount: Money,
    pub entry_id: Uuid,
}

/// A hold released by a caller or expired: no entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldEnded {
    pub hold_id: String,
    pub amount: Money,
}

/// R18. The available balance moved by a posting (`entry_id`) or by a hold (`hold_id`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalanceAlert {
    pub threshold: Money,
    pub available_before: Money,
    pub available_after: Money,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<String>,
}

/// R29. The lot (a grant, or the credits of one purchase) that expired, what it still held
/// (debited by the `EXPIRY` entry `entry_id`), and the account's balances after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreditsExpired {
    pub lot_id: Uuid,
    /// `GRANT`, `PURCHASE`, `AUTO_RECHARGE` or `ADJUSTMENT`.
    pub source: String,
    pub amount: Money,
    pub expires_at: DateTime<Utc>,
    /// A grant's reason (a purchase's description).
    #[serde(default)]
    pub reason: String,
    pub entry_id: Uuid,
    pub balance: Money,
    pub available_balance: Money,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DefaultChanged {
    pub payment_method_id: String,
    /// The new default's type.
    #[serde(rename = "type")]
    pub method_type: PaymentMethodType,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MethodRemoved {
    pub payment_method_id: String,
    /// True: the account now has no default payment method.
    pub was_default: bool,
    #[serde(rename = "type")]
    pub method_type: PaymentMethodType,
}

/// A charge reached a final state (`payments.charge.succeeded` / `.failed`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChargeFinished {
    pub charge_id: String,
    pub amount: Money,
    /// Empty on success; the processor's code otherwise.
    pub failure_code: String,
    pub payment_method_id: String,
    pub purpose: ChargePurpose,
}

/// R26/R27: a refund ended successfully.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChargeRefunded {
    pub charge_id: String,
    pub refund_id: String,
    pub amount: Money,
    /// The `REFUND` entry that took the credits back.
    pub ledger_entry_id: String,
    /// The processor's id of the refund (`re_…`).
    pub processor_refund_id: String,
}

/// R26: a dispute was opened (its amount debited) or, `status = won`, won (credited back).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChargeDisputed {
    pub charge_id: String,
    pub dispute_id: String,
    pub amount: Money,
    /// The processor's dispute status (`needs_response`, `won`, `lost`, …).
    pub status: String,
}

/// A top-up attempt finished (`recharge.attempt.succeeded` / `.failed`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptFinished {
    pub attempt_id: String,
    pub amount: Money,
    /// Empty when no charge was made.
    pub charge_id: String,
    /// Empty on success.
    pub failure_code: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SettingsDisabled {
    pub reason: DisabledReason,
}

/// R19: a due top-up was not charged because of the monthly limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LimitReached {
    pub monthly_limit: Money,
    pub charged_this_month: Money,
    pub due_amount: Money,
}

/// A closed list of names the contract knows today, open for the ones it will add: a value
/// this build does not know is kept as `Other` (and written back unchanged), not refused.
macro_rules! open_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($variant,)+
            /// A name added to the contract after this build.
            Other(String),
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                match self { $($name::$variant => $text,)+ $name::Other(s) => s }
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() { $($text => $name::$variant,)+ _ => $name::Other(s) }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                match v { $name::Other(s) => s, v => v.as_str().to_owned() }
            }
        }
    };
}

open_enum!(
    /// `type` of a payment method.
    PaymentMethodType { Card = "CARD", UsBankAccount = "US_BANK_ACCOUNT" }
);
open_enum!(
    /// `purpose` of a charge: a `Charge` RPC (e.g. an auto-recharge top-up) or a purchase.
    ChargePurpose { Charge = "CHARGE", Purchase = "PURCHASE", TopUp = "TOPUP" }
);
open_enum!(
    /// `reason` auto-recharge turned itself off.
    DisabledReason {
        DefaultPaymentMethodNotCard = "DEFAULT_PAYMENT_METHOD_NOT_CARD",
        NoDefaultPaymentMethod = "NO_DEFAULT_PAYMENT_METHOD",
        RepeatedFailures = "REPEATED_FAILURES",
        Disputed = "DISPUTED",
    }
);

// ---- the envelope ----

/// The body of every event message (docs/events.md):
/// `{"id", "type", "occurred_at", "account_id", "data", "schema_version"}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// UUID v7 (time-ordered); also the AMQP `message_id`. Consumers de-duplicate by it.
    pub id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub account_id: AccountId,
    pub schema_version: u32,
    /// `type` and `data`.
    pub event: Event,
}

/// Why a body is not an event this build can act on. Everything but
/// [`EventParseError::UnknownType`] means a broken message (dead-letter it).
#[derive(Debug, thiserror::Error)]
pub enum EventParseError {
    #[error("not an event envelope: {0}")]
    NotEnvelope(serde_json::Error),
    #[error("event id is not a UUID: {0:?}")]
    BadId(String),
    #[error("event account_id: {0}")]
    BadAccountId(String),
    #[error("event schema_version {0} is newer than this build's {SCHEMA_VERSION}")]
    NewerSchema(u32),
    /// A well-formed envelope whose `type` this build does not know (the contract grows):
    /// not an error of the sender's.
    #[error("event type {kind:?} is not in this build's contract")]
    UnknownType {
        id: Uuid,
        account_id: AccountId,
        kind: String,
    },
    #[error("{kind} data: {source}")]
    BadData {
        kind: &'static str,
        source: serde_json::Error,
    },
}

impl EventParseError {
    /// True for a well-formed event of a type this build does not know: acknowledge it.
    pub fn is_unknown_type(&self) -> bool {
        matches!(self, EventParseError::UnknownType { .. })
    }
}

/// The envelope as read, before its parts are checked.
#[derive(Deserialize)]
struct RawEnvelope {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    occurred_at: DateTime<Utc>,
    account_id: String,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    schema_version: Option<u32>,
}

impl Envelope {
    /// A new event about `account_id`, with a fresh v7 id, now.
    pub fn new(account_id: AccountId, event: Event) -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            occurred_at: Utc::now(),
            account_id,
            schema_version: SCHEMA_VERSION,
            event,
        }
    }

    /// Parses a message body. Unknown fields are ignored anywhere (the contract grows by
    /// adding them); an unknown `type` in an otherwise good envelope is
    /// [`EventParseError::UnknownType`]. The envelope is checked before the type, so an
    /// event of any type with a bad id or account id is broken.
    pub fn parse(body: &[u8]) -> Result<Envelope, EventParseError> {
        let raw: RawEnvelope =
            serde_json::from_slice(body).map_err(EventParseError::NotEnvelope)?;
        let id = Uuid::parse_str(&raw.id)
            .map_err(|_| EventParseError::BadId(raw.id.chars().take(80).collect()))?;
        let account_id = AccountId::parse(&raw.account_id)
            .map_err(|e| EventParseError::BadAccountId(e.to_string()))?;
        let schema_version = raw.schema_version.unwrap_or(1);
        if schema_version > SCHEMA_VERSION {
            return Err(EventParseError::NewerSchema(schema_version));
        }
        let Some(kind) = Event::ROUTING_KEYS.iter().copied().find(|k| *k == raw.kind) else {
            return Err(EventParseError::UnknownType {
                id,
                account_id,
                kind: raw.kind,
            });
        };
        let tagged = serde_json::json!({ "type": kind, "data": raw.data });
        let event = Event::deserialize(tagged)
            .map_err(|source| EventParseError::BadData { kind, source })?;
        Ok(Envelope {
            id,
            occurred_at: raw.occurred_at,
            account_id,
            schema_version,
            event,
        })
    }

    /// The body as JSON.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self.wire(self.account_id.as_str()))
    }

    fn wire<'a>(&'a self, account_id: &'a str) -> WireEnvelope<'a> {
        WireEnvelope {
            id: self.id,
            kind: self.event.routing_key(),
            occurred_at: self.occurred_at,
            account_id,
            data: Data(&self.event),
            schema_version: self.schema_version,
        }
    }
}

impl Serialize for Envelope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.wire(self.account_id.as_str()).serialize(s)
    }
}

/// The body the outbox writes for `event` (publishers hold an account id the request
/// already validated, as text).
pub(crate) fn body(
    id: Uuid,
    occurred_at: DateTime<Utc>,
    account_id: &str,
    event: &Event,
) -> Result<Value, serde_json::Error> {
    serde_json::to_value(WireEnvelope {
        id,
        kind: event.routing_key(),
        occurred_at,
        account_id,
        data: Data(event),
        schema_version: SCHEMA_VERSION,
    })
}

#[derive(Serialize)]
struct WireEnvelope<'a> {
    id: Uuid,
    #[serde(rename = "type")]
    kind: &'static str,
    occurred_at: DateTime<Utc>,
    account_id: &'a str,
    data: Data<'a>,
    schema_version: u32,
}

/// An event's payload alone, as the envelope's `data`.
struct Data<'a>(&'a Event);

impl Serialize for Data<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_data(s)
    }
}

// ---- the documented table ----

/// The routing-key/data table of `docs/events.md`, rendered from [`Event`].
pub fn markdown_table() -> String {
    let mut out = String::from("| routing key | data |\n| --- | --- |\n");
    for key in Event::ROUTING_KEYS {
        let fields = Event::data_fields(key).unwrap_or_default();
        let fields: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
        out.push_str(&format!("| `{key}` | {} |\n", fields.join(", ")));
    }
    out
}

/// The field names a derived `Deserialize` of a struct declares (serde passes them to
/// `deserialize_struct`), read without any input.
fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Fields(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names read")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> Deserializer<'de> for &mut Fields {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut f = Fields(None);
    let _ = T::deserialize(&mut f);
    f.0.unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn money(s: &str) -> Money {
        Money::parse_signed("amount", s).unwrap()
    }

    fn uuid(s: &str) -> Uuid {
        Uuid::parse_str(s).unwrap()
    }

    /// One example of every variant. The `match` makes a new variant a compile error here
    /// until it has an example.
    fn examples() -> Vec<Event> {
        let all = vec![
            Event::BalanceThresholdCrossed(ThresholdCrossed {
                threshold: money("10.00"),
                balance_before: money("25.00"),
                balance_after: money("9.99"),
                entry_id: Some(uuid("b5e136c6-5d13-48b2-b40e-f76dd3b2b3ce")),
                available_before: None,
                available_after: None,
                hold_id: None,
            }),
            Event::AccountSuspended(AccountBalance {
                balance: money("-0.01"),
                available_balance: None,
            }),
            Event::AccountReactivated(AccountBalance {
                balance: money("0.01"),
                available_balance: None,
            }),
            Event::AccountActivated(AccountBalance {
                balance: money("25.00"),
                available_balance: None,
            }),
            Event::HoldCreated(HoldCreated {
                hold_id: "hold_01".into(),
                amount: money("12.50"),
                category: "DEDICATED_ENDPOINTS".into(),
                expires_at: "2026-11-25T01:00:00Z".parse().unwrap(),
            }),
            Event::HoldCaptured(HoldCaptured {
                hold_id: "hold_01".into(),
                amount: money("12.50"),
                captured_amount: money("13.000125"),
                entry_id: uuid("0193a5b0-0000-7000-8000-000000000002"),
            }),
            Event::HoldReleased(HoldEnded {
                hold_id: "hold_01".into(),
                amount: money("12.50"),
            }),
            Event::HoldExpired(HoldEnded {
                hold_id: "hold_02".into(),
                amount: money("1.00"),
            }),
            Event::BalanceAlert(BalanceAlert {
                threshold: money("5.00"),
                available_before: money("6.00"),
                available_after: money("4.00"),
                entry_id: None,
                hold_id: Some("hold_01".into()),
            }),
            Event::CreditsExpired(CreditsExpired {
                lot_id: uuid("0193a5b0-0000-7000-8000-000000000004"),
                source: "GRANT".into(),
                amount: money("4.25"),
                expires_at: "2026-12-31T00:00:00Z".parse().unwrap(),
                reason: "Launch promotion".into(),
                entry_id: uuid("0193a5b0-0000-7000-8000-000000000005"),
                balance: money("20.00"),
                available_balance: money("20.00"),
            }),
            Event::PaymentMethodDefaultChanged(DefaultChanged {
                payment_method_id: "pm_01".into(),
                method_type: PaymentMethodType::UsBankAccount,
            }),
            Event::PaymentMethodRemoved(MethodRemoved {
                payment_method_id: "pm_01".into(),
                was_default: true,
                method_type: PaymentMethodType::Card,
            }),
            Event::ChargeSucceeded(ChargeFinished {
                charge_id: "ch_01".into(),
                amount: money("40.01"),
                failure_code: String::new(),
                payment_method_id: "pm_01".into(),
                purpose: ChargePurpose::Purchase,
            }),
            Event::ChargeFailed(ChargeFinished {
                charge_id: "ch_02".into(),
                amount: money("40.01"),
                failure_code: "card_declined".into(),
                payment_method_id: "pm_01".into(),
                purpose: ChargePurpose::Charge,
            }),
            Event::ChargeActionRequired(ChargeFinished {
                charge_id: "ch_03".into(),
                amount: money("40.01"),
                failure_code: "authentication_required".into(),
                payment_method_id: "pm_01".into(),
                purpose: ChargePurpose::Charge,
            }),
            Event::ChargeRefunded(ChargeRefunded {
                charge_id: "ch_01".into(),
                refund_id: "rf_01".into(),
                amount: money("10.00"),
                ledger_entry_id: "0193a5b0-0000-7000-8000-000000000003".into(),
                processor_refund_id: "re_01".into(),
            }),
            Event::ChargeDisputed(ChargeDisputed {
                charge_id: "ch_01".into(),
                dispute_id: "dp_01".into(),
                amount: money("40.01"),
                status: "needs_response".into(),
            }),
            Event::AttemptSucceeded(AttemptFinished {
                attempt_id: "att_01".into(),
                amount: money("40.01"),
                charge_id: "ch_01".into(),
                failure_code: String::new(),
            }),
            Event::AttemptFailed(AttemptFinished {
                attempt_id: "att_02".into(),
                amount: money("40.01"),
                charge_id: String::new(),
                failure_code: "no_default_payment_method".into(),
            }),
            Event::SettingsDisabled(SettingsDisabled {
                reason: DisabledReason::RepeatedFailures,
            }),
            Event::LimitReached(LimitReached {
                monthly_limit: money("100.00"),
                charged_this_month: money("90.00"),
                due_amount: money("40.01"),
            }),
        ];
        for e in &all {
            match e {
                Event::BalanceThresholdCrossed(_)
                | Event::AccountSuspended(_)
                | Event::AccountReactivated(_)
                | Event::AccountActivated(_)
                | Event::HoldCreated(_)
                | Event::HoldCaptured(_)
                | Event::HoldReleased(_)
                | Event::HoldExpired(_)
                | Event::BalanceAlert(_)
                | Event::CreditsExpired(_)
                | Event::PaymentMethodDefaultChanged(_)
                | Event::PaymentMethodRemoved(_)
                | Event::ChargeSucceeded(_)
                | Event::ChargeFailed(_)
                | Event::ChargeActionRequired(_)
                | Event::ChargeRefunded(_)
                | Event::ChargeDisputed(_)
                | Event::AttemptSucceeded(_)
                | Event::AttemptFailed(_)
                | Event::SettingsDisabled(_)
                | Event::LimitReached(_) => {}
            }
        }
        all
    }

    fn envelope(event: Event) -> Envelope {
        Envelope::new(AccountId::parse("acme").unwrap(), event)
    }

    #[test]
    fn there_is_an_example_of_every_routing_key() {
        let keys: Vec<&str> = examples().iter().map(Event::routing_key).collect();
        assert_eq!(keys, Event::ROUTING_KEYS);
    }

    #[test]
    fn every_variant_round_trips_through_the_envelope() {
        for event in examples() {
            let env = envelope(event);
            let body = serde_json::to_vec(&env).unwrap();
            let back = Envelope::parse(&body).unwrap();
            assert_eq!(back, env, "{}", String::from_utf8_lossy(&body));
            // And the event alone, adjacently tagged as in the envelope.
            let tagged = serde_json::to_value(&env.event).unwrap();
            assert_eq!(tagged["type"], env.event.routing_key());
            assert_eq!(serde_json::from_value::<Event>(tagged).unwrap(), env.event);
        }
    }

    #[test]
    fn the_envelope_has_exactly_the_contract_fields_and_type_is_the_routing_key() {
        for event in examples() {
            let key = event.routing_key();
            let v = envelope(event).to_value().unwrap();
            let mut fields: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            fields.sort_unstable();
            assert_eq!(
                fields,
                [
                    "account_id",
                    "data",
                    "id",
                    "occurred_at",
                    "schema_version",
                    "type"
                ]
            );
            assert_eq!(v["type"], key);
            assert_eq!(v["account_id"], "acme");
            assert_eq!(v["schema_version"], SCHEMA_VERSION);
            assert!(v["data"].is_object());
            // Money is always a string in canonical form.
            for (name, value) in v["data"].as_object().unwrap() {
                assert!(!value.is_number(), "{key}: {name} is a JSON number");
            }
        }
    }

    #[test]
    fn new_envelopes_have_v7_ids() {
        let env = envelope(examples().remove(0));
        assert_eq!(env.id.get_version_num(), 7);
    }

    /// Bodies exactly as the daemons wrote them before this type existed (ledger SQL with v4
    /// ids and `+00:00` timestamps; payments and recharge through `json!`).
    const TODAY: &[(&str, &str)] = &[
        (
            "ledger.balance.threshold_crossed",
            r#"{"id": "3c3707a2-fad1-468a-8c45-80c66c61d6a4", "data": {"entry_id": "b5e136c6-5d13-48b2-b40e-f76dd3b2b3ce", "threshold": "10.00", "balance_after": "9.99", "balance_before": "25.00"}, "type": "ledger.balance.threshold_crossed", "account_id": "acme", "occurred_at": "2026-11-25T00:27:37.231746+00:00"}"#,
        ),
        (
            "ledger.account.suspended",
            r#"{"id": "4872734c-df7d-4cc6-8c7a-ee933e8e3f57", "data": {"balance": "-0.01"}, "type": "ledger.account.suspended", "account_id": "acme", "occurred_at": "2026-11-25T00:27:37.233097+00:00"}"#,
        ),
        (
            "ledger.account.reactivated",
            r#"{"id": "4872734c-df7d-4cc6-8c7a-ee933e8e3f58", "data": {"balance": "0.01"}, "type": "ledger.account.reactivated", "account_id": "acme", "occurred_at": "2026-11-25T00:27:37.233097+00:00"}"#,
        ),
        (
            "ledger.account.activated",
            r#"{"id": "4872734c-df7d-4cc6-8c7a-ee933e8e3f59", "data": {"balance": "28.00"}, "type": "ledger.account.activated", "account_id": "acme", "occurred_at": "2026-11-25T00:27:37.233097+00:00"}"#,
        ),
        (
            "payments.payment_method.default_changed",
            r#"{"account_id":"acme","data":{"payment_method_id":"pm_0193a5b0","type":"US_BANK_ACCOUNT"},"id":"0193a5b0-0000-7000-8000-000000000001","occurred_at":"2026-11-25T00:27:37.231746123Z","type":"payments.payment_method.default_changed"}"#,
        ),
        (
            "payments.payment_method.removed",
            r#"{"account_id":"acme","data":{"payment_method_id":"pm_0193a5b0","type":"CARD","was_default":true},"id":"0193a5b0-0000-7000-8000-000000000001","occurred_at":"2026-11-25T00:27:37.231746123Z","type":"payments.payment_method.removed"}"#,
        ),
        (
            "payments.charge.succeeded",
            r#"{"account_id":"acme","data":{"amount":"40.01","charge_id":"ch_0193a5b0","failure_code":"","payment_method_id":"pm_0193a5b0","purpose":"PURCHASE"},"id":"0193a5b0-0000-7000-8000-000000000001","occurred_at":"2026-11-25T00:27:37.231746123Z","type":"payments.charge.succeeded"}"#,
        ),
        (
            "payments.charge.failed",
            r#"{"account_id":"acme","data":{"amount":"40.01","charge_id":"ch_0193a5b0","failure_code":"card_declined","payment_method_id":"pm_0193a5b0","purpose":"CHARGE"},"id":"0193a5b0-0000-7000-8000-000000000001","occurred_at":"2026-11-25T00:27:37.231746123Z","type":"payments.charge.failed"}"#,
        ),
        (
            "recharge.attempt.succeeded",
            r#"{"account_id":"acme","data":{"amount":"40.01","attempt_id":"att_0193a5b0","charge_id":"ch_0193a5b0","failure_code":""},"id":"0193a5b0-0000-7000-8000-000000000001","occurred_at":"2026-11-25T00:27:37.231746123Z","type":"recharge.attempt.succeeded"}"#,
        ),
        (
            "recharge.attempt.failed",
            r#"{"account_id":"acme","data":{"amount":"40.01","attempt_id":"att_0193a5b0","charge_id":"","failure_code":"default_payment_method_not_card"},"id":"0193a5b0-0000-7000-8000-000000000001","occurred_at":"2026-11-25T00:27:37.231746123Z","type":"recharge.attempt.failed"}"#,
        ),
        (
            "recharge.settings.disabled",
            r#"{"account_id":"acme","data":{"reason":"DEFAULT_PAYMENT_METHOD_NOT_CARD"},"id":"0193a5b0-0000-7000-8000-000000000001","occurred_at":"2026-11-25T00:27:37.231746123Z","type":"recharge.settings.disabled"}"#,
        ),
    ];

    #[test]
    fn todays_bodies_parse_and_write_back_the_same_data() {
        for (key, body) in TODAY {
            let env = Envelope::parse(body.as_bytes()).unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(env.event.routing_key(), *key);
            assert_eq!(env.account_id.as_str(), "acme");
            assert_eq!(env.schema_version, 1, "absent means 1");
            let before: Value = serde_json::from_str(body).unwrap();
            let after = env.to_value().unwrap();
            for field in ["id", "type", "account_id", "data"] {
                assert_eq!(after[field], before[field], "{key}: {field}");
            }
            let at = |v: &Value| v["occurred_at"].as_str().unwrap().parse::<DateTime<Utc>>();
            assert_eq!(at(&after).unwrap(), at(&before).unwrap(), "{key}");
        }
    }

    #[test]
    fn todays_bodies_parse_into_the_expected_fields() {
        let env = Envelope::parse(TODAY[0].1.as_bytes()).unwrap();
        assert_eq!(
            env.event,
            Event::BalanceThresholdCrossed(ThresholdCrossed {
                threshold: money("10"),
                balance_before: money("25"),
                balance_after: money("9.99"),
                entry_id: Some(uuid("b5e136c6-5d13-48b2-b40e-f76dd3b2b3ce")),
                available_before: None,
                available_after: None,
                hold_id: None,
            })
        );
        assert_eq!(env.id, uuid("3c3707a2-fad1-468a-8c45-80c66c61d6a4"));
        let env = Envelope::parse(TODAY[1].1.as_bytes()).unwrap();
        assert_eq!(
            env.event,
            Event::AccountSuspended(AccountBalance {
                balance: money("-0.01"),
                available_balance: None,
            })
        );
        let env = Envelope::parse(TODAY[5].1.as_bytes()).unwrap();
        let Event::PaymentMethodRemoved(r) = env.event else {
            panic!("{:?}", env.event)
        };
        assert!(r.was_default);
        assert_eq!(r.method_type, PaymentMethodType::Card);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let body = r#"{"id":"0193a5b0-0000-7000-8000-000000000001","type":"ledger.account.suspended","occurred_at":"2026-11-25T00:27:37Z","account_id":"acme","trace":"x","data":{"balance":"-1.00","held":"2.00"}}"#;
        let env = Envelope::parse(body.as_bytes()).unwrap();
        assert_eq!(
            env.event,
            Event::AccountSuspended(AccountBalance {
                balance: money("-1"),
                available_balance: None,
            })
        );
    }

    #[test]
    fn names_added_later_are_kept_not_refused() {
        let body = r#"{"id":"0193a5b0-0000-7000-8000-000000000001","type":"payments.payment_method.default_changed","occurred_at":"2026-11-25T00:27:37Z","account_id":"acme","data":{"payment_method_id":"pm_1","type":"SEPA_DEBIT"}}"#;
        let env = Envelope::parse(body.as_bytes()).unwrap();
        let v = env.to_value().unwrap();
        assert_eq!(v["data"]["type"], "SEPA_DEBIT");
    }

    #[test]
    fn an_unknown_type_is_reported_as_unknown_not_as_broken() {
        let body = r#"{"id":"0193a5b0-0000-7000-8000-000000000001","type":"ledger.something.new","occurred_at":"2026-11-25T00:27:37Z","account_id":"acme","data":{"anything":1}}"#;
        let err = Envelope::parse(body.as_bytes()).unwrap_err();
        assert!(err.is_unknown_type(), "{err}");
        let EventParseError::UnknownType {
            id,
            account_id,
            kind,
        } = err
        else {
            unreachable!()
        };
        assert_eq!(id, uuid("0193a5b0-0000-7000-8000-000000000001"));
        assert_eq!(account_id.as_str(), "acme");
        assert_eq!(kind, "ledger.something.new");
    }

    #[test]
    fn broken_bodies_are_errors_and_not_unknown() {
        let ok_id = "0193a5b0-0000-7000-8000-000000000001";
        let at = "2026-11-25T00:27:37Z";
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "not an event envelope"),
            ("[]".into(), "not an event envelope"),
            (r#"{"id":"x"}"#.into(), "not an event envelope"),
            // The consumer's poison rules: id a UUID, account id the contract's.
            (
                format!(r#"{{"id":"","type":"x","occurred_at":"{at}","account_id":"acme"}}"#),
                "not a UUID",
            ),
            (
                format!(
                    r#"{{"id":"nul\u0000","type":"x","occurred_at":"{at}","account_id":"acme"}}"#
                ),
                "not a UUID",
            ),
            (
                format!(r#"{{"id":"{ok_id}","type":"x","occurred_at":"{at}","account_id":"a b"}}"#),
                "account_id",
            ),
            (
                format!(r#"{{"id":"{ok_id}","type":"x","occurred_at":"{at}"}}"#),
                "not an event envelope",
            ),
            (
                format!(r#"{{"id":"{ok_id}","type":"x","account_id":"acme"}}"#),
                "not an event envelope",
            ),
            (
                format!(
                    r#"{{"id":"{ok_id}","type":"x","occurred_at":"{at}","account_id":"acme","schema_version":2}}"#
                ),
                "schema_version 2",
            ),
            // A known type with a payload that is not its data.
            (
                format!(
                    r#"{{"id":"{ok_id}","type":"payments.payment_method.default_changed","occurred_at":"{at}","account_id":"acme","data":{{}}}}"#
                ),
                "payments.payment_method.default_changed data",
            ),
            (
                format!(
                    r#"{{"id":"{ok_id}","type":"ledger.account.suspended","occurred_at":"{at}","account_id":"acme"}}"#
                ),
                "ledger.account.suspended data",
            ),
            (
                format!(
                    r#"{{"id":"{ok_id}","type":"ledger.account.suspended","occurred_at":"{at}","account_id":"acme","data":{{"balance":9.99}}}}"#
                ),
                "ledger.account.suspended data",
            ),
            (
                format!(
                    r#"{{"id":"{ok_id}","type":"ledger.account.suspended","occurred_at":"{at}","account_id":"acme","data":{{"balance":"1e3"}}}}"#
                ),
                "ledger.account.suspended data",
            ),
        ];
        for (body, why) in cases {
            let err = Envelope::parse(body.as_bytes()).unwrap_err();
            assert!(!err.is_unknown_type(), "{body}");
            assert!(err.to_string().contains(why), "{body}: {err}");
        }
    }

    #[test]
    fn every_payload_declares_its_fields() {
        for key in Event::ROUTING_KEYS {
            let fields = Event::data_fields(key).unwrap();
            assert!(!fields.is_empty(), "{key}");
        }
        assert_eq!(
            Event::data_fields("ledger.balance.threshold_crossed").unwrap(),
            [
                "threshold",
                "balance_before",
                "balance_after",
                "available_before",
                "available_after",
                "entry_id",
                "hold_id"
            ]
        );
        assert_eq!(Event::data_fields("nope"), None);
    }

    /// `docs/events.md` carries [`markdown_table`] between these markers.
    const TABLE_START: &str =
        "<!-- events-table: generated from credits_common::events::Event -->\n";
    const TABLE_END: &str = "<!-- /events-table -->";

    #[test]
    fn docs_events_md_lists_exactly_the_contract() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/events.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let start = doc.find(TABLE_START).expect("the table's start marker") + TABLE_START.len();
        let end = start
            + doc[start..]
                .find(TABLE_END)
                .expect("the table's end marker");
        let documented = &doc[start..end];
        let expected = markdown_table();
        if documented != expected {
            let doc_lines: Vec<&str> = documented.lines().collect();
            let type_lines: Vec<&str> = expected.lines().collect();
            let mut diff = String::new();
            for l in &doc_lines {
                if !type_lines.contains(l) {
                    diff.push_str(&format!("- {l}\n"));
                }
            }
            for l in &type_lines {
                if !doc_lines.contains(l) {
                    diff.push_str(&format!("+ {l}\n"));
                }
            }
            panic!(
                "docs/events.md's event table differs from credits_common::events::Event \
                 (- in the doc only, + in the type only; replace the table between the markers \
                 with the + version):\n{diff}\nthe whole table:\n{expected}"
            );
        }
    }
}

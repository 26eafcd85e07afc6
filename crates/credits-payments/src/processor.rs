//! The `PaymentProcessor` boundary, the built-in sandbox, and the Stripe connector's
//! implementation of it (the connector itself is `crate::stripe`).
//!
//! The sandbox behaves like a card network for the test numbers of docs/rules.md, keeps its own
//! durable record of every charge it accepted (`sandbox_*` tables, never read by the
//! payments code directly), honours idempotency keys like a real processor (the same key
//! returns the same charge), can add artificial latency, and settles ACH debits after a
//! configurable delay.

use std::time::Duration;

use chrono::Utc;
use credits_common::Money;
use sqlx::PgPool;

use crate::domain::{BankAccountDetails, CardDetails, MethodType};

#[derive(Clone, Debug)]
pub struct Tokenized {
    pub token: String,
    pub brand: String,
    pub last4: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessorStatus {
    Succeeded,
    /// Accepted, settles later (ACH).
    Pending,
    /// Declined; final. The code is the processor's (`card_declined`, …).
    Failed(String),
    /// R25: the bank wants the customer to confirm on-session; `client_secret` is what
    /// Stripe.js needs to do it. Never retried off-session.
    RequiresAction {
        client_secret: String,
    },
}

/// What a charge needs from the processor: the method's token and, with a processor that
/// has customers, the account's customer.
#[derive(Clone, Copy, Debug)]
pub struct ChargeInput<'a> {
    pub account_id: &'a str,
    pub customer: Option<&'a str>,
    pub token: &'a str,
    pub method: MethodType,
    pub amount: Money,
    /// Our charge id: the processor's idempotency key.
    pub idempotency_key: &'a str,
}

/// A payment method the processor holds for the account's customer (R24).
#[derive(Clone, Debug)]
pub struct AttachedMethod {
    pub token: String,
    pub brand: String,
    pub last4: String,
    pub exp_month: Option<u32>,
    pub exp_year: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct SetupIntent {
    pub client_secret: String,
    pub publishable_key: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundState {
    Pending,
    Succeeded,
    Failed,
}

#[derive(Clone, Debug)]
pub struct ProcessorRefund {
    pub processor_refund_id: String,
    pub amount: Option<Money>,
    pub state: RefundState,
    /// Ours when we asked for it (`metadata[refund_id]`); none for a dashboard refund.
    pub our_refund_id: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ProcessorCharge {
    pub processor_charge_id: String,
    pub status: ProcessorStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// Worth retrying with the same idempotency key (network, `processing_error`).
    #[error("processor temporarily unavailable: {0}")]
    Transient(String),
    /// The details were refused at tokenisation.
    #[error("{0}")]
    Rejected(String),
    /// This processor does not do that (card details to Stripe, a SetupIntent to the
    /// sandbox).
    #[error("{0}")]
    Unsupported(String),
    #[error("processor error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for ProcessorError {
    fn from(e: sqlx::Error) -> Self {
        ProcessorError::Transient(e.to_string())
    }
}

#[tonic::async_trait]
pub trait PaymentProcessor: Send + Sync + 'static {
    /// `sandbox` or `stripe`, for logs and start-up lines.
    fn name(&self) -> &'static str;
    /// R24: whether raw card and bank details may be sent to it (the sandbox only).
    fn takes_raw_details(&self) -> bool;
    async fn tokenize_card(&self, card: &CardDetails) -> Result<Tokenized, ProcessorError>;
    async fn tokenize_bank_account(
        &self,
        bank: &BankAccountDetails,
    ) -> Result<Tokenized, ProcessorError>;
    /// R23: the account's customer at the processor, created once (the caller stores it);
    /// `None` for a processor without customers.
    async fn create_customer(&self, account_id: &str) -> Result<Option<String>, ProcessorError>;
    /// R24: a payment method the browser created, attached to `customer`.
    async fn attach_method(
        &self,
        customer: &str,
        token: &str,
    ) -> Result<AttachedMethod, ProcessorError>;
    async fn create_setup_intent(&self, customer: &str) -> Result<SetupIntent, ProcessorError>;
    /// Charges `amount` (whole cents) to `token`. The same `idempotency_key` always returns
    /// the same charge, however often it is called.
    async fn charge(&self, input: &ChargeInput<'_>) -> Result<ProcessorCharge, ProcessorError>;
    /// The charge's current state (pending ACH debits, on-session confirmations).
    async fn retrieve(&self, processor_charge_id: &str) -> Result<ProcessorCharge, ProcessorError>;
    /// The charge made under `idempotency_key`, if the processor made one. Asked before a
    /// charge is given up after transient errors: a charge the processor made must never
    /// be recorded as failed.
    async fn find_by_key(
        &self,
        input: &ChargeInput<'_>,
    ) -> Result<Option<ProcessorCharge>, ProcessorError>;
    /// R27: refunds `amount` of a charge, keyed by our refund id. `Rejected` is final (the
    /// caller reverses its debit); `Transient` is asked again with the same id.
    async fn refund(
        &self,
        processor_charge_id: &str,
        amount: Money,
        refund_id: &str,
    ) -> Result<ProcessorRefund, ProcessorError>;
    /// The refund made under `refund_id`, if the processor made one: asked before a
    /// refusal reverses our debit (a refund must never be both paid and reversed).
    async fn find_refund(
        &self,
        processor_charge_id: &str,
        refund_id: &str,
    ) -> Result<Option<ProcessorRefund>, ProcessorError>;
}

#[tonic::async_trait]
impl PaymentProcessor for crate::stripe::Stripe {
    fn name(&self) -> &'static str {
        "stripe"
    }
    fn takes_raw_details(&self) -> bool {
        false
    }
    async fn tokenize_card(&self, _: &CardDetails) -> Result<Tokenized, ProcessorError> {
        Err(raw_refused("card"))
    }
    async fn tokenize_bank_account(
        &self,
        _: &BankAccountDetails,
    ) -> Result<Tokenized, ProcessorError> {
        Err(raw_refused("us_bank_account"))
    }
    async fn create_customer(&self, account_id: &str) -> Result<Option<String>, ProcessorError> {
        crate::stripe::Stripe::create_customer(self, account_id)
            .await
            .map(Some)
    }
    async fn attach_method(
        &self,
        customer: &str,
        token: &str,
    ) -> Result<AttachedMethod, ProcessorError> {
        crate::stripe::Stripe::attach_method(self, customer, token).await
    }
    async fn create_setup_intent(&self, customer: &str) -> Result<SetupIntent, ProcessorError> {
        crate::stripe::Stripe::create_setup_intent(self, customer).await
    }
    async fn charge(&self, input: &ChargeInput<'_>) -> Result<ProcessorCharge, ProcessorError> {
        crate::stripe::Stripe::charge(self, input).await
    }
    async fn retrieve(&self, id: &str) -> Result<ProcessorCharge, ProcessorError> {
        crate::stripe::Stripe::retrieve(self, id).await
    }
    async fn find_by_key(
        &self,
        input: &ChargeInput<'_>,
    ) -> Result<Option<ProcessorCharge>, ProcessorError> {
        crate::stripe::Stripe::find_by_key(self, input).await
    }
    async fn refund(
        &self,
        processor_charge_id: &str,
        amount: Money,
        refund_id: &str,
    ) -> Result<ProcessorRefund, ProcessorError> {
        crate::stripe::Stripe::refund(self, processor_charge_id, amount, refund_id).await
    }
    async fn find_refund(
        &self,
        processor_charge_id: &str,
        refund_id: &str,
    ) -> Result<Option<ProcessorRefund>, ProcessorError> {
        crate::stripe::Stripe::find_refund(self, processor_charge_id, refund_id).await
    }
}

/// R24: with a real processor, card data never reaches our services.
fn raw_refused(field: &str) -> ProcessorError {
    ProcessorError::Unsupported(format!(
        "{field}: raw payment details are accepted only by the sandbox processor; with a real \
         processor add the method with processor_token (a pm_… made by Stripe.js from a \
         SetupIntent, see CreateSetupIntent)"
    ))
}

#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Added to every processor call, to model a slow network.
    pub latency: Duration,
    /// How long an ACH debit stays pending.
    pub ach_settle_delay: Duration,
    /// How many times a `processing_error` card fails per idempotency key before the
    /// retry succeeds.
    pub transient_failures: i32,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            ach_settle_delay: Duration::from_secs(5),
            transient_failures: 1,
        }
    }
}

pub struct Sandbox {
    pool: PgPool,
    cfg: SandboxConfig,
}

impl Sandbox {
    pub fn new(pool: PgPool, cfg: SandboxConfig) -> Self {
        Self { pool, cfg }
    }

    async fn delay(&self) {
        if !self.cfg.latency.is_zero() {
            tokio::time::sleep(self.cfg.latency).await;
        }
    }
}

/// The sandbox's test numbers (docs/rules.md); any other valid number succeeds.
fn card_behaviour(number: &str) -> &'static str {
    match number {
        "4000000000000002" => "card_declined",
        "4000000000009995" => "insufficient_funds",
        "4000000000000069" => "expired_card",
        "4000000000000119" => "processing_error",
        _ => "succeed",
    }
}

fn card_brand(number: &str) -> &'static str {
    let two: u32 = number.get(..2).and_then(|p| p.parse().ok()).unwrap_or(0);
    let four: u32 = number.get(..4).and_then(|p| p.parse().ok()).unwrap_or(0);
    match () {
        _ if number.starts_with('4') => "visa",
        _ if (51..=55).contains(&two) || (2221..=2720).contains(&four) => "mastercard",
        _ if two == 34 || two == 37 => "amex",
        _ if four == 6011 || two == 65 => "discover",
        _ => "unknown",
    }
}

pub const SANDBOX_ROUTING_NUMBER: &str = "110000000";

#[tonic::async_trait]
impl PaymentProcessor for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn takes_raw_details(&self) -> bool {
        true
    }

    async fn create_customer(&self, _: &str) -> Result<Option<String>, ProcessorError> {
        Ok(None)
    }

    async fn attach_method(&self, _: &str, _: &str) -> Result<AttachedMethod, ProcessorError> {
        Err(ProcessorError::Unsupported(
            "processor_token: the sandbox processor takes card details, not tokens".into(),
        ))
    }

    async fn create_setup_intent(&self, _: &str) -> Result<SetupIntent, ProcessorError> {
        Err(ProcessorError::Unsupported(
            "the sandbox processor takes card details directly; it has no SetupIntents".into(),
        ))
    }

    async fn refund(
        &self,
        processor_charge_id: &str,
        amount: Money,
        refund_id: &str,
    ) -> Result<ProcessorRefund, ProcessorError> {
        self.delay().await;
        // Like a processor: the same key answers the same refund; never more than charged.
        let row: Option<(String,)> = sqlx::query_as(
            "WITH c AS (SELECT amount FROM sandbox_charges WHERE processor_charge_id = $1 AND status = 'SUCCEEDED' FOR UPDATE),
                  ins AS (INSERT INTO sandbox_refunds (refund_key, processor_charge_id, amount)
                          SELECT $3, $1, $2 FROM c
                          WHERE c.amount >= $2 + COALESCE((SELECT sum(amount) FROM sandbox_refunds WHERE processor_charge_id = $1), 0)
                          ON CONFLICT (refund_key) DO NOTHING RETURNING processor_refund_id)
             SELECT processor_refund_id FROM ins
             UNION ALL SELECT processor_refund_id FROM sandbox_refunds WHERE refund_key = $3",
        )
        .bind(processor_charge_id)
        .bind(amount.as_decimal())
        .bind(refund_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((id,)) => Ok(ProcessorRefund {
                processor_refund_id: id,
                amount: Some(amount),
                state: RefundState::Succeeded,
                our_refund_id: Some(refund_id.to_owned()),
            }),
            None => Err(ProcessorError::Rejected(
                "the sandbox refuses a refund above what is left of the charge".into(),
            )),
        }
    }

    async fn find_refund(
        &self,
        _processor_charge_id: &str,
        refund_id: &str,
    ) -> Result<Option<ProcessorRefund>, ProcessorError> {
        let row: Option<(String, rust_decimal::Decimal)> = sqlx::query_as(
            "SELECT processor_refund_id, amount FROM sandbox_refunds WHERE refund_key = $1",
        )
        .bind(refund_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, amount)| ProcessorRefund {
            processor_refund_id: id,
            amount: Some(Money::new(amount)),
            state: RefundState::Succeeded,
            our_refund_id: Some(refund_id.to_owned()),
        }))
    }

    async fn tokenize_card(&self, card: &CardDetails) -> Result<Tokenized, ProcessorError> {
        self.delay().await;
        let t = Tokenized {
            token: format!("tok_sandbox_{}", uuid::Uuid::new_v4().simple()),
            brand: card_brand(&card.number).to_owned(),
            last4: card.last4().to_owned(),
        };
        sqlx::query("INSERT INTO sandbox_instruments (token, kind, behaviour, brand, last4) VALUES ($1, 'CARD', $2, $3, $4)")
            .bind(&t.token)
            .bind(card_behaviour(&card.number))
            .bind(&t.brand)
            .bind(&t.last4)
            .execute(&self.pool)
            .await?;
        Ok(t)
    }

    async fn tokenize_bank_account(
        &self,
        bank: &BankAccountDetails,
    ) -> Result<Tokenized, ProcessorError> {
        self.delay().await;
        if bank.routing_number != SANDBOX_ROUTING_NUMBER {
            return Err(ProcessorError::Rejected(format!(
                "us_bank_account.routing_number: the sandbox only knows routing number {SANDBOX_ROUTING_NUMBER}"
            )));
        }
        let t = Tokenized {
            token: format!("btok_sandbox_{}", uuid::Uuid::new_v4().simple()),
            brand: "sandbox bank".to_owned(),
            last4: bank.last4().to_owned(),
        };
        sqlx::query(
            "INSERT INTO sandbox_instruments (token, kind, behaviour, brand, last4) VALUES ($1, 'US_BANK_ACCOUNT', 'succeed', $2, $3)",
        )
        .bind(&t.token)
        .bind(&t.brand)
        .bind(&t.last4)
        .execute(&self.pool)
        .await?;
        Ok(t)
    }

    async fn charge(&self, input: &ChargeInput<'_>) -> Result<ProcessorCharge, ProcessorError> {
        let ChargeInput {
            token,
            method,
            amount,
            idempotency_key,
            ..
        } = *input;
        self.delay().await;
        // A real processor answers a repeated key with the charge it already made.
        if let Some(existing) = self.by_key(idempotency_key).await? {
            return Ok(existing);
        }
        let behaviour: Option<String> =
            sqlx::query_scalar("SELECT behaviour FROM sandbox_instruments WHERE token = $1")
                .bind(token)
                .fetch_optional(&self.pool)
                .await?;
        let Some(behaviour) = behaviour else {
            return Err(ProcessorError::Other(format!("unknown token {token}")));
        };
        if behaviour == "processing_error" {
            let failures: i32 = sqlx::query_scalar(
                "INSERT INTO sandbox_transient_failures (idempotency_key, failures) VALUES ($1, 1)
                 ON CONFLICT (idempotency_key) DO UPDATE SET failures = sandbox_transient_failures.failures + 1
                 RETURNING failures",
            )
            .bind(idempotency_key)
            .fetch_one(&self.pool)
            .await?;
            if failures <= self.cfg.transient_failures {
                return Err(ProcessorError::Transient("processing_error".to_owned()));
            }
        }
        let (status, code, settle_at) = match (method, behaviour.as_str()) {
            (MethodType::US_BANK_ACCOUNT, _) => {
                let delay =
                    chrono::Duration::from_std(self.cfg.ach_settle_delay).unwrap_or_default();
                ("PENDING", String::new(), Some(Utc::now() + delay))
            }
            (MethodType::CARD, "succeed" | "processing_error") => {
                ("SUCCEEDED", String::new(), None)
            }
            (MethodType::CARD, code) => ("FAILED", code.to_owned(), None),
        };
        let id = format!("pch_{}", uuid::Uuid::now_v7().simple());
        // ON CONFLICT: two concurrent calls with one key yield one charge.
        sqlx::query(
            "INSERT INTO sandbox_charges (processor_charge_id, idempotency_key, token, amount, status, failure_code, settle_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(&id)
        .bind(idempotency_key)
        .bind(token)
        .bind(amount.as_decimal())
        .bind(status)
        .bind(&code)
        .bind(settle_at)
        .execute(&self.pool)
        .await?;
        self.by_key(idempotency_key)
            .await?
            .ok_or_else(|| ProcessorError::Other("charge vanished".to_owned()))
    }

    async fn find_by_key(
        &self,
        input: &ChargeInput<'_>,
    ) -> Result<Option<ProcessorCharge>, ProcessorError> {
        self.by_key(input.idempotency_key).await
    }

    async fn retrieve(&self, processor_charge_id: &str) -> Result<ProcessorCharge, ProcessorError> {
        self.delay().await;
        // Settlement happens when it is due, observed on read.
        sqlx::query(
            "UPDATE sandbox_charges SET status = 'SUCCEEDED'
             WHERE processor_charge_id = $1 AND status = 'PENDING' AND settle_at <= now()",
        )
        .bind(processor_charge_id)
        .execute(&self.pool)
        .await?;
        let row: Option<(String, String, String)> =
            sqlx::query_as("SELECT processor_charge_id, status, failure_code FROM sandbox_charges WHERE processor_charge_id = $1")
                .bind(processor_charge_id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(to_charge)
            .ok_or_else(|| ProcessorError::Other(format!("unknown charge {processor_charge_id}")))
    }
}

impl Sandbox {
    async fn by_key(&self, key: &str) -> Result<Option<ProcessorCharge>, ProcessorError> {
        self.delay().await;
        let row: Option<(String, String, String)> =
            sqlx::query_as("SELECT processor_charge_id, status, failure_code FROM sandbox_charges WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(to_charge))
    }
}

fn to_charge((id, status, code): (String, String, String)) -> ProcessorCharge {
    let status = match status.as_str() {
        "SUCCEEDED" => ProcessorStatus::Succeeded,
        "PENDING" => ProcessorStatus::Pending,
        _ => ProcessorStatus::Failed(code),
    };
    ProcessorCharge {
        processor_charge_id: id,
        status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brands_follow_prefixes() {
        assert_eq!(card_brand("4242424242424242"), "visa");
        assert_eq!(card_brand("5555555555554444"), "mastercard");
        assert_eq!(card_brand("378282246310005"), "amex");
        assert_eq!(card_brand("6011111111111117"), "discover");
    }

    #[test]
    fn test_numbers_map_to_their_outcomes() {
        assert_eq!(card_behaviour("4000000000000002"), "card_declined");
        assert_eq!(card_behaviour("4000000000009995"), "insufficient_funds");
        assert_eq!(card_behaviour("4000000000000069"), "expired_card");
        assert_eq!(card_behaviour("4000000000000119"), "processing_error");
        assert_eq!(card_behaviour("4242424242424242"), "succeed");
    }
}

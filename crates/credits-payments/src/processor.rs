//! The `PaymentProcessor` boundary and the built-in sandbox.
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
    async fn tokenize_card(&self, card: &CardDetails) -> Result<Tokenized, ProcessorError>;
    async fn tokenize_bank_account(
        &self,
        bank: &BankAccountDetails,
    ) -> Result<Tokenized, ProcessorError>;
    /// Charges `amount` (whole cents) to `token`. The same `idempotency_key` always returns
    /// the same charge, however often it is called.
    async fn charge(
        &self,
        token: &str,
        method: MethodType,
        amount: Money,
        idempotency_key: &str,
    ) -> Result<ProcessorCharge, ProcessorError>;
    /// The charge's current state (for pending ACH debits).
    async fn retrieve(&self, processor_charge_id: &str) -> Result<ProcessorCharge, ProcessorError>;
    /// The charge made under `idempotency_key`, if the processor made one. Asked before a
    /// charge is given up after transient errors: a charge the processor made must never
    /// be recorded as failed.
    async fn find_by_key(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<ProcessorCharge>, ProcessorError>;
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

    async fn charge(
        &self,
        token: &str,
        method: MethodType,
        amount: Money,
        idempotency_key: &str,
    ) -> Result<ProcessorCharge, ProcessorError> {
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
        idempotency_key: &str,
    ) -> Result<Option<ProcessorCharge>, ProcessorError> {
        self.by_key(idempotency_key).await
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

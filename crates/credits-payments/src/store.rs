//! PostgreSQL access for payments. Default-method changes serialise per account on a
//! transaction-scoped advisory lock; charges are keyed by `(account_id, idempotency_key)`.

use chrono::{DateTime, Utc};
use credits_common::Money;
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};

use crate::domain::*;

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

struct MethodRow {
    payment_method_id: String,
    account_id: String,
    r#type: String,
    processor_token: String,
    brand: String,
    last4: String,
    exp_month: Option<i32>,
    exp_year: Option<i32>,
    is_default: bool,
    created_at: DateTime<Utc>,
}

impl TryFrom<MethodRow> for PaymentMethod {
    type Error = PaymentsError;
    fn try_from(r: MethodRow) -> Result<Self, Self::Error> {
        Ok(PaymentMethod {
            payment_method_id: r.payment_method_id,
            account_id: r.account_id,
            method_type: MethodType::from_db(&r.r#type)?,
            brand: r.brand,
            last4: r.last4,
            exp_month: r.exp_month,
            exp_year: r.exp_year,
            is_default: r.is_default,
            processor_token: r.processor_token,
            created_at: r.created_at,
        })
    }
}

struct ChargeRow {
    seq: i64,
    charge_id: String,
    account_id: String,
    purpose: String,
    payment_method_id: String,
    payment_method_type: String,
    requested_method_id: String,
    amount: Decimal,
    description: String,
    idempotency_key: String,
    status: String,
    failure_code: String,
    processor_attempts: i32,
    ledger_entry_id: Option<String>,
    created_at: DateTime<Utc>,
}

impl TryFrom<ChargeRow> for Charge {
    type Error = PaymentsError;
    fn try_from(r: ChargeRow) -> Result<Self, Self::Error> {
        Ok(Charge {
            seq: r.seq,
            charge_id: r.charge_id,
            account_id: r.account_id,
            purpose: Purpose::from_db(&r.purpose)?,
            payment_method_id: r.payment_method_id,
            payment_method_type: MethodType::from_db(&r.payment_method_type)?,
            requested_method_id: r.requested_method_id,
            amount: Money::new(r.amount),
            description: r.description,
            idempotency_key: r.idempotency_key,
            status: ChargeStatus::from_db(&r.status)?,
            failure_code: r.failure_code,
            processor_attempts: r.processor_attempts,
            ledger_entry_id: r.ledger_entry_id,
            created_at: r.created_at,
        })
    }
}

/// What the recovery loop finds to do.
pub struct Unfinished {
    pub stale_processing: Vec<Charge>,
    pub pending: Vec<(Charge, String)>,
    pub uncredited: Vec<Charge>,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Serialises default-method changes of one account until the transaction ends.
    pub async fn lock_account(conn: &mut PgConnection, account: &str) -> Result<(), PaymentsError> {
        sqlx::query!(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            account
        )
        .fetch_one(conn)
        .await?;
        Ok(())
    }

    pub async fn default_method(
        conn: &mut PgConnection,
        account: &str,
    ) -> Result<Option<PaymentMethod>, PaymentsError> {
        sqlx::query_as!(
            MethodRow,
            r#"SELECT payment_method_id, account_id, type, processor_token, brand, last4, exp_month,
                      exp_year, is_default, created_at
               FROM payment_methods WHERE account_id = $1 AND is_default"#,
            account
        )
        .fetch_optional(conn)
        .await?
        .map(PaymentMethod::try_from)
        .transpose()
    }

    /// A live (not removed) method of this account.
    pub async fn find_method(
        conn: &mut PgConnection,
        account: &str,
        id: &str,
    ) -> Result<Option<PaymentMethod>, PaymentsError> {
        sqlx::query_as!(
            MethodRow,
            r#"SELECT payment_method_id, account_id, type, processor_token, brand, last4, exp_month,
                      exp_year, is_default, created_at
               FROM payment_methods
               WHERE account_id = $1 AND payment_method_id = $2 AND removed_at IS NULL"#,
            account,
            id
        )
        .fetch_optional(conn)
        .await?
        .map(PaymentMethod::try_from)
        .transpose()
    }

    pub async fn list_methods(&self, account: &str) -> Result<Vec<PaymentMethod>, PaymentsError> {
        sqlx::query_as!(
            MethodRow,
            r#"SELECT payment_method_id, account_id, type, processor_token, brand, last4, exp_month,
                      exp_year, is_default, created_at
               FROM payment_methods WHERE account_id = $1 AND removed_at IS NULL
               ORDER BY created_at"#,
            account
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(PaymentMethod::try_from)
        .collect()
    }

    pub async fn insert_method(
        conn: &mut PgConnection,
        m: &PaymentMethod,
    ) -> Result<(), PaymentsError> {
        sqlx::query!(
            r#"INSERT INTO payment_methods (payment_method_id, account_id, type, processor_token, brand,
                                            last4, exp_month, exp_year, is_default, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"#,
            m.payment_method_id,
            m.account_id,
            m.method_type.as_str(),
            m.processor_token,
            m.brand,
            m.last4,
            m.exp_month,
            m.exp_year,
            m.is_default,
            m.created_at,
        )
        .execute(conn)
        .await?;
        Ok(())
    }

    pub async fn set_default(
        conn: &mut PgConnection,
        account: &str,
        id: Option<&str>,
    ) -> Result<(), PaymentsError> {
        sqlx::query!(
            "UPDATE payment_methods SET is_default = false WHERE account_id = $1 AND is_default",
            account
        )
        .execute(&mut *conn)
        .await?;
        if let Some(id) = id {
            sqlx::query!(
                "UPDATE payment_methods SET is_default = true WHERE account_id = $1 AND payment_method_id = $2",
                account,
                id
            )
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    pub async fn mark_removed(
        conn: &mut PgConnection,
        account: &str,
        id: &str,
    ) -> Result<(), PaymentsError> {
        sqlx::query!(
            "UPDATE payment_methods SET removed_at = now(), is_default = false
             WHERE account_id = $1 AND payment_method_id = $2",
            account,
            id
        )
        .execute(conn)
        .await?;
        Ok(())
    }

    pub async fn charge_by_key(
        &self,
        account: &str,
        key: &str,
    ) -> Result<Option<Charge>, PaymentsError> {
        sqlx::query_as!(
            ChargeRow,
            r#"SELECT seq, charge_id, account_id, purpose, payment_method_id, payment_method_type,
                      requested_method_id, amount, description, idempotency_key, status, failure_code,
                      processor_attempts, ledger_entry_id, created_at
               FROM charges WHERE account_id = $1 AND idempotency_key = $2"#,
            account,
            key
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Charge::try_from)
        .transpose()
    }

    pub async fn charge_by_id(
        &self,
        account: &str,
        charge_id: &str,
    ) -> Result<Option<Charge>, PaymentsError> {
        sqlx::query_as!(
            ChargeRow,
            r#"SELECT seq, charge_id, account_id, purpose, payment_method_id, payment_method_type,
                      requested_method_id, amount, description, idempotency_key, status, failure_code,
                      processor_attempts, ledger_entry_id, created_at
               FROM charges WHERE account_id = $1 AND charge_id = $2"#,
            account,
            charge_id
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Charge::try_from)
        .transpose()
    }

    /// Records a charge before the processor is called. `None` when a concurrent request
    /// with the same key won the race.
    pub async fn insert_charge(
        &self,
        req: &ChargeRequest,
        method: &PaymentMethod,
    ) -> Result<Option<Charge>, PaymentsError> {
        sqlx::query_as!(
            ChargeRow,
            r#"INSERT INTO charges (charge_id, account_id, purpose, payment_method_id, payment_method_type,
                                    requested_method_id, amount, description, idempotency_key, status)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'PROCESSING')
               ON CONFLICT (account_id, idempotency_key) DO NOTHING
               RETURNING seq, charge_id, account_id, purpose, payment_method_id, payment_method_type,
                         requested_method_id, amount, description, idempotency_key, status, failure_code,
                         processor_attempts, ledger_entry_id, created_at"#,
            new_id("ch"),
            req.account_id.as_str(),
            req.purpose.as_str(),
            method.payment_method_id,
            method.method_type.as_str(),
            req.payment_method_id,
            req.amount.as_decimal(),
            req.description,
            req.idempotency_key.as_str(),
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Charge::try_from)
        .transpose()
    }

    pub async fn method_token(
        &self,
        account: &str,
        payment_method_id: &str,
    ) -> Result<String, PaymentsError> {
        Ok(sqlx::query_scalar!(
            "SELECT processor_token FROM payment_methods WHERE account_id = $1 AND payment_method_id = $2",
            account,
            payment_method_id
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Moves an unfinished charge to `status`. Returns the charge only for the caller that
    /// made the transition (so exactly one of racing callers publishes the event).
    pub async fn transition(
        conn: &mut PgConnection,
        account: &str,
        charge_id: &str,
        status: ChargeStatus,
        failure_code: &str,
        processor_charge_id: Option<&str>,
    ) -> Result<Option<Charge>, PaymentsError> {
        sqlx::query_as!(
            ChargeRow,
            r#"UPDATE charges
               SET status = $2, failure_code = $3,
                   processor_charge_id = COALESCE($4, processor_charge_id),
                   updated_at = now(),
                   completed_at = CASE WHEN $2 IN ('SUCCEEDED', 'FAILED') THEN now() END
               WHERE charge_id = $1 AND status IN ('PROCESSING', 'PENDING') AND status <> $2
                 AND account_id = $5
               RETURNING seq, charge_id, account_id, purpose, payment_method_id, payment_method_type,
                         requested_method_id, amount, description, idempotency_key, status, failure_code,
                         processor_attempts, ledger_entry_id, created_at"#,
            charge_id,
            status.as_str(),
            failure_code,
            processor_charge_id,
            account,
        )
        .fetch_optional(conn)
        .await?
        .map(Charge::try_from)
        .transpose()
    }

    /// Counts a transient processor failure; returns the attempts so far.
    pub async fn count_attempt(
        &self,
        account: &str,
        charge_id: &str,
    ) -> Result<i32, PaymentsError> {
        Ok(sqlx::query_scalar!(
            "UPDATE charges SET processor_attempts = processor_attempts + 1, updated_at = now()
             WHERE account_id = $1 AND charge_id = $2 RETURNING processor_attempts",
            account,
            charge_id
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn set_ledger_entry(
        &self,
        account: &str,
        charge_id: &str,
        entry_id: &str,
    ) -> Result<(), PaymentsError> {
        sqlx::query!(
            "UPDATE charges SET ledger_entry_id = $3, updated_at = now()
             WHERE account_id = $1 AND charge_id = $2 AND ledger_entry_id IS NULL",
            account,
            charge_id,
            entry_id
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list_charges(
        &self,
        account: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Charge>, PaymentsError> {
        sqlx::query_as!(
            ChargeRow,
            r#"SELECT seq, charge_id, account_id, purpose, payment_method_id, payment_method_type,
                      requested_method_id, amount, description, idempotency_key, status, failure_code,
                      processor_attempts, ledger_entry_id, created_at
               FROM charges WHERE account_id = $1 AND seq < $2
               ORDER BY seq DESC LIMIT $3"#,
            account,
            before.unwrap_or(i64::MAX),
            limit
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(Charge::try_from)
        .collect()
    }

    /// Claims unfinished work: PROCESSING charges idle for `stale_secs`, pending ACH debits,
    /// and succeeded purchases not yet credited. Claiming bumps `updated_at`, so replicas
    /// running the same loop rarely pick the same row (and the steps are idempotent anyway).
    pub async fn claim_unfinished(
        &self,
        stale_secs: f64,
        limit: i64,
    ) -> Result<Unfinished, PaymentsError> {
        let rows = sqlx::query_as!(
            ChargeRow,
            r#"UPDATE charges SET updated_at = now()
               WHERE charge_id IN (
                   SELECT charge_id FROM charges
                   WHERE ((status IN ('PROCESSING', 'PENDING')
                           OR (purpose = 'PURCHASE' AND status = 'SUCCEEDED' AND ledger_entry_id IS NULL))
                          AND updated_at < now() - make_interval(secs => $1))
                   ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED)
               RETURNING seq, charge_id, account_id, purpose, payment_method_id, payment_method_type,
                         requested_method_id, amount, description, idempotency_key, status, failure_code,
                         processor_attempts, ledger_entry_id, created_at"#,
            stale_secs,
            limit
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Unfinished {
            stale_processing: vec![],
            pending: vec![],
            uncredited: vec![],
        };
        for r in rows {
            let c = Charge::try_from(r)?;
            match c.status {
                ChargeStatus::PROCESSING => out.stale_processing.push(c),
                ChargeStatus::PENDING => {
                    let pid = sqlx::query_scalar!(
                        "SELECT processor_charge_id FROM charges WHERE account_id = $1 AND charge_id = $2",
                        c.account_id,
                        c.charge_id
                    )
                    .fetch_one(&self.pool)
                    .await?
                    .unwrap_or_default();
                    out.pending.push((c, pid));
                }
                _ => out.uncredited.push(c),
            }
        }
        Ok(out)
    }
}

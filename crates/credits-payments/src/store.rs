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
    refunded_amount: Decimal,
    disputed_amount: Decimal,
    action_client_secret: Option<String>,
    action_required_at: Option<DateTime<Utc>>,
    processor_charge_id: Option<String>,
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
            refunded_amount: Money::new(r.refunded_amount),
            disputed_amount: Money::new(r.disputed_amount),
            action_client_secret: r.action_client_secret,
            action_required_at: r.action_required_at,
            processor_charge_id: r.processor_charge_id,
        })
    }
}

struct RefundRow {
    seq: i64,
    refund_id: String,
    account_id: String,
    charge_id: String,
    amount: Decimal,
    reason: String,
    idempotency_key: Option<String>,
    status: String,
    failure_code: String,
    processor_refund_id: Option<String>,
    ledger_entry_id: Option<String>,
    created_at: DateTime<Utc>,
}

impl TryFrom<RefundRow> for Refund {
    type Error = PaymentsError;
    fn try_from(r: RefundRow) -> Result<Self, Self::Error> {
        Ok(Refund {
            seq: r.seq,
            refund_id: r.refund_id,
            account_id: r.account_id,
            charge_id: r.charge_id,
            amount: Money::new(r.amount),
            reason: r.reason,
            idempotency_key: r.idempotency_key,
            status: RefundStatus::from_db(&r.status)?,
            failure_code: r.failure_code,
            processor_refund_id: r.processor_refund_id,
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

    /// A live method of this account with this processor token (R24: the same `pm_…`
    /// added twice is one method).
    pub async fn method_by_token(
        &self,
        account: &str,
        token: &str,
    ) -> Result<Option<PaymentMethod>, PaymentsError> {
        sqlx::query_as!(
            MethodRow,
            r#"SELECT payment_method_id, account_id, type, processor_token, brand, last4, exp_month,
                      exp_year, is_default, created_at
               FROM payment_methods
               WHERE account_id = $1 AND processor_token = $2 AND removed_at IS NULL"#,
            account,
            token
        )
        .fetch_optional(&self.pool)
        .await?
        .map(PaymentMethod::try_from)
        .transpose()
    }

    /// R28: a page of the account's methods in the order they were added, after the one
    /// numbered `after` (the page token), with each one's number.
    pub async fn list_methods(
        &self,
        account: &str,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<(i64, PaymentMethod)>, PaymentsError> {
        let rows = sqlx::query!(
            r#"SELECT seq, payment_method_id, account_id, type, processor_token, brand, last4,
                      exp_month, exp_year, is_default, created_at
               FROM payment_methods
               WHERE account_id = $1 AND removed_at IS NULL AND seq > $2
               ORDER BY seq LIMIT $3"#,
            account,
            after.unwrap_or(0),
            limit
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let pm = PaymentMethod::try_from(MethodRow {
                    payment_method_id: r.payment_method_id,
                    account_id: r.account_id,
                    r#type: r.r#type,
                    processor_token: r.processor_token,
                    brand: r.brand,
                    last4: r.last4,
                    exp_month: r.exp_month,
                    exp_year: r.exp_year,
                    is_default: r.is_default,
                    created_at: r.created_at,
                })?;
                Ok((r.seq, pm))
            })
            .collect()
    }

    /// R28: how many methods the account has (not removed).
    pub async fn count_methods(
        conn: &mut PgConnection,
        account: &str,
    ) -> Result<i64, PaymentsError> {
        Ok(sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM payment_methods WHERE account_id = $1 AND removed_at IS NULL"#,
            account
        )
        .fetch_one(&mut *conn)
        .await?)
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
                      processor_attempts, ledger_entry_id, created_at, refunded_amount,
                      disputed_amount, action_client_secret, action_required_at, processor_charge_id
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
                      processor_attempts, ledger_entry_id, created_at, refunded_amount,
                      disputed_amount, action_client_secret, action_required_at, processor_charge_id
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
                         processor_attempts, ledger_entry_id, created_at, refunded_amount,
                      disputed_amount, action_client_secret, action_required_at, processor_charge_id"#,
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

    /// What the processor needs to charge a method: its token and the account's customer
    /// (if one was created), in one read.
    pub async fn charge_target(
        &self,
        account: &str,
        payment_method_id: &str,
    ) -> Result<(String, Option<String>), PaymentsError> {
        let r = sqlx::query!(
            r#"SELECT m.processor_token,
                      (SELECT c.customer_id FROM processor_customers c WHERE c.account_id = m.account_id) AS customer
               FROM payment_methods m WHERE m.account_id = $1 AND m.payment_method_id = $2"#,
            account,
            payment_method_id
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((r.processor_token, r.customer))
    }

    /// Moves an unfinished charge to `status`. Returns the charge only for the caller that
    /// made the transition (so exactly one of racing callers publishes the event). A charge
    /// waiting for the customer (`REQUIRES_ACTION`) keeps `client_secret` until it ends.
    pub async fn transition(
        conn: &mut PgConnection,
        account: &str,
        charge_id: &str,
        status: ChargeStatus,
        failure_code: &str,
        processor_charge_id: Option<&str>,
        client_secret: Option<&str>,
    ) -> Result<Option<Charge>, PaymentsError> {
        sqlx::query_as!(
            ChargeRow,
            r#"UPDATE charges
               SET status = $2, failure_code = $3,
                   processor_charge_id = COALESCE($4, processor_charge_id),
                   updated_at = now(),
                   completed_at = CASE WHEN $2 IN ('SUCCEEDED', 'FAILED', 'REQUIRES_ACTION') THEN now() END,
                   action_client_secret = CASE WHEN $2 = 'REQUIRES_ACTION' THEN $6 END,
                   action_required_at = CASE WHEN $2 = 'REQUIRES_ACTION' THEN now()
                                             ELSE action_required_at END
               WHERE charge_id = $1 AND account_id = $5 AND status <> $2
                 AND (status IN ('PROCESSING', 'PENDING', 'REQUIRES_ACTION')
                      -- R25: after a failed 3-D Secure the customer may still confirm it.
                      OR (status = 'FAILED' AND action_required_at IS NOT NULL AND $2 = 'SUCCEEDED'))
               RETURNING seq, charge_id, account_id, purpose, payment_method_id, payment_method_type,
                         requested_method_id, amount, description, idempotency_key, status, failure_code,
                         processor_attempts, ledger_entry_id, created_at, refunded_amount,
                      disputed_amount, action_client_secret, action_required_at, processor_charge_id"#,
            charge_id,
            status.as_str(),
            failure_code,
            processor_charge_id,
            account,
            client_secret,
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
                      processor_attempts, ledger_entry_id, created_at, refunded_amount,
                      disputed_amount, action_client_secret, action_required_at, processor_charge_id
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
                           OR (status = 'SUCCEEDED' AND ledger_entry_id IS NULL
                               AND (purpose = 'PURCHASE'
                                    OR (purpose = 'TOPUP' AND action_required_at IS NOT NULL))))
                          AND updated_at < now() - make_interval(secs => $1))
                      -- R25: a payment waiting for the customer is looked at every 5 minutes
                      -- for a week (a confirmation whose page and webhook were both lost).
                      OR (status = 'REQUIRES_ACTION' AND updated_at < now() - interval '5 minutes'
                          AND created_at > now() - interval '7 days')
                   ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED)
               RETURNING seq, charge_id, account_id, purpose, payment_method_id, payment_method_type,
                         requested_method_id, amount, description, idempotency_key, status, failure_code,
                         processor_attempts, ledger_entry_id, created_at, refunded_amount,
                      disputed_amount, action_client_secret, action_required_at, processor_charge_id"#,
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
                ChargeStatus::PENDING | ChargeStatus::REQUIRES_ACTION => {
                    let pid = c.processor_charge_id.clone().unwrap_or_default();
                    out.pending.push((c, pid));
                }
                _ => out.uncredited.push(c),
            }
        }
        Ok(out)
    }

    // ---- processor customers (R23) ----------------------------------------------------

    pub async fn customer(&self, account: &str) -> Result<Option<String>, PaymentsError> {
        Ok(sqlx::query_scalar!(
            "SELECT customer_id FROM processor_customers WHERE account_id = $1",
            account
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Stores the account's customer; the first one stored wins and is returned.
    pub async fn insert_customer(
        &self,
        account: &str,
        customer: &str,
    ) -> Result<String, PaymentsError> {
        sqlx::query!(
            "INSERT INTO processor_customers (account_id, customer_id) VALUES ($1, $2)
             ON CONFLICT (account_id) DO NOTHING",
            account,
            customer
        )
        .execute(&self.pool)
        .await?;
        self.customer(account)
            .await?
            .ok_or_else(|| PaymentsError::internal("customer vanished"))
    }

    pub async fn charge_by_processor_id(
        &self,
        processor_charge_id: &str,
    ) -> Result<Option<Charge>, PaymentsError> {
        sqlx::query_as!(
            ChargeRow,
            r#"SELECT seq, charge_id, account_id, purpose, payment_method_id, payment_method_type,
                      requested_method_id, amount, description, idempotency_key, status, failure_code,
                      processor_attempts, ledger_entry_id, created_at, refunded_amount,
                      disputed_amount, action_client_secret, action_required_at, processor_charge_id
               FROM charges WHERE processor_charge_id = $1"#,
            processor_charge_id
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Charge::try_from)
        .transpose()
    }

    /// Notes the processor's id for a charge as soon as it is known (webhooks find the
    /// charge by it).
    pub async fn set_processor_id(
        &self,
        account: &str,
        charge_id: &str,
        processor_charge_id: &str,
    ) -> Result<(), PaymentsError> {
        sqlx::query!(
            "UPDATE charges SET processor_charge_id = $3
             WHERE account_id = $1 AND charge_id = $2 AND processor_charge_id IS NULL",
            account,
            charge_id,
            processor_charge_id
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- refunds (R27) -----------------------------------------------------------------

    pub async fn refund_by_key(
        &self,
        account: &str,
        key: &str,
    ) -> Result<Option<Refund>, PaymentsError> {
        sqlx::query_as!(
            RefundRow,
            r#"SELECT seq, refund_id, account_id, charge_id, amount, reason, idempotency_key, status,
                      failure_code, processor_refund_id, ledger_entry_id, created_at
               FROM refunds WHERE account_id = $1 AND idempotency_key = $2"#,
            account,
            key
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Refund::try_from)
        .transpose()
    }

    pub async fn refund_by_id(
        &self,
        account: &str,
        refund_id: &str,
    ) -> Result<Option<Refund>, PaymentsError> {
        sqlx::query_as!(
            RefundRow,
            r#"SELECT seq, refund_id, account_id, charge_id, amount, reason, idempotency_key, status,
                      failure_code, processor_refund_id, ledger_entry_id, created_at
               FROM refunds WHERE account_id = $1 AND refund_id = $2"#,
            account,
            refund_id
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Refund::try_from)
        .transpose()
    }

    /// Locks the charge row: refunds and disputes of one charge serialise on it.
    pub async fn lock_charge(
        conn: &mut PgConnection,
        account: &str,
        charge_id: &str,
    ) -> Result<Option<Charge>, PaymentsError> {
        sqlx::query_as!(
            ChargeRow,
            r#"SELECT seq, charge_id, account_id, purpose, payment_method_id, payment_method_type,
                      requested_method_id, amount, description, idempotency_key, status, failure_code,
                      processor_attempts, ledger_entry_id, created_at, refunded_amount,
                      disputed_amount, action_client_secret, action_required_at, processor_charge_id
               FROM charges WHERE account_id = $1 AND charge_id = $2 FOR UPDATE"#,
            account,
            charge_id
        )
        .fetch_optional(conn)
        .await?
        .map(Charge::try_from)
        .transpose()
    }

    /// Records a refund (under the charge's lock) and counts it against the charge.
    /// `None` when the processor refund id is already recorded.
    pub async fn insert_refund(
        conn: &mut PgConnection,
        r: &Refund,
    ) -> Result<Option<Refund>, PaymentsError> {
        let row = sqlx::query_as!(
            RefundRow,
            r#"INSERT INTO refunds (refund_id, account_id, charge_id, amount, reason, idempotency_key,
                                    status, processor_refund_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT DO NOTHING
               RETURNING seq, refund_id, account_id, charge_id, amount, reason, idempotency_key, status,
                         failure_code, processor_refund_id, ledger_entry_id, created_at"#,
            r.refund_id,
            r.account_id,
            r.charge_id,
            r.amount.as_decimal(),
            r.reason,
            r.idempotency_key,
            r.status.as_str(),
            r.processor_refund_id,
        )
        .fetch_optional(&mut *conn)
        .await?;
        if row.is_some() {
            sqlx::query!(
                // Clamped: a refund the processor already made (its dashboard) counts even
                // past what our own limits allow, and must not be refused by the CHECK.
                "UPDATE charges SET refunded_amount = LEAST(amount, refunded_amount + $3), updated_at = now()
                 WHERE account_id = $1 AND charge_id = $2",
                r.account_id,
                r.charge_id,
                r.amount.as_decimal()
            )
            .execute(&mut *conn)
            .await?;
        }
        row.map(Refund::try_from).transpose()
    }

    /// Forgets a refund whose ledger debit was refused (R27: nothing changes).
    pub async fn delete_refund(&self, r: &Refund) -> Result<(), PaymentsError> {
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query!(
            "DELETE FROM refunds WHERE refund_id = $1 AND status = 'PROCESSING' AND ledger_entry_id IS NULL",
            r.refund_id
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if gone == 1 {
            sqlx::query!(
                "UPDATE charges SET refunded_amount = GREATEST(0, refunded_amount - $3), updated_at = now()
                 WHERE account_id = $1 AND charge_id = $2",
                r.account_id,
                r.charge_id,
                r.amount.as_decimal()
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_refund_entry(
        &self,
        refund_id: &str,
        entry_id: &str,
    ) -> Result<(), PaymentsError> {
        sqlx::query!(
            "UPDATE refunds SET ledger_entry_id = $2, updated_at = now()
             WHERE refund_id = $1 AND ledger_entry_id IS NULL",
            refund_id,
            entry_id
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends a PROCESSING refund; a FAILED one no longer counts against its charge. Returns
    /// the refund only for the caller that ended it.
    pub async fn finish_refund(
        conn: &mut PgConnection,
        refund_id: &str,
        status: RefundStatus,
        failure_code: &str,
        processor_refund_id: Option<&str>,
    ) -> Result<Option<Refund>, PaymentsError> {
        let row = sqlx::query_as!(
            RefundRow,
            r#"UPDATE refunds SET status = $2, failure_code = $3,
                      processor_refund_id = COALESCE(processor_refund_id, $4), updated_at = now()
               WHERE refund_id = $1 AND status = 'PROCESSING'
               RETURNING seq, refund_id, account_id, charge_id, amount, reason, idempotency_key, status,
                         failure_code, processor_refund_id, ledger_entry_id, created_at"#,
            refund_id,
            status.as_str(),
            failure_code,
            processor_refund_id
        )
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(r) = &row
            && status == RefundStatus::FAILED
        {
            sqlx::query!(
                "UPDATE charges SET refunded_amount = GREATEST(0, refunded_amount - $3), updated_at = now()
                 WHERE account_id = $1 AND charge_id = $2",
                r.account_id,
                r.charge_id,
                r.amount
            )
            .execute(&mut *conn)
            .await?;
        }
        row.map(Refund::try_from).transpose()
    }

    /// Takes over a PROCESSING refund nobody has touched for `stale_secs`; `false` when
    /// someone is carrying it out (or it ended).
    pub async fn claim_refund(
        &self,
        refund_id: &str,
        stale_secs: f64,
    ) -> Result<bool, PaymentsError> {
        Ok(sqlx::query!(
            "UPDATE refunds SET updated_at = now()
             WHERE refund_id = $1 AND status = 'PROCESSING'
               AND updated_at < now() - make_interval(secs => $2)",
            refund_id,
            stale_secs
        )
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    /// Hands a refund's lease back: claimable by recovery (idle `lease_secs`) in `retry_secs`.
    pub async fn release_refund(
        &self,
        refund_id: &str,
        lease_secs: f64,
        retry_secs: f64,
    ) -> Result<(), PaymentsError> {
        sqlx::query!(
            "UPDATE refunds SET updated_at = now() - make_interval(secs => $2::float8 - $3::float8)
             WHERE refund_id = $1 AND status = 'PROCESSING'",
            refund_id,
            lease_secs,
            retry_secs
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// PROCESSING refunds idle for `stale_secs`, claimed for the recovery loop.
    pub async fn claim_stale_refunds(&self, stale_secs: f64) -> Result<Vec<Refund>, PaymentsError> {
        sqlx::query_as!(
            RefundRow,
            r#"UPDATE refunds SET updated_at = now()
               WHERE refund_id IN (SELECT refund_id FROM refunds
                                   WHERE status = 'PROCESSING'
                                     -- Ours only: a refund made at the processor's dashboard is
                                     -- finished by its event's retries, never asked for again.
                                     AND idempotency_key IS NOT NULL
                                     AND updated_at < now() - make_interval(secs => $1)
                                   ORDER BY updated_at LIMIT 100 FOR UPDATE SKIP LOCKED)
               RETURNING seq, refund_id, account_id, charge_id, amount, reason, idempotency_key, status,
                         failure_code, processor_refund_id, ledger_entry_id, created_at"#,
            stale_secs
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(Refund::try_from)
        .collect()
    }

    // ---- disputes (R26) ------------------------------------------------------------------

    /// Records a dispute once; `true` for the caller that recorded it.
    pub async fn insert_dispute(
        conn: &mut PgConnection,
        dispute_id: &str,
        charge: &Charge,
        amount: Money,
        status: &str,
    ) -> Result<bool, PaymentsError> {
        let inserted = sqlx::query!(
            "INSERT INTO disputes (dispute_id, account_id, charge_id, amount, status)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (dispute_id) DO NOTHING",
            dispute_id,
            charge.account_id,
            charge.charge_id,
            amount.as_decimal(),
            status
        )
        .execute(&mut *conn)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            sqlx::query!(
                "UPDATE charges SET disputed_amount = disputed_amount + $3, updated_at = now()
                 WHERE account_id = $1 AND charge_id = $2",
                charge.account_id,
                charge.charge_id,
                amount.as_decimal()
            )
            .execute(&mut *conn)
            .await?;
        }
        Ok(inserted)
    }

    /// Marks a dispute won, once; `true` for the caller that did.
    pub async fn dispute_won(
        conn: &mut PgConnection,
        dispute_id: &str,
    ) -> Result<bool, PaymentsError> {
        let row = sqlx::query!(
            r#"UPDATE disputes SET status = 'won', updated_at = now()
               WHERE dispute_id = $1 AND status <> 'won'
               RETURNING account_id, charge_id, amount"#,
            dispute_id
        )
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(r) = &row {
            sqlx::query!(
                "UPDATE charges SET disputed_amount = disputed_amount - $3, updated_at = now()
                 WHERE account_id = $1 AND charge_id = $2",
                r.account_id,
                r.charge_id,
                r.amount
            )
            .execute(&mut *conn)
            .await?;
        }
        Ok(row.is_some())
    }

    /// The amount a dispute was recorded with (what its debit and its credit back are).
    pub async fn dispute_amount(&self, dispute_id: &str) -> Result<Option<Money>, PaymentsError> {
        Ok(sqlx::query_scalar!(
            "SELECT amount FROM disputes WHERE dispute_id = $1",
            dispute_id
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Money::new))
    }

    pub async fn set_dispute_status(
        &self,
        dispute_id: &str,
        status: &str,
    ) -> Result<(), PaymentsError> {
        sqlx::query!(
            "UPDATE disputes SET status = $2, updated_at = now() WHERE dispute_id = $1 AND status <> 'won'",
            dispute_id,
            status
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- processor events (R26) ------------------------------------------------------------

    /// Records an event by id; `false` when it was recorded before.
    pub async fn record_event(
        &self,
        event_id: &str,
        kind: &str,
        payload: &serde_json::Value,
    ) -> Result<bool, PaymentsError> {
        Ok(sqlx::query!(
            "INSERT INTO processor_events (event_id, type, payload) VALUES ($1, $2, $3)
             ON CONFLICT (event_id) DO NOTHING",
            event_id,
            kind,
            payload
        )
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    pub async fn event_done(&self, event_id: &str) -> Result<(), PaymentsError> {
        sqlx::query!(
            "UPDATE processor_events SET processed_at = now() WHERE event_id = $1 AND processed_at IS NULL",
            event_id
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn event_failed(&self, event_id: &str, error: &str) -> Result<(), PaymentsError> {
        sqlx::query!(
            "UPDATE processor_events SET attempts = attempts + 1, last_error = $2,
                    next_attempt_at = now() + make_interval(secs => LEAST(3600, 2 ^ LEAST(attempts + 1, 12)))
             WHERE event_id = $1",
            event_id,
            error
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Events not acted on yet whose turn has come, claimed for `lease_secs` (replicas take
    /// different ones; a claim that is not settled comes back after it).
    pub async fn pending_events(
        &self,
        lease_secs: f64,
    ) -> Result<Vec<(String, String, serde_json::Value)>, PaymentsError> {
        Ok(sqlx::query!(
            r#"UPDATE processor_events SET next_attempt_at = now() + make_interval(secs => $1)
               WHERE event_id IN (SELECT event_id FROM processor_events
                                  WHERE processed_at IS NULL AND next_attempt_at <= now()
                                  ORDER BY next_attempt_at LIMIT 100 FOR UPDATE SKIP LOCKED)
               RETURNING event_id, type, payload"#,
            lease_secs
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.event_id, r.r#type, r.payload))
        .collect())
    }
}

//! PostgreSQL access for recharge. Decisions serialise per account on the settings row;
//! the partial unique index `attempts_one_in_flight` is the backstop that makes a second
//! in-flight attempt impossible.

use std::time::Duration;

use chrono::{DateTime, Utc};
use credits_common::Money;
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};

use crate::domain::*;

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

struct SettingsRow {
    account_id: String,
    enabled: bool,
    threshold: Decimal,
    target: Decimal,
    disabled_reason: String,
    consecutive_failures: i32,
    updated_at: DateTime<Utc>,
}

impl TryFrom<SettingsRow> for Settings {
    type Error = RechargeError;
    fn try_from(r: SettingsRow) -> Result<Self, Self::Error> {
        Ok(Settings {
            account_id: r.account_id,
            enabled: r.enabled,
            threshold: Money::new(r.threshold),
            target: Money::new(r.target),
            disabled_reason: DisabledReason::from_db(&r.disabled_reason)?,
            consecutive_failures: r.consecutive_failures,
            updated_at: r.updated_at,
        })
    }
}

struct AttemptRow {
    seq: i64,
    attempt_id: String,
    account_id: String,
    trigger: String,
    balance_at_trigger: Decimal,
    amount: Decimal,
    status: String,
    payment_method_id: Option<String>,
    charge_id: Option<String>,
    failure_code: String,
    retries: i32,
    created_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
}

impl TryFrom<AttemptRow> for Attempt {
    type Error = RechargeError;
    fn try_from(r: AttemptRow) -> Result<Self, Self::Error> {
        Ok(Attempt {
            seq: r.seq,
            attempt_id: r.attempt_id,
            account_id: r.account_id,
            trigger: r.trigger,
            balance_at_trigger: Money::new(r.balance_at_trigger),
            amount: Money::new(r.amount),
            status: AttemptStatus::from_db(&r.status)?,
            payment_method_id: r.payment_method_id,
            charge_id: r.charge_id,
            failure_code: r.failure_code,
            retries: r.retries,
            created_at: r.created_at,
            completed_at: r.completed_at,
        })
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn settings(&self, account: &str) -> Result<Option<Settings>, RechargeError> {
        sqlx::query_as!(
            SettingsRow,
            r#"SELECT account_id, enabled, threshold, target, disabled_reason, consecutive_failures, updated_at
               FROM settings WHERE account_id = $1"#,
            account
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Settings::try_from)
        .transpose()
    }

    /// Locks the account's settings row for the rest of the transaction.
    pub async fn lock_settings(
        conn: &mut PgConnection,
        account: &str,
    ) -> Result<Option<Settings>, RechargeError> {
        sqlx::query_as!(
            SettingsRow,
            r#"SELECT account_id, enabled, threshold, target, disabled_reason, consecutive_failures, updated_at
               FROM settings WHERE account_id = $1 FOR UPDATE"#,
            account
        )
        .fetch_optional(conn)
        .await?
        .map(Settings::try_from)
        .transpose()
    }

    /// Stores what the user asked for. Enabling clears the failure count and any reason,
    /// and schedules a re-check of the balance (R7, after a 2 s grace) that the deciding
    /// transaction clears.
    pub async fn save_settings(
        &self,
        account: &str,
        enabled: bool,
        threshold: Money,
        target: Money,
    ) -> Result<Settings, RechargeError> {
        let reason = if enabled {
            DisabledReason::NONE
        } else {
            DisabledReason::USER
        };
        sqlx::query_as!(
            SettingsRow,
            r#"INSERT INTO settings (account_id, enabled, threshold, target, disabled_reason, retry_at)
               VALUES ($1, $2, $3, $4, $5, CASE WHEN $2 THEN now() + interval '2 seconds' END)
               ON CONFLICT (account_id) DO UPDATE
               SET enabled = $2, threshold = $3, target = $4, disabled_reason = $5,
                   consecutive_failures = CASE WHEN $2 THEN 0 ELSE settings.consecutive_failures END,
                   retry_at = CASE WHEN $2 THEN now() + interval '2 seconds' END, updated_at = now()
               RETURNING account_id, enabled, threshold, target, disabled_reason, consecutive_failures, updated_at"#,
            account,
            enabled,
            threshold.as_decimal(),
            target.as_decimal(),
            reason.as_str(),
        )
        .fetch_one(&self.pool)
        .await?
        .try_into()
    }

    /// Turns auto-recharge off for `reason` if it is on; true when this call turned it off.
    pub async fn disable(
        conn: &mut PgConnection,
        account: &str,
        reason: DisabledReason,
    ) -> Result<bool, RechargeError> {
        let r = sqlx::query!(
            "UPDATE settings SET enabled = false, disabled_reason = $2, retry_at = NULL, updated_at = now()
             WHERE account_id = $1 AND enabled",
            account,
            reason.as_str()
        )
        .execute(conn)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records that an event was acted on; false when it already was (a duplicate).
    pub async fn mark_processed(
        conn: &mut PgConnection,
        event_id: &str,
    ) -> Result<bool, RechargeError> {
        let r = sqlx::query!(
            "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT DO NOTHING",
            event_id
        )
        .execute(conn)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn has_in_flight(
        conn: &mut PgConnection,
        account: &str,
    ) -> Result<bool, RechargeError> {
        Ok(sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM attempts WHERE account_id = $1 AND status IN ('PENDING', 'CHARGING')) AS "e!""#,
            account
        )
        .fetch_one(conn)
        .await?)
    }

    /// Inserts a PENDING attempt; `None` if one is already in flight for the account.
    pub async fn insert_attempt(
        conn: &mut PgConnection,
        account: &str,
        trigger: &str,
        event_id: Option<&str>,
        balance: Money,
        amount: Money,
    ) -> Result<Option<Attempt>, RechargeError> {
        sqlx::query_as!(
            AttemptRow,
            r#"INSERT INTO attempts (attempt_id, account_id, trigger, trigger_event_id, balance_at_trigger, amount, status)
               VALUES ($1, $2, $3, $4, $5, $6, 'PENDING')
               ON CONFLICT (account_id) WHERE status IN ('PENDING', 'CHARGING') DO NOTHING
               RETURNING seq, attempt_id, account_id, trigger, balance_at_trigger, amount, status,
                         payment_method_id, charge_id, failure_code, retries, created_at, completed_at"#,
            format!("att_{}", uuid::Uuid::now_v7().simple()),
            account,
            trigger,
            event_id,
            balance.as_decimal(),
            amount.as_decimal(),
        )
        .fetch_optional(conn)
        .await?
        .map(Attempt::try_from)
        .transpose()
    }

    /// Takes the lease of an in-flight attempt whose lease has run out (or was never
    /// taken). `None` when it is finished or another worker holds it.
    pub async fn claim(
        &self,
        attempt_id: &str,
        lease: Duration,
    ) -> Result<Option<Attempt>, RechargeError> {
        sqlx::query_as!(
            AttemptRow,
            r#"UPDATE attempts SET lease_until = now() + make_interval(secs => $2)
               WHERE attempt_id = $1 AND status IN ('PENDING', 'CHARGING') AND lease_until <= now()
               RETURNING seq, attempt_id, account_id, trigger, balance_at_trigger, amount, status,
                         payment_method_id, charge_id, failure_code, retries, created_at, completed_at"#,
            attempt_id,
            secs(lease),
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Attempt::try_from)
        .transpose()
    }

    /// In-flight attempts whose lease ran out: crashed workers, or deferred retries due.
    pub async fn claimable(&self, limit: i64) -> Result<Vec<String>, RechargeError> {
        Ok(sqlx::query_scalar!(
            "SELECT attempt_id FROM attempts
             WHERE status IN ('PENDING', 'CHARGING') AND lease_until <= now()
             ORDER BY lease_until LIMIT $1",
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// PENDING → CHARGING with the method chosen; resumes keep that method.
    pub async fn start_charging(
        &self,
        attempt_id: &str,
        payment_method_id: &str,
    ) -> Result<(), RechargeError> {
        sqlx::query!(
            "UPDATE attempts SET status = 'CHARGING', payment_method_id = $2 WHERE attempt_id = $1 AND status = 'PENDING'",
            attempt_id,
            payment_method_id
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn set_charge(&self, attempt_id: &str, charge_id: &str) -> Result<(), RechargeError> {
        sqlx::query!(
            "UPDATE attempts SET charge_id = $2 WHERE attempt_id = $1",
            attempt_id,
            charge_id
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Gives the attempt back for a later retry (transient failure), after `delay`.
    pub async fn defer(&self, attempt_id: &str, delay: Duration) -> Result<i32, RechargeError> {
        Ok(sqlx::query_scalar!(
            "UPDATE attempts SET retries = retries + 1, lease_until = now() + make_interval(secs => $2)
             WHERE attempt_id = $1 RETURNING retries",
            attempt_id,
            secs(delay)
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Finishes an in-flight attempt; `None` if it was already finished.
    pub async fn finish(
        conn: &mut PgConnection,
        attempt_id: &str,
        status: AttemptStatus,
        charge_id: Option<&str>,
        failure_code: &str,
    ) -> Result<Option<Attempt>, RechargeError> {
        sqlx::query_as!(
            AttemptRow,
            r#"UPDATE attempts SET status = $2, charge_id = COALESCE($3, charge_id), failure_code = $4, completed_at = now()
               WHERE attempt_id = $1 AND status IN ('PENDING', 'CHARGING')
               RETURNING seq, attempt_id, account_id, trigger, balance_at_trigger, amount, status,
                         payment_method_id, charge_id, failure_code, retries, created_at, completed_at"#,
            attempt_id,
            status.as_str(),
            charge_id,
            failure_code,
        )
        .fetch_optional(conn)
        .await?
        .map(Attempt::try_from)
        .transpose()
    }

    /// After a success: the failure streak is over, and a re-check of the balance is
    /// scheduled (R9). Scheduling it in the success transaction makes it durable: the
    /// worker does it at once and clears it; if the worker dies or the ledger is
    /// unreachable right after, the sweeper runs it when the 2 s grace has passed.
    pub async fn after_success(
        conn: &mut PgConnection,
        account: &str,
    ) -> Result<(), RechargeError> {
        sqlx::query!(
            "UPDATE settings SET consecutive_failures = 0, retry_at = now() + interval '2 seconds' WHERE account_id = $1",
            account
        )
        .execute(conn)
        .await?;
        Ok(())
    }

    /// A scheduled re-check is being carried out (inside the deciding transaction, so a
    /// failed decision leaves it scheduled).
    pub async fn clear_recheck(
        conn: &mut PgConnection,
        account: &str,
    ) -> Result<(), RechargeError> {
        sqlx::query!(
            "UPDATE settings SET retry_at = NULL WHERE account_id = $1",
            account
        )
        .execute(conn)
        .await?;
        Ok(())
    }

    /// After a failure: one more in the streak, and when to look again; returns the streak.
    pub async fn count_failure(
        conn: &mut PgConnection,
        account: &str,
        retry_after: Duration,
    ) -> Result<i32, RechargeError> {
        Ok(sqlx::query_scalar!(
            "UPDATE settings SET consecutive_failures = consecutive_failures + 1,
                                 retry_at = now() + make_interval(secs => $2)
             WHERE account_id = $1 RETURNING consecutive_failures",
            account,
            secs(retry_after)
        )
        .fetch_one(conn)
        .await?)
    }

    /// Accounts with a re-check due (after a success, or a failure's retry delay), with
    /// their failure streak.
    pub async fn due_rechecks(&self, limit: i64) -> Result<Vec<(String, i32)>, RechargeError> {
        Ok(sqlx::query!(
            "SELECT account_id, consecutive_failures FROM settings
             WHERE enabled AND retry_at <= now() ORDER BY retry_at LIMIT $1",
            limit
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| (r.account_id, r.consecutive_failures))
        .collect())
    }

    pub async fn list_attempts(
        &self,
        account: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Attempt>, RechargeError> {
        sqlx::query_as!(
            AttemptRow,
            r#"SELECT seq, attempt_id, account_id, trigger, balance_at_trigger, amount, status,
                      payment_method_id, charge_id, failure_code, retries, created_at, completed_at
               FROM attempts WHERE account_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"#,
            account,
            before.unwrap_or(i64::MAX),
            limit
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(Attempt::try_from)
        .collect()
    }
}

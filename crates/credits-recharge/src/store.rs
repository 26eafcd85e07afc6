//! PostgreSQL access for recharge. Decisions serialise per account on the settings row;
//! the partial unique index `attempts_one_in_flight` is the backstop that makes a second
//! in-flight attempt impossible.

use std::time::Duration;

use chrono::{DateTime, Utc};
use credits_common::Money;
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

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
    version: i64,
    revision: i64,
    due_trigger: Option<String>,
    due_event_id: Option<String>,
    monthly_limit: Option<Decimal>,
    retry_at: Option<DateTime<Utc>>,
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
            version: r.version,
            revision: r.revision,
            due: r.due_trigger.map(|trigger| Due {
                trigger,
                event_id: r.due_event_id,
                at: r.retry_at,
            }),
            monthly_limit: r.monthly_limit.map(Money::new),
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
            r#"SELECT account_id, enabled, threshold, target, disabled_reason, consecutive_failures, updated_at,
                      version, revision, due_trigger, due_event_id, monthly_limit, retry_at
               FROM settings WHERE account_id = $1"#,
            account
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Settings::try_from)
        .transpose()
    }

    /// The settings and whether an attempt is in flight, in one read: what a decision
    /// starts from.
    pub async fn settings_for_decision(
        &self,
        account: &str,
    ) -> Result<Option<(Settings, bool)>, RechargeError> {
        let Some(r) = sqlx::query!(
            r#"SELECT account_id, enabled, threshold, target, disabled_reason, consecutive_failures, updated_at,
                      version, revision, due_trigger, due_event_id, monthly_limit, retry_at,
                      EXISTS (SELECT 1 FROM attempts a WHERE a.account_id = s.account_id
                                AND a.status IN ('PENDING', 'CHARGING')) AS "in_flight!"
               FROM settings s WHERE account_id = $1"#,
            account
        )
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let settings = Settings::try_from(SettingsRow {
            account_id: r.account_id,
            enabled: r.enabled,
            threshold: r.threshold,
            target: r.target,
            disabled_reason: r.disabled_reason,
            consecutive_failures: r.consecutive_failures,
            updated_at: r.updated_at,
            version: r.version,
            revision: r.revision,
            due_trigger: r.due_trigger,
            due_event_id: r.due_event_id,
            monthly_limit: r.monthly_limit,
            retry_at: r.retry_at,
        })?;
        Ok(Some((settings, r.in_flight)))
    }

    /// Locks the account's settings row for the rest of the transaction.
    pub async fn lock_settings(
        conn: &mut PgConnection,
        account: &str,
    ) -> Result<Option<Settings>, RechargeError> {
        sqlx::query_as!(
            SettingsRow,
            r#"SELECT account_id, enabled, threshold, target, disabled_reason, consecutive_failures, updated_at,
                      version, revision, due_trigger, due_event_id, monthly_limit, retry_at
               FROM settings WHERE account_id = $1 FOR UPDATE"#,
            account
        )
        .fetch_optional(conn)
        .await?
        .map(Settings::try_from)
        .transpose()
    }

    /// A fresh settings version: larger than every version handed out before.
    pub async fn next_version(&self) -> Result<i64, RechargeError> {
        Ok(
            sqlx::query_scalar!(r#"SELECT nextval('settings_version_seq') AS "v!""#)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Stores what the user asked for, as `version` — only over an older version, so of
    /// racing writers the newest wins here as it does in the ledger. `None` when a newer
    /// version is already stored. Enabling clears the failure count and any reason, and
    /// makes a balance check due (R7: enabling while already below the threshold).
    pub async fn save_settings(
        &self,
        account: &str,
        enabled: bool,
        threshold: Money,
        target: Money,
        monthly_limit: Option<Money>,
        version: i64,
    ) -> Result<Option<Settings>, RechargeError> {
        let reason = if enabled {
            DisabledReason::NONE
        } else {
            DisabledReason::USER
        };
        sqlx::query_as!(
            SettingsRow,
            r#"INSERT INTO settings (account_id, enabled, threshold, target, disabled_reason, version,
                                   retry_at, due_trigger, monthly_limit)
               VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $2 THEN now() END, CASE WHEN $2 THEN $7 END, $8)
               ON CONFLICT (account_id) DO UPDATE
               SET enabled = $2, threshold = $3, target = $4, disabled_reason = $5, version = $6,
                   monthly_limit = $8,
                   consecutive_failures = CASE WHEN $2 THEN 0 ELSE settings.consecutive_failures END,
                   retry_at = CASE WHEN $2 THEN now() END,
                   due_trigger = CASE WHEN $2 THEN $7 END, due_event_id = NULL,
                   updated_at = now()
               WHERE settings.version < $6
               RETURNING account_id, enabled, threshold, target, disabled_reason, consecutive_failures, updated_at,
                         version, revision, due_trigger, due_event_id, monthly_limit, retry_at"#,
            account,
            enabled,
            threshold.as_decimal(),
            target.as_decimal(),
            reason.as_str(),
            version,
            Trigger::EnabledBelowThreshold.as_str(),
            monthly_limit.map(|m| m.as_decimal()),
        )
        .fetch_optional(&self.pool)
        .await?
        .map(Settings::try_from)
        .transpose()
    }

    /// Moves an enabled account's settings to a fresh version (threshold unchanged) if they
    /// are still at `version`: the reconciler's claim before it re-writes the ledger.
    pub async fn bump_version(
        &self,
        account: &str,
        version: i64,
    ) -> Result<Option<(i64, Money)>, RechargeError> {
        Ok(sqlx::query!(
            "UPDATE settings SET version = nextval('settings_version_seq')
             WHERE account_id = $1 AND version = $2 AND enabled
             RETURNING version, threshold",
            account,
            version
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|r| (r.version, Money::new(r.threshold))))
    }

    /// Enabled settings after `after` (by account id), for the reconciler's pages.
    pub async fn enabled_page(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Settings>, RechargeError> {
        sqlx::query_as!(
            SettingsRow,
            r#"SELECT account_id, enabled, threshold, target, disabled_reason, consecutive_failures, updated_at,
                      version, revision, due_trigger, due_event_id, monthly_limit, retry_at
               FROM settings WHERE enabled AND account_id > $1 ORDER BY account_id LIMIT $2"#,
            after,
            limit
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(Settings::try_from)
        .collect()
    }

    /// Turns auto-recharge off for `reason` if it is on; true when this call turned it off.
    pub async fn disable(
        conn: &mut PgConnection,
        account: &str,
        reason: DisabledReason,
    ) -> Result<bool, RechargeError> {
        Self::disable_at(conn, account, reason, None).await
    }

    /// [`Store::disable`], only if the settings are still at `revision` (nothing changed
    /// since the caller looked): a late event must not undo a newer choice.
    pub async fn disable_at(
        conn: &mut PgConnection,
        account: &str,
        reason: DisabledReason,
        revision: Option<i64>,
    ) -> Result<bool, RechargeError> {
        let r = sqlx::query!(
            "UPDATE settings SET enabled = false, disabled_reason = $2, retry_at = NULL,
                                 due_trigger = NULL, due_event_id = NULL, updated_at = now()
             WHERE account_id = $1 AND enabled AND ($3::bigint IS NULL OR revision = $3)",
            account,
            reason.as_str(),
            revision
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

    /// Makes a balance check due now for an enabled account (a crossing arrived); false
    /// when auto-recharge is off or was never configured (the crossing is ignored).
    pub async fn mark_due(
        conn: &mut PgConnection,
        account: &str,
        trigger: Trigger,
        event_id: Option<&str>,
    ) -> Result<bool, RechargeError> {
        let r = sqlx::query!(
            "UPDATE settings SET retry_at = now(), due_trigger = $2, due_event_id = $3
             WHERE account_id = $1 AND enabled",
            account,
            trigger.as_str(),
            event_id
        )
        .execute(conn)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The due check was carried out (or found nothing to do) by a decision that read the
    /// settings at `revision`; a newer change leaves it due.
    pub async fn clear_due(
        conn: &mut PgConnection,
        account: &str,
        revision: i64,
    ) -> Result<(), RechargeError> {
        sqlx::query!(
            "UPDATE settings SET retry_at = NULL, due_trigger = NULL, due_event_id = NULL
             WHERE account_id = $1 AND revision = $2",
            account,
            revision
        )
        .execute(conn)
        .await?;
        Ok(())
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

    /// R19: what succeeded top-ups charged in the current calendar month (UTC) of the
    /// database's clock (+ `offset_secs`, tests only). Read under the caller's lock of the
    /// settings row when it decides an attempt.
    pub async fn charged_this_month(
        conn: &mut PgConnection,
        account: &str,
        offset_secs: f64,
    ) -> Result<Money, RechargeError> {
        let charged = sqlx::query_scalar!(
            r#"WITH m AS (SELECT date_trunc('month', now() + make_interval(secs => $2), 'UTC') AS start)
               SELECT coalesce(sum(a.amount), 0) AS "charged!" FROM attempts a, m
               WHERE a.account_id = $1 AND a.status = 'SUCCEEDED'
                 AND a.completed_at >= m.start AND a.completed_at < m.start + interval '1 month'"#,
            account,
            offset_secs,
        )
        .fetch_one(conn)
        .await?;
        Ok(Money::new(charged))
    }

    /// R19: records a due top-up that the month's allowance does not cover (never charged,
    /// never in flight), and schedules the balance check for the month's turn.
    pub async fn insert_skipped(
        conn: &mut PgConnection,
        account: &str,
        trigger: &str,
        event_id: Option<&str>,
        balance: Money,
        amount: Money,
        offset_secs: f64,
    ) -> Result<Attempt, RechargeError> {
        let a: Attempt = sqlx::query_as!(
            AttemptRow,
            r#"INSERT INTO attempts (attempt_id, account_id, trigger, trigger_event_id, balance_at_trigger, amount,
                                     status, failure_code, completed_at)
               VALUES ($1, $2, $3, $4, $5, $6, 'SKIPPED', 'monthly_limit_reached', now() + make_interval(secs => $7))
               RETURNING seq, attempt_id, account_id, trigger, balance_at_trigger, amount, status,
                         payment_method_id, charge_id, failure_code, retries, created_at, completed_at"#,
            format!("att_{}", uuid::Uuid::now_v7().simple()),
            account,
            trigger,
            event_id,
            balance.as_decimal(),
            amount.as_decimal(),
            offset_secs,
        )
        .fetch_one(&mut *conn)
        .await?
        .try_into()?;
        sqlx::query!(
            "UPDATE settings
             SET retry_at = date_trunc('month', now() + make_interval(secs => $2), 'UTC') + interval '1 month',
                 due_trigger = $3, due_event_id = NULL
             WHERE account_id = $1",
            account,
            offset_secs,
            Trigger::MonthTurned.as_str(),
        )
        .execute(conn)
        .await?;
        Ok(a)
    }

    /// Inserts a CHARGING attempt already leased to `owner` for `lease`; `None` if one is
    /// already in flight for the account.
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_attempt(
        conn: &mut PgConnection,
        account: &str,
        trigger: &str,
        event_id: Option<&str>,
        balance: Money,
        amount: Money,
        lease: Duration,
        owner: Uuid,
    ) -> Result<Option<Lease>, RechargeError> {
        let row = sqlx::query_as!(
            AttemptRow,
            r#"INSERT INTO attempts (attempt_id, account_id, trigger, trigger_event_id, balance_at_trigger, amount,
                                     status, lease_until, lease_owner)
               VALUES ($1, $2, $3, $4, $5, $6, 'CHARGING', now() + make_interval(secs => $7), $8)
               ON CONFLICT (account_id) WHERE status IN ('PENDING', 'CHARGING') DO NOTHING
               RETURNING seq, attempt_id, account_id, trigger, balance_at_trigger, amount, status,
                         payment_method_id, charge_id, failure_code, retries, created_at, completed_at"#,
            format!("att_{}", uuid::Uuid::now_v7().simple()),
            account,
            trigger,
            event_id,
            balance.as_decimal(),
            amount.as_decimal(),
            secs(lease),
            owner,
        )
        .fetch_optional(conn)
        .await?;
        row.map(|r| {
            Ok(Lease {
                attempt: Attempt::try_from(r)?,
                owner,
            })
        })
        .transpose()
    }

    /// Takes the lease of an in-flight attempt whose lease has run out (or was never
    /// taken), under a new owner token that every later write of this worker must show.
    /// `None` when it is finished or another worker holds it.
    pub async fn claim(
        &self,
        attempt_id: &str,
        lease: Duration,
    ) -> Result<Option<Lease>, RechargeError> {
        let owner = Uuid::new_v4();
        let row = sqlx::query_as!(
            AttemptRow,
            r#"UPDATE attempts SET lease_until = now() + make_interval(secs => $2), lease_owner = $3
               WHERE attempt_id = $1 AND status IN ('PENDING', 'CHARGING') AND lease_until <= now()
               RETURNING seq, attempt_id, account_id, trigger, balance_at_trigger, amount, status,
                         payment_method_id, charge_id, failure_code, retries, created_at, completed_at"#,
            attempt_id,
            secs(lease),
            owner,
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Lease {
                attempt: Attempt::try_from(r)?,
                owner,
            })
        })
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

    /// Gives the attempt back for a later retry (transient failure), after `delay`; false
    /// when the lease was lost already.
    pub async fn defer(&self, lease: &Lease, delay: Duration) -> Result<bool, RechargeError> {
        let r = sqlx::query!(
            "UPDATE attempts SET retries = retries + 1, lease_until = now() + make_interval(secs => $2)
             WHERE attempt_id = $1 AND lease_owner = $3 AND status IN ('PENDING', 'CHARGING')
               AND account_id = $4",
            lease.attempt.attempt_id,
            secs(delay),
            lease.owner,
            lease.attempt.account_id,
        )
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Finishes an in-flight attempt held under `lease`, at the database's time (+
    /// `offset_secs`, tests only: the calendar month of a success is what R19 counts);
    /// `None` if it was already finished or the lease was lost (the new owner finishes it).
    pub async fn finish(
        conn: &mut PgConnection,
        lease: &Lease,
        status: AttemptStatus,
        charge_id: Option<&str>,
        failure_code: &str,
        offset_secs: f64,
    ) -> Result<Option<Attempt>, RechargeError> {
        sqlx::query_as!(
            AttemptRow,
            r#"UPDATE attempts SET status = $2, charge_id = COALESCE($3, charge_id), failure_code = $4,
                                   completed_at = now() + make_interval(secs => $6)
               WHERE attempt_id = $1 AND status IN ('PENDING', 'CHARGING') AND lease_owner = $5
                 AND account_id = $7
               RETURNING seq, attempt_id, account_id, trigger, balance_at_trigger, amount, status,
                         payment_method_id, charge_id, failure_code, retries, created_at, completed_at"#,
            lease.attempt.attempt_id,
            status.as_str(),
            charge_id,
            failure_code,
            lease.owner,
            offset_secs,
            lease.attempt.account_id,
        )
        .fetch_optional(conn)
        .await?
        .map(Attempt::try_from)
        .transpose()
    }

    /// After a success: the failure streak is over, and a balance check is due (R9) unless
    /// the balance read after the credit (`available`) reaches the current threshold and
    /// no check was parked while the attempt ran ([`Self::park_due`]); returns whether it
    /// is. Scheduling it in the success transaction makes it durable: the worker does it
    /// at once; if the worker dies or the ledger is unreachable right after, the sweeper
    /// runs it when the 2 s grace has passed.
    pub async fn after_success(
        conn: &mut PgConnection,
        account: &str,
        available: Option<Money>,
    ) -> Result<bool, RechargeError> {
        Ok(sqlx::query_scalar!(
            r#"UPDATE settings SET consecutive_failures = 0,
                      retry_at = CASE WHEN due_trigger IS NOT NULL OR $3::numeric IS NULL OR $3 < threshold
                                      THEN now() + interval '2 seconds' END,
                      due_trigger = CASE WHEN due_trigger IS NOT NULL OR $3::numeric IS NULL OR $3 < threshold
                                         THEN $2 END,
                      due_event_id = NULL
               WHERE account_id = $1 RETURNING retry_at IS NOT NULL AS "due!""#,
            account,
            Trigger::StillBelowThreshold.as_str(),
            available.map(|m| m.as_decimal()),
        )
        .fetch_optional(conn)
        .await?
        .unwrap_or(false))
    }

    /// A due check found while an attempt was in flight, read at `revision`: it stays due,
    /// parked for the attempt's end (`retry_at` emptied, so the sweeper leaves it). A newer
    /// revision (the attempt's success, new settings) leaves the row as it is.
    pub async fn park_due_at(
        conn: &mut PgConnection,
        account: &str,
        revision: i64,
    ) -> Result<(), RechargeError> {
        sqlx::query!(
            "UPDATE settings SET retry_at = NULL
             WHERE account_id = $1 AND revision = $2 AND due_trigger IS NOT NULL",
            account,
            revision
        )
        .execute(conn)
        .await?;
        Ok(())
    }

    /// A crossing that arrived while an attempt was in flight: a check is due when the
    /// attempt ends (not before: the sweeper leaves it, `retry_at` is empty). The settings
    /// row is locked before the attempt is looked at again, so an attempt that ended first
    /// (its success updates this row in its transaction) is seen ended: then nothing is
    /// parked and false is returned, and the caller decides as usual.
    pub async fn park_due(
        conn: &mut PgConnection,
        account: &str,
        event_id: &str,
    ) -> Result<bool, RechargeError> {
        if Self::lock_settings(&mut *conn, account).await?.is_none()
            || !Self::has_in_flight(&mut *conn, account).await?
        {
            return Ok(false);
        }
        sqlx::query!(
            "UPDATE settings SET retry_at = NULL, due_trigger = $2, due_event_id = $3
             WHERE account_id = $1 AND enabled",
            account,
            Trigger::ThresholdCrossed.as_str(),
            event_id,
        )
        .execute(conn)
        .await?;
        Ok(true)
    }

    /// After a failure: one more in the streak, and when to look again; returns the streak.
    pub async fn count_failure(
        conn: &mut PgConnection,
        account: &str,
        retry_after: Duration,
    ) -> Result<i32, RechargeError> {
        Ok(sqlx::query_scalar!(
            "UPDATE settings SET consecutive_failures = consecutive_failures + 1,
                                 retry_at = now() + make_interval(secs => $2),
                                 due_trigger = $3, due_event_id = NULL
             WHERE account_id = $1 RETURNING consecutive_failures",
            account,
            secs(retry_after),
            Trigger::RetryAfterFailure.as_str(),
        )
        .fetch_one(conn)
        .await?)
    }

    /// Accounts with a balance check due (a crossing, enabling, after a top-up, after a
    /// failure's retry delay), oldest first; the partial index `settings_due` finds them.
    pub async fn due_checks(
        &self,
        limit: i64,
        offset_secs: f64,
    ) -> Result<Vec<String>, RechargeError> {
        Ok(sqlx::query_scalar!(
            "SELECT account_id FROM settings
             WHERE enabled AND retry_at IS NOT NULL AND retry_at <= now() + make_interval(secs => $2)
             ORDER BY retry_at LIMIT $1",
            limit,
            offset_secs,
        )
        .fetch_all(&self.pool)
        .await?)
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

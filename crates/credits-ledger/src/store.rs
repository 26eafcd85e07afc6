//! PostgreSQL access for the ledger. Every money movement is one call of the
//! `ledger_post` function (see the migration): one round trip, one transaction, locking
//! only the account's row.

use chrono::{DateTime, Utc};
use credits_common::Money;
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::*;

mod feed;
pub use feed::{Polled, WatchStart};

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

struct AccountRow {
    account_id: String,
    billing_mode: String,
    display_name: String,
    balance: Decimal,
    held: Decimal,
    access: String,
    threshold: Option<Decimal>,
    threshold_version: i64,
    alert_thresholds: Vec<Decimal>,
    created_at: DateTime<Utc>,
}

impl TryFrom<AccountRow> for Account {
    type Error = LedgerError;
    fn try_from(r: AccountRow) -> Result<Self, Self::Error> {
        Ok(Account {
            account_id: AccountId::parse(&r.account_id)?,
            billing_mode: BillingMode::from_db(&r.billing_mode)?,
            display_name: r.display_name,
            balance: Money::new(r.balance),
            held: Money::new(r.held),
            access: Access::from_db(&r.access)?,
            threshold: r.threshold.map(Money::new),
            threshold_version: r.threshold_version,
            alert_thresholds: r.alert_thresholds.into_iter().map(Money::new).collect(),
            created_at: r.created_at,
            lots: Vec::new(),
        })
    }
}

struct LotRow {
    lot_id: Uuid,
    source: String,
    amount: Decimal,
    remaining: Decimal,
    expires_at: Option<DateTime<Utc>>,
    priority: i32,
    reason: String,
    created_at: DateTime<Utc>,
    entry_id: Option<Uuid>,
}

impl TryFrom<LotRow> for Lot {
    type Error = LedgerError;
    fn try_from(r: LotRow) -> Result<Self, Self::Error> {
        Ok(Lot {
            lot_id: r.lot_id,
            source: CreditSource::from_db(&r.source)?,
            amount: Money::new(r.amount),
            remaining: Money::new(r.remaining),
            expires_at: r.expires_at,
            priority: r.priority,
            reason: r.reason,
            created_at: r.created_at,
            entry_id: r.entry_id,
        })
    }
}

/// R29: the most lots `GetAccount` lists (an account with more shows the first ones to be
/// drawn).
pub const MAX_LISTED_LOTS: i64 = 500;

/// One row of `ledger_post`; entry columns are null only for `not_found`.
struct PostRow {
    outcome: String,
    seq: Option<i64>,
    entry_id: Option<Uuid>,
    kind: Option<String>,
    category: Option<String>,
    source: Option<String>,
    amount: Option<Decimal>,
    balance_after: Option<Decimal>,
    reference: Option<String>,
    description: Option<String>,
    created_at: Option<DateTime<Utc>>,
    balance: Option<Decimal>,
    access: Option<String>,
}

struct EntryRow {
    seq: i64,
    entry_id: Uuid,
    account_id: String,
    kind: String,
    category: Option<String>,
    source: Option<String>,
    amount: Decimal,
    balance_after: Decimal,
    reference: String,
    description: String,
    idempotency_key: Option<String>,
    created_at: DateTime<Utc>,
}

struct HoldRow {
    seq: i64,
    hold_id: Uuid,
    account_id: String,
    amount: Decimal,
    category: String,
    status: String,
    captured_amount: Option<Decimal>,
    entry_id: Option<Uuid>,
    entry_seq: Option<i64>,
    capture_available: Option<Decimal>,
    description: String,
    idempotency_key: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
}

impl TryFrom<HoldRow> for Hold {
    type Error = LedgerError;
    fn try_from(r: HoldRow) -> Result<Self, Self::Error> {
        Ok(Hold {
            seq: r.seq,
            hold_id: r.hold_id,
            account_id: AccountId::parse(&r.account_id)?,
            amount: Money::new(r.amount),
            category: UsageCategory::from_db(&r.category)?,
            status: HoldStatus::from_db(&r.status)?,
            captured_amount: r.captured_amount.map(Money::new),
            entry_id: r.entry_id,
            entry_seq: r.entry_seq,
            capture_available: r.capture_available.map(Money::new),
            description: r.description,
            idempotency_key: r.idempotency_key,
            created_at: r.created_at,
            expires_at: r.expires_at,
            ended_at: r.ended_at,
        })
    }
}

fn posting_from_db(
    kind: &str,
    category: Option<&str>,
    source: Option<&str>,
) -> Result<Posting, LedgerError> {
    match (EntryKind::from_db(kind)?, category, source) {
        (EntryKind::USAGE, Some(c), _) => Ok(Posting::Usage(UsageCategory::from_db(c)?)),
        (EntryKind::CREDIT, _, Some(s)) => Ok(Posting::Credit(CreditSource::from_db(s)?)),
        (k @ (EntryKind::REFUND | EntryKind::DISPUTE | EntryKind::EXPIRY), None, None) => {
            Ok(Posting::Debit(k))
        }
        _ => Err(LedgerError::Internal(
            "entry without category or source".into(),
        )),
    }
}

impl TryFrom<EntryRow> for Entry {
    type Error = LedgerError;
    fn try_from(r: EntryRow) -> Result<Self, Self::Error> {
        Ok(Entry {
            seq: r.seq,
            entry_id: r.entry_id,
            account_id: AccountId::parse(&r.account_id)?,
            posting: posting_from_db(&r.kind, r.category.as_deref(), r.source.as_deref())?,
            amount: Money::new(r.amount),
            balance_after: Money::new(r.balance_after),
            reference: r.reference,
            description: r.description,
            // A capture's entry has no caller's key; its reference is the hold id.
            idempotency_key: r.idempotency_key.unwrap_or_default(),
            created_at: r.created_at,
        })
    }
}

fn missing(col: &str) -> LedgerError {
    LedgerError::Internal(format!("ledger_post returned no {col}"))
}

/// What `ledger_post` did, as the function spells it. Matched exhaustively: an outcome
/// this code does not know is an error, never read as "posted".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PostOutcome {
    Posted,
    Replayed,
    Conflict,
    NotFound,
    /// `ledger_debit_covered`: the available balance does not cover the debit.
    Insufficient,
}

impl PostOutcome {
    fn parse(s: &str) -> Result<Self, LedgerError> {
        match s {
            "posted" => Ok(PostOutcome::Posted),
            "replayed" => Ok(PostOutcome::Replayed),
            "conflict" => Ok(PostOutcome::Conflict),
            "not_found" => Ok(PostOutcome::NotFound),
            "insufficient" => Ok(PostOutcome::Insufficient),
            other => {
                Err(credits_common::ids::unknown_db_value("ledger_post outcome", other).into())
            }
        }
    }
}

/// Turns one `ledger_post` outcome into the domain result, for the request it answers.
fn posted(req: &PostingRequest, r: PostRow) -> Result<Posted, LedgerError> {
    let outcome = PostOutcome::parse(&r.outcome)?;
    match outcome {
        PostOutcome::NotFound => return Err(LedgerError::AccountNotFound(req.account_id.clone())),
        PostOutcome::Conflict => {
            return Err(LedgerError::IdempotencyConflict {
                account: req.account_id.clone(),
                key: req.idempotency_key.clone(),
            });
        }
        PostOutcome::Insufficient => {
            return Err(LedgerError::InsufficientAvailable {
                account: req.account_id.clone(),
                available: Money::new(r.amount.ok_or_else(|| missing("amount"))?),
                access: Access::from_db(&r.access.ok_or_else(|| missing("access"))?)?,
                amount: req.amount,
            });
        }
        PostOutcome::Posted | PostOutcome::Replayed => {}
    }
    let kind = r.kind.ok_or_else(|| missing("kind"))?;
    let entry = Entry {
        seq: r.seq.ok_or_else(|| missing("seq"))?,
        entry_id: r.entry_id.ok_or_else(|| missing("entry_id"))?,
        account_id: req.account_id.clone(),
        posting: posting_from_db(&kind, r.category.as_deref(), r.source.as_deref())?,
        amount: Money::new(r.amount.ok_or_else(|| missing("amount"))?),
        balance_after: Money::new(r.balance_after.ok_or_else(|| missing("balance_after"))?),
        reference: r.reference.unwrap_or_default(),
        description: r.description.unwrap_or_default(),
        idempotency_key: req.idempotency_key.as_str().to_owned(),
        created_at: r.created_at.ok_or_else(|| missing("created_at"))?,
    };
    Ok(Posted {
        entry,
        balance: Money::new(r.balance.ok_or_else(|| missing("balance"))?),
        access: Access::from_db(&r.access.ok_or_else(|| missing("access"))?)?,
        replayed: outcome == PostOutcome::Replayed,
    })
}

fn split(p: Posting) -> (Option<&'static str>, Option<&'static str>) {
    match p {
        Posting::Usage(c) => (Some(c.as_str()), None),
        Posting::Credit(s) => (None, Some(s.as_str())),
        Posting::Debit(_) => (None, None),
    }
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the account. Repeating an identical create returns the existing account;
    /// a different create for an existing id is `AlreadyExists`.
    pub async fn create_account(&self, new: &NewAccount) -> Result<Account, LedgerError> {
        let access = match new.billing_mode {
            BillingMode::PREPAID => Access::PENDING_FIRST_PURCHASE,
            BillingMode::CONTRACT => Access::ACTIVE,
        };
        // R31: a new account is a change too (version 1): watchers learn of it.
        let inserted = sqlx::query_as!(
            AccountRow,
            r#"WITH a AS (
                   INSERT INTO accounts (account_id, billing_mode, display_name, access)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (account_id) DO NOTHING
                   RETURNING account_id, billing_mode, display_name, balance, held, access, threshold,
                             threshold_version, alert_thresholds, created_at, version),
               f AS (INSERT INTO access_changes (account_ids, versions, modes, access, balances, helds)
                     SELECT ARRAY[a.account_id], ARRAY[a.version], ARRAY[a.billing_mode],
                            ARRAY[a.access], ARRAY[a.balance], ARRAY[a.held] FROM a)
               SELECT a.account_id AS "account_id!", a.billing_mode AS "billing_mode!",
                      a.display_name AS "display_name!", a.balance AS "balance!", a.held AS "held!",
                      a.access AS "access!", a.threshold, a.threshold_version AS "threshold_version!",
                      a.alert_thresholds AS "alert_thresholds!", a.created_at AS "created_at!"
               FROM a"#,
            new.account_id.as_str(),
            new.billing_mode.as_str(),
            new.display_name,
            access.as_str(),
        )
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            return row.try_into();
        }
        let existing = self.get_account(&new.account_id).await?;
        if existing.billing_mode == new.billing_mode && existing.display_name == new.display_name {
            Ok(existing)
        } else {
            Err(LedgerError::AccountExists(new.account_id.clone()))
        }
    }

    /// The account with its lots (R29) in burn order: one statement (one snapshot, one
    /// round trip), so what the lots hold adds up to the balance shown.
    pub async fn get_account(&self, id: &AccountId) -> Result<Account, LedgerError> {
        let rows = sqlx::query!(
            r#"SELECT a.account_id, a.billing_mode, a.display_name, a.balance, a.held, a.access,
                      a.threshold, a.threshold_version, a.alert_thresholds, a.created_at,
                      l.lot_id AS "lot_id?", l.source AS "source?", l.amount AS "amount?",
                      l.remaining AS "remaining?", l.expires_at AS "expires_at?",
                      l.priority AS "priority?", l.reason AS "reason?",
                      l.created_at AS "lot_created_at?", l.entry_id AS "entry_id?"
               FROM accounts a
               LEFT JOIN LATERAL (
                   -- In burn order, with the pending usage drawn (ledger_lots_now()).
                   SELECT n.ord, n.lot_id, n.source, n.amount, n.remaining, n.expires_at,
                          n.priority, n.reason, n.created_at, e.entry_id
                   FROM ledger_lots_now(a.account_id) n
                   LEFT JOIN entries e ON e.seq = n.entry_seq
                   ORDER BY n.ord
                   LIMIT $2) l ON true
               WHERE a.account_id = $1
               ORDER BY l.ord"#,
            id.as_str(),
            MAX_LISTED_LOTS,
        )
        .fetch_all(&self.pool)
        .await?;
        let Some(first) = rows.first() else {
            return Err(LedgerError::AccountNotFound(id.clone()));
        };
        let mut account: Account = AccountRow {
            account_id: first.account_id.clone(),
            billing_mode: first.billing_mode.clone(),
            display_name: first.display_name.clone(),
            balance: first.balance,
            held: first.held,
            access: first.access.clone(),
            threshold: first.threshold,
            threshold_version: first.threshold_version,
            alert_thresholds: first.alert_thresholds.clone(),
            created_at: first.created_at,
        }
        .try_into()?;
        for r in rows {
            let (
                Some(lot_id),
                Some(source),
                Some(amount),
                Some(remaining),
                Some(priority),
                Some(reason),
                Some(created_at),
            ) = (
                r.lot_id,
                r.source,
                r.amount,
                r.remaining,
                r.priority,
                r.reason,
                r.lot_created_at,
            )
            else {
                continue; // the account's row alone: it has no lot holding credits
            };
            account.lots.push(Lot::try_from(LotRow {
                lot_id,
                source,
                amount,
                remaining,
                expires_at: r.expires_at,
                priority,
                reason,
                created_at,
                entry_id: r.entry_id,
            })?);
        }
        Ok(account)
    }

    /// R30: usage per period and category from the rollups (never the journal), periods
    /// of the range's granularity counted from `from`, empty ones left out; ordered by
    /// start, then category.
    pub async fn usage_summary(
        &self,
        id: &AccountId,
        range: &SummaryRange,
    ) -> Result<Vec<UsagePeriod>, LedgerError> {
        let rows = sqlx::query!(
            r#"SELECT $2::timestamptz
                      + (extract(epoch FROM r.hour - $2::timestamptz)::bigint / $4::bigint * $4::bigint)
                        * interval '1 second' AS "start!",
                      r.category AS "category!", sum(r.amount) AS "amount!", sum(r.count)::bigint AS "count!"
               FROM ledger_usage_hours($1) r
               WHERE r.hour >= $2 AND r.hour < $3
               GROUP BY 1, 2
               ORDER BY 1, 2"#,
            id.as_str(),
            range.from,
            range.to,
            range.granularity.seconds(),
        )
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            // No usage, or no account: the access read tells them apart (AccountNotFound).
            self.access(id).await?;
        }
        rows.into_iter()
            .map(|r| {
                Ok(UsagePeriod {
                    start: r.start,
                    category: UsageCategory::from_db(&r.category)?,
                    amount: Money::new(r.amount),
                    count: r.count,
                })
            })
            .collect()
    }

    /// Whether the account's journal has an entry under this idempotency key.
    pub async fn key_used(
        &self,
        id: &AccountId,
        key: &IdempotencyKey,
    ) -> Result<bool, LedgerError> {
        Ok(sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM entries WHERE account_id = $1 AND idempotency_key = $2) AS "e!""#,
            id.as_str(),
            key.as_str()
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// R29: expires what is due on up to `limit` accounts whose earliest expiry has passed
    /// (database time), each account in a transaction of its own (`ledger_expire_account`
    /// locks its row: any number of replicas may sweep at once, and each lot expires once).
    /// Returns how many lots this call expired and whether it saw a full page.
    pub async fn expire_credits(&self, limit: i64) -> Result<(usize, bool), LedgerError> {
        let due = sqlx::query_scalar!(
            r#"SELECT account_id FROM accounts
               WHERE next_expiry <= now()
               ORDER BY next_expiry
               LIMIT $1"#,
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        let full = due.len() as i64 == limit;
        let mut expired = 0;
        for account in due {
            let n = sqlx::query_scalar!(r#"SELECT ledger_expire_account($1) AS "n!""#, account)
                .fetch_one(&self.pool)
                .await?;
            expired += n as usize;
        }
        Ok((expired, full))
    }

    /// The gateway's hot path: one primary-key read.
    pub async fn access(&self, id: &AccountId) -> Result<AccessView, LedgerError> {
        let mut conn = self.pool.acquire().await?;
        Self::access_in(&mut conn, id).await
    }

    /// R18: replaces the account's alert thresholds (validated, highest first); returns
    /// what is stored.
    pub async fn set_alerts(
        &self,
        id: &AccountId,
        thresholds: &[Money],
    ) -> Result<Vec<Money>, LedgerError> {
        let values: Vec<Decimal> = thresholds.iter().map(|t| t.as_decimal()).collect();
        let stored = sqlx::query_scalar!(
            "UPDATE accounts SET alert_thresholds = $2, updated_at = now()
             WHERE account_id = $1 RETURNING alert_thresholds",
            id.as_str(),
            &values,
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| LedgerError::AccountNotFound(id.clone()))?;
        Ok(stored.into_iter().map(Money::new).collect())
    }

    /// R15: creates a hold, or answers the first one for a repeated key.
    pub async fn create_hold(&self, new: &NewHold) -> Result<(Hold, bool), LedgerError> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query!(
            r#"SELECT outcome AS "outcome!", hold_id FROM ledger_hold_create($1, $2, $3, $4, $5, $6, $7)"#,
            new.account_id.as_str(),
            new.amount.as_decimal(),
            new.category.as_str(),
            new.description,
            new.idempotency_key.as_str(),
            new.ttl_seconds,
            credits_common::trace::current_header(),
        )
        .fetch_one(&mut *tx)
        .await?;
        let replayed = match r.outcome.as_str() {
            "created" => false,
            "replayed" => true,
            "not_found" => return Err(LedgerError::AccountNotFound(new.account_id.clone())),
            "conflict" => {
                return Err(LedgerError::IdempotencyConflict {
                    account: new.account_id.clone(),
                    key: new.idempotency_key.clone(),
                });
            }
            "insufficient" => {
                let view = Self::access_in(&mut tx, &new.account_id).await?;
                return Err(LedgerError::InsufficientAvailable {
                    account: new.account_id.clone(),
                    available: view.available(),
                    access: view.access,
                    amount: new.amount,
                });
            }
            other => {
                return Err(credits_common::ids::unknown_db_value("hold outcome", other).into());
            }
        };
        let hold_id = r.hold_id.ok_or_else(|| missing("hold_id"))?;
        let hold = Self::hold_in(&mut tx, &new.account_id, hold_id).await?;
        tx.commit().await?;
        Ok((hold, replayed))
    }

    /// R15: captures or releases a hold. Repeating the call that ended it answers the same;
    /// any other ending of an ended hold is `HoldEnded`.
    pub async fn end_hold(
        &self,
        account: &AccountId,
        hold_id: Uuid,
        ending: &HoldEnding,
    ) -> Result<HoldEnded, LedgerError> {
        let (amount, description) = match ending {
            HoldEnding::Capture {
                amount,
                description,
            } => (Some(amount.as_decimal()), description.as_str()),
            HoldEnding::Release => (None, ""),
        };
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query!(
            r#"SELECT outcome AS "outcome!", status FROM ledger_hold_end($1, $2, $3, $4, $5, $6)"#,
            account.as_str(),
            hold_id,
            ending.action(),
            amount,
            description,
            credits_common::trace::current_header(),
        )
        .fetch_one(&mut *tx)
        .await?;
        // An expiry found by this call is kept: it happened, whatever this call asked.
        tx.commit().await?;
        match r.outcome.as_str() {
            "ended" | "repeated" => {}
            "not_found" => {
                return Err(LedgerError::HoldNotFound {
                    account: account.clone(),
                    hold_id: hold_id.to_string(),
                });
            }
            "ended_otherwise" => {
                let hold = self.get_hold(account, hold_id).await?;
                let detail = match (ending, hold.captured_amount) {
                    (HoldEnding::Capture { .. }, Some(c)) => format!(
                        " for {c}; a capture ends a hold once (a repeat must send the same amount and description)"
                    ),
                    _ => String::new(),
                };
                return Err(LedgerError::HoldEnded {
                    hold_id,
                    status: hold.status,
                    detail,
                });
            }
            other => {
                return Err(credits_common::ids::unknown_db_value("hold outcome", other).into());
            }
        }
        let hold = self.get_hold(account, hold_id).await?;
        // A capture answers with the balances right after it, the first time and on every
        // repeat; a release with the balances now.
        let (entry, balance, available) = match (hold.entry_seq, hold.capture_available) {
            (Some(seq), Some(available)) => {
                let entry = self.entry(account, seq).await?;
                let balance = entry.balance_after;
                (Some(entry), balance, available)
            }
            _ => {
                let view = self.access(account).await?;
                (None, view.balance, view.available())
            }
        };
        Ok(HoldEnded {
            hold,
            entry,
            balance,
            available,
        })
    }

    async fn access_in(
        conn: &mut sqlx::PgConnection,
        id: &AccountId,
    ) -> Result<AccessView, LedgerError> {
        let row = sqlx::query!(
            "SELECT access, billing_mode, balance, held, version FROM accounts WHERE account_id = $1",
            id.as_str()
        )
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| LedgerError::AccountNotFound(id.clone()))?;
        Ok(AccessView {
            access: Access::from_db(&row.access)?,
            billing_mode: BillingMode::from_db(&row.billing_mode)?,
            balance: Money::new(row.balance),
            held: Money::new(row.held),
            version: row.version,
        })
    }

    async fn hold_in(
        conn: &mut sqlx::PgConnection,
        account: &AccountId,
        hold_id: Uuid,
    ) -> Result<Hold, LedgerError> {
        sqlx::query_as!(
            HoldRow,
            r#"SELECT seq, hold_id, account_id, amount, category, status, captured_amount,
                      entry_id, entry_seq, capture_available, description, idempotency_key,
                      created_at, expires_at,
                      ended_at
               FROM holds WHERE hold_id = $1 AND account_id = $2"#,
            hold_id,
            account.as_str(),
        )
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| LedgerError::HoldNotFound {
            account: account.clone(),
            hold_id: hold_id.to_string(),
        })?
        .try_into()
    }

    pub async fn get_hold(&self, account: &AccountId, hold_id: Uuid) -> Result<Hold, LedgerError> {
        let mut conn = self.pool.acquire().await?;
        match Self::hold_in(&mut conn, account, hold_id).await {
            // Distinguish "no hold" from "no account".
            Err(e @ LedgerError::HoldNotFound { .. }) => {
                Self::access_in(&mut conn, account).await?;
                Err(e)
            }
            other => other,
        }
    }

    /// Holds newest first; `before` is the exclusive upper bound of `seq` (page token).
    pub async fn list_holds(
        &self,
        id: &AccountId,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Hold>, LedgerError> {
        let rows = sqlx::query_as!(
            HoldRow,
            r#"SELECT seq, hold_id, account_id, amount, category, status, captured_amount,
                      entry_id, entry_seq, capture_available, description, idempotency_key,
                      created_at, expires_at,
                      ended_at
               FROM holds
               WHERE account_id = $1 AND seq < $2
               ORDER BY seq DESC
               LIMIT $3"#,
            id.as_str(),
            before.unwrap_or(i64::MAX),
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            self.access(id).await?;
        }
        rows.into_iter().map(Hold::try_from).collect()
    }

    /// One entry of `account` by its sequence number.
    async fn entry(&self, account: &AccountId, seq: i64) -> Result<Entry, LedgerError> {
        sqlx::query_as!(
            EntryRow,
            r#"SELECT seq, entry_id, account_id, kind, category, source, amount, balance_after,
                      reference, description, idempotency_key, created_at
               FROM entries WHERE account_id = $1 AND seq = $2"#,
            account.as_str(),
            seq,
        )
        .fetch_one(&self.pool)
        .await?
        .try_into()
    }

    /// R15: expires up to `limit` holds past their `expires_at` (database time), each in a
    /// transaction of its own (one account row lock at a time: a sweep never waits on one
    /// account while holding another, so it cannot deadlock with group commit). Any number
    /// of replicas may sweep at once; each hold expires once. Returns how many this call
    /// expired and whether it saw a full page.
    pub async fn expire_holds(&self, limit: i64) -> Result<(usize, bool), LedgerError> {
        let due = sqlx::query!(
            r#"SELECT account_id, hold_id FROM holds
               WHERE status = 'ACTIVE' AND expires_at <= now()
               ORDER BY expires_at
               LIMIT $1"#,
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        let full = due.len() as i64 == limit;
        let mut expired = 0;
        for h in due {
            let outcome = sqlx::query_scalar!(
                r#"SELECT outcome AS "outcome!" FROM ledger_hold_end($1, $2, 'EXPIRE', NULL, NULL)"#,
                h.account_id,
                h.hold_id,
            )
            .fetch_one(&self.pool)
            .await?;
            if outcome == "ended" {
                expired += 1;
            }
        }
        Ok((expired, full))
    }

    pub async fn post(&self, req: &PostingRequest) -> Result<Posted, LedgerError> {
        let (category, source) = split(req.posting);
        let row = sqlx::query_as!(
            PostRow,
            r#"SELECT outcome AS "outcome!", seq, entry_id, kind, category, source, amount,
                      balance_after, reference, description, created_at, balance, access
               FROM ledger_post($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"#,
            req.account_id.as_str(),
            req.posting.kind().as_str(),
            category,
            source,
            req.amount.as_decimal(),
            req.reference,
            req.description,
            req.idempotency_key.as_str(),
            req.traceparent.as_deref(),
            req.expires_at,
            req.priority,
        )
        .fetch_one(&self.pool)
        .await?;
        posted(req, row)
    }

    /// R27: a debit the available balance must cover (`ledger_debit_covered`):
    /// `InsufficientAvailable` and nothing changed when it does not.
    pub async fn post_covered_debit(&self, req: &PostingRequest) -> Result<Posted, LedgerError> {
        let row = sqlx::query_as!(
            PostRow,
            r#"SELECT outcome AS "outcome!", seq, entry_id, kind, category, source, amount,
                      balance_after, reference, description, created_at, balance, access
               FROM ledger_debit_covered($1, $2, $3, $4, $5, $6, $7)"#,
            req.account_id.as_str(),
            req.posting.kind().as_str(),
            req.amount.as_decimal(),
            req.reference,
            req.description,
            req.idempotency_key.as_str(),
            req.traceparent.as_deref(),
        )
        .fetch_one(&self.pool)
        .await?;
        posted(req, row)
    }

    /// Posts many usage items in one statement (one round trip, one transaction),
    /// `ledger_post_batch`: as set operations, or `ledger_post` per item when two items share
    /// one (account, key). Items are applied in request order within one account; results
    /// come back in request order.
    pub async fn post_batch(
        &self,
        reqs: &[PostingRequest],
    ) -> Result<Vec<Result<Posted, LedgerError>>, LedgerError> {
        let mut accounts = Vec::with_capacity(reqs.len());
        let mut kinds = Vec::with_capacity(reqs.len());
        let mut categories: Vec<Option<String>> = Vec::with_capacity(reqs.len());
        let mut sources: Vec<Option<String>> = Vec::with_capacity(reqs.len());
        let mut amounts = Vec::with_capacity(reqs.len());
        let mut references = Vec::with_capacity(reqs.len());
        let mut descriptions = Vec::with_capacity(reqs.len());
        let mut keys = Vec::with_capacity(reqs.len());
        let mut traceparents: Vec<Option<String>> = Vec::with_capacity(reqs.len());
        for r in reqs {
            let (c, s) = split(r.posting);
            accounts.push(r.account_id.as_str().to_owned());
            kinds.push(r.posting.kind().as_str().to_owned());
            categories.push(c.map(str::to_owned));
            sources.push(s.map(str::to_owned));
            amounts.push(r.amount.as_decimal());
            references.push(r.reference.clone());
            descriptions.push(r.description.clone());
            keys.push(r.idempotency_key.as_str().to_owned());
            traceparents.push(r.traceparent.clone());
        }
        let rows = sqlx::query_as!(
            PostRow,
            r#"SELECT p.outcome AS "outcome!", p.seq, p.entry_id, p.kind, p.category, p.source,
                      p.amount, p.balance_after, p.reference, p.description, p.created_at,
                      p.balance, p.access
               FROM ledger_post_batch($1::text[], $2::text[], $3::text[], $4::text[],
                                      $5::numeric[], $6::text[], $7::text[], $8::text[],
                                      $9::text[]) p
               ORDER BY p.ord"#,
            &accounts,
            &kinds,
            &categories as &[Option<String>],
            &sources as &[Option<String>],
            &amounts,
            &references,
            &descriptions,
            &keys,
            &traceparents as &[Option<String>],
        )
        .fetch_all(&self.pool)
        .await?;
        if rows.len() != reqs.len() {
            return Err(LedgerError::Internal(
                "batch returned a different number of rows".into(),
            ));
        }
        Ok(reqs
            .iter()
            .zip(rows)
            .map(|(req, row)| posted(req, row))
            .collect())
    }

    /// [`Store::post_batch`], with one caller's failure kept to that caller (R21): when the
    /// batch statement fails for any reason but a lost database, each item is posted on its
    /// own, so every other item still gets its own result. A lost database fails every item
    /// alike (`UNAVAILABLE`, safe to retry with the same keys).
    pub async fn post_batch_isolated(
        &self,
        reqs: &[PostingRequest],
    ) -> Vec<Result<Posted, LedgerError>> {
        match self.post_batch(reqs).await {
            Ok(results) => results,
            Err(e) if reqs.len() == 1 || matches!(e, LedgerError::Unavailable(_)) => {
                reqs.iter().map(|_| Err(e.clone())).collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, items = reqs.len(), "batch posting failed; posting its items one by one");
                metrics::counter!("credits_ledger_group_commit_isolations_total").increment(1);
                let mut results = Vec::with_capacity(reqs.len());
                for req in reqs {
                    results.push(self.post(req).await);
                }
                results
            }
        }
    }

    /// Entries newest first; `before` is the exclusive upper bound of `seq` (page token).
    pub async fn list_entries(
        &self,
        id: &AccountId,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Entry>, LedgerError> {
        let rows = sqlx::query_as!(
            EntryRow,
            r#"SELECT seq, entry_id, account_id, kind, category, source, amount, balance_after,
                      reference, description, idempotency_key, created_at
               FROM entries
               WHERE account_id = $1 AND seq < $2
               ORDER BY seq DESC
               LIMIT $3"#,
            id.as_str(),
            before.unwrap_or(i64::MAX),
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            // Distinguish "no entries" from "no account".
            self.access(id).await?;
        }
        rows.into_iter().map(Entry::try_from).collect()
    }

    /// Sets (or clears, with `None`) the threshold. A `version` > 0 applies only when newer
    /// than the last versioned write; 0 always applies. Returns what is stored afterwards.
    pub async fn set_threshold(
        &self,
        id: &AccountId,
        threshold: Option<Money>,
        version: i64,
    ) -> Result<StoredThreshold, LedgerError> {
        let row = sqlx::query!(
            r#"UPDATE accounts
               SET threshold = CASE WHEN $3::bigint = 0 OR $3 > threshold_version THEN $2 ELSE threshold END,
                   threshold_version = GREATEST(threshold_version, $3),
                   updated_at = now()
               WHERE account_id = $1
               RETURNING threshold, threshold_version"#,
            id.as_str(),
            threshold.map(|m| m.as_decimal()),
            version,
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| LedgerError::AccountNotFound(id.clone()))?;
        Ok(StoredThreshold {
            threshold: row.threshold.map(Money::new),
            version: row.threshold_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::PostOutcome;

    #[test]
    fn an_unknown_posting_outcome_is_an_error_not_a_posting() {
        assert_eq!(PostOutcome::parse("posted").ok(), Some(PostOutcome::Posted));
        assert_eq!(
            PostOutcome::parse("replayed").ok(),
            Some(PostOutcome::Replayed)
        );
        assert!(PostOutcome::parse("posted_maybe").is_err());
        assert!(PostOutcome::parse("").is_err());
    }
}

//! PostgreSQL access for the ledger. Every money movement is one call of the
//! `ledger_post` function (see the migration): one round trip, one transaction, locking
//! only the account's row.

use chrono::{DateTime, Utc};
use credits_common::Money;
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::*;

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

struct AccountRow {
    account_id: String,
    billing_mode: String,
    display_name: String,
    balance: Decimal,
    access: String,
    threshold: Option<Decimal>,
    threshold_version: i64,
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
            access: Access::from_db(&r.access)?,
            threshold: r.threshold.map(Money::new),
            threshold_version: r.threshold_version,
            created_at: r.created_at,
        })
    }
}

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
    idempotency_key: String,
    created_at: DateTime<Utc>,
}

fn posting_from_db(
    kind: &str,
    category: Option<&str>,
    source: Option<&str>,
) -> Result<Posting, LedgerError> {
    match (EntryKind::from_db(kind)?, category, source) {
        (EntryKind::USAGE, Some(c), _) => Ok(Posting::Usage(UsageCategory::from_db(c)?)),
        (EntryKind::CREDIT, _, Some(s)) => Ok(Posting::Credit(CreditSource::from_db(s)?)),
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
            idempotency_key: r.idempotency_key,
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
}

impl PostOutcome {
    fn parse(s: &str) -> Result<Self, LedgerError> {
        match s {
            "posted" => Ok(PostOutcome::Posted),
            "replayed" => Ok(PostOutcome::Replayed),
            "conflict" => Ok(PostOutcome::Conflict),
            "not_found" => Ok(PostOutcome::NotFound),
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
        let inserted = sqlx::query_as!(
            AccountRow,
            r#"INSERT INTO accounts (account_id, billing_mode, display_name, access)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (account_id) DO NOTHING
               RETURNING account_id, billing_mode, display_name, balance, access, threshold, threshold_version, created_at"#,
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

    pub async fn get_account(&self, id: &AccountId) -> Result<Account, LedgerError> {
        sqlx::query_as!(
            AccountRow,
            r#"SELECT account_id, billing_mode, display_name, balance, access, threshold, threshold_version, created_at
               FROM accounts WHERE account_id = $1"#,
            id.as_str()
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| LedgerError::AccountNotFound(id.clone()))?
        .try_into()
    }

    /// The gateway's hot path: one primary-key read.
    pub async fn access(&self, id: &AccountId) -> Result<(Access, Money), LedgerError> {
        let row = sqlx::query!(
            "SELECT access, balance FROM accounts WHERE account_id = $1",
            id.as_str()
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| LedgerError::AccountNotFound(id.clone()))?;
        Ok((Access::from_db(&row.access)?, Money::new(row.balance)))
    }

    pub async fn post(&self, req: &PostingRequest) -> Result<Posted, LedgerError> {
        let (category, source) = split(req.posting);
        let row = sqlx::query_as!(
            PostRow,
            r#"SELECT outcome AS "outcome!", seq, entry_id, kind, category, source, amount,
                      balance_after, reference, description, created_at, balance, access
               FROM ledger_post($1, $2, $3, $4, $5, $6, $7, $8)"#,
            req.account_id.as_str(),
            req.posting.kind().as_str(),
            category,
            source,
            req.amount.as_decimal(),
            req.reference,
            req.description,
            req.idempotency_key.as_str(),
        )
        .fetch_one(&self.pool)
        .await?;
        posted(req, row)
    }

    /// Posts many usage items in one statement (one round trip, one transaction). Items are
    /// applied in account order, which keeps concurrent batches free of deadlocks, and in
    /// request order within one account; results come back in request order.
    pub async fn post_batch(
        &self,
        reqs: &[PostingRequest],
    ) -> Result<Vec<Result<Posted, LedgerError>>, LedgerError> {
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by(|&a, &b| reqs[a].account_id.cmp(&reqs[b].account_id));
        let mut accounts = Vec::with_capacity(reqs.len());
        let mut kinds = Vec::with_capacity(reqs.len());
        let mut categories: Vec<Option<String>> = Vec::with_capacity(reqs.len());
        let mut sources: Vec<Option<String>> = Vec::with_capacity(reqs.len());
        let mut amounts = Vec::with_capacity(reqs.len());
        let mut references = Vec::with_capacity(reqs.len());
        let mut descriptions = Vec::with_capacity(reqs.len());
        let mut keys = Vec::with_capacity(reqs.len());
        for &i in &order {
            let r = &reqs[i];
            let (c, s) = split(r.posting);
            accounts.push(r.account_id.as_str().to_owned());
            kinds.push(r.posting.kind().as_str().to_owned());
            categories.push(c.map(str::to_owned));
            sources.push(s.map(str::to_owned));
            amounts.push(r.amount.as_decimal());
            references.push(r.reference.clone());
            descriptions.push(r.description.clone());
            keys.push(r.idempotency_key.as_str().to_owned());
        }
        let rows = sqlx::query_as!(
            PostRow,
            r#"SELECT p.outcome AS "outcome!", p.seq, p.entry_id, p.kind, p.category, p.source,
                      p.amount, p.balance_after, p.reference, p.description, p.created_at,
                      p.balance, p.access
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[],
                           $6::text[], $7::text[], $8::text[])
                    WITH ORDINALITY AS i(account_id, kind, category, source, amount,
                                         reference, description, key, ord)
               CROSS JOIN LATERAL ledger_post(i.account_id, i.kind, i.category, i.source,
                                              i.amount, i.reference, i.description, i.key) p
               ORDER BY i.ord"#,
            &accounts,
            &kinds,
            &categories as &[Option<String>],
            &sources as &[Option<String>],
            &amounts,
            &references,
            &descriptions,
            &keys,
        )
        .fetch_all(&self.pool)
        .await?;
        if rows.len() != reqs.len() {
            return Err(LedgerError::Internal(
                "batch returned a different number of rows".into(),
            ));
        }
        let mut results: Vec<Option<Result<Posted, LedgerError>>> =
            (0..reqs.len()).map(|_| None).collect();
        for (&i, row) in order.iter().zip(rows) {
            results[i] = Some(posted(&reqs[i], row));
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(LedgerError::Internal("missing batch result".into()))))
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

//! R31: the access feed (migration `20261206000001_access_feed.sql`) — what committed
//! since a snapshot, a watcher's first part, pruning.
//!
//! Every statement that changes an account's balance, held amount or access writes the new
//! states into `access_changes`, keyed by its transaction id (`ledger_feed_one()` and the
//! group commit's `feed` step in `sql/functions.sql`). A reader remembers the snapshot it
//! last read at; the rows whose transaction was not visible in it — `xid >= xmax`, or
//! `xid` among the transactions it saw running — are exactly those committed since, on any
//! replica. Nothing is notified, so no commit waits on another.

use std::future::Future;

use chrono::{DateTime, Utc};
use credits_common::Money;
use futures_util::TryStreamExt;
use rust_decimal::Decimal;

use super::Store;
use crate::domain::*;

/// One poll: the snapshot it read at, whether the previous snapshot could still be caught
/// up from (nothing it needed was pruned), and what committed in between (per account in
/// version order).
#[derive(Debug)]
pub struct Polled {
    pub snapshot: String,
    pub resumable: bool,
    /// The server is on another timeline than the feed (a standby was promoted): the feed
    /// must get a new id ([`Store::feed_new_timeline`]).
    pub moved: bool,
    pub changes: Vec<AccessChange>,
}

/// How a watcher's stream began: the snapshot its first part was read at, and whether that
/// part was caught up from the watcher's cursor (else it is every watched account's state).
#[derive(Debug)]
pub struct WatchStart {
    pub snapshot: String,
    pub resumed: bool,
    /// The feed's id as read at that snapshot: the first cursor's (not this replica's
    /// last-known id, which may be older or newer across a failover).
    pub feed_id: String,
}

type ChangeRow = (
    String,
    i64,
    String,
    String,
    Decimal,
    Decimal,
    DateTime<Utc>,
    i64,
);

fn change(row: ChangeRow) -> Result<AccessChange, LedgerError> {
    let (account_id, version, mode, access, balance, held, at, xid) = row;
    Ok(AccessChange {
        account_id,
        view: AccessView {
            access: Access::from_db(&access)?,
            billing_mode: BillingMode::from_db(&mode)?,
            balance: Money::new(balance),
            held: Money::new(held),
            version,
        },
        at,
        xid: xid.max(0) as u64,
    })
}

/// The server's timeline (a promoted standby starts a new one), as the first eight hex
/// digits of the current WAL file's name.
const TIMELINE: &str = "substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)";

/// The changes committed after snapshot `$1`, one row per account change
/// (`ledger_feed_since()`: two index range reads — the transactions begun after it, and
/// those it saw running — never a scan of what the feed retains).
const CHANGES_SINCE: &str =
    "SELECT u.account_id, u.version, u.mode, u.access, u.balance, u.held, u.at, u.xid
     FROM ledger_feed_since($1::pg_snapshot) u WHERE true";

/// A cursor PostgreSQL itself refuses as a snapshot (the parser in `FeedCursor` should
/// have refused it first).
fn cursor_refused(e: sqlx::Error) -> LedgerError {
    match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("22P02") => {
            LedgerError::invalid("resume_cursor: not a cursor this ledger issued")
        }
        _ => e.into(),
    }
}

impl Store {
    /// The feed's id (in every cursor), 32 hex digits.
    pub async fn feed_id(&self) -> Result<String, LedgerError> {
        Ok(
            sqlx::query_scalar("SELECT replace(feed_id::text, '-', '') FROM access_feed")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// The database's current snapshot: where a reader with nothing to catch up starts.
    pub async fn feed_now(&self) -> Result<String, LedgerError> {
        Ok(sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(&self.pool)
            .await?)
    }

    /// What committed since snapshot `prev` of feed `feed_id`, and the snapshot read at —
    /// one statement, so one snapshot for both. Not resumable when the feed was pruned past
    /// `prev`, has another id now, or is on another timeline than the server.
    pub async fn feed_poll(&self, prev: &str, feed_id: &str) -> Result<Polled, LedgerError> {
        type Row = (
            String,
            bool,
            bool,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<Decimal>,
            Option<Decimal>,
            Option<DateTime<Utc>>,
            Option<i64>,
        );
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT s.snap, s.resumable, s.moved, x.* FROM (
                 SELECT pg_current_snapshot()::text AS snap,
                        f.pruned_below <= pg_snapshot_xmin($1::pg_snapshot)
                            AND replace(f.feed_id::text, '-', '') = $2
                            AND f.timeline IS NOT DISTINCT FROM {TIMELINE} AS resumable,
                        f.timeline IS DISTINCT FROM {TIMELINE} AS moved
                 FROM access_feed f) s
             LEFT JOIN LATERAL ({CHANGES_SINCE}) x ON s.resumable"
        ))
        .bind(prev)
        .bind(feed_id)
        .fetch_all(&self.pool)
        .await?;
        let (snapshot, resumable, moved) = rows
            .first()
            .map(|r| (r.0.clone(), r.1, r.2))
            .ok_or_else(|| LedgerError::Internal("feed poll: no snapshot".into()))?;
        let mut changes = Vec::with_capacity(rows.len());
        for r in rows {
            if let (Some(id), Some(v), Some(m), Some(a), Some(b), Some(h), Some(at), Some(x)) =
                (r.3, r.4, r.5, r.6, r.7, r.8, r.9, r.10)
            {
                changes.push(change((id, v, m, a, b, h, at, x))?);
            }
        }
        // Per account in the order the changes were made (transactions are not in xid
        // order); across accounts the order means nothing.
        changes.sort_by(|a, b| {
            (a.account_id.as_str(), a.view.version).cmp(&(b.account_id.as_str(), b.view.version))
        });
        Ok(Polled {
            snapshot,
            resumable,
            moved,
            changes,
        })
    }

    /// After a failover (the server on another timeline than the feed): a new feed id on
    /// this timeline, so that no cursor from before is resumed from. Idempotent across
    /// replicas (the first one moves it); returns the feed's id.
    pub async fn feed_new_timeline(&self) -> Result<String, LedgerError> {
        sqlx::query(&format!(
            "UPDATE access_feed SET feed_id = gen_random_uuid(), timeline = {TIMELINE}
             WHERE timeline IS DISTINCT FROM {TIMELINE}"
        ))
        .execute(&self.pool)
        .await?;
        self.feed_id().await
    }

    /// A watcher's first part, read at one snapshot: with a usable `since` (this feed's,
    /// not pruned past), every change committed after it; otherwise every watched
    /// account's current state (`accounts`: `None` = all, by id). Each is handed to `send`
    /// as read (a snapshot of a million accounts is never held in memory); `send`
    /// answering false (the watcher left) stops it.
    pub async fn watch_start<F, Fut>(
        &self,
        accounts: Option<&[String]>,
        since: Option<&FeedCursor>,
        mut send: F,
    ) -> Result<WatchStart, LedgerError>
    where
        F: FnMut(AccessChange) -> Fut,
        Fut: Future<Output = bool>,
    {
        // The feed is renewed first when the server moved to a new timeline and no poller
        // has renewed it yet: a first part read now names the new feed, so the client
        // knows it got a snapshot of it (not a catch-up of the feed it had).
        let moved: bool = sqlx::query_scalar(&format!(
            "SELECT f.timeline IS DISTINCT FROM {TIMELINE} FROM access_feed f"
        ))
        .fetch_one(&self.pool)
        .await?;
        if moved {
            self.feed_new_timeline().await?;
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        // A cursor is judged against the feed in the database, never against the id this
        // replica's poller last read: after a failover a poller still waiting on the old
        // primary holds the old id, and a cursor of the new feed, refused for that, was
        // answered with a snapshot its client took for a catch-up (versions skipped with no
        // reset to explain them).
        let usable = since;
        let (snapshot, resumable, read_feed_id): (String, Option<bool>, String) =
            sqlx::query_as(&format!(
                "SELECT pg_current_snapshot()::text,
                    f.pruned_below <= pg_snapshot_xmin($1::pg_snapshot)
                    -- one from beyond this database's present (a forgery, a restore)
                    AND pg_snapshot_xmax($1::pg_snapshot) <= pg_snapshot_xmax(pg_current_snapshot())
                    -- the feed as it is now, not as this replica last read it: after a
                    -- failover, its id changes and cursors from before are not resumed
                    AND replace(f.feed_id::text, '-', '') = $2
                    AND f.timeline IS NOT DISTINCT FROM {TIMELINE},
                    replace(f.feed_id::text, '-', '')
             FROM access_feed f"
            ))
            .bind(usable.map(|c| c.snapshot.as_str()))
            .bind(usable.map(|c| c.feed_id.as_str()))
            .fetch_one(&mut *tx)
            .await
            .map_err(cursor_refused)?;
        let resumed = resumable == Some(true);
        let ids: Vec<String> = accounts.map(<[String]>::to_vec).unwrap_or_default();
        let filtered = accounts.is_some();
        let query = match (resumed, filtered) {
            (true, false) => format!("{CHANGES_SINCE} ORDER BY u.account_id, u.version"),
            (true, true) => {
                format!(
                    "{CHANGES_SINCE} AND u.account_id = ANY ($2) ORDER BY u.account_id, u.version"
                )
            }
            (false, filtered) => format!(
                "SELECT account_id, version, billing_mode, access, balance, held, updated_at,
                        0::bigint
                 FROM accounts {} ORDER BY account_id",
                if filtered {
                    "WHERE account_id = ANY ($1)"
                } else {
                    ""
                }
            ),
        };
        let mut q = sqlx::query_as::<_, ChangeRow>(&query);
        if resumed {
            q = q.bind(usable.map(|c| c.snapshot.clone()));
        }
        if filtered {
            q = q.bind(ids);
        }
        let mut rows = q.fetch(&mut *tx);
        while let Some(row) = rows.try_next().await.map_err(cursor_refused)? {
            if !send(change(row)?).await {
                break;
            }
        }
        drop(rows);
        tx.rollback().await?;
        Ok(WatchStart {
            snapshot,
            resumed,
            feed_id: read_feed_id,
        })
    }

    /// Deletes the feed's rows of transactions below `below` (an xid: the xmin of a
    /// snapshot older than the retention), after recording that cursors older than it
    /// cannot be caught up. One replica at a time (the others skip the round), in chunks,
    /// so no statement holds much for long. Returns the rows deleted.
    pub async fn feed_prune(&self, below: u64) -> Result<u64, LedgerError> {
        const LOCK: &str = "hashtext('credits.access_feed.prune')";
        const CHUNK: u64 = 5000;
        let mut conn = self.pool.acquire().await?;
        let mine: bool = sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({LOCK})"))
            .fetch_one(&mut *conn)
            .await?;
        if !mine {
            return Ok(0);
        }
        let below = below.to_string();
        let pruned = async {
            // The mark first, in its own transaction: a resume that reads it (at the same
            // snapshot as the rows) refuses what may be deleted after.
            sqlx::query(
                "UPDATE access_feed SET pruned_below = greatest(pruned_below, $1::text::xid8)",
            )
            .bind(&below)
            .execute(&mut *conn)
            .await?;
            let mut total = 0;
            loop {
                let n = sqlx::query(&format!(
                    "DELETE FROM access_changes WHERE ctid = ANY (ARRAY(
                         SELECT ctid FROM access_changes WHERE xid < $1::text::xid8 LIMIT {CHUNK}))"
                ))
                .bind(&below)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                total += n;
                if n < CHUNK {
                    return Ok::<_, sqlx::Error>(total);
                }
            }
        }
        .await;
        let _ = sqlx::query(&format!("SELECT pg_advisory_unlock({LOCK})"))
            .execute(&mut *conn)
            .await;
        Ok(pruned?)
    }
}

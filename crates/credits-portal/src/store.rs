//! R28: the portal's own records — which links were used, which page sessions are live —
//! in its small PostgreSQL database (`PORTAL_DATABASE_URL`). Signed tokens still carry
//! who and until when; these rows only say "not any more": a link once used, a session
//! signed out or revoked. Every replica shares them.

use chrono::{DateTime, Utc};
use credits_common::error::ServiceError;
use sqlx::PgPool;

#[derive(Clone)]
pub struct SessionStore {
    pool: PgPool,
}

impl SessionStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Records a link minted for `account`: usable once until `link_expires_at`, opening
    /// a session until `session_expires_at`.
    pub async fn new_link(
        &self,
        link_id: &str,
        account: &str,
        link_expires_at: DateTime<Utc>,
        session_expires_at: DateTime<Utc>,
    ) -> Result<(), ServiceError> {
        sqlx::query(
            "INSERT INTO links (link_id, account_id, link_expires_at, session_expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(link_id)
        .bind(account)
        .bind(link_expires_at)
        .bind(session_expires_at)
        .execute(&self.pool)
        .await
        ?;
        Ok(())
    }

    /// Uses a link (once) and opens its session, in one transaction: a revocation cannot
    /// fall between the two. The session's account and expiry; `None` when the link was
    /// used, revoked, has expired or is unknown.
    pub async fn use_link_and_open(
        &self,
        link_id: &str,
        session_id: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>, ServiceError> {
        let mut tx = self.pool.begin().await?;
        let used: Option<(String, DateTime<Utc>)> = sqlx::query_as(
            "UPDATE links SET used_at = now()
              WHERE link_id = $1 AND used_at IS NULL AND link_expires_at > now()
              RETURNING account_id, session_expires_at",
        )
        .bind(link_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((account, expires_at)) = used else {
            return Ok(None);
        };
        sqlx::query(
            "INSERT INTO sessions (session_id, account_id, expires_at) VALUES ($1, $2, $3)",
        )
        .bind(session_id)
        .bind(&account)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((account, expires_at)))
    }

    /// Whether the session is still live: opened here, not signed out, not revoked.
    pub async fn session_live(&self, session_id: &str) -> Result<bool, ServiceError> {
        let live: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM sessions WHERE session_id = $1 AND revoked_at IS NULL AND expires_at > now()",
        )
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await
        ?;
        Ok(live.is_some())
    }

    /// Signs one session out.
    pub async fn sign_out(&self, session_id: &str) -> Result<(), ServiceError> {
        sqlx::query(
            "UPDATE sessions SET revoked_at = now() WHERE session_id = $1 AND revoked_at IS NULL",
        )
        .bind(session_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends every live session of an account and voids its unused links: how many
    /// sessions were live.
    pub async fn revoke_account(&self, account: &str) -> Result<u64, ServiceError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE links SET used_at = now() WHERE account_id = $1 AND used_at IS NULL")
            .bind(account)
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query(
            "UPDATE sessions SET revoked_at = now() WHERE account_id = $1 AND revoked_at IS NULL AND expires_at > now()",
        )
        .bind(account)
        .execute(&mut *tx)
        .await
        ?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    /// Forgets links and sessions a day past their end (their tokens are refused by
    /// their own expiry by then).
    pub async fn sweep(&self) -> Result<u64, ServiceError> {
        let links =
            sqlx::query("DELETE FROM links WHERE link_expires_at < now() - interval '1 day'")
                .execute(&self.pool)
                .await?
                .rows_affected();
        let sessions =
            sqlx::query("DELETE FROM sessions WHERE expires_at < now() - interval '1 day'")
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(links + sessions)
    }
}

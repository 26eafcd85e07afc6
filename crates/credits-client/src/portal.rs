//! [`Portal`]: `credits.portal.v1.PortalService` — billing-portal sessions (R20).

use std::time::Duration;

use chrono::{DateTime, Utc};
use credits_common::ids::AccountId;
use credits_proto::portal::v1 as opb;
use credits_proto::portal::v1::portal_service_client::PortalServiceClient;

use crate::retry::{Repeat, RetryPolicy, rpc};
use crate::types::timestamp;
use crate::{AuthChannel, ClientError, ConnectError};

/// The default address of the portal's gRPC service.
pub const DEFAULT_PORTAL_URL: &str = "http://127.0.0.1:50054";

/// The portal's session service (default port 50054). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Portal {
    inner: PortalServiceClient<AuthChannel>,
    retry: RetryPolicy,
}

/// A session of the billing page for one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortalSession {
    /// Send the customer here; it works until `expires_at`.
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

impl Portal {
    /// A lazy channel to the portal at `url` (nothing is dialled until the first call).
    pub fn connect(
        url: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Portal, ConnectError> {
        Ok(Portal {
            inner: PortalServiceClient::new(crate::channel(url, token, timeout, None)?),
            retry: RetryPolicy::default(),
        })
    }

    /// [`Portal::connect`] over TLS: the portal verified against `tls`'s CA, and `tls`'s
    /// certificate presented to a portal that requires mutual TLS.
    pub fn connect_with_tls(
        url: &str,
        token: Option<&str>,
        timeout: Duration,
        tls: &credits_common::tls::Tls,
    ) -> Result<Portal, ConnectError> {
        let tls = tls
            .client()
            .map_err(|e| ConnectError::Tls(format!("{e:#}")))?;
        Ok(Portal {
            inner: PortalServiceClient::new(crate::channel(url, token, timeout, tls.as_ref())?),
            retry: RetryPolicy::default(),
        })
    }

    /// Opens a session for `account` lasting `ttl` (`None`: an hour; at most a day).
    /// Retried when transient: each call makes a new, equally valid session.
    pub async fn create_portal_session(
        &self,
        account: &AccountId,
        ttl: Option<Duration>,
    ) -> Result<PortalSession, ClientError> {
        let r = rpc!(
            self,
            Repeat::Safe,
            request(account, ttl),
            create_portal_session
        )
        .await?;
        Ok(PortalSession {
            expires_at: timestamp("session.expires_at", r.expires_at.as_ref())?
                .ok_or_else(|| ClientError::bad_response("session.expires_at: missing"))?,
            url: r.url,
        })
    }
}

impl Portal {
    /// R28: ends every page session of `account` and voids its unused links; how many
    /// sessions were live. Safe to repeat.
    pub async fn revoke_portal_sessions(&self, account: &AccountId) -> Result<u32, ClientError> {
        let req = opb::RevokePortalSessionsRequest {
            account_id: account.to_string(),
        };
        Ok(rpc!(self, Repeat::Safe, req, revoke_portal_sessions)
            .await?
            .revoked)
    }
}

fn request(account: &AccountId, ttl: Option<Duration>) -> opb::CreatePortalSessionRequest {
    // Rounded up to whole seconds (and at least one): 0 would mean the default hour.
    let ttl_seconds = ttl.map_or(0, |t| {
        let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0);
        u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
    });
    opb::CreatePortalSessionRequest {
        account_id: account.to_string(),
        ttl_seconds,
    }
}

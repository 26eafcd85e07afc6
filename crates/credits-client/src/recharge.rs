//! [`Recharge`]: every RPC of `credits.recharge.v1.AutoRechargeService` — auto-recharge
//! settings and attempts.

use credits_common::ids::AccountId;
use credits_proto::recharge::v1 as rpb;
use credits_proto::recharge::v1::auto_recharge_service_client::AutoRechargeServiceClient;

use crate::retry::{Repeat, RetryPolicy, rpc};
use crate::types::{AutoRecharge, AutoRechargeChange, Page, RechargeAttempt, page_size};
use crate::{AuthChannel, ClientError};

/// The auto-recharge service (default port 50053). Cheap to clone; clones share the
/// connection.
#[derive(Clone, Debug)]
pub struct Recharge {
    inner: AutoRechargeServiceClient<AuthChannel>,
    retry: RetryPolicy,
}

impl Recharge {
    pub(crate) fn new(channel: AuthChannel, retry: RetryPolicy) -> Self {
        Recharge {
            inner: AutoRechargeServiceClient::new(channel),
            retry,
        }
    }

    /// The settings; an account that never configured auto-recharge reads as disabled
    /// with reason `None` and no amounts. [`ClientError::NotFound`] only for an account
    /// the ledger does not know.
    pub async fn get_auto_recharge(
        &self,
        account: &AccountId,
    ) -> Result<AutoRecharge, ClientError> {
        let req = rpb::GetAutoRechargeRequest {
            account_id: account.to_string(),
        };
        rpc!(self, Repeat::Safe, req, get_auto_recharge)
            .await?
            .try_into()
    }

    /// Turns auto-recharge on or off (R6, R7, R10). Sent once: enabling below the
    /// threshold triggers a top-up, and a late repeat could undo a newer change.
    pub async fn set_auto_recharge(
        &self,
        account: &AccountId,
        change: AutoRechargeChange,
    ) -> Result<AutoRecharge, ClientError> {
        rpc!(
            self,
            Repeat::Once,
            change.to_wire(account),
            set_auto_recharge
        )
        .await?
        .try_into()
    }

    /// Top-up attempts, newest first (R13); paging as in [`crate::Ledger::list_entries`].
    pub async fn list_recharge_attempts(
        &self,
        account: &AccountId,
        page_size_: u32,
        page_token: Option<&str>,
    ) -> Result<Page<RechargeAttempt>, ClientError> {
        let req = rpb::ListRechargeAttemptsRequest {
            account_id: account.to_string(),
            page_size: page_size(page_size_),
            page_token: page_token.unwrap_or_default().to_owned(),
        };
        let r = rpc!(self, Repeat::Safe, req, list_recharge_attempts).await?;
        Page::from_wire(r.attempts, r.next_page_token)
    }
}

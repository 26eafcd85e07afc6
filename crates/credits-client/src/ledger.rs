//! [`Ledger`]: every RPC of `credits.ledger.v1.LedgerService` — accounts, the journal,
//! balances, access and balance thresholds.

use credits_common::Money;
use credits_common::ids::AccountId;
use credits_proto::ledger::v1 as lpb;
use credits_proto::ledger::v1::ledger_service_client::LedgerServiceClient;

use crate::retry::{Repeat, RetryPolicy, rpc};
use crate::types::{
    AccessCheck, Account, BalanceThreshold, BillingMode, CreditsAdded, CreditsToAdd,
    CreditsToGrant, Entry, Granularity, Hold, HoldCaptured, HoldRequest, Page, UsagePeriod,
    UsageRecord, UsageRecorded, WatchEvent, page_size,
};
use crate::{AuthChannel, ClientError};
use chrono::{DateTime, Utc};

/// The ledger service (default port 50051). Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Ledger {
    inner: LedgerServiceClient<AuthChannel>,
    retry: RetryPolicy,
}

impl Ledger {
    pub(crate) fn new(channel: AuthChannel, retry: RetryPolicy) -> Self {
        Ledger {
            inner: LedgerServiceClient::new(channel),
            retry,
        }
    }

    /// Creates an account (R3: a prepaid account has no access until its first purchase).
    ///
    /// Retried when transient: creating an account that exists with the same settings
    /// returns it, so a repeat cannot create a second one; different settings are
    /// [`ClientError::AlreadyExists`].
    pub async fn create_account(
        &self,
        account: &AccountId,
        billing_mode: BillingMode,
        display_name: &str,
    ) -> Result<Account, ClientError> {
        let req = lpb::CreateAccountRequest {
            account_id: account.to_string(),
            billing_mode: billing_mode.to_wire(),
            display_name: display_name.to_owned(),
        };
        rpc!(self, Repeat::Safe, req, create_account)
            .await?
            .try_into()
    }

    pub async fn get_account(&self, account: &AccountId) -> Result<Account, ClientError> {
        let req = lpb::GetAccountRequest {
            account_id: account.to_string(),
        };
        rpc!(self, Repeat::Safe, req, get_account).await?.try_into()
    }

    /// Whether the account may call the API right now (R4, R5, R16).
    pub async fn check_access(&self, account: &AccountId) -> Result<AccessCheck, ClientError> {
        self.check_access_for(account, None).await
    }

    /// R16: whether the account may start work of this cost now: access allowed and (prepaid)
    /// the available balance covers `cost`.
    pub async fn check_access_for(
        &self,
        account: &AccountId,
        cost: Option<Money>,
    ) -> Result<AccessCheck, ClientError> {
        let req = lpb::CheckAccessRequest {
            account_id: account.to_string(),
            amount: cost.map(|c| c.to_wire()).unwrap_or_default(),
        };
        rpc!(self, Repeat::Safe, req, check_access)
            .await?
            .try_into()
    }

    /// Records usage that was already served (R4). Retried when transient: the
    /// idempotency key makes a repeat return the first result (R12).
    pub async fn record_usage(&self, usage: &UsageRecord) -> Result<UsageRecorded, ClientError> {
        rpc!(self, Repeat::Safe, usage.to_wire(), record_usage)
            .await?
            .try_into()
    }

    /// Records many usage items in one call; each succeeds or fails on its own, and the
    /// results come back in the order of `items`. The call as a whole fails only when the
    /// batch could not be processed at all. Retried when transient (every item carries
    /// its idempotency key).
    pub async fn record_usage_batch(
        &self,
        items: &[UsageRecord],
    ) -> Result<Vec<Result<UsageRecorded, ClientError>>, ClientError> {
        let req = lpb::RecordUsageBatchRequest {
            items: items.iter().map(UsageRecord::to_wire).collect(),
        };
        let r = rpc!(self, Repeat::Safe, req, record_usage_batch).await?;
        if r.results.len() != items.len() {
            return Err(ClientError::bad_response(format!(
                "results: {} for {} items",
                r.results.len(),
                items.len()
            )));
        }
        Ok(r.results.into_iter().map(batch_result).collect())
    }

    /// Adds credits. Retried when transient (idempotency key, R12).
    pub async fn add_credits(&self, credits: &CreditsToAdd) -> Result<CreditsAdded, ClientError> {
        rpc!(self, Repeat::Safe, credits.to_wire(), add_credits)
            .await?
            .try_into()
    }

    /// R29: grants promotional or contractual credits (drawn before purchased ones).
    /// Idempotent per key: retried when transient.
    pub async fn grant_credits(&self, grant: &CreditsToGrant) -> Result<CreditsAdded, ClientError> {
        rpc!(self, Repeat::Safe, grant.to_wire(), grant_credits)
            .await?
            .try_into()
    }

    /// R30: usage per period and category over [from, to) (whole UTC hours), from the
    /// ledger's rollups; periods without usage are left out.
    pub async fn usage_summary(
        &self,
        account: &AccountId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        granularity: Granularity,
    ) -> Result<Vec<UsagePeriod>, ClientError> {
        let req = lpb::GetUsageSummaryRequest {
            account_id: account.to_string(),
            from: Some(credits_common::ids::timestamp(from)),
            to: Some(credits_common::ids::timestamp(to)),
            granularity: granularity.to_wire(),
        };
        rpc!(self, Repeat::Safe, req, get_usage_summary)
            .await?
            .periods
            .into_iter()
            .map(UsagePeriod::try_from)
            .collect()
    }

    /// Journal entries, newest first (R13). `page_size` 0 is the server's default (50);
    /// pass the previous page's `next_page_token` to continue.
    pub async fn list_entries(
        &self,
        account: &AccountId,
        page_size_: u32,
        page_token: Option<&str>,
    ) -> Result<Page<Entry>, ClientError> {
        let req = lpb::ListEntriesRequest {
            account_id: account.to_string(),
            page_size: page_size(page_size_),
            page_token: page_token.unwrap_or_default().to_owned(),
        };
        let r = rpc!(self, Repeat::Safe, req, list_entries).await?;
        Page::from_wire(r.entries, r.next_page_token)
    }

    /// Registers the balance below which a posting publishes a threshold crossing.
    ///
    /// With a `version`, the write applies only if it is newer than the last versioned
    /// one, so it is safe to repeat and is retried when transient; without one it always
    /// applies, so a late repeat could overwrite a newer writer, and it is sent once.
    pub async fn set_balance_threshold(
        &self,
        account: &AccountId,
        threshold: Money,
        version: Option<i64>,
    ) -> Result<BalanceThreshold, ClientError> {
        let req = lpb::SetBalanceThresholdRequest {
            account_id: account.to_string(),
            threshold: threshold.to_wire(),
            version: version.unwrap_or(0),
        };
        rpc!(self, versioned(version), req, set_balance_threshold)
            .await?
            .try_into()
    }

    /// Removes the balance threshold; `version` as in [`Ledger::set_balance_threshold`].
    pub async fn clear_balance_threshold(
        &self,
        account: &AccountId,
        version: Option<i64>,
    ) -> Result<BalanceThreshold, ClientError> {
        let req = lpb::ClearBalanceThresholdRequest {
            account_id: account.to_string(),
            version: version.unwrap_or(0),
        };
        rpc!(self, versioned(version), req, clear_balance_threshold)
            .await?
            .try_into()
    }
}

impl Ledger {
    /// R15: reserves part of the available balance; [`ClientError::FailedPrecondition`] when
    /// a prepaid account lacks access or enough available balance. Retried when transient
    /// (idempotency key, R12).
    pub async fn create_hold(&self, hold: &HoldRequest) -> Result<Hold, ClientError> {
        rpc!(self, Repeat::Safe, hold.to_wire(), create_hold)
            .await?
            .try_into()
    }

    /// R15: ends the hold with one USAGE entry of `amount` (the final cost, above or below
    /// the hold). Retried when transient: repeating the capture that ended a hold returns
    /// its first result.
    pub async fn capture_hold(
        &self,
        account: &AccountId,
        hold_id: &str,
        amount: Money,
        description: &str,
    ) -> Result<HoldCaptured, ClientError> {
        let req = lpb::CaptureHoldRequest {
            account_id: account.to_string(),
            hold_id: hold_id.to_owned(),
            amount: amount.to_wire(),
            description: description.to_owned(),
        };
        rpc!(self, Repeat::Safe, req, capture_hold)
            .await?
            .try_into()
    }

    /// R15: ends the hold with no entry. Retried when transient (a repeat answers the same).
    pub async fn release_hold(
        &self,
        account: &AccountId,
        hold_id: &str,
    ) -> Result<Hold, ClientError> {
        let req = lpb::ReleaseHoldRequest {
            account_id: account.to_string(),
            hold_id: hold_id.to_owned(),
        };
        rpc!(self, Repeat::Safe, req, release_hold)
            .await?
            .try_into()
    }

    pub async fn get_hold(&self, account: &AccountId, hold_id: &str) -> Result<Hold, ClientError> {
        let req = lpb::GetHoldRequest {
            account_id: account.to_string(),
            hold_id: hold_id.to_owned(),
        };
        rpc!(self, Repeat::Safe, req, get_hold).await?.try_into()
    }

    /// Holds, newest first (R13); paging as in [`Ledger::list_entries`].
    pub async fn list_holds(
        &self,
        account: &AccountId,
        page_size_: u32,
        page_token: Option<&str>,
    ) -> Result<Page<Hold>, ClientError> {
        let req = lpb::ListHoldsRequest {
            account_id: account.to_string(),
            page_size: page_size(page_size_),
            page_token: page_token.unwrap_or_default().to_owned(),
        };
        let r = rpc!(self, Repeat::Safe, req, list_holds).await?;
        Page::from_wire(r.holds, r.next_page_token)
    }
}

impl Ledger {
    /// R18: replaces the account's alert thresholds (at most 5, each ≥ 0, distinct; empty
    /// clears); returns them as stored, highest first. Retried when transient (a repeat
    /// stores the same).
    pub async fn set_balance_alerts(
        &self,
        account: &AccountId,
        thresholds: &[Money],
    ) -> Result<Vec<Money>, ClientError> {
        let req = lpb::SetBalanceAlertsRequest {
            account_id: account.to_string(),
            thresholds: thresholds.iter().map(|t| t.to_wire()).collect(),
        };
        let r = rpc!(self, Repeat::Safe, req, set_balance_alerts).await?;
        r.thresholds
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Money::parse_non_negative(&format!("thresholds[{i}]"), t)
                    .map_err(|e| ClientError::bad_response(e.to_string()))
            })
            .collect()
    }
}

impl Ledger {
    /// `StreamUsage`: for a gateway that records usage continuously. Sends `items` as they
    /// come over one stream; yields one result per item, in order — an item's error (an
    /// unknown account, a key reused for another request) is that item's result. The call
    /// is not retried: if the stream breaks (`Err` with a transport code), send the items
    /// not yet answered again on a new stream; their idempotency keys make that safe (R12).
    pub async fn stream_usage<S>(
        &self,
        items: S,
    ) -> Result<
        impl futures_util::Stream<Item = Result<UsageRecorded, ClientError>> + Send + 'static,
        ClientError,
    >
    where
        S: futures_util::Stream<Item = UsageRecord> + Send + 'static,
    {
        use futures_util::StreamExt;
        Ok(self
            .stream_usage_items(items)
            .await?
            .map(|r| r.and_then(|item| item)))
    }

    /// `StreamUsage` with the stream's end (outer `Err`) told apart from an item's own
    /// error (inner `Err`).
    pub(crate) async fn stream_usage_items<S>(
        &self,
        items: S,
    ) -> Result<
        impl futures_util::Stream<Item = Result<Result<UsageRecorded, ClientError>, ClientError>>
        + Send
        + 'static,
        ClientError,
    >
    where
        S: futures_util::Stream<Item = UsageRecord> + Send + 'static,
    {
        use futures_util::StreamExt;
        let outbound = items.map(|u| u.to_wire());
        let inbound = self
            .inner
            .clone()
            .stream_usage(outbound)
            .await
            .map_err(ClientError::from)?
            .into_inner();
        Ok(inbound.map(|r| match r {
            Ok(result) => Ok(batch_result(result)),
            Err(s) => Err(ClientError::from(s)),
        }))
    }
}

impl Ledger {
    /// R31 `WatchAccess`: the accounts' states (all of them when `accounts` is empty), then
    /// every change, with sync points; `resume_cursor` (the last sync point's) starts with
    /// what changed since. Not retried: [`crate::AccessCache`] is the reconnecting,
    /// resuming consumer most callers want.
    pub async fn watch_access(
        &self,
        accounts: &[AccountId],
        resume_cursor: Option<&str>,
    ) -> Result<
        impl futures_util::Stream<Item = Result<WatchEvent, ClientError>> + Send + 'static,
        ClientError,
    > {
        use futures_util::StreamExt;
        let inbound = self
            .inner
            .clone()
            .watch_access(lpb::WatchAccessRequest {
                account_ids: accounts.iter().map(|a| a.as_str().to_owned()).collect(),
                resume_cursor: resume_cursor.unwrap_or_default().to_owned(),
            })
            .await
            .map_err(ClientError::from)?
            .into_inner();
        Ok(inbound.map(|r| match r {
            Ok(u) => WatchEvent::try_from(u),
            Err(s) => Err(ClientError::from(s)),
        }))
    }
}

fn versioned(version: Option<i64>) -> Repeat {
    match version {
        Some(v) if v > 0 => Repeat::Safe,
        _ => Repeat::Once,
    }
}

fn batch_result(r: lpb::RecordUsageBatchResult) -> Result<UsageRecorded, ClientError> {
    use lpb::record_usage_batch_result::Result as R;
    match r.result {
        Some(R::Ok(ok)) => UsageRecorded::try_from(ok),
        Some(R::Error(s)) => Err(ClientError::from_code(tonic::Code::from(s.code), s.message)),
        None => Err(ClientError::bad_response("results[]: neither ok nor error")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn batch_item_errors_keep_their_class() {
        let r = batch_result(lpb::RecordUsageBatchResult {
            result: Some(lpb::record_usage_batch_result::Result::Error(lpb::Status {
                code: tonic::Code::AlreadyExists as i32,
                message: "items[3]: key reused".into(),
            })),
        });
        let e = r.unwrap_err();
        assert!(matches!(e, ClientError::AlreadyExists { .. }), "{e:?}");
        assert_eq!(e.message(), "items[3]: key reused");
        assert!(batch_result(lpb::RecordUsageBatchResult { result: None }).is_err());
    }

    #[test]
    fn only_versioned_threshold_writes_are_repeatable() {
        assert_eq!(versioned(None), Repeat::Once);
        assert_eq!(versioned(Some(0)), Repeat::Once);
        assert_eq!(versioned(Some(7)), Repeat::Safe);
    }
}

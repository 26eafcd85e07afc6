//! Saving auto-recharge settings: the recharge database and the ledger's threshold, kept
//! in agreement without a lock held across the call to the ledger.
//!
//! Every save takes a fresh version from `settings_version_seq`, writes the threshold to
//! the ledger with it (the ledger applies only versions newer than the last), then stores
//! the settings only over an older version. Whichever of two racing saves took the newer
//! version ends in both places; the one that finds a newer version already stored (in the
//! ledger or here) starts again with a fresh version, so a call that returns OK is what
//! both stores hold. If the ledger cannot be reached nothing is stored. A crash between
//! the two writes leaves the ledger ahead of the settings: the reconciler repairs that.

use credits_common::Money;

use crate::domain::*;
use crate::ports::{DefaultMethod, LedgerAccount};
use crate::store::Store;
use crate::worker::Recharge;

/// How often a save starts again after losing a race before giving up with UNAVAILABLE.
const SAVE_ROUNDS: usize = 5;

impl Recharge {
    /// NOT_FOUND unless the ledger knows the account.
    pub async fn known_account(&self, account: &AccountId) -> Result<LedgerAccount, RechargeError> {
        self.account(account.as_str())
            .await?
            .ok_or_else(|| RechargeError::AccountNotFound(account.clone()))
    }

    /// The account's settings; `None` when it never configured auto-recharge (an account
    /// the ledger does not know is NOT_FOUND).
    pub async fn auto_recharge(
        &self,
        account: &AccountId,
    ) -> Result<Option<Settings>, RechargeError> {
        match self.store().settings(account.as_str()).await? {
            Some(s) => Ok(Some(s)),
            None => {
                self.known_account(account).await?;
                Ok(None)
            }
        }
    }

    /// R19: what succeeded top-ups charged this calendar month (UTC).
    pub async fn charged_this_month(&self, account: &AccountId) -> Result<Money, RechargeError> {
        let mut conn = self.store().pool().acquire().await?;
        Store::charged_this_month(&mut conn, account.as_str(), self.clock().offset_secs()).await
    }

    /// Attempts newest first (R13); NOT_FOUND for an account the ledger does not know.
    pub async fn attempts(
        &self,
        account: &AccountId,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Attempt>, RechargeError> {
        let attempts = self
            .store()
            .list_attempts(account.as_str(), before, limit)
            .await?;
        if attempts.is_empty() {
            self.known_account(account).await?;
        }
        Ok(attempts)
    }

    /// `SetAutoRecharge`: validates (R5, R6, R10, R19) and saves. Disabling may leave the
    /// amounts empty (the stored ones, and the stored monthly limit, are kept); turning off
    /// what was never on stores nothing and answers `None`.
    pub async fn set_auto_recharge(
        self: &std::sync::Arc<Self>,
        account: &AccountId,
        enabled: bool,
        threshold: &str,
        target: &str,
        monthly_limit: &str,
    ) -> Result<Option<Settings>, RechargeError> {
        let stored = self.store().settings(account.as_str()).await?;
        let amounts_left_out = threshold.is_empty() && target.is_empty();
        if !enabled && amounts_left_out && stored.is_none() {
            // Turning off what was never on: nothing to store, nothing to tell the ledger.
            self.known_account(account).await?;
            return Ok(None);
        }
        let (threshold, target) = match (enabled, amounts_left_out, &stored) {
            (false, true, Some(s)) => (s.threshold, s.target),
            _ => (
                Money::parse_non_negative("threshold", threshold)?,
                Money::parse_non_negative("target", target)?,
            ),
        };
        validate_amounts(threshold, target, self.min_purchase())?;
        let monthly_limit = match (monthly_limit, enabled, amounts_left_out, &stored) {
            ("", false, true, Some(s)) => s.monthly_limit,
            ("", _, _, _) => None,
            (l, _, _, _) => Some(Money::parse_positive("monthly_limit", l)?),
        };
        validate_monthly_limit(monthly_limit, self.min_purchase())?;
        let acct = self.known_account(account).await?;
        if enabled {
            if acct.contract {
                return Err(RechargeError::ContractAccount);
            }
            match self.default_method(account.as_str()).await? {
                DefaultMethod::Card(_) => {}
                DefaultMethod::NotCard => {
                    return Err(RechargeError::DefaultNotCard);
                }
                DefaultMethod::None => {
                    return Err(RechargeError::NoDefaultMethod);
                }
            }
        }
        self.save_settings(account, enabled, threshold, target, monthly_limit)
            .await
            .map(Some)
    }

    /// Stores the settings (R6 already validated by the caller) and the ledger threshold,
    /// then, when enabled, carries out the balance check that enabling made due (R7).
    pub async fn save_settings(
        self: &std::sync::Arc<Self>,
        account: &AccountId,
        enabled: bool,
        threshold: Money,
        target: Money,
        monthly_limit: Option<Money>,
    ) -> Result<Settings, RechargeError> {
        for _ in 0..SAVE_ROUNDS {
            let version = self.store().next_version().await?;
            let stored_version = self
                .ledger()
                .set_threshold(account.as_str(), enabled.then_some(threshold), version)
                .await?;
            if stored_version != version {
                continue; // a newer save reached the ledger first
            }
            let Some(saved) = self
                .store()
                .save_settings(
                    account.as_str(),
                    enabled,
                    threshold,
                    target,
                    monthly_limit,
                    version,
                )
                .await?
            else {
                continue; // a newer save was stored first
            };
            tracing::info!(account_id = %account, enabled = saved.enabled, threshold = %saved.threshold, target = %saved.target, version, "auto-recharge settings saved");
            if saved.enabled {
                // Saving made the check due, so if it fails now the sweeper runs it.
                if let Err(e) = self
                    .decide_and_start(account.as_str(), Trigger::EnabledBelowThreshold)
                    .await
                {
                    tracing::warn!(account_id = %account, error = %e, "check after enabling deferred to the sweeper");
                }
            }
            return Ok(saved);
        }
        Err(RechargeError::Unavailable(
            "auto-recharge settings of this account are being changed concurrently; retry".into(),
        ))
    }
}

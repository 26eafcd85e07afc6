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
use credits_proto::ledger::v1 as lpb;

use crate::domain::*;
use crate::worker::Recharge;

/// How often a save starts again after losing a race before giving up with UNAVAILABLE.
const SAVE_ROUNDS: usize = 5;

impl Recharge {
    /// Stores the settings (R6 already validated by the caller) and the ledger threshold,
    /// then, when enabled, carries out the balance check that enabling made due (R7).
    pub async fn save_settings(
        self: &std::sync::Arc<Self>,
        account: &AccountId,
        enabled: bool,
        threshold: Money,
        target: Money,
    ) -> Result<Settings, RechargeError> {
        for _ in 0..SAVE_ROUNDS {
            let version = self.store.next_version().await?;
            let mut ledger = self.ledger.clone();
            let stored_version = if enabled {
                ledger
                    .set_balance_threshold(lpb::SetBalanceThresholdRequest {
                        account_id: account.as_str().to_owned(),
                        threshold: threshold.to_wire(),
                        version,
                    })
                    .await
                    .map_err(RechargeError::from)?
                    .into_inner()
                    .version
            } else {
                ledger
                    .clear_balance_threshold(lpb::ClearBalanceThresholdRequest {
                        account_id: account.as_str().to_owned(),
                        version,
                    })
                    .await
                    .map_err(RechargeError::from)?
                    .into_inner()
                    .version
            };
            if stored_version != version {
                continue; // a newer save reached the ledger first
            }
            let Some(saved) = self
                .store
                .save_settings(account.as_str(), enabled, threshold, target, version)
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

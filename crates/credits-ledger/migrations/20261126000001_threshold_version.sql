-- Versioned balance thresholds: recharge writes the threshold with a version taken from
-- its own sequence, and a write applies only when it is newer than the last versioned
-- one, so two racing SetAutoRecharge calls can never leave the ledger with the older
-- choice (see SetBalanceThresholdRequest.version).
ALTER TABLE accounts ADD COLUMN threshold_version bigint NOT NULL DEFAULT 0;

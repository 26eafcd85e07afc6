-- R18 balance alerts: up to 5 thresholds per account, distinct, each >= 0, kept sorted
-- from the highest down (the order a falling balance crosses them). ledger_move() publishes
-- one ledger.balance.alert per threshold the available balance falls below, in the same
-- statement as the posting or hold that moved it.
ALTER TABLE accounts ADD COLUMN alert_thresholds numeric[] NOT NULL DEFAULT '{}';
-- NOT VALID: every existing row has the empty default; new and updated rows are checked.
ALTER TABLE accounts ADD CONSTRAINT accounts_alerts_valid
    CHECK (cardinality(alert_thresholds) <= 5
           AND array_position(alert_thresholds, NULL) IS NULL
           AND 0 <= ALL (alert_thresholds)) NOT VALID;

-- R19 monthly auto-recharge limit.
--
-- * settings.monthly_limit: the most succeeded top-ups may charge in one calendar month
--   (UTC); NULL = no limit. The service checks it is at least the minimum purchase.
-- * attempts.status gains SKIPPED: a due top-up not charged because the month's
--   allowance is spent (failure_code = monthly_limit_reached). It is never in flight and
--   never counts as a failure (R11).
-- * The month's succeeded total is summed under the settings row lock, in the transaction
--   that decides the attempt, from attempts_succeeded_month.
ALTER TABLE settings ADD COLUMN monthly_limit numeric CHECK (monthly_limit > 0);
ALTER TABLE attempts DROP CONSTRAINT attempts_status_check;
ALTER TABLE attempts ADD CONSTRAINT attempts_status_check
    CHECK (status IN ('PENDING', 'CHARGING', 'SUCCEEDED', 'FAILED', 'SKIPPED')) NOT VALID;
CREATE INDEX attempts_succeeded_month ON attempts (account_id, completed_at)
    WHERE status = 'SUCCEEDED';

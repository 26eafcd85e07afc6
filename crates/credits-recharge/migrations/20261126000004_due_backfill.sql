-- Release 1 scheduled re-checks in settings.retry_at alone; release 2 carries out a check
-- only while due_trigger says one is due. Name the trigger of every check that was already
-- scheduled, so none is skipped (nor left to block the sweeper) after the upgrade.
UPDATE settings
SET due_trigger = CASE WHEN consecutive_failures > 0 THEN 'retry_after_failure'
                       ELSE 'still_below_threshold' END
WHERE retry_at IS NOT NULL AND due_trigger IS NULL;

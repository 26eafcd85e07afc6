-- Hardening (release 2).
--
-- * settings.version: the version of the last threshold written to the ledger. Versions
--   come from settings_version_seq, so they only grow; the ledger applies a versioned
--   write only when it is newer than the last, and SetAutoRecharge stores its settings
--   only over an older version. Two racing writers therefore end with the ledger and the
--   settings holding the same, newest choice (the reconciler repairs what a crash between
--   the two writes left behind).
-- * settings.revision: bumped by every change of the row (trigger below). A decision reads
--   the balance from the ledger with no lock held, then commits only if the revision is
--   still the one it read: a top-up that landed, a setting changed or a due check taken by
--   another replica in between makes it read again instead of charging on a stale balance.
-- * settings.retry_at + due_trigger/due_event_id: a balance check that is due. A crossing
--   event is acknowledged only once this is written, so no crossing depends on the broker's
--   delivery limit; the sweeper of any replica carries out due checks.
-- * attempts.lease_owner: fences writes of a worker that lost its lease (paused, slow) so
--   that only the current owner moves an attempt on.
ALTER TABLE settings ADD COLUMN version bigint NOT NULL DEFAULT 0;
ALTER TABLE settings ADD COLUMN revision bigint NOT NULL DEFAULT 0;
ALTER TABLE settings ADD COLUMN due_trigger text;
ALTER TABLE settings ADD COLUMN due_event_id text;
ALTER TABLE attempts ADD COLUMN lease_owner uuid;

CREATE SEQUENCE settings_version_seq;

CREATE FUNCTION settings_bump_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.revision := OLD.revision + 1;
    RETURN NEW;
END $$;

CREATE TRIGGER settings_revision BEFORE UPDATE ON settings
    FOR EACH ROW EXECUTE FUNCTION settings_bump_revision();

-- Due checks are found by time, without scanning every account.
CREATE INDEX settings_due ON settings (retry_at) WHERE retry_at IS NOT NULL AND enabled;

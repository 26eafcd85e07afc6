-- #25: the access feed across a PostgreSQL failover.
--
-- A promoted standby continues from the transaction ids it received: ids the old primary
-- gave to transactions that never reached it (aborted ones, whose abort record it did not
-- receive) are given again, so a snapshot read before the failover can take a transaction
-- made after it for one it already saw. A feed is therefore valid on one timeline: the
-- ledger records the timeline here; when the server's differs, the ledger gives the feed a
-- new id (every cursor issued before is then answered with a full snapshot) and every
-- replica starts its view afresh.
ALTER TABLE access_feed ADD COLUMN timeline text;
UPDATE access_feed SET timeline = substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8);

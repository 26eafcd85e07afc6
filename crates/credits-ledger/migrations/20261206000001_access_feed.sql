-- R31: the access feed behind WatchAccess and every replica's CheckAccess view.
--
-- Invariants enforced here and by sql/functions.sql:
-- * accounts.version rises by one with every committed change of the account's balance,
--   held amount or access (under the account's row lock), so for one account a higher
--   version is a later state, whichever replica or poll delivers it.
-- * every such change writes, in its own transaction, the account's new state into
--   access_changes: one row per statement that changes accounts (a group-commit batch is
--   one row for all its accounts), keyed by the writing transaction's id. A reader that
--   remembers the snapshot of its previous read finds exactly what committed since: the
--   rows whose xid was not visible in that snapshot (`xid >= xmax` or `xid` in its
--   running list).
-- * access_feed.pruned_below: rows with a lower xid may have been deleted; a resume
--   cursor whose snapshot xmin is lower cannot be caught up from the feed.
ALTER TABLE accounts ADD COLUMN version bigint NOT NULL DEFAULT 1;

CREATE TABLE access_changes (
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    account_ids text[] NOT NULL,
    versions    bigint[] NOT NULL,
    modes       text[] NOT NULL,
    access      text[] NOT NULL,
    balances    numeric[] NOT NULL,
    helds       numeric[] NOT NULL,
    CHECK (cardinality(account_ids) = cardinality(versions)
           AND cardinality(account_ids) = cardinality(modes)
           AND cardinality(account_ids) = cardinality(access)
           AND cardinality(account_ids) = cardinality(balances)
           AND cardinality(account_ids) = cardinality(helds))
);
CREATE INDEX access_changes_xid ON access_changes (xid);

-- The feed itself: its id (cursors carry it, so one issued by another database is known as
-- such) and how far it has been pruned.
CREATE TABLE access_feed (
    one          boolean PRIMARY KEY DEFAULT true CHECK (one),
    feed_id      uuid NOT NULL DEFAULT gen_random_uuid(),
    pruned_below xid8 NOT NULL
);
-- Nothing is pruned yet.
INSERT INTO access_feed (pruned_below) VALUES ('0');

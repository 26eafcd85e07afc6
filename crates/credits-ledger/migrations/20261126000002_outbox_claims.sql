-- The outbox relay no longer holds a transaction open while it talks to the broker: it
-- claims rows (claimed_until), commits, publishes, then deletes what was confirmed. A
-- relay that dies mid-publish leaves its claim to expire and another relay takes the rows
-- (at-least-once, as before). Rows that no queue would receive (returned as unroutable)
-- are kept and retried with backoff (next_attempt_at), never deleted unpublished.
ALTER TABLE outbox ADD COLUMN claimed_until timestamptz;
ALTER TABLE outbox ADD COLUMN attempts integer NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE outbox ADD COLUMN first_returned_at timestamptz;
CREATE INDEX outbox_due ON outbox (next_attempt_at, seq);

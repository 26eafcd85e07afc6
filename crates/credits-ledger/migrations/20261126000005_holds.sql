-- R15 holds: a reservation of part of an account's balance for work priced when it ends.
--
-- Invariants enforced here and by the hold functions of sql/functions.sql:
-- * accounts.held = sum(amount) of the account's ACTIVE holds, changed only by
--   ledger_hold_create / ledger_hold_end in the same statement as the hold;
--   available balance = balance - held (R15), what access (R16) and crossings (R17) follow.
-- * a hold ends once: status leaves ACTIVE exactly once, with ended_at; a CAPTURED hold has
--   its captured amount and the USAGE entry that posted it.
-- * (account_id, idempotency_key) is unique among holds (R12).
-- NOT VALID: existing rows hold 0 by the default, so nothing needs scanning under the
-- table lock; new and updated rows are checked.
ALTER TABLE accounts ADD COLUMN held numeric NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD CONSTRAINT accounts_held_valid
    CHECK (held >= 0 AND scale(held) <= 9) NOT VALID;

CREATE TABLE holds (
    seq             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    hold_id         uuid PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (account_id),
    amount          numeric NOT NULL CHECK (amount > 0 AND scale(amount) <= 9),
    category        text NOT NULL CHECK (category IN ('API_REQUESTS', 'DEDICATED_ENDPOINTS', 'FINE_TUNING', 'EVALUATIONS', 'OTHER')),
    status          text NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'CAPTURED', 'RELEASED', 'EXPIRED')),
    captured_amount numeric CHECK (captured_amount > 0 AND scale(captured_amount) <= 9),
    entry_id        uuid,
    entry_seq       bigint,
    -- The available balance right after the capture, answered again to a repeated capture.
    capture_available numeric,
    description     text NOT NULL DEFAULT '',
    idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    ttl_seconds     integer NOT NULL CHECK (ttl_seconds BETWEEN 1 AND 604800),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    ended_at        timestamptz,
    UNIQUE (account_id, idempotency_key),
    CHECK ((status = 'ACTIVE') = (ended_at IS NULL)),
    CHECK ((status = 'CAPTURED') = (captured_amount IS NOT NULL AND entry_id IS NOT NULL))
);

-- Newest-first listing per account (R13), and the expiry sweep.
CREATE INDEX holds_account_seq ON holds (account_id, seq DESC);
CREATE INDEX holds_active_expiry ON holds (expires_at) WHERE status = 'ACTIVE';

-- A capture posts a USAGE entry whose reference is the hold id and which has no caller's
-- idempotency key: the hold row makes the capture happen once. (A key derived from the hold
-- id could be taken first by a caller's own usage key.)
ALTER TABLE entries ALTER COLUMN idempotency_key DROP NOT NULL;
-- NOT VALID: every existing entry has a key (the column was NOT NULL), so the journal is
-- not scanned under the table lock; new entries are checked.
ALTER TABLE entries ADD CONSTRAINT entries_key_or_capture
    CHECK (idempotency_key IS NOT NULL OR (kind = 'USAGE' AND reference <> '')) NOT VALID;

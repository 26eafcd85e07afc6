-- R29 credit lots and R30 usage rollups.
--
-- Tables only: what fills them for a journal written before this release (an opening lot
-- per account with a positive balance, rollups of the usage already posted) and the trigger
-- that keeps the rollups runs with the functions (sql/functions.sql, under a lock of
-- `entries` and `accounts`), so that no posting falls between them during a rolling upgrade.
--
-- Invariants enforced here and by sql/functions.sql:
-- * every CREDIT entry makes one lot (`entry_seq`); only postings change `remaining`, under
--   the account's lock, in the same statement as their entry;
-- * for every account, sum(remaining) = greatest(balance, 0): debits draw lots in burn order
--   (grants first, then purchased credits; earliest expiry first within each), and a credit
--   that arrives while the balance is negative first pays that debt;
-- * a lot expires once: `expired_at` is set with its EXPIRY entry, after which `remaining`
--   is 0 and never grows again; one EXPIRY entry per lot (unique index on its reference).

CREATE TABLE lots (
    seq              bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    lot_id           uuid PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (account_id),
    -- The CREDIT entry that made it; null for an opening lot (balance before lots existed).
    entry_seq        bigint UNIQUE,
    source           text NOT NULL CHECK (source IN ('PURCHASE', 'AUTO_RECHARGE', 'GRANT', 'ADJUSTMENT')),
    amount           numeric NOT NULL CHECK (amount > 0 AND scale(amount) <= 9),
    remaining        numeric NOT NULL CHECK (remaining >= 0 AND remaining <= amount AND scale(remaining) <= 9),
    -- R29: lower first among lots of one class with the same expiry.
    priority         integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 1000000),
    expires_at       timestamptz,
    reason           text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    expired_at       timestamptz,
    expiry_entry_seq bigint,
    CHECK (expired_at IS NULL OR (remaining = 0 AND expires_at IS NOT NULL))
);

-- What a posting draws from (few rows per account), the listing, and the expiry sweep.
CREATE INDEX lots_account_live ON lots (account_id) WHERE remaining > 0;
CREATE INDEX lots_account_seq ON lots (account_id, seq DESC);

-- The earliest expiry among the account's lots that still hold credits: a posting checks
-- this one column of the row it locks anyway, and expires what is due first.
ALTER TABLE accounts ADD COLUMN next_expiry timestamptz;
CREATE INDEX accounts_next_expiry ON accounts (next_expiry) WHERE next_expiry IS NOT NULL;

-- An EXPIRY entry has no caller's key: its reference is the lot id, once per lot.
ALTER TABLE entries DROP CONSTRAINT entries_key_or_capture;
ALTER TABLE entries ADD CONSTRAINT entries_key_or_ledger_made
    CHECK (idempotency_key IS NOT NULL OR (kind IN ('USAGE', 'EXPIRY') AND reference <> '')) NOT VALID;
CREATE UNIQUE INDEX entries_one_expiry_per_lot ON entries (reference) WHERE kind = 'EXPIRY';

-- R30: usage per (account, UTC hour, category), kept by a trigger on `entries` in the same
-- transaction as every USAGE entry (sql/functions.sql: usage_rollup).
CREATE TABLE usage_rollups (
    account_id text NOT NULL,
    hour       timestamptz NOT NULL,
    category   text NOT NULL,
    amount     numeric NOT NULL,
    count      bigint NOT NULL,
    PRIMARY KEY (account_id, hour, category)
);

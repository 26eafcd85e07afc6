-- R29 credit lots and R30 usage rollups.
--
-- The lots of a journal written before this release are made here, at the end, while this
-- migration holds `accounts` exclusively; the rollups of its usage, and a repair of what a
-- release-2 replica posts between this migration and the new functions, are
-- ledger_after_upgrade()'s (sql/functions.sql), run once those functions are in place.
--
-- Invariants enforced here and by sql/functions.sql:
-- * every CREDIT entry makes one lot (`entry_seq`); only postings change `remaining`, under
--   the account's lock, in the same statement as their entry;
-- * for every account, greatest(sum(remaining) - pending_draw, 0) = greatest(balance, 0):
--   usage adds to the account's pending_draw (in the row it updates anyway); the lots are
--   drawn by it in burn order (grants first, then purchased credits; earliest expiry first
--   within each) before anything changes the set of lots or looks at one lot (a credit, an
--   expiry, a refund or dispute), which is the same as drawing at every posting, since the
--   lots and their order do not change in between. A credit that arrives while the balance
--   is negative first pays that debt;
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
) WITH (fillfactor = 90);

-- The lots that still hold credits, per account (few rows each).
CREATE INDEX lots_account_live ON lots (account_id) WHERE remaining > 0;

-- The earliest expiry among the account's lots that still hold credits: a posting checks
-- this one column of the row it locks anyway, and expires what is due first.
ALTER TABLE accounts ADD COLUMN next_expiry timestamptz;
-- Usage not yet drawn from the lots (see above). NOT VALID: existing rows hold the default.
ALTER TABLE accounts ADD COLUMN pending_draw numeric NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD CONSTRAINT accounts_pending_draw_valid
    CHECK (pending_draw >= 0 AND scale(pending_draw) <= 9) NOT VALID;
CREATE INDEX accounts_next_expiry ON accounts (next_expiry) WHERE next_expiry IS NOT NULL;

-- An EXPIRY entry has no caller's key: its reference is the lot id, once per lot.
ALTER TABLE entries DROP CONSTRAINT entries_key_or_capture;
ALTER TABLE entries ADD CONSTRAINT entries_key_or_ledger_made
    CHECK (idempotency_key IS NOT NULL OR (kind IN ('USAGE', 'EXPIRY') AND reference <> '')) NOT VALID;
CREATE UNIQUE INDEX entries_one_expiry_per_lot ON entries (reference) WHERE kind = 'EXPIRY';

-- R30: usage per (account, UTC hour, category). The account's current hour is kept in its
-- own row (roll_*: the row every posting updates anyway, so the group commit writes no
-- other row for it) and moved here when a posting on the account sees the hour has
-- changed; both in the posting's transaction. Usage of an hour = its row here + the
-- account's running hour when it is that hour (ledger_usage_hours()).
ALTER TABLE accounts ADD COLUMN roll_hour timestamptz;
-- Per category, in the order of ledger_categories(): API_REQUESTS, DEDICATED_ENDPOINTS,
-- FINE_TUNING, EVALUATIONS, OTHER.
ALTER TABLE accounts ADD COLUMN roll_amounts numeric[];
ALTER TABLE accounts ADD COLUMN roll_counts bigint[];
CREATE TABLE usage_rollups (
    account_id text NOT NULL,
    hour       timestamptz NOT NULL,
    category   text NOT NULL,
    amount     numeric NOT NULL,
    count      bigint NOT NULL,
    PRIMARY KEY (account_id, hour, category)
);

-- What ledger_after_upgrade() still has to do: set by every application of the functions.
CREATE TABLE ledger_upgrade (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    filled     boolean NOT NULL DEFAULT false,
    repair_due boolean NOT NULL DEFAULT true
);
INSERT INTO ledger_upgrade DEFAULT VALUES;

-- The balance an account holds now, as lots: its journal replayed in order with two pools,
-- grants and purchased credits (credits before this release had no expiry and no
-- priority, so their class is all that orders them): a credit adds what it left above
-- zero to its class; usage (and captures) take grants first, then purchased credits;
-- refunds and disputes take purchased credits first. What each pool holds at the end is
-- one lot of its class. Read once, in journal order; on a large journal the upgrade waits
-- for it (docs/operations.md).
DO $$
DECLARE
    r record;
    cur text := NULL;
    g numeric := 0;
    p numeric := 0;
    t numeric;
BEGIN
    -- A last row of nulls closes the last account.
    FOR r IN SELECT x.* FROM (SELECT e.account_id, e.kind, e.source, e.amount, e.balance_after, e.seq
                              FROM entries e
                              UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL) x
             ORDER BY x.account_id NULLS LAST, x.seq LOOP
        IF cur IS DISTINCT FROM r.account_id THEN
            IF g > 0 THEN
                INSERT INTO lots (lot_id, account_id, source, amount, remaining, reason)
                VALUES (gen_random_uuid(), cur, 'GRANT', g, g, 'Grants before credit lots');
            END IF;
            IF p > 0 THEN
                INSERT INTO lots (lot_id, account_id, source, amount, remaining, reason)
                VALUES (gen_random_uuid(), cur, 'PURCHASE', p, p, 'Balance before credit lots');
            END IF;
            EXIT WHEN r.account_id IS NULL;
            cur := r.account_id;
            g := 0;
            p := 0;
        END IF;
        IF r.kind = 'CREDIT' THEN
            t := greatest(0, least(r.amount, r.balance_after));
            IF r.source = 'GRANT' THEN g := g + t; ELSE p := p + t; END IF;
        ELSIF r.kind = 'USAGE' THEN
            t := least(g, r.amount);
            g := g - t;
            p := p - least(p, r.amount - t);
        ELSE
            t := least(p, r.amount);
            p := p - t;
            g := g - least(g, r.amount - t);
        END IF;
    END LOOP;
END $$;

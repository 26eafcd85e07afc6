-- The ledger: accounts, the append-only journal, and the transactional outbox.
--
-- Invariants enforced here, not in application code:
-- * accounts.balance = sum(CREDIT amounts) - sum(USAGE amounts) of the account's entries:
--   only ledger_post() changes a balance, and it appends the entry in the same statement.
-- * entries are append-only: UPDATE, DELETE and TRUNCATE raise.
-- * (account_id, idempotency_key) is unique: one posting per key per account (R12).
-- * amounts are positive with at most 9 fractional digits (R1).

CREATE TABLE accounts (
    account_id   text PRIMARY KEY CHECK (account_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    billing_mode text NOT NULL CHECK (billing_mode IN ('PREPAID', 'CONTRACT')),
    display_name text NOT NULL DEFAULT '',
    balance      numeric NOT NULL DEFAULT 0 CHECK (scale(balance) <= 9),
    access       text NOT NULL CHECK (access IN ('PENDING_FIRST_PURCHASE', 'ACTIVE', 'SUSPENDED')),
    threshold    numeric CHECK (threshold >= 0 AND scale(threshold) <= 9),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- R5: contract accounts are never suspended for their balance.
    CHECK (billing_mode = 'PREPAID' OR access = 'ACTIVE')
);

CREATE TABLE entries (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entry_id        uuid NOT NULL DEFAULT gen_random_uuid(),
    account_id      text NOT NULL REFERENCES accounts (account_id),
    kind            text NOT NULL CHECK (kind IN ('USAGE', 'CREDIT')),
    category        text CHECK (category IN ('API_REQUESTS', 'DEDICATED_ENDPOINTS', 'FINE_TUNING', 'EVALUATIONS', 'OTHER')),
    source          text CHECK (source IN ('PURCHASE', 'AUTO_RECHARGE', 'GRANT', 'ADJUSTMENT')),
    amount          numeric NOT NULL CHECK (amount > 0 AND scale(amount) <= 9),
    balance_after   numeric NOT NULL,
    reference       text NOT NULL DEFAULT '',
    description     text NOT NULL DEFAULT '',
    idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'USAGE' AND category IS NOT NULL AND source IS NULL)
        OR (kind = 'CREDIT' AND source IS NOT NULL AND category IS NULL)),
    UNIQUE (account_id, idempotency_key)
);

-- Newest-first listing per account (R13).
CREATE INDEX entries_account_seq ON entries (account_id, seq DESC);

CREATE FUNCTION entries_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'journal entries are append-only (% refused)', TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER entries_no_update BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION entries_are_append_only();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION entries_are_append_only();

CREATE TABLE outbox (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid NOT NULL,
    routing_key text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Money as it goes on the wire: trailing zeros trimmed, at least two decimals.
CREATE FUNCTION money_text(n numeric) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN scale(trim_scale(n)) < 2 THEN round(n, 2)::text ELSE trim_scale(n)::text END
$$;

CREATE FUNCTION ledger_event(p_key text, p_account_id text, p_data jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    id uuid := gen_random_uuid();
BEGIN
    INSERT INTO outbox (event_id, routing_key, payload)
    VALUES (id, p_key, jsonb_build_object(
        'id', id, 'type', p_key, 'occurred_at', now(), 'account_id', p_account_id, 'data', p_data));
    PERFORM pg_notify('credits_outbox', '');
END $$;

-- Posts one entry: the whole money movement in one statement, one round trip.
--
-- Locks the account row first, so every posting on one account is serialised on that row
-- and nothing else; the idempotency look-up happens under that lock, which makes concurrent
-- duplicates of one key see each other (R12). Outcome is one of:
--   'posted'    the entry was appended; balance/access are the new state
--   'replayed'  the key was used before with the same request; the first entry is returned
--   'conflict'  the key was used before with a different request; nothing changed
--   'not_found' no such account; nothing changed
CREATE FUNCTION ledger_post(
    p_account_id text, p_kind text, p_category text, p_source text, p_amount numeric,
    p_reference text, p_description text, p_key text)
RETURNS TABLE (
    outcome text, seq bigint, entry_id uuid, kind text, category text, source text,
    amount numeric, balance_after numeric, reference text, description text,
    created_at timestamptz, balance numeric, access text)
LANGUAGE plpgsql AS $$
DECLARE
    acc accounts%ROWTYPE;
    e entries%ROWTYPE;
    new_balance numeric;
    new_access text;
BEGIN
    SELECT * INTO acc FROM accounts a WHERE a.account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;

    SELECT * INTO e FROM entries x WHERE x.account_id = p_account_id AND x.idempotency_key = p_key;
    IF FOUND THEN
        IF e.kind = p_kind AND e.amount = p_amount
           AND e.category IS NOT DISTINCT FROM p_category AND e.source IS NOT DISTINCT FROM p_source
           AND e.reference = p_reference AND e.description = p_description THEN
            outcome := 'replayed';
        ELSE
            outcome := 'conflict';
        END IF;
        seq := e.seq; entry_id := e.entry_id; kind := e.kind; category := e.category;
        source := e.source; amount := e.amount; balance_after := e.balance_after;
        reference := e.reference; description := e.description; created_at := e.created_at;
        balance := acc.balance; access := acc.access;
        RETURN NEXT;
        RETURN;
    END IF;

    IF p_kind = 'USAGE' THEN
        new_balance := acc.balance - p_amount;
    ELSE
        new_balance := acc.balance + p_amount;
    END IF;

    -- R3-R5: access follows the balance for prepaid accounts that have purchased.
    new_access := acc.access;
    IF acc.billing_mode = 'PREPAID' THEN
        IF acc.access = 'PENDING_FIRST_PURCHASE' THEN
            IF p_kind = 'CREDIT' AND p_source IN ('PURCHASE', 'AUTO_RECHARGE') THEN
                new_access := CASE WHEN new_balance > 0 THEN 'ACTIVE' ELSE 'SUSPENDED' END;
            END IF;
        ELSIF new_balance > 0 THEN
            new_access := 'ACTIVE';
        ELSE
            new_access := 'SUSPENDED';
        END IF;
    END IF;

    UPDATE accounts a SET balance = new_balance, access = new_access, updated_at = now()
    WHERE a.account_id = p_account_id;

    INSERT INTO entries (account_id, kind, category, source, amount, balance_after,
                         reference, description, idempotency_key)
    VALUES (p_account_id, p_kind, p_category, p_source, p_amount, new_balance,
            p_reference, p_description, p_key)
    RETURNING * INTO e;

    -- R7: a crossing is a move from at-or-above the threshold to below it.
    IF acc.threshold IS NOT NULL AND acc.balance >= acc.threshold AND new_balance < acc.threshold THEN
        PERFORM ledger_event('ledger.balance.threshold_crossed', p_account_id, jsonb_build_object(
            'threshold', money_text(acc.threshold),
            'balance_before', money_text(acc.balance),
            'balance_after', money_text(new_balance),
            'entry_id', e.entry_id));
    END IF;
    IF new_access <> acc.access THEN
        PERFORM ledger_event(
            CASE
                WHEN new_access = 'SUSPENDED' THEN 'ledger.account.suspended'
                WHEN acc.access = 'PENDING_FIRST_PURCHASE' THEN 'ledger.account.activated'
                ELSE 'ledger.account.reactivated'
            END,
            p_account_id, jsonb_build_object('balance', money_text(new_balance)));
    END IF;

    outcome := 'posted';
    seq := e.seq; entry_id := e.entry_id; kind := e.kind; category := e.category;
    source := e.source; amount := e.amount; balance_after := e.balance_after;
    reference := e.reference; description := e.description; created_at := e.created_at;
    balance := new_balance; access := new_access;
    RETURN NEXT;
END $$;

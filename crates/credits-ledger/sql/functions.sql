-- The current text of every function of the ledger's schema, in one place.
--
-- Applied by the ledger at start-up, after the versioned migrations (which keep the
-- history of how the schema got here), under an advisory lock so that replicas starting
-- together do not race, and only when FUNCTIONS_VERSION (crates/credits-ledger/src/lib.rs)
-- is newer than the version the database records. To change a function, change it here
-- and raise FUNCTIONS_VERSION: the migrations are history.
-- A unit test (`every_schema_function_has_its_current_text_in_functions_sql`) fails when a
-- migration creates a function this file does not define.

CREATE OR REPLACE FUNCTION uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

CREATE OR REPLACE FUNCTION money_text(n numeric) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN scale(trim_scale(n)) < 2 THEN round(n, 2)::text ELSE trim_scale(n)::text END
$$;

CREATE OR REPLACE FUNCTION ledger_event(p_key text, p_account_id text, p_data jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    id uuid := uuid_v7();
BEGIN
    INSERT INTO outbox (event_id, routing_key, payload)
    VALUES (id, p_key, jsonb_build_object(
        'id', id, 'type', p_key, 'occurred_at', now(), 'account_id', p_account_id, 'data', p_data,
        'schema_version', 1));
    PERFORM pg_notify('credits_outbox', '');
END $$;

CREATE OR REPLACE FUNCTION entries_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'journal entries are append-only (% refused)', TG_OP
        USING ERRCODE = 'restrict_violation';
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
CREATE OR REPLACE FUNCTION ledger_post(
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

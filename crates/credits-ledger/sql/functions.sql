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

-- The account moves from its stored (balance, held) to (p_balance, p_held): stores that,
-- derives access from the available balance (R3-R5, R16) and publishes the threshold
-- crossing (R7, R17), the balance alerts (R18) and the access change. `p_purchase`: the move is a purchase credit, the
-- only thing that ends PENDING_FIRST_PURCHASE. `p_ref` names what moved it
-- ({"entry_id": …} and/or {"hold_id": …}). The caller holds the account row's lock.
CREATE OR REPLACE FUNCTION ledger_move(
    acc accounts, p_balance numeric, p_held numeric, p_purchase boolean, p_ref jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    avail_before numeric := acc.balance - acc.held;
    avail_after numeric := p_balance - p_held;
    new_access text := acc.access;
    t numeric;
BEGIN
    IF acc.billing_mode = 'PREPAID' THEN
        IF acc.access = 'PENDING_FIRST_PURCHASE' THEN
            IF p_purchase THEN
                new_access := CASE WHEN avail_after > 0 THEN 'ACTIVE' ELSE 'SUSPENDED' END;
            END IF;
        ELSIF avail_after > 0 THEN
            new_access := 'ACTIVE';
        ELSE
            new_access := 'SUSPENDED';
        END IF;
    END IF;

    UPDATE accounts a SET balance = p_balance, held = p_held, access = new_access, updated_at = now()
    WHERE a.account_id = acc.account_id;
    -- Every replica's in-memory access view drops the account on commit (src/access.rs):
    -- access changes, crossings and holds are rare next to usage and must be seen at once.
    PERFORM pg_notify('credits_access', acc.account_id);

    -- R7/R17: a crossing is a move of the available balance from at-or-above the threshold
    -- to below it.
    IF acc.threshold IS NOT NULL AND avail_before >= acc.threshold AND avail_after < acc.threshold THEN
        PERFORM ledger_event('ledger.balance.threshold_crossed', acc.account_id, jsonb_build_object(
            'threshold', money_text(acc.threshold),
            'balance_before', money_text(acc.balance),
            'balance_after', money_text(p_balance),
            'available_before', money_text(avail_before),
            'available_after', money_text(avail_after)) || p_ref);
    END IF;
    -- R18: one alert per threshold the available balance falls below, highest first.
    FOREACH t IN ARRAY acc.alert_thresholds LOOP
        IF avail_before >= t AND avail_after < t THEN
            PERFORM ledger_event('ledger.balance.alert', acc.account_id, jsonb_build_object(
                'threshold', money_text(t),
                'available_before', money_text(avail_before),
                'available_after', money_text(avail_after)) || p_ref);
        END IF;
    END LOOP;
    IF new_access <> acc.access THEN
        PERFORM ledger_event(
            CASE
                WHEN new_access = 'SUSPENDED' THEN 'ledger.account.suspended'
                WHEN acc.access = 'PENDING_FIRST_PURCHASE' THEN 'ledger.account.activated'
                ELSE 'ledger.account.reactivated'
            END,
            acc.account_id, jsonb_build_object(
                'balance', money_text(p_balance),
                'available_balance', money_text(avail_after)));
    END IF;
    RETURN new_access;
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
    avail_after numeric;
    new_access text;
    crosses_alert boolean;
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

    INSERT INTO entries (account_id, kind, category, source, amount, balance_after,
                         reference, description, idempotency_key)
    VALUES (p_account_id, p_kind, p_category, p_source, p_amount, new_balance,
            p_reference, p_description, p_key)
    RETURNING * INTO e;

    -- The hot path: what ledger_move() decides, inlined (a call per posting costs ~10 % of
    -- a group-commit batch); ledger_move() itself only when something is published.
    avail_after := new_balance - acc.held;
    new_access := acc.access;
    IF acc.billing_mode = 'PREPAID' THEN
        IF acc.access = 'PENDING_FIRST_PURCHASE' THEN
            IF p_kind = 'CREDIT' AND p_source IN ('PURCHASE', 'AUTO_RECHARGE') THEN
                new_access := CASE WHEN avail_after > 0 THEN 'ACTIVE' ELSE 'SUSPENDED' END;
            END IF;
        ELSIF avail_after > 0 THEN
            new_access := 'ACTIVE';
        ELSE
            new_access := 'SUSPENDED';
        END IF;
    END IF;
    -- Only accounts with alerts pay for the look at them (an EXISTS in the IF below would
    -- take PL/pgSQL off its fast expression path for every posting).
    crosses_alert := false;
    IF cardinality(acc.alert_thresholds) > 0 THEN
        crosses_alert := EXISTS (SELECT 1 FROM unnest(acc.alert_thresholds) t
                                 WHERE acc.balance - acc.held >= t AND avail_after < t);
    END IF;
    IF new_access <> acc.access
       OR (acc.threshold IS NOT NULL AND acc.balance - acc.held >= acc.threshold
           AND avail_after < acc.threshold)
       OR crosses_alert THEN
        PERFORM ledger_move(acc, new_balance, acc.held,
                            p_kind = 'CREDIT' AND p_source IN ('PURCHASE', 'AUTO_RECHARGE'),
                            jsonb_build_object('entry_id', e.entry_id));
    ELSE
        UPDATE accounts a SET balance = new_balance, updated_at = now()
        WHERE a.account_id = p_account_id;
        -- No notification here: a transaction that notifies takes a database-wide lock
        -- through its commit, which would serialise the group commit's batches. A
        -- balance-only change reaches other replicas' access views by their MAX_AGE.
    END IF;

    outcome := 'posted';
    seq := e.seq; entry_id := e.entry_id; kind := e.kind; category := e.category;
    source := e.source; amount := e.amount; balance_after := e.balance_after;
    reference := e.reference; description := e.description; created_at := e.created_at;
    balance := new_balance; access := new_access;
    RETURN NEXT;
END $$;

-- Creates a hold (R15) under the account's lock. Outcome is one of:
--   'created'      the hold is ACTIVE; held and access changed with it
--   'replayed'     the key was used before with the same request; that hold
--   'conflict'     the key was used before with a different request; nothing changed
--   'insufficient' a prepaid account without access or available < amount; nothing changed
--   'not_found'    no such account; nothing changed
CREATE OR REPLACE FUNCTION ledger_hold_create(
    p_account_id text, p_amount numeric, p_category text, p_description text, p_key text,
    p_ttl_seconds integer)
RETURNS TABLE (outcome text, hold_id uuid)
LANGUAGE plpgsql AS $$
DECLARE
    acc accounts%ROWTYPE;
    h holds%ROWTYPE;
BEGIN
    SELECT * INTO acc FROM accounts a WHERE a.account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT * INTO h FROM holds x WHERE x.account_id = p_account_id AND x.idempotency_key = p_key;
    IF FOUND THEN
        outcome := CASE
            WHEN h.amount = p_amount AND h.category = p_category
                 AND h.description = p_description AND h.ttl_seconds = p_ttl_seconds
            THEN 'replayed' ELSE 'conflict' END;
        hold_id := h.hold_id;
        RETURN NEXT;
        RETURN;
    END IF;
    IF acc.billing_mode = 'PREPAID'
       AND (acc.access <> 'ACTIVE' OR acc.balance - acc.held < p_amount) THEN
        outcome := 'insufficient';
        RETURN NEXT;
        RETURN;
    END IF;

    INSERT INTO holds (hold_id, account_id, amount, category, description, idempotency_key,
                       ttl_seconds, expires_at)
    VALUES (uuid_v7(), p_account_id, p_amount, p_category, p_description, p_key,
            p_ttl_seconds, now() + make_interval(secs => p_ttl_seconds))
    RETURNING * INTO h;
    PERFORM ledger_event('ledger.hold.created', p_account_id, jsonb_build_object(
        'hold_id', h.hold_id, 'amount', money_text(h.amount), 'category', h.category,
        'expires_at', h.expires_at));
    PERFORM ledger_move(acc, acc.balance, acc.held + p_amount, false,
                        jsonb_build_object('hold_id', h.hold_id));
    outcome := 'created';
    hold_id := h.hold_id;
    RETURN NEXT;
END $$;

-- Ends a hold (R15) under the account's lock, then the hold's. `p_action` is 'CAPTURE'
-- (posts one USAGE entry of p_amount, reference = hold id), 'RELEASE' or 'EXPIRE' (the
-- sweeper; only once expires_at has passed). An ACTIVE hold past expires_at is expired by
-- whichever call touches it first. Outcome is one of:
--   'ended'           this call ended the hold as asked
--   'repeated'        the hold had already ended the way this call asks (a capture: of the
--                     same amount and description); the first result stands
--   'ended_otherwise' the hold has ended another way (perhaps just now, by expiry)
--   'not_due'         EXPIRE of a hold that is not past expires_at (or already ended)
--   'not_found'       no such account, or no such hold on it
CREATE OR REPLACE FUNCTION ledger_hold_end(
    p_account_id text, p_hold_id uuid, p_action text, p_amount numeric, p_description text)
RETURNS TABLE (outcome text, status text)
LANGUAGE plpgsql AS $$
DECLARE
    acc accounts%ROWTYPE;
    h holds%ROWTYPE;
    asked text := CASE p_action WHEN 'CAPTURE' THEN 'CAPTURED' WHEN 'RELEASE' THEN 'RELEASED'
                                ELSE 'EXPIRED' END;
    ending text;
    e entries%ROWTYPE;
    new_balance numeric;
BEGIN
    SELECT * INTO acc FROM accounts a WHERE a.account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT * INTO h FROM holds x WHERE x.hold_id = p_hold_id AND x.account_id = p_account_id
    FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;

    IF h.status <> 'ACTIVE' THEN
        status := h.status;
        IF p_action = 'EXPIRE' THEN
            outcome := 'not_due';
        ELSIF h.status = asked AND (asked <> 'CAPTURED' OR (h.captured_amount = p_amount
              AND (SELECT x.description FROM entries x WHERE x.seq = h.entry_seq) = p_description)) THEN
            outcome := 'repeated';
        ELSE
            outcome := 'ended_otherwise';
        END IF;
        RETURN NEXT;
        RETURN;
    END IF;

    ending := CASE WHEN h.expires_at <= now() THEN 'EXPIRED' ELSE asked END;
    IF p_action = 'EXPIRE' AND ending <> 'EXPIRED' THEN
        outcome := 'not_due';
        status := h.status;
        RETURN NEXT;
        RETURN;
    END IF;

    new_balance := acc.balance;
    IF ending = 'CAPTURED' THEN
        new_balance := acc.balance - p_amount;
        INSERT INTO entries (account_id, kind, category, source, amount, balance_after,
                             reference, description, idempotency_key)
        VALUES (p_account_id, 'USAGE', h.category, NULL, p_amount, new_balance,
                h.hold_id::text, p_description, NULL)
        RETURNING * INTO e;
    END IF;
    UPDATE holds x SET status = ending, ended_at = now(),
                       captured_amount = CASE WHEN ending = 'CAPTURED' THEN p_amount END,
                       entry_id = e.entry_id, entry_seq = e.seq,
                       capture_available = CASE WHEN ending = 'CAPTURED'
                                                THEN new_balance - (acc.held - h.amount) END
    WHERE x.hold_id = h.hold_id;
    PERFORM ledger_event('ledger.hold.' || lower(ending), p_account_id,
        jsonb_build_object('hold_id', h.hold_id, 'amount', money_text(h.amount))
        || CASE WHEN ending = 'CAPTURED'
                THEN jsonb_build_object('captured_amount', money_text(p_amount), 'entry_id', e.entry_id)
                ELSE '{}'::jsonb END);
    PERFORM ledger_move(acc, new_balance, acc.held - h.amount, false,
        jsonb_build_object('hold_id', h.hold_id)
        || CASE WHEN ending = 'CAPTURED' THEN jsonb_build_object('entry_id', e.entry_id)
                ELSE '{}'::jsonb END);
    outcome := CASE WHEN ending = asked THEN 'ended' ELSE 'ended_otherwise' END;
    status := ending;
    RETURN NEXT;
END $$;

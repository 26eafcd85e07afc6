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
    -- The trace the writing call runs in (set for the transaction by the function it called).
    INSERT INTO outbox (event_id, routing_key, payload, traceparent)
    VALUES (id, p_key, jsonb_build_object(
        'id', id, 'type', p_key, 'occurred_at', now(), 'account_id', p_account_id, 'data', p_data,
        'schema_version', 1), nullif(current_setting('credits.traceparent', true), ''));
    PERFORM pg_notify('credits_outbox', '');
END $$;

-- R31: one account's new state into the access feed (migration 20261206000001): what
-- WatchAccess streams and every replica's CheckAccess view follows. Called by every
-- statement that changes a balance, a held amount or access, after it raised the version.
CREATE OR REPLACE FUNCTION ledger_feed_one(p_account_id text, p_version bigint, p_mode text,
                                           p_access text, p_balance numeric, p_held numeric)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO access_changes (account_ids, versions, modes, access, balances, helds)
    VALUES (ARRAY[p_account_id], ARRAY[p_version], ARRAY[p_mode], ARRAY[p_access],
            ARRAY[p_balance], ARRAY[p_held])
$$;

-- R31: the access feed's changes committed after snapshot `p_since` (what was not visible
-- in it), one row per account change. STABLE: read at the calling statement's snapshot, so
-- a poll's rows and the pg_current_snapshot() it returns beside them are one snapshot.
DROP FUNCTION IF EXISTS ledger_feed_since(pg_snapshot);
CREATE OR REPLACE FUNCTION ledger_feed_since(p_since pg_snapshot)
RETURNS TABLE (account_id text, version bigint, mode text, access text, balance numeric,
               held numeric, at timestamptz, xid bigint)
LANGUAGE plpgsql STABLE
-- xid8 has no statistics the planner can range over: `xid >= …` is estimated at a third of
-- the table and a sequential scan of minutes of changes chosen (profiled under usage-spread:
-- 1.7 M rows read in 10 s). Two index range reads, always.
SET enable_seqscan = off
-- Planned once per connection, not per poll: as a SQL function (which PostgreSQL plans on
-- every call) planning took 1.3 ms of a 1.6 ms poll, reading ~600 index pages for the
-- planner's range estimate, and the 100 polls a second of one replica were a fifth of
-- PostgreSQL's CPU under usage-spread (profiled; docs/benchmarks.md).
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    -- RETURN QUERY converts nothing: the columns' types must stay those of RETURNS TABLE
    -- (access_changes' arrays' element types; `xid` cast to bigint).
    RETURN QUERY
    SELECT u.account_id, u.version, u.mode, u.access, u.balance, u.held, c.at,
           c.xid::text::bigint
    FROM (SELECT * FROM access_changes x WHERE x.xid >= pg_snapshot_xmax(p_since)
          UNION ALL
          SELECT * FROM access_changes x
          WHERE x.xid = ANY (ARRAY(SELECT pg_snapshot_xip(p_since)))
            AND x.xid < pg_snapshot_xmax(p_since)) c
    CROSS JOIN LATERAL unnest(c.account_ids, c.versions, c.modes, c.access, c.balances, c.helds)
         AS u(account_id, version, mode, access, balance, held);
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
    v bigint;
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

    UPDATE accounts a SET balance = p_balance, held = p_held, access = new_access, updated_at = now(),
                          version = a.version + 1
    WHERE a.account_id = acc.account_id
    RETURNING a.version INTO v;
    -- R31: watchers and every replica's access view see it once this commits.
    PERFORM ledger_feed_one(acc.account_id, v, acc.billing_mode, new_access, p_balance, p_held);

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

-- R29: a CREDIT entry makes a lot of credits, after the usage pending is drawn from the
-- lots there were before it. What it holds is what the credit left above zero: a credit
-- that arrives while the balance is negative first pays that debt. `p_expires_at` (a
-- grant's, or a purchase's under PURCHASED_CREDITS_EXPIRE_DAYS) enters next_expiry.
CREATE OR REPLACE FUNCTION ledger_lot_add(e entries, p_expires_at timestamptz, p_priority integer,
                                          p_pending numeric)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    held_by_lot numeric := greatest(0, least(e.amount, e.balance_after));
BEGIN
    PERFORM ledger_lots_settle(e.account_id, p_pending);
    INSERT INTO lots (lot_id, account_id, entry_seq, source, amount, remaining, priority,
                      expires_at, reason, created_at)
    VALUES (uuid_v7(), e.account_id, e.seq, e.source, e.amount, held_by_lot,
            coalesce(p_priority, 0), p_expires_at, e.description, e.created_at);
    IF p_expires_at IS NOT NULL AND held_by_lot > 0 THEN
        UPDATE accounts a SET next_expiry = least(a.next_expiry, p_expires_at)
        WHERE a.account_id = e.account_id;
    END IF;
END $$;

-- R29: a debit of `p_amount` drawn from the account's lots in burn order: usage and
-- captures (`p_grants_first`) take grants first, then purchased credits; money going back
-- to the customer (a refund, a dispute) takes purchased credits first, then grants. Within
-- each class: the earliest to expire first (no expiry last), then the lower priority, then
-- the oldest. What the lots cannot cover is debt (the balance below zero). The caller holds
-- the account's lock. Usage is drawn lazily: ledger_lots_settle().
CREATE OR REPLACE FUNCTION ledger_lots_draw(p_account_id text, p_amount numeric, p_grants_first boolean)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE lots l SET remaining = l.remaining - d.take
    FROM (SELECT x.lot_id,
                 least(x.remaining, greatest(0, p_amount - (sum(x.remaining) OVER w - x.remaining))) AS take
          FROM lots x WHERE x.account_id = p_account_id AND x.remaining > 0
          WINDOW w AS (ORDER BY (x.source = 'GRANT') = p_grants_first DESC, x.expires_at NULLS LAST,
                                x.priority, x.seq
                       ROWS UNBOUNDED PRECEDING)) d
    WHERE l.lot_id = d.lot_id AND d.take > 0;
END $$;

-- R29: draws the account's pending usage (`p_pending`, its accounts.pending_draw) from its
-- lots in burn order and clears it. Usage only adds to pending_draw, in the account row
-- every posting updates anyway (the group commit's hot path touches no lot); this runs
-- before anything adds a lot, expires one or draws in another order, so the lots end as
-- if every posting had drawn them itself. The caller holds the account's lock.
CREATE OR REPLACE FUNCTION ledger_lots_settle(p_account_id text, p_pending numeric)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_pending > 0 THEN
        PERFORM ledger_lots_draw(p_account_id, p_pending, true);
        UPDATE accounts a SET pending_draw = 0 WHERE a.account_id = p_account_id;
    END IF;
END $$;

-- R29: the account's lots as they stand with its pending usage drawn (what
-- ledger_lots_settle() would leave), in burn order (`ord`), only those that still hold
-- credits; for reads (GetAccount, the checks), which change nothing.
CREATE OR REPLACE FUNCTION ledger_lots_now(p_account_id text)
RETURNS TABLE (ord bigint, lot_id uuid, source text, amount numeric, remaining numeric,
               priority integer, expires_at timestamptz, reason text, created_at timestamptz,
               entry_seq bigint)
LANGUAGE sql STABLE AS $$
    SELECT n.* FROM (
        SELECT row_number() OVER w AS ord, x.lot_id, x.source, x.amount,
               x.remaining - least(x.remaining,
                                   greatest(0, a.pending_draw - (sum(x.remaining) OVER w - x.remaining))) AS remaining,
               x.priority, x.expires_at, x.reason, x.created_at, x.entry_seq
        FROM lots x JOIN accounts a ON a.account_id = x.account_id
        WHERE x.account_id = p_account_id AND x.remaining > 0
        WINDOW w AS (ORDER BY x.source <> 'GRANT', x.expires_at NULLS LAST, x.priority, x.seq
                     ROWS UNBOUNDED PRECEDING)) n
    WHERE n.remaining > 0
    ORDER BY n.ord
$$;

-- R29: expires the account's lots whose expires_at has passed: one EXPIRY entry of what
-- each still holds (reference = the lot id; the unique index makes it once per lot), the
-- lot emptied with it, `ledger.credits.expired`, and the move of the balance as for any
-- debit (access, R7/R17 crossings, R18 alerts: an expiry can start a top-up). Then
-- next_expiry is recomputed. The caller holds the account's lock (so two replicas cannot
-- both expire one lot); returns the account row as it now is.
CREATE OR REPLACE FUNCTION ledger_expire_due(acc accounts) RETURNS accounts
LANGUAGE plpgsql AS $$
DECLARE
    l lots%ROWTYPE;
    e entries%ROWTYPE;
BEGIN
    -- Usage posted before now drew from these lots, the ones about to expire included.
    PERFORM ledger_lots_settle(acc.account_id, acc.pending_draw);
    acc.pending_draw := 0;
    FOR l IN SELECT * FROM lots x
             WHERE x.account_id = acc.account_id AND x.remaining > 0 AND x.expires_at <= now()
             ORDER BY x.expires_at, x.seq LOOP
        INSERT INTO entries (account_id, kind, category, source, amount, balance_after,
                             reference, description, idempotency_key)
        VALUES (acc.account_id, 'EXPIRY', NULL, NULL, l.remaining, acc.balance - l.remaining,
                l.lot_id::text,
                CASE WHEN l.source = 'GRANT' THEN 'Grant expired' ELSE 'Purchased credits expired' END
                || CASE WHEN l.reason <> '' THEN ': ' || l.reason ELSE '' END,
                NULL)
        RETURNING * INTO e;
        UPDATE lots x SET remaining = 0, expired_at = now(), expiry_entry_seq = e.seq
        WHERE x.lot_id = l.lot_id;
        PERFORM ledger_event('ledger.credits.expired', acc.account_id, jsonb_build_object(
            'lot_id', l.lot_id, 'source', l.source, 'amount', money_text(l.remaining),
            'expires_at', l.expires_at, 'reason', l.reason, 'entry_id', e.entry_id,
            'balance', money_text(e.balance_after),
            'available_balance', money_text(e.balance_after - acc.held)));
        PERFORM ledger_move(acc, e.balance_after, acc.held, false,
                            jsonb_build_object('entry_id', e.entry_id));
        SELECT * INTO acc FROM accounts a WHERE a.account_id = acc.account_id;
    END LOOP;
    UPDATE accounts a SET next_expiry = (SELECT min(x.expires_at) FROM lots x
                                         WHERE x.account_id = acc.account_id AND x.remaining > 0)
    WHERE a.account_id = acc.account_id
    RETURNING * INTO acc;
    RETURN acc;
END $$;

-- R29, the sweeper's call: expires what is due on one account under its lock (any number
-- of replicas may sweep at once: each lot expires once). An account whose row is locked is
-- skipped (its holder — a posting — expires what is due itself, or the next sweep does), so
-- one busy account never stalls a sweep. Returns how many lots expired.
CREATE OR REPLACE FUNCTION ledger_expire_account(p_account_id text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    acc accounts%ROWTYPE;
    n integer;
BEGIN
    SELECT * INTO acc FROM accounts a WHERE a.account_id = p_account_id FOR UPDATE SKIP LOCKED;
    IF NOT FOUND OR acc.next_expiry IS NULL OR acc.next_expiry > now() THEN
        RETURN 0;
    END IF;
    -- Counted once the pending usage is drawn: a lot it empties expires with nothing left.
    PERFORM ledger_lots_settle(acc.account_id, acc.pending_draw);
    acc.pending_draw := 0;
    SELECT count(*) INTO n FROM lots x
    WHERE x.account_id = p_account_id AND x.remaining > 0 AND x.expires_at <= now();
    PERFORM ledger_expire_due(acc);
    RETURN n;
END $$;

-- R30: the usage categories, in the order of accounts.roll_amounts / roll_counts.
CREATE OR REPLACE FUNCTION ledger_categories() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['API_REQUESTS', 'DEDICATED_ENDPOINTS', 'FINE_TUNING', 'EVALUATIONS', 'OTHER']
$$;

CREATE OR REPLACE FUNCTION vec_add(a numeric[], b numeric[]) RETURNS numeric[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY[a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5]]
$$;

CREATE OR REPLACE FUNCTION vec_add(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY[a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5]]
$$;

-- R30: moves an account's finished running hour into usage_rollups (added to what may be
-- there already: a posting whose transaction began in an earlier hour than one before it
-- can reopen that hour, and nothing is lost or counted twice either way).
CREATE OR REPLACE FUNCTION ledger_roll_flush(p_account_id text, p_hour timestamptz,
                                             p_amounts numeric[], p_counts bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_rollups AS r (account_id, hour, category, amount, count)
    SELECT p_account_id, p_hour, k.category, p_amounts[k.i], p_counts[k.i]
    FROM unnest(ledger_categories()) WITH ORDINALITY AS k(category, i)
    WHERE p_hour IS NOT NULL AND p_counts[k.i] > 0
    ON CONFLICT (account_id, hour, category) DO UPDATE
    SET amount = r.amount + EXCLUDED.amount, count = r.count + EXCLUDED.count;
END $$;

-- R30: one usage posting (a posting outside the group commit's set-based batch, or a
-- capture) added to the account's running hour, the hour before moved to usage_rollups
-- first when this posting's hour (its transaction's, as entries.created_at) is another.
-- The caller holds the account's lock.
CREATE OR REPLACE FUNCTION ledger_roll_usage(p_account_id text, p_category text, p_amount numeric)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    h timestamptz := date_trunc('hour', now(), 'UTC');
    i integer := array_position(ledger_categories(), p_category);
    r record;
    amounts numeric[];
    counts bigint[];
BEGIN
    SELECT a.roll_hour, a.roll_amounts, a.roll_counts INTO r
    FROM accounts a WHERE a.account_id = p_account_id;
    IF r.roll_hour IS NOT DISTINCT FROM h THEN
        amounts := r.roll_amounts;
        counts := r.roll_counts;
    ELSE
        PERFORM ledger_roll_flush(p_account_id, r.roll_hour, r.roll_amounts, r.roll_counts);
        amounts := '{0,0,0,0,0}';
        counts := '{0,0,0,0,0}';
    END IF;
    amounts[i] := amounts[i] + p_amount;
    counts[i] := counts[i] + 1;
    UPDATE accounts a SET roll_hour = h, roll_amounts = amounts, roll_counts = counts
    WHERE a.account_id = p_account_id;
END $$;

-- R30: an account's usage per UTC hour and category: its rows in usage_rollups and its
-- running hour (an hour may be in both; a reader sums). Never the journal.
CREATE OR REPLACE FUNCTION ledger_usage_hours(p_account_id text)
RETURNS TABLE (hour timestamptz, category text, amount numeric, count bigint)
LANGUAGE sql STABLE AS $$
    SELECT r.hour, r.category, r.amount, r.count
    FROM usage_rollups r WHERE r.account_id = p_account_id
    UNION ALL
    SELECT a.roll_hour, k.category, a.roll_amounts[k.i], a.roll_counts[k.i]
    FROM accounts a CROSS JOIN unnest(ledger_categories()) WITH ORDINALITY AS k(category, i)
    WHERE a.account_id = p_account_id AND a.roll_hour IS NOT NULL AND a.roll_counts[k.i] > 0
$$;

-- Posts one entry: the whole money movement in one statement, one round trip.
--
-- Locks the account row first, so every posting on one account is serialised on that row
-- and nothing else; the idempotency look-up happens under that lock, which makes concurrent
-- duplicates of one key see each other (R12). Outcome is one of:
--   'posted'    the entry was appended; balance/access are the new state
--   'replayed'  the key was used before with the same request; the first entry is returned
--   'conflict'  the key was used before with a different request; nothing changed
--   'not_found' no such account; nothing changed
-- `p_traceparent`: the W3C trace context of the call, kept with the events it publishes.
-- (Functions version 8 replaced the signatures without it: a caller that does not pass it,
-- such as a replica still on the version before, gets null.)
-- `p_expires_at`, `p_priority` (R29): the lot a CREDIT makes; compared on a replay of a
-- grant (a purchase's expiry is the ledger's own setting, computed anew by every call).
-- (Functions version 12 added them: the signature before is dropped.)
DROP FUNCTION IF EXISTS ledger_post(text, text, text, text, numeric, text, text, text);
DROP FUNCTION IF EXISTS ledger_post(text, text, text, text, numeric, text, text, text, text);
CREATE OR REPLACE FUNCTION ledger_post(
    p_account_id text, p_kind text, p_category text, p_source text, p_amount numeric,
    p_reference text, p_description text, p_key text, p_traceparent text DEFAULT NULL,
    p_expires_at timestamptz DEFAULT NULL, p_priority integer DEFAULT 0)
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
    ver bigint;
BEGIN
    PERFORM set_config('credits.traceparent', coalesce(p_traceparent, ''), true);
    SELECT * INTO acc FROM accounts a WHERE a.account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;
    -- R29: credits past their expiry are gone before anything else looks at the balance.
    IF acc.next_expiry <= now() THEN
        acc := ledger_expire_due(acc);
    END IF;

    SELECT * INTO e FROM entries x WHERE x.account_id = p_account_id AND x.idempotency_key = p_key;
    IF FOUND THEN
        IF e.kind = p_kind AND e.amount = p_amount
           AND e.category IS NOT DISTINCT FROM p_category AND e.source IS NOT DISTINCT FROM p_source
           AND e.reference = p_reference AND e.description = p_description
           AND (e.source IS DISTINCT FROM 'GRANT'
                OR EXISTS (SELECT 1 FROM lots l WHERE l.entry_seq = e.seq
                           AND l.expires_at IS NOT DISTINCT FROM p_expires_at
                           AND l.priority = p_priority)
                -- a grant made before lots existed: it had no expiry and no priority
                OR (p_expires_at IS NULL AND coalesce(p_priority, 0) = 0
                    AND NOT EXISTS (SELECT 1 FROM lots l WHERE l.entry_seq = e.seq))) THEN
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

    -- Credits add; every other kind (usage, refund, dispute, expiry) takes away.
    IF p_kind = 'CREDIT' THEN
        new_balance := acc.balance + p_amount;
    ELSE
        new_balance := acc.balance - p_amount;
    END IF;

    INSERT INTO entries (account_id, kind, category, source, amount, balance_after,
                         reference, description, idempotency_key)
    VALUES (p_account_id, p_kind, p_category, p_source, p_amount, new_balance,
            p_reference, p_description, p_key)
    RETURNING * INTO e;
    -- R29: a credit is a lot; usage adds to pending_draw (below, with the balance); a
    -- refund or dispute draws purchased credits first, once the pending usage is drawn.
    -- (No lot holds anything while the balance is not positive.)
    IF p_kind = 'CREDIT' THEN
        PERFORM ledger_lot_add(e, p_expires_at, p_priority, acc.pending_draw);
    ELSIF p_kind = 'USAGE' THEN
        PERFORM ledger_roll_usage(p_account_id, p_category, p_amount);
    ELSE
        PERFORM ledger_lots_settle(p_account_id, acc.pending_draw);
        IF acc.balance > 0 THEN
            PERFORM ledger_lots_draw(p_account_id, p_amount, false);
        END IF;
    END IF;

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
        IF p_kind = 'USAGE' AND acc.balance > 0 THEN
            UPDATE accounts a SET pending_draw = a.pending_draw + p_amount
            WHERE a.account_id = p_account_id;
        END IF;
    ELSE
        UPDATE accounts a
        SET balance = new_balance, updated_at = now(), version = a.version + 1,
            pending_draw = a.pending_draw
                           + CASE WHEN p_kind = 'USAGE' AND acc.balance > 0 THEN p_amount ELSE 0 END
        WHERE a.account_id = p_account_id
        RETURNING a.version INTO ver;
        -- R31: a row in the feed, not a notification (a transaction that notifies takes a
        -- database-wide lock through its commit, which would serialise the group commit).
        PERFORM ledger_feed_one(p_account_id, ver, acc.billing_mode, new_access, new_balance, acc.held);
    END IF;

    outcome := 'posted';
    seq := e.seq; entry_id := e.entry_id; kind := e.kind; category := e.category;
    source := e.source; amount := e.amount; balance_after := e.balance_after;
    reference := e.reference; description := e.description; created_at := e.created_at;
    balance := new_balance; access := new_access;
    RETURN NEXT;
END $$;

-- R27: a debit that must be covered by the available balance (a refund asked through the
-- API): 'insufficient' (nothing changed, `balance`/`access` the account's, `amount` the
-- available balance) when it is not; otherwise exactly ledger_post(). A replayed key is
-- answered by ledger_post() as always, whatever the balance is now. The account's row is
-- locked here, before the look, so the check and the posting see one balance.
CREATE OR REPLACE FUNCTION ledger_debit_covered(
    p_account_id text, p_kind text, p_amount numeric, p_reference text, p_description text,
    p_key text, p_traceparent text DEFAULT NULL)
RETURNS TABLE (
    outcome text, seq bigint, entry_id uuid, kind text, category text, source text,
    amount numeric, balance_after numeric, reference text, description text,
    created_at timestamptz, balance numeric, access text)
LANGUAGE plpgsql AS $$
DECLARE
    acc accounts%ROWTYPE;
    covered numeric;
BEGIN
    SELECT * INTO acc FROM accounts a WHERE a.account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT * FROM ledger_post(p_account_id, p_kind, NULL, NULL, p_amount,
                                               p_reference, p_description, p_key, p_traceparent);
        RETURN;
    END IF;
    -- R29: the look at the available balance comes after what is due has expired, and a
    -- refund is covered only by purchased credits (never paid out of a grant), with the
    -- pending usage drawn first.
    IF acc.next_expiry <= now() THEN
        acc := ledger_expire_due(acc);
    END IF;
    SELECT least(acc.balance - acc.held,
                 CASE WHEN p_kind = 'REFUND'
                      THEN coalesce(sum(n.remaining) FILTER (WHERE n.source <> 'GRANT'), 0)
                      ELSE acc.balance - acc.held END)
    INTO covered
    FROM ledger_lots_now(p_account_id) n;
    IF NOT EXISTS (SELECT 1 FROM entries x
                       WHERE x.account_id = p_account_id AND x.idempotency_key = p_key)
       AND covered < p_amount THEN
        outcome := 'insufficient';
        amount := covered;
        balance := acc.balance;
        access := acc.access;
        RETURN NEXT;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM ledger_post(p_account_id, p_kind, NULL, NULL, p_amount,
                                           p_reference, p_description, p_key, p_traceparent);
END $$;

-- Posts a batch (what group commit sends) as set operations instead of one ledger_post()
-- per item: the accounts are locked once, in one order shared by every batch (so batches
-- cannot deadlock); replays and conflicts are found with one join on the idempotency key;
-- each account's running balance is a window sum in request order, which gives every
-- entry its balance_after and every item the account's state right after it; entries,
-- balances and events are written with one statement each. Per item, the outcome, the
-- entry, the balance and the access are exactly what ledger_post() would answer had the
-- items been posted one after another in request order (`ord`, 1-based), and the same
-- events are published (R7, R17, R18, access changes), in that order, each with the trace
-- context of the item that caused it (`p_traceparents`, null outside a trace).
--
-- A batch with two items on one (account, key), or with anything but usage (group commit
-- sends only usage), is posted by ledger_post() per item instead: an item must see the
-- entry its twin appends, which a set-based statement cannot, and only usage is drawn from
-- lots here (R29).
CREATE OR REPLACE FUNCTION ledger_post_batch(
    p_account_ids text[], p_kinds text[], p_categories text[], p_sources text[],
    p_amounts numeric[], p_references text[], p_descriptions text[], p_keys text[],
    p_traceparents text[])
RETURNS TABLE (
    ord bigint, outcome text, seq bigint, entry_id uuid, kind text, category text, source text,
    amount numeric, balance_after numeric, reference text, description text,
    created_at timestamptz, balance numeric, access text)
LANGUAGE plpgsql
-- A batch touches at most 128 accounts: always by index. Left to itself the planner finds
-- a sequential scan of `accounts` cheaper for 100+ keys (and an UPDATE by hash join over
-- the whole table), which a profile showed costing most of PostgreSQL's CPU.
SET enable_seqscan = off
-- One plan for every batch size. Left to itself, PL/pgSQL re-plans the big statement below
-- for every call whose custom plan looks cheaper than the generic one, which a small batch's
-- always does: planning was 28 % of PostgreSQL's CPU for one-item batches (profiled), and
-- 4 clients posting one item each ran 2.6x faster with the generic plan (docs/benchmarks.md).
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    r record;
    outbox_notified boolean := false;
    locked text[];
    due text[];
    acc accounts%ROWTYPE;
    -- R30: the hour this transaction's entries are in (created_at = now()).
    hour_now timestamptz := date_trunc('hour', now(), 'UTC');
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(p_account_ids, p_keys) AS t(account_id, key)
               GROUP BY t.account_id, t.key HAVING count(*) > 1)
       OR EXISTS (SELECT 1 FROM unnest(p_kinds) AS k WHERE k IS DISTINCT FROM 'USAGE') THEN
        -- Row by row: accounts in byte order (the lock order of every batch), request
        -- order within one account; answered in request order.
        RETURN QUERY
        SELECT i.ord, p.*
        FROM (SELECT u.* FROM unnest(p_account_ids, p_kinds, p_categories, p_sources, p_amounts,
                                     p_references, p_descriptions, p_keys, p_traceparents)
                   WITH ORDINALITY AS u(account_id, kind, category, source, amount, reference,
                                        description, key, traceparent, ord)
              ORDER BY u.account_id COLLATE "C", u.ord) i
        CROSS JOIN LATERAL ledger_post(i.account_id, i.kind, i.category, i.source, i.amount,
                                       i.reference, i.description, i.key, i.traceparent) p
        ORDER BY i.ord;
        RETURN;
    END IF;

    -- Byte order ("C"), as the row-by-row form above: any two batches lock shared accounts
    -- in the same order. Only the accounts locked here are
    -- posted to: one created while this waited for a lock answers not_found (the batch
    -- comes first), never posted to unlocked.
    SELECT coalesce(array_agg(l.account_id), '{}'),
           coalesce(array_agg(l.account_id) FILTER (WHERE l.next_expiry <= now()), '{}')
    INTO locked, due
    FROM (SELECT a.account_id, a.next_expiry FROM accounts a WHERE a.account_id = ANY (p_account_ids)
          ORDER BY a.account_id COLLATE "C" FOR UPDATE) l;
    -- R29: what is due expires before this batch's usage is drawn (as ledger_post() does).
    IF cardinality(due) > 0 THEN
        FOR acc IN SELECT * FROM accounts a WHERE a.account_id = ANY (due) LOOP
            PERFORM ledger_expire_due(acc);
        END LOOP;
    END IF;

    -- A new statement, so a new snapshot: everything committed before the locks were
    -- granted is seen (READ COMMITTED), as in ledger_post().
    FOR r IN
        WITH item AS (
            SELECT i.ord, i.account_id, i.kind, i.category, i.source, i.amount, i.reference,
                   i.description, i.key, i.traceparent,
                   a.account_id IS NOT NULL AS known,
                   a.balance AS start_balance, a.held, a.access AS start_access,
                   a.billing_mode, a.threshold, a.alert_thresholds, a.version AS start_version,
                   a.roll_hour, a.roll_amounts, a.roll_counts,
                   e.seq AS e_seq, e.entry_id AS e_entry_id, e.kind AS e_kind,
                   e.category AS e_category, e.source AS e_source, e.amount AS e_amount,
                   e.balance_after AS e_balance_after, e.reference AS e_reference,
                   e.description AS e_description, e.created_at AS e_created_at,
                   a.account_id IS NOT NULL AND e.seq IS NULL AS posts
            FROM unnest(p_account_ids, p_kinds, p_categories, p_sources, p_amounts,
                        p_references, p_descriptions, p_keys, p_traceparents)
                 WITH ORDINALITY AS i(account_id, kind, category, source, amount, reference,
                                      description, key, traceparent, ord)
            LEFT JOIN accounts a ON a.account_id = i.account_id AND a.account_id = ANY (locked)
            LEFT JOIN entries e ON e.account_id = a.account_id AND e.idempotency_key = i.key
        ),
        -- The account's state after each item, in request order. Items that do not post
        -- (replays, conflicts) move nothing and answer the state they find.
        run AS (
            SELECT item.*,
                   CASE WHEN NOT item.posts THEN 0
                        WHEN item.kind = 'USAGE' THEN -item.amount
                        ELSE item.amount END AS delta,
                   item.start_balance + sum(CASE WHEN NOT item.posts THEN 0
                                                 WHEN item.kind = 'USAGE' THEN -item.amount
                                                 ELSE item.amount END) OVER w AS bal,
                   bool_or(item.posts AND item.kind = 'CREDIT'
                           AND item.source IN ('PURCHASE', 'AUTO_RECHARGE')) OVER w AS purchased,
                   count(*) FILTER (WHERE item.posts) OVER w AS postings
            FROM item
            WINDOW w AS (PARTITION BY item.account_id ORDER BY item.ord
                         ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
        ),
        -- R3-R5, R16: access derived from the available balance, as ledger_move() does.
        state AS (
            SELECT run.*,
                   CASE WHEN run.postings = 0 OR run.billing_mode <> 'PREPAID' THEN run.start_access
                        WHEN run.start_access = 'PENDING_FIRST_PURCHASE' AND NOT run.purchased
                            THEN run.start_access
                        WHEN run.bal - run.held > 0 THEN 'ACTIVE'
                        ELSE 'SUSPENDED' END AS acc_after
            FROM run
        ),
        step AS (
            SELECT state.*, state.bal - state.delta AS bal_before,
                   lag(state.acc_after, 1, state.start_access)
                       OVER (PARTITION BY state.account_id ORDER BY state.ord) AS acc_before
            FROM state
        ),
        ins AS (
            INSERT INTO entries (account_id, kind, category, source, amount, balance_after,
                                 reference, description, idempotency_key)
            SELECT s.account_id, s.kind, s.category, s.source, s.amount, s.bal, s.reference,
                   s.description, s.key
            FROM step s WHERE s.posts
            ORDER BY s.ord   -- seq in request order, as one by one (and so the balance_after chain)
            RETURNING entries.seq, entries.entry_id, entries.account_id,
                      entries.idempotency_key, entries.created_at
        ),
        posted AS (
            SELECT s.*, n.seq AS n_seq, n.entry_id AS n_entry_id, n.created_at AS n_created_at
            FROM step s JOIN ins n ON n.account_id = s.account_id AND n.idempotency_key = s.key
        ),
        -- Per account: its state after its last item, and (R30) this batch's usage per
        -- category, in the order of ledger_categories().
        fin AS (
            SELECT s.account_id,
                   (array_agg(s.bal ORDER BY s.ord DESC))[1] AS bal,
                   (array_agg(s.acc_after ORDER BY s.ord DESC))[1] AS acc_after,
                   max(s.postings) AS postings, min(s.start_balance) AS start_balance,
                   min(s.roll_hour) AS old_hour,
                   ARRAY[coalesce(sum(s.amount) FILTER (WHERE s.posts AND s.category = 'API_REQUESTS'), 0),
                         coalesce(sum(s.amount) FILTER (WHERE s.posts AND s.category = 'DEDICATED_ENDPOINTS'), 0),
                         coalesce(sum(s.amount) FILTER (WHERE s.posts AND s.category = 'FINE_TUNING'), 0),
                         coalesce(sum(s.amount) FILTER (WHERE s.posts AND s.category = 'EVALUATIONS'), 0),
                         coalesce(sum(s.amount) FILTER (WHERE s.posts AND s.category = 'OTHER'), 0)] AS amounts,
                   ARRAY[count(*) FILTER (WHERE s.posts AND s.category = 'API_REQUESTS'),
                         count(*) FILTER (WHERE s.posts AND s.category = 'DEDICATED_ENDPOINTS'),
                         count(*) FILTER (WHERE s.posts AND s.category = 'FINE_TUNING'),
                         count(*) FILTER (WHERE s.posts AND s.category = 'EVALUATIONS'),
                         count(*) FILTER (WHERE s.posts AND s.category = 'OTHER')] AS counts
            FROM step s WHERE s.known
            GROUP BY s.account_id
        ),
        -- R30: a running hour that has ended is moved to usage_rollups (as
        -- ledger_roll_usage() does for one posting); `upd` starts the new one.
        flushed AS (
            INSERT INTO usage_rollups AS r (account_id, hour, category, amount, count)
            SELECT a.account_id, a.roll_hour, k.category, a.roll_amounts[k.i], a.roll_counts[k.i]
            FROM fin f JOIN accounts a ON a.account_id = f.account_id
            CROSS JOIN unnest(ledger_categories()) WITH ORDINALITY AS k(category, i)
            WHERE f.postings > 0 AND f.old_hour IS DISTINCT FROM hour_now AND f.old_hour IS NOT NULL
              AND a.roll_counts[k.i] > 0
            ON CONFLICT (account_id, hour, category) DO UPDATE
            SET amount = r.amount + EXCLUDED.amount, count = r.count + EXCLUDED.count
        ),
        -- R29: the usage is added to pending_draw (drawn from the lots later, in burn order,
        -- by ledger_lots_settle()): no lot is written here. R30: and to the running hour.
        upd AS (
            UPDATE accounts a SET balance = f.bal, access = f.acc_after, updated_at = now(),
                                  version = a.version + f.postings,
                                  pending_draw = a.pending_draw
                                      + CASE WHEN f.start_balance > 0 THEN f.start_balance - f.bal ELSE 0 END,
                                  roll_hour = hour_now,
                                  roll_amounts = CASE WHEN a.roll_hour = hour_now
                                                      THEN vec_add(a.roll_amounts, f.amounts)
                                                      ELSE f.amounts END,
                                  roll_counts = CASE WHEN a.roll_hour = hour_now
                                                     THEN vec_add(a.roll_counts, f.counts)
                                                     ELSE f.counts END
            FROM fin f
            WHERE a.account_id = f.account_id AND f.postings > 0
        ),
        -- R31: every posting is a change of its account (version + 1 each, as posting one
        -- by one would make): the state after each, in one feed row for the batch.
        feed AS (
            INSERT INTO access_changes (account_ids, versions, modes, access, balances, helds)
            SELECT array_agg(s.account_id ORDER BY s.ord),
                   array_agg(s.start_version + s.postings ORDER BY s.ord),
                   array_agg(s.billing_mode ORDER BY s.ord), array_agg(s.acc_after ORDER BY s.ord),
                   array_agg(s.bal ORDER BY s.ord), array_agg(s.held ORDER BY s.ord)
            FROM step s WHERE s.posts HAVING count(*) > 0
        ),
        -- Per posted item, what ledger_move() publishes: the crossing, the alerts highest
        -- first, the access change.
        ev AS (
            SELECT p.account_id, p.ord, p.traceparent, 1 AS rank, 0::bigint AS alert_no,
                   'ledger.balance.threshold_crossed' AS routing_key,
                   jsonb_build_object(
                       'threshold', money_text(p.threshold),
                       'balance_before', money_text(p.bal_before),
                       'balance_after', money_text(p.bal),
                       'available_before', money_text(p.bal_before - p.held),
                       'available_after', money_text(p.bal - p.held),
                       'entry_id', p.n_entry_id) AS data
            FROM posted p
            WHERE p.threshold IS NOT NULL AND p.bal_before - p.held >= p.threshold
              AND p.bal - p.held < p.threshold
            UNION ALL
            SELECT p.account_id, p.ord, p.traceparent, 2, t.n, 'ledger.balance.alert',
                   jsonb_build_object(
                       'threshold', money_text(t.v),
                       'available_before', money_text(p.bal_before - p.held),
                       'available_after', money_text(p.bal - p.held),
                       'entry_id', p.n_entry_id)
            FROM posted p CROSS JOIN LATERAL unnest(p.alert_thresholds) WITH ORDINALITY AS t(v, n)
            WHERE cardinality(p.alert_thresholds) > 0
              AND p.bal_before - p.held >= t.v AND p.bal - p.held < t.v
            UNION ALL
            SELECT p.account_id, p.ord, p.traceparent, 3, 0,
                   CASE WHEN p.acc_after = 'SUSPENDED' THEN 'ledger.account.suspended'
                        WHEN p.acc_before = 'PENDING_FIRST_PURCHASE' THEN 'ledger.account.activated'
                        ELSE 'ledger.account.reactivated' END,
                   jsonb_build_object('balance', money_text(p.bal),
                                      'available_balance', money_text(p.bal - p.held))
            FROM posted p WHERE p.acc_after <> p.acc_before
        ),
        published AS (
            INSERT INTO outbox (event_id, routing_key, payload, traceparent)
            SELECT x.id, x.routing_key, jsonb_build_object(
                       'id', x.id, 'type', x.routing_key, 'occurred_at', now(),
                       'account_id', x.account_id, 'data', x.data, 'schema_version', 1),
                   x.traceparent
            FROM (SELECT uuid_v7() AS id, ev.* FROM ev
                  ORDER BY ev.ord, ev.rank, ev.alert_no OFFSET 0) x
            RETURNING outbox.payload->>'account_id' AS account_id
        ),
        touched AS (SELECT DISTINCT pb.account_id FROM published pb)
        SELECT s.ord, s.account_id,
               CASE WHEN NOT s.known THEN 'not_found'
                    WHEN s.posts THEN 'posted'
                    WHEN s.e_kind = s.kind AND s.e_amount = s.amount
                         AND s.e_category IS NOT DISTINCT FROM s.category
                         AND s.e_source IS NOT DISTINCT FROM s.source
                         AND s.e_reference = s.reference AND s.e_description = s.description
                        THEN 'replayed'
                    ELSE 'conflict' END AS outcome,
               CASE WHEN s.posts THEN p.n_seq ELSE s.e_seq END AS seq,
               CASE WHEN s.posts THEN p.n_entry_id ELSE s.e_entry_id END AS entry_id,
               CASE WHEN s.posts THEN s.kind ELSE s.e_kind END AS kind,
               CASE WHEN s.posts THEN s.category ELSE s.e_category END AS category,
               CASE WHEN s.posts THEN s.source ELSE s.e_source END AS source,
               CASE WHEN s.posts THEN s.amount ELSE s.e_amount END AS amount,
               CASE WHEN s.posts THEN s.bal ELSE s.e_balance_after END AS balance_after,
               CASE WHEN s.posts THEN s.reference ELSE s.e_reference END AS reference,
               CASE WHEN s.posts THEN s.description ELSE s.e_description END AS description,
               CASE WHEN s.posts THEN p.n_created_at ELSE s.e_created_at END AS created_at,
               s.bal AS balance, s.acc_after AS access,
               -- the first item of an account that published an event
               (tc.account_id IS NOT NULL
                AND s.ord = min(s.ord) OVER (PARTITION BY s.account_id)) AS notify
        FROM step s
        LEFT JOIN posted p ON p.ord = s.ord
        LEFT JOIN touched tc ON tc.account_id = s.account_id
        ORDER BY s.ord
    LOOP
        IF r.notify AND NOT outbox_notified THEN
            PERFORM pg_notify('credits_outbox', '');
            outbox_notified := true;
        END IF;
        ord := r.ord; outcome := r.outcome; seq := r.seq; entry_id := r.entry_id;
        kind := r.kind; category := r.category; source := r.source; amount := r.amount;
        balance_after := r.balance_after; reference := r.reference;
        description := r.description; created_at := r.created_at;
        balance := r.balance; access := r.access;
        RETURN NEXT;
    END LOOP;
END $$;

-- Creates a hold (R15) under the account's lock. Outcome is one of:
--   'created'      the hold is ACTIVE; held and access changed with it
--   'replayed'     the key was used before with the same request; that hold
--   'conflict'     the key was used before with a different request; nothing changed
--   'insufficient' a prepaid account without access or available < amount; nothing changed
--   'not_found'    no such account; nothing changed
DROP FUNCTION IF EXISTS ledger_hold_create(text, numeric, text, text, text, integer);
CREATE OR REPLACE FUNCTION ledger_hold_create(
    p_account_id text, p_amount numeric, p_category text, p_description text, p_key text,
    p_ttl_seconds integer, p_traceparent text DEFAULT NULL)
RETURNS TABLE (outcome text, hold_id uuid)
LANGUAGE plpgsql AS $$
DECLARE
    acc accounts%ROWTYPE;
    h holds%ROWTYPE;
BEGIN
    PERFORM set_config('credits.traceparent', coalesce(p_traceparent, ''), true);
    SELECT * INTO acc FROM accounts a WHERE a.account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;
    IF acc.next_expiry <= now() THEN
        acc := ledger_expire_due(acc);
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
DROP FUNCTION IF EXISTS ledger_hold_end(text, uuid, text, numeric, text);
CREATE OR REPLACE FUNCTION ledger_hold_end(
    p_account_id text, p_hold_id uuid, p_action text, p_amount numeric, p_description text,
    p_traceparent text DEFAULT NULL)
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
    PERFORM set_config('credits.traceparent', coalesce(p_traceparent, ''), true);
    SELECT * INTO acc FROM accounts a WHERE a.account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;
    IF acc.next_expiry <= now() THEN
        acc := ledger_expire_due(acc);
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
        PERFORM ledger_roll_usage(p_account_id, h.category, p_amount);
        -- R29: a capture draws lots as usage does (through pending_draw).
        IF acc.balance > 0 THEN
            UPDATE accounts a SET pending_draw = a.pending_draw + p_amount
            WHERE a.account_id = p_account_id;
        END IF;
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

-- R29/R30 after an upgrade, run by every ledger at start-up (cheap when nothing is due):
-- once the functions above are in place, and only then, it (1) waits out every posting
-- that began before them (the lock: each posting locks its account's row before it writes),
-- whose text is the one it started with — for a posting queued behind the application of a
-- new version, or made by a release-2 replica after the migration made the opening lots,
-- the previous text, which may know nothing of lots or rollups; (2) the first time, fills
-- the rollups from the whole journal (the running hours cleared: rebuilt, never added
-- twice); (3) repairs any account whose lots do not add up to its balance: what such a
-- posting left (a credit without its lot, usage not drawn) becomes a lot or pending
-- usage. Amounts are exact; the class of repaired credits is the one approximation.
-- Returns how many accounts it repaired. On a large journal the first fill holds postings
-- for as long as it reads (docs/operations.md).
CREATE OR REPLACE FUNCTION ledger_after_upgrade() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    u ledger_upgrade%ROWTYPE;
    r record;
    now_held numeric;
    n integer := 0;
BEGIN
    SELECT * INTO u FROM ledger_upgrade;
    IF NOT u.repair_due THEN
        RETURN 0;
    END IF;
    LOCK TABLE accounts, entries IN EXCLUSIVE MODE;
    SELECT * INTO u FROM ledger_upgrade FOR UPDATE;
    IF NOT u.repair_due THEN
        RETURN 0;  -- another replica did it while this one waited for the lock
    END IF;
    IF NOT u.filled THEN
        DELETE FROM usage_rollups;
        UPDATE accounts a SET roll_hour = NULL, roll_amounts = NULL, roll_counts = NULL
        WHERE a.roll_hour IS NOT NULL;
        INSERT INTO usage_rollups (account_id, hour, category, amount, count)
        SELECT e.account_id, date_trunc('hour', e.created_at, 'UTC'), e.category, sum(e.amount), count(*)
        FROM entries e
        WHERE e.kind = 'USAGE'
        GROUP BY 1, 2, 3;
    END IF;
    FOR r IN SELECT a.account_id, greatest(a.balance, 0) AS want, a.pending_draw,
                    coalesce((SELECT sum(x.remaining) FROM lots x
                              WHERE x.account_id = a.account_id AND x.remaining > 0), 0) AS lots_sum
             FROM accounts a LOOP
        now_held := greatest(r.lots_sum - r.pending_draw, 0);
        CONTINUE WHEN now_held = r.want;
        n := n + 1;
        IF r.want > now_held THEN
            PERFORM ledger_lots_settle(r.account_id, r.pending_draw);
            INSERT INTO lots (lot_id, account_id, entry_seq, source, amount, remaining, reason)
            VALUES (uuid_v7(), r.account_id, NULL, 'PURCHASE', r.want - now_held, r.want - now_held,
                    'Credits posted during an upgrade');
        ELSE
            UPDATE accounts a SET pending_draw = a.pending_draw + (now_held - r.want)
            WHERE a.account_id = r.account_id;
        END IF;
    END LOOP;
    UPDATE ledger_upgrade SET filled = true, repair_due = false;
    RETURN n;
END $$;

-- Every application of this file asks for ledger_after_upgrade() (it runs in the same
-- transaction as the new functions).
UPDATE ledger_upgrade SET repair_due = true;

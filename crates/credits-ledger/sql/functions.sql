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

-- R29: a CREDIT entry makes a lot of credits. What it holds is what the credit left above
-- zero: a credit that arrives while the balance is negative first pays that debt, so every
-- account keeps sum(remaining) = greatest(balance, 0). `p_expires_at` (a grant's, or a
-- purchase's under PURCHASED_CREDITS_EXPIRE_DAYS) enters the account's next_expiry.
CREATE OR REPLACE FUNCTION ledger_lot_add(e entries, p_expires_at timestamptz, p_priority integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    held_by_lot numeric := greatest(0, least(e.amount, e.balance_after));
BEGIN
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
-- the account's lock. ledger_post_batch() draws usage with the same order, inline.
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
-- of replicas may sweep at once: each lot expires once). Returns how many lots expired.
CREATE OR REPLACE FUNCTION ledger_expire_account(p_account_id text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    acc accounts%ROWTYPE;
    n integer;
BEGIN
    SELECT * INTO acc FROM accounts a WHERE a.account_id = p_account_id FOR UPDATE;
    IF NOT FOUND OR acc.next_expiry IS NULL OR acc.next_expiry > now() THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO n FROM lots x
    WHERE x.account_id = p_account_id AND x.remaining > 0 AND x.expires_at <= now();
    PERFORM ledger_expire_due(acc);
    RETURN n;
END $$;

-- R30: usage per (account, UTC hour, category), added to by every statement that appends
-- USAGE entries, in its transaction (the trigger below): the rollups move with the journal
-- or not at all, whatever path posted the usage (a posting, a batch, a capture).
CREATE OR REPLACE FUNCTION usage_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_rollups AS r (account_id, hour, category, amount, count)
    SELECT n.account_id, date_trunc('hour', n.created_at, 'UTC'), n.category, sum(n.amount), count(*)
    FROM new_entries n
    WHERE n.kind = 'USAGE'
    GROUP BY 1, 2, 3
    ON CONFLICT (account_id, hour, category) DO UPDATE
    SET amount = r.amount + EXCLUDED.amount, count = r.count + EXCLUDED.count;
    RETURN NULL;
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
                           AND l.priority = p_priority)) THEN
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
    -- R29: a credit is a lot; a debit draws lots in burn order (none hold anything while
    -- the balance is not positive).
    IF p_kind = 'CREDIT' THEN
        PERFORM ledger_lot_add(e, p_expires_at, p_priority);
    ELSIF acc.balance > 0 THEN
        PERFORM ledger_lots_draw(p_account_id, p_amount, p_kind = 'USAGE');
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
BEGIN
    SELECT * INTO acc FROM accounts a WHERE a.account_id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT * FROM ledger_post(p_account_id, p_kind, NULL, NULL, p_amount,
                                               p_reference, p_description, p_key, p_traceparent);
        RETURN;
    END IF;
    -- R29: the look at the available balance comes after what is due has expired.
    IF acc.next_expiry <= now() THEN
        acc := ledger_expire_due(acc);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM entries x
                       WHERE x.account_id = p_account_id AND x.idempotency_key = p_key)
       AND acc.balance - acc.held < p_amount THEN
        outcome := 'insufficient';
        amount := acc.balance - acc.held;
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
AS $$
#variable_conflict use_column
DECLARE
    r record;
    outbox_notified boolean := false;
    locked text[];
    due text[];
    acc accounts%ROWTYPE;
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
                   a.billing_mode, a.threshold, a.alert_thresholds,
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
        -- R29: each account's usage in this batch drawn from its lots in burn order, as
        -- ledger_lots_draw() does (only usage reaches this statement).
        drawn AS (
            UPDATE lots l SET remaining = l.remaining - d.take
            FROM (SELECT x.lot_id,
                         least(x.remaining,
                               greatest(0, u.total - (sum(x.remaining) OVER w - x.remaining))) AS take
                  FROM (SELECT s.account_id, sum(s.amount) AS total FROM step s
                        WHERE s.posts AND s.start_balance > 0 GROUP BY s.account_id) u
                  JOIN lots x ON x.account_id = u.account_id AND x.remaining > 0
                  WINDOW w AS (PARTITION BY x.account_id
                               ORDER BY x.source <> 'GRANT', x.expires_at NULLS LAST, x.priority, x.seq
                               ROWS UNBOUNDED PRECEDING)) d
            WHERE l.lot_id = d.lot_id AND d.take > 0
        ),
        upd AS (
            UPDATE accounts a SET balance = f.bal, access = f.acc_after, updated_at = now()
            FROM (SELECT DISTINCT ON (s.account_id) s.account_id, s.bal, s.acc_after, s.postings
                  FROM step s WHERE s.known
                  ORDER BY s.account_id, s.ord DESC) f
            WHERE a.account_id = f.account_id AND f.postings > 0
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
               -- the first item of an account that published: its replicas' views drop it
               (tc.account_id IS NOT NULL
                AND s.ord = min(s.ord) OVER (PARTITION BY s.account_id)) AS notify
        FROM step s
        LEFT JOIN posted p ON p.ord = s.ord
        LEFT JOIN touched tc ON tc.account_id = s.account_id
        ORDER BY s.ord
    LOOP
        IF r.notify THEN
            -- As ledger_move(): every replica's access view drops the account on commit.
            PERFORM pg_notify('credits_access', r.account_id);
            IF NOT outbox_notified THEN
                PERFORM pg_notify('credits_outbox', '');
                outbox_notified := true;
            END IF;
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
        -- R29: a capture draws lots in the order usage does.
        IF acc.balance > 0 THEN
            PERFORM ledger_lots_draw(p_account_id, p_amount, true);
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

-- R29/R30 for a journal written before credit lots and rollups (release 3), and the trigger
-- that keeps the rollups, applied with the functions above in one transaction. The locks
-- wait for every posting in flight (each locks its account's row before it writes) and
-- hold new ones until the functions that keep lots and rollups are in place: no posting
-- falls between. Each fill happens once (the first time its table is found empty).
LOCK TABLE accounts, entries IN EXCLUSIVE MODE;
CREATE OR REPLACE TRIGGER entries_usage_rollup AFTER INSERT ON entries
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup();
-- The balance an account held before lots existed is one opening lot of purchased credits
-- without expiry (so sum(remaining) = greatest(balance, 0) from here on).
INSERT INTO lots (lot_id, account_id, entry_seq, source, amount, remaining, reason)
SELECT uuid_v7(), a.account_id, NULL, 'PURCHASE', a.balance, a.balance, 'Balance before credit lots'
FROM accounts a
WHERE a.balance > 0 AND NOT EXISTS (SELECT 1 FROM lots);
INSERT INTO usage_rollups (account_id, hour, category, amount, count)
SELECT e.account_id, date_trunc('hour', e.created_at, 'UTC'), e.category, sum(e.amount), count(*)
FROM entries e
WHERE e.kind = 'USAGE' AND NOT EXISTS (SELECT 1 FROM usage_rollups)
GROUP BY 1, 2, 3;

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
DROP FUNCTION IF EXISTS ledger_post(text, text, text, text, numeric, text, text, text);
CREATE OR REPLACE FUNCTION ledger_post(
    p_account_id text, p_kind text, p_category text, p_source text, p_amount numeric,
    p_reference text, p_description text, p_key text, p_traceparent text DEFAULT NULL)
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
    IF FOUND
       AND NOT EXISTS (SELECT 1 FROM entries x
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
-- A batch with two items on one (account, key) is posted by ledger_post() per item instead:
-- an item must see the entry its twin appends, which a set-based statement cannot.
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
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(p_account_ids, p_keys) AS t(account_id, key)
               GROUP BY t.account_id, t.key HAVING count(*) > 1) THEN
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
    SELECT coalesce(array_agg(l.account_id), '{}') INTO locked
    FROM (SELECT a.account_id FROM accounts a WHERE a.account_id = ANY (p_account_ids)
          ORDER BY a.account_id COLLATE "C" FOR UPDATE) l;

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

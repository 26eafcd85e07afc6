-- Auto-recharge: settings, attempts, consumed-event de-duplication, the outbox.
--
-- Invariants enforced here:
-- * at most one attempt in flight (PENDING or CHARGING) per account: partial unique index;
-- * an event is processed once: processed_events is keyed by event id and written in the
--   transaction that acts on the event;
-- * R6 holds for every stored setting (CHECKs below; the minimum purchase is checked by
--   the service because it is configuration).

CREATE TABLE settings (
    account_id           text PRIMARY KEY,
    enabled              boolean NOT NULL,
    threshold            numeric NOT NULL CHECK (threshold >= 0),
    target               numeric NOT NULL,
    disabled_reason      text NOT NULL DEFAULT 'NONE' CHECK (disabled_reason IN
        ('NONE', 'USER', 'DEFAULT_PAYMENT_METHOD_NOT_CARD', 'NO_DEFAULT_PAYMENT_METHOD', 'REPEATED_FAILURES')),
    consecutive_failures integer NOT NULL DEFAULT 0,
    -- After a failed top-up, when to look at the balance again.
    retry_at             timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (threshold < target),
    CHECK (NOT enabled OR disabled_reason = 'NONE')
);

CREATE TABLE attempts (
    seq                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    attempt_id         text NOT NULL UNIQUE,
    account_id         text NOT NULL REFERENCES settings (account_id),
    trigger            text NOT NULL,
    trigger_event_id   text,
    balance_at_trigger numeric NOT NULL,
    amount             numeric NOT NULL CHECK (amount > 0 AND scale(amount) <= 2),
    status             text NOT NULL CHECK (status IN ('PENDING', 'CHARGING', 'SUCCEEDED', 'FAILED')),
    payment_method_id  text,
    charge_id          text,
    failure_code       text NOT NULL DEFAULT '',
    retries            integer NOT NULL DEFAULT 0,
    -- A worker owns an in-flight attempt until then; after it, any worker may resume it.
    lease_until        timestamptz NOT NULL DEFAULT now(),
    created_at         timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz
);
CREATE UNIQUE INDEX attempts_one_in_flight ON attempts (account_id) WHERE status IN ('PENDING', 'CHARGING');
CREATE INDEX attempts_account_seq ON attempts (account_id, seq DESC);
CREATE INDEX attempts_in_flight ON attempts (lease_until) WHERE status IN ('PENDING', 'CHARGING');

CREATE TABLE processed_events (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE outbox (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid NOT NULL,
    routing_key text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

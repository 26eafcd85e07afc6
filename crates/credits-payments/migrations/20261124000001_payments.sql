-- Payments: payment methods, charges, the sandbox processor's own records, the outbox.
--
-- Invariants enforced here:
-- * at most one default payment method per account (partial unique index);
-- * (account_id, idempotency_key) is unique on charges: one charge per key (R12);
-- * a charge is written (status PROCESSING) before the processor is called, with the charge
--   id as the processor's idempotency key, so a crash anywhere is resumed without a second
--   charge;
-- * only token, brand, last 4 and expiry of a card are stored (R14): there is no column
--   that could hold a full number or a CVC.

CREATE TABLE payment_methods (
    payment_method_id text PRIMARY KEY,
    account_id        text NOT NULL,
    type              text NOT NULL CHECK (type IN ('CARD', 'US_BANK_ACCOUNT')),
    processor_token   text NOT NULL,
    brand             text NOT NULL DEFAULT '',
    last4             text NOT NULL CHECK (last4 ~ '^[0-9]{4}$'),
    exp_month         integer CHECK (exp_month BETWEEN 1 AND 12),
    exp_year          integer,
    is_default        boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    removed_at        timestamptz,
    CHECK (NOT (is_default AND removed_at IS NOT NULL))
);
CREATE INDEX payment_methods_account ON payment_methods (account_id, created_at);
CREATE UNIQUE INDEX payment_methods_one_default ON payment_methods (account_id) WHERE is_default;

CREATE TABLE charges (
    seq                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    charge_id            text NOT NULL UNIQUE,
    account_id           text NOT NULL,
    purpose              text NOT NULL CHECK (purpose IN ('CHARGE', 'PURCHASE')),
    payment_method_id    text NOT NULL REFERENCES payment_methods (payment_method_id),
    payment_method_type  text NOT NULL CHECK (payment_method_type IN ('CARD', 'US_BANK_ACCOUNT')),
    -- What the client asked for (empty = default), to tell a replay from a different request.
    requested_method_id  text NOT NULL,
    amount               numeric NOT NULL CHECK (amount > 0 AND scale(amount) <= 2),
    description          text NOT NULL DEFAULT '',
    idempotency_key      text NOT NULL,
    -- PROCESSING: recorded, processor outcome not known yet (in flight, crashed, or a
    -- transient processor error): resumed with the same processor idempotency key.
    status               text NOT NULL CHECK (status IN ('PROCESSING', 'PENDING', 'SUCCEEDED', 'FAILED')),
    failure_code         text NOT NULL DEFAULT '',
    processor_charge_id  text,
    processor_attempts   integer NOT NULL DEFAULT 0,
    -- Purchases only: the ledger entry that credited this charge, once credited.
    ledger_entry_id      text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    completed_at         timestamptz,
    UNIQUE (account_id, idempotency_key)
);
CREATE INDEX charges_account_seq ON charges (account_id, seq DESC);
-- The recovery loop's work: unfinished charges and purchases not yet credited.
CREATE INDEX charges_unfinished ON charges (seq)
    WHERE status IN ('PROCESSING', 'PENDING')
       OR (purpose = 'PURCHASE' AND status = 'SUCCEEDED' AND ledger_entry_id IS NULL);

-- The sandbox processor's durable records. Conceptually a separate system: the payments
-- code only reaches it through the PaymentProcessor trait.
CREATE TABLE sandbox_instruments (
    token      text PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('CARD', 'US_BANK_ACCOUNT')),
    behaviour  text NOT NULL,
    brand      text NOT NULL,
    last4      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sandbox_charges (
    processor_charge_id text PRIMARY KEY,
    idempotency_key     text NOT NULL UNIQUE,
    token               text NOT NULL REFERENCES sandbox_instruments (token),
    amount              numeric NOT NULL,
    status              text NOT NULL CHECK (status IN ('PENDING', 'SUCCEEDED', 'FAILED')),
    failure_code        text NOT NULL DEFAULT '',
    settle_at           timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- Transient failures the sandbox has served per idempotency key (processing_error card).
CREATE TABLE sandbox_transient_failures (
    idempotency_key text PRIMARY KEY,
    failures        integer NOT NULL
);

CREATE TABLE outbox (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid NOT NULL,
    routing_key text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

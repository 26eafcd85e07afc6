-- Release 3: a real processor (R23-R27).
--
-- Invariants enforced here:
-- * one processor customer per account (primary key), created once;
-- * a charge the bank wants confirmed on-session is REQUIRES_ACTION (read as FAILED with
--   authentication_required on the wire) and may still become SUCCEEDED, once;
-- * charges.refunded_amount = sum of the charge's refunds that are not FAILED, and never
--   more than the charge (changed only under the charge's row lock, with the refund row);
-- * one refund per (account, idempotency key) and per processor refund id; one dispute
--   row per processor dispute; one row per processor event id (acted on once).

ALTER TABLE charges DROP CONSTRAINT charges_status_check;
ALTER TABLE charges ADD CONSTRAINT charges_status_valid
    CHECK (status IN ('PROCESSING', 'PENDING', 'REQUIRES_ACTION', 'SUCCEEDED', 'FAILED')) NOT VALID;
-- TOPUP: an auto-recharge charge; credited by recharge under the charge's own key, or by
-- payments the same way after an on-session confirmation.
ALTER TABLE charges DROP CONSTRAINT charges_purpose_check;
ALTER TABLE charges ADD CONSTRAINT charges_purpose_valid
    CHECK (purpose IN ('CHARGE', 'PURCHASE', 'TOPUP')) NOT VALID;
ALTER TABLE charges ADD COLUMN refunded_amount numeric NOT NULL DEFAULT 0;
ALTER TABLE charges ADD COLUMN disputed_amount numeric NOT NULL DEFAULT 0;
ALTER TABLE charges ADD CONSTRAINT charges_refunds_within_amount
    CHECK (refunded_amount >= 0 AND refunded_amount <= amount AND disputed_amount >= 0) NOT VALID;
-- R25: what Stripe.js needs to confirm on-session, kept while the confirmation is open.
ALTER TABLE charges ADD COLUMN action_client_secret text;
ALTER TABLE charges ADD COLUMN action_required_at timestamptz;
CREATE INDEX charges_processor_charge ON charges (processor_charge_id)
    WHERE processor_charge_id IS NOT NULL;
DROP INDEX charges_unfinished;
CREATE INDEX charges_unfinished ON charges (seq)
    WHERE status IN ('PROCESSING', 'PENDING')
       OR (status = 'SUCCEEDED' AND ledger_entry_id IS NULL
           AND (purpose = 'PURCHASE' OR (purpose = 'TOPUP' AND action_required_at IS NOT NULL)));

CREATE TABLE processor_customers (
    account_id  text PRIMARY KEY,
    customer_id text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE refunds (
    seq                 bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    refund_id           text PRIMARY KEY,
    account_id          text NOT NULL,
    charge_id           text NOT NULL REFERENCES charges (charge_id),
    amount              numeric NOT NULL CHECK (amount > 0 AND scale(amount) <= 2),
    reason              text NOT NULL DEFAULT '',
    -- NULL for a refund made outside our API (the processor's dashboard).
    idempotency_key     text,
    -- PROCESSING: the ledger debit may be posted, the processor's answer is not known.
    status              text NOT NULL CHECK (status IN ('PROCESSING', 'SUCCEEDED', 'FAILED')),
    failure_code        text NOT NULL DEFAULT '',
    processor_refund_id text UNIQUE,
    ledger_entry_id     text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, idempotency_key)
);
CREATE INDEX refunds_charge ON refunds (charge_id);
CREATE INDEX refunds_unfinished ON refunds (updated_at) WHERE status = 'PROCESSING';

CREATE TABLE disputes (
    dispute_id      text PRIMARY KEY,
    account_id      text NOT NULL,
    charge_id       text NOT NULL REFERENCES charges (charge_id),
    amount          numeric NOT NULL CHECK (amount > 0 AND scale(amount) <= 2),
    status          text NOT NULL,
    debit_entry_id  text,
    credit_entry_id text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- R26: every processor event, recorded by id before it is acknowledged; processed_at once
-- its effects are done (the recovery loop finishes what a crash or an outage left).
CREATE TABLE processor_events (
    event_id     text PRIMARY KEY,
    type         text NOT NULL,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    -- When the recovery loop may act on it (again): after the inline try's chance, then
    -- backing off exponentially (capped at an hour) while it keeps failing.
    next_attempt_at timestamptz NOT NULL DEFAULT now() + interval '10 seconds',
    processed_at timestamptz
);
CREATE INDEX processor_events_pending ON processor_events (next_attempt_at) WHERE processed_at IS NULL;

-- The sandbox's refunds (a stand-in for the processor's own records).
CREATE TABLE sandbox_refunds (
    processor_refund_id text PRIMARY KEY DEFAULT 're_sandbox_' || replace(gen_random_uuid()::text, '-', ''),
    refund_key          text NOT NULL UNIQUE,
    processor_charge_id text NOT NULL REFERENCES sandbox_charges (processor_charge_id),
    amount              numeric NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- Top-ups charged before TOPUP existed were recorded as plain charges: they bought credits
-- (recharge keys them `recharge:<attempt>`), so they are refundable like any top-up.
UPDATE charges SET purpose = 'TOPUP' WHERE purpose = 'CHARGE' AND idempotency_key LIKE 'recharge:%';

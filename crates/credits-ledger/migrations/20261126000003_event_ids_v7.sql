-- Event ids are UUID v7 here too, as in every Rust publisher (`Uuid::now_v7`): time-ordered
-- ids sort and index like the events' order, and a consumer sees one kind of id whoever
-- published. PostgreSQL 15 has no v7 generator, so uuid_v7() builds one (RFC 9562): the
-- 48-bit Unix time in milliseconds, then gen_random_uuid()'s random bits with the version
-- nibble turned from 4 (0100) into 7 (0111); the variant bits (10) are already v4's.
-- clock_timestamp(), not now(): events of one transaction get increasing times.
CREATE FUNCTION uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- The envelope of credits_common::events::Envelope (SPEC §3), with the contract's
-- schema_version (credits_common::events::SCHEMA_VERSION); otherwise as before.
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

-- The W3C trace context an event was written in (`traceparent`), sent on by the relay as
-- the AMQP header of the same name, so a consumer continues the producer's trace. Null for
-- events written outside a trace (sweeps, and every event written before this column).
ALTER TABLE outbox ADD COLUMN traceparent text;

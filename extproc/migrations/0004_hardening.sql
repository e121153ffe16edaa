-- Hardening: records that say why they need a second look, Anthropic's one-hour cache writes,
-- and a dead-letter table for rows Postgres refused (one bad row must not block the rest).
ALTER TABLE usage_events
    ADD COLUMN cache_write_1h_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN flags text[] NOT NULL DEFAULT '{}';
CREATE INDEX usage_events_flagged ON usage_events USING gin (flags);

CREATE TABLE usage_dead_letters (
    id         bigserial PRIMARY KEY,
    ts         timestamptz NOT NULL DEFAULT now(),
    request_id text,
    reason     text NOT NULL,
    record     jsonb NOT NULL
);

-- Spendgate schema v1: credentials, wrapped keys, usage events, audit log.

CREATE TABLE provider_credentials (
    id            uuid PRIMARY KEY,
    provider      text NOT NULL CHECK (provider IN ('openai', 'anthropic', 'gemini')),
    name          text NOT NULL UNIQUE,
    base_url      text NOT NULL,
    ciphertext    bytea NOT NULL,
    nonce         bytea NOT NULL,
    master_key_id text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

CREATE TABLE api_keys (
    id            uuid PRIMARY KEY,
    prefix        text NOT NULL,
    secret_hash   bytea NOT NULL UNIQUE,
    name          text NOT NULL,
    team          text,
    project       text,
    credential_id uuid NOT NULL REFERENCES provider_credentials (id),
    policy        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX api_keys_live ON api_keys (credential_id) WHERE revoked_at IS NULL;

-- Partitioned by month so that retention is a DROP of an old partition. The primary key
-- includes ts (a partitioning requirement); request ids are unique per request and the writer
-- replays with the original ts, so ON CONFLICT makes replays idempotent.
CREATE TABLE usage_events (
    request_id          text NOT NULL,
    ts                  timestamptz NOT NULL,
    key_id              uuid,
    team                text,
    project             text,
    provider            text NOT NULL,
    api                 text NOT NULL,
    model_requested     text,
    model_used          text,
    upstream            text,
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    cache_write_tokens  bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    reasoning_tokens    bigint NOT NULL DEFAULT 0,
    cost_usd            numeric(30, 18),  -- exact: per-token prices run to 12 decimal places
    price_version       text,
    latency_ms          integer,
    ttft_ms             integer,
    status              integer NOT NULL,
    outcome             text NOT NULL,
    stream              boolean NOT NULL DEFAULT false,
    cache_hit           boolean NOT NULL DEFAULT false,
    estimated           boolean NOT NULL DEFAULT false,
    tags                jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (request_id, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;
CREATE INDEX usage_events_key_ts ON usage_events (key_id, ts);
CREATE INDEX usage_events_team_ts ON usage_events (team, ts);
CREATE INDEX usage_events_model_ts ON usage_events (model_used, ts);
CREATE INDEX usage_events_ts_brin ON usage_events USING brin (ts);

CREATE TABLE audit_log (
    id       bigserial PRIMARY KEY,
    ts       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,
    action   text NOT NULL,
    target   text,
    details  jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- Append-only: administrative history may be read, never rewritten.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

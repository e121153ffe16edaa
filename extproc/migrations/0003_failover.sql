-- Failover: a credential may name the credential its requests fall back to (same provider
-- protocol) when its upstream refuses connections, answers 5xx or 429.
ALTER TABLE provider_credentials ADD COLUMN fallback_id uuid REFERENCES provider_credentials (id);

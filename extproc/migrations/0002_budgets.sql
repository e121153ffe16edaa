-- Budget counters shared by every extproc replica. A request reserves its worst-case cost on
-- each counter that covers it with one conditional UPDATE (the row lock serialises replicas),
-- and settles to its real cost when it ends.

CREATE TABLE budget_counters (
    budget_key   text PRIMARY KEY,          -- policy / period / scope / period start
    policy       text NOT NULL,
    scope        text NOT NULL,             -- key:<id>, team:<name>, project:<name> or global
    period       text NOT NULL CHECK (period IN ('day', 'week', 'month')),
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    limit_usd    numeric(30, 18) NOT NULL,
    spent_usd    numeric(30, 18) NOT NULL DEFAULT 0,
    reserved_usd numeric(30, 18) NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX budget_counters_period_end ON budget_counters (period_end);

-- Open reservations, so that a replica that dies mid-request does not hold budget forever:
-- any replica releases reservations past their expiry.
CREATE TABLE budget_reservations (
    request_id text NOT NULL,
    budget_key text NOT NULL REFERENCES budget_counters (budget_key) ON DELETE CASCADE,
    amount     numeric(30, 18) NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (request_id, budget_key)
);
CREATE INDEX budget_reservations_expiry ON budget_reservations (expires_at);

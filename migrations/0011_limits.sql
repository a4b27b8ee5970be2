-- Rate limits enforced across every worker: the start times of a limited scope's jobs in the
-- last period (a sliding log). A claim of a limited job, under the scope's advisory lock,
-- counts the starts in the window and records its own in the same transaction as the claim,
-- with the very timestamp it writes as the job's started_at, so no window of the period holds more
-- starts than the limit. Rows older than the period are deleted by the next claim.
CREATE TABLE IF NOT EXISTS apiary_rate_starts (
    scope      text        NOT NULL,
    started_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS apiary_rate_starts_scope ON apiary_rate_starts (scope, started_at);

-- When the next held job of a limited scope is told to come back, so held jobs return spread
-- out at the limit's pace instead of all at once.
CREATE TABLE IF NOT EXISTS apiary_limit_slots (
    scope     text        PRIMARY KEY,
    next_slot timestamptz NOT NULL
);

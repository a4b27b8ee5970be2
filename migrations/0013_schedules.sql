-- Periodic jobs (schedules). A schedule belongs to a deployment (`prefix`, the value of
-- APIARY_QUEUE that made it), so deployments sharing a database never fire each other's.
-- Every worker of the deployment fires due schedules: it locks a due row FOR UPDATE SKIP
-- LOCKED, records the jobs of its due slots (each with the dedup key
-- `schedule:<name>:<slot>`, so a slot is one job however many workers compute it) and
-- advances `cursor` in the same transaction.
--
-- `cursor`: every slot at or before it has been dealt with (enqueued, or skipped by the
-- missed policy). `next_at`: the first slot after `cursor`, NULL when the expression never
-- fires again; a schedule is due when `next_at <= now()`.
--
-- This table is not on a job's path: it is written once per fired slot, never per job.
CREATE TABLE IF NOT EXISTS apiary_schedules (
    prefix       text        NOT NULL CHECK (octet_length(prefix) <= 200),
    name         text        NOT NULL CHECK (name ~ '^[a-z0-9_.-]{1,64}$'),
    cron         text        NOT NULL CHECK (octet_length(cron) <= 256),
    timezone     text        NOT NULL DEFAULT 'UTC' CHECK (octet_length(timezone) <= 64),
    kind         text        NOT NULL CHECK (kind ~ '^[a-z0-9_.-]{1,64}$'),
    payload      jsonb       NOT NULL DEFAULT 'null',
    queue        text        CHECK (queue ~ '^[a-z0-9_.-]{1,64}$'),
    max_attempts integer     CHECK (max_attempts BETWEEN 1 AND 1000),
    priority     smallint    CHECK (priority BETWEEN 0 AND 9),
    missed       text        NOT NULL DEFAULT 'one' CHECK (missed IN ('skip', 'one', 'all')),
    paused       boolean     NOT NULL DEFAULT false,
    cursor       timestamptz NOT NULL,
    next_at      timestamptz,
    source       text        NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'file')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (prefix, name)
);

-- The due schedules of a deployment, read by every worker about four times a second.
CREATE INDEX IF NOT EXISTS apiary_schedules_due ON apiary_schedules (prefix, next_at)
    WHERE NOT paused AND next_at IS NOT NULL;

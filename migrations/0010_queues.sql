-- Named queues, priorities and concurrency keys.
--
-- A job belongs to a queue (`default` unless its producer or its kind says otherwise) of a
-- deployment (`prefix`: the value of APIARY_QUEUE where it was recorded). Every path that
-- publishes a job again (relay, rescue, retry, delay hop, dead letter, replay) derives the
-- broker queue from these two columns, never from the worker that happens to handle it, so
-- deployments that share a database never send each other's jobs. `prefix` is NULL on rows
-- recorded before this migration: they belong to the deployment that reads them, as before.
--
-- None of the new columns changes after insert and only `queue` and `concurrency_key` are indexed, so
-- claims and finishes stay HOT updates.
ALTER TABLE apiary_jobs
    ADD COLUMN IF NOT EXISTS queue text NOT NULL DEFAULT 'default'
        CHECK (queue ~ '^[a-z0-9_.-]{1,64}$'),
    ADD COLUMN IF NOT EXISTS prefix text CHECK (octet_length(prefix) <= 200),
    ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    ADD COLUMN IF NOT EXISTS concurrency_key text CHECK (octet_length(concurrency_key) <= 256);

-- Listing and counting by queue (GET /v1/jobs?queue=, GET /v1/queues).
CREATE INDEX IF NOT EXISTS apiary_jobs_queue_created ON apiary_jobs (queue, created_at DESC, id DESC);

-- The running jobs of a concurrency key, counted when one of its jobs is claimed. The
-- predicate names only `concurrency_key`, which never changes, so it costs no HOT update.
CREATE INDEX IF NOT EXISTS apiary_jobs_concurrency_key ON apiary_jobs (concurrency_key, kind)
    WHERE concurrency_key IS NOT NULL;

-- Queue state an operator sets: a paused queue starts nothing until resumed. Keyed by the
-- deployment and the queue, as the broker queues are.
CREATE TABLE IF NOT EXISTS apiary_queues (
    prefix     text        NOT NULL,
    name       text        NOT NULL CHECK (name ~ '^[a-z0-9_.-]{1,64}$'),
    paused     boolean     NOT NULL DEFAULT false,
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (prefix, name)
);

-- The queues each live worker consumes, with their concurrency: `{"default": 64, ...}`.
ALTER TABLE apiary_workers ADD COLUMN IF NOT EXISTS queues jsonb;

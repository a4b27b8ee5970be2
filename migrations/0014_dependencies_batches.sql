-- Job dependencies and batches with a callback.
--
-- A job with `depends_on` is recorded `waiting` with `deps_left`, the number of its parents
-- not yet succeeded, and one row per parent in apiary_job_deps. A parent that gains a dependent
-- is marked `has_dependents`; only such rows fire the release trigger (its WHEN reads the
-- column, so a plain job's finish calls no function at all). When a parent succeeds, the
-- trigger counts it off each waiting child in the same transaction, and a child whose count
-- reaches 0 becomes `queued` with its outbox row; when a parent ends any other final way, its
-- waiting children end `cancelled` naming it, which fires the trigger again for theirs.
--
-- A batch's children carry `batch_id`; when one reaches a final status, a trigger (WHEN
-- batch_id IS NOT NULL) counts it on the batch row, and the last one enqueues the callback job,
-- once: the batch row's lock and its `finished_at` guard decide who is last.
--
-- None of the new columns is indexed except `batch_id` (which never changes), so claims and
-- finishes stay HOT updates.

ALTER TABLE apiary_jobs DROP CONSTRAINT IF EXISTS apiary_jobs_status_check;
ALTER TABLE apiary_jobs ADD CONSTRAINT apiary_jobs_status_check CHECK (status IN
    ('waiting', 'queued', 'running', 'retrying', 'succeeded', 'failed', 'dead', 'duplicate', 'cancelled'));

ALTER TABLE apiary_jobs
    ADD COLUMN IF NOT EXISTS has_dependents boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS deps_left integer CHECK (deps_left >= 0),
    ADD COLUMN IF NOT EXISTS batch_id uuid;

-- Safe to apply again (as every newest migration must be): each step drops or replaces first.
ALTER TABLE apiary_jobs DROP CONSTRAINT IF EXISTS waiting_has_parents;
ALTER TABLE apiary_jobs ADD CONSTRAINT waiting_has_parents
    CHECK (status <> 'waiting' OR deps_left > 0);

-- One row per (child, parent). No foreign keys: a foreign key would add two lookups to the
-- deletion of every pruned job; the pruner deletes a pruned child's edges itself and keeps a
-- parent while a child of it waits.
CREATE TABLE IF NOT EXISTS apiary_job_deps (
    child  uuid NOT NULL,
    parent uuid NOT NULL,
    PRIMARY KEY (child, parent),
    CHECK (child <> parent)
);
CREATE INDEX IF NOT EXISTS apiary_job_deps_parent ON apiary_job_deps (parent);

-- A batch's children, in id order, for the callback's paging and for counting by status.
CREATE INDEX IF NOT EXISTS apiary_jobs_batch ON apiary_jobs (batch_id, id) WHERE batch_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS apiary_batches (
    id              uuid        PRIMARY KEY,
    total           integer     NOT NULL CHECK (total > 0),
    remaining       integer     NOT NULL CHECK (remaining >= 0),
    succeeded       integer     NOT NULL DEFAULT 0,
    failed          integer     NOT NULL DEFAULT 0,
    dead            integer     NOT NULL DEFAULT 0,
    cancelled       integer     NOT NULL DEFAULT 0,
    -- The callback job: its id (chosen at creation), kind, payload, queue, budget, deployment.
    callback_id     uuid        NOT NULL,
    callback_kind   text        NOT NULL,
    callback_payload json       NOT NULL DEFAULT 'null',
    callback_queue  text        NOT NULL DEFAULT 'default',
    callback_max_attempts integer NOT NULL,
    prefix          text,
    on_success      boolean     NOT NULL DEFAULT false,
    -- running: children unfinished; completed: the callback was enqueued; failed: on_success
    -- was asked and a child did not succeed, so no callback.
    status          text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'completed', 'failed')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    CONSTRAINT batch_finished_iff_done CHECK ((status = 'running') = (finished_at IS NULL)),
    CONSTRAINT batch_done_iff_none_remaining CHECK ((remaining = 0) = (finished_at IS NOT NULL))
);

-- A parent reached a final status: release or cancel its waiting children.
CREATE OR REPLACE FUNCTION apiary_release_dependents() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    chunks integer;
BEGIN
    IF NEW.status = 'succeeded' THEN
        -- The row lock on each child serialises parents finishing at once; the count is read
        -- from the locked row, so the last parent, whichever it is, releases the child.
        WITH released AS (
            UPDATE apiary_jobs c
               SET deps_left = c.deps_left - 1,
                   status = CASE WHEN c.deps_left = 1 THEN 'queued' ELSE 'waiting' END
              FROM apiary_job_deps d
             WHERE d.parent = NEW.id AND c.id = d.child AND c.status = 'waiting'
            RETURNING c.id, c.status
        )
        INSERT INTO apiary_outbox (job_id)
        SELECT id FROM released WHERE status = 'queued'
        ON CONFLICT (job_id) DO UPDATE SET dead_reason = NULL, created_at = now();
    ELSE
        WITH cancelled AS (
            UPDATE apiary_jobs c
               SET status = 'cancelled', finished_at = now(),
                   error = 'cancelled: parent job ' || NEW.id || ' ended ' || NEW.status
              FROM apiary_job_deps d
             WHERE d.parent = NEW.id AND c.id = d.child AND c.status = 'waiting'
            RETURNING c.id
        ), numbered AS (
            SELECT id, (row_number() OVER ()) / 200 AS chunk FROM cancelled
        )
        -- Long polls wake on these ids; chunks keep each payload under NOTIFY's 8000 bytes.
        SELECT count(*) INTO chunks FROM (
            SELECT pg_notify('apiary_jobs_done', string_agg(id::text, ',')) FROM numbered GROUP BY chunk
        ) n;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER apiary_jobs_release_dependents AFTER UPDATE OF status ON apiary_jobs
    FOR EACH ROW
    WHEN (NEW.has_dependents AND OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL)
    EXECUTE FUNCTION apiary_release_dependents();

-- A batch child reached a final status (or left one, by a replay before the batch was done).
CREATE OR REPLACE FUNCTION apiary_batch_progress() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    b apiary_batches%ROWTYPE;
    sign integer;
    st text;
BEGIN
    IF NEW.finished_at IS NOT NULL THEN
        sign := -1; st := NEW.status;
    ELSE
        -- A replay of a child while the batch still runs: it is unfinished again.
        sign := 1; st := OLD.status;
    END IF;
    UPDATE apiary_batches
       SET remaining = remaining + sign,
           succeeded = succeeded - sign * (st = 'succeeded')::int,
           failed = failed - sign * (st = 'failed')::int,
           dead = dead - sign * (st = 'dead')::int,
           cancelled = cancelled - sign * (st IN ('cancelled', 'duplicate'))::int,
           status = CASE WHEN remaining + sign > 0 THEN 'running'
                         WHEN on_success AND succeeded - sign * (st = 'succeeded')::int < total THEN 'failed'
                         ELSE 'completed' END,
           finished_at = CASE WHEN remaining + sign = 0 THEN now() END
     WHERE id = NEW.batch_id AND finished_at IS NULL
    RETURNING * INTO b;
    IF FOUND AND b.status = 'completed' THEN
        -- Exactly once: only the statement that took `remaining` to 0 gets here, and the id
        -- and dedup key are the batch's own, so even a second run could add nothing.
        INSERT INTO apiary_jobs (id, kind, payload, dedup_key, max_attempts, queue, prefix)
        VALUES (b.callback_id, b.callback_kind,
                json_build_object('batch_id', b.id,
                                  'counts', json_build_object('total', b.total, 'succeeded', b.succeeded,
                                                              'failed', b.failed, 'dead', b.dead,
                                                              'cancelled', b.cancelled),
                                  'payload', b.callback_payload),
                'batch:' || b.id, b.callback_max_attempts, b.callback_queue, b.prefix)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            INSERT INTO apiary_outbox (job_id) VALUES (b.callback_id) ON CONFLICT DO NOTHING;
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER apiary_jobs_batch_progress AFTER UPDATE OF status ON apiary_jobs
    FOR EACH ROW
    WHEN (NEW.batch_id IS NOT NULL AND (OLD.finished_at IS NULL) <> (NEW.finished_at IS NULL))
    EXECUTE FUNCTION apiary_batch_progress();

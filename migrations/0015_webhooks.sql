-- Completion webhooks. A job may carry `callback_url`; when it reaches a final status, a
-- delivery job of the built-in kind `apiary.webhook` is recorded in the same transaction as
-- that status, with its outbox row, so the delivery is as durable as any job: it is published
-- by whoever committed the status (or by the relay if that process died), retried with the
-- job machinery's backoff, and never delays or fails the job's own commit.
--
-- `callback_url` is set at insert and never changes, and is not indexed: claims and finishes
-- stay HOT updates. The triggers' WHEN clauses test it first, so a job without one pays a
-- NULL test and nothing else.
ALTER TABLE apiary_jobs
    ADD COLUMN IF NOT EXISTS callback_url text CHECK (octet_length(callback_url) <= 2048);

-- The id of the delivery of `record` (`job`, later `batch`) `id` for the finish at
-- `finished_at`: derived, so the committer knows it without reading it back, a trigger that
-- runs again for the same finish makes no second delivery (the insert meets its own id), and
-- a replayed job that finishes again (a new `finished_at`) gets a new one.
CREATE OR REPLACE FUNCTION apiary_webhook_id(record text, id uuid, finished_at timestamptz)
    RETURNS uuid LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT md5('apiary.webhook:' || record || ':' || id::text || ':'
               || (extract(epoch FROM finished_at) * 1000000)::bigint::text)::uuid
$$;

-- Records the delivery of `record` `id` to `url`, with its outbox row; nothing if it exists.
-- The payload names the record rather than copying it: the handler reads the record when it
-- delivers, so the commit that finishes a job never copies its payload and result, and the
-- receiver gets the job exactly as GET /v1/jobs/{id} shows it. A delivery never carries a
-- callback_url itself, so a delivery's own end triggers nothing. Reusable for any record
-- that has a URL and a final moment (batches).
CREATE OR REPLACE FUNCTION apiary_enqueue_webhook(
    record text, id uuid, url text, event text, finished_at timestamptz,
    queue text, prefix text, priority smallint
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    delivery uuid := apiary_webhook_id(record, id, finished_at);
BEGIN
    WITH ins AS (
        INSERT INTO apiary_jobs (id, kind, payload, dedup_key, max_attempts, queue, prefix, priority)
        VALUES (delivery, 'apiary.webhook',
                json_build_object('record', record, 'id', id, 'url', url, 'event', event,
                                  'finished_at', finished_at),
                record || ':' || id::text || ':'
                    || (extract(epoch FROM finished_at) * 1000000)::bigint::text,
                12, queue, prefix, priority)
        ON CONFLICT DO NOTHING
        RETURNING apiary_jobs.id
    )
    INSERT INTO apiary_outbox (job_id) SELECT ins.id FROM ins;
END $$;

CREATE OR REPLACE FUNCTION apiary_queue_job_webhook() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM apiary_enqueue_webhook('job', NEW.id, NEW.callback_url, 'job.' || NEW.status,
                                   NEW.finished_at, NEW.queue, NEW.prefix, NEW.priority);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS apiary_jobs_webhook_on_update ON apiary_jobs;
CREATE TRIGGER apiary_jobs_webhook_on_update AFTER UPDATE OF status ON apiary_jobs
    FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL AND NEW.finished_at IS NOT NULL AND OLD.finished_at IS NULL)
    EXECUTE FUNCTION apiary_queue_job_webhook();

-- A job recorded already final (a raw message cancelled or dead on arrival) is delivered too.
DROP TRIGGER IF EXISTS apiary_jobs_webhook_on_insert ON apiary_jobs;
CREATE TRIGGER apiary_jobs_webhook_on_insert AFTER INSERT ON apiary_jobs
    FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL AND NEW.finished_at IS NOT NULL)
    EXECUTE FUNCTION apiary_queue_job_webhook();

-- A batch may carry a callback_url too: when its last child reaches a final status, the
-- batch's record (as GET /v1/batches/{id} shows it) is delivered the same way, on the queue
-- of the batch's callback. The batch trigger of migration 0014 sets `finished_at` once, so
-- this fires once per batch.
ALTER TABLE apiary_batches
    ADD COLUMN IF NOT EXISTS callback_url text CHECK (octet_length(callback_url) <= 2048);

CREATE OR REPLACE FUNCTION apiary_queue_batch_webhook() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM apiary_enqueue_webhook('batch', NEW.id, NEW.callback_url, 'batch.' || NEW.status,
                                   NEW.finished_at, NEW.callback_queue, NEW.prefix, 0::smallint);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS apiary_batches_webhook ON apiary_batches;
CREATE TRIGGER apiary_batches_webhook AFTER UPDATE OF finished_at ON apiary_batches
    FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL AND NEW.finished_at IS NOT NULL AND OLD.finished_at IS NULL)
    EXECUTE FUNCTION apiary_queue_batch_webhook();

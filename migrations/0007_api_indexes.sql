-- What the API reads, served without scanning the whole table, and what replays leave for the
-- dead-letter sweeper.
--
-- `GET /v1/jobs?dedup_key=...` (with or without `kind`): every record carrying the key, its
-- duplicates included, newest first. The unique index on (kind, dedup_key) cannot serve it:
-- it leaves duplicates out and leads with kind. Like every index on this table, this one
-- covers only columns that never change after insert (dedup_key, created_at, id), so claims
-- and finishes stay HOT updates. Filters on `status` have no index on purpose (every claim
-- and finish changes it); the API bounds those scans instead.
--
-- A plain CREATE INDEX blocks writes while it builds; on a large table, build it first with
-- CREATE INDEX CONCURRENTLY under the same name and this statement does nothing.
CREATE INDEX IF NOT EXISTS apiary_jobs_dedup_key_created ON apiary_jobs (dedup_key, created_at DESC, id DESC)
    WHERE dedup_key IS NOT NULL;

-- Jobs whose dead letters are to be removed from the dead-letter queue: a replay queues its
-- ids here and the sweeper removes their letters later, in one pass over the queue for many
-- replays. No foreign key: a job pruned meanwhile still has a letter to remove.
CREATE TABLE apiary_dead_sweep (
    job_id    uuid        PRIMARY KEY,
    queued_at timestamptz NOT NULL DEFAULT now()
);

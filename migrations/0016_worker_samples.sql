-- What the dashboard's charts read (`GET /v1/stats/series`): each worker, at each heartbeat
-- in which it finished anything, writes what it finished since the previous one: jobs
-- succeeded, dead, retried, and a histogram of their enqueue-to-finish times (log buckets,
-- `{"<bucket>": count}`; bucket b holds times up to exp((b + 1) / 8) ms). A chart then reads a
-- few thousand small rows instead of every job of the last hour. Rows older than a day are
-- removed by the workers' heartbeat (`Store::record_sample`).
CREATE TABLE IF NOT EXISTS apiary_worker_samples (
    prefix    text        NOT NULL,
    worker_id uuid        NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    succeeded integer     NOT NULL CHECK (succeeded >= 0),
    dead      integer     NOT NULL CHECK (dead >= 0),
    retried   integer     NOT NULL CHECK (retried >= 0),
    latency   jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS apiary_worker_samples_at ON apiary_worker_samples (prefix, at);

-- The job table is the truth about every job: what it is, where it stands, what it produced.
-- RabbitMQ only carries the work not yet done; this table decides whether a delivery runs.
--
-- Indexes cover only columns that never change after insert (id, kind, dedup_key, duplicate_of,
-- created_at), so the two updates of a job's life (claim, finish) stay HOT updates: no index
-- writes on the hot path.
CREATE TABLE apiary_jobs (
    id              uuid        PRIMARY KEY,
    kind            text        NOT NULL CHECK (octet_length(kind) <= 255),
    payload         jsonb       NOT NULL DEFAULT 'null',
    dedup_key       text        CHECK (octet_length(dedup_key) <= 256),
    status          text        NOT NULL DEFAULT 'queued' CHECK (status IN
                        ('queued', 'running', 'retrying', 'succeeded', 'failed', 'dead', 'duplicate', 'cancelled')),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    integer     NOT NULL CHECK (max_attempts BETWEEN 1 AND 1000),
    result          jsonb,
    error           text,
    -- One entry per failed attempt: {"attempt", "error", "at"}.
    errors          jsonb       NOT NULL DEFAULT '[]',
    duplicate_of    uuid,
    -- The worker that holds the claim, and until when; a claim whose lease has passed may be taken over.
    worker_id       uuid,
    lease_until     timestamptz,
    run_at          timestamptz,
    next_attempt_at timestamptz,
    -- Set when the job was recorded from a message that could not be decoded (a poison message).
    raw_body        text,
    cancel_requested boolean    NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    CONSTRAINT finished_iff_final CHECK (
        (status IN ('succeeded', 'failed', 'dead', 'duplicate', 'cancelled')) = (finished_at IS NOT NULL)),
    CONSTRAINT running_has_lease CHECK (status <> 'running' OR (lease_until IS NOT NULL AND worker_id IS NOT NULL)),
    CONSTRAINT duplicate_iff_original CHECK ((status = 'duplicate') = (duplicate_of IS NOT NULL)),
    CONSTRAINT succeeded_has_result CHECK (status <> 'succeeded' OR result IS NOT NULL)
) WITH (fillfactor = 85);

-- One live job per (kind, dedup_key): the dedup guarantee lives here, not in code.
-- Duplicate records keep the key for display but are excluded.
CREATE UNIQUE INDEX apiary_jobs_dedup ON apiary_jobs (kind, dedup_key)
    WHERE dedup_key IS NOT NULL AND duplicate_of IS NULL;

-- Newest-first listing with a (created_at, id) cursor.
CREATE INDEX apiary_jobs_created ON apiary_jobs (created_at DESC, id DESC);
CREATE INDEX apiary_jobs_kind_created ON apiary_jobs (kind, created_at DESC, id DESC);

-- Transactional outbox: a row here means "recorded, not yet confirmed by the broker".
-- It is written in the same statement as the job and deleted once the publish is confirmed;
-- the relay republishes rows that stay too long (the enqueuer died between commit and confirm).
CREATE TABLE apiary_outbox (
    job_id     uuid        PRIMARY KEY REFERENCES apiary_jobs (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX apiary_outbox_created ON apiary_outbox (created_at);

-- The tally demo: a database effect that must happen exactly once per job.
CREATE TABLE demo_tally (
    counter text   PRIMARY KEY,
    value   bigint NOT NULL
);

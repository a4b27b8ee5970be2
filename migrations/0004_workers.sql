-- Workers announce themselves here and renew the row with every heartbeat; a clean exit
-- removes it, and rows whose heartbeat stopped are removed by the other workers.
CREATE TABLE apiary_workers (
    id           uuid        PRIMARY KEY,
    queue        text        NOT NULL,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    version      text        NOT NULL,
    concurrency  integer     NOT NULL CHECK (concurrency > 0),
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    in_flight    integer     NOT NULL DEFAULT 0,
    processed    bigint      NOT NULL DEFAULT 0,
    failed       bigint      NOT NULL DEFAULT 0,
    -- Jobs finished per second over the last heartbeat interval.
    rate         double precision NOT NULL DEFAULT 0,
    draining     boolean     NOT NULL DEFAULT false
);

-- Autovacuum tuned for churn. Every job row is inserted, updated twice (claim, finish) and,
-- once its retention has passed, deleted; every outbox row lives for milliseconds. At
-- thousands of jobs per second, Postgres's defaults (vacuum once a fifth of the table is dead,
-- throttled to about 200 page costs per 2 ms) let dead tuples pile up for many minutes, so the
-- table and its indexes bloat, claims and finishes read ever more pages, and HOT updates find
-- no free room in their page. Vacuuming small fractions often keeps the space reusable: each
-- pass has less to do, and the pruner's deletions are reclaimed soon after they commit.
ALTER TABLE apiary_jobs SET (
    -- Vacuum once 1% of the rows (plus 1000) are dead, instead of 20%.
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    -- Inserts alone also trigger a pass (it sets the visibility map, so index-only scans and
    -- the next vacuum stay cheap), at 2% instead of 20%.
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 1000,
    -- Fresh statistics for the planner as the table's size swings with retention.
    autovacuum_analyze_scale_factor = 0.02,
    -- Five times the default work between naps, and naps of 1 ms instead of 2: a pass keeps
    -- up with deletions at full rate while still yielding I/O to the workers.
    autovacuum_vacuum_cost_limit = 1000,
    autovacuum_vacuum_cost_delay = 1
);

-- The outbox is small but all churn: each row is deleted as soon as the broker confirms, so
-- dead rows are nearly the whole of it and a fraction of its live rows means nothing. Vacuum
-- on a fixed count instead. (It grows only while RabbitMQ is away; the cost settings keep a
-- pass over it then from crowding out the workers.)
ALTER TABLE apiary_outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_limit = 1000,
    autovacuum_vacuum_cost_delay = 1
);

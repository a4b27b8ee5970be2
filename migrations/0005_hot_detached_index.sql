-- 0002 indexed lease_until for detached jobs. Every claim and heartbeat changes lease_until,
-- and an update that changes an indexed column cannot be a HOT update, so that index made
-- every claim and finish write new entries into every index. Indexing id instead (which never
-- changes) keeps the same rows findable and ordinary updates HOT.
DROP INDEX apiary_jobs_detached_lease;
CREATE INDEX apiary_jobs_detached ON apiary_jobs (id) WHERE detached;

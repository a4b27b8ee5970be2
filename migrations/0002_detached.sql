-- Long jobs: a job still running after APIARY_DETACH_AFTER has its message acked (RabbitMQ
-- would otherwise close the channel at its consumer timeout) and is marked detached. From then
-- on its lease alone protects it: the rescuer republishes a detached job whose lease expired.
-- The index holds only detached rows, and ordinary claims and finishes never change the column,
-- so their updates stay HOT.
ALTER TABLE apiary_jobs ADD COLUMN detached boolean NOT NULL DEFAULT false;
CREATE INDEX apiary_jobs_detached_lease ON apiary_jobs (lease_until) WHERE detached;

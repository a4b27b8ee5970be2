-- The most shards (`shards=N` in APIARY_QUEUE_OPTIONS) any Apiary process has declared for a
-- queue, keyed by the queue's shard-0 work queue name (which names the deployment and the
-- queue). A process records the count here before it declares the shards, so a shard k the
-- broker holds always has a row with shards > k: a worker or the API with a smaller count
-- looks only for the shards between the two (left over, still holding messages) instead of
-- probing the broker for shards that were never made, each probe of a missing one costing a
-- closed channel and an error in the log. A queue with no row has only ever had one shard.
CREATE TABLE IF NOT EXISTS apiary_broker_shards (
    work       text        PRIMARY KEY CHECK (octet_length(work) <= 255),
    shards     smallint    NOT NULL CHECK (shards BETWEEN 2 AND 64),
    changed_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE apiary_broker_shards IS
    'The largest shards= count each queue (by its shard-0 work queue) was ever declared with; written before the shards are declared.';

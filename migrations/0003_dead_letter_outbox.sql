-- A dead job always has its dead letter on the way: becoming `dead` queues an outbox row that
-- says so, in the same transaction, and the row goes only once the broker confirms the letter.
-- Whoever made the job dead publishes the letter at once; the relay covers a crash in between.
ALTER TABLE apiary_outbox ADD COLUMN dead_reason text;

CREATE FUNCTION apiary_queue_dead_letter() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO apiary_outbox (job_id, dead_reason)
    VALUES (NEW.id, coalesce(NEW.error, 'dead'))
    ON CONFLICT (job_id) DO UPDATE SET dead_reason = EXCLUDED.dead_reason, created_at = now();
    RETURN NULL;
END $$;

CREATE TRIGGER apiary_jobs_dead_on_update AFTER UPDATE OF status ON apiary_jobs
    FOR EACH ROW WHEN (NEW.status = 'dead' AND OLD.status IS DISTINCT FROM 'dead')
    EXECUTE FUNCTION apiary_queue_dead_letter();

CREATE TRIGGER apiary_jobs_dead_on_insert AFTER INSERT ON apiary_jobs
    FOR EACH ROW WHEN (NEW.status = 'dead')
    EXECUTE FUNCTION apiary_queue_dead_letter();

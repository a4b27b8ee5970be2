-- Payloads and results are stored as `json`, not `jsonb`. `json` keeps the producer's text
-- exactly, so every message Apiary publishes again for a job (relay, retry, rescue, replay)
-- carries byte for byte the payload that was accepted, and one size limit holds on every
-- path. It also accepts every string JSON allows, `\u0000` and lone surrogates included,
-- which `jsonb` refuses: a payload or a result a producer or handler can write, the store can
-- keep. Nothing queries inside payloads or results, so nothing is lost by the change.
ALTER TABLE apiary_jobs
    ALTER COLUMN payload DROP DEFAULT,
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN payload SET DEFAULT 'null',
    ALTER COLUMN result TYPE json USING result::json;

-- A finished job stays finished: its status never changes again, except when an operator
-- replays a dead or failed job (back to `queued` with a fresh budget). The guard is here, in
-- the schema, so no statement of ours, however wrong, can resurrect a job.
CREATE FUNCTION apiary_refuse_unfinishing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'job % is %, a final status; it can only be replayed, not made %',
        OLD.id, OLD.status, NEW.status
        USING ERRCODE = 'check_violation';
END $$;

CREATE TRIGGER apiary_jobs_final_stays_final BEFORE UPDATE OF status ON apiary_jobs
    FOR EACH ROW
    WHEN (OLD.finished_at IS NOT NULL AND NEW.status IS DISTINCT FROM OLD.status
          AND NOT (OLD.status IN ('dead', 'failed') AND NEW.status = 'queued' AND NEW.attempts = 0))
    EXECUTE FUNCTION apiary_refuse_unfinishing();

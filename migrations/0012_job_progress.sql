-- Progress a running handler reports (`JobContext::progress`): a fraction from 0 to 1, an
-- optional JSON detail, and when it was written. Written at most every half second per job,
-- fenced by the attempt; a new attempt starts without it. Not indexed, so writing it is a HOT
-- update.
ALTER TABLE apiary_jobs
    ADD COLUMN IF NOT EXISTS progress double precision CHECK (progress BETWEEN 0 AND 1),
    ADD COLUMN IF NOT EXISTS progress_detail json,
    ADD COLUMN IF NOT EXISTS progress_at timestamptz;

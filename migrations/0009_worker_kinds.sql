-- The kinds each live worker has handlers for, so `apiary enqueue` can warn that no running
-- worker serves a kind (a worker without its handler records such a job dead). NULL: a
-- worker from before this column, whose kinds are unknown.
ALTER TABLE apiary_workers ADD COLUMN IF NOT EXISTS kinds text[];

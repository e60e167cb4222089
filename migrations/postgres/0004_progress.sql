-- Where a running attempt is within its epoch (the latest training step its trial reported),
-- for the dashboard's live progress. Written every few steps, not at every step.
ALTER TABLE attempts ADD COLUMN progress_epoch BIGINT;
ALTER TABLE attempts ADD COLUMN progress_step BIGINT;
ALTER TABLE attempts ADD COLUMN progress_steps BIGINT;
-- PostgreSQL expands `a.*` when a view is made (SQLite when it is read): the view of latest
-- completed attempts takes the new columns as SQLite's does (appended, so dependants keep theirs).
CREATE OR REPLACE VIEW latest_completed AS
SELECT a.* FROM attempts a
WHERE a.status = 'completed'
  AND a.id = (SELECT MAX(id) FROM attempts b WHERE b.trial_key = a.trial_key AND b.status = 'completed');

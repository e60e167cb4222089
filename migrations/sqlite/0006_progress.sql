-- Where a running attempt is within its epoch (the latest training step its trial reported),
-- for the dashboard's live progress. Written every few steps, not at every step.
ALTER TABLE attempts ADD COLUMN progress_epoch INTEGER;
ALTER TABLE attempts ADD COLUMN progress_step INTEGER;
ALTER TABLE attempts ADD COLUMN progress_steps INTEGER;

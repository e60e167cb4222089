-- Leases instead of same-host process checks: a running attempt's worker refreshes
-- `heartbeat_at`; an attempt whose heartbeat is older than the lease is interrupted by whoever
-- looks next, on any host. `slurm_job_id` names the Slurm job (array task) that runs it.
ALTER TABLE attempts ADD COLUMN heartbeat_at TEXT;
ALTER TABLE attempts ADD COLUMN slurm_job_id TEXT;
UPDATE attempts SET heartbeat_at = started_at WHERE status = 'running';

-- The Slurm job arrays a sweep was submitted as (`fer sweep --launcher slurm`), for
-- `fer sweep --status` / `--cancel`.
CREATE TABLE slurm_jobs (
    job_id       TEXT PRIMARY KEY,
    sweep_id     INTEGER NOT NULL REFERENCES sweeps(id),
    script       TEXT NOT NULL,
    tasks        INTEGER NOT NULL,
    submitted_at TEXT NOT NULL
);

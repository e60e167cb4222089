-- `fer sync`: which attempt each journal attempt (a worker's run of a trial, written to the
-- shared runs folder instead of a database) became, and how many of its lines are ingested.
CREATE TABLE journal_attempts (
    journal_id  TEXT PRIMARY KEY,
    attempt_id  INTEGER NOT NULL REFERENCES attempts(id),
    lines       INTEGER NOT NULL
);

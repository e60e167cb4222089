-- The results store. The runner is its only writer; trials report to the runner.
CREATE TABLE sweeps (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    file        TEXT NOT NULL,
    report      TEXT,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- One trial = one resolved config + seed; `key` hashes its canonical JSON.
CREATE TABLE trials (
    key         TEXT PRIMARY KEY,
    sweep_id    INTEGER NOT NULL REFERENCES sweeps(id),
    seed        INTEGER NOT NULL,
    config_json TEXT NOT NULL,
    params_json TEXT NOT NULL,          -- the sweep axes' values for this trial
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- The swept parameters, flattened and typed, for SQL filtering and grouping.
CREATE TABLE trial_params (
    trial_key   TEXT NOT NULL REFERENCES trials(key),
    name        TEXT NOT NULL,
    value_text  TEXT,
    value_num   REAL,
    PRIMARY KEY (trial_key, name)
);

CREATE TABLE attempts (
    id            INTEGER PRIMARY KEY,
    trial_key     TEXT NOT NULL REFERENCES trials(key),
    status        TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted')),
    started_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    ended_at      TEXT,
    device        TEXT NOT NULL,
    host          TEXT NOT NULL,
    runner_pid    INTEGER NOT NULL,
    git_commit    TEXT,
    git_dirty     INTEGER,
    exit_code     INTEGER,
    signal        INTEGER,
    failure_class TEXT,                -- crash / signal / config
    error         TEXT,
    stderr_tail   TEXT
);
CREATE INDEX attempts_trial ON attempts(trial_key);
-- At most one running attempt per trial, whichever process started it.
CREATE UNIQUE INDEX one_running_attempt ON attempts(trial_key) WHERE status = 'running';

CREATE TABLE metrics (
    attempt_id  INTEGER NOT NULL REFERENCES attempts(id),
    split       TEXT NOT NULL,          -- train / test
    name        TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    value       REAL NOT NULL,
    PRIMARY KEY (attempt_id, split, name, epoch)
);

CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    attempt_id  INTEGER REFERENCES attempts(id),
    at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    kind        TEXT NOT NULL,
    payload     TEXT
);

-- A trial's metrics across all its attempts (a resumed trial continues in a new attempt).
CREATE VIEW trial_metrics AS
SELECT a.trial_key, m.split, m.name, m.epoch, m.value, m.attempt_id
FROM metrics m JOIN attempts a ON a.id = m.attempt_id;

-- The latest completed attempt of each trial.
CREATE VIEW latest_completed AS
SELECT a.* FROM attempts a
WHERE a.status = 'completed'
  AND a.id = (SELECT MAX(id) FROM attempts b WHERE b.trial_key = a.trial_key AND b.status = 'completed');

-- Per completed trial: its sweep, params, and final-epoch / best-epoch / mean-of-last-5 test accuracy.
CREATE VIEW trial_results AS
WITH acc AS (
    SELECT trial_key, epoch, MAX(value) AS value
    FROM trial_metrics WHERE split = 'test' AND name = 'accuracy'
    GROUP BY trial_key, epoch
), last AS (
    SELECT trial_key, MAX(epoch) AS epoch FROM acc GROUP BY trial_key
)
SELECT s.name AS sweep, t.key AS trial_key, t.seed, t.params_json, lc.id AS attempt_id,
       lc.git_commit, lc.git_dirty, last.epoch AS epochs,
       (SELECT value FROM acc WHERE acc.trial_key = t.key AND acc.epoch = last.epoch) AS final_accuracy,
       (SELECT MAX(value) FROM acc WHERE acc.trial_key = t.key) AS best_accuracy,
       (SELECT AVG(value) FROM acc WHERE acc.trial_key = t.key AND acc.epoch > last.epoch - 5) AS last5_accuracy,
       (SELECT MAX(value) FROM trial_metrics tm WHERE tm.trial_key = t.key AND tm.split = 'test'
            AND tm.name = 'balanced_accuracy' AND tm.epoch = last.epoch) AS final_balanced_accuracy
FROM trials t
JOIN sweeps s ON s.id = t.sweep_id
JOIN latest_completed lc ON lc.trial_key = t.key
JOIN last ON last.trial_key = t.key;

-- A trial (one resolved config + seed) can belong to several sweeps: the 4-head trial of the heads
-- sweep is also the "with affinity loss" trial of the affinity sweep. It runs once; every sweep
-- that expands to it lists it here, with the sweep's own axis values.
CREATE TABLE sweep_trials (
    sweep_id    INTEGER NOT NULL REFERENCES sweeps(id),
    trial_key   TEXT NOT NULL REFERENCES trials(key),
    params_json TEXT NOT NULL,
    PRIMARY KEY (sweep_id, trial_key)
);
INSERT INTO sweep_trials (sweep_id, trial_key, params_json) SELECT sweep_id, key, params_json FROM trials;

-- Per (sweep, completed trial): params, and final-epoch / best-epoch / mean-of-last-5 test accuracy.
DROP VIEW trial_results;
CREATE VIEW trial_results AS
WITH acc AS (
    SELECT trial_key, epoch, MAX(value) AS value
    FROM trial_metrics WHERE split = 'test' AND name = 'accuracy'
    GROUP BY trial_key, epoch
), last AS (
    SELECT trial_key, MAX(epoch) AS epoch FROM acc GROUP BY trial_key
)
SELECT s.name AS sweep, t.key AS trial_key, t.seed, st.params_json, lc.id AS attempt_id,
       lc.git_commit, lc.git_dirty, last.epoch AS epochs,
       (SELECT value FROM acc WHERE acc.trial_key = t.key AND acc.epoch = last.epoch) AS final_accuracy,
       (SELECT MAX(value) FROM acc WHERE acc.trial_key = t.key) AS best_accuracy,
       (SELECT AVG(value) FROM acc WHERE acc.trial_key = t.key AND acc.epoch > last.epoch - 5) AS last5_accuracy,
       (SELECT MAX(value) FROM trial_metrics tm WHERE tm.trial_key = t.key AND tm.split = 'test'
            AND tm.name = 'balanced_accuracy' AND tm.epoch = last.epoch) AS final_balanced_accuracy
FROM sweep_trials st
JOIN trials t ON t.key = st.trial_key
JOIN sweeps s ON s.id = st.sweep_id
JOIN latest_completed lc ON lc.trial_key = t.key
JOIN last ON last.trial_key = t.key;

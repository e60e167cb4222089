//! The SQLite results store (schema in `migrations/`). WAL mode; every write is one statement
//! or one transaction, so a killed runner never leaves half a result behind.

use std::path::Path;
use std::str::FromStr;

use std::collections::BTreeMap;

use anyhow::Context;
use fer_model::events::Scalar;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The results database. Every SQL statement of `fer` is in this module; the rest of the runner
/// speaks in the types below.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

/// A trial's per-epoch metrics: (split, name) -> (epoch, value) in epoch order, across all its
/// attempts (the latest value of an epoch wins).
pub type Curves = BTreeMap<(String, String), Vec<(i64, f64)>>;

/// The latest confusion matrix of a trial (rows = true class) and its class names, when the
/// trial recorded them.
#[derive(Debug, Clone, PartialEq)]
pub struct Confusion {
    pub epoch: i64,
    pub counts: Vec<Vec<u64>>,
    pub class_names: Option<Vec<String>>,
}

/// How a trial's latest attempt ended (or that it is running).
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptSummary {
    pub status: String,
    pub failure_class: Option<String>,
    pub error: Option<String>,
}

/// One line of `fer runs`: a trial of a sweep with its latest attempt.
#[derive(Debug, Clone)]
pub struct TrialRow {
    pub sweep: String,
    pub trial_key: String,
    pub params_json: String,
    /// None: never attempted (pending).
    pub latest: Option<AttemptSummary>,
    pub attempts: i64,
    /// The test accuracy of its latest reported epoch.
    pub last_test_accuracy: Option<f64>,
}

/// What the store knows about one trial.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrialState {
    pub completed: bool,
    pub running: bool,
    pub failed_attempts: usize,
    /// Failed attempts that count against the retry budget: every class but `config` and `data`
    /// (those say nothing about the trial, and are fixed outside it).
    pub failed_runs: usize,
    /// Failure class of the latest failed attempt (crash / signal / config).
    pub last_failure: Option<String>,
    /// An attempt was interrupted (the next one resumes from its checkpoint).
    pub interrupted: bool,
}

/// Final metrics of a completed trial: a row of the `trial_results` view (the only reader of
/// it). The sweep summary and the reports both read these.
#[derive(Debug, Clone)]
pub struct TrialResult {
    pub trial_key: String,
    pub seed: i64,
    /// The sweep's axis values for this trial.
    pub params: Value,
    /// The last epoch reported.
    pub epochs: Option<i64>,
    pub final_accuracy: Option<f64>,
    pub best_accuracy: Option<f64>,
    pub last5_accuracy: Option<f64>,
    pub final_balanced_accuracy: Option<f64>,
    pub git_commit: Option<String>,
    pub git_dirty: bool,
}

/// `SELECT <the columns TrialResult::from_row reads> FROM trial_results <rest>`.
macro_rules! select_trial_results {
    ($rest:literal) => {
        concat!(
            "SELECT trial_key, seed, params_json, epochs, final_accuracy, best_accuracy, last5_accuracy,
                    final_balanced_accuracy, git_commit, git_dirty FROM trial_results ",
            $rest
        )
    };
}

impl TrialResult {
    fn from_row(r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<Self> {
        Ok(Self {
            trial_key: r.get(0),
            seed: r.get(1),
            params: serde_json::from_str(r.get::<&str, _>(2))?,
            epochs: r.get(3),
            final_accuracy: r.get(4),
            best_accuracy: r.get(5),
            last5_accuracy: r.get(6),
            final_balanced_accuracy: r.get(7),
            git_commit: r.get(8),
            git_dirty: r.get::<Option<i64>, _>(9).unwrap_or(0) != 0,
        })
    }
}

pub struct AttemptEnd<'a> {
    pub status: &'a str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub failure_class: Option<&'a str>,
    pub error: Option<String>,
    pub stderr_tail: Option<String>,
}

impl Store {
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .with_context(|| format!("opening database {}", path.display()))?;
        MIGRATOR
            .run(&pool)
            .await
            .with_context(|| format!("migrating database {}", path.display()))?;
        Ok(Self { pool })
    }

    /// Open an existing database for reading only (no migration, no file created), or None when
    /// there is none yet: what `fer sweep --dry-run` looks at.
    pub async fn open_read_only(path: &Path) -> anyhow::Result<Option<Self>> {
        if !path.is_file() {
            return Ok(None);
        }
        // SQLite opens lazily: a connection is usable once it has read the schema.
        let connect = |read_only: bool, immutable: bool| async move {
            let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
                .read_only(read_only)
                .immutable(immutable)
                .create_if_missing(false)
                .busy_timeout(std::time::Duration::from_secs(30));
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts)
                .await?;
            sqlx::query("SELECT COUNT(*) FROM sqlite_master")
                .fetch_one(&pool)
                .await?;
            anyhow::Ok(pool)
        };
        let pool = match connect(true, false).await {
            Ok(pool) => pool,
            // A WAL database in a folder SQLite cannot write (a read-only mount, a snapshot)
            // cannot be read normally: SQLite must create its shared-memory file next to it.
            // There it is read as immutable (no locks, no shared memory), which is right when
            // nothing can write to it; any other failure keeps its own message.
            Err(e) => match connect(true, true).await {
                Ok(pool) => pool,
                Err(_) => {
                    return Err(e.context(format!("opening database {} read-only", path.display())))
                }
            },
        };
        Ok(Some(Self { pool }))
    }

    /// Open a database to read it (`fer runs`, `fer report`): read-only when its schema is
    /// current, so reading never changes the file (nor needs write permission); migrated first
    /// when it was made by an older `fer`.
    pub async fn open_for_reading(path: &Path) -> anyhow::Result<Self> {
        let Some(store) = Self::open_read_only(path).await? else {
            anyhow::bail!("{}: no such database", path.display());
        };
        // No migration table: an empty file (a new database) or another program's; opening it
        // normally migrates the first and names the second.
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
                .fetch_one(&store.pool)
                .await
                .unwrap_or(None);
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        if applied.unwrap_or(0) >= latest {
            return Ok(store);
        }
        drop(store);
        Self::open(path).await
    }

    /// Close the connections; the last one checkpoints the write-ahead log into the file.
    pub async fn close(self) {
        self.pool.close().await;
    }

    pub async fn upsert_sweep(
        &self,
        name: &str,
        file: &str,
        report: Option<&str>,
    ) -> anyhow::Result<i64> {
        sqlx::query("INSERT INTO sweeps (name, file, report) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET file = excluded.file, report = excluded.report")
            .bind(name)
            .bind(file)
            .bind(report)
            .execute(&self.pool)
            .await?;
        Ok(sqlx::query("SELECT id FROM sweeps WHERE name = ?")
            .bind(name)
            .fetch_one(&self.pool)
            .await?
            .get(0))
    }

    /// Register a trial, its membership of this sweep and its flattened params (idempotent; a
    /// trial another sweep already ran is shared, not re-run).
    pub async fn upsert_trial(
        &self,
        key: &str,
        sweep_id: i64,
        seed: u64,
        config: &Value,
        params: &Value,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT OR IGNORE INTO trials (key, sweep_id, seed, config_json, params_json) VALUES (?, ?, ?, ?, ?)")
            .bind(key)
            .bind(sweep_id)
            .bind(seed as i64)
            .bind(config.to_string())
            .bind(params.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT OR IGNORE INTO sweep_trials (sweep_id, trial_key, params_json) VALUES (?, ?, ?)")
            .bind(sweep_id)
            .bind(key)
            .bind(params.to_string())
            .execute(&mut *tx)
            .await?;
        if let Value::Object(map) = params {
            for (name, v) in map {
                let num = v.as_f64();
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                sqlx::query("INSERT OR IGNORE INTO trial_params (trial_key, name, value_text, value_num) VALUES (?, ?, ?, ?)")
                    .bind(key)
                    .bind(name)
                    .bind(text)
                    .bind(num)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn trial_state(&self, key: &str) -> anyhow::Result<TrialState> {
        let rows = sqlx::query(
            "SELECT status, failure_class FROM attempts WHERE trial_key = ? ORDER BY id",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        let mut s = TrialState::default();
        for r in rows {
            let status: String = r.get(0);
            match status.as_str() {
                "completed" => s.completed = true,
                "running" => s.running = true,
                "failed" => {
                    s.failed_attempts += 1;
                    let class: Option<String> = r.get(1);
                    if !matches!(class.as_deref(), Some("config" | "data" | "resource")) {
                        s.failed_runs += 1;
                    }
                    s.last_failure = class;
                }
                "interrupted" => s.interrupted = true,
                _ => {}
            }
        }
        Ok(s)
    }

    /// Attempts left `running` by a runner process on this host that no longer exists (killed
    /// with SIGKILL, machine crash) become `interrupted`, so their trials can be resumed.
    pub async fn recover_stale(&self, host: &str) -> anyhow::Result<usize> {
        let rows = sqlx::query(
            "SELECT id, runner_pid FROM attempts WHERE status = 'running' AND host = ?",
        )
        .bind(host)
        .fetch_all(&self.pool)
        .await?;
        let mut n = 0;
        for r in rows {
            let (id, pid): (i64, i64) = (r.get(0), r.get(1));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                sqlx::query("UPDATE attempts SET status = 'interrupted', ended_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), error = 'runner process disappeared' WHERE id = ? AND status = 'running'")
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Start an attempt, unless the trial is already completed or running elsewhere (the
    /// unique index on running attempts arbitrates between concurrent runners).
    pub async fn claim(
        &self,
        key: &str,
        device: &str,
        host: &str,
        git: &(Option<String>, Option<bool>),
    ) -> anyhow::Result<Option<i64>> {
        // One statement, so it takes the write lock up front (a read-then-write transaction
        // would fail with SQLITE_BUSY instead of waiting when another runner writes).
        let inserted = sqlx::query(
            "INSERT INTO attempts (trial_key, status, device, host, runner_pid, git_commit, git_dirty)
             SELECT ?1, 'running', ?2, ?3, ?4, ?5, ?6
             WHERE NOT EXISTS (SELECT 1 FROM attempts WHERE trial_key = ?1 AND status = 'completed')",
        )
        .bind(key)
        .bind(device)
        .bind(host)
        .bind(std::process::id() as i64)
        .bind(git.0.as_deref())
        .bind(git.1)
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(r) if r.rows_affected() == 1 => Ok(Some(r.last_insert_rowid())),
            Ok(_) => Ok(None),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Record an epoch's metrics in one transaction. A value an earlier attempt of the same
    /// trial already recorded (a resumed trial re-reports its past epochs) is not duplicated.
    pub async fn epoch_metrics(
        &self,
        attempt: i64,
        epoch: i64,
        values: &[Scalar],
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for Scalar { split, name, value } in values {
            sqlx::query(
                "INSERT INTO metrics (attempt_id, split, name, epoch, value)
                 SELECT ?1, ?2, ?3, ?4, ?5
                 WHERE NOT EXISTS (SELECT 1 FROM metrics m JOIN attempts a ON a.id = m.attempt_id
                                   WHERE a.trial_key = (SELECT trial_key FROM attempts WHERE id = ?1)
                                     AND m.attempt_id != ?1 AND m.split = ?2 AND m.name = ?3 AND m.epoch = ?4)
                 ON CONFLICT(attempt_id, split, name, epoch) DO UPDATE SET value = excluded.value",
            )
            .bind(attempt)
            .bind(*split)
            .bind(*name)
            .bind(epoch)
            .bind(*value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn event(
        &self,
        attempt: Option<i64>,
        kind: &str,
        payload: &str,
    ) -> anyhow::Result<()> {
        sqlx::query("INSERT INTO events (attempt_id, kind, payload) VALUES (?, ?, ?)")
            .bind(attempt)
            .bind(kind)
            .bind(payload)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Record an epoch's confusion matrix once per trial: a resumed attempt re-reports the epochs
    /// of its checkpoint, whose matrices an earlier attempt may already have recorded.
    pub async fn confusion_once(
        &self,
        attempt: i64,
        epoch: i64,
        confusion: &[Vec<u64>],
    ) -> anyhow::Result<()> {
        let payload = serde_json::json!({"epoch": epoch, "confusion": confusion}).to_string();
        sqlx::query(
            "INSERT INTO events (attempt_id, kind, payload)
             SELECT ?1, 'confusion', ?3
             WHERE NOT EXISTS (
                 SELECT 1 FROM events e JOIN attempts a ON a.id = e.attempt_id
                 WHERE a.trial_key = (SELECT trial_key FROM attempts WHERE id = ?1)
                   AND e.kind = 'confusion' AND json_extract(e.payload, '$.epoch') = ?2)",
        )
        .bind(attempt)
        .bind(epoch)
        .bind(payload)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn finish(&self, attempt: i64, end: AttemptEnd<'_>) -> anyhow::Result<()> {
        sqlx::query("UPDATE attempts SET status = ?, ended_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), exit_code = ?, signal = ?, failure_class = ?, error = ?, stderr_tail = ? WHERE id = ?")
            .bind(end.status)
            .bind(end.exit_code)
            .bind(end.signal)
            .bind(end.failure_class)
            .bind(end.error)
            .bind(end.stderr_tail)
            .bind(attempt)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The results of a sweep's completed trials, in trial-key order.
    pub async fn results(&self, sweep: &str) -> anyhow::Result<Vec<TrialResult>> {
        let rows = sqlx::query(select_trial_results!("WHERE sweep = ? ORDER BY trial_key"))
            .bind(sweep)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(TrialResult::from_row).collect()
    }

    /// The result of one completed trial (whichever sweep it was registered by).
    pub async fn trial_result(&self, key: &str) -> anyhow::Result<Option<TrialResult>> {
        let row = sqlx::query(select_trial_results!("WHERE trial_key = ? LIMIT 1"))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(TrialResult::from_row).transpose()
    }

    /// How the trial's latest attempt ended; None when it was never attempted.
    pub async fn latest_attempt(&self, key: &str) -> anyhow::Result<Option<AttemptSummary>> {
        let row = sqlx::query(
            "SELECT status, failure_class, error FROM attempts WHERE trial_key = ? ORDER BY id DESC LIMIT 1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|a| AttemptSummary {
            status: a.get(0),
            failure_class: a.get(1),
            error: a.get(2),
        }))
    }

    /// Per-epoch metrics of a trial (every attempt; the latest value of an epoch wins).
    pub async fn curves(&self, key: &str) -> anyhow::Result<Curves> {
        let rows = sqlx::query(
            "SELECT split, name, epoch, value FROM trial_metrics WHERE trial_key = ? ORDER BY split, name, epoch, attempt_id",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Curves::new();
        for r in rows {
            let series = out.entry((r.get(0), r.get(1))).or_default();
            let (epoch, value): (i64, f64) = (r.get(2), r.get(3));
            match series.last_mut() {
                Some(last) if last.0 == epoch => last.1 = value,
                _ => series.push((epoch, value)),
            }
        }
        Ok(out)
    }

    /// The confusion matrix of a trial's last reported epoch, and its class names when recorded.
    pub async fn confusion(&self, key: &str) -> anyhow::Result<Option<Confusion>> {
        let rows = sqlx::query(
            "SELECT e.kind, e.payload FROM events e JOIN attempts a ON a.id = e.attempt_id
             WHERE a.trial_key = ? AND e.kind IN ('confusion', 'started') ORDER BY e.id",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        let (mut latest, mut names): (Option<Confusion>, Option<Vec<String>>) = (None, None);
        for r in rows {
            let kind: String = r.get(0);
            let payload: Option<String> = r.get(1);
            let Some(v) = payload.and_then(|p| serde_json::from_str::<Value>(&p).ok()) else {
                continue;
            };
            if kind == "started" {
                if let Ok(n) = serde_json::from_value::<Vec<String>>(v["class_names"].clone()) {
                    names = Some(n);
                }
            } else if let (Some(epoch), Ok(counts)) = (
                v["epoch"].as_i64(),
                serde_json::from_value::<Vec<Vec<u64>>>(v["confusion"].clone()),
            ) {
                if latest.as_ref().is_none_or(|c| epoch >= c.epoch) {
                    latest = Some(Confusion {
                        epoch,
                        counts,
                        class_names: None,
                    });
                }
            }
        }
        Ok(latest.map(|c| Confusion {
            class_names: names,
            ..c
        }))
    }

    /// The names of the sweeps the database knows, sorted.
    pub async fn sweep_names(&self) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT name FROM sweeps ORDER BY name")
            .fetch_all(&self.pool)
            .await?)
    }

    /// The trials of one sweep or all, each with its latest attempt; `status` keeps only the
    /// trials whose latest attempt has it (`pending`: never attempted).
    pub async fn trial_rows(
        &self,
        sweep: Option<&str>,
        status: Option<&str>,
    ) -> anyhow::Result<Vec<TrialRow>> {
        let rows = sqlx::query(
            "SELECT s.name, t.key, st.params_json, a.status, a.failure_class, a.error,
                    (SELECT COUNT(*) FROM attempts x WHERE x.trial_key = t.key) AS attempts,
                    (SELECT value FROM trial_metrics m WHERE m.trial_key = t.key AND m.split = 'test' AND m.name = 'accuracy' ORDER BY m.epoch DESC, m.attempt_id DESC LIMIT 1)
             FROM sweep_trials st JOIN trials t ON t.key = st.trial_key JOIN sweeps s ON s.id = st.sweep_id
             LEFT JOIN attempts a ON a.id = (SELECT MAX(id) FROM attempts b WHERE b.trial_key = t.key)
             WHERE (?1 IS NULL OR s.name = ?1) AND (?2 IS NULL OR COALESCE(a.status, 'pending') = ?2)
             ORDER BY s.name, st.params_json",
        )
        .bind(sweep)
        .bind(status)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| TrialRow {
                sweep: r.get(0),
                trial_key: r.get(1),
                params_json: r.get(2),
                latest: r.get::<Option<String>, _>(3).map(|status| AttemptSummary {
                    status,
                    failure_class: r.get(4),
                    error: r.get(5),
                }),
                attempts: r.get(6),
                last_test_accuracy: r.get(7),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fer_model::events::{EpochMetrics, Event, EventLine};

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fer-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// An epoch event with every optional metric present.
    fn full_epoch(epoch: usize) -> EpochMetrics {
        serde_json::from_value(serde_json::json!({
            "epoch": epoch, "lr": 0.1, "loss_total": 1.1, "loss_ce": 1.2, "loss_affinity": 1.3,
            "loss_partition": 1.4, "loss_consistency": 1.5, "train_accuracy": 0.21,
            "test_accuracy": 0.22, "test_balanced_accuracy": 0.23, "val_accuracy": 0.24,
            "memorisation": {"flipped": 33, "predicted_noisy": 0.31, "predicted_clean": 0.32},
            "memorisation_running": {"flipped": 36, "predicted_noisy": 0.34, "predicted_clean": 0.35},
            "train_seconds": 4.1, "eval_seconds": 4.2, "train_img_per_s": 4.3,
            "confusion": [[5, 1], [2, 7]]
        }))
        .unwrap()
    }

    async fn one_trial(store: &Store, key: &str) -> i64 {
        let sweep = store.upsert_sweep("s", "s.yaml", None).await.unwrap();
        let params = serde_json::json!({"model.heads": 4});
        store
            .upsert_trial(key, sweep, 0, &serde_json::json!({}), &params)
            .await
            .unwrap();
        store
            .claim(key, "cpu0", "host", &(None, None))
            .await
            .unwrap()
            .expect("a new trial can be claimed")
    }

    /// Every number of an epoch event reaches the store under its scalar's name; the confusion
    /// matrix is recorded once per trial, and a second claim of a running trial is refused.
    #[tokio::test]
    async fn every_epoch_metric_reaches_the_store() {
        let dir = scratch("epoch");
        let store = Store::open(&dir.join("fer.db")).await.unwrap();
        let attempt = one_trial(&store, "k1").await;
        assert_eq!(
            store
                .claim("k1", "cpu1", "host", &(None, None))
                .await
                .unwrap(),
            None
        );
        let bar = indicatif::ProgressBar::hidden();
        for epoch in [1, 2] {
            let line = EventLine::line(&Event::Epoch(full_epoch(epoch)));
            crate::scheduler::record_line(&store, attempt, &line, &bar)
                .await
                .unwrap();
        }
        let curves = store.curves("k1").await.unwrap();
        let expected: BTreeMap<(String, String), Vec<(i64, f64)>> = full_epoch(1)
            .scalars()
            .iter()
            .map(|s| {
                let v = vec![(1, s.value), (2, s.value)];
                ((s.split.to_string(), s.name.to_string()), v)
            })
            .collect();
        assert_eq!(curves, expected);
        let c = store.confusion("k1").await.unwrap().unwrap();
        assert_eq!((c.epoch, c.counts), (2, vec![vec![5, 1], vec![2, 7]]));
        // A resumed attempt re-reports epoch 2: nothing is duplicated.
        store
            .finish(
                attempt,
                AttemptEnd {
                    status: "interrupted",
                    exit_code: None,
                    signal: None,
                    failure_class: None,
                    error: None,
                    stderr_tail: None,
                },
            )
            .await
            .unwrap();
        let state = store.trial_state("k1").await.unwrap();
        assert!(state.interrupted && !state.running && !state.completed);
        let again = store
            .claim("k1", "cpu0", "host", &(None, None))
            .await
            .unwrap()
            .unwrap();
        let line = EventLine::line(&Event::Epoch(full_epoch(2)));
        crate::scheduler::record_line(&store, again, &line, &bar)
            .await
            .unwrap();
        assert_eq!(store.curves("k1").await.unwrap(), expected);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Lines that are not events, and events of another format version, are kept as text
    /// (never dropped, never misread as metrics).
    #[tokio::test]
    async fn stray_and_foreign_lines_are_kept() {
        let dir = scratch("stray");
        let store = Store::open(&dir.join("fer.db")).await.unwrap();
        let attempt = one_trial(&store, "k2").await;
        let bar = indicatif::ProgressBar::hidden();
        let old = EventLine::line(&Event::Epoch(full_epoch(1))).replace("\"v\":1", "\"v\":9");
        for line in ["hello", old.as_str()] {
            crate::scheduler::record_line(&store, attempt, line, &bar)
                .await
                .unwrap();
        }
        assert!(store.curves("k2").await.unwrap().is_empty());
        let kinds: Vec<(String, String)> =
            sqlx::query_as("SELECT kind, payload FROM events ORDER BY id")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        assert_eq!(kinds[0], ("stdout".to_string(), "hello".to_string()));
        assert_eq!(kinds[1].0, "unreadable");
        assert!(kinds[1].1.contains("version 9"), "{}", kinds[1].1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

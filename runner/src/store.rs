//! The SQLite results store (schema in `migrations/`). WAL mode; every write is one statement
//! or one transaction, so a killed runner never leaves half a result behind.

use std::path::Path;
use std::str::FromStr;

use anyhow::Context;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Clone)]
pub struct Store {
    pub pool: SqlitePool,
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
}

/// Final metrics of a completed trial (from the `trial_results` view). The sweep summary uses
/// the final accuracy; the other protocols and the code version are there for the reports.
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct TrialResult {
    pub trial_key: String,
    pub seed: i64,
    pub params: Value,
    pub final_accuracy: Option<f64>,
    pub best_accuracy: Option<f64>,
    pub last5_accuracy: Option<f64>,
    pub git_commit: Option<String>,
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
        values: &[(&str, &str, f64)],
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for (split, name, value) in values {
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
        confusion: &serde_json::Value,
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

    pub async fn results(&self, sweep: &str) -> anyhow::Result<Vec<TrialResult>> {
        let rows = sqlx::query("SELECT trial_key, seed, params_json, final_accuracy, best_accuracy, last5_accuracy, git_commit FROM trial_results WHERE sweep = ? ORDER BY trial_key")
            .bind(sweep)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| {
                Ok(TrialResult {
                    trial_key: r.get(0),
                    seed: r.get(1),
                    params: serde_json::from_str(r.get::<&str, _>(2))?,
                    final_accuracy: r.get(3),
                    best_accuracy: r.get(4),
                    last5_accuracy: r.get(5),
                    git_commit: r.get(6),
                })
            })
            .collect()
    }
}

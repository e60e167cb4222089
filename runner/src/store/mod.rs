//! The results store on SQLite (a file, the default) or PostgreSQL (shared by the machines of a
//! cluster): one schema (`migrations/sqlite/`, `migrations/postgres/`, tested to give the same
//! tables and views), one set of statements written in the SQL both speak (`$N` parameters,
//! `ON CONFLICT`, `RETURNING`; the few differences are chosen by `Dialect`). Every write is one
//! statement or one transaction, so a killed runner never leaves half a result behind.

mod db_url;

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fer_model::events::Scalar;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

pub use db_url::DbUrl;

pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// How long a running attempt stays claimed without a heartbeat from its worker. Workers beat
/// every `HEARTBEAT`; a lease outlives several missed beats (a busy database, a slow file
/// system) and bounds how long a trial whose worker vanished (a node crash, `scancel -9`) waits.
pub const LEASE: Duration = Duration::from_secs(300);
pub const HEARTBEAT: Duration = Duration::from_secs(30);

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Where the two SQL dialects differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// Run `$body` with `$p` bound to the concrete pool (and `$d` to its dialect): the statement is
/// written once and compiled for each backend.
macro_rules! on_pool {
    ($store:expr, $p:ident, $d:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($p) => {
                #[allow(unused_variables)]
                let $d = Dialect::Sqlite;
                $body
            }
            Pool::Postgres($p) => {
                #[allow(unused_variables)]
                let $d = Dialect::Postgres;
                $body
            }
        }
    };
}

mod dashboard;
pub use dashboard::{AttemptDetail, SweepSummary, SweepTrial};

/// Now as the store writes timestamps: ISO 8601 UTC with milliseconds (`2026-12-03T22:10:00.123Z`),
/// which sort as text the way they sort as times (both backends, any host).
pub fn timestamp(t: SystemTime) -> String {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, sec, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}.{milli:03}Z")
}

fn now() -> String {
    timestamp(SystemTime::now())
}

/// The results database. Every SQL statement of `fer` is in this module; the rest of the runner
/// speaks in the types below.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Where it is (shown with the password masked).
    url: DbUrl,
}

/// A trial's per-epoch metrics: (split, name) -> (epoch, value) in epoch order, across all its
/// attempts (the latest value of an epoch wins).
pub type Curves = BTreeMap<(String, String), Vec<(i64, f64)>>;

/// Appends (epoch, value) to a curve, from rows ordered by epoch then attempt: an epoch that a
/// resumed attempt recorded again keeps the later attempt's value.
fn add_point(curves: &mut Curves, split: String, name: String, epoch: i64, value: f64) {
    let series = curves.entry((split, name)).or_default();
    match series.last_mut() {
        Some(last) if last.0 == epoch => last.1 = value,
        _ => series.push((epoch, value)),
    }
}

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
    /// The Slurm job (`JOBID_TASK`) it ran in, if any.
    pub slurm_job: Option<String>,
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

/// A `TrialResult` from a row of `select_trial_results!` (either backend's row type).
macro_rules! trial_result {
    ($r:expr) => {{
        let r = $r;
        anyhow::Ok(TrialResult {
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
    }};
}

/// Who runs an attempt: recorded with it, and what its lease is renewed by.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Claimant {
    /// The slot (`cpu0`, `gpu1`).
    pub device: String,
    pub host: String,
    /// The runner or worker process.
    pub pid: u32,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    /// `JOBID` or `JOBID_TASK` when the attempt runs inside Slurm.
    pub slurm_job: Option<String>,
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
    /// Open (creating and migrating as needed) the store at `url`.
    pub async fn open(url: &DbUrl) -> anyhow::Result<Self> {
        let pool = match url {
            DbUrl::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                let opts = sqlite_options(path)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(30))
                    .foreign_keys(true);
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(opts)
                    .await
                    .with_context(|| format!("opening database {url}"))?;
                SQLITE_MIGRATIONS
                    .run(&pool)
                    .await
                    .with_context(|| format!("migrating database {url}"))?;
                Pool::Sqlite(pool)
            }
            DbUrl::Postgres(_) => {
                let pool = pg_pool(url, false).await?;
                POSTGRES_MIGRATIONS
                    .run(&pool)
                    .await
                    .with_context(|| format!("migrating database {url}"))?;
                Pool::Postgres(pool)
            }
        };
        Ok(Self {
            pool,
            url: url.clone(),
        })
    }

    /// Open an existing database for reading only (no migration, no file created), or None when
    /// there is none yet: what `fer sweep --dry-run` looks at.
    pub async fn open_read_only(url: &DbUrl) -> anyhow::Result<Option<Self>> {
        let pool = match url {
            DbUrl::Sqlite(path) => {
                if !path.is_file() {
                    return Ok(None);
                }
                Pool::Sqlite(sqlite_read_only(path).await?)
            }
            // Every transaction of these connections is read-only: the server refuses writes.
            DbUrl::Postgres(_) => {
                let pool = pg_pool(url, true).await?;
                let has_schema: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_name = '_sqlx_migrations')",
                )
                .fetch_one(&pool)
                .await?;
                if !has_schema {
                    return Ok(None);
                }
                Pool::Postgres(pool)
            }
        };
        Ok(Some(Self {
            pool,
            url: url.clone(),
        }))
    }

    /// Open a database to read it (`fer runs`, `fer report`): read-only when its schema is
    /// current, so reading never changes it (nor needs write permission); migrated first when
    /// it was made by an older `fer`.
    pub async fn open_for_reading(url: &DbUrl) -> anyhow::Result<Self> {
        let Some(store) = Self::open_read_only(url).await? else {
            anyhow::bail!("{url}: no such database");
        };
        // No migration table: an empty file (a new database) or another program's; opening it
        // normally migrates the first and names the second.
        let applied: Option<i64> = on_pool!(store, p, _d => sqlx::query_scalar(
            "SELECT MAX(version) FROM _sqlx_migrations WHERE success = true"
        )
        .fetch_one(p)
        .await
        .unwrap_or(None));
        let latest = match url {
            DbUrl::Sqlite(_) => &SQLITE_MIGRATIONS,
            DbUrl::Postgres(_) => &POSTGRES_MIGRATIONS,
        }
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
        if applied.unwrap_or(0) >= latest {
            return Ok(store);
        }
        store.close().await;
        Self::open(url).await
    }

    /// Where the store is (its password masked when shown).
    pub fn url(&self) -> &DbUrl {
        &self.url
    }

    /// Close the connections; on SQLite the last one checkpoints the write-ahead log into the
    /// file.
    pub async fn close(self) {
        on_pool!(self, p, _d => p.close().await)
    }

    pub async fn upsert_sweep(
        &self,
        name: &str,
        file: &str,
        report: Option<&str>,
    ) -> anyhow::Result<i64> {
        Ok(on_pool!(self, p, _d => sqlx::query_scalar(
            "INSERT INTO sweeps (name, file, report) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET file = excluded.file, report = excluded.report
             RETURNING id",
        )
        .bind(name)
        .bind(file)
        .bind(report)
        .fetch_one(p)
        .await?))
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
        on_pool!(self, p, _d => {
            let mut tx = p.begin().await?;
            sqlx::query(
                "INSERT INTO trials (key, sweep_id, seed, config_json, params_json) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
            )
            .bind(key)
            .bind(sweep_id)
            .bind(seed as i64)
            .bind(config.to_string())
            .bind(params.to_string())
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO sweep_trials (sweep_id, trial_key, params_json) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
            )
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
                    sqlx::query(
                        "INSERT INTO trial_params (trial_key, name, value_text, value_num) VALUES ($1, $2, $3, $4)
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(key)
                    .bind(name)
                    .bind(text)
                    .bind(num)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn trial_state(&self, key: &str) -> anyhow::Result<TrialState> {
        let rows: Vec<(String, Option<String>)> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT status, failure_class FROM attempts WHERE trial_key = $1 ORDER BY id",
        )
        .bind(key)
        .fetch_all(p)
        .await?);
        let mut s = TrialState::default();
        for (status, class) in rows {
            match status.as_str() {
                "completed" => s.completed = true,
                "running" => s.running = true,
                "failed" => {
                    s.failed_attempts += 1;
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

    /// Attempts whose worker is gone become `interrupted`, so their trials can be claimed and
    /// resumed: on this host, those whose process no longer exists (killed with SIGKILL), at
    /// once (a live process here keeps its attempt, whatever its heartbeat: an older `fer` does
    /// not beat); on other hosts, those whose lease expired (no heartbeat for `lease`: a crashed
    /// node, a cancelled job). Returns how many.
    pub async fn expire_leases(&self, host: &str, lease: Duration) -> anyhow::Result<usize> {
        let here: Vec<(i64, i64)> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT id, runner_pid FROM attempts WHERE status = 'running' AND host = $1",
        )
        .bind(host)
        .fetch_all(p)
        .await?);
        let gone: Vec<i64> = here
            .into_iter()
            .filter(|(_, pid)| !Path::new(&format!("/proc/{pid}")).exists())
            .map(|(id, _)| id)
            .collect();
        let mut n = 0;
        for id in gone {
            n += self.interrupt(id, "runner process disappeared").await?;
        }
        let cutoff = timestamp(SystemTime::now() - lease);
        let expired: Vec<i64> = on_pool!(self, p, _d => sqlx::query_scalar(
            "SELECT id FROM attempts WHERE status = 'running' AND host != $2 AND COALESCE(heartbeat_at, started_at) < $1",
        )
        .bind(&cutoff)
        .bind(host)
        .fetch_all(p)
        .await?);
        let why = format!(
            "lease expired: no heartbeat from its worker for {} s",
            lease.as_secs()
        );
        for id in expired {
            n += self.interrupt(id, &why).await?;
        }
        Ok(n)
    }

    /// Mark one attempt interrupted, if it is still running: 1 when it was.
    pub async fn interrupt(&self, id: i64, why: &str) -> anyhow::Result<usize> {
        let done = on_pool!(self, p, _d => sqlx::query(
            "UPDATE attempts SET status = 'interrupted', ended_at = $1, error = $2 WHERE id = $3 AND status = 'running'",
        )
        .bind(now())
        .bind(why)
        .bind(id)
        .execute(p)
        .await?
        .rows_affected());
        Ok(done as usize)
    }

    /// Start an attempt, unless the trial is already completed or running elsewhere (the
    /// unique index on running attempts arbitrates between concurrent runners, on any host).
    pub async fn claim(&self, key: &str, who: &Claimant) -> anyhow::Result<Option<i64>> {
        // One statement, so it takes the write lock up front (a read-then-write transaction
        // would fail with SQLITE_BUSY instead of waiting when another runner writes).
        let stamp = now();
        let inserted: Result<Option<i64>, sqlx::Error> = on_pool!(self, p, _d => sqlx::query_scalar(
            "INSERT INTO attempts (trial_key, status, device, host, runner_pid, git_commit, git_dirty, started_at, heartbeat_at, slurm_job_id)
             SELECT $1, 'running', $2, $3, $4, $5, $6, $7, $7, $8
             WHERE NOT EXISTS (SELECT 1 FROM attempts WHERE trial_key = $1 AND status = 'completed')
             RETURNING id",
        )
        .bind(key)
        .bind(&who.device)
        .bind(&who.host)
        .bind(who.pid as i64)
        .bind(who.git_commit.as_deref())
        .bind(who.git_dirty.map(i64::from))
        .bind(&stamp)
        .bind(who.slurm_job.as_deref())
        .fetch_optional(p)
        .await);
        match inserted {
            Ok(id) => Ok(id),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Renew the leases of the running attempts of one runner or worker process.
    pub async fn heartbeat(&self, host: &str, pid: u32) -> anyhow::Result<()> {
        on_pool!(self, p, _d => sqlx::query(
            "UPDATE attempts SET heartbeat_at = $1 WHERE status = 'running' AND host = $2 AND runner_pid = $3",
        )
        .bind(now())
        .bind(host)
        .bind(pid as i64)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Record an epoch's metrics in one transaction. A value an earlier attempt of the same
    /// trial already recorded (a resumed trial re-reports its past epochs) is not duplicated.
    pub async fn epoch_metrics(
        &self,
        attempt: i64,
        epoch: i64,
        values: &[Scalar],
    ) -> anyhow::Result<()> {
        on_pool!(self, p, _d => {
            let mut tx = p.begin().await?;
            for Scalar { split, name, value } in values {
                sqlx::query(
                    "INSERT INTO metrics (attempt_id, split, name, epoch, value)
                     SELECT $1, $2, $3, $4, $5
                     WHERE NOT EXISTS (SELECT 1 FROM metrics m JOIN attempts a ON a.id = m.attempt_id
                                       WHERE a.trial_key = (SELECT trial_key FROM attempts WHERE id = $1)
                                         AND m.attempt_id != $1 AND m.split = $2 AND m.name = $3 AND m.epoch = $4)
                     ON CONFLICT (attempt_id, split, name, epoch) DO UPDATE SET value = excluded.value",
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
        });
        Ok(())
    }

    pub async fn event(
        &self,
        attempt: Option<i64>,
        kind: &str,
        payload: &str,
    ) -> anyhow::Result<()> {
        on_pool!(self, p, _d => sqlx::query(
            "INSERT INTO events (attempt_id, kind, payload, at) VALUES ($1, $2, $3, $4)",
        )
        .bind(attempt)
        .bind(kind)
        .bind(payload)
        .bind(now())
        .execute(p)
        .await?
        .rows_affected());
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
        on_pool!(self, p, d => {
            // Only the reading of the recorded epoch differs between the dialects.
            macro_rules! insert_unless_recorded {
                ($epoch:literal) => {
                    concat!(
                        "INSERT INTO events (attempt_id, kind, payload, at)
                         SELECT $1, 'confusion', $3, $4
                         WHERE NOT EXISTS (
                             SELECT 1 FROM events e JOIN attempts a ON a.id = e.attempt_id
                             WHERE a.trial_key = (SELECT trial_key FROM attempts WHERE id = $1)
                               AND e.kind = 'confusion' AND ",
                        $epoch,
                        " = $2)"
                    )
                };
            }
            let sql = match d {
                Dialect::Sqlite => insert_unless_recorded!("json_extract(e.payload, '$.epoch')"),
                Dialect::Postgres => {
                    insert_unless_recorded!("(e.payload::jsonb ->> 'epoch')::bigint")
                }
            };
            sqlx::query(sql)
                .bind(attempt)
                .bind(epoch)
                .bind(payload)
                .bind(now())
                .execute(p)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// End a running attempt. One that already ended (marked interrupted by `fer sweep
    /// --cancel`, or by an expired lease while its worker was cut off) keeps its first end.
    pub async fn finish(&self, attempt: i64, end: AttemptEnd<'_>) -> anyhow::Result<()> {
        on_pool!(self, p, _d => sqlx::query(
            "UPDATE attempts SET status = $1, ended_at = $2, exit_code = $3, signal = $4, failure_class = $5,
                 error = $6, stderr_tail = $7 WHERE id = $8 AND status = 'running'",
        )
        .bind(end.status)
        .bind(now())
        .bind(end.exit_code.map(i64::from))
        .bind(end.signal.map(i64::from))
        .bind(end.failure_class)
        .bind(end.error)
        .bind(end.stderr_tail)
        .bind(attempt)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// The results of a sweep's completed trials, in trial-key order.
    pub async fn results(&self, sweep: &str) -> anyhow::Result<Vec<TrialResult>> {
        on_pool!(self, p, _d => {
            let rows = sqlx::query(select_trial_results!("WHERE sweep = $1 ORDER BY trial_key"))
                .bind(sweep)
                .fetch_all(p)
                .await?;
            rows.iter().map(|r| trial_result!(r)).collect()
        })
    }

    /// The result of one completed trial (whichever sweep it was registered by).
    pub async fn trial_result(&self, key: &str) -> anyhow::Result<Option<TrialResult>> {
        on_pool!(self, p, _d => {
            let row = sqlx::query(select_trial_results!("WHERE trial_key = $1 LIMIT 1"))
                .bind(key)
                .fetch_optional(p)
                .await?;
            row.as_ref().map(|r| trial_result!(r)).transpose()
        })
    }

    /// How the trial's latest attempt ended; None when it was never attempted.
    pub async fn latest_attempt(&self, key: &str) -> anyhow::Result<Option<AttemptSummary>> {
        type Raw = (String, Option<String>, Option<String>, Option<String>);
        let row: Option<Raw> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT status, failure_class, error, slurm_job_id FROM attempts WHERE trial_key = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(key)
        .fetch_optional(p)
        .await?);
        Ok(
            row.map(|(status, failure_class, error, slurm_job)| AttemptSummary {
                status,
                failure_class,
                error,
                slurm_job,
            }),
        )
    }

    /// Per-epoch metrics of a trial (every attempt; the latest value of an epoch wins).
    pub async fn curves(&self, key: &str) -> anyhow::Result<Curves> {
        let rows: Vec<(String, String, i64, f64)> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT split, name, epoch, value FROM trial_metrics WHERE trial_key = $1 ORDER BY split, name, epoch, attempt_id",
        )
        .bind(key)
        .fetch_all(p)
        .await?);
        let mut out = Curves::new();
        for (split, name, epoch, value) in rows {
            add_point(&mut out, split, name, epoch, value);
        }
        Ok(out)
    }

    /// The events recorded for a trial's attempts, oldest first: (kind, payload).
    pub async fn events_of(&self, key: &str) -> anyhow::Result<Vec<(String, Option<String>)>> {
        Ok(on_pool!(self, p, _d => sqlx::query_as(
            "SELECT e.kind, e.payload FROM events e JOIN attempts a ON a.id = e.attempt_id
             WHERE a.trial_key = $1 ORDER BY e.id",
        )
        .bind(key)
        .fetch_all(p)
        .await?))
    }

    /// The confusion matrix of a trial's last reported epoch, and its class names when recorded.
    pub async fn confusion(&self, key: &str) -> anyhow::Result<Option<Confusion>> {
        let (mut latest, mut names): (Option<Confusion>, Option<Vec<String>>) = (None, None);
        for (kind, payload) in self.events_of(key).await? {
            if kind != "started" && kind != "confusion" {
                continue;
            }
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
        Ok(
            on_pool!(self, p, _d => sqlx::query_scalar("SELECT name FROM sweeps ORDER BY name")
            .fetch_all(p)
            .await?),
        )
    }

    /// The trials of one sweep or all, each with its latest attempt; `status` keeps only the
    /// trials whose latest attempt has it (`pending`: never attempted).
    pub async fn trial_rows(
        &self,
        sweep: Option<&str>,
        status: Option<&str>,
    ) -> anyhow::Result<Vec<TrialRow>> {
        type Raw = (
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            i64,
            Option<f64>,
        );
        let rows: Vec<Raw> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT s.name, t.key, st.params_json, a.status, a.failure_class, a.error, a.slurm_job_id,
                    (SELECT COUNT(*) FROM attempts x WHERE x.trial_key = t.key) AS attempts,
                    (SELECT value FROM trial_metrics m WHERE m.trial_key = t.key AND m.split = 'test' AND m.name = 'accuracy' ORDER BY m.epoch DESC, m.attempt_id DESC LIMIT 1)
             FROM sweep_trials st JOIN trials t ON t.key = st.trial_key JOIN sweeps s ON s.id = st.sweep_id
             LEFT JOIN attempts a ON a.id = (SELECT MAX(id) FROM attempts b WHERE b.trial_key = t.key)
             WHERE ($1 IS NULL OR s.name = $1) AND ($2 IS NULL OR COALESCE(a.status, 'pending') = $2)
             ORDER BY s.name, st.params_json",
        )
        .bind(sweep)
        .bind(status)
        .fetch_all(p)
        .await?);
        Ok(rows
            .into_iter()
            .map(
                |(
                    sweep,
                    trial_key,
                    params_json,
                    status,
                    failure_class,
                    error,
                    slurm_job,
                    attempts,
                    acc,
                )| {
                    TrialRow {
                        sweep,
                        trial_key,
                        params_json,
                        latest: status.map(|status| AttemptSummary {
                            status,
                            failure_class,
                            error,
                            slurm_job,
                        }),
                        attempts,
                        last_test_accuracy: acc,
                    }
                },
            )
            .collect())
    }

    /// Record a submitted Slurm job array of a sweep.
    pub async fn record_slurm_job(
        &self,
        sweep_id: i64,
        job_id: &str,
        script: &str,
        tasks: usize,
    ) -> anyhow::Result<()> {
        on_pool!(self, p, _d => sqlx::query(
            "INSERT INTO slurm_jobs (job_id, sweep_id, script, tasks, submitted_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(job_id)
        .bind(sweep_id)
        .bind(script)
        .bind(tasks as i64)
        .bind(now())
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// The Slurm jobs a sweep was submitted as, oldest first.
    pub async fn slurm_jobs(&self, sweep: &str) -> anyhow::Result<Vec<String>> {
        Ok(on_pool!(self, p, _d => sqlx::query_scalar(
            "SELECT j.job_id FROM slurm_jobs j JOIN sweeps s ON s.id = j.sweep_id WHERE s.name = $1 ORDER BY j.submitted_at, j.job_id",
        )
        .bind(sweep)
        .fetch_all(p)
        .await?))
    }

    /// Mark the running attempts of a Slurm job (every task of an array) interrupted: what
    /// `fer sweep --cancel` does after `scancel`, so the trials can be claimed again at once.
    pub async fn interrupt_slurm_job(&self, job_id: &str, why: &str) -> anyhow::Result<usize> {
        let n = on_pool!(self, p, _d => sqlx::query(
            "UPDATE attempts SET status = 'interrupted', ended_at = $1, error = $2
             WHERE status = 'running'
               AND (slurm_job_id = $3 OR substr(slurm_job_id, 1, length($3) + 1) = $3 || '_')",
        )
        .bind(now())
        .bind(why)
        .bind(job_id)
        .execute(p)
        .await?
        .rows_affected());
        Ok(n as usize)
    }

    /// How many trials of a sweep are in each state (their latest attempt's status, `pending`
    /// when never attempted).
    pub async fn status_counts(&self, sweep: &str) -> anyhow::Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT COALESCE(a.status, 'pending'), COUNT(*)
             FROM sweep_trials st JOIN sweeps s ON s.id = st.sweep_id
             LEFT JOIN attempts a ON a.id = (SELECT MAX(id) FROM attempts b WHERE b.trial_key = st.trial_key)
             WHERE s.name = $1 GROUP BY COALESCE(a.status, 'pending')",
        )
        .bind(sweep)
        .fetch_all(p)
        .await?);
        Ok(rows.into_iter().collect())
    }

    /// The attempt a journal attempt became and how many of its lines are ingested.
    pub async fn journal_attempt(&self, journal_id: &str) -> anyhow::Result<Option<(i64, i64)>> {
        Ok(on_pool!(self, p, _d => sqlx::query_as(
            "SELECT attempt_id, lines FROM journal_attempts WHERE journal_id = $1",
        )
        .bind(journal_id)
        .fetch_optional(p)
        .await?))
    }

    /// Create the attempt of a journal attempt (its start record), in one transaction: an
    /// attempt of the trial still `running` (its worker ended without a record) is interrupted
    /// first. Returns the new attempt's id.
    pub async fn start_journal_attempt(
        &self,
        key: &str,
        journal_id: &str,
        who: &Claimant,
        started_at: &str,
    ) -> anyhow::Result<i64> {
        on_pool!(self, p, _d => {
            let mut tx = p.begin().await?;
            sqlx::query(
                "UPDATE attempts SET status = 'interrupted', ended_at = $1,
                     error = 'a later attempt of the trial started (its worker ended without a record)'
                 WHERE trial_key = $2 AND status = 'running'",
            )
            .bind(started_at)
            .bind(key)
            .execute(&mut *tx)
            .await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO attempts (trial_key, status, device, host, runner_pid, git_commit, git_dirty, started_at, heartbeat_at, slurm_job_id)
                 VALUES ($1, 'running', $2, $3, $4, $5, $6, $7, $7, $8) RETURNING id",
            )
            .bind(key)
            .bind(&who.device)
            .bind(&who.host)
            .bind(who.pid as i64)
            .bind(who.git_commit.as_deref())
            .bind(who.git_dirty.map(i64::from))
            .bind(started_at)
            .bind(who.slurm_job.as_deref())
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO journal_attempts (journal_id, attempt_id, lines) VALUES ($1, $2, 1)")
                .bind(journal_id)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            anyhow::Ok(id)
        })
    }

    /// Record that the first `lines` lines of a journal attempt are ingested.
    pub async fn journal_progress(&self, journal_id: &str, lines: i64) -> anyhow::Result<()> {
        on_pool!(self, p, _d => sqlx::query("UPDATE journal_attempts SET lines = $1 WHERE journal_id = $2")
            .bind(lines)
            .bind(journal_id)
            .execute(p)
            .await?
            .rows_affected());
        Ok(())
    }

    /// The running attempts of a sweep's trials that ran under Slurm: (attempt id, job task).
    pub async fn running_slurm_attempts(&self, sweep: &str) -> anyhow::Result<Vec<(i64, String)>> {
        Ok(on_pool!(self, p, _d => sqlx::query_as(
            "SELECT a.id, a.slurm_job_id FROM attempts a
             JOIN sweep_trials st ON st.trial_key = a.trial_key JOIN sweeps s ON s.id = st.sweep_id
             WHERE s.name = $1 AND a.status = 'running' AND a.slurm_job_id IS NOT NULL",
        )
        .bind(sweep)
        .fetch_all(p)
        .await?))
    }

    /// The schema as the backend reports it: (table or view, column) in order, for the test that
    /// both migrations give the same.
    pub async fn schema(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut out: Vec<(String, String)> = on_pool!(self, p, d => {
            let sql = match d {
                Dialect::Sqlite => "SELECT m.name, c.name FROM sqlite_master m, pragma_table_info(m.name) c
                     WHERE m.type IN ('table', 'view') AND m.name NOT LIKE 'sqlite_%' AND m.name != '_sqlx_migrations'",
                Dialect::Postgres => "SELECT table_name::text, column_name::text FROM information_schema.columns
                     WHERE table_schema = current_schema() AND table_name != '_sqlx_migrations'",
            };
            sqlx::query_as(sql).fetch_all(p).await?
        });
        out.sort();
        Ok(out)
    }
}

fn sqlite_options(path: &Path) -> anyhow::Result<SqliteConnectOptions> {
    Ok(SqliteConnectOptions::from_str(&format!(
        "sqlite://{}",
        path.display()
    ))?)
}

/// A read-only pool on a SQLite file.
async fn sqlite_read_only(path: &Path) -> anyhow::Result<SqlitePool> {
    // SQLite opens lazily: a connection is usable once it has read the schema.
    let connect = |immutable: bool| async move {
        let opts = sqlite_options(path)?
            .read_only(true)
            .immutable(immutable)
            .create_if_missing(false)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        sqlx::query("SELECT COUNT(*) FROM sqlite_master")
            .fetch_one(&pool)
            .await?;
        anyhow::Ok(pool)
    };
    match connect(false).await {
        Ok(pool) => Ok(pool),
        // A WAL database in a folder SQLite cannot write (a read-only mount, a snapshot)
        // cannot be read normally: SQLite must create its shared-memory file next to it.
        // There it is read as immutable (no locks, no shared memory), which is right when
        // nothing can write to it; any other failure keeps its own message.
        Err(e) => match connect(true).await {
            Ok(pool) => Ok(pool),
            Err(_) => Err(e.context(format!("opening database {} read-only", path.display()))),
        },
    }
}

/// A pool on a PostgreSQL database (`read_only`: every transaction read-only). The password
/// comes from the URL, `PGPASSWORD` or the password file (`PGPASSFILE`, `~/.pgpass`).
async fn pg_pool(url: &DbUrl, read_only: bool) -> anyhow::Result<PgPool> {
    let DbUrl::Postgres(raw) = url else {
        unreachable!("pg_pool on a SQLite location")
    };
    let mut opts = PgConnectOptions::from_str(raw)
        .map_err(|e| anyhow::anyhow!("{url}: not a PostgreSQL URL: {e}"))?
        .application_name("fer");
    if read_only {
        opts = opts.options([("default_transaction_read_only", "on")]);
    }
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts)
        .await
        // sqlx's errors do not contain the URL; ours shows it masked.
        .with_context(|| format!("connecting to database {url}"))
}

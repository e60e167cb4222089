//! What `fer serve` reads: whole sweeps at once (one statement per table, not one per trial),
//! attempts in full, live progress, and a token that changes whenever the results do.

use std::collections::{BTreeMap, HashMap};

use sqlx::Row;

use super::{add_point, Curves, Dialect, Pool, Store};

/// A sweep as the dashboard's first page lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SweepSummary {
    pub name: String,
    pub file: String,
    pub report: Option<String>,
    pub created_at: String,
    /// Trials by the status of their latest attempt (`pending`: never attempted).
    pub counts: BTreeMap<String, i64>,
}

/// One attempt of a trial, as recorded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptDetail {
    pub id: i64,
    pub status: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub heartbeat_at: Option<String>,
    pub device: String,
    pub host: String,
    pub pid: i64,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub failure_class: Option<String>,
    pub error: Option<String>,
    /// Omitted where many attempts are listed at once (the trial table).
    pub stderr_tail: Option<String>,
    pub slurm_job: Option<String>,
    /// The latest training step reported: (epoch, step, steps per epoch).
    pub progress: Option<(i64, i64, i64)>,
}

/// A trial of a sweep with its latest attempt.
#[derive(Debug, Clone)]
pub struct SweepTrial {
    pub key: String,
    pub seed: i64,
    /// This sweep's axis values for the trial.
    pub params_json: String,
    pub config_json: String,
    pub attempts: i64,
    pub latest: Option<AttemptDetail>,
}

/// The columns `attempt_detail!` reads, in its order (a macro: statements are static text).
macro_rules! attempt_columns {
    () => {
        "a.id, a.status, a.started_at, a.ended_at, a.heartbeat_at, a.device, a.host, a.runner_pid,
         a.git_commit, a.git_dirty, a.exit_code, a.signal, a.failure_class, a.error, a.stderr_tail,
         a.slurm_job_id, a.progress_epoch, a.progress_step, a.progress_steps"
    };
}

/// An `AttemptDetail` from a row whose columns `offset..` are `attempt_columns!()`.
macro_rules! attempt_detail {
    ($r:expr, $o:expr) => {{
        let (r, o) = ($r, $o);
        let progress = match (
            r.get::<Option<i64>, _>(o + 16),
            r.get::<Option<i64>, _>(o + 17),
            r.get::<Option<i64>, _>(o + 18),
        ) {
            (Some(e), Some(s), Some(n)) => Some((e, s, n)),
            _ => None,
        };
        AttemptDetail {
            id: r.get(o),
            status: r.get(o + 1),
            started_at: r.get(o + 2),
            ended_at: r.get(o + 3),
            heartbeat_at: r.get(o + 4),
            device: r.get(o + 5),
            host: r.get(o + 6),
            pid: r.get(o + 7),
            git_commit: r.get(o + 8),
            git_dirty: r.get::<Option<i64>, _>(o + 9).map(|d| d != 0),
            exit_code: r.get(o + 10),
            signal: r.get(o + 11),
            failure_class: r.get(o + 12),
            error: r.get(o + 13),
            stderr_tail: r.get(o + 14),
            slurm_job: r.get(o + 15),
            progress,
        }
    }};
}

impl Store {
    /// Every sweep with its trials counted by status, by name.
    pub async fn sweep_summaries(&self) -> anyhow::Result<Vec<SweepSummary>> {
        let sweeps: Vec<(String, String, Option<String>, String)> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT name, file, report, created_at FROM sweeps ORDER BY name",
        )
        .fetch_all(p)
        .await?);
        let counts: Vec<(String, String, i64)> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT s.name, COALESCE(a.status, 'pending'), COUNT(*)
             FROM sweep_trials st JOIN sweeps s ON s.id = st.sweep_id
             LEFT JOIN attempts a ON a.id = (SELECT MAX(id) FROM attempts b WHERE b.trial_key = st.trial_key)
             GROUP BY s.name, COALESCE(a.status, 'pending')",
        )
        .fetch_all(p)
        .await?);
        let mut by_sweep: HashMap<String, BTreeMap<String, i64>> = HashMap::new();
        for (sweep, status, n) in counts {
            by_sweep.entry(sweep).or_default().insert(status, n);
        }
        Ok(sweeps
            .into_iter()
            .map(|(name, file, report, created_at)| SweepSummary {
                counts: by_sweep.remove(&name).unwrap_or_default(),
                name,
                file,
                report,
                created_at,
            })
            .collect())
    }

    /// The trials of a sweep, each with its latest attempt (without its stderr tail).
    pub async fn sweep_trials(&self, sweep: &str) -> anyhow::Result<Vec<SweepTrial>> {
        const SQL: &str = concat!(
            "SELECT t.key, t.seed, st.params_json, t.config_json,
                    (SELECT COUNT(*) FROM attempts x WHERE x.trial_key = t.key), ",
            attempt_columns!(),
            " FROM sweep_trials st JOIN trials t ON t.key = st.trial_key JOIN sweeps s ON s.id = st.sweep_id
             LEFT JOIN attempts a ON a.id = (SELECT MAX(id) FROM attempts b WHERE b.trial_key = t.key)
             WHERE s.name = $1 ORDER BY st.params_json, t.seed"
        );
        on_pool!(self, p, _d => {
            let rows = sqlx::query(SQL).bind(sweep).fetch_all(p).await?;
            Ok(rows
                .iter()
                .map(|r| SweepTrial {
                    key: r.get(0),
                    seed: r.get(1),
                    params_json: r.get(2),
                    config_json: r.get(3),
                    attempts: r.get(4),
                    latest: r.get::<Option<i64>, _>(5).map(|_| AttemptDetail {
                        stderr_tail: None,
                        ..attempt_detail!(r, 5)
                    }),
                })
                .collect())
        })
    }

    /// Per trial of a sweep, its curves of metric `name` on every split (`test/accuracy`,
    /// `train/accuracy`, ...), as `curves` gives them.
    pub async fn sweep_curves(
        &self,
        sweep: &str,
        name: &str,
    ) -> anyhow::Result<HashMap<String, Curves>> {
        let rows: Vec<(String, String, i64, f64)> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT tm.trial_key, tm.split, tm.epoch, tm.value
             FROM trial_metrics tm JOIN sweep_trials st ON st.trial_key = tm.trial_key
             JOIN sweeps s ON s.id = st.sweep_id
             WHERE s.name = $1 AND tm.name = $2
             ORDER BY tm.trial_key, tm.split, tm.epoch, tm.attempt_id",
        )
        .bind(sweep)
        .bind(name)
        .fetch_all(p)
        .await?);
        let mut out: HashMap<String, Curves> = HashMap::new();
        for (key, split, epoch, value) in rows {
            add_point(
                out.entry(key).or_default(),
                split,
                name.to_string(),
                epoch,
                value,
            );
        }
        Ok(out)
    }

    /// The (split, name) of every metric a sweep's trials recorded.
    pub async fn sweep_metric_names(&self, sweep: &str) -> anyhow::Result<Vec<(String, String)>> {
        Ok(on_pool!(self, p, _d => sqlx::query_as(
            "SELECT DISTINCT tm.split, tm.name
             FROM trial_metrics tm JOIN sweep_trials st ON st.trial_key = tm.trial_key
             JOIN sweeps s ON s.id = st.sweep_id
             WHERE s.name = $1 ORDER BY tm.split, tm.name",
        )
        .bind(sweep)
        .fetch_all(p)
        .await?))
    }

    /// A trial's seed and resolved config, and the sweeps it belongs to with their axis values.
    pub async fn trial_definition(
        &self,
        key: &str,
    ) -> anyhow::Result<Option<(i64, String, Vec<(String, String)>)>> {
        let trial: Option<(i64, String)> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT seed, config_json FROM trials WHERE key = $1",
        )
        .bind(key)
        .fetch_optional(p)
        .await?);
        let Some((seed, config)) = trial else {
            return Ok(None);
        };
        let sweeps: Vec<(String, String)> = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT s.name, st.params_json FROM sweep_trials st JOIN sweeps s ON s.id = st.sweep_id
             WHERE st.trial_key = $1 ORDER BY s.name",
        )
        .bind(key)
        .fetch_all(p)
        .await?);
        Ok(Some((seed, config, sweeps)))
    }

    /// Every attempt of a trial, oldest first, with its stderr tail.
    pub async fn attempts_of(&self, key: &str) -> anyhow::Result<Vec<AttemptDetail>> {
        const SQL: &str = concat!(
            "SELECT ",
            attempt_columns!(),
            " FROM attempts a WHERE a.trial_key = $1 ORDER BY a.id"
        );
        on_pool!(self, p, _d => {
            let rows = sqlx::query(SQL).bind(key).fetch_all(p).await?;
            Ok(rows.iter().map(|r| attempt_detail!(r, 0)).collect())
        })
    }

    /// Record where a running attempt is within its epoch.
    pub async fn progress(
        &self,
        attempt: i64,
        epoch: usize,
        step: usize,
        steps: usize,
    ) -> anyhow::Result<()> {
        on_pool!(self, p, _d => sqlx::query(
            "UPDATE attempts SET progress_epoch = $2, progress_step = $3, progress_steps = $4
             WHERE id = $1 AND status = 'running'",
        )
        .bind(attempt)
        .bind(epoch as i64)
        .bind(step as i64)
        .bind(steps as i64)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// A token that changes whenever anything the dashboard shows does: a metric, an event, an
    /// attempt started or ended, a step of progress, a trial registered.
    pub async fn data_version(&self) -> anyhow::Result<String> {
        let (metrics, events, attempts, ended, progress, trials): (
            i64,
            i64,
            i64,
            Option<String>,
            i64,
            i64,
        ) = on_pool!(self, p, _d => sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM metrics), (SELECT COALESCE(MAX(id), 0) FROM events),
                    (SELECT COUNT(*) FROM attempts), (SELECT MAX(ended_at) FROM attempts),
                    (SELECT CAST(COALESCE(SUM(progress_epoch * 1000000 + progress_step), 0) AS BIGINT)
                       FROM attempts WHERE status = 'running'),
                    (SELECT COUNT(*) FROM sweep_trials)",
        )
        .fetch_one(p)
        .await?);
        Ok(format!(
            "{metrics}.{events}.{attempts}.{}.{progress}.{trials}",
            ended.unwrap_or_default()
        ))
    }
}

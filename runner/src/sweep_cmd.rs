//! `fer sweep` and `fer runs`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::scheduler::{self, Options};
use crate::store::{AttemptSummary, Claimant, DbUrl, Store};
use crate::sweep;

pub const DEFAULT_DB: &str = "fer.db";

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// Sweep file (YAML), e.g. experiments/heads.yaml.
    pub file: PathBuf,
    /// Print the trial table and what would happen to each trial; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Results database: a SQLite file (PATH or sqlite:PATH) or postgres://USER@HOST/DB (the
    /// password from PGPASSFILE / ~/.pgpass or PGPASSWORD, not the command line).
    #[arg(long, env = "FER_DB", default_value = DEFAULT_DB, hide_env_values = true)]
    pub db: DbUrl,
    /// Trials at a time on the CPU (each with the sweep's threads_per_trial).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// GPU indices to use, one trial per GPU (default: all that nvidia-smi lists, CUDA builds only).
    #[arg(long)]
    pub gpus: Option<String>,
    /// A profile of the sweep file (e.g. `thesis`).
    #[arg(long)]
    pub profile: Option<String>,
    /// Where trial run directories go.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Run failed trials again even when their retries are used up (after fixing the cause).
    #[arg(long)]
    pub retry_failed: bool,
    /// The most trials the sweep may expand to (checked before expanding).
    #[arg(long, default_value_t = sweep::DEFAULT_MAX_TRIALS)]
    pub max_trials: usize,
    /// Where the trials run: here (`local`), or as a Slurm job array whose tasks run
    /// `fer worker` against the shared store (`slurm`: submits and exits).
    #[arg(long, value_enum, default_value = "local")]
    pub launcher: Launcher,
    /// Slurm partition (`--launcher slurm`).
    #[arg(long)]
    pub partition: Option<String>,
    /// Slurm account (`--launcher slurm`).
    #[arg(long)]
    pub account: Option<String>,
    /// A raw sbatch option for the job array, e.g. `--sbatch-arg=--qos=high` (repeatable).
    #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// At most this many array tasks at once (default: one per trial to run).
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Seconds before a task's time limit at which it stops its trial (checkpointed at the
    /// last epoch) and requeues itself.
    #[arg(long, default_value_t = 300)]
    pub signal_seconds: u32,
    /// Show the sweep's trials by state and its Slurm jobs as the queue sees them; run nothing.
    #[arg(long, conflicts_with_all = ["cancel", "dry_run"])]
    pub status: bool,
    /// Cancel the sweep's Slurm jobs (scancel) and mark their running attempts interrupted.
    #[arg(long, conflicts_with = "dry_run")]
    pub cancel: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    Local,
    Slurm,
}

#[derive(Args, Debug)]
pub struct RunsArgs {
    /// Results database (as `fer sweep --db`).
    #[arg(long, env = "FER_DB", default_value = DEFAULT_DB, hide_env_values = true)]
    pub db: DbUrl,
    /// Only this sweep.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Only trials whose latest attempt has this status (completed, failed, interrupted, running,
    /// or pending: never started).
    #[arg(long)]
    pub status: Option<String>,
}

/// The Slurm job this process runs in (`JOBID` or `JOBID_TASK` for an array task), if any.
pub fn slurm_job() -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("SLURM_ARRAY_JOB_ID"), var("SLURM_ARRAY_TASK_ID")) {
        (Some(job), Some(task)) => Some(format!("{job}_{task}")),
        _ => var("SLURM_JOB_ID"),
    }
}

/// This process as the claimant of attempts on `device` (empty: each slot's).
pub fn this_process(device: &str, git: (Option<String>, Option<bool>)) -> Claimant {
    Claimant {
        device: device.to_string(),
        host: hostname(),
        pid: std::process::id(),
        git_commit: git.0,
        git_dirty: git.1,
        slurm_job: slurm_job(),
    }
}

/// The current commit and whether the work tree has changes (None outside a git checkout).
pub fn git_version() -> (Option<String>, Option<bool>) {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = run(&["rev-parse", "HEAD"]);
    let dirty = commit
        .as_ref()
        .and(run(&["status", "--porcelain", "--untracked-files=no"]))
        .map(|s| !s.is_empty());
    (commit, dirty)
}

/// This machine's name (what attempts record as their host).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or fails.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = buf.split(|&b| b == 0).next().unwrap_or(&[]);
    if ok && !name.is_empty() {
        String::from_utf8_lossy(name).into_owned()
    } else {
        "localhost".into()
    }
}

/// Register the sweep and its trials in the store (idempotent): its id.
pub async fn register(store: &Store, sweep: &sweep::Sweep, file: &Path) -> anyhow::Result<i64> {
    let sweep_id = store
        .upsert_sweep(
            &sweep.name,
            &file.display().to_string(),
            sweep.spec.report.as_ref().map(|_| sweep.base_name.as_str()),
        )
        .await?;
    for t in &sweep.trials {
        store
            .upsert_trial(
                &t.key,
                sweep_id,
                t.seed,
                &t.config_json,
                &serde_json::to_value(&t.params)?,
            )
            .await?;
    }
    Ok(sweep_id)
}

pub async fn sweep(args: SweepArgs) -> anyhow::Result<()> {
    let git = git_version();
    let sweep = sweep::load_capped(
        &args.file,
        args.profile.as_deref(),
        git.0.as_deref(),
        args.max_trials,
    )
    // A sweep file that does not expand is a setup error (exit 2), like a failed preflight.
    .map_err(|e| fer_model::trainer::classified(fer_model::trainer::FailureClass::Setup, e))?;
    if args.status {
        return status(&args, &sweep).await;
    }
    if args.cancel {
        return cancel(&args, &sweep).await;
    }
    if args.dry_run {
        // Look, do not touch: no database is created, no attempt is marked, no trial recorded.
        let planned = match Store::open_read_only(&args.db).await? {
            Some(store) => scheduler::plan_all(&sweep, &store, args.retry_failed).await?,
            None => sweep
                .trials
                .iter()
                .map(|t| (t.clone(), scheduler::Action::Run))
                .collect(),
        };
        println!(
            "sweep {} ({} trials, file {})",
            sweep.name,
            planned.len(),
            args.file.display()
        );
        println!("{:<18} {:<32} params", "trial", "action");
        for (t, a) in &planned {
            println!(
                "{:<18} {:<32} {}",
                &t.key[..16],
                a.label(),
                serde_json::to_string(&t.params)?
            );
        }
        return Ok(());
    }
    let store = Store::open(&args.db).await?;
    let recovered = store
        .expire_leases(&hostname(), crate::store::LEASE)
        .await?;
    // Data, noise files and weights the trials to run share: checked once, before any starts.
    {
        let planned = scheduler::plan_all(&sweep, &store, args.retry_failed).await?;
        let to_run: Vec<&sweep::Trial> = planned
            .iter()
            .filter(|(_, a)| a.runs())
            .map(|(t, _)| t)
            .collect();
        crate::preflight::check(&to_run).map_err(|e| {
            fer_model::trainer::classified(fer_model::trainer::FailureClass::Setup, e.context(format!(
                "setup check of sweep {} failed before any trial started (nothing was recorded against a trial; fix it and run the sweep again)",
                sweep.name
            )))
        })?;
    }
    let sweep_id = register(&store, &sweep, &args.file).await?;
    if args.launcher == Launcher::Slurm {
        let submitted = submit_slurm(&args, &sweep, &store, sweep_id).await;
        store.close().await;
        return submitted;
    }
    let log_dir = args.runs_dir.join(&sweep.name);
    std::fs::create_dir_all(&log_dir)?;
    init_log(&log_dir.join("runner.log"))?;
    tracing::info!(sweep = %sweep.name, trials = sweep.trials.len(), recovered, "sweep start");
    let started = std::time::Instant::now();
    let slots = scheduler::slots(args.jobs, args.gpus.as_deref());
    let outcome = scheduler::run(
        &sweep,
        &store,
        Options {
            retry_failed: args.retry_failed,
            retry_divergence: sweep.spec.retry.divergence,
            runs_dir: args.runs_dir.clone(),
            slots,
            claimant: this_process("", git),
            stop_on_usr1: false,
            wind_down_grace: std::time::Duration::ZERO,
        },
    )
    .await?;
    eprintln!(
        "sweep {}: {} completed, {} failed, {} skipped in {:.0} s{}",
        sweep.name,
        outcome.completed,
        outcome.failed,
        outcome.skipped,
        started.elapsed().as_secs_f64(),
        if outcome.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );
    if let Some(e) = &outcome.store_error {
        anyhow::bail!("sweep {} stopped: {e}", sweep.name);
    }
    let results = store.results(&sweep.name).await?;
    println!("{}", scheduler::summary_table(&results));
    if outcome.failed > 0 {
        eprintln!(
            "failed trials and their errors: fer runs --status failed --sweep {}",
            sweep.name
        );
    }
    // Trials that ended failed, in this run or before it (no retries left): the sweep did not
    // produce all its results, so a script or CI job must not read it as a success.
    let failed = if outcome.interrupted {
        0
    } else {
        let planned = scheduler::plan_all(&sweep, &store, false).await?;
        planned
            .iter()
            .filter(|(_, a)| *a == scheduler::Action::GiveUp || *a == scheduler::Action::Retry)
            .count()
    };
    // Closing folds SQLite's write-ahead log back into the database file, so the file alone
    // (copied elsewhere, or on a read-only mount) holds every result.
    store.close().await;
    if outcome.interrupted {
        std::process::exit(EXIT_INTERRUPTED);
    }
    if failed > 0 {
        eprintln!(
            "{failed} trial(s) of sweep {} ended failed (exit status {EXIT_TRIALS_FAILED})",
            sweep.name
        );
        std::process::exit(EXIT_TRIALS_FAILED);
    }
    Ok(())
}

/// `fer sweep` exit statuses: 0 every trial completed; 1 an error of the sweep itself (database,
/// disk); 2 a setup error (a sweep file that does not expand, a failed preflight); 3 some trials ended failed (`fer runs --status failed`); 130 interrupted (Ctrl-C or
/// SIGTERM: running trials stopped and marked interrupted, waiting ones never started).
pub const EXIT_TRIALS_FAILED: i32 = 3;
pub const EXIT_INTERRUPTED: i32 = 130;

/// Statuses an attempt can have (the `attempts.status` check constraint), and `pending`.
const STATUSES: [&str; 5] = ["completed", "failed", "interrupted", "running", "pending"];

fn init_log(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .try_init();
    Ok(())
}

pub async fn runs(args: RunsArgs) -> anyhow::Result<()> {
    if !args.db.may_exist() {
        anyhow::bail!(
            "{}: no results database yet (run a sweep first, or pass --db)",
            args.db
        );
    }
    let store = Store::open_for_reading(&args.db).await?;
    if let Some(st) = &args.status {
        if !STATUSES.contains(&st.as_str()) {
            anyhow::bail!(
                "--status {st:?}: not a trial status (one of: {})",
                STATUSES.join(", ")
            );
        }
    }
    if let Some(name) = &args.sweep {
        let known = store.sweep_names().await?;
        if !known.contains(name) {
            anyhow::bail!(
                "--sweep {name:?}: no such sweep in {} (sweeps: {})",
                args.db,
                if known.is_empty() {
                    "none yet".to_string()
                } else {
                    known.join(", ")
                }
            );
        }
    }
    let rows = store
        .trial_rows(args.sweep.as_deref(), args.status.as_deref())
        .await?;
    println!(
        "{:<10} {:<16} {:<12} {:>8} {:>9} {:<13}  params / error",
        "sweep", "trial", "status", "attempts", "test acc", "plateau"
    );
    let mut undertrained = 0;
    // Trials whose latest attempt ran under Slurm: the queue's state of their task next to ours.
    let jobs: Vec<String> = rows
        .iter()
        .filter_map(|r| r.latest.as_ref()?.slurm_job.clone())
        .collect();
    let queue = if jobs.is_empty() {
        Vec::new()
    } else {
        let ids: Vec<String> = jobs
            .iter()
            .map(|j| j.split('_').next().unwrap_or(j).to_string())
            .collect();
        crate::slurm::squeue(&ids).unwrap_or_default()
    };
    for r in rows {
        let status = r.latest.as_ref().map(|a| a.status.as_str());
        let slurm = r
            .latest
            .as_ref()
            .and_then(|a| a.slurm_job.as_deref())
            .map(|job| {
                let state = queue
                    .iter()
                    .find(|t| t.id == job)
                    .map_or("not in queue", |t| t.state.as_str());
                format!("  [slurm {job}: {state}]")
            });
        // The plateau rule (mean of the last 3 test epochs within 1 point of the best), for
        // completed trials.
        let plateau = if status == Some("completed") {
            let curve: Vec<f64> = store
                .curves(&r.trial_key)
                .await?
                .remove(&("test".to_string(), "accuracy".to_string()))
                .unwrap_or_default()
                .into_iter()
                .map(|(_, a)| a)
                .collect();
            match crate::stats::plateau(&curve) {
                Some(p) if p.undertrained => {
                    undertrained += 1;
                    "UNDERTRAINED"
                }
                Some(_) => "yes",
                None => "-",
            }
        } else {
            "-"
        };
        let failure = match &r.latest {
            Some(AttemptSummary {
                failure_class: Some(c),
                error: Some(e),
                ..
            }) => format!("  [{c}] {e}"),
            _ => String::new(),
        };
        println!(
            "{:<10} {:<16} {:<12} {:>8} {:>9} {:<13}  {}{}{}",
            r.sweep,
            &r.trial_key[..16],
            status.unwrap_or("pending"),
            r.attempts,
            r.last_test_accuracy
                .map(|a| format!("{:.2}%", 100.0 * a))
                .unwrap_or_else(|| "-".into()),
            plateau,
            r.params_json,
            failure,
            slurm.unwrap_or_default()
        );
    }
    if undertrained > 0 {
        println!(
            "\n{undertrained} finished trial(s) UNDERTRAINED: the mean test accuracy of their last 3 epochs is more than 1 point below their best epoch (still rising or unsettled); train them longer before reading their accuracy as a result."
        );
    }
    Ok(())
}

/// `--launcher slurm`: the trials to run as one job array of workers, submitted; its script in
/// `RUNS/<sweep>/slurm/<job>.sbatch`.
async fn submit_slurm(
    args: &SweepArgs,
    sweep: &sweep::Sweep,
    store: &Store,
    sweep_id: i64,
) -> anyhow::Result<()> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let runs_dir = absolute(&args.runs_dir);
    // A SQLite store cannot be shared over a network file system: the workers write journals
    // into the runs folder instead, and what they wrote so far is ingested before planning.
    let journal_mode = matches!(args.db, DbUrl::Sqlite(_));
    if journal_mode {
        let synced = crate::journal::sync(store, sweep, &runs_dir).await?;
        if synced.records > 0 || synced.abandoned > 0 {
            println!("synced the workers' journals: {synced:?}");
        }
    }
    let planned = scheduler::plan_all(sweep, store, args.retry_failed).await?;
    let to_run = planned.iter().filter(|(_, a)| a.runs()).count();
    let running = planned
        .iter()
        .filter(|(_, a)| *a == scheduler::Action::SkipRunning)
        .count();
    if to_run == 0 {
        println!(
            "sweep {}: nothing to submit ({} trials: {} running, the rest done or out of retries)",
            sweep.name,
            planned.len(),
            running
        );
        return Ok(());
    }
    let dir = crate::slurm::dir(&runs_dir, &sweep.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sub = crate::slurm::Submission {
        partition: args.partition.clone(),
        account: args.account.clone(),
        sbatch_args: args.sbatch_args.clone(),
        parallel: args.parallel.unwrap_or(to_run),
        signal_seconds: args.signal_seconds,
    };
    // Journal mode: task i runs the i-th trial to run (no claims to race for).
    let manifest = if journal_mode {
        let keys: Vec<&str> = planned
            .iter()
            .filter(|(_, a)| a.runs())
            .map(|(t, _)| t.key.as_str())
            .collect();
        let stamp = crate::store::timestamp(std::time::SystemTime::now()).replace([':', '.'], "");
        let path = dir.join(format!("{stamp}.trials"));
        std::fs::write(&path, keys.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        Some(path)
    } else {
        None
    };
    let script = crate::slurm::script(
        sweep,
        to_run,
        &sub,
        &crate::slurm::WorkerCommand {
            fer: &std::env::current_exe()?,
            sweep_file: &absolute(&args.file),
            profile: args.profile.as_deref(),
            runs_dir: &runs_dir,
            journal: manifest.as_deref(),
        },
    )?;
    let pending = dir.join("pending.sbatch");
    std::fs::write(&pending, &script).with_context(|| format!("writing {}", pending.display()))?;
    let job = crate::slurm::submit(&pending, &args.db)?;
    let path = dir.join(format!("{job}.sbatch"));
    std::fs::rename(&pending, &path)?;
    store
        .record_slurm_job(sweep_id, &job, &path.display().to_string(), to_run)
        .await?;
    println!(
        "sweep {}: submitted Slurm job {job}: {to_run} worker task(s), at most {} at a time, for {to_run} trial(s) ({} already running, the rest done); script {}",
        sweep.name,
        sub.parallel.clamp(1, to_run),
        running,
        path.display()
    );
    println!(
        "follow it with `fer sweep {} --status`; results with `fer runs --sweep {}`{}",
        args.file.display(),
        sweep.name,
        if journal_mode {
            format!(" after `fer sync {}`", args.file.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `--status`: the sweep's trials by state, and its Slurm jobs' tasks as the queue shows them.
async fn status(args: &SweepArgs, sweep: &sweep::Sweep) -> anyhow::Result<()> {
    if matches!(args.db, DbUrl::Sqlite(_)) && args.db.may_exist() {
        // Journal mode: what the workers wrote so far first.
        let store = Store::open(&args.db).await?;
        crate::journal::sync(&store, sweep, &args.runs_dir).await?;
        store.close().await;
    }
    let Some(store) = Store::open_read_only(&args.db).await? else {
        println!(
            "sweep {}: not started ({} has no results yet)",
            sweep.name, args.db
        );
        return Ok(());
    };
    let counts = store.status_counts(&sweep.name).await?;
    let known: i64 = counts.values().sum();
    let mut line = format!("sweep {}: {} trials", sweep.name, sweep.trials.len());
    for (state, n) in &counts {
        line.push_str(&format!(", {n} {state}"));
    }
    let unregistered = sweep.trials.len() as i64 - known;
    if unregistered > 0 {
        line.push_str(&format!(", {unregistered} not yet registered"));
    }
    println!("{line}");
    let jobs = store.slurm_jobs(&sweep.name).await?;
    if jobs.is_empty() {
        println!("no Slurm jobs (run with --launcher slurm to submit one)");
    } else {
        let queued = crate::slurm::squeue(&jobs)?;
        for job in &jobs {
            let tasks: Vec<_> = queued
                .iter()
                .filter(|t| t.id == *job || t.id.starts_with(&format!("{job}_")))
                .collect();
            if tasks.is_empty() {
                match crate::slurm::sacct(job) {
                    Some(done) => {
                        for (id, state) in done {
                            println!("Slurm job {job}: task {id} {state} (sacct)");
                        }
                    }
                    None => println!(
                        "Slurm job {job}: no task in the queue (finished or cancelled; no Slurm accounting to say which)"
                    ),
                }
            }
            for t in tasks {
                println!(
                    "Slurm job {job}: task {} {} for {} {}",
                    t.id, t.state, t.time, t.reason
                );
            }
        }
    }
    store.close().await;
    Ok(())
}

/// `--cancel`: scancel every job of the sweep and mark their running attempts interrupted.
async fn cancel(args: &SweepArgs, sweep: &sweep::Sweep) -> anyhow::Result<()> {
    let Some(store) = Store::open_read_only(&args.db).await? else {
        println!(
            "sweep {}: nothing to cancel ({} has no results yet)",
            sweep.name, args.db
        );
        return Ok(());
    };
    let jobs = store.slurm_jobs(&sweep.name).await?;
    store.close().await;
    if jobs.is_empty() {
        println!("sweep {}: no Slurm jobs to cancel", sweep.name);
        return Ok(());
    }
    let store = Store::open(&args.db).await?;
    if matches!(args.db, DbUrl::Sqlite(_)) {
        crate::journal::sync(&store, sweep, &args.runs_dir).await?;
    }
    for job in &jobs {
        crate::slurm::scancel(job)?;
        let n = store
            .interrupt_slurm_job(job, "cancelled with fer sweep --cancel")
            .await?;
        println!("Slurm job {job}: cancelled; {n} running attempt(s) marked interrupted");
    }
    store.close().await;
    Ok(())
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The sweep file whose workers' journals to ingest.
    pub file: PathBuf,
    /// The sweep's profile.
    #[arg(long)]
    pub profile: Option<String>,
    /// The runs folder the workers wrote to.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// The results database to ingest into.
    #[arg(long, env = "FER_DB", default_value = DEFAULT_DB, hide_env_values = true)]
    pub db: DbUrl,
}

/// `fer sync`: ingest the journals of a sweep's workers (journal mode) into the store; running
/// it again adds only what is new.
pub async fn sync(args: SyncArgs) -> anyhow::Result<()> {
    let (commit, _) = git_version();
    let sweep = sweep::load(&args.file, args.profile.as_deref(), commit.as_deref())?;
    let store = Store::open(&args.db).await?;
    register(&store, &sweep, &args.file).await?;
    let synced = crate::journal::sync(&store, &sweep, &args.runs_dir).await?;
    store.close().await;
    println!(
        "sweep {}: {} journal record(s) ingested into {} ({} attempt(s) started, {} ended, {} abandoned by their task)",
        sweep.name,
        synced.records,
        args.db,
        synced.attempts_started,
        synced.attempts_ended,
        synced.abandoned
    );
    Ok(())
}

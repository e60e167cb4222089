//! `fer worker`: one task of a sweep's Slurm job array (or any process pointed at a shared
//! store): it claims the sweep's missing trials one at a time, runs each as `fer train`, streams
//! its events into the store and renews its lease, until no trial is left to claim. SIGTERM
//! (`scancel`) interrupts the running trial; SIGUSR1 (Slurm's warning before the time limit)
//! interrupts it too and requeues the task, which resumes the trial from its last checkpoint.

use std::path::PathBuf;

use clap::Args;

use crate::scheduler::{self, Options, Slot};
use crate::store::{DbUrl, Store};
use crate::sweep;
use crate::sweep_cmd::{git_version, register, this_process, DEFAULT_DB};

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The sweep file (as given to `fer sweep --launcher slurm`).
    pub file: PathBuf,
    /// The sweep's profile.
    #[arg(long)]
    pub profile: Option<String>,
    /// Where trial run directories go (shared by every node).
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// On SIGUSR1, how long a running trial may take to reach its next epoch checkpoint before
    /// it is stopped anyway (`fer sweep --launcher slurm` sets it from --signal-seconds).
    #[arg(long, default_value_t = 120)]
    pub grace_seconds: u64,
    /// Journal mode (no database server): run the trial this array task is given in this
    /// manifest of trial keys (task i = line i), writing its events to the trial's journal in the
    /// runs folder for `fer sync`.
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// The shared results store (normally from FER_DB, which Slurm exports to the task).
    #[arg(long, env = "FER_DB", default_value = DEFAULT_DB, hide_env_values = true)]
    pub db: DbUrl,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let git = git_version();
    let mut sweep = sweep::load(&args.file, args.profile.as_deref(), git.0.as_deref())
        .map_err(|e| fer_model::trainer::classified(fer_model::trainer::FailureClass::Setup, e))?;
    if let Some(manifest) = &args.journal {
        let manifest = manifest.clone();
        return run_journaled(&args, &mut sweep, &manifest, git).await;
    }
    let store = Store::open(&args.db).await?;
    let me = this_process("", git);
    let expired = store.expire_leases(&me.host, crate::store::LEASE).await?;
    register(&store, &sweep, &args.file).await?;
    let slot = task_slot(&mut sweep);
    eprintln!(
        "fer worker on {} (Slurm job {}): sweep {} in {}, {} trial(s); {expired} expired lease(s) released",
        me.host,
        me.slurm_job.as_deref().unwrap_or("none"),
        sweep.name,
        args.db,
        sweep.trials.len()
    );
    let outcome = scheduler::run(
        &sweep,
        &store,
        Options {
            retry_failed: false,
            retry_divergence: sweep.spec.retry.divergence,
            runs_dir: args.runs_dir.clone(),
            slots: vec![slot],
            claimant: me.clone(),
            stop_on_usr1: true,
            wind_down_grace: std::time::Duration::from_secs(args.grace_seconds),
        },
    )
    .await?;
    store.close().await;
    eprintln!(
        "fer worker: {} completed, {} failed, {} skipped (done or claimed elsewhere)",
        outcome.completed, outcome.failed, outcome.skipped
    );
    if let Some(e) = &outcome.store_error {
        anyhow::bail!("worker stopped: {e}");
    }
    if outcome.requeue {
        match &me.slurm_job {
            Some(job) => requeue_self(job)?,
            None => eprintln!("fer worker: SIGUSR1 outside Slurm: stopped"),
        }
    }
    Ok(())
}

/// This task's one slot (its GPUs as Slurm exposes them); a trial gets the task's CPUs
/// (`resources.cpus`, as sbatch allocated them).
fn task_slot(sweep: &mut sweep::Sweep) -> Slot {
    let r = &sweep.spec.resources;
    sweep.spec.resources.threads_per_trial = r.cpus.unwrap_or(r.threads_per_trial).max(1);
    if sweep.spec.resources.gpus > 0 {
        Slot {
            device: "cuda".into(),
            cuda_visible: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
            label: "slurm-gpu".into(),
        }
    } else {
        Slot {
            device: "cpu".into(),
            cuda_visible: None,
            label: "slurm-cpu".into(),
        }
    }
}

/// Journal mode: the one trial of this array task, its events appended to its journal.
async fn run_journaled(
    args: &WorkerArgs,
    sweep: &mut sweep::Sweep,
    manifest: &std::path::Path,
    git: (Option<String>, Option<bool>),
) -> anyhow::Result<()> {
    use crate::journal::{self, Body, End, Start};
    use fer_model::events::{Event, EventLine};

    let index: usize = std::env::var("SLURM_ARRAY_TASK_ID")
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--journal runs inside a Slurm array task (SLURM_ARRAY_TASK_ID is not set)"
            )
        })?;
    let keys = std::fs::read_to_string(manifest)
        .map_err(|e| anyhow::anyhow!("{}: {e}", manifest.display()))?;
    let key = keys
        .lines()
        .nth(index)
        .ok_or_else(|| anyhow::anyhow!("{}: no line {index}", manifest.display()))?
        .trim()
        .to_string();
    let slot = task_slot(sweep);
    let trial = sweep.trials.iter().find(|t| t.key == key).ok_or_else(|| {
        anyhow::anyhow!(
            "trial {key} of {} is not in sweep {}",
            manifest.display(),
            sweep.name
        )
    })?;
    let path = journal::path(&args.runs_dir, &sweep.name, &key);
    let finished = journal::read(&path)?
        .iter()
        .any(|r| matches!(&r.body, Body::End(e) if e.status == "completed"));
    if finished {
        eprintln!(
            "fer worker: trial {key} already completed (journal {})",
            path.display()
        );
        return Ok(());
    }
    let me = this_process(&slot.label, git);
    let stamp = crate::store::timestamp(std::time::SystemTime::now());
    let id = format!(
        "{}-{}",
        me.slurm_job
            .clone()
            .unwrap_or_else(|| format!("{}-{}", me.host, me.pid)),
        stamp
    );
    let mut w = journal::Writer::open(&path, id)?;
    w.write(Body::Start(Start {
        at: stamp,
        who: me.clone(),
    }))?;
    let run_dir = crate::scheduler::trial_dir(&args.runs_dir, &sweep.name, &key);
    let mut child = scheduler::trial_command(
        trial,
        &slot,
        &run_dir,
        sweep.spec.resources.threads_per_trial,
    )?
    .spawn()?;
    let (mut lines, stderr_task) = scheduler::child_output(&mut child);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigusr1 =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let (mut stopped, mut requeue) = (false, false);
    let mut deadline: Option<tokio::time::Instant> = None;
    while !stopped {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let event = EventLine::parse(&line);
                // Step events are progress only (the store keeps none): not written to the
                // shared file system once per training step.
                if !matches!(event, Ok(Some(Event::Step { .. }))) {
                    w.write(Body::Line(line))?;
                }
                let epoch_done = matches!(event, Ok(Some(Event::Epoch(m))) if !m.replayed);
                if epoch_done && deadline.is_some() {
                    stopped = true;
                    let _ = child.start_kill();
                }
            }
            _ = sigterm.recv() => {
                stopped = true;
                let _ = child.start_kill();
            }
            _ = sigusr1.recv(), if deadline.is_none() => {
                requeue = true;
                deadline = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(args.grace_seconds));
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                stopped = true;
                let _ = child.start_kill();
            }
        }
    }
    let status = child.wait().await?;
    let tail = scheduler::stderr_tail(stderr_task).await;
    let (_, status_text, class) =
        scheduler::classify_exit(status, stopped, sweep.spec.retry.divergence);
    use std::os::unix::process::ExitStatusExt;
    let error = (!status.success() && !stopped).then(|| scheduler::error_line(&tail));
    w.write(Body::End(End {
        status: status_text.into(),
        exit_code: status.code(),
        signal: status.signal(),
        failure_class: class.map(String::from),
        error,
        stderr_tail: Some(tail),
    }))?;
    eprintln!(
        "fer worker: trial {key} {status_text} (journal {})",
        path.display()
    );
    if requeue {
        if let Some(job) = &me.slurm_job {
            requeue_self(job)?;
        }
    }
    Ok(())
}

/// Put this task back in the queue. Said first: Slurm ends the running task as it requeues it,
/// which can cut off anything printed after.
fn requeue_self(job: &str) -> anyhow::Result<()> {
    eprintln!("fer worker: near the time limit; task {job} is being requeued (its trial resumes from the last checkpoint)");
    crate::slurm::requeue(job)
}

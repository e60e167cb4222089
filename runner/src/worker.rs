//! `fer worker`: one task of a sweep's Slurm job array (or any process pointed at a shared
//! store): it claims the sweep's missing trials one at a time, runs each as `fer train`, streams
//! its events into the store and renews its lease, until no trial is left to claim. SIGTERM
//! (`scancel`) interrupts the running trial; SIGUSR1 (Slurm's warning before the time limit)
//! interrupts it too and requeues the task, which resumes the trial from its last checkpoint.

use std::path::PathBuf;

use clap::Args;

use crate::scheduler::{self, Options, Slot};
use crate::store::{Claimant, DbUrl, Store};
use crate::sweep;
use crate::sweep_cmd::{git_version, hostname, register, slurm_job, DEFAULT_DB};

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
    /// The shared results store (normally from FER_DB, which Slurm exports to the task).
    #[arg(long, env = "FER_DB", default_value = DEFAULT_DB, hide_env_values = true)]
    pub db: DbUrl,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let git = git_version();
    let mut sweep = sweep::load(&args.file, args.profile.as_deref(), git.0.as_deref())
        .map_err(|e| fer_model::trainer::classified(fer_model::trainer::FailureClass::Setup, e))?;
    let store = Store::open(&args.db).await?;
    let host = hostname();
    let job = slurm_job();
    let expired = store.expire_leases(&host, crate::store::LEASE).await?;
    register(&store, &sweep, &args.file).await?;
    // A trial gets the task's CPUs (`resources.cpus`, as sbatch allocated them).
    let r = &sweep.spec.resources;
    sweep.spec.resources.threads_per_trial = r.cpus.unwrap_or(r.threads_per_trial).max(1);
    // One slot: this task's allocation (its GPUs as Slurm exposes them).
    let slot = if sweep.spec.resources.gpus > 0 {
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
    };
    eprintln!(
        "fer worker on {host} (Slurm job {}): sweep {} in {}, {} trial(s); {expired} expired lease(s) released",
        job.as_deref().unwrap_or("none"),
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
            claimant: Claimant {
                device: String::new(),
                host,
                pid: std::process::id(),
                git_commit: git.0,
                git_dirty: git.1,
                slurm_job: job.clone(),
            },
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
        match &job {
            Some(job) => {
                crate::slurm::requeue(job)?;
                eprintln!("fer worker: near the time limit; task {job} requeued (its trial resumes from the last checkpoint)");
            }
            None => eprintln!("fer worker: SIGUSR1 outside Slurm: stopped"),
        }
    }
    Ok(())
}

//! Slurm: a sweep as a job array (`fer sweep --launcher slurm`): the batch script, its
//! submission, the queue's view of it, cancellation and requeueing. Every array task runs
//! `fer worker`, which claims trials from the shared store until none is left.
//!
//! What reaches the script is checked: resource values and partition/account names by their
//! Slurm syntax, raw `--sbatch-arg`s as single options; paths are shell-quoted. The database
//! URL never does: workers read it from `FER_DB` in the environment Slurm exports, or the
//! password from PostgreSQL's password file.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::store::DbUrl;
use crate::sweep::{Resources, Sweep};

/// Check the `resources:` values that go into `#SBATCH` lines: (key, what is wrong).
pub fn check_resources(r: &Resources) -> Result<(), (&'static str, String)> {
    if let Some(m) = &r.memory {
        let digits = m.trim_end_matches(['K', 'M', 'G', 'T']);
        if digits.is_empty()
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || m.len() - digits.len() > 1
        {
            return Err((
                "memory",
                format!("{m:?} is not a Slurm memory size (a number with an optional K, M, G or T: 16G)"),
            ));
        }
    }
    if let Some(t) = &r.time {
        if !valid_time(t) {
            return Err((
                "time",
                format!("{t:?} is not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"),
            ));
        }
    }
    if r.cpus == Some(0) {
        return Err(("cpus", "must be at least 1".into()));
    }
    Ok(())
}

fn valid_time(t: &str) -> bool {
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    let num = |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = rest.split(':').collect();
    days.is_none_or(num) && parts.iter().all(|p| num(p)) && (1..=3).contains(&parts.len())
}

/// What the submission adds to the sweep file's resources.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Raw sbatch options, one option each (`--qos=high`, `--constraint=a100`).
    pub sbatch_args: Vec<String>,
    /// At most this many array tasks at once (`%P`).
    pub parallel: usize,
    /// Seconds before the time limit at which Slurm sends the worker SIGUSR1.
    pub signal_seconds: u32,
}

impl Submission {
    fn check(&self) -> anyhow::Result<()> {
        for (what, v) in [
            ("--partition", &self.partition),
            ("--account", &self.account),
        ] {
            if let Some(v) = v {
                let ok = !v.is_empty()
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.,-".contains(&b));
                if !ok {
                    bail!("{what} {v:?}: a Slurm name is letters, digits, '_', '.', ',' and '-'");
                }
            }
        }
        for a in &self.sbatch_args {
            if !a.starts_with("--") || a.chars().any(|c| c.is_control() || c.is_whitespace()) {
                bail!("--sbatch-arg {a:?}: one long sbatch option without spaces, e.g. --qos=high");
            }
        }
        Ok(())
    }
}

/// `'text'` for sh, whatever the text holds.
fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// Where a sweep's Slurm scripts and task logs go: `RUNS/<sweep>/slurm/`.
pub fn dir(runs_dir: &Path, sweep: &str) -> PathBuf {
    runs_dir.join(sweep).join("slurm")
}

/// What each array task runs: `fer worker` on the sweep (paths absolute).
pub struct WorkerCommand<'a> {
    pub fer: &'a Path,
    pub sweep_file: &'a Path,
    pub profile: Option<&'a str>,
    pub runs_dir: &'a Path,
    /// Journal mode: the manifest of trial keys (task i runs line i).
    pub journal: Option<&'a Path>,
}

/// The batch script of a job array of `tasks` workers for `sweep`.
pub fn script(
    sweep: &Sweep,
    tasks: usize,
    sub: &Submission,
    worker: &WorkerCommand,
) -> anyhow::Result<String> {
    sub.check()?;
    anyhow::ensure!(tasks >= 1, "a job array needs at least one task");
    let r = &sweep.spec.resources;
    let logs = dir(worker.runs_dir, &sweep.name);
    let mut s = String::from("#!/bin/bash\n");
    let mut opt = |line: String| s.push_str(&format!("#SBATCH {line}\n"));
    opt(format!("--job-name=fer-{}", sweep.name));
    opt(format!(
        "--array=0-{}%{}",
        tasks - 1,
        sub.parallel.clamp(1, tasks)
    ));
    opt(format!("--output={}/%A_%a.out", logs.display()));
    opt("--open-mode=append".into());
    // Requeued (node failure, preemption, our own requeue near the time limit), a task claims
    // again and resumes its trial from the last checkpoint.
    opt("--requeue".into());
    opt(format!("--signal=B:USR1@{}", sub.signal_seconds));
    opt("--ntasks=1".into());
    opt(format!(
        "--cpus-per-task={}",
        r.cpus.unwrap_or(r.threads_per_trial).max(1)
    ));
    if r.gpus > 0 {
        opt(format!("--gres=gpu:{}", r.gpus));
    }
    if let Some(m) = &r.memory {
        opt(format!("--mem={m}"));
    }
    if let Some(t) = &r.time {
        opt(format!("--time={t}"));
    }
    if let Some(p) = &sub.partition {
        opt(format!("--partition={p}"));
    }
    if let Some(a) = &sub.account {
        opt(format!("--account={a}"));
    }
    for a in &sub.sbatch_args {
        opt(a.clone());
    }
    s.push_str(match worker.journal {
        Some(_) => {
            "# Journal mode: each task runs the trial on its line of the manifest and writes its\n\
             # events to the runs folder; `fer sync` ingests them into the SQLite store.\n"
        }
        None => {
            "# The database location comes from FER_DB in the environment sbatch exports (or the\n\
             # password from PGPASSFILE / ~/.pgpass), never from this file.\n"
        }
    });
    // exec: the worker itself receives Slurm's signals (B: goes to the batch shell's process).
    // On SIGUSR1 a running trial gets most of the warning time to reach its next epoch
    // checkpoint; the rest is left for stopping and requeueing.
    let grace = sub.signal_seconds as u64 * 4 / 5;
    s.push_str(&format!(
        "exec {} worker {} --runs-dir {} --grace-seconds {grace}{}{}\n",
        quote(worker.fer),
        quote(worker.sweep_file),
        quote(worker.runs_dir),
        worker
            .profile
            .map(|p| format!(" --profile {}", quote(Path::new(p))))
            .unwrap_or_default(),
        worker
            .journal
            .map(|m| format!(" --journal {}", quote(m)))
            .unwrap_or_default()
    ));
    Ok(s)
}

/// Submit `script` with `sbatch --parsable`: the job id. The workers get the store's location
/// as FER_DB in their environment.
pub fn submit(script: &Path, db: &DbUrl) -> anyhow::Result<String> {
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable").arg(script);
    if let DbUrl::Postgres(url) = db {
        cmd.env("FER_DB", url);
    }
    let out = cmd
        .output()
        .context("running sbatch (is Slurm installed and on PATH?)")?;
    if !out.status.success() {
        bail!(
            "sbatch {} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `JOBID` or `JOBID;CLUSTER`.
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    anyhow::ensure!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "sbatch printed no job id: {text:?}"
    );
    Ok(id)
}

/// One line of the queue for a job's tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedTask {
    /// `JOBID_TASK` (or `JOBID_[0-5%2]` for tasks not started yet).
    pub id: String,
    pub state: String,
    pub time: String,
    pub reason: String,
}

/// The queue's tasks of these jobs (finished tasks have left the queue).
pub fn squeue(jobs: &[String]) -> anyhow::Result<Vec<QueuedTask>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let out = Command::new("squeue")
        .args(["-h", "-r", "-o", "%i|%T|%M|%R", "-j"])
        .arg(jobs.join(","))
        .output()
        .context("running squeue")?;
    // A job that left the queue long ago is an error for squeue: an empty queue for us.
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.len() == 4).then(|| QueuedTask {
                id: f[0].into(),
                state: f[1].into(),
                time: f[2].into(),
                reason: f[3].into(),
            })
        })
        .collect())
}

/// The final states of a job's tasks from Slurm's accounting (`sacct`), or None where there is
/// no accounting (sacct missing or accounting storage disabled).
pub fn sacct(job: &str) -> Option<Vec<(String, String)>> {
    let out = Command::new("sacct")
        .args(["-n", "-X", "-P", "-o", "JobID,State", "-j", job])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let rows: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (id, state) = l.split_once('|')?;
            Some((id.to_string(), state.to_string()))
        })
        .collect();
    (!rows.is_empty()).then_some(rows)
}

pub fn scancel(job: &str) -> anyhow::Result<()> {
    let out = Command::new("scancel")
        .arg(job)
        .output()
        .context("running scancel")?;
    if !out.status.success() {
        bail!(
            "scancel {job}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Put this task back in the queue (it runs again later, on any node).
pub fn requeue(job: &str) -> anyhow::Result<()> {
    let out = Command::new("scontrol")
        .args(["requeue", job])
        .output()
        .context("running scontrol requeue")?;
    if !out.status.success() {
        bail!(
            "scontrol requeue {job}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_values_follow_slurm_syntax() {
        let r = |memory: Option<&str>, time: Option<&str>| Resources {
            memory: memory.map(String::from),
            time: time.map(String::from),
            ..Resources::default()
        };
        for t in ["30", "30:00", "04:00:00", "1-00", "2-12:30", "1-00:00:00"] {
            assert!(check_resources(&r(Some("16G"), Some(t))).is_ok(), "{t}");
        }
        for t in ["", "1:2:3:4", "x", "1-", "04:00:00\n#SBATCH --x", "-1"] {
            assert_eq!(
                check_resources(&r(None, Some(t))).unwrap_err().0,
                "time",
                "{t:?}"
            );
        }
        for m in ["16", "16G", "512M"] {
            assert!(check_resources(&r(Some(m), None)).is_ok(), "{m}");
        }
        for m in ["", "G", "16GB", "1.5G", "16G\n"] {
            assert_eq!(
                check_resources(&r(Some(m), None)).unwrap_err().0,
                "memory",
                "{m:?}"
            );
        }
    }

    #[test]
    fn submissions_refuse_what_could_inject_lines() {
        let bad = [
            Submission {
                partition: Some("gpu\n#SBATCH --x".into()),
                ..Default::default()
            },
            Submission {
                account: Some("a b".into()),
                ..Default::default()
            },
            Submission {
                sbatch_args: vec!["--qos=high --x".into()],
                ..Default::default()
            },
            Submission {
                sbatch_args: vec!["-p".into()],
                ..Default::default()
            },
        ];
        for s in bad {
            assert!(s.check().is_err(), "{s:?}");
        }
        assert_eq!(quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }
}

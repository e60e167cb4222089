//! Runs a sweep's trials: one `fer train` subprocess per trial on a free device slot, results
//! streamed into the store, retries by failure class, Ctrl-C stops children cleanly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::{watch, Mutex};

use fer_model::events::{Event, EventLine};

use crate::store::{AttemptEnd, Claimant, Store, TrialState};
use crate::sweep::{Sweep, Trial};

/// A place a trial can run.
#[derive(Debug, Clone)]
pub struct Slot {
    /// "cpu" or "cuda" (the trial sees one GPU through CUDA_VISIBLE_DEVICES).
    pub device: String,
    pub cuda_visible: Option<String>,
    pub label: String,
}

/// A trial's run folder (checkpoint, metrics, journal): `RUNS/SWEEP/` and the key's first 16
/// characters.
pub fn trial_dir(runs_dir: &std::path::Path, sweep: &str, key: &str) -> PathBuf {
    runs_dir.join(sweep).join(&key[..16.min(key.len())])
}

/// CPU slots, or one slot per GPU (given, or found with nvidia-smi).
pub fn slots(jobs: usize, gpus: Option<&str>) -> Vec<Slot> {
    let gpu_ids: Vec<String> = match gpus {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None => detect_gpus(),
    };
    if gpu_ids.is_empty() {
        (0..jobs.max(1))
            .map(|i| Slot {
                device: "cpu".into(),
                cuda_visible: None,
                label: format!("cpu{i}"),
            })
            .collect()
    } else {
        gpu_ids
            .into_iter()
            .map(|g| Slot {
                device: "cuda".into(),
                cuda_visible: Some(g.clone()),
                label: format!("gpu{g}"),
            })
            .collect()
    }
}

fn detect_gpus() -> Vec<String> {
    // Only a CUDA build can use a GPU; a CPU build ignores any that are present.
    if !cfg!(feature = "cuda") {
        return Vec::new();
    }
    let out = std::process::Command::new("nvidia-smi").arg("-L").output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .enumerate()
            .map(|(i, _)| i.to_string())
            .collect(),
        _ => Vec::new(),
    }
}

/// What a run of the sweep will do with a trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Run,
    Resume,
    Retry,
    SkipDone,
    SkipRunning,
    GiveUp,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::Run => "run",
            Action::Resume => "resume: interrupted",
            Action::Retry => "retry: failed",
            Action::SkipDone => "skip: done",
            Action::SkipRunning => "skip: running elsewhere",
            Action::GiveUp => "skip: failed (no retries left)",
        }
    }

    pub fn runs(self) -> bool {
        matches!(self, Action::Run | Action::Resume | Action::Retry)
    }
}

/// A trial's action. Setup (`config`) failures never use up retries: the next run tries again
/// (and fails fast while the setup is still wrong). `retry_failed` re-arms trials whose retries
/// are used up.
pub fn plan(state: &TrialState, max_attempts: usize, retry_failed: bool) -> Action {
    if state.completed {
        Action::SkipDone
    } else if state.running {
        Action::SkipRunning
    } else if state.failed_attempts > 0 {
        if state.failed_runs >= max_attempts && !retry_failed {
            Action::GiveUp
        } else {
            Action::Retry
        }
    } else if state.interrupted {
        Action::Resume
    } else {
        Action::Run
    }
}

pub struct Options {
    /// Run failed trials again even when their retries are used up (`--retry-failed`).
    pub retry_failed: bool,
    /// Retry a diverged trial like a crash (`retry.divergence` of the sweep file).
    pub retry_divergence: bool,
    pub runs_dir: PathBuf,
    pub slots: Vec<Slot>,
    /// Who claims the attempts (the device is each slot's); its host and pid renew the leases.
    pub claimant: Claimant,
    /// SIGUSR1 winds the run down and asks for a requeue (`fer worker` under Slurm, whose
    /// `--signal=B:USR1@S` warns before the time limit): no trial starts, running trials stop
    /// after their next epoch checkpoint or when `wind_down_grace` has passed.
    pub stop_on_usr1: bool,
    pub wind_down_grace: std::time::Duration,
}

#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub completed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub interrupted: bool,
    /// Writing to the results store failed: the sweep was stopped (the error is on stderr).
    pub store_error: Option<String>,
    /// Stopped by SIGUSR1 (`stop_on_usr1`): the caller requeues itself.
    pub requeue: bool,
}

/// The trials with their planned action, in sweep order.
pub async fn plan_all(
    sweep: &Sweep,
    store: &Store,
    retry_failed: bool,
) -> anyhow::Result<Vec<(Trial, Action)>> {
    let mut out = Vec::new();
    for t in &sweep.trials {
        let state = store.trial_state(&t.key).await?;
        let action = plan(&state, sweep.spec.retry.max_attempts, retry_failed);
        out.push((t.clone(), action));
    }
    Ok(out)
}

/// Trials of this run of the sweep, by where they are (the overall bar's message).
#[derive(Debug, Default)]
struct Counts {
    done: usize,
    failed: usize,
    running: usize,
}

impl Counts {
    fn message(&self) -> String {
        format!(
            "done {} running {} failed {}",
            self.done, self.running, self.failed
        )
    }
}

/// What every trial task of one sweep run shares.
struct Shared {
    store: Store,
    opts: Options,
    /// Slots not in use; `slot_ready` has one permit per entry.
    free: Mutex<Vec<Slot>>,
    slot_ready: tokio::sync::Semaphore,
    /// Set once to stop the sweep now (Ctrl-C, SIGTERM, a store or disk failure): running
    /// trials are killed and resume from their last checkpoint.
    cancel: watch::Sender<bool>,
    /// Set once to wind the sweep down (SIGUSR1 under Slurm): no trial starts, running ones
    /// stop when their current epoch is checkpointed, or at this deadline.
    wind_down: watch::Sender<Option<tokio::time::Instant>>,
    /// The first reason the sweep was stopped by a failure, for the exit status.
    store_error: Mutex<Option<String>>,
    counts: Mutex<Counts>,
    bars: MultiProgress,
    overall: ProgressBar,
    threads_per_trial: usize,
    max_attempts: usize,
}

impl Shared {
    /// Whether no further trial may start.
    fn cancelled(&self) -> bool {
        *self.cancel.borrow() || self.wind_down.borrow().is_some()
    }

    /// Stop the whole sweep because of `msg` (printed and kept once: the first reason wins).
    async fn stop_for(&self, msg: String, printed: String) {
        let mut first = self.store_error.lock().await;
        if first.is_none() {
            self.overall.suspend(|| eprintln!("{printed}"));
            *first = Some(msg);
        }
        let _ = self.cancel.send_replace(true);
    }

    async fn count(&self, change: impl FnOnce(&mut Counts)) {
        let mut c = self.counts.lock().await;
        change(&mut c);
        self.overall.set_message(c.message());
    }
}

pub async fn run(sweep: &Sweep, store: &Store, opts: Options) -> anyhow::Result<Outcome> {
    let planned = plan_all(sweep, store, opts.retry_failed).await?;
    let todo: Vec<Trial> = planned
        .iter()
        .filter(|(_, a)| a.runs())
        .map(|(t, _)| t.clone())
        .collect();
    let mut outcome = Outcome {
        skipped: planned.len() - todo.len(),
        ..Default::default()
    };
    if todo.is_empty() {
        return Ok(outcome);
    }
    let bars = MultiProgress::new();
    let overall = bars.add(ProgressBar::new(todo.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} trials  {msg}  ETA {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    overall.set_prefix(sweep.name.clone());
    let shared = Arc::new(Shared {
        store: store.clone(),
        free: Mutex::new(opts.slots.clone()),
        slot_ready: tokio::sync::Semaphore::new(opts.slots.len()),
        cancel: watch::channel(false).0,
        wind_down: watch::channel(None).0,
        store_error: Mutex::new(None),
        counts: Mutex::new(Counts::default()),
        bars,
        overall,
        threads_per_trial: sweep.spec.resources.threads_per_trial,
        max_attempts: sweep.spec.retry.max_attempts,
        opts,
    });

    // Renew the leases of this runner's running attempts while it runs; a runner that dies
    // stops renewing, and another runner (any host) takes over its trials when they expire.
    let heartbeat = {
        let (store, who) = (shared.store.clone(), shared.opts.claimant.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(crate::store::HEARTBEAT);
            loop {
                every.tick().await;
                if let Err(e) = store.heartbeat(&who.host, who.pid).await {
                    tracing::warn!("lease renewal failed: {e:#}");
                }
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for trial in todo {
        let run_dir = trial_dir(&shared.opts.runs_dir, &sweep.name, &trial.key);
        tasks.spawn(run_trial(shared.clone(), trial, run_dir));
    }
    // SIGTERM (kill, systemd, Slurm) stops the sweep the way Ctrl-C does.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigusr1 =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let usr1 = shared.opts.stop_on_usr1;
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                match joined {
                    None => break,
                    Some(Ok(TrialEnd::Completed)) => outcome.completed += 1,
                    Some(Ok(TrialEnd::Busy)) => outcome.skipped += 1,
                    Some(Ok(TrialEnd::Interrupted)) => outcome.interrupted = true,
                    Some(Ok(_)) => outcome.failed += 1,
                    Some(Err(e)) => return Err(e.into()),
                }
            }
            _ = tokio::signal::ctrl_c(), if !*shared.cancel.borrow() => {
                eprintln!("\ninterrupted: stopping running trials (they resume from their checkpoints next time)");
                let _ = shared.cancel.send_replace(true);
            }
            _ = sigterm.recv(), if !*shared.cancel.borrow() => {
                eprintln!("\nterminated (SIGTERM): stopping running trials (they resume from their checkpoints next time)");
                let _ = shared.cancel.send_replace(true);
            }
            _ = sigusr1.recv(), if usr1 && !shared.cancelled() => {
                eprintln!("\nSIGUSR1 (time limit near): running trials stop at their next epoch checkpoint (at most {} s from now), then this task requeues", shared.opts.wind_down_grace.as_secs());
                outcome.requeue = true;
                let deadline = tokio::time::Instant::now() + shared.opts.wind_down_grace;
                let _ = shared.wind_down.send_replace(Some(deadline));
            }
        }
    }
    heartbeat.abort();
    shared.overall.finish_and_clear();
    outcome.store_error = shared.store_error.lock().await.clone();
    Ok(outcome)
}

/// One trial of the sweep: attempts on free slots until it completes, fails in a way a retry
/// cannot fix, uses up its attempts, or the sweep stops.
async fn run_trial(shared: Arc<Shared>, trial: Trial, run_dir: PathBuf) -> TrialEnd {
    let mut result = TrialEnd::Failed;
    for _ in 0..shared.max_attempts {
        if shared.cancelled() {
            return TrialEnd::Interrupted;
        }
        let _permit = shared.slot_ready.acquire().await.expect("semaphore");
        // A trial that waited for a slot while the sweep was stopped never starts.
        if shared.cancelled() {
            return TrialEnd::Interrupted;
        }
        let slot = shared
            .free
            .lock()
            .await
            .pop()
            .expect("a free slot per permit");
        shared.count(|c| c.running += 1).await;
        let end = run_attempt(&shared, &trial, &slot, &run_dir).await;
        shared.free.lock().await.push(slot);
        let end = match end {
            Ok(TrialEnd::Resource) => {
                let msg = format!(
                    "trial {} could not write to its run directory {}: no space left (disk or quota full)",
                    &trial.key[..16],
                    run_dir.display()
                );
                let printed = format!("error: {msg}; stopping the sweep: free space, then run it again (no retry was used)");
                shared.stop_for(msg, printed).await;
                TrialEnd::Resource
            }
            Ok(end) => end,
            Err(e) => {
                // The store cannot be written (disk or database full, I/O error): every
                // further result would be lost, so the whole sweep stops, loudly.
                tracing::error!(trial = %trial.key, "runner error: {e:#}");
                let db = shared.store.url();
                let printed = format!("error: writing the results store {db} failed: {e:#}; stopping the sweep (running trials resume from their checkpoints next time)");
                let msg = format!("the results store {db} could not be written: {e:#}");
                shared.stop_for(msg, printed).await;
                TrialEnd::Interrupted
            }
        };
        shared
            .count(|c| {
                c.running -= 1;
                match end {
                    TrialEnd::Completed => c.done += 1,
                    TrialEnd::Failed | TrialEnd::NotRetried => c.failed += 1,
                    _ => {}
                }
            })
            .await;
        result = end;
        // Retry only crashes and signals.
        if end != TrialEnd::Failed {
            break;
        }
        // Within one run the loop gives at most max_attempts tries; across runs the store's
        // count of failed runs does (unless re-armed with --retry-failed).
        let state = shared
            .store
            .trial_state(&trial.key)
            .await
            .unwrap_or_default();
        if state.failed_runs >= shared.max_attempts && !shared.opts.retry_failed {
            break;
        }
    }
    shared.overall.inc(1);
    result
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrialEnd {
    Completed,
    Failed,
    /// Failed in a way a retry of the same trial cannot fix (setup, data, by default divergence).
    NotRetried,
    /// The disk or quota is full: the sweep stops.
    Resource,
    Interrupted,
    /// Another runner holds (or finished) the trial.
    Busy,
}

/// `fer train` exit statuses the runner classifies by: 2 a setup error (config, missing data;
/// found before training), 4 divergence (a non-finite loss), 5 a data error during training (an
/// image that does not decode). Anything else non-zero is a crash, a signal is a signal.
pub const EXIT_CONFIG_ERROR: i32 = 2;
pub const EXIT_DIVERGED: i32 = 4;
pub const EXIT_DATA_ERROR: i32 = 5;
/// 6: the run directory's disk or quota is full: the whole sweep stops (no retry can succeed).
pub const EXIT_RESOURCE: i32 = 6;

/// How an attempt ended: what the sweep does next, the attempt's status and failure class.
pub(crate) fn classify_exit(
    status: std::process::ExitStatus,
    cancelled: bool,
    retry_divergence: bool,
) -> (TrialEnd, &'static str, Option<&'static str>) {
    use std::os::unix::process::ExitStatusExt;
    if cancelled {
        return (TrialEnd::Interrupted, "interrupted", None);
    }
    if status.success() {
        return (TrialEnd::Completed, "completed", None);
    }
    let (end, class) = match status.code() {
        Some(EXIT_CONFIG_ERROR) => (TrialEnd::NotRetried, "config"),
        Some(EXIT_RESOURCE) => (TrialEnd::Resource, "resource"),
        Some(EXIT_DATA_ERROR) => (TrialEnd::NotRetried, "data"),
        Some(EXIT_DIVERGED) if retry_divergence => (TrialEnd::Failed, "divergence"),
        Some(EXIT_DIVERGED) => (TrialEnd::NotRetried, "divergence"),
        // Stopped from outside (Ctrl-C reaches the whole process group; scancel, kill and a
        // closing terminal signal the trial too): not a failure, the trial resumes later.
        _ if matches!(
            status.signal(),
            Some(libc::SIGTERM | libc::SIGINT | libc::SIGHUP)
        ) =>
        {
            return (TrialEnd::Interrupted, "interrupted", None)
        }
        _ if status.signal().is_some() => (TrialEnd::Failed, "signal"),
        _ => (TrialEnd::Failed, "crash"),
    };
    (end, "failed", Some(class))
}

/// The `fer train` process of one attempt: its config written into the run directory, no
/// shell anywhere (sweep values only ever reach the child inside its config file).
pub(crate) fn trial_command(
    trial: &Trial,
    slot: &Slot,
    run_dir: &std::path::Path,
    threads_per_trial: usize,
) -> anyhow::Result<tokio::process::Command> {
    std::fs::create_dir_all(run_dir)?;
    let mut config = trial.config.clone();
    config.device = slot.device.clone();
    let config_path = run_dir.join("trial.yaml");
    std::fs::write(&config_path, serde_yaml_ng::to_string(&config)?)?;
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.arg("train")
        .arg("--quiet")
        .arg("--config")
        .arg(&config_path)
        .arg("--out")
        .arg(run_dir);
    let threads = if slot.device == "cpu" {
        threads_per_trial.to_string()
    } else {
        "2".into()
    };
    cmd.env("RAYON_NUM_THREADS", threads);
    match &slot.cuda_visible {
        Some(g) => cmd.env("CUDA_VISIBLE_DEVICES", g),
        None => cmd.env_remove("CUDA_VISIBLE_DEVICES"),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Ok(cmd)
}

/// One attempt of a trial: claim it, run `fer train`, record its events as they come, record
/// how it ended.
async fn run_attempt(
    shared: &Shared,
    trial: &Trial,
    slot: &Slot,
    run_dir: &std::path::Path,
) -> anyhow::Result<TrialEnd> {
    let (store, opts) = (&shared.store, &shared.opts);
    let who = Claimant {
        device: slot.label.clone(),
        ..opts.claimant.clone()
    };
    let Some(attempt) = store.claim(&trial.key, &who).await? else {
        return Ok(TrialEnd::Busy);
    };
    tracing::info!(trial = %trial.key, attempt, slot = %slot.label, "start");
    let mut child = trial_command(trial, slot, run_dir, shared.threads_per_trial)?
        .spawn()
        .context("starting the trial process")?;
    let bar = shared
        .bars
        .add(ProgressBar::new(trial.config.epochs as u64));
    bar.set_style(ProgressStyle::with_template("  {prefix} epoch {pos}/{len} {msg}").unwrap());
    bar.set_prefix(format!(
        "{} {}",
        &trial.key[..8],
        serde_json::to_string(&trial.params).unwrap_or_default()
    ));

    let (mut lines, stderr_task) = child_output(&mut child);
    let (mut cancel, mut wind) = (shared.cancel.subscribe(), shared.wind_down.subscribe());
    // A stop that came while the child was starting is seen here, later ones by `changed`.
    let mut cancelled = *cancel.borrow_and_update();
    let mut deadline = *wind.borrow_and_update();
    if cancelled {
        let _ = child.start_kill();
    }
    while !cancelled {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let epoch_done = record_line(store, attempt, &line, &bar).await?;
                // Winding down: the epoch just reported is checkpointed; stop here.
                if epoch_done && deadline.is_some() {
                    cancelled = true;
                    let _ = child.start_kill();
                }
            }
            _ = cancel.changed() => {
                if *cancel.borrow() {
                    cancelled = true;
                    let _ = child.start_kill();
                }
            }
            _ = wind.changed() => deadline = *wind.borrow(),
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                cancelled = true;
                let _ = child.start_kill();
            }
        }
    }
    let status = child.wait().await?;
    let tail = stderr_tail(stderr_task).await;
    bar.finish_and_clear();
    let (end, status_text, class) = classify_exit(status, cancelled, opts.retry_divergence);
    let error = (!status.success() && !cancelled).then(|| error_line(&tail));
    use std::os::unix::process::ExitStatusExt;
    store
        .finish(
            attempt,
            AttemptEnd {
                status: status_text,
                exit_code: status.code(),
                signal: status.signal(),
                failure_class: class,
                error,
                stderr_tail: Some(tail),
            },
        )
        .await?;
    tracing::info!(trial = %trial.key, attempt, status = status_text, "end");
    Ok(end)
}

/// A started trial's stdout as lines, and its stderr read to the end in the background.
pub(crate) fn child_output(
    child: &mut tokio::process::Child,
) -> (
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    tokio::task::JoinHandle<Vec<u8>>,
) {
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        buf
    });
    (BufReader::new(stdout).lines(), stderr_task)
}

/// The last 40 lines of a finished trial's stderr.
pub(crate) async fn stderr_tail(task: tokio::task::JoinHandle<Vec<u8>>) -> String {
    tail(
        &String::from_utf8_lossy(&task.await.unwrap_or_default()),
        40,
    )
}

/// A failed trial's error: the last line of its stderr that starts with `error`.
pub(crate) fn error_line(tail: &str) -> String {
    tail.lines()
        .rev()
        .find(|l| l.starts_with("error"))
        .unwrap_or("")
        .to_string()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Store what a trial reports: per-epoch metrics (upserted), progress, events. A line that is
/// not an event is kept as `stdout`; an event this `fer` cannot read is kept with the reason.
/// True when the line reported a trained epoch (one with its checkpoint on disk).
pub async fn record_line(
    store: &Store,
    attempt: i64,
    line: &str,
    bar: &ProgressBar,
) -> anyhow::Result<bool> {
    let event = match EventLine::parse(line) {
        Ok(Some(event)) => event,
        Ok(None) => {
            return store
                .event(Some(attempt), "stdout", line)
                .await
                .map(|_| false)
        }
        Err(e) => {
            tracing::warn!(attempt, "{e:#}");
            return store
                .event(Some(attempt), "unreadable", &format!("{e:#}"))
                .await
                .map(|_| false);
        }
    };
    match &event {
        Event::Step {
            epoch,
            step,
            steps,
            loss,
        } => {
            bar.set_message(format!("step {step}/{steps} loss {loss:.4}"));
            // The dashboard's progress within an epoch: about 20 writes per epoch, not one
            // per step.
            if *step == 1 || *step == *steps || step % steps.div_ceil(20).max(1) == 0 {
                store.progress(attempt, *epoch, *step, *steps).await?;
            }
        }
        Event::Epoch(m) => {
            let epoch = m.epoch as i64;
            store.epoch_metrics(attempt, epoch, &m.scalars()).await?;
            store.confusion_once(attempt, epoch, &m.confusion).await?;
            bar.set_position(m.epoch as u64);
        }
        other => store.event(Some(attempt), other.kind(), line).await?,
    }
    Ok(matches!(&event, Event::Epoch(m) if !m.replayed))
}

/// Final test accuracy grouped by the swept params (seed aside): mean ± std over seeds, n.
pub fn summary_table(results: &[crate::store::TrialResult]) -> String {
    let mut groups: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in results {
        let mut p = r.params.clone();
        if let Some(o) = p.as_object_mut() {
            o.remove("seed");
        }
        let label = match p.as_object() {
            Some(o) if !o.is_empty() => o
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", "),
            _ => "(base)".into(),
        };
        if let Some(a) = r.final_accuracy {
            groups.entry(label).or_default().push(a);
        }
    }
    let mut out = String::from("params | final test accuracy (mean ± std over seeds) | n\n");
    // Numeric-aware order: "model.heads=2" before "model.heads=10".
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by_key(|a| natural_key(&a.0));
    for (label, accs) in rows {
        let Some(st) = crate::stats::Stat::of(&accs) else {
            continue;
        };
        out.push_str(&format!(
            "{label} | {:.2} ± {:.2} % | {}\n",
            100.0 * st.mean,
            100.0 * st.std,
            st.n
        ));
    }
    out
}

fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut num = String::new();
    for ch in s.chars() {
        if ch.is_ascii_digit() {
            num.push(ch);
        } else {
            if !num.is_empty() {
                out.push((std::mem::take(&mut text), num.parse().unwrap_or(0)));
                num.clear();
            }
            text.push(ch);
        }
    }
    out.push((text, num.parse().unwrap_or(0)));
    out
}

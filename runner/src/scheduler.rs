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

use crate::store::{AttemptEnd, Store, TrialState};
use crate::sweep::{Sweep, Trial};

/// A place a trial can run.
#[derive(Debug, Clone)]
pub struct Slot {
    /// "cpu" or "cuda" (the trial sees one GPU through CUDA_VISIBLE_DEVICES).
    pub device: String,
    pub cuda_visible: Option<String>,
    pub label: String,
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
pub fn plan(
    state: &TrialState,
    interrupted: bool,
    max_attempts: usize,
    retry_failed: bool,
) -> Action {
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
    } else if interrupted {
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
    /// The results database, named when writing to it fails.
    pub db: PathBuf,
    pub runs_dir: PathBuf,
    pub slots: Vec<Slot>,
    pub git: (Option<String>, Option<bool>),
    pub host: String,
}

#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub completed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub interrupted: bool,
    /// Writing to the results store failed: the sweep was stopped (the error is on stderr).
    pub store_error: Option<String>,
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
        let interrupted: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM attempts WHERE trial_key = ? AND status = 'interrupted'",
        )
        .bind(&t.key)
        .fetch_one(&store.pool)
        .await?;
        out.push((
            t.clone(),
            plan(
                &state,
                interrupted > 0,
                sweep.spec.retry.max_attempts,
                retry_failed,
            ),
        ));
    }
    Ok(out)
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
    let free = Arc::new(Mutex::new(opts.slots.clone()));
    let slot_ready = Arc::new(tokio::sync::Semaphore::new(opts.slots.len()));
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let cancel_tx = Arc::new(cancel_tx);
    let store_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let counts = Arc::new(Mutex::new((0usize, 0usize, 0usize))); // done, failed, running
    let threads = sweep.spec.resources.threads_per_trial;
    let max_attempts = sweep.spec.retry.max_attempts;
    let opts = Arc::new(opts);

    let mut tasks = tokio::task::JoinSet::new();
    for trial in todo {
        let (store, free, slot_ready, cancel, counts, bars, overall, opts) = (
            store.clone(),
            free.clone(),
            slot_ready.clone(),
            cancel_rx.clone(),
            counts.clone(),
            bars.clone(),
            overall.clone(),
            opts.clone(),
        );
        let (stop, store_error) = (cancel_tx.clone(), store_error.clone());
        let run_dir = opts.runs_dir.join(&sweep.name).join(&trial.key[..16]);
        tasks.spawn(async move {
            let mut result = TrialEnd::Failed;
            for _ in 0..max_attempts {
                if *cancel.borrow() {
                    return TrialEnd::Interrupted;
                }
                let _permit = slot_ready.acquire().await.expect("semaphore");
                // A trial that waited for a slot while the sweep was stopped never starts.
                if *cancel.borrow() {
                    return TrialEnd::Interrupted;
                }
                let slot = free.lock().await.pop().expect("a free slot per permit");
                {
                    let mut c = counts.lock().await;
                    c.2 += 1;
                    overall.set_message(format!("done {} running {} failed {}", c.0, c.2, c.1));
                }
                let end = run_attempt(
                    &store,
                    &trial,
                    &slot,
                    &run_dir,
                    threads,
                    &opts,
                    cancel.clone(),
                    &bars,
                )
                .await;
                free.lock().await.push(slot);
                let end = match end {
                    Ok(TrialEnd::Resource) => {
                        let mut first = store_error.lock().await;
                        if first.is_none() {
                            let msg = format!(
                                "trial {} could not write to its run directory {}: no space left (disk or quota full)",
                                &trial.key[..16],
                                run_dir.display()
                            );
                            overall.suspend(|| {
                                eprintln!("error: {msg}; stopping the sweep: free space, then run it again (no retry was used)")
                            });
                            *first = Some(msg);
                        }
                        let _ = stop.send(true);
                        TrialEnd::Resource
                    }
                    Ok(end) => end,
                    Err(e) => {
                        // The store cannot be written (disk or database full, I/O error): every
                        // further result would be lost, so the whole sweep stops, loudly.
                        tracing::error!(trial = %trial.key, "runner error: {e:#}");
                        let msg = format!("{e:#}");
                        let mut first = store_error.lock().await;
                        if first.is_none() {
                            overall.suspend(|| {
                                eprintln!(
                                    "error: writing the results store {} failed: {msg}; stopping the sweep (running trials resume from their checkpoints next time)",
                                    opts.db.display()
                                )
                            });
                            *first = Some(format!(
                                "the results store {} could not be written: {msg}",
                                opts.db.display()
                            ));
                        }
                        let _ = stop.send(true);
                        TrialEnd::Interrupted
                    }
                };
                {
                    let mut c = counts.lock().await;
                    c.2 -= 1;
                    match end {
                        TrialEnd::Completed => c.0 += 1,
                        TrialEnd::Failed | TrialEnd::NotRetried => c.1 += 1,
                        _ => {}
                    }
                    overall.set_message(format!("done {} running {} failed {}", c.0, c.2, c.1));
                }
                result = end;
                // Retry only crashes and signals.
                if !matches!(end, TrialEnd::Failed) {
                    break;
                }
                // Within one run the loop gives at most max_attempts tries; across runs the
                // store's count of failed runs does (unless re-armed with --retry-failed).
                let state = store.trial_state(&trial.key).await.unwrap_or_default();
                if state.failed_runs >= max_attempts && !opts.retry_failed {
                    break;
                }
            }
            overall.inc(1);
            result
        });
    }
    // SIGTERM (kill, systemd, Slurm) stops the sweep the way Ctrl-C does.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                match joined {
                    None => break,
                    Some(Ok(TrialEnd::Completed)) => outcome.completed += 1,
                    Some(Ok(TrialEnd::Busy)) => outcome.skipped += 1,
                    Some(Ok(TrialEnd::Interrupted)) => outcome.interrupted = true,
                    Some(Ok(TrialEnd::Resource)) => outcome.failed += 1,
                    Some(Ok(_)) => outcome.failed += 1,
                    Some(Err(e)) => return Err(e.into()),
                }
            }
            _ = tokio::signal::ctrl_c(), if !*cancel_tx.borrow() => {
                eprintln!("\ninterrupted: stopping running trials (they resume from their checkpoints next time)");
                let _ = cancel_tx.send(true);
            }
            _ = sigterm.recv(), if !*cancel_tx.borrow() => {
                eprintln!("\nterminated (SIGTERM): stopping running trials (they resume from their checkpoints next time)");
                let _ = cancel_tx.send(true);
            }
        }
    }
    overall.finish_and_clear();
    outcome.store_error = store_error.lock().await.clone();
    Ok(outcome)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrialEnd {
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

/// Exit status of `fer train` for an error found before training started (bad config, missing
/// data): retrying cannot help.
/// `fer train` exit statuses the runner classifies by: 2 a setup error (config, missing data;
/// found before training), 4 divergence (a non-finite loss), 5 a data error during training (an
/// image that does not decode). Anything else non-zero is a crash, a signal is a signal.
pub const EXIT_CONFIG_ERROR: i32 = 2;
pub const EXIT_DIVERGED: i32 = 4;
pub const EXIT_DATA_ERROR: i32 = 5;
/// 6: the run directory's disk or quota is full: the whole sweep stops (no retry can succeed).
pub const EXIT_RESOURCE: i32 = 6;

#[allow(clippy::too_many_arguments)]
async fn run_attempt(
    store: &Store,
    trial: &Trial,
    slot: &Slot,
    run_dir: &std::path::Path,
    threads: usize,
    opts: &Options,
    mut cancel: watch::Receiver<bool>,
    bars: &MultiProgress,
) -> anyhow::Result<TrialEnd> {
    let Some(attempt) = store
        .claim(&trial.key, &slot.label, &opts.host, &opts.git)
        .await?
    else {
        return Ok(TrialEnd::Busy);
    };
    tracing::info!(trial = %trial.key, attempt, slot = %slot.label, "start");
    std::fs::create_dir_all(run_dir)?;
    let mut config = trial.config.clone();
    config.device = slot.device.clone();
    let config_path = run_dir.join("trial.yaml");
    std::fs::write(&config_path, serde_yaml_ng::to_string(&config)?)?;
    // No shell anywhere: sweep values only ever reach the child inside its config file.
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.arg("train")
        .arg("--quiet")
        .arg("--config")
        .arg(&config_path)
        .arg("--out")
        .arg(run_dir);
    cmd.env(
        "RAYON_NUM_THREADS",
        if slot.device == "cpu" {
            threads.to_string()
        } else {
            "2".into()
        },
    );
    match &slot.cuda_visible {
        Some(g) => cmd.env("CUDA_VISIBLE_DEVICES", g),
        None => cmd.env_remove("CUDA_VISIBLE_DEVICES"),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("starting the trial process")?;
    let bar = bars.add(ProgressBar::new(config.epochs as u64));
    bar.set_style(ProgressStyle::with_template("  {prefix} epoch {pos}/{len} {msg}").unwrap());
    bar.set_prefix(format!(
        "{} {}",
        &trial.key[..8],
        serde_json::to_string(&trial.params).unwrap_or_default()
    ));

    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        buf
    });
    let mut lines = BufReader::new(stdout).lines();
    let mut cancelled = false;
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                record_line(store, attempt, &line, &bar).await?;
            }
            _ = cancel.changed() => {
                if *cancel.borrow() {
                    cancelled = true;
                    let _ = child.start_kill();
                    break;
                }
            }
        }
    }
    let status = child.wait().await?;
    let stderr_bytes = stderr_task.await.unwrap_or_default();
    let tail = tail(&String::from_utf8_lossy(&stderr_bytes), 40);
    bar.finish_and_clear();
    use std::os::unix::process::ExitStatusExt;
    let (end, status_text, class) = if cancelled {
        (TrialEnd::Interrupted, "interrupted", None)
    } else if status.success() {
        (TrialEnd::Completed, "completed", None)
    } else if status.code() == Some(EXIT_CONFIG_ERROR) {
        (TrialEnd::NotRetried, "failed", Some("config"))
    } else if status.code() == Some(EXIT_RESOURCE) {
        (TrialEnd::Resource, "failed", Some("resource"))
    } else if status.code() == Some(EXIT_DATA_ERROR) {
        (TrialEnd::NotRetried, "failed", Some("data"))
    } else if status.code() == Some(EXIT_DIVERGED) {
        let end = if opts.retry_divergence {
            TrialEnd::Failed
        } else {
            TrialEnd::NotRetried
        };
        (end, "failed", Some("divergence"))
    } else if status.signal().is_some() {
        (TrialEnd::Failed, "failed", Some("signal"))
    } else {
        (TrialEnd::Failed, "failed", Some("crash"))
    };
    let error = (!status.success() && !cancelled).then(|| {
        tail.lines()
            .rev()
            .find(|l| l.starts_with("error"))
            .unwrap_or("")
            .to_string()
    });
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

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Store what a trial reports: per-epoch metrics (upserted), progress, events.
async fn record_line(
    store: &Store,
    attempt: i64,
    line: &str,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        store.event(Some(attempt), "stdout", line).await?;
        return Ok(());
    };
    match v["event"].as_str() {
        Some("step") => bar.set_message(format!(
            "step {}/{} loss {:.4}",
            v["step"],
            v["steps"],
            v["loss"].as_f64().unwrap_or(f64::NAN)
        )),
        Some("epoch") => {
            let epoch = v["epoch"].as_i64().unwrap_or(0);
            let mut values: Vec<(&str, &str, f64)> = Vec::new();
            let f = |k: &str| v[k].as_f64();
            for (split, name, key) in [
                ("train", "loss_total", "loss_total"),
                ("train", "loss_ce", "loss_ce"),
                ("train", "loss_affinity", "loss_affinity"),
                ("train", "loss_partition", "loss_partition"),
                ("train", "loss_consistency", "loss_consistency"),
                ("train", "accuracy", "train_accuracy"),
                ("train", "lr", "lr"),
                ("train", "seconds", "train_seconds"),
                ("train", "img_per_s", "train_img_per_s"),
                ("test", "accuracy", "test_accuracy"),
                ("test", "balanced_accuracy", "test_balanced_accuracy"),
                ("val", "accuracy", "val_accuracy"),
            ] {
                if let Some(x) = f(key) {
                    values.push((split, name, x));
                }
            }
            // Eval-mode memorisation after the epoch, and the running figure of the epoch's
            // train-mode predictions under its own names.
            for (field, names) in [
                ("memorisation", ["memorised_noisy", "memorised_clean"]),
                (
                    "memorisation_running",
                    ["memorised_noisy_running", "memorised_clean_running"],
                ),
            ] {
                if let Some(m) = v[field].as_object() {
                    for (name, key) in names
                        .into_iter()
                        .zip(["predicted_noisy", "predicted_clean"])
                    {
                        if let Some(x) = m.get(key).and_then(|x| x.as_f64()) {
                            values.push(("train", name, x));
                        }
                    }
                }
            }
            store.epoch_metrics(attempt, epoch, &values).await?;
            store
                .confusion_once(attempt, epoch, &v["confusion"])
                .await?;
            bar.set_position(epoch as u64);
        }
        Some(kind) => store.event(Some(attempt), kind, line).await?,
        None => store.event(Some(attempt), "stdout", line).await?,
    }
    Ok(())
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

//! Sweeps end to end through the `fer` binary: expansion and its errors, idempotent reruns,
//! recovery after SIGKILL, retries by failure class, concurrent runners, no shell.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fer, tmp};

const BASE: &str = common::TINY_CONFIG;

fn setup(tag: &str, sweep: &str) -> (PathBuf, PathBuf) {
    let d = tmp(tag);
    std::fs::write(d.join("base.yaml"), BASE).unwrap();
    std::fs::write(d.join("s.yaml"), sweep).unwrap();
    (d.clone(), d.join("s.yaml"))
}

fn sweep(dir: &Path, file: &Path, extra: &[&str]) -> Output {
    fer()
        .arg("sweep")
        .arg(file)
        .arg("--db")
        .arg(dir.join("r.db"))
        .arg("--runs-dir")
        .arg(dir.join("runs"))
        .args(extra)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn dry_run_rows(dir: &Path, file: &Path) -> Vec<String> {
    let o = sweep(dir, file, &["--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .skip(2)
        .map(|s| s.to_string())
        .collect()
}

/// `fer sweep s.yaml` run inside `d` (for sweeps whose data paths are relative).
fn sweep_in_dir(d: &Path) -> Output {
    fer()
        .current_dir(d)
        .args(["sweep", "s.yaml", "--db", "r.db", "--runs-dir", "runs"])
        .output()
        .unwrap()
}

/// Tiny synthetic faces rendered as an ImageFolder at `d/faces`.
fn synth_faces(d: &Path) {
    let o = fer()
        .current_dir(d)
        .args(["data", "synth", "--out", "faces", "--image-size", "32"])
        .args(["--train", "28", "--test", "14"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

/// A sweep running in the background with two CPU slots.
fn spawn_sweep(dir: &Path, file: &Path) -> std::process::Child {
    fer()
        .arg("sweep")
        .arg(file)
        .arg("--db")
        .arg(dir.join("r.db"))
        .arg("--runs-dir")
        .arg(dir.join("runs"))
        .args(["--jobs", "2"])
        .spawn()
        .unwrap()
}

/// Block until some trial has recorded an epoch's metrics.
fn wait_for_first_epoch(d: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if d.join("r.db").exists()
            && sql(d, "SELECT COUNT(DISTINCT epoch) FROM metrics")
                .parse::<i64>()
                .unwrap_or(0)
                >= 1
        {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no metrics appeared");
    }
}

fn sql(dir: &Path, query: &str) -> String {
    let o = Command::new("sqlite3")
        .arg(dir.join("r.db"))
        .arg(query)
        .output()
        .expect("sqlite3");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn expansion_grid_zip_exclude_include_seeds_and_inheritance() {
    let (d, f) = setup(
        "expand",
        "base: base.yaml
overrides: {epochs: 2, model.classes: 7}
grid:
  model.heads: [1, 2, 4]
zip:
  - {losses.affinity: [0.0, 1.0], losses.partition: [0.0, 1.0]}
exclude:
  - {model.heads: 4, losses.affinity: 0.0}
include:
  - {model.heads: 8}
seeds: [0, 1]
",
    );
    let rows = dry_run_rows(&d, &f);
    // (3 heads x 2 zip) - 1 excluded + 1 included = 6 param sets, x 2 seeds.
    assert_eq!(rows.len(), 12, "{rows:#?}");
    assert!(rows.iter().all(|r| r.contains("run")));
    assert!(!rows
        .iter()
        .any(|r| r.contains("\"model.heads\":4") && r.contains("\"losses.affinity\":0.0")));
    assert_eq!(
        rows.iter()
            .filter(|r| r.contains("\"model.heads\":8"))
            .count(),
        2
    );
    // Keys are stable: the same sweep gives the same keys.
    assert_eq!(rows, dry_run_rows(&d, &f));
}

#[test]
fn sweep_errors_name_file_line_and_column() {
    let cases = [
        (
            "base: base.yaml\ngrid:\n  model.heads: [1, 2]\nsedes: [0]\n",
            "s.yaml:4:1",
            "sedes",
        ),
        (
            "base: base.yaml\ngrid:\n  model.head_count: [1, 2]\n",
            "s.yaml:3:3",
            "head_count",
        ),
        (
            "base: base.yaml\nzip:\n  - {model.heads: [1, 2], seed: [1]}\n",
            "s.yaml:3:",
            "zip",
        ),
        ("base: missing.yaml\n", "s.yaml:1:1", "missing.yaml"),
        (
            "base: base.yaml\ngrid:\n  batch: [1]\n",
            "s.yaml:3:3",
            "batch: must be at least 2",
        ),
        // A wrong type names the field and points at the override that set it.
        (
            "base: base.yaml\noverrides:\n  epochs: \"one\"\n",
            "s.yaml:3:3",
            "epochs: invalid type: string \"one\", expected usize",
        ),
        // Located by the YAML path, not by the first mention (here a comment above).
        (
            "base: base.yaml\n# optimizer: tuned below\noverrides:\n  optimizer:\n    kind: adam\n    lrr: 2\n",
            "s.yaml:4:3",
            "optimizer: unknown field `lrr`",
        ),
        (
            "base: base.yaml\ngrid:\n  noise: [null, {rat: 0.3, seed: 1}]\n",
            "s.yaml:3:3",
            "noise: expected {rate: R, seed: S} (symmetric noise) or {file: PATH}",
        ),
        (
            "base: base.yaml\noverrides: {optimizer: {kind: adam, lr: .nan}}\n",
            "s.yaml:2:13",
            "optimizer.lr: .nan / .inf is not a value any config field takes",
        ),
        // YAML would let the second key win silently.
        (
            "base: base.yaml\ngrid:\n  model.heads: [1, 2]\n  model.heads: [4]\n",
            "s.yaml:3:3",
            "duplicate key `model.heads` (at lines 3 and 4)",
        ),
        (
            "base: base.yaml\noverrides:\n  epochs: 3\n  epochs: 4\n",
            "s.yaml:3:3",
            "duplicate key `epochs` (at lines 3 and 4)",
        ),
        // Located by key path, not by the first line mentioning the word: a comment, a
        // longer key or another section's key come first in each of these.
        (
            "base: base.yaml\n# three seeds were too slow\nname: seeds_study\nseeds: []\n",
            "s.yaml:4:1",
            "seeds: needs at least one seed",
        ),
        (
            "base: base.yaml\n# max_attempts: see below\nretry:\n  divergence: false\n  max_attempts: 0\n",
            "s.yaml:5:3",
            "retry.max_attempts: must be at least 1",
        ),
        (
            "base: base.yaml\ngrid:\n  model.heads: [1, 2]\n  epochs: [2]\nexclude:\n  - {model.heads: 1}\n  - {epochs: 2, model.haeds: 2}\n",
            "s.yaml:7:17",
            "exclude[1]: `model.haeds` is not an axis",
        ),
        (
            "base: base.yaml\ngrid:\n  model.heads: [1]\nzip:\n  - {epochs: [1, 2], batch: [4, 8]}\n  - {seed: [1, 2], data.seed: [1]}\n",
            "s.yaml:6:6",
            "zip: axis seed has 2 values, the others in its group have 1",
        ),
        // A byte-order mark is not a second document.
        (
            "\u{feff}base: base.yaml\ngrid:\n  batch: [1]\n",
            "s.yaml:3:3",
            "batch: must be at least 2",
        ),
        // A misspelled exclude key would exclude nothing: an error naming the axes.
        (
            "base: base.yaml\ngrid:\n  model.heads: [1, 2]\nexclude: [{model.haeds: 2}]\n",
            "s.yaml:4:",
            "`model.haeds` is not an axis of this sweep (axes: model.heads)",
        ),
        // A grid too large is refused before it is expanded.
        (
            "base: base.yaml\ngrid:\n  model.heads: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n  batch: [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]\n  epochs: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n  seed: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]\n",
            "s.yaml:2:1",
            "expands to 11000 trials, more than the limit of 10000 (raise it with --max-trials)",
        ),
        // The device is the slot's: it cannot be swept.
        (
            "base: base.yaml\ngrid:\n  device: [cpu, \"cuda:7\"]\n",
            "s.yaml:3:3",
            "device: cannot be a sweep axis",
        ),
        // A report filter key that no trial has.
        (
            "base: base.yaml\ngrid:\n  model.heads: [1, 2]\nreport:\n  title: t\n  rows:\n    - {label: a, where: {model.haeds: 1}}\n",
            "s.yaml:",
            "`model.haeds` is not a config key of any trial",
        ),
    ];
    for (i, (sweep_text, location, what)) in cases.iter().enumerate() {
        let (d, f) = setup(&format!("err{i}"), sweep_text);
        let o = sweep(&d, &f, &["--dry-run"]);
        assert!(!o.status.success());
        let t = text(&o);
        assert!(t.contains(location) && t.contains(what), "case {i}: {t}");
    }
    // A generated 2 MB grid is refused before it is parsed.
    let values: Vec<String> = (0..300_000).map(|i| i.to_string()).collect();
    let (d, f) = setup(
        "err-huge",
        &format!("base: base.yaml\ngrid:\n  seed: [{}]\n", values.join(", ")),
    );
    let t = text(&sweep(&d, &f, &["--dry-run"]));
    assert!(t.contains("a sweep file may have at most 1048576"), "{t}");
}

#[test]
fn rerun_is_idempotent_and_results_are_queryable() {
    let (d, f) = setup(
        "idem",
        "base: base.yaml\ngrid:\n  model.heads: [1, 2]\nseeds: [0]\n",
    );
    // A dry run on no database creates none.
    assert!(dry_run_rows(&d, &f).iter().all(|r| r.contains(" run ")));
    assert!(!d.join("r.db").exists(), "--dry-run created the database");
    let first = sweep(&d, &f, &[]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("2 completed, 0 failed, 0 skipped"),
        "{}",
        text(&first)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("model.heads=1"));
    let second = sweep(&d, &f, &[]);
    assert!(
        text(&second).contains("0 completed, 0 failed, 2 skipped"),
        "{}",
        text(&second)
    );
    assert_eq!(sql(&d, "SELECT COUNT(*) FROM attempts"), "2");
    // A dry run reads the database and writes nothing: a running attempt of a dead runner stays
    // as it is (a real run would mark it interrupted).
    sql(&d, "PRAGMA wal_checkpoint(TRUNCATE); UPDATE attempts SET status = 'running', runner_pid = 999999999 WHERE id = 1; PRAGMA wal_checkpoint(TRUNCATE);");
    let before = std::fs::read(d.join("r.db")).unwrap();
    let rows = dry_run_rows(&d, &f);
    assert_eq!(
        std::fs::read(d.join("r.db")).unwrap(),
        before,
        "--dry-run wrote to the database"
    );
    assert_eq!(
        sql(&d, "SELECT status FROM attempts WHERE id = 1"),
        "running"
    );
    sql(&d, "UPDATE attempts SET status = 'completed' WHERE id = 1");
    assert!(
        rows.iter().any(|r| r.contains("skip: running elsewhere")),
        "{rows:?}"
    );
    assert!(dry_run_rows(&d, &f)
        .iter()
        .all(|r| r.contains("skip: done")));
    assert_eq!(
        sql(
            &d,
            "SELECT COUNT(*) FROM trial_results WHERE final_accuracy IS NOT NULL"
        ),
        "2"
    );
    assert_eq!(
        sql(
            &d,
            "SELECT COUNT(*) FROM trial_params WHERE name = 'model.heads'"
        ),
        "2"
    );
    let runs = fer()
        .args(["runs", "--db"])
        .arg(d.join("r.db"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&runs.stdout)
            .matches("completed")
            .count(),
        2
    );
}

#[test]
fn a_diverged_trial_is_classed_and_retried_only_by_policy() {
    // lr 1e30 diverges after training starts: its own class, not retried by default...
    let (d, f) = setup("diverge", "base: base.yaml\noverrides: {optimizer: {kind: sgd, lr: 1.0e30}}\nretry: {max_attempts: 2}\n");
    let o = sweep(&d, &f, &[]);
    assert!(text(&o).contains("0 completed, 1 failed"), "{}", text(&o));
    assert_eq!(
        sql(&d, "SELECT failure_class || ' ' || exit_code FROM attempts"),
        "divergence 4",
        "one attempt: a diverged seed is not retried unless the sweep asks"
    );
    // ... and retried up to max_attempts with `retry: {divergence: true}`.
    let (d, f) = setup("crash", "base: base.yaml\noverrides: {optimizer: {kind: sgd, lr: 1.0e30}}\nretry: {max_attempts: 2, divergence: true}\n");
    let o = sweep(&d, &f, &[]);
    assert!(text(&o).contains("0 completed, 1 failed"), "{}", text(&o));
    assert_eq!(o.status.code(), Some(3), "failed trials: exit status 3");
    assert_eq!(
        sql(
            &d,
            "SELECT COUNT(*) FROM attempts WHERE status = 'failed' AND failure_class = 'divergence'"
        ),
        "2"
    );
    assert!(sql(&d, "SELECT error FROM attempts LIMIT 1").contains("not finite"));
    assert!(sql(&d, "SELECT stderr_tail FROM attempts LIMIT 1").contains("error"));
    // `fer runs` filters by status and shows the failure class and error.
    let runs = fer()
        .args(["runs", "--status", "failed", "--db"])
        .arg(d.join("r.db"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&runs.stdout);
    assert!(
        listing.contains("[divergence]") && listing.contains("not finite"),
        "{listing}"
    );
    let runs = fer()
        .args(["runs", "--status", "completed", "--db"])
        .arg(d.join("r.db"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&runs.stdout).lines().count(),
        1,
        "header only"
    );
    // A rerun does not try again once the attempts are used up.
    let o = sweep(&d, &f, &[]);
    assert!(
        text(&o).contains("0 completed, 0 failed, 1 skipped"),
        "{}",
        text(&o)
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "a sweep whose trial stays failed is not a success"
    );
    // Unknown filter values are errors that list the valid ones.
    let runs = |args: &[&str]| {
        fer()
            .arg("runs")
            .args(args)
            .arg("--db")
            .arg(d.join("r.db"))
            .output()
            .unwrap()
    };
    let o = runs(&["--status", "bogus"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--status \"bogus\"") && err.contains("completed, failed"),
        "{err}"
    );
    let o = runs(&["--sweep", "nonexistent"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no such sweep") && err.contains("sweeps: s"),
        "{err}"
    );
    assert!(runs(&["--status", "pending"]).status.success());
}

#[test]
fn sweep_names_cannot_leave_the_runs_folder() {
    for (i, bad) in ["../../x", "a/b", ".hidden", ""].into_iter().enumerate() {
        let (d, f) = setup(
            &format!("name{i}"),
            &format!("name: \"{bad}\"\nbase: base.yaml\n"),
        );
        let o = sweep(&d, &f, &[]);
        assert!(!o.status.success(), "{bad:?} accepted");
        let err = text(&o);
        assert!(
            err.contains("s.yaml")
                && (err.contains("not a valid sweep name") || err.contains("1 to 100 characters")),
            "{err}"
        );
        let outside = d.parent().unwrap().join("x");
        assert!(
            !outside.exists() && !d.join("runs").exists(),
            "nothing written for {bad:?}"
        );
        assert!(!d.join("r.db").exists(), "no database for {bad:?}");
    }
}

#[test]
fn a_setup_error_stops_the_sweep_once_and_no_value_reaches_a_shell() {
    let marker = std::env::temp_dir().join(format!("fer-pwned-{}", std::process::id()));
    let sweep_text = format!(
        "base: base.yaml\noverrides:\n  data: {{kind: raf_db, root: \"$(touch {m}); touch {m} `touch {m}`\"}}\ngrid:\n  model.heads: [1, 2]\nretry: {{max_attempts: 3}}\n",
        m = marker.display()
    );
    let (d, f) = setup("shell", &sweep_text);
    let o = sweep(&d, &f, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("setup check of sweep s failed before any trial started")
            && t.contains("does not exist"),
        "{t}"
    );
    assert_eq!(t.matches("does not exist").count(), 1, "reported once: {t}");
    assert!(!marker.exists(), "a sweep value was executed by a shell");
    assert_eq!(
        sql(&d, "SELECT COUNT(*) FROM attempts"),
        "0",
        "no trial started"
    );
}

#[test]
fn an_undecodable_image_is_a_data_error_never_retried() {
    let (d, _) = setup(
        "bad-image",
        "base: base.yaml\noverrides:\n  data: {kind: image_folder, root: faces}\nretry: {max_attempts: 3}\n",
    );
    synth_faces(&d);
    // A file that is no image among the training images: present (the setup check passes),
    // undecodable when the loader reaches it.
    let class_dir = std::fs::read_dir(d.join("faces/train"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(class_dir.join("zz_notes.png"), "not an image").unwrap();
    let o = sweep_in_dir(&d);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(
        sql(&d, "SELECT failure_class || ' ' || exit_code FROM attempts"),
        "data 5",
        "one attempt, classed as a data error"
    );
    assert!(
        sql(&d, "SELECT error FROM attempts").contains("zz_notes.png: cannot decode image"),
        "the error names the file"
    );
}

#[test]
fn setup_failures_use_no_retry_and_retry_failed_rearms_trials() {
    // A data folder that appears only after the first run.
    let (d, _) = setup(
        "late-data",
        "base: base.yaml\noverrides:\n  data: {kind: image_folder, root: faces}\nretry: {max_attempts: 1}\n",
    );
    let o = sweep_in_dir(&d);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    synth_faces(&d);
    let o = sweep_in_dir(&d);
    assert!(o.status.success(), "the fixed setup runs: {}", text(&o));
    assert_eq!(sql(&d, "SELECT COUNT(*) FROM latest_completed"), "1");

    // A trial-level setup error (found by the trial itself) is recorded as `config`, is not
    // retried within the run, and does not use up the retry budget: the next run tries again.
    let (d, f2) = setup(
        "cfg",
        "base: base.yaml\noverrides: {model.classes: 8}\nretry: {max_attempts: 1}\n",
    );
    for run in 1..=2 {
        let o = sweep(&d, &f2, &[]);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert_eq!(
            sql(
                &d,
                "SELECT COUNT(*) FROM attempts WHERE failure_class = 'config' AND exit_code = 2"
            ),
            run.to_string()
        );
    }
    // A crash uses up the budget; --retry-failed re-arms it.
    let (d, f3) = setup(
        "rearm",
        "base: base.yaml\noverrides: {optimizer: {kind: sgd, lr: 1.0e30}}\nretry: {max_attempts: 1}\n",
    );
    assert_eq!(sweep(&d, &f3, &[]).status.code(), Some(3));
    let o = sweep(&d, &f3, &[]);
    assert!(
        text(&o).contains("0 completed, 0 failed, 1 skipped"),
        "{}",
        text(&o)
    );
    assert_eq!(sql(&d, "SELECT COUNT(*) FROM attempts"), "1");
    let o = sweep(&d, &f3, &["--retry-failed"]);
    assert!(text(&o).contains("0 completed, 1 failed"), "{}", text(&o));
    assert_eq!(
        sql(&d, "SELECT COUNT(*) FROM attempts"),
        "2",
        "re-armed: one more attempt"
    );
}

#[test]
fn a_killed_sweep_resumes_and_completes_every_trial_once() {
    let (d, f) = setup(
        "kill",
        "base: base.yaml\noverrides: {epochs: 4, data.train: 56}\ngrid:\n  model.heads: [1, 2]\n",
    );
    let mut child = spawn_sweep(&d, &f);
    // Wait until some epoch metrics are recorded, then SIGKILL the runner.
    wait_for_first_epoch(&d);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500)); // orphans notice the closed pipe
    let o = sweep(&d, &f, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(sql(&d, "SELECT COUNT(*) FROM latest_completed"), "2");
    assert_eq!(
        sql(
            &d,
            "SELECT COUNT(*) FROM attempts WHERE status = 'completed'"
        ),
        "2",
        "each trial completes once"
    );
    assert_eq!(
        sql(&d, "SELECT COUNT(*) FROM attempts WHERE status = 'running'"),
        "0"
    );
    // Every epoch of every trial is recorded exactly once.
    assert_eq!(sql(&d, "SELECT COUNT(*) FROM (SELECT trial_key, epoch FROM trial_metrics WHERE split='test' AND name='accuracy' GROUP BY trial_key, epoch)"), "8");
    assert_eq!(
        sql(
            &d,
            "SELECT COUNT(*) FROM trial_metrics WHERE split='test' AND name='accuracy'"
        ),
        "8",
        "duplicate metric rows"
    );
    // One confusion matrix per trial and epoch, also for the epochs a resumed attempt replays.
    assert_eq!(
        sql(
            &d,
            "SELECT COUNT(*) || ' ' || COUNT(DISTINCT a.trial_key || ':' || json_extract(e.payload, '$.epoch')) FROM events e JOIN attempts a ON a.id = e.attempt_id WHERE e.kind = 'confusion'"
        ),
        "8 8",
        "duplicate confusion events"
    );
}

#[test]
fn two_runners_never_run_the_same_trial_at_once() {
    let (d, f) = setup(
        "two",
        "base: base.yaml\noverrides: {epochs: 2}\ngrid:\n  model.heads: [1, 2, 4]\n",
    );
    let spawn = || {
        fer()
            .arg("sweep")
            .arg(&f)
            .arg("--db")
            .arg(d.join("r.db"))
            .arg("--runs-dir")
            .arg(d.join("runs"))
            .arg("--jobs")
            .arg("1")
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let b = s.spawn(spawn);
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        text(&a),
        text(&b)
    );
    assert_eq!(
        sql(&d, "SELECT COUNT(*) FROM attempts"),
        "3",
        "each trial ran exactly once across both runners"
    );
    assert_eq!(
        sql(
            &d,
            "SELECT COUNT(*) FROM attempts WHERE status = 'completed'"
        ),
        "3"
    );
}

#[test]
fn ctrl_c_stops_children_marks_attempts_interrupted_and_the_next_run_resumes() {
    // 60 epochs: with 6 both trials could finish between the first epoch and the signal (they
    // did once the training step got faster), and the sweep would rightly exit 0.
    let (d, f) = setup(
        "sigint",
        "base: base.yaml\noverrides: {epochs: 60, data.train: 56}\ngrid:\n  model.heads: [1, 2]\n",
    );
    let mut child = spawn_sweep(&d, &f);
    wait_for_first_epoch(&d);
    let ok = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "an interrupted sweep exits with 130"
    );
    assert_eq!(
        sql(&d, "SELECT COUNT(*) FROM attempts WHERE status = 'running'"),
        "0"
    );
    let interrupted: i64 = sql(
        &d,
        "SELECT COUNT(*) FROM attempts WHERE status = 'interrupted'",
    )
    .parse()
    .unwrap();
    let completed: i64 = sql(
        &d,
        "SELECT COUNT(*) FROM attempts WHERE status = 'completed'",
    )
    .parse()
    .unwrap();
    assert_eq!(interrupted + completed, 2);
    assert!(interrupted >= 1);
    let o = sweep(&d, &f, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(sql(&d, "SELECT COUNT(*) FROM latest_completed"), "2");
    assert_eq!(
        sql(
            &d,
            "SELECT COUNT(*) FROM trial_metrics WHERE split='test' AND name='accuracy'"
        ),
        "120"
    );
}

#[test]
fn sigterm_stops_the_sweep_like_ctrl_c_and_waiting_trials_never_start() {
    // 60 epochs: with 6 the running trial could finish between its first epoch and the signal.
    let (d, f) = setup(
        "term",
        "base: base.yaml\noverrides: {epochs: 60, data.train: 56}\ngrid:\n  model.heads: [1, 2, 4]\n",
    );
    let mut child = fer()
        .arg("sweep")
        .arg(&f)
        .arg("--db")
        .arg(d.join("r.db"))
        .arg("--runs-dir")
        .arg(d.join("runs"))
        .args(["--jobs", "1"])
        .spawn()
        .unwrap();
    wait_for_first_epoch(&d);
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "SIGTERM is handled, not fatal");
    // The running trial is interrupted; the two waiting for the one slot never started.
    assert_eq!(
        sql(&d, "SELECT status FROM attempts"),
        "interrupted",
        "exactly one attempt, marked interrupted"
    );
    // The next run resumes it and runs the rest.
    let o = sweep(&d, &f, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(sql(&d, "SELECT COUNT(*) FROM latest_completed"), "3");
}

#[test]
fn a_store_write_error_stops_the_sweep_loudly() {
    let (d, f) = setup(
        "store-full",
        "base: base.yaml\ngrid:\n  model.heads: [1, 2, 4]\n",
    );
    // Create the database with another sweep, then make every metric write fail as a full
    // disk would.
    std::fs::write(
        d.join("empty.yaml"),
        "base: base.yaml\nseeds: [9]\noverrides: {epochs: 1}\n",
    )
    .unwrap();
    let o = sweep(&d, &d.join("empty.yaml"), &[]);
    assert!(o.status.success(), "{}", text(&o));
    sql(
        &d,
        "CREATE TRIGGER full BEFORE INSERT ON metrics BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;",
    );
    let o = sweep(&d, &f, &["--jobs", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("writing the results store")
            && err.contains("r.db")
            && err.contains("disk is full"),
        "{err}"
    );
    // The first trial hit the error; the others, waiting for the one slot, never started.
    assert_eq!(
        sql(&d, "SELECT COUNT(*) FROM attempts a JOIN sweep_trials st ON st.trial_key = a.trial_key JOIN sweeps s ON s.id = st.sweep_id WHERE s.name = 's'"),
        "1"
    );
}

#[test]
fn a_full_disk_stops_the_sweep_without_spending_retries() {
    let (d, f) = setup(
        "disk-full",
        "base: base.yaml\ngrid:\n  model.heads: [1, 2, 4]\nretry: {max_attempts: 3}\n",
    );
    // The runs folder on a 96 KiB file system: the first checkpoint does not fit.
    let runs = d.join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=96k", "tmpfs"])
        .arg(&runs)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED a_full_disk_stops_the_sweep_without_spending_retries: cannot mount a tmpfs here (needs root)");
        return;
    }
    let o = fer()
        .arg("sweep")
        .arg(&f)
        .arg("--db")
        .arg(d.join("r.db"))
        .arg("--runs-dir")
        .arg(&runs)
        .args(["--jobs", "1"])
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(&runs).status();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no space left") && err.contains("stopping the sweep"),
        "{err}"
    );
    // One attempt, classed `resource`; the other trials never started, and nothing was retried.
    assert_eq!(
        sql(&d, "SELECT failure_class || ' ' || exit_code FROM attempts"),
        "resource 6"
    );
    // With space again, the same trials run (the failure used up no retry).
    let o = sweep(&d, &f, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(sql(&d, "SELECT COUNT(*) FROM latest_completed"), "3");
}

/// A bad value in an include item or a profile's override is reported at its own line and
/// column, not at the grid or with no place at all.
#[test]
fn errors_point_into_include_items_and_profile_overrides() {
    let d = tmp("sweep-locations");
    std::fs::write(d.join("base.yaml"), BASE).unwrap();
    let file = d.join("s.yaml");
    std::fs::write(
        &file,
        "base: base.yaml\ngrid:\n  model.heads: [1, 2]\ninclude:\n  - {model.heads: 3}\n  - model.heads: 5\n    batch: 1\nprofiles:\n  thesis:\n    epochs: 0\n  typo:\n    model.backbone: {arch: resnet18, widths: [1, 2, 3, 4]}\n",
    )
    .unwrap();
    let run = |profile: Option<&str>| {
        let mut c = fer();
        c.args(["sweep", "--dry-run"]).arg(&file);
        if let Some(p) = profile {
            c.args(["--profile", p]);
        }
        let out = c.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "a config error is a setup error"
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(None);
    assert!(
        e.contains("s.yaml:7:5:") && e.contains("batch: must be at least 2"),
        "{e}"
    );
    let e = run(Some("thesis"));
    assert!(
        e.contains("s.yaml:10:5:") && e.contains("epochs: must be at least 1"),
        "{e}"
    );
    let e = run(Some("typo"));
    assert!(
        e.contains("s.yaml:12:5:") && e.contains("unknown field `widths`"),
        "{e}"
    );
}

/// Results on a read-only mount (a shared results folder, a snapshot) can be read: `fer runs`,
/// `fer report` and `fer sweep --dry-run` open the database read-only and write nothing.
#[test]
fn results_on_a_read_only_mount_can_be_read() {
    let (d, f) = setup(
        "read-only",
        "base: base.yaml\ngrid:\n  model.heads: [1, 2]\nreport:\n  title: heads\n  columns:\n    - {label: \"Accuracy\", where: {}}\n  rows:\n    - {label: \"1\", where: {model.heads: 1}}\n    - {label: \"2\", where: {model.heads: 2}}\n",
    );
    let o = sweep(&d, &f, &["--jobs", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    // The runner's last connection has checkpointed the WAL and removed its side files: SQLite
    // would have to create `r.db-shm` to read the file normally, which a read-only mount forbids.
    assert!(!d.join("r.db-wal").exists() && !d.join("r.db-shm").exists());
    let results = d.join("results");
    std::fs::create_dir_all(&results).unwrap();
    let bound = Command::new("mount")
        .arg("--bind")
        .arg(&d)
        .arg(&results)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(&results)
            .status()
            .is_ok_and(|s| s.success());
    if !bound {
        let _ = Command::new("umount").arg(&results).status();
        eprintln!(
            "SKIPPED results_on_a_read_only_mount_can_be_read: cannot bind-mount here (needs root)"
        );
        return;
    }
    let db = results.join("r.db");
    let runs = fer().args(["runs", "--db"]).arg(&db).output().unwrap();
    let report = fer()
        .arg("report")
        .arg(results.join("s.yaml"))
        .arg("--db")
        .arg(&db)
        .arg("--out")
        .arg(d.join("reports"))
        .output()
        .unwrap();
    let dry = fer()
        .arg("sweep")
        .arg(results.join("s.yaml"))
        .arg("--db")
        .arg(&db)
        .arg("--dry-run")
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(&results).status();
    assert!(runs.status.success(), "{}", text(&runs));
    assert_eq!(
        String::from_utf8_lossy(&runs.stdout)
            .matches("completed")
            .count(),
        2,
        "{}",
        text(&runs)
    );
    assert!(report.status.success(), "{}", text(&report));
    assert!(d.join("reports/s.md").is_file());
    assert!(dry.status.success(), "{}", text(&dry));
    assert_eq!(
        String::from_utf8_lossy(&dry.stdout)
            .matches("skip: done")
            .count(),
        2,
        "{}",
        text(&dry)
    );
}

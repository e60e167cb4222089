//! Beyond one machine, with the real components: sweeps submitted to a one-node Slurm cluster
//! (`common::slurm`) as job arrays of `fer worker`s sharing a PostgreSQL store
//! (`common::postgres`). Every trial completes exactly once; a cancelled task's trial completes
//! after resubmission without a duplicate metric; a task warned of its time limit (SIGUSR1)
//! requeues itself and its trial resumes from the checkpoint; the store's password never lands
//! in a file, the database or the output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fer_runner::store::{DbUrl, Store};

use crate::common::{self, fer, slurm, tmp};

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// `fer ARGS` in `dir` against the cluster and the store (the URL only in the environment).
fn fer_at(dir: &Path, conf: &Path, db: &DbUrl, args: &[&str]) -> Output {
    let DbUrl::Postgres(url) = db else {
        unreachable!()
    };
    fer()
        .current_dir(dir)
        .env("SLURM_CONF", conf)
        .env("FER_DB", url)
        .args(args)
        .output()
        .unwrap()
}

/// `fer sweep s.yaml --launcher slurm EXTRA` in `dir`, which must succeed.
fn submit(dir: &Path, conf: &Path, db: &DbUrl, extra: &[&str]) -> Output {
    let mut args = vec!["sweep", "s.yaml", "--launcher", "slurm"];
    args.extend_from_slice(extra);
    let o = fer_at(dir, conf, db, &args);
    assert!(o.status.success(), "{}", text(&o));
    o
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A sweep folder: the tiny base config (with `epochs`) and `s.yaml` with these sweep lines.
fn setup(tag: &str, epochs: usize, sweep_lines: &str) -> PathBuf {
    let d = tmp(tag);
    let base = common::TINY_CONFIG.replace("epochs: 1\n", &format!("epochs: {epochs}\n"));
    std::fs::write(d.join("base.yaml"), base).unwrap();
    std::fs::write(
        d.join("s.yaml"),
        format!("base: base.yaml\nresources: {{threads_per_trial: 1, memory: 500M, time: \"10:00\"}}\n{sweep_lines}"),
    )
    .unwrap();
    d
}

/// Epochs of a trial that a test stops mid-way (cancel, time-limit signal): enough that the
/// signal lands before the end even when the test notices the first epochs late (with 30, a
/// fast machine had finished the trial by then).
const MID_TRIAL_EPOCHS: usize = 80;

/// The services, or None (skipped) outside CI where they cannot start.
fn services(tag: &str) -> Option<(&'static slurm::Cluster, DbUrl)> {
    let cluster = slurm::cluster()?;
    let db = block(common::postgres::fresh_db(tag))?;
    Some((cluster, db))
}

/// Submitted job ids in a `fer sweep --launcher slurm` output.
fn job_id(o: &Output) -> String {
    let t = text(o);
    let at = t
        .find("submitted Slurm job ")
        .unwrap_or_else(|| panic!("no job submitted: {t}"));
    t[at + "submitted Slurm job ".len()..]
        .split(':')
        .next()
        .unwrap()
        .to_string()
}

fn state_of(db: &DbUrl, key: &str) -> fer_runner::store::TrialState {
    block(async {
        let s = Store::open_read_only(db).await.unwrap().unwrap();
        let st = s.trial_state(key).await.unwrap();
        s.close().await;
        st
    })
}

/// Test-accuracy rows of a trial across all its attempts (one per epoch when nothing is
/// duplicated), its attempts' statuses and the `start_epoch` of each `started` event.
fn history(db: &DbUrl, key: &str) -> (usize, Vec<String>, Vec<i64>) {
    block(async {
        use sqlx::Connection;
        let DbUrl::Postgres(url) = db else {
            unreachable!()
        };
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        let rows: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM trial_metrics WHERE trial_key = $1 AND split = 'test' AND name = 'accuracy'",
        )
        .bind(key)
        .fetch_one(&mut c)
        .await
        .unwrap();
        let statuses: Vec<String> =
            sqlx::query_scalar("SELECT status FROM attempts WHERE trial_key = $1 ORDER BY id")
                .bind(key)
                .fetch_all(&mut c)
                .await
                .unwrap();
        let starts: Vec<String> = sqlx::query_scalar(
            "SELECT e.payload FROM events e JOIN attempts a ON a.id = e.attempt_id WHERE a.trial_key = $1 AND e.kind = 'started' ORDER BY e.id",
        )
        .bind(key)
        .fetch_all(&mut c)
        .await
        .unwrap();
        let starts = starts
            .iter()
            .map(|p| {
                serde_json::from_str::<serde_json::Value>(p).unwrap()["start_epoch"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        (rows as usize, statuses, starts)
    })
}

/// The one trial key of a one-trial sweep.
fn only_trial(db: &DbUrl) -> String {
    block(async {
        let s = Store::open_read_only(db).await.unwrap().unwrap();
        let rows = s.trial_rows(Some("s"), None).await.unwrap();
        s.close().await;
        assert_eq!(rows.len(), 1);
        rows[0].trial_key.clone()
    })
}

/// Six trials through the launcher: each completes exactly once, a second submission has
/// nothing to do, the status shows them, and the password is nowhere.
#[test]
fn a_slurm_sweep_completes_every_trial_once_and_never_shows_the_password() {
    let Some((cluster, db)) = services("launch") else {
        return;
    };
    let password = db.password().unwrap();
    let d = setup(
        "slurm-launch",
        2,
        "grid:\n  model.heads: [1, 2]\nseeds: [0, 1, 2]\n",
    );
    let mut outputs = Vec::new();
    let o = submit(&d, &cluster.conf, &db, &["--parallel", "2"]);
    let job = job_id(&o);
    outputs.push(text(&o));
    let script = std::fs::read_to_string(d.join(format!("runs/s/slurm/{job}.sbatch"))).unwrap();
    assert!(
        script.contains("#SBATCH --array=0-5%2") && script.contains("--requeue"),
        "{script}"
    );
    assert!(
        script.contains("--mem=500M") && script.contains("--time=10:00"),
        "{script}"
    );
    assert!(!script.contains("postgres"), "{script}");
    slurm::wait_for(300, "six completed trials", || {
        let o = fer_at(
            &d,
            &cluster.conf,
            &db,
            &["runs", "--sweep", "s", "--status", "completed"],
        );
        text(&o).lines().filter(|l| l.starts_with("s ")).count() == 6
    });
    let (results, rows) = block(async {
        let s = Store::open_read_only(&db).await.unwrap().unwrap();
        let r = (
            s.results("s").await.unwrap(),
            s.trial_rows(Some("s"), None).await.unwrap(),
        );
        s.close().await;
        r
    });
    assert_eq!(results.len(), 6);
    assert!(
        rows.iter().all(|r| r.attempts == 1),
        "one attempt per trial: {rows:?}"
    );
    for r in &rows {
        assert_eq!(
            history(&db, &r.trial_key).0,
            2,
            "two epochs, each recorded once"
        );
    }
    let o = fer_at(
        &d,
        &cluster.conf,
        &db,
        &["sweep", "s.yaml", "--launcher", "slurm"],
    );
    assert!(text(&o).contains("nothing to submit"), "{}", text(&o));
    outputs.push(text(&o));
    let o = fer_at(&d, &cluster.conf, &db, &["sweep", "s.yaml", "--status"]);
    assert!(
        text(&o).contains("6 completed") && text(&o).contains(&format!("Slurm job {job}")),
        "{}",
        text(&o)
    );
    outputs.push(text(&o));
    let runs = text(&fer_at(&d, &cluster.conf, &db, &["runs"]));
    assert!(
        runs.contains(&format!("[slurm {job}_")),
        "the Slurm task of each trial: {runs}"
    );
    outputs.push(runs);
    // The password: not in any file the sweep wrote, any output, or the database's text.
    for f in slurm::files_under(&d) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&password),
            "the password is in {}",
            f.display()
        );
    }
    for o in &outputs {
        assert!(!o.contains(&password), "the password is in an output: {o}");
    }
    let dump: String = block(async {
        use sqlx::Connection;
        let DbUrl::Postgres(url) = &db else {
            unreachable!()
        };
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        let mut all = String::new();
        for t in [
            "sweeps",
            "trials",
            "trial_params",
            "attempts",
            "metrics",
            "events",
            "sweep_trials",
            "slurm_jobs",
        ] {
            let rows: Vec<String> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM {t} t")))
                    .fetch_all(&mut c)
                    .await
                    .unwrap();
            all.push_str(&rows.join("\n"));
        }
        all
    });
    assert!(dump.contains("slurm-cpu") && !dump.contains(&password));
}

/// The trial keys of the one-sweep store, in trial-key order.
fn trial_keys(db: &DbUrl) -> Vec<String> {
    block(async {
        let s = Store::open_read_only(db).await.unwrap().unwrap();
        let mut keys: Vec<String> = s
            .trial_rows(Some("s"), None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.trial_key)
            .collect();
        s.close().await;
        keys.sort();
        keys
    })
}

/// The Slurm task (`JOB_TASK`) of a trial's latest attempt.
fn task_of(db: &DbUrl, key: &str) -> Option<String> {
    block(async {
        let s = Store::open_read_only(db).await.unwrap().unwrap();
        let a = s.latest_attempt(key).await.unwrap();
        s.close().await;
        a.and_then(|a| a.slurm_job)
    })
}

/// `scancel` of the one array task running a trial, mid-trial, while another task runs the
/// other trial: a resubmission leaves the running trial alone and runs the cancelled one again,
/// which resumes from its checkpoint; both complete with every epoch's metric recorded once.
#[test]
fn a_cancelled_task_is_completed_by_resubmission_without_duplicates() {
    let Some((cluster, db)) = services("cancel") else {
        return;
    };
    let epochs = MID_TRIAL_EPOCHS;
    let d = setup("slurm-cancel", epochs, "seeds: [0, 1]\n");
    submit(&d, &cluster.conf, &db, &["--parallel", "2"]);
    let keys = trial_keys(&db);
    assert_eq!(keys.len(), 2);
    slurm::wait_for(240, "a few epochs of both trials", || {
        keys.iter().all(|k| history(&db, k).0 >= 3)
    });
    let (cancelled, other) = (&keys[0], &keys[1]);
    let task = task_of(&db, cancelled).expect("the trial runs in a Slurm task");
    let out = Command::new("scancel")
        .arg(&task)
        .env("SLURM_CONF", &cluster.conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    slurm::wait_for(60, "the cancelled attempt to stop", || {
        !state_of(&db, cancelled).running
    });
    assert!(
        history(&db, cancelled).0 < epochs,
        "cancelled before the end"
    );
    let o = submit(&d, &cluster.conf, &db, &[]);
    if state_of(&db, other).running {
        assert!(
            text(&o).contains("1 worker task(s)") && text(&o).contains("1 already running"),
            "{}",
            text(&o)
        );
    }
    slurm::wait_for(300, "both trials to complete", || {
        keys.iter().all(|k| state_of(&db, k).completed)
    });
    for key in &keys {
        let (rows, statuses, starts) = history(&db, key);
        assert_eq!(rows, epochs, "every epoch once: {statuses:?}");
        assert_eq!(statuses.last().map(String::as_str), Some("completed"));
        if key == cancelled {
            assert_eq!(statuses.first().map(String::as_str), Some("interrupted"));
            assert!(
                starts.last().is_some_and(|&s| s > 0),
                "resumed from a checkpoint: {starts:?}"
            );
        } else {
            assert_eq!(
                statuses.len(),
                1,
                "the running trial was left alone: {statuses:?}"
            );
        }
    }
}

/// `fer sweep --cancel`: the sweep's jobs leave the queue and their running attempts are
/// interrupted (resumable), not failed.
#[test]
fn cancelling_a_sweep_stops_its_jobs_and_interrupts_its_attempts() {
    let Some((cluster, db)) = services("cancel-all") else {
        return;
    };
    let d = setup("slurm-cancel-all", MID_TRIAL_EPOCHS, "seeds: [0]\n");
    let o = submit(&d, &cluster.conf, &db, &[]);
    let job = job_id(&o);
    let key = only_trial(&db);
    slurm::wait_for(240, "the trial to run", || history(&db, &key).0 >= 2);
    let o = fer_at(&d, &cluster.conf, &db, &["sweep", "s.yaml", "--cancel"]);
    assert!(
        o.status.success() && text(&o).contains(&format!("Slurm job {job}: cancelled")),
        "{}",
        text(&o)
    );
    slurm::wait_for(60, "the attempt to stop", || !state_of(&db, &key).running);
    assert_eq!(history(&db, &key).1, vec!["interrupted".to_string()]);
    slurm::wait_for(60, "the job to leave the queue", || {
        let o = fer_at(&d, &cluster.conf, &db, &["sweep", "s.yaml", "--status"]);
        text(&o).contains("no task in the queue")
    });
}

/// SIGUSR1 (what `--signal=B:USR1@S` sends before the time limit) to the worker: it stops the
/// trial, requeues its task, and the requeued task resumes the trial to completion.
#[test]
fn a_time_limit_warning_requeues_the_task_and_the_trial_resumes() {
    let Some((cluster, db)) = services("usr1") else {
        return;
    };
    let epochs = MID_TRIAL_EPOCHS;
    let d = setup("slurm-usr1", epochs, "seeds: [0]\n");
    let o = submit(&d, &cluster.conf, &db, &[]);
    let job = job_id(&o);
    let key = only_trial(&db);
    slurm::wait_for(240, "a few epochs of the trial", || {
        history(&db, &key).0 >= 3
    });
    let out = Command::new("scancel")
        .args(["--batch", "--signal=USR1", &job])
        .env("SLURM_CONF", &cluster.conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    slurm::wait_for(400, "the requeued task to complete the trial", || {
        state_of(&db, &key).completed
    });
    let (rows, statuses, starts) = history(&db, &key);
    assert_eq!(rows, epochs, "every epoch once: {statuses:?}");
    assert!(
        statuses.len() >= 2 && statuses[0] == "interrupted",
        "{statuses:?}"
    );
    assert!(
        starts.last().is_some_and(|&s| s > 0),
        "resumed from a checkpoint: {starts:?}"
    );
    let log = std::fs::read_dir(d.join("runs/s/slurm"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "out"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(log.contains("requeued"), "{log}");
}

/// Rows of each table of a SQLite store (what a second sync must not change).
fn sqlite_counts(db: &Path) -> Vec<String> {
    ["attempts", "metrics", "events", "journal_attempts"]
        .iter()
        .map(|t| {
            let o = Command::new("sqlite3")
                .arg(db)
                .arg(format!("SELECT COUNT(*) FROM {t}"))
                .output()
                .unwrap();
            format!("{t}={}", String::from_utf8_lossy(&o.stdout).trim())
        })
        .collect()
}

/// Without a database server: the workers write journals into the runs folder, `fer sync`
/// ingests them into the SQLite file; syncing again changes nothing, and a line still being
/// written is taken whole on the next sync, once.
#[test]
fn journals_sync_into_sqlite_once_and_half_written_lines_wait() {
    let Some(cluster) = slurm::cluster() else {
        return;
    };
    let d = setup(
        "slurm-journal",
        2,
        "grid:\n  model.heads: [1, 2]\nseeds: [0, 1]\n",
    );
    let run = |args: &[&str]| {
        let o = fer()
            .current_dir(&d)
            .env("SLURM_CONF", &cluster.conf)
            .env_remove("FER_DB")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "fer {args:?}: {}", text(&o));
        text(&o)
    };
    let out = run(&["sweep", "s.yaml", "--launcher", "slurm", "--db", "fer.db"]);
    assert!(out.contains("submitted Slurm job"), "{out}");
    let journals = || {
        slurm::files_under(&d.join("runs/s"))
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n == "journal.jsonl"))
            .collect::<Vec<_>>()
    };
    slurm::wait_for(300, "four journals with an end record", || {
        let j = journals();
        j.len() == 4
            && j.iter().all(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .contains("\"end\"")
            })
    });
    let out = run(&["sync", "s.yaml", "--db", "fer.db"]);
    assert!(out.contains("4 attempt(s) started, 4 ended"), "{out}");
    let runs = run(&[
        "runs",
        "--db",
        "fer.db",
        "--sweep",
        "s",
        "--status",
        "completed",
    ]);
    assert_eq!(
        runs.lines().filter(|l| l.starts_with("s ")).count(),
        4,
        "{runs}"
    );
    let db = d.join("fer.db");
    let before = sqlite_counts(&db);
    let out = run(&["sync", "s.yaml", "--db", "fer.db"]);
    assert!(out.contains(": 0 journal record(s)"), "{out}");
    assert_eq!(sqlite_counts(&db), before, "a second sync changes nothing");
    // A worker in the middle of writing: half a start record, then the rest.
    let journal = &journals()[0];
    let start = r#"{"attempt":"manual-1","start":{"at":"2026-12-03T23:00:00.000Z","device":"cpu0","host":"h","pid":1,"slurm_job":null,"git_commit":null,"git_dirty":null}}"#;
    let (head, rest) = start.split_at(40);
    let append = |s: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(journal)
            .unwrap();
        f.write_all(s.as_bytes()).unwrap();
    };
    append(head);
    run(&["sync", "s.yaml", "--db", "fer.db"]);
    assert_eq!(sqlite_counts(&db), before, "half a line is not ingested");
    append(&format!(
        "{rest}\n{{\"attempt\":\"manual-1\",\"line\":\"hello\"}}\n"
    ));
    let out = run(&["sync", "s.yaml", "--db", "fer.db"]);
    assert!(out.contains(": 2 journal record(s)"), "{out}");
    let after = sqlite_counts(&db);
    assert_ne!(after, before);
    run(&["sync", "s.yaml", "--db", "fer.db"]);
    assert_eq!(sqlite_counts(&db), after, "each line once");
    // Everything done: a resubmission has nothing to do.
    let out = run(&["sweep", "s.yaml", "--launcher", "slurm", "--db", "fer.db"]);
    assert!(out.contains("nothing to submit"), "{out}");
}

//! The results store's behaviour, on SQLite and on a real PostgreSQL server (started by the test
//! setup, `common::postgres`): every test runs on each backend available.

use std::collections::BTreeMap;
use std::time::Duration;

use fer_model::events::{EpochMetrics, Event, EventLine};
use fer_runner::scheduler::record_line;
use fer_runner::store::{Claimant, DbUrl, Store};

use crate::common;

/// A SQLite file and, when a server runs, a fresh PostgreSQL database.
async fn backends(tag: &str) -> Vec<DbUrl> {
    let mut out = vec![DbUrl::Sqlite(common::tmp(tag).join("fer.db"))];
    out.extend(common::postgres::fresh_db(tag).await);
    out
}

fn claimant(host: &str, pid: u32) -> Claimant {
    Claimant {
        device: "cpu0".into(),
        host: host.into(),
        pid,
        git_commit: Some("abc".into()),
        git_dirty: Some(false),
        slurm_job: None,
    }
}

/// An epoch event with every optional metric present.
fn full_epoch(epoch: usize) -> EpochMetrics {
    serde_json::from_value(serde_json::json!({
        "epoch": epoch, "lr": 0.1, "loss_total": 1.1, "loss_ce": 1.2, "loss_affinity": 1.3,
        "loss_partition": 1.4, "loss_consistency": 1.5, "train_accuracy": 0.21,
        "test_accuracy": 0.22, "test_balanced_accuracy": 0.23, "val_accuracy": 0.24,
        "memorisation": {"flipped": 33, "predicted_noisy": 0.31, "predicted_clean": 0.32},
        "memorisation_running": {"flipped": 36, "predicted_noisy": 0.34, "predicted_clean": 0.35},
        "train_seconds": 4.1, "eval_seconds": 4.2, "train_img_per_s": 4.3,
        "confusion": [[5, 1], [2, 7]]
    }))
    .unwrap()
}

/// A sweep with one trial `key`, claimed by this process on host "h1".
async fn one_trial(store: &Store, key: &str) -> i64 {
    let sweep = store.upsert_sweep("s", "s.yaml", None).await.unwrap();
    let params = serde_json::json!({"model.heads": 4});
    store
        .upsert_trial(key, sweep, 0, &serde_json::json!({}), &params)
        .await
        .unwrap();
    store
        .claim(key, &claimant("h1", std::process::id()))
        .await
        .unwrap()
        .expect("a new trial can be claimed")
}

use common::ended;

/// Every number of an epoch event reaches the store under its scalar's name; the confusion
/// matrix is recorded once per trial; a resumed attempt that re-reports an epoch duplicates
/// nothing; a second claim of a running trial is refused.
#[tokio::test]
async fn every_epoch_metric_reaches_the_store_once() {
    for url in backends("epoch").await {
        let store = Store::open(&url).await.unwrap();
        let attempt = one_trial(&store, "k1").await;
        let other = claimant("h2", 1);
        assert_eq!(store.claim("k1", &other).await.unwrap(), None, "{url}");
        let bar = indicatif::ProgressBar::hidden();
        for epoch in [1, 2] {
            let line = EventLine::line(&Event::Epoch(full_epoch(epoch)));
            record_line(&store, attempt, &line, &bar).await.unwrap();
        }
        let expected: BTreeMap<(String, String), Vec<(i64, f64)>> = full_epoch(1)
            .scalars()
            .iter()
            .map(|s| {
                let v = vec![(1, s.value), (2, s.value)];
                ((s.split.to_string(), s.name.to_string()), v)
            })
            .collect();
        assert_eq!(store.curves("k1").await.unwrap(), expected, "{url}");
        let c = store.confusion("k1").await.unwrap().unwrap();
        assert_eq!((c.epoch, c.counts), (2, vec![vec![5, 1], vec![2, 7]]));
        store.finish(attempt, ended("interrupted")).await.unwrap();
        let state = store.trial_state("k1").await.unwrap();
        assert!(
            state.interrupted && !state.running && !state.completed,
            "{url}"
        );
        let again = store.claim("k1", &other).await.unwrap().unwrap();
        let line = EventLine::line(&Event::Epoch(full_epoch(2)));
        record_line(&store, again, &line, &bar).await.unwrap();
        assert_eq!(store.curves("k1").await.unwrap(), expected, "{url}");
        let confusions = store.events_of("k1").await.unwrap();
        assert_eq!(
            confusions.iter().filter(|(k, _)| k == "confusion").count(),
            2,
            "one confusion matrix per epoch on {url}"
        );
        store.finish(again, ended("completed")).await.unwrap();
        let results = store.results("s").await.unwrap();
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].final_accuracy, Some(0.22));
        assert_eq!(results[0].epochs, Some(2));
        assert_eq!(results[0].git_commit.as_deref(), Some("abc"));
        // A completed trial cannot be claimed again.
        assert_eq!(store.claim("k1", &other).await.unwrap(), None);
        store.close().await;
    }
}

/// Lines that are not events, and events of another format version, are kept as text (never
/// dropped, never misread as metrics).
#[tokio::test]
async fn stray_and_foreign_lines_are_kept() {
    for url in backends("stray").await {
        let store = Store::open(&url).await.unwrap();
        let attempt = one_trial(&store, "k2").await;
        let bar = indicatif::ProgressBar::hidden();
        let old = EventLine::line(&Event::Epoch(full_epoch(1))).replace("\"v\":1", "\"v\":9");
        for line in ["hello", old.as_str()] {
            record_line(&store, attempt, line, &bar).await.unwrap();
        }
        assert!(store.curves("k2").await.unwrap().is_empty());
        let events = store.events_of("k2").await.unwrap();
        assert_eq!(events[0], ("stdout".to_string(), Some("hello".to_string())));
        assert_eq!(events[1].0, "unreadable");
        assert!(events[1].1.as_deref().unwrap().contains("version 9"));
        store.close().await;
    }
}

/// Many runners claiming the same trial at once: exactly one gets it.
#[tokio::test]
async fn one_claim_wins_among_concurrent_runners() {
    for url in backends("race").await {
        let store = Store::open(&url).await.unwrap();
        let sweep = store.upsert_sweep("s", "s.yaml", None).await.unwrap();
        store
            .upsert_trial(
                "k3",
                sweep,
                0,
                &serde_json::json!({}),
                &serde_json::json!({}),
            )
            .await
            .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..16u32 {
            let store = store.clone();
            tasks.spawn(async move { store.claim("k3", &claimant("h", 1000 + i)).await });
        }
        let mut won = 0;
        while let Some(r) = tasks.join_next().await {
            won += r.unwrap().unwrap().is_some() as usize;
        }
        assert_eq!(won, 1, "{url}");
        store.close().await;
    }
}

/// A running attempt whose worker stops renewing its lease is interrupted by whoever looks
/// next, from any host; one whose worker renews it is left alone; on the same host a dead
/// process is noticed at once.
#[tokio::test]
async fn expired_leases_free_their_trials() {
    for url in backends("lease").await {
        let store = Store::open(&url).await.unwrap();
        let attempt = one_trial(&store, "k4").await;
        // This process is alive and beats: another host sees a valid lease.
        store.heartbeat("h1", std::process::id()).await.unwrap();
        assert_eq!(
            store
                .expire_leases("h2", Duration::from_secs(60))
                .await
                .unwrap(),
            0
        );
        assert!(store.trial_state("k4").await.unwrap().running);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // On its own host a live process keeps its attempt, whatever its heartbeat.
        assert_eq!(
            store
                .expire_leases("h1", Duration::from_millis(10))
                .await
                .unwrap(),
            0
        );
        // No beat within the lease: interrupted by another host, and the trial can be claimed.
        assert_eq!(
            store
                .expire_leases("h2", Duration::from_millis(10))
                .await
                .unwrap(),
            1,
            "{url}"
        );
        let state = store.trial_state("k4").await.unwrap();
        assert!(state.interrupted && !state.running, "{url}");
        let err = store
            .latest_attempt("k4")
            .await
            .unwrap()
            .unwrap()
            .error
            .unwrap();
        assert!(err.contains("lease expired"), "{err}");
        let next = store.claim("k4", &claimant("h2", 7)).await.unwrap();
        assert!(next.is_some_and(|n| n != attempt));
        // On its own host, an attempt whose process is gone is interrupted without waiting.
        let dead = i32::MAX as u32 - 1;
        let sweep = store.upsert_sweep("s", "s.yaml", None).await.unwrap();
        store
            .upsert_trial(
                "k5",
                sweep,
                1,
                &serde_json::json!({}),
                &serde_json::json!({}),
            )
            .await
            .unwrap();
        store
            .claim("k5", &claimant("h3", dead))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store
                .expire_leases("h3", Duration::from_secs(3600))
                .await
                .unwrap(),
            1
        );
        assert!(store.trial_state("k5").await.unwrap().interrupted);
        store.close().await;
    }
}

/// Both migrations give the same tables, views and columns.
#[tokio::test]
async fn sqlite_and_postgres_have_the_same_schema() {
    let urls = backends("schema").await;
    let mut schemas = Vec::new();
    for url in &urls {
        let store = Store::open(url).await.unwrap();
        schemas.push(store.schema().await.unwrap());
        store.close().await;
    }
    assert!(schemas[0]
        .iter()
        .any(|(t, c)| t == "trial_results" && c == "final_accuracy"));
    assert!(schemas[0]
        .iter()
        .any(|(t, c)| t == "attempts" && c == "heartbeat_at"));
    if let [sqlite, postgres] = &schemas[..] {
        assert_eq!(sqlite, postgres);
    }
}

/// Opened for reading, a PostgreSQL store refuses writes (the dashboard and `fer report` can
/// never change results); a database that was never set up reads as absent.
#[tokio::test]
async fn a_read_only_postgres_store_refuses_writes() {
    let Some(url) = common::postgres::fresh_db("ro").await else {
        return;
    };
    assert!(Store::open_read_only(&url).await.unwrap().is_none());
    Store::open(&url).await.unwrap().close().await;
    let reader = Store::open_read_only(&url).await.unwrap().unwrap();
    let err = reader.upsert_sweep("s", "s.yaml", None).await.unwrap_err();
    assert!(format!("{err:#}").contains("read-only"), "{err:#}");
    reader.close().await;
}

/// A URL without its password works when PostgreSQL's password file has it (what workers on a
/// cluster use), and an error about the connection shows the URL with the password masked.
#[test]
fn the_password_comes_from_the_password_file_and_errors_mask_it() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(url) = rt.block_on(common::postgres::fresh_db("pgpass")) else {
        return;
    };
    let password = url.password().unwrap();
    let DbUrl::Postgres(raw) = &url else {
        unreachable!()
    };
    let bare = raw.replace(&format!(":{password}@"), "@");
    let rest = bare.split("@").nth(1).unwrap(); // 127.0.0.1:PORT/DB
    let (hostport, db) = rest.split_once('/').unwrap();
    let (host, port) = hostport.split_once(':').unwrap();
    let dir = common::tmp("pgpass");
    let file = dir.join("pgpass");
    std::fs::write(&file, format!("{host}:{port}:{db}:fer:{password}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    rt.block_on(async { Store::open(&url).await.unwrap().close().await });
    // `fer runs` in a child process with only the password file: it connects (an empty store).
    let out = common::fer()
        .env("FER_DB", &bare)
        .env("PGPASSFILE", &file)
        .args(["runs"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // A wrong password in the URL: the error names the database, masked.
    let wrong = raw.replace(&password, "not-the-password");
    let out = common::fer()
        .env("FER_DB", &wrong)
        .args(["runs"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("fer:***@") && !err.contains("not-the-password"),
        "{err}"
    );
}

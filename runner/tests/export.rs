//! `fer export` end to end: a real tiny sweep, then its TensorBoard runs read back record by
//! record (every CRC checked, every scalar and the hparams found) and its CSV parsed.

use std::collections::BTreeSet;
use std::process::{Command, Output};

use fer_runner::export::{fields, read_records};

use crate::common::{self, fer, tmp};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn tensorboard_runs_and_csv_hold_every_metric_of_every_trial() {
    let d = tmp("export");
    std::fs::write(d.join("base.yaml"), common::TINY_CONFIG).unwrap();
    std::fs::write(
        d.join("s.yaml"),
        "base: base.yaml\noverrides: {epochs: 2}\ngrid:\n  model.heads: [1, 2]\n  optimizer.kind: [adam]\nseeds: [0]\n",
    )
    .unwrap();
    let db = d.join("r.db");
    let o = fer()
        .arg("sweep")
        .arg(d.join("s.yaml"))
        .arg("--db")
        .arg(&db)
        .arg("--runs-dir")
        .arg(d.join("runs"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let metric_rows: usize = String::from_utf8_lossy(
        &Command::new("sqlite3")
            .arg(&db)
            .arg("SELECT COUNT(*) FROM trial_metrics")
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .parse()
    .unwrap();
    assert!(metric_rows > 20);

    let tb = d.join("tb");
    let o = fer()
        .args(["export", "tensorboard", "--sweep", "s", "--out"])
        .arg(&tb)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut runs: Vec<_> = std::fs::read_dir(&tb)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    runs.sort();
    assert_eq!(runs.len(), 2);
    assert!(runs[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("model.heads=1,optimizer.kind=adam,seed=0,"));
    let mut scalars = 0;
    for run in &runs {
        let files: Vec<_> = std::fs::read_dir(run).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "one event file per run");
        let records = read_records(&std::fs::read(files[0].path()).unwrap()).unwrap();
        // The first event names the format.
        let first = fields(&records[0]).unwrap();
        assert!(first.iter().any(|f| f.0 == 3 && f.2 == b"brain.Event:2"));
        let mut tags = BTreeSet::new();
        let mut hparams = Vec::new();
        for r in &records[1..] {
            let event = fields(r).unwrap();
            let Some(summary) = event.iter().find(|f| f.0 == 5) else {
                continue;
            };
            let value = fields(&fields(&summary.2).unwrap()[0].2).unwrap();
            let tag = String::from_utf8(value[0].2.clone()).unwrap();
            if tag.starts_with("_hparams_/") {
                hparams.push(tag);
            } else {
                assert_eq!(value[1].0, 2, "a simple_value");
                let step = event.iter().find(|f| f.0 == 2).map(|f| f.3).unwrap();
                assert!((1..=2).contains(&step), "the epoch is the step");
                tags.insert(tag);
                scalars += 1;
            }
        }
        assert_eq!(
            hparams,
            ["_hparams_/session_start_info", "_hparams_/session_end_info"]
        );
        for t in [
            "test/accuracy",
            "train/loss_total",
            "train/loss_consistency",
            "train/lr",
        ] {
            assert!(tags.contains(t), "{t} in {tags:?}");
        }
    }
    assert_eq!(scalars, metric_rows, "every per-epoch metric, once");

    let csv = d.join("m.csv");
    let o = fer()
        .args(["export", "csv", "--sweep", "s", "--out"])
        .arg(&csv)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "trial_key,model.heads,optimizer.kind,seed,split,name,epoch,value"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), metric_rows);
    assert!(rows
        .iter()
        .all(|r| r.len() == 8 && r[2] == "adam" && r[7].parse::<f64>().is_ok()));
}

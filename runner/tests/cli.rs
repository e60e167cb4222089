//! The `fer` binary end to end: a training run checkpoints every epoch and resumes where it
//! stopped; bad input is a clear error, not a panic.

mod common;

use std::path::Path;

use common::{fer, tmp};

const TINY: &str = common::TINY_CONFIG;

fn train(config: &Path, out: &Path, epochs: usize) -> std::process::Output {
    fer()
        .args([
            "train",
            "--quiet",
            "--epochs",
            &epochs.to_string(),
            "--config",
        ])
        .arg(config)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn epochs_in(stdout: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "epoch" && v["replayed"] != true)
        .map(|v| v["epoch"].as_u64().unwrap())
        .collect()
}

#[test]
fn train_checkpoints_each_epoch_and_resumes() {
    let d = tmp("train");
    let cfg = d.join("tiny.yaml");
    std::fs::write(&cfg, TINY).unwrap();
    let out = d.join("run");
    let first = train(&cfg, &out, 1);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(epochs_in(&first.stdout), vec![1]);
    assert!(out.join("checkpoint.safetensors").is_file());
    assert!(out.join("config.yaml").is_file());

    let second = train(&cfg, &out, 2);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        epochs_in(&second.stdout),
        vec![2],
        "only epoch 2 runs after resuming"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(epochs_in(metrics.as_bytes()), vec![1, 2]);
    let third = train(&cfg, &out, 2);
    assert!(third.status.success());
    assert!(epochs_in(&third.stdout).is_empty());
}

#[test]
fn config_errors_name_file_line_and_column() {
    let d = tmp("cfg");
    let cfg = d.join("bad.yaml");
    std::fs::write(&cfg, TINY.replace("heads: 2", "heads: 2\n  head_count: 3")).unwrap();
    let o = train(&cfg, &d.join("run"), 1);
    assert_eq!(
        o.status.code(),
        Some(2),
        "setup errors exit with 2 (not retried)"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.yaml:4:3:") && err.contains("head_count"),
        "{err}"
    );
    std::fs::write(&cfg, TINY.replace("batch: 8", "batch: eight")).unwrap();
    let err = String::from_utf8_lossy(&train(&cfg, &d.join("run"), 1).stderr).to_string();
    assert!(
        err.contains("bad.yaml:9:") && err.contains("batch"),
        "{err}"
    );
    std::fs::write(&cfg, TINY.replace("batch: 8", "batch: 1")).unwrap();
    let err = String::from_utf8_lossy(&train(&cfg, &d.join("run"), 1).stderr).to_string();
    assert!(
        err.contains("bad.yaml") && err.contains("batch: must be at least 2"),
        "{err}"
    );
}

#[test]
fn bad_arguments_and_files_are_clear_errors() {
    let o = fer()
        .args(["train", "--config", "/nonexistent/run.yaml"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/run.yaml"));
    let o = fer()
        .args(["inspect", "/nonexistent/model.pth"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/model.pth"));
    let o = fer()
        .args([
            "data",
            "synth",
            "--out",
            tmp("difficulty").to_str().unwrap(),
            "--difficulty",
            "extreme",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("difficulty \"extreme\""));
}

#[test]
fn data_synth_writes_an_image_folder_with_labels_and_a_contact_sheet() {
    let d = tmp("synth");
    let o = fer()
        .args([
            "data",
            "synth",
            "--train",
            "14",
            "--test",
            "7",
            "--image-size",
            "24",
            "--out",
        ])
        .arg(&d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let labels = std::fs::read_to_string(d.join("labels.csv")).unwrap();
    assert_eq!(labels.lines().count(), 1 + 14 + 7);
    let first = labels.lines().nth(1).unwrap();
    let rel = first.split(',').nth(1).unwrap();
    assert!(d.join(rel).is_file(), "{rel}");
    assert_eq!(std::fs::read_dir(d.join("train")).unwrap().count(), 7);
    assert!(d.join("contact_sheet.png").is_file());
}

#[test]
fn inspect_reads_the_official_release_format() {
    let pth = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/tiny_h4_c7/checkpoint.pth"
    );
    let o = fer().args(["inspect", pth]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("cat_head3.ca.attention.3.weight\t[32, 2]"));
    assert!(text.contains("275 tensors"));
}

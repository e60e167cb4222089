//! The `fer` binary end to end: a training run checkpoints every epoch and resumes where it
//! stopped; bad input is a clear error, not a panic.

use std::process::Command;

fn fer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fer"))
}

fn tiny_train(out: &std::path::Path, epochs: usize) -> std::process::Output {
    fer()
        .args([
            "train",
            "--train-size",
            "16",
            "--test-size",
            "8",
            "--image-size",
            "32",
            "--batch",
            "8",
        ])
        .args([
            "--widths",
            "8,16,16,32",
            "--epochs",
            &epochs.to_string(),
            "--out",
        ])
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn train_checkpoints_each_epoch_and_resumes() {
    let out = std::env::temp_dir().join(format!("fer-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let first = tiny_train(&out, 1);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_slice(first.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(line["epoch"], 1);
    assert!(line["loss_total"].as_f64().unwrap().is_finite());
    assert!(out.join("checkpoint.safetensors").is_file());

    let second = tiny_train(&out, 2);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("at epoch 1"),
        "did not resume"
    );
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert_eq!(
        stdout.lines().count(),
        1,
        "only epoch 2 should run: {stdout}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let epochs: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(epochs, vec![1, 2]);

    // A finished run started again does nothing.
    let third = tiny_train(&out, 2);
    assert!(third.status.success());
    assert!(third.stdout.is_empty());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_arguments_and_files_are_clear_errors() {
    let o = fer().args(["train", "--widths", "8,16"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--widths needs exactly 4"));
    let o = fer().args(["train", "--device", "tpu"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown device \"tpu\""));
    let o = fer()
        .args(["inspect", "/nonexistent/model.pth"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/model.pth"));
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

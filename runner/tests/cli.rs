//! The `fer` binary end to end: a training run checkpoints every epoch and resumes where it
//! stopped; bad input is a clear error, not a panic.

use crate::common;

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
    // A misspelt instruction-set cap is refused, not ignored (it would test the wrong kernels).
    let o = fer()
        .args(["runs", "--db", "/nonexistent/fer.db"])
        .env("FER_ISA", "avx")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("FER_ISA=\"avx\"") && err.contains("baseline, avx2 or avx512"),
        "{err}"
    );
    // So is a misspelt convolution algorithm.
    let o = fer()
        .args(["runs", "--db", "/nonexistent/fer.db"])
        .env("FER_CONV", "winogard")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("FER_CONV=\"winogard\"") && err.contains("auto, winograd or direct"),
        "{err}"
    );
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

/// `fer doctor`: one line per check, class counts against the published ones, pretrained files
/// present and fitting, exit 2 when anything fails and 0 when all pass; nothing is trained.
#[test]
fn doctor_checks_data_weights_and_device_without_training() {
    let d = tmp("doctor");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    // A RAF-DB folder with 7 training and 7 test images: not the published split.
    let raf = d.join("raf");
    std::fs::create_dir_all(raf.join("EmoLabel")).unwrap();
    std::fs::create_dir_all(raf.join("Image/aligned")).unwrap();
    let face = image::RgbImage::from_pixel(100, 100, image::Rgb([90, 60, 40]));
    let mut labels = String::new();
    for (split, n) in [("train", 7), ("test", 7)] {
        for i in 0..n {
            let name = format!("{split}_{i:05}");
            face.save(raf.join(format!("Image/aligned/{name}_aligned.jpg")))
                .unwrap();
            labels.push_str(&format!("{name}.jpg {}\n", i % 7 + 1));
        }
    }
    std::fs::write(raf.join("EmoLabel/list_patition_label.txt"), labels).unwrap();
    let weights = fixtures.join("pretrained/resnet18_state_dict_module.pth");
    std::fs::write(d.join("base.yaml"), TINY).unwrap();
    let sweep = d.join("setup.yaml");
    std::fs::write(
        &sweep,
        format!(
            "base: base.yaml\noverrides:\n  model: {{backbone: {{widths: [4, 8, 16, 32], blocks: [2, 2, 2, 2]}}, heads: 2, classes: 7}}\n  data: {{kind: raf_db, root: {raf:?}}}\n  input_size: 64\n  optimizer: {{kind: adam, lr: 0.001}}\n  epochs: 1\n  batch: 8\ngrid:\n  model.pretrained: [{weights:?}, {missing:?}]\n",
            raf = raf.display().to_string(),
            weights = weights.display().to_string(),
            missing = d.join("models/resnet18_msceleb.pth").display().to_string(),
        ),
    )
    .unwrap();
    let out = fer().arg("doctor").arg(&sweep).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}\n{err}");
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
            .to_string()
    };
    let train = line("Train split has 7 images");
    assert!(train.contains("FAIL") && train.contains("12271"), "{train}");
    let ok = line("resnet18_state_dict_module.pth");
    assert!(
        ok.starts_with("  ok")
            && ok.contains("'state_dict'")
            && ok.contains("'module.' prefixes removed"),
        "{ok}"
    );
    let missing = line("models/resnet18_msceleb.pth");
    assert!(
        missing.contains("FAIL")
            && missing.contains("MS-Celeb-1M")
            && missing.contains("DAN's README"),
        "{missing}"
    );
    assert!(line("device cpu").starts_with("  ok"));
    assert!(err.contains("3 check(s) failed"), "{err}");
    assert!(
        !d.join("runs").exists() && !d.join("fer.db").exists(),
        "doctor trains nothing"
    );

    // The same setup on synthetic faces with the weights present: every check passes.
    std::fs::write(
        &sweep,
        format!(
            "base: base.yaml\noverrides:\n  model: {{backbone: {{widths: [4, 8, 16, 32], blocks: [2, 2, 2, 2]}}, heads: 2, classes: 7, pretrained: {weights:?}}}\n  data: {{kind: synthetic, difficulty: 0.2, image_size: 64, train: 28, test: 14, seed: 0, balance: balanced}}\n  input_size: 64\n  optimizer: {{kind: adam, lr: 0.001}}\n  epochs: 1\n  batch: 8\n",
            weights = weights.display().to_string(),
        ),
    )
    .unwrap();
    let out = fer().arg("doctor").arg(&sweep).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("all checks passed"), "{text}");
}

/// `fer bench loader` runs end to end (its ImageFolder must satisfy the loader's checks) and
/// prints one JSON line per size; the rates themselves are the benchmark's business, not a test's.
#[test]
fn bench_loader_runs_and_reports_each_size() {
    let out = fer()
        .args(["bench", "loader", "--images", "14"])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let settings: Vec<&str> = lines
        .iter()
        .map(|v| v["setting"].as_str().unwrap())
        .collect();
    assert_eq!(settings, ["jpeg100_to_224", "jpeg100_to_112"]);
    assert!(lines.iter().all(|v| v["img_per_s"].as_f64().unwrap() > 0.0));
}

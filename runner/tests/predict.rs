//! `fer predict` on the two public-domain photos: a checkpoint trained here on synthetic faces
//! and an official-format DAN `.pth`; detection, probabilities, attention pictures, errors.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{fer, tmp};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn photo(name: &str) -> PathBuf {
    repo().join("fixtures/faces").join(name)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Train the tiny config for one epoch and return its checkpoint.
fn trained(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("tiny.yaml"), common::TINY_CONFIG).unwrap();
    let o = fer()
        .args(["train", "--quiet", "--config"])
        .arg(dir.join("tiny.yaml"))
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    dir.join("run/checkpoint.safetensors")
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn check_probabilities(face: &Value, classes: usize) {
    let probs = face["probabilities"].as_object().unwrap();
    assert_eq!(probs.len(), classes);
    let sum: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
    let best = face["prediction"].as_str().unwrap();
    let top = probs
        .iter()
        .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
        .unwrap()
        .0;
    assert_eq!(best, top, "the prediction is the most probable class");
}

#[test]
fn predicts_with_a_trained_checkpoint_and_detects_one_face_per_photo() {
    let d = tmp("predict-trained");
    let ckpt = trained(&d);
    let o = fer()
        .arg("predict")
        .arg(&ckpt)
        .arg(photo("grace_hopper_512x512.jpg"))
        .arg(photo("astronaut.png"))
        .args(["--detect", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 2);
    for (line, (cx, cy)) in lines.iter().zip([(290, 215), (230, 90)]) {
        let faces = line["faces"].as_array().unwrap();
        assert_eq!(faces.len(), 1, "{line}");
        let b = &faces[0]["box"];
        let (x, y, w, h) = ["x", "y", "width", "height"]
            .map(|k| b[k].as_u64().unwrap() as i64)
            .into();
        assert!(
            (x + w / 2 - cx).abs() < 40 && (y + h / 2 - cy).abs() < 40,
            "face box {b} not near ({cx}, {cy})"
        );
        check_probabilities(&faces[0], 7);
        // The class names recorded in the checkpoint (RAF-DB order of the synthetic set).
        assert!(faces[0]["probabilities"].get("happiness").is_some());
    }
    // Text output names the checkpoint's setting and each face.
    let o = fer()
        .arg("predict")
        .arg(&ckpt)
        .arg(photo("astronaut.png"))
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("2 heads, 7 classes (recorded in the checkpoint")
            && out.contains("32 px input"),
        "{out}"
    );
}

#[test]
fn official_pth_with_attention_pictures() {
    let d = tmp("predict-pth");
    let pth = repo().join("fixtures/tiny_h4_c7/checkpoint.pth");
    let o = fer()
        .arg("predict")
        .arg(&pth)
        .arg(photo("astronaut.png"))
        .args(["--json", "--explain"])
        .arg(d.join("explain"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let line = &json_lines(&o)[0];
    let face = &line["faces"][0];
    assert!(
        face["box"].is_null(),
        "without --detect the whole image is the face"
    );
    check_probabilities(face, 7);
    let mut files: Vec<String> = std::fs::read_dir(d.join("explain"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    let heads = files.iter().filter(|f| f.contains("_head")).count();
    assert_eq!(heads, 4, "one picture per head: {files:?}");
    assert!(
        files.iter().any(|f| f.starts_with("astronaut_face1_cam_")),
        "{files:?}"
    );
    assert!(files.contains(&"astronaut_face1_all.png".to_string()));
    let all = image::open(d.join("explain/astronaut_face1_all.png")).unwrap();
    assert_eq!((all.width(), all.height()), (224 * 6, 224));
    // The AffectNet order can be forced for a checkpoint that does not record its classes.
    let o = fer()
        .arg("predict")
        .arg(&pth)
        .arg(photo("astronaut.png"))
        .args(["--json", "--classes", "affectnet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(json_lines(&o)[0]["faces"][0]["probabilities"]
        .get("neutral")
        .is_some());
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = tmp("predict-bad");
    let pth = repo().join("fixtures/tiny_h4_c7/checkpoint.pth");
    let run = |args: &[&Path]| {
        let o = fer().arg("predict").args(args).output().unwrap();
        assert!(!o.status.success());
        text(&o)
    };
    let o = fer()
        .arg("predict")
        .arg(&pth)
        .arg(photo("astronaut.png"))
        .args(["--input-size", "0"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "an error, not a panic: {}",
        text(&o)
    );
    assert!(
        text(&o).contains("input size 0") && text(&o).contains("too small"),
        "{}",
        text(&o)
    );
    // Huge sizes are refused before anything is allocated (they used to panic or abort).
    for size in ["18446744073709551615", "20000", "100000"] {
        let o = fer()
            .arg("predict")
            .arg(&pth)
            .arg(photo("astronaut.png"))
            .args(["--input-size", size])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{size}: {}", text(&o));
        assert!(
            text(&o).contains("too large (at most 1344 px)"),
            "{}",
            text(&o)
        );
    }
    let missing = d.join("nope.jpg");
    let e = run(&[&pth, &missing]);
    assert!(e.contains("nope.jpg: no such image file"), "{e}");
    std::fs::write(d.join("fake.png"), "not an image").unwrap();
    let e = run(&[&pth, &d.join("fake.png")]);
    assert!(e.contains("fake.png: cannot decode image"), "{e}");
    let e = run(&[&d.join("missing.pth"), &photo("astronaut.png")]);
    assert!(e.contains("missing.pth: no such checkpoint file"), "{e}");
    // A DAN state dict whose tensors do not fit together: the key is named with both shapes.
    let weights = repo().join("fixtures/tiny_h4_c7/weights.safetensors");
    let o = fer()
        .arg("predict")
        .arg(&weights)
        .arg(photo("astronaut.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "a bare state dict loads: {}", text(&o));
    let e = run(&[
        &repo().join("fixtures/tiny_h4_c7/expected.safetensors"),
        &photo("astronaut.png"),
    ]);
    assert!(e.contains("not a DAN checkpoint"), "{e}");
}

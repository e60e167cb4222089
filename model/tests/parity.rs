//! Parity with the independent PyTorch reference: every case folder under `fixtures/` (a new
//! folder is picked up without code changes) must reproduce eval outputs, every loss term, the
//! listed gradients, and every parameter and BN buffer after one Adam step.

use crate::common;

use candle_core::{DType, Device, Tensor};
use fer_model::{loss, parity, DanEac};

#[test]
fn every_fixture_case_matches_the_pytorch_reference() {
    let cases = common::model_cases();
    assert!(
        cases.len() >= 3,
        "expected the vendored fixture cases, found {cases:?}"
    );
    let mut report = Vec::new();
    for dir in &cases {
        let (total, fails) = parity::check_case(dir, &Device::Cpu).unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        println!(
            "{name}: {}/{total} tensors within tolerance",
            total - fails.len()
        );
        for (k, m) in &fails {
            report.push(format!("{name}: {k}: {m}"));
        }
    }
    assert!(report.is_empty(), "parity failures:\n{}", report.join("\n"));
}

#[test]
fn official_pth_checkpoint_gives_the_same_logits_as_safetensors() {
    let mut checked = 0;
    for dir in common::model_cases() {
        let pth = dir.join("checkpoint.pth");
        if !pth.is_file() {
            continue;
        }
        let case = parity::load_case(&dir).unwrap();
        let weights = common::load(&dir.join("weights.safetensors"));
        let inputs = common::load(&dir.join("inputs.safetensors"));
        let reference = parity::build(&case, &weights, &Device::Cpu).unwrap();
        let config = reference.dan.config.clone();
        let from_pth =
            DanEac::new(&config, case.num_centers, &Device::Cpu, DType::F32, 99).unwrap();
        fer_model::checkpoint::load_dan_pth(&pth, &from_pth).unwrap();
        let a = reference.dan.forward(&inputs["x"], false).unwrap().logits;
        let b = from_pth.dan.forward(&inputs["x"], false).unwrap().logits;
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            diff,
            0.0,
            "{}: .pth and safetensors logits differ by {diff}",
            dir.display()
        );
        // The counters come through as int64 too.
        let nbt = from_pth
            .store
            .get("bn.num_batches_tracked")
            .unwrap()
            .as_tensor()
            .to_scalar::<i64>()
            .unwrap();
        assert_eq!(
            nbt,
            weights["bn.num_batches_tracked"]
                .to_scalar::<i64>()
                .unwrap()
        );
        checked += 1;
    }
    assert!(checked >= 1, "no fixture case has a checkpoint.pth");
}

#[test]
fn flip_is_an_exact_width_reversal() {
    let t = Tensor::arange(0f32, 24., &Device::Cpu)
        .unwrap()
        .reshape((1, 2, 3, 4))
        .unwrap();
    let f = loss::flip_w(&t).unwrap();
    assert_eq!(
        f.get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .get(2)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![23., 22., 21., 20.]
    );
    assert_eq!(
        loss::flip_consistency_loss(&t, &f)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

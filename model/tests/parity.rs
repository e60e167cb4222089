//! Parity with the independent PyTorch reference: every case folder under `fixtures/` (a new
//! folder is picked up without code changes) must reproduce eval outputs, every loss term, the
//! listed gradients, and every parameter and BN buffer after one Adam step.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fer_model::backbone::{BackboneConfig, ResNetConfig};
use fer_model::{loss, train, DanConfig, DanEac, LossWeights, OptimizerConfig};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    widths: [usize; 4],
    blocks: [usize; 4],
    num_heads: usize,
    num_classes: usize,
    num_centers: usize,
    lambdas: LossWeights,
    optimizer: Opt,
    #[serde(default)]
    zero_grad_params: Vec<String>,
    #[serde(default)]
    ill_conditioned_params: Vec<String>,
}

#[derive(Deserialize)]
struct Opt {
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
}

fn build(case: &Case, weights: &HashMap<String, Tensor>) -> DanEac {
    let config = DanConfig {
        backbone: BackboneConfig::ResNet(ResNetConfig::basic(case.widths, case.blocks)),
        heads: case.num_heads,
        classes: case.num_classes,
    };
    let net = DanEac::new(&config, case.num_centers, &Device::Cpu, DType::F32, 0).unwrap();
    net.store
        .load_state(weights, "weights.safetensors", &|_| false)
        .unwrap();
    net
}

/// Run the reference procedure (fixtures README section 3) and name the outputs as it does.
fn run_case(dir: &Path) -> (HashMap<String, Tensor>, Case) {
    let case: Case =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let weights = common::load(&dir.join("weights.safetensors"));
    let inputs = common::load(&dir.join("inputs.safetensors"));
    let net = build(&case, &weights);
    let x = &inputs["x"];
    let y = inputs["y"].to_dtype(DType::U32).unwrap();
    let mut out: HashMap<String, Tensor> = HashMap::new();

    // Eval pass.
    let ev = net.dan.forward(x, false).unwrap();
    out.insert("eval.cam".into(), net.dan.cam(&ev.feat).unwrap());
    out.insert("eval.logits".into(), ev.logits);
    out.insert("eval.feat".into(), ev.feat);
    out.insert("eval.heads".into(), ev.heads);

    // Train step.
    let g = train::step_graph(&net.dan, &net.centers, x, &y, case.lambdas).unwrap();
    out.insert("train.logits".into(), g.original.logits.clone());
    out.insert("train.feat".into(), g.original.feat.clone());
    out.insert("train.heads".into(), g.original.heads.clone());
    if let Some(f) = &g.flipped {
        out.insert("train.cam".into(), f.cam.clone());
        out.insert("train.logits_flip".into(), f.output.logits.clone());
        out.insert("train.feat_flip".into(), f.output.feat.clone());
        out.insert("train.cam_flip".into(), f.cam_flip.clone());
    }
    out.insert("loss.ce".into(), g.ce.clone());
    out.insert("loss.affinity".into(), g.affinity.clone());
    out.insert("loss.partition".into(), g.partition.clone());
    if let Some(c) = &g.consistency {
        out.insert("loss.consistency".into(), c.clone());
    }
    out.insert("loss.total".into(), g.total.clone());
    let grads = g.total.backward().unwrap();
    for (name, var) in net.trainable() {
        if let Some(gr) = grads.get(&var) {
            out.insert(
                format!("gradnorm.{name}"),
                gr.sqr().unwrap().sum_all().unwrap().sqrt().unwrap(),
            );
            out.insert(format!("grad.{name}"), gr.clone());
        }
    }
    let o = &case.optimizer;
    let mut opt = net.optimizer(OptimizerConfig::Adam {
        lr: o.lr,
        weight_decay: o.weight_decay,
        betas: o.betas,
        eps: o.eps,
    });
    opt.step(&grads).unwrap();
    for (name, t) in net.store.state().unwrap() {
        out.insert(format!("after.{name}"), t);
    }
    (out, case)
}

#[test]
fn every_fixture_case_matches_the_pytorch_reference() {
    let cases = common::model_cases();
    assert!(
        cases.len() >= 3,
        "expected the vendored fixture cases, found {cases:?}"
    );
    let mut report = Vec::new();
    for dir in &cases {
        let (actual, case) = run_case(dir);
        let expected = common::load(&dir.join("expected.safetensors"));
        let before = common::load(&dir.join("weights.safetensors"));
        let mut noisy = case.zero_grad_params.clone();
        noisy.extend(case.ill_conditioned_params.iter().cloned());
        let rules = common::CaseRules {
            lr: case.optimizer.lr,
            noisy,
        };
        let fails = common::compare(&actual, &expected, &before, &rules);
        // Nothing we produce may be absent from the reference either (e.g. a gradient for a
        // term that should be switched off).
        // (`grad.*` is stored only for a sample of parameters; `gradnorm.*` for all of them.)
        let extra: Vec<_> = actual
            .keys()
            .filter(|k| !k.starts_with("grad.") && !expected.contains_key(*k))
            .cloned()
            .collect();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        println!(
            "{name}: {}/{} tensors within tolerance",
            expected.len() - fails.len(),
            expected.len()
        );
        for (k, m) in &fails {
            report.push(format!("{name}: {k}: {m}"));
        }
        for k in extra {
            report.push(format!("{name}: {k}: produced but not in the reference"));
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
        let case: Case =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let weights = common::load(&dir.join("weights.safetensors"));
        let inputs = common::load(&dir.join("inputs.safetensors"));
        let reference = build(&case, &weights);
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

//! Training behaviour: the model really learns, checkpoints resume exactly, optimizers follow
//! PyTorch's rules, and bad checkpoints are clear errors.

use crate::common;

use candle_core::{DType, Device, Tensor};
use fer_model::backbone::{BackboneConfig, ResNetConfig};
use fer_model::{checkpoint, train, DanConfig, DanEac, LossWeights, OptimizerConfig, Schedule};

fn tiny() -> DanConfig {
    DanConfig {
        backbone: BackboneConfig::ResNet(ResNetConfig::basic([8, 16, 32, 64], [1, 1, 1, 1])),
        heads: 4,
        classes: 7,
    }
}

#[test]
fn full_loss_falls_and_training_accuracy_exceeds_95_percent() {
    let (x, labels) = common::blobs::blobs(28, 7, 32, 1, &Device::Cpu).unwrap();
    let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    let net = DanEac::new(&tiny(), 7, &Device::Cpu, DType::F32, 3).unwrap();
    let mut opt = net.optimizer(OptimizerConfig::adam(3e-3));
    let mut first = None;
    let mut reached = None;
    let mut last = None;
    for step in 0..60 {
        let l = train::train_step(
            &net.dan,
            &net.centers,
            &mut opt,
            &x,
            &y,
            LossWeights::default(),
        )
        .unwrap();
        let first_total = *first.get_or_insert(l.total);
        let acc = l.correct as f64 / l.batch as f64;
        if reached.is_none() && acc > 0.95 && l.total < 0.5 * first_total {
            reached = Some(step);
        }
        last = Some(l);
    }
    let step =
        reached.expect("no step reached >95% training accuracy with the loss halved in 60 steps");
    let last = last.unwrap();
    assert!(
        last.total < 0.5 * first.unwrap(),
        "loss did not stay down: {} -> {}",
        first.unwrap(),
        last.total
    );
    // Evaluation mode (running statistics, which lag the weights) on the same images agrees.
    let eval = train::evaluate(&net.dan, [Ok((x.clone(), labels.clone()))]).unwrap();
    println!(
        "criterion reached at step {step}; loss {:.3} -> {:.3}; eval accuracy {:.3}",
        first.unwrap(),
        last.total,
        eval.accuracy
    );
    assert!(
        eval.accuracy > 0.95,
        "eval-mode accuracy {:.3}",
        eval.accuracy
    );
}

#[test]
fn checkpoint_resume_is_exact() {
    let dir = tempdir();
    let (x, labels) = common::blobs::blobs(8, 7, 32, 2, &Device::Cpu).unwrap();
    let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    let w = LossWeights::default();
    // Run A: 2 steps, save, 2 more steps.
    let a = DanEac::new(&tiny(), 7, &Device::Cpu, DType::F32, 4).unwrap();
    let mut opt_a = a.optimizer(OptimizerConfig::adam(1e-3));
    for _ in 0..2 {
        train::train_step(&a.dan, &a.centers, &mut opt_a, &x, &y, w).unwrap();
    }
    let path = dir.join("ckpt.safetensors");
    checkpoint::save(
        &path,
        &a,
        Some(&opt_a),
        2,
        serde_json::json!({"dataset": "blobs"}),
    )
    .unwrap();
    for _ in 0..2 {
        train::train_step(&a.dan, &a.centers, &mut opt_a, &x, &y, w).unwrap();
    }
    // Run B: a differently seeded network restored from the checkpoint, 2 steps.
    let b = DanEac::new(&tiny(), 7, &Device::Cpu, DType::F32, 999).unwrap();
    let mut opt_b = b.optimizer(OptimizerConfig::adam(1e-3));
    let meta = checkpoint::restore(&path, &b, Some(&mut opt_b)).unwrap();
    assert_eq!(meta.epoch, 2);
    assert_eq!(meta.extra["dataset"], "blobs");
    for _ in 0..2 {
        train::train_step(&b.dan, &b.centers, &mut opt_b, &x, &y, w).unwrap();
    }
    let (sa, sb) = (a.store.state().unwrap(), b.store.state().unwrap());
    for (k, ta) in &sa {
        let d = ta
            .to_dtype(DType::F64)
            .unwrap()
            .sub(&sb[k].to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(
            d.to_scalar::<f64>().unwrap(),
            0.0,
            "{k} differs after resuming"
        );
    }
}

#[test]
fn mismatched_checkpoints_name_the_key_and_both_shapes() {
    let dir = tempdir();
    let a = DanEac::new(&tiny(), 7, &Device::Cpu, DType::F32, 1).unwrap();
    let path = dir.join("a.safetensors");
    checkpoint::save(&path, &a, None, 0, serde_json::Value::Null).unwrap();
    // Wrong class count: the metadata check refuses before any tensor is touched.
    let mut other = tiny();
    other.classes = 8;
    let b = DanEac::new(&other, 8, &Device::Cpu, DType::F32, 1).unwrap();
    let err = checkpoint::restore(&path, &b, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("classes: 8") && err.contains("a.safetensors"),
        "{err}"
    );
    // Strict state loading: missing, unexpected and mis-shaped keys are each named.
    let mut state: std::collections::HashMap<String, Tensor> =
        a.store.state().unwrap().into_iter().collect();
    state.remove("cat_head1.sa.conv_3x1.0.weight");
    state.insert(
        "features.9.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    state.insert(
        "fc.weight".into(),
        Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = a
        .store
        .load_state(&state, "test.pth", &|_| false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("test.pth"), "{err}");
    assert!(
        err.contains("missing key cat_head1.sa.conv_3x1.0.weight (expected shape [64, 32, 3, 1])"),
        "{err}"
    );
    assert!(err.contains("unexpected key features.9.weight"), "{err}");
    assert!(
        err.contains("key fc.weight: checkpoint shape [8, 64], model expects [7, 64]"),
        "{err}"
    );
    // A file that is not a checkpoint.
    std::fs::write(dir.join("junk.pth"), b"not a zip").unwrap();
    let err = checkpoint::load_dan_pth(&dir.join("junk.pth"), &a)
        .unwrap_err()
        .to_string();
    assert!(err.contains("junk.pth"), "{err}");
    let err = checkpoint::load_dan_pth(&dir.join("absent.pth"), &a)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("absent.pth") && err.contains("no such"),
        "{err}"
    );
}

/// Two params updated by hand-computed PyTorch formulas over three steps.
#[test]
fn optimizers_follow_pytorch_update_rules() {
    use candle_core::Var;
    let grads_seq = [[0.5f64, -2.0], [0.1, 0.3], [-1.0, 0.0]];
    let theta0 = [1.0f64, -0.5];
    let run = |config: OptimizerConfig| -> Vec<f64> {
        let var = Var::from_tensor(&Tensor::new(&theta0, &Device::Cpu).unwrap()).unwrap();
        let mut opt = fer_model::Optimizer::new(config, vec![("p".into(), var.clone())]);
        for g in grads_seq {
            // loss = sum(theta * g) has gradient g.
            let loss = (var.as_tensor() * Tensor::new(&g, &Device::Cpu).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        var.as_tensor().to_vec1::<f64>().unwrap()
    };
    let (lr, wd, b1, b2, eps) = (0.1, 0.05, 0.9, 0.999, 1e-8);
    // Reference implementations of torch.optim.{Adam, AdamW, SGD}, scalar by scalar.
    let reference = |kind: &str| -> Vec<f64> {
        (0..2)
            .map(|i| {
                let (mut th, mut m, mut v, mut buf) = (theta0[i], 0.0, 0.0, None::<f64>);
                for (t, g) in grads_seq.iter().enumerate() {
                    let t = t as i32 + 1;
                    let mut g = g[i];
                    match kind {
                        "adam" | "adamw" => {
                            if kind == "adam" {
                                g += wd * th;
                            } else {
                                th *= 1.0 - lr * wd;
                            }
                            m = b1 * m + (1.0 - b1) * g;
                            v = b2 * v + (1.0 - b2) * g * g;
                            let denom = (v.sqrt() / (1.0 - b2.powi(t)).sqrt()) + eps;
                            th -= lr / (1.0 - b1.powi(t)) * m / denom;
                        }
                        _ => {
                            g += wd * th;
                            let b = buf.map_or(g, |b| 0.9 * b + g);
                            buf = Some(b);
                            th -= lr * b;
                        }
                    }
                }
                th
            })
            .collect()
    };
    let cases = [
        (
            "adam",
            OptimizerConfig::Adam {
                lr,
                weight_decay: wd,
                betas: (b1, b2),
                eps,
            },
        ),
        (
            "adamw",
            OptimizerConfig::AdamW {
                lr,
                weight_decay: wd,
                betas: (b1, b2),
                eps,
            },
        ),
        (
            "sgd",
            OptimizerConfig::Sgd {
                lr,
                momentum: 0.9,
                weight_decay: wd,
            },
        ),
    ];
    for (kind, config) in cases {
        let got = run(config);
        let want = reference(kind);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "{kind}: {got:?} vs {want:?}");
        }
    }
    // Schedules are stepped per epoch.
    assert!((Schedule::Exponential { gamma: 0.6 }.lr_at(1e-4, 2) - 0.36e-4).abs() < 1e-18);
    assert_eq!(
        Schedule::Step {
            step_size: 10,
            gamma: 0.1
        }
        .lr_at(1.0, 9),
        1.0
    );
    assert!(
        (Schedule::Step {
            step_size: 10,
            gamma: 0.1
        }
        .lr_at(1.0, 25)
            - 0.01)
            .abs()
            < 1e-15
    );
}

#[test]
fn official_layout_has_the_spec_parameter_counts() {
    // Spec 1.2 / 1.3: 2,135,904 per head; 19,723,733 trainable for C = 7 (centers excluded).
    let net = DanEac::new(&DanConfig::thesis(), 7, &Device::Cpu, DType::F32, 0).unwrap();
    let head0: usize = net
        .store
        .params()
        .filter(|e| e.name.starts_with("cat_head0."))
        .map(|e| e.var.elem_count())
        .sum();
    assert_eq!(head0, 2_135_904);
    let trunk: usize = net
        .store
        .params()
        .filter(|e| e.name.starts_with("features."))
        .map(|e| e.var.elem_count())
        .sum();
    assert_eq!(trunk, 11_176_512);
    assert_eq!(net.store.num_trainable() - 7 * 512, 19_723_733);
    // Registration order: features, heads, fc, bn, then the centers.
    let names: Vec<&str> = net.store.params().map(|e| e.name.as_str()).collect();
    assert_eq!(names[0], "features.0.weight");
    assert_eq!(
        &names[names.len() - 5..],
        &[
            "fc.weight",
            "fc.bias",
            "bn.weight",
            "bn.bias",
            "affinity.centers"
        ]
    );
}

#[test]
fn feature_map_sizes_at_112_and_224() {
    // Spec 1.1: F is 4x4 at 112 px and 7x7 at 224 px (eval mode, batch 1 is fine there).
    let mut config = DanConfig::thesis();
    config.backbone = BackboneConfig::ResNet(ResNetConfig::basic([16, 16, 16, 32], [1, 1, 1, 1]));
    let net = DanEac::new(&config, 7, &Device::Cpu, DType::F32, 0).unwrap();
    for (size, hw) in [(112usize, 4usize), (224, 7)] {
        let x = Tensor::zeros((1, 3, size, size), DType::F32, &Device::Cpu).unwrap();
        let out = net.dan.forward(&x, false).unwrap();
        assert_eq!(out.feat.dims(), &[1, 32, hw, hw]);
        assert_eq!(net.dan.cam(&out.feat).unwrap().dims(), &[1, 7, hw, hw]);
        assert_eq!(out.heads.dims(), &[1, 4, 32]);
    }
}

fn tempdir() -> std::path::PathBuf {
    crate::common::scratch("training")
}

#[test]
fn cosine_schedule_warms_up_then_decays_to_its_floor() {
    let s = Schedule::Cosine {
        warmup_epochs: 1.0,
        min_lr: 1e-4,
    };
    let (base, epochs, steps) = (2e-3, 5, 10);
    let lr = |e: usize, k: usize| s.lr_at_step(base, epochs, e, k, steps);
    // Linear warm-up over the first 10 steps, reaching the base rate at the end of epoch 1.
    assert!((lr(0, 0) - base / 10.0).abs() < 1e-15);
    assert!((lr(0, 4) - base / 2.0).abs() < 1e-15);
    assert!((lr(0, 9) - base).abs() < 1e-15);
    // Then a half cosine over the remaining 40 steps: the midpoint is halfway to the floor,
    // the last step is the floor, and the rate never rises after the warm-up.
    let mid = lr(2, 9);
    assert!((mid - (1e-4 + (base - 1e-4) * 0.5)).abs() < 1e-12, "{mid}");
    assert!((lr(4, 9) - 1e-4).abs() < 1e-15);
    let all: Vec<f64> = (0..epochs)
        .flat_map(|e| (0..steps).map(move |k| (e, k)))
        .map(|(e, k)| lr(e, k))
        .collect();
    assert!(all[9..].windows(2).all(|w| w[1] <= w[0] + 1e-18));
    // No warm-up: the first step is already at (almost) the base rate.
    let plain = Schedule::Cosine {
        warmup_epochs: 0.0,
        min_lr: 0.0,
    };
    assert!(plain.lr_at_step(1.0, 2, 0, 0, 100) > 0.999);
    // The per-epoch schedules ignore the step.
    let exp = Schedule::Exponential { gamma: 0.5 };
    assert_eq!(exp.lr_at_step(1.0, 9, 2, 7, 10), 0.25);
}

#[test]
fn consistency_rampup_grows_lambda3_linearly_and_never_drops_the_term() {
    let w = fer_model::train::LossWeights {
        consistency_rampup_epochs: 2.0,
        ..Default::default()
    };
    let steps = 10;
    // 20 ramp steps: the first step has 1/20 of lambda3, the 20th the full weight, then it stays.
    assert!((w.at_step(0, 0, steps).consistency - 4.0 / 20.0).abs() < 1e-12);
    assert!((w.at_step(0, 9, steps).consistency - 2.0).abs() < 1e-12);
    assert_eq!(w.at_step(1, 9, steps).consistency, 4.0);
    assert_eq!(w.at_step(5, 3, steps).consistency, 4.0);
    for e in 0..3 {
        for k in 0..steps {
            let c = w.at_step(e, k, steps).consistency;
            assert!(c > 0.0 && c <= 4.0, "the term stays in the graph: {c}");
        }
    }
    // The other weights do not ramp; without a ramp lambda3 is constant (the papers).
    assert_eq!(w.at_step(0, 0, steps).affinity, 1.0);
    let plain = fer_model::train::LossWeights::default();
    assert_eq!(plain.at_step(0, 0, steps), plain);
    // Left out of the serialised config when 0 (old trial keys stay valid).
    assert!(!serde_json::to_string(&plain).unwrap().contains("rampup"));
}

/// Steps on the compute pool from several threads at once (a library user's threads, or tests run
/// in parallel) finish, whichever thread's pending work each pool thread takes while it waits,
/// and a panicking step reaches its caller instead of leaving the pool spinning.
#[test]
fn concurrent_compute_pool_work_finishes_and_a_panic_propagates() {
    use rayon::prelude::*;
    use std::sync::mpsc;
    use std::time::Duration;
    let (tx, rx) = mpsc::channel();
    for caller in 0..3u64 {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut total = 0u64;
            for round in 0..200u64 {
                total += train::on_compute_pool(|| {
                    // Nested parallel regions, as a training step's kernels make.
                    (0..64u64)
                        .into_par_iter()
                        .map(|i| {
                            (0..256u64)
                                .into_par_iter()
                                .map(|j| i ^ j ^ round)
                                .sum::<u64>()
                        })
                        .sum::<u64>()
                });
            }
            tx.send((caller, total)).unwrap();
        });
    }
    drop(tx);
    let expected: u64 = (0..200u64)
        .map(|round| {
            (0..64u64)
                .map(|i| (0..256u64).map(|j| i ^ j ^ round).sum::<u64>())
                .sum::<u64>()
        })
        .sum();
    for _ in 0..3 {
        let (caller, total) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("concurrent work on the compute pool did not finish in 120 s (deadlock)");
        assert_eq!(total, expected, "caller {caller}");
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let caught = std::panic::catch_unwind(|| {
            train::on_compute_pool(|| -> u32 { panic!("a failing step") })
        });
        tx.send(caught.is_err()).unwrap();
    });
    let panicked = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a panicking step did not return in 60 s");
    assert!(panicked, "the step's panic reaches its caller");
}

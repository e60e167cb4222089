//! How hard is the synthetic set? A linear softmax classifier on raw (normalised) pixels,
//! trained to convergence with Adam, for each difficulty preset.
//!
//! `cargo run --example linear_probe -p fer-model [-- TRAIN TEST SIZE]`

use candle_core::{DType, Device, Tensor, Var};
use fer_model::data::augment::eval_transform;
use fer_model::data::synth::{ClassBalance, SynthConfig};
use fer_model::data::{self, DataSpec, Split};
use fer_model::optim::{Optimizer, OptimizerConfig};

fn tensors(spec: &DataSpec, split: Split, size: usize) -> anyhow::Result<(Tensor, Tensor)> {
    let set = data::load(spec, split)?;
    let mut px = Vec::new();
    for i in 0..set.len() {
        px.extend(eval_transform(&set.image(i)?, size).data);
    }
    let x = Tensor::from_vec(px, (set.len(), 3 * size * size), &Device::Cpu)?;
    Ok((x, Tensor::new(set.labels(), &Device::Cpu)?))
}

fn accuracy(w: &Tensor, b: &Tensor, x: &Tensor, y: &Tensor) -> anyhow::Result<f64> {
    let pred = x.matmul(w)?.broadcast_add(b)?.argmax(1)?;
    Ok(pred
        .eq(y)?
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let (train, test, size) = (
        *args.first().unwrap_or(&1400),
        *args.get(1).unwrap_or(&700),
        *args.get(2).unwrap_or(&48),
    );
    for (name, d) in [("easy", 0.2f32), ("medium", 0.5), ("hard", 0.8)] {
        let spec = DataSpec::Synthetic(SynthConfig {
            difficulty: d,
            image_size: size,
            train,
            test,
            seed: 0,
            balance: ClassBalance::Balanced,
        });
        let (xtr, ytr) = tensors(&spec, Split::Train, size)?;
        let (xte, yte) = tensors(&spec, Split::Test, size)?;
        let dim = xtr.dim(1)?;
        let w = Var::zeros((dim, 7), DType::F32, &Device::Cpu)?;
        let b = Var::zeros(7, DType::F32, &Device::Cpu)?;
        let cfg = OptimizerConfig::Adam {
            lr: 1e-3,
            weight_decay: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
        };
        let mut opt = Optimizer::new(cfg, vec![("w".into(), w.clone()), ("b".into(), b.clone())]);
        for _ in 0..300 {
            let logits = xtr.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            let loss = candle_nn::loss::cross_entropy(&logits, &ytr)?;
            opt.step(&loss.backward()?)?;
        }
        println!(
            "{name:>6} (difficulty {d}): linear probe on raw pixels, {train} train / {test} test at {size}px: train acc {:.3}, test acc {:.3} (chance 0.143)",
            accuracy(w.as_tensor(), b.as_tensor(), &xtr, &ytr)?,
            accuracy(w.as_tensor(), b.as_tensor(), &xte, &yte)?
        );
    }
    Ok(())
}

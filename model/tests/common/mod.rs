//! Helpers shared by the integration tests: fixture discovery (the tolerance rules of the
//! fixtures' README section 6 live in `fer_model::parity`).
#![allow(dead_code)]
// `!(x <= tol)` on purpose: a NaN must fail the comparison.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod blobs;
pub mod fi;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Every model case folder (one with case.json, weights, inputs and expected safetensors).
pub fn model_cases() -> Vec<PathBuf> {
    fer_model::parity::cases_in(&fixtures_dir()).unwrap()
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    fer_model::checkpoint::read_safetensors(path).unwrap()
}

pub use fer_model::parity::flat;

/// A fresh, empty scratch folder for one test: its tag, this process and a per-process count
/// make it unique (all integration tests share one process).
pub fn scratch(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("fer-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A deterministic pseudo-random f64 tensor in [-1, 1).
pub fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// Value and gradients of the scalar `f(inputs)` with the inputs cast to `dtype`, as f64.
pub fn value_and_grads(
    inputs: &[Tensor],
    dtype: DType,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> (f64, Vec<Vec<f64>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let grads = out.backward().unwrap();
    let value = out
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let g = vars
        .iter()
        .enumerate()
        .map(|(i, v)| {
            flat(
                grads
                    .get(v)
                    .unwrap_or_else(|| panic!("input {i} received no gradient")),
            )
        })
        .collect();
    (value, g)
}

/// The gradient of the scalar `f` w.r.t. each input, computed in `dtype`, against central finite
/// differences of step `eps` in the same dtype, on about `samples` evenly spaced elements per
/// input: the worst max|analytic - numeric| / max(max|numeric|, 1e-6) over all inputs.
pub fn gradcheck_in(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Tensor,
    dtype: DType,
    eps: f64,
    samples: usize,
) -> f64 {
    let (_, analytic) = value_and_grads(inputs, dtype, f);
    let mut worst: f64 = 0.0;
    for (i, input) in inputs.iter().enumerate() {
        let base = flat(input);
        let step = (base.len() / samples.max(1)).max(1);
        let (mut num_max, mut diff_max) = (0f64, 0f64);
        for j in (0..base.len()).step_by(step) {
            let eval = |delta: f64| {
                let mut b = base.clone();
                b[j] += delta;
                let mut args: Vec<Tensor> =
                    inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
                args[i] = Tensor::from_vec(b, input.dims(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                f(&args)
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            num_max = num_max.max(numeric.abs());
            diff_max = diff_max.max((numeric - analytic[i][j]).abs());
        }
        worst = worst.max(diff_max / num_max.max(1e-6));
    }
    worst
}

/// `gradcheck_in` in f64 with step 1e-6: the check of every op with a hand-written backward.
pub fn gradcheck(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, samples: usize) -> f64 {
    gradcheck_in(inputs, f, DType::F64, 1e-6, samples)
}

/// sum(t * R) for a fixed random R (in t's dtype): a scalar whose gradient w.r.t. t is R.
pub fn project(t: &Tensor, seed: u64) -> Tensor {
    let r = rand_tensor(t.dims(), seed).to_dtype(t.dtype()).unwrap();
    (t * r).unwrap().sum_all().unwrap()
}

/// Worst relative error between the analytic gradient of the full DAN + EAC step loss w.r.t. the
/// store entry `param` and central finite differences of step `eps`, on about `samples`
/// evenly spaced elements (float64 networks).
pub fn network_gradient_error(
    net: &fer_model::DanEac,
    x: &Tensor,
    y: &Tensor,
    w: fer_model::LossWeights,
    param: &str,
    eps: f64,
    samples: usize,
) -> f64 {
    use fer_model::train::step_graph;
    let var = net
        .store
        .get(param)
        .unwrap_or_else(|| panic!("no parameter {param}"))
        .clone();
    let loss = || step_graph(&net.dan, &net.centers, x, y, w).unwrap().total;
    let grads = loss().backward().unwrap();
    let analytic = flat(
        grads
            .get(&var)
            .unwrap_or_else(|| panic!("{param} has no gradient")),
    );
    let base = flat(var.as_tensor());
    let set = |v: Vec<f64>| {
        var.set(&Tensor::from_vec(v, var.dims(), &candle_core::Device::Cpu).unwrap())
            .unwrap()
    };
    let (mut num_max, mut diff_max) = (0f64, 0f64);
    for j in (0..base.len()).step_by((base.len() / samples).max(1)) {
        let eval = |d: f64| {
            let mut b = base.clone();
            b[j] += d;
            set(b);
            let v = loss().to_scalar::<f64>().unwrap();
            set(base.clone());
            v
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        num_max = num_max.max(numeric.abs());
        diff_max = diff_max.max((numeric - analytic[j]).abs());
    }
    diff_max / num_max.max(1e-8)
}

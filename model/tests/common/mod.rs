//! Helpers shared by the integration tests: fixture discovery and the tolerance rules of the
//! fixtures' README section 6 (a port of the reference `compare.py`).
#![allow(dead_code)]
// `!(x <= tol)` on purpose: a NaN must fail the comparison.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod fi;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Every model case folder (one with case.json, weights, inputs and expected safetensors).
pub fn model_cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            [
                "case.json",
                "weights.safetensors",
                "inputs.safetensors",
                "expected.safetensors",
            ]
            .iter()
            .all(|f| p.join(f).is_file())
        })
        .collect();
    cases.sort();
    cases
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    fer_model::checkpoint::read_safetensors(path).unwrap()
}

const ACT_TOL: f64 = 2e-4;
const LOSS_TOL: f64 = 5e-5;
const GRAD_TOL: f64 = 2e-3;
const STAT_TOL: f64 = 1e-4;
const ELEM_LR_FRAC: f64 = 1e-2;
const ELEM_REL: f64 = 1e-6;

pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// max|a-e| / max(max|e|, floor)
pub fn max_normalised(a: &Tensor, e: &Tensor, floor: f64) -> f64 {
    let (a, e) = (flat(a), flat(e));
    let diff = a
        .iter()
        .zip(&e)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = e.iter().map(|x| x.abs()).fold(0.0, f64::max).max(floor);
    diff / scale
}

pub struct CaseRules {
    pub lr: f64,
    pub noisy: Vec<String>,
}

/// Failures, as (tensor, message); empty means the actual outputs pass.
pub fn compare(
    actual: &HashMap<String, Tensor>,
    expected: &HashMap<String, Tensor>,
    before: &HashMap<String, Tensor>,
    rules: &CaseRules,
) -> Vec<(String, String)> {
    let lr = rules.lr;
    let noisy = |p: &str| rules.noisy.iter().any(|n| n == p);
    let mut fails = Vec::new();
    let mut keys: Vec<_> = expected.keys().collect();
    keys.sort();
    for k in keys {
        let e = &expected[k];
        let Some(a) = actual.get(k) else {
            fails.push((k.clone(), "missing".into()));
            continue;
        };
        if a.dims() != e.dims() {
            fails.push((k.clone(), format!("shape {:?} != {:?}", a.dims(), e.dims())));
            continue;
        }
        if k.starts_with("eval.") || k.starts_with("train.") {
            let m = max_normalised(a, e, 1e-6);
            if !(m <= ACT_TOL) {
                fails.push((
                    k.clone(),
                    format!("max-normalised error {m:.3e} > {ACT_TOL}"),
                ));
            }
        } else if k.starts_with("loss.") {
            let (a, e) = (flat(a)[0], flat(e)[0]);
            let m = (a - e).abs() / e.abs().max(1e-3);
            if !(m <= LOSS_TOL) {
                fails.push((
                    k.clone(),
                    format!("relative error {m:.3e} > {LOSS_TOL} ({a} vs {e})"),
                ));
            }
        } else if let Some(p) = k
            .strip_prefix("grad.")
            .or_else(|| k.strip_prefix("gradnorm."))
        {
            if noisy(p) {
                continue;
            }
            let m = max_normalised(a, e, 1e-12);
            if !(m <= GRAD_TOL) {
                fails.push((
                    k.clone(),
                    format!("max-normalised error {m:.3e} > {GRAD_TOL}"),
                ));
            }
        } else if let Some(p) = k.strip_prefix("after.") {
            if p.ends_with("num_batches_tracked") {
                let (a, e) = (flat(a), flat(e));
                if a != e {
                    fails.push((k.clone(), format!("{a:?} != {e:?}")));
                }
            } else if p.ends_with("running_mean") || p.ends_with("running_var") {
                let m = max_normalised(a, e, 1e-6);
                if !(m <= STAT_TOL) {
                    fails.push((
                        k.clone(),
                        format!("max-normalised error {m:.3e} > {STAT_TOL}"),
                    ));
                }
            } else if noisy(p) {
                let b = flat(&before[p]);
                let bad = flat(a)
                    .iter()
                    .zip(&b)
                    .any(|(x, y)| (x - y).abs() > lr * (1.0 + 1e-6) + ELEM_REL * y.abs());
                if bad {
                    fails.push((k.clone(), "|after-before| > lr + 1e-6*|before|".into()));
                }
            } else {
                let (a, e) = (flat(a), flat(e));
                let diffs: Vec<f64> = a.iter().zip(&e).map(|(x, y)| (x - y).abs()).collect();
                let n_bad = diffs
                    .iter()
                    .zip(&e)
                    .filter(|(d, y)| **d > ELEM_LR_FRAC * lr + ELEM_REL * y.abs())
                    .count();
                let allowed = 4 + e.len() / 5000;
                let worst = diffs.iter().cloned().fold(0.0, f64::max);
                if n_bad > allowed || worst > 2.0 * lr * (1.0 + 1e-3) {
                    fails.push((
                        k.clone(),
                        format!(
                            "{n_bad} elements beyond 1e-2*lr (allowed {allowed}), worst {:.3}*lr",
                            worst / lr
                        ),
                    ));
                }
            }
        } else {
            fails.push((k.clone(), "unknown tensor group".into()));
        }
    }
    fails
}

/// A deterministic pseudo-random f64 tensor in [-1, 1).
pub fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// Check the gradient of `f` w.r.t. each input against central finite differences (f64).
/// `f` returns a scalar. Checks up to `samples` elements per input; returns the worst relative
/// error max|analytic - numeric| / max(max|numeric|, 1e-6) over all inputs.
pub fn gradcheck(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, samples: usize) -> f64 {
    use candle_core::Var;
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&ts).backward().unwrap();
    let eps = 1e-6;
    let mut worst: f64 = 0.0;
    for (i, v) in vars.iter().enumerate() {
        let analytic = grads
            .get(v)
            .map(|g| g.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .unwrap_or_else(|| panic!("input {i} received no gradient"));
        let base = inputs[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let n = base.len();
        let step = (n / samples.max(1)).max(1);
        let mut num_max: f64 = 0.0;
        let mut diff_max: f64 = 0.0;
        for j in (0..n).step_by(step) {
            let eval = |delta: f64| {
                let mut b = base.clone();
                b[j] += delta;
                let mut args: Vec<Tensor> = inputs.to_vec();
                args[i] = Tensor::from_vec(b, inputs[i].dims(), &candle_core::Device::Cpu).unwrap();
                f(&args).to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            num_max = num_max.max(numeric.abs());
            diff_max = diff_max.max((numeric - analytic[j]).abs());
        }
        worst = worst.max(diff_max / num_max.max(1e-6));
    }
    worst
}

/// sum(t * R) for a fixed random R: a scalar whose gradient w.r.t. t is R.
pub fn project(t: &Tensor, seed: u64) -> Tensor {
    let r = rand_tensor(t.dims(), seed);
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

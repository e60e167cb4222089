//! The fixtures' parity procedure (`fixtures/README.md` §3: eval outputs, every loss term, the
//! gradients, the state after one Adam step) and its tolerance rules (§6, a port of the reference
//! `compare.py`), on any device: `tests/parity.rs` runs it on the CPU, `fer parity --device cuda`
//! on a GPU (`just gpu-check`).
// `!(x <= tol)` on purpose: a NaN must fail the comparison.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::backbone::{BackboneConfig, ResNetConfig};
use crate::{train, DanConfig, DanEac, LossWeights, OptimizerConfig};

/// Every model case folder under `dir` (one with case.json, weights, inputs and expected
/// safetensors), sorted.
pub fn cases_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing fixture cases in {}", dir.display()))?
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
    Ok(cases)
}

fn load(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    crate::checkpoint::read_safetensors(path)
}

/// A case folder's `case.json` (the fields the procedure needs).
#[derive(Deserialize)]
pub struct Case {
    pub widths: [usize; 4],
    pub blocks: [usize; 4],
    pub num_heads: usize,
    pub num_classes: usize,
    pub num_centers: usize,
    pub lambdas: LossWeights,
    pub optimizer: Opt,
    #[serde(default)]
    pub zero_grad_params: Vec<String>,
    #[serde(default)]
    pub ill_conditioned_params: Vec<String>,
}

#[derive(Deserialize)]
pub struct Opt {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

/// The case's network on `device` with its initial state.
pub fn build(
    case: &Case,
    weights: &HashMap<String, Tensor>,
    device: &Device,
) -> anyhow::Result<DanEac> {
    let config = DanConfig {
        backbone: BackboneConfig::ResNet(ResNetConfig::basic(case.widths, case.blocks)),
        heads: case.num_heads,
        classes: case.num_classes,
    };
    let net = DanEac::new(&config, case.num_centers, device, DType::F32, 0)?;
    net.store
        .load_state(weights, "weights.safetensors", &|_| false)?;
    Ok(net)
}

pub fn load_case(dir: &Path) -> anyhow::Result<Case> {
    let path = dir.join("case.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a parity case", path.display()))
}

/// Run the reference procedure (fixtures README section 3) on `device` and name the outputs as
/// it does; the outputs are returned on the CPU.
pub fn run_case(dir: &Path, device: &Device) -> anyhow::Result<(HashMap<String, Tensor>, Case)> {
    let case = load_case(dir)?;
    let weights = load(&dir.join("weights.safetensors"))?;
    let inputs = load(&dir.join("inputs.safetensors"))?;
    let net = build(&case, &weights, device)?;
    let x = &inputs["x"].to_device(device)?;
    let y = inputs["y"].to_dtype(DType::U32)?.to_device(device)?;
    let mut out: HashMap<String, Tensor> = HashMap::new();

    // Eval pass.
    let ev = net.dan.forward(x, false)?;
    out.insert("eval.cam".into(), net.dan.cam(&ev.feat)?);
    out.insert("eval.logits".into(), ev.logits);
    out.insert("eval.feat".into(), ev.feat);
    out.insert("eval.heads".into(), ev.heads);

    // Train step.
    let g = train::step_graph(&net.dan, &net.centers, x, &y, case.lambdas)?;
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
    let grads = g.total.backward()?;
    for (name, var) in net.trainable() {
        if let Some(gr) = grads.get(&var) {
            out.insert(format!("gradnorm.{name}"), gr.sqr()?.sum_all()?.sqrt()?);
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
    opt.step(&grads)?;
    for (name, t) in net.store.state()? {
        out.insert(format!("after.{name}"), t);
    }
    let out = out
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
        .collect::<anyhow::Result<_>>()?;
    Ok((out, case))
}

const ACT_TOL: f64 = 2e-4;
const LOSS_TOL: f64 = 5e-5;
const GRAD_TOL: f64 = 2e-3;
const STAT_TOL: f64 = 1e-4;
const ELEM_LR_FRAC: f64 = 1e-2;
const ELEM_REL: f64 = 1e-6;

/// A CPU tensor's values as f64, row-major.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// max|a-e| / max(max|e|, floor)
fn max_normalised(a: &Tensor, e: &Tensor, floor: f64) -> f64 {
    let (a, e) = (flat(a), flat(e));
    let diff = a
        .iter()
        .zip(&e)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = e.iter().map(|x| x.abs()).fold(0.0, f64::max).max(floor);
    diff / scale
}

/// What the rules need besides the tensors: the learning rate and the parameters whose update is
/// noise (`zero_grad_params` and `ill_conditioned_params`).
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

/// Run one case on `device` and compare it with its expected outputs: (number of expected
/// tensors, failures as (tensor, message)). Anything produced that the reference lacks (but for
/// `grad.*`, stored only for a sample) is a failure too.
pub fn check_case(dir: &Path, device: &Device) -> anyhow::Result<(usize, Vec<(String, String)>)> {
    let (actual, case) = run_case(dir, device)?;
    let expected = load(&dir.join("expected.safetensors"))?;
    let before = load(&dir.join("weights.safetensors"))?;
    let mut noisy = case.zero_grad_params.clone();
    noisy.extend(case.ill_conditioned_params.iter().cloned());
    let rules = CaseRules {
        lr: case.optimizer.lr,
        noisy,
    };
    let mut fails = compare(&actual, &expected, &before, &rules);
    let mut extra: Vec<_> = actual
        .keys()
        .filter(|k| !k.starts_with("grad.") && !expected.contains_key(*k))
        .cloned()
        .collect();
    extra.sort();
    fails.extend(
        extra
            .into_iter()
            .map(|k| (k, "produced but not in the reference".into())),
    );
    Ok((expected.len(), fails))
}

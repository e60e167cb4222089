//! Optimizers with PyTorch's exact update rules, and the per-epoch learning-rate schedules.
//!
//! Candle's AdamW defaults to weight decay 0.01 and has no coupled-L2 Adam or momentum SGD, so
//! all three live here. Parameters without a gradient are skipped entirely (weight decay too),
//! as `torch.optim` does for `grad is None`.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::ops::adam::{adam_in_place, AdamStep};

/// Which rule and its hyper-parameters. `lr` is the base rate; schedules scale it per epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// torch.optim.Adam: weight decay is coupled L2 (added to the gradient).
    Adam {
        lr: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default = "default_betas")]
        betas: (f64, f64),
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// torch.optim.AdamW: decoupled weight decay (theta *= 1 - lr*wd before the Adam update).
    AdamW {
        lr: f64,
        weight_decay: f64,
        #[serde(default = "default_betas")]
        betas: (f64, f64),
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// torch.optim.SGD with momentum (dampening 0, no Nesterov) and coupled weight decay.
    Sgd {
        lr: f64,
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        weight_decay: f64,
    },
}

fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn default_eps() -> f64 {
    1e-8
}

impl OptimizerConfig {
    /// The thesis optimiser: Adam, lr 1e-4, no weight decay (spec 7 item 9).
    pub fn thesis() -> Self {
        Self::adam(1e-4)
    }

    /// Plain Adam (no weight decay, PyTorch's default betas and eps) at `lr`.
    pub fn adam(lr: f64) -> Self {
        OptimizerConfig::Adam {
            lr,
            weight_decay: 0.0,
            betas: default_betas(),
            eps: default_eps(),
        }
    }

    pub fn base_lr(&self) -> f64 {
        match self {
            OptimizerConfig::Adam { lr, .. }
            | OptimizerConfig::AdamW { lr, .. }
            | OptimizerConfig::Sgd { lr, .. } => *lr,
        }
    }
}

/// Learning rate as a function of training progress. `constant`, `exponential` and `step` are
/// stepped once per epoch (PyTorch's `ExponentialLR` / `StepLR` called after each epoch);
/// `cosine` is updated every step: a linear warm-up from 0 over `warmup_epochs`, then a cosine
/// from the base rate down to `min_lr` at the end of the last epoch (`CosineAnnealingLR` after
/// `LinearLR`, per step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    Constant,
    /// lr * gamma^epoch (DAN affectnet.py: gamma 0.6).
    Exponential {
        gamma: f64,
    },
    /// lr * gamma^(epoch / step_size).
    Step {
        step_size: usize,
        gamma: f64,
    },
    Cosine {
        #[serde(default)]
        warmup_epochs: f64,
        #[serde(default)]
        min_lr: f64,
    },
}

impl Schedule {
    /// The rate for step `step` (0-based) of epoch `epoch` (0-based) in a run of `epochs`
    /// epochs of `steps` steps each.
    pub fn lr_at_step(
        &self,
        base: f64,
        epochs: usize,
        epoch: usize,
        step: usize,
        steps: usize,
    ) -> f64 {
        match self {
            Schedule::Cosine {
                warmup_epochs,
                min_lr,
            } => {
                let steps = steps.max(1) as f64;
                // Progress at the end of this step, so the first step already has a rate > 0.
                let t = epoch as f64 * steps + step as f64 + 1.0;
                let warm = warmup_epochs * steps;
                let total = epochs as f64 * steps;
                if t <= warm {
                    base * t / warm
                } else {
                    let p = ((t - warm) / (total - warm).max(1.0)).min(1.0);
                    min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
                }
            }
            _ => self.lr_at(base, epoch),
        }
    }

    /// The rate of epoch `epoch` for the per-epoch schedules (the base rate for `cosine`,
    /// which depends on the step: see `lr_at_step`).
    pub fn lr_at(&self, base: f64, epoch: usize) -> f64 {
        match self {
            Schedule::Cosine { .. } => base,
            Schedule::Constant => base,
            Schedule::Exponential { gamma } => base * gamma.powi(epoch as i32),
            Schedule::Step { step_size, gamma } => {
                base * gamma.powi((epoch / (*step_size).max(1)) as i32)
            }
        }
    }
}

/// An optimizer over named parameters. Its state (moments, step count) is saved by name so a
/// checkpoint resumes exactly.
pub struct Optimizer {
    pub config: OptimizerConfig,
    params: Vec<(String, Var)>,
    /// Current learning rate (set by the schedule each epoch).
    pub lr: f64,
    /// Per-parameter state tensors: "exp_avg" / "exp_avg_sq" (Adam) or "momentum_buffer" (SGD).
    state: HashMap<String, BTreeMap<&'static str, Tensor>>,
    /// Per-parameter step counts (PyTorch keeps one per parameter: a parameter without a
    /// gradient in some step does not advance).
    steps: HashMap<String, u64>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig, params: Vec<(String, Var)>) -> Self {
        let lr = config.base_lr();
        Self {
            config,
            params,
            lr,
            state: HashMap::new(),
            steps: HashMap::new(),
        }
    }

    /// One update of every parameter that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> anyhow::Result<()> {
        for (name, var) in &self.params {
            let Some(grad) = grads.get(var) else { continue };
            // Detached: the moments must not carry the autodiff graph from step to step (they
            // would keep every past gradient alive).
            let grad = &grad.detach();
            let theta = &var.as_tensor().detach();
            let t = self.steps.entry(name.clone()).or_insert(0);
            *t += 1;
            let state = self.state.entry(name.clone()).or_default();
            let lr = self.lr;
            let new_theta = match &self.config {
                OptimizerConfig::Adam {
                    weight_decay,
                    betas,
                    eps,
                    ..
                } => {
                    let rule = FusedAdam {
                        t: *t,
                        lr,
                        betas: *betas,
                        eps: *eps,
                        coupled_decay: *weight_decay,
                        decoupled_factor: None,
                    };
                    if rule.apply(var.as_tensor(), grad, state)? {
                        continue;
                    }
                    {
                        {
                            let g = if *weight_decay != 0.0 {
                                (grad + (theta * *weight_decay)?)?
                            } else {
                                grad.clone()
                            };
                            adam_update(theta, &g, state, *t, lr, *betas, *eps)?
                        }
                    }
                }
                OptimizerConfig::AdamW {
                    weight_decay,
                    betas,
                    eps,
                    ..
                } => {
                    let rule = FusedAdam {
                        t: *t,
                        lr,
                        betas: *betas,
                        eps: *eps,
                        coupled_decay: 0.0,
                        decoupled_factor: Some(1.0 - lr * weight_decay),
                    };
                    if rule.apply(var.as_tensor(), grad, state)? {
                        continue;
                    }
                    {
                        {
                            let decayed = (theta * (1.0 - lr * weight_decay))?;
                            adam_update(&decayed, grad, state, *t, lr, *betas, *eps)?
                        }
                    }
                }
                OptimizerConfig::Sgd {
                    momentum,
                    weight_decay,
                    ..
                } => {
                    let mut g = if *weight_decay != 0.0 {
                        (grad + (theta * *weight_decay)?)?
                    } else {
                        grad.clone()
                    };
                    if *momentum != 0.0 {
                        let buf = match state.get("momentum_buffer") {
                            Some(b) => ((b * *momentum)? + &g)?,
                            None => g.clone(),
                        };
                        state.insert("momentum_buffer", buf.clone());
                        g = buf;
                    }
                    (theta - (g * lr)?)?
                }
            };
            var.set(&new_theta)
                .with_context(|| format!("optimizer update of {name}"))?;
        }
        Ok(())
    }

    /// The state as named tensors: `optim.<param>.<slot>` plus `optim.<param>.step`.
    pub fn state_tensors(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, slots) in &self.state {
            for (slot, t) in slots {
                out.push((format!("optim.{name}.{slot}"), t.clone()));
            }
        }
        for (name, step) in &self.steps {
            out.push((
                format!("optim.{name}.step"),
                Tensor::new(*step as i64, &candle_core::Device::Cpu)?,
            ));
        }
        Ok(out)
    }

    /// Restore the state written by `state_tensors`; tensors of unknown parameters are an error.
    pub fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let device = self.params.first().map(|(_, v)| v.device().clone());
        for (key, t) in tensors {
            let Some(rest) = key.strip_prefix("optim.") else {
                continue;
            };
            let (name, slot) = rest
                .rsplit_once('.')
                .with_context(|| format!("malformed optimizer key {key}"))?;
            let var = self
                .params
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .with_context(|| format!("optimizer state for unknown parameter {name}"))?;
            match slot {
                "step" => {
                    self.steps.insert(
                        name.to_string(),
                        t.to_dtype(candle_core::DType::I64)?.to_scalar::<i64>()? as u64,
                    );
                }
                "exp_avg" | "exp_avg_sq" | "momentum_buffer" => {
                    anyhow::ensure!(
                        t.dims() == var.dims(),
                        "optimizer {key}: shape {:?}, parameter has {:?}",
                        t.dims(),
                        var.dims()
                    );
                    let slot: &'static str = match slot {
                        "exp_avg" => "exp_avg",
                        "exp_avg_sq" => "exp_avg_sq",
                        _ => "momentum_buffer",
                    };
                    let t = t
                        .to_dtype(var.dtype())?
                        .to_device(device.as_ref().unwrap_or(&candle_core::Device::Cpu))?;
                    self.state
                        .entry(name.to_string())
                        .or_default()
                        .insert(slot, t);
                }
                other => anyhow::bail!("optimizer {key}: unknown state slot {other}"),
            }
        }
        Ok(())
    }
}

/// The Adam / AdamW update of one f32 CPU parameter in one pass (Candle's ops take ~10 passes and
/// allocations per parameter). Each element goes through the same f32 operations, in the same
/// order and with the same rounded constants, as `adam_update` and the weight-decay steps before
/// it, so the result is bit-identical to the composed path.
struct FusedAdam {
    t: u64,
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    /// Adam's L2 term: g += wd * theta.
    coupled_decay: f64,
    /// AdamW's theta *= 1 - lr * wd before the update.
    decoupled_factor: Option<f64>,
}

impl FusedAdam {
    /// Updates `theta` (the parameter's own storage) and the moments in `state` in place, or
    /// returns false, changing nothing, where the fast path does not apply (not f32 on the CPU).
    fn apply(
        &self,
        theta: &Tensor,
        grad: &Tensor,
        state: &mut BTreeMap<&'static str, Tensor>,
    ) -> candle_core::Result<bool> {
        use candle_core::DType;
        let f32_cpu =
            |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
        if !f32_cpu(theta) || !f32_cpu(grad) || !state.values().all(f32_cpu) {
            return Ok(false);
        }
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        let (m, v, first) = match (state.get("exp_avg"), state.get("exp_avg_sq")) {
            (Some(m), Some(v)) => (m.clone(), v.clone(), false),
            (None, None) => (theta.zeros_like()?, theta.zeros_like()?, true),
            // One moment without the other (a hand-edited checkpoint): the composed path.
            _ => return Ok(false),
        };
        // The constants exactly as Candle's affine ops round them.
        let k = AdamStep {
            first,
            b1: b1 as f32,
            keep1: (1.0 - b1) as f32,
            b2: b2 as f32,
            keep2: (1.0 - b2) as f32,
            wd: self.coupled_decay as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: self.eps as f32,
            step: (self.lr / bc1) as f32,
            decay: self.decoupled_factor.map(|f| f as f32),
        };
        adam_in_place(theta, grad, &m, &v, &k)?;
        state.insert("exp_avg", m);
        state.insert("exp_avg_sq", v);
        Ok(true)
    }
}

/// PyTorch's Adam: m, v moments; theta -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
fn adam_update(
    theta: &Tensor,
    g: &Tensor,
    state: &mut BTreeMap<&'static str, Tensor>,
    t: u64,
    lr: f64,
    (b1, b2): (f64, f64),
    eps: f64,
) -> candle_core::Result<Tensor> {
    let m = match state.get("exp_avg") {
        Some(m) => ((m * b1)? + (g * (1.0 - b1))?)?,
        None => (g * (1.0 - b1))?,
    };
    let v = match state.get("exp_avg_sq") {
        Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
        None => (g.sqr()? * (1.0 - b2))?,
    };
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
    let update = ((&m / &denom)? * (lr / bc1))?;
    state.insert("exp_avg", m);
    state.insert("exp_avg_sq", v);
    theta - update
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(7);
                (h % 20001) as f32 / 10000.0 - 1.0
            })
            .collect()
    }

    /// Three steps of the fused update against the composed tensor-op path: bit-identical.
    #[test]
    fn fused_adam_and_adamw_equal_the_composed_updates_bit_for_bit() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let n = 40_000; // several parallel chunks
        for (coupled, decoupled) in [(0.0, None), (1e-4, None), (0.0, Some(0.05))] {
            let (lr, betas, eps) = (1e-3, (0.9, 0.999), 1e-8);
            let theta_a = Tensor::from_vec(values(n, 1), n, &dev)?;
            let mut theta_b = Tensor::from_vec(values(n, 1), n, &dev)?; // own storage: the fast path updates in place
            let (mut state_a, mut state_b) = (BTreeMap::new(), BTreeMap::new());
            for t in 1..=3u64 {
                let grad = Tensor::from_vec(values(n, 10 + t as u32), n, &dev)?;
                let rule = FusedAdam {
                    t,
                    lr,
                    betas,
                    eps,
                    coupled_decay: coupled,
                    decoupled_factor: decoupled.map(|wd: f64| 1.0 - lr * wd),
                };
                assert!(
                    rule.apply(&theta_a, &grad, &mut state_a)?,
                    "f32 CPU takes the fast path"
                );
                theta_b = match decoupled {
                    Some(wd) => {
                        let decayed = (&theta_b * (1.0 - lr * wd))?;
                        adam_update(&decayed, &grad, &mut state_b, t, lr, betas, eps)?
                    }
                    None => {
                        let g = if coupled != 0.0 {
                            (&grad + (&theta_b * coupled)?)?
                        } else {
                            grad.clone()
                        };
                        adam_update(&theta_b, &g, &mut state_b, t, lr, betas, eps)?
                    }
                };
                let (a, b) = (theta_a.to_vec1::<f32>()?, theta_b.to_vec1::<f32>()?);
                let differing = a
                    .iter()
                    .zip(&b)
                    .filter(|(x, y)| x.to_bits() != y.to_bits())
                    .count();
                assert_eq!(
                    differing, 0,
                    "step {t}, decay {coupled}/{decoupled:?}: {differing} values differ"
                );
                for slot in ["exp_avg", "exp_avg_sq"] {
                    let (a, b) = (
                        state_a[slot].to_vec1::<f32>()?,
                        state_b[slot].to_vec1::<f32>()?,
                    );
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{slot} differs"
                    );
                }
                assert!(
                    a.iter().zip(values(n, 1)).any(|(x, y)| *x != y),
                    "the update changed nothing"
                );
            }
        }
        Ok(())
    }
}

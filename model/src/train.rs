//! The combined DAN + EAC training step and the evaluation (spec 2.5 and fixtures README 3).

use anyhow::Context;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::dan::{Dan, DanOutput};
use crate::loss::{self, AffinityCenters};
use crate::optim::Optimizer;

/// The lambdas of the total loss. A weight of 0 switches a term off: it is not part of the
/// graph (and for the consistency term, the flipped forward is not run at all).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossWeights {
    /// lambda1, affinity loss.
    pub affinity: f64,
    /// lambda2, partition loss.
    pub partition: f64,
    /// lambda3, flip attention consistency (thesis: 4; EAC's own default: 5).
    pub consistency: f64,
    /// Epochs over which lambda3 ramps up linearly (per step) to `consistency`, starting at
    /// consistency / (ramp steps) on the first step so the term never leaves the graph; 0 (the
    /// papers, and the default) applies the full weight from the first step. A ramp-up is the
    /// usual schedule of consistency losses trained from scratch (Laine & Aila 2017); DAN and EAC
    /// start from pretrained weights instead. Left out of the config when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub consistency_rampup_epochs: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            affinity: 1.0,
            partition: 1.0,
            consistency: 4.0,
            consistency_rampup_epochs: 0.0,
        }
    }
}

impl LossWeights {
    /// The weights of step `step` (0-based) of epoch `epoch`, `steps` steps per epoch.
    pub fn at_step(&self, epoch: usize, step: usize, steps: usize) -> LossWeights {
        let ramp = self.consistency_rampup_epochs * steps.max(1) as f64;
        let t = (epoch * steps.max(1) + step + 1) as f64;
        let mut w = *self;
        if ramp > 0.0 && t < ramp {
            w.consistency = self.consistency * t / ramp;
        }
        w
    }
}

/// The graph of one training step before backward: every loss term and the activations.
pub struct StepGraph {
    pub total: Tensor,
    pub ce: Tensor,
    /// Always computed (detached when its weight is 0, for logging).
    pub affinity: Tensor,
    pub partition: Tensor,
    /// None when lambda3 = 0.
    pub consistency: Option<Tensor>,
    pub original: DanOutput,
    /// Forward #2 on flip_w(x) and the two CAMs, when lambda3 != 0.
    pub flipped: Option<FlippedPass>,
}

pub struct FlippedPass {
    pub output: DanOutput,
    pub cam: Tensor,
    pub cam_flip: Tensor,
}

/// Loss values of one step, as plain numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepLosses {
    pub total: f64,
    pub ce: f64,
    pub affinity: f64,
    pub partition: f64,
    pub consistency: Option<f64>,
    /// Correct predictions (train-mode logits of forward #1) in this batch.
    pub correct: usize,
    pub batch: usize,
    /// Train-mode predictions of forward #1 (for memorisation under label noise).
    pub predictions: Vec<u32>,
}

/// Forward #1 on `x`, then (if lambda3 != 0) forward #2 on its mirror, and the losses, all on
/// forward #1 except L_c. `x` is the already-erased batch; `labels` are u32 [B].
pub fn step_graph(
    model: &Dan,
    centers: &AffinityCenters,
    x: &Tensor,
    labels: &Tensor,
    w: LossWeights,
) -> anyhow::Result<StepGraph> {
    let (b, ..) = x.dims4()?;
    anyhow::ensure!(
        b >= 2,
        "a training batch needs at least 2 samples (BatchNorm1d), got {b}"
    );
    let original = model.forward(x, true)?;
    let ce = loss::cross_entropy(&original.logits, labels)?;
    let mut total = ce.clone();
    let affinity = centers.loss(&original.feat, labels)?;
    let affinity = if w.affinity != 0.0 {
        total = (total + (&affinity * w.affinity)?)?;
        affinity
    } else {
        affinity.detach()
    };
    let partition = loss::partition_loss(&original.heads)?;
    let partition = if w.partition != 0.0 {
        total = (total + (&partition * w.partition)?)?;
        partition
    } else {
        partition.detach()
    };
    let (consistency, flipped) = if w.consistency != 0.0 {
        let output = model.forward(&loss::flip_w(x)?, true)?;
        let cam = model.cam(&original.feat)?;
        let cam_flip = model.cam(&output.feat)?;
        let lc = loss::flip_consistency_loss(&cam, &cam_flip)?;
        total = (total + (&lc * w.consistency)?)?;
        (
            Some(lc),
            Some(FlippedPass {
                output,
                cam,
                cam_flip,
            }),
        )
    } else {
        (None, None)
    };
    Ok(StepGraph {
        total,
        ce,
        affinity,
        partition,
        consistency,
        original,
        flipped,
    })
}

fn scalar(t: &Tensor) -> anyhow::Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl StepGraph {
    pub fn losses(&self, labels: &Tensor) -> anyhow::Result<StepLosses> {
        let predictions = loss::predictions(&self.original.logits)?.to_vec1::<u32>()?;
        let truth = labels.to_vec1::<u32>()?;
        let correct = predictions
            .iter()
            .zip(&truth)
            .filter(|(p, t)| p == t)
            .count();
        Ok(StepLosses {
            total: scalar(&self.total)?,
            ce: scalar(&self.ce)?,
            affinity: scalar(&self.affinity)?,
            partition: scalar(&self.partition)?,
            consistency: self.consistency.as_ref().map(scalar).transpose()?,
            correct,
            batch: labels.dim(0)?,
            predictions,
        })
    }
}

/// One full training step: both forwards, every loss term, backward, optimizer update.
pub fn train_step(
    model: &Dan,
    centers: &AffinityCenters,
    optimizer: &mut Optimizer,
    x: &Tensor,
    labels: &Tensor,
    w: LossWeights,
) -> anyhow::Result<StepLosses> {
    on_compute_pool(|| train_step_here(model, centers, optimizer, x, labels, w))
}

fn train_step_here(
    model: &Dan,
    centers: &AffinityCenters,
    optimizer: &mut Optimizer,
    x: &Tensor,
    labels: &Tensor,
    w: LossWeights,
) -> anyhow::Result<StepLosses> {
    use crate::ops::timing::{timed, Slot};
    let (graph, losses) = timed(Slot::StepForward, || -> anyhow::Result<_> {
        let graph = step_graph(model, centers, x, labels, w)?;
        let losses = graph.losses(labels)?;
        Ok((graph, losses))
    })?;
    if !losses.total.is_finite() {
        return Err(crate::trainer::classified(
            crate::trainer::FailureClass::Divergence,
            anyhow::anyhow!(
                "the training loss is not finite ({}): diverged",
                losses.total
            ),
        ));
    }
    let grads: GradStore =
        timed(Slot::StepBackward, || graph.total.backward()).context("backward pass")?;
    timed(Slot::StepOptimizer, || optimizer.step(&grads))?;
    Ok(losses)
}

/// Accuracy, balanced (mean per-class) accuracy and the confusion matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<u64>>,
    pub samples: u64,
}

/// Accumulates predictions batch by batch.
#[derive(Debug, Clone)]
pub struct Confusion {
    counts: Vec<Vec<u64>>,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Self {
            counts: vec![vec![0; classes]; classes],
        }
    }

    pub fn add(&mut self, truth: &[u32], predicted: &[u32]) -> anyhow::Result<()> {
        let n = self.counts.len();
        for (&t, &p) in truth.iter().zip(predicted) {
            anyhow::ensure!(
                (t as usize) < n && (p as usize) < n,
                "label {t} or prediction {p} outside 0..{n}"
            );
            self.counts[t as usize][p as usize] += 1;
        }
        Ok(())
    }

    /// Classes absent from the truth are left out of the balanced accuracy.
    pub fn report(&self) -> EvalReport {
        let samples: u64 = self.counts.iter().flatten().sum();
        let correct: u64 = (0..self.counts.len()).map(|i| self.counts[i][i]).sum();
        let recalls: Vec<f64> = self
            .counts
            .iter()
            .enumerate()
            .filter_map(|(i, row)| {
                let n: u64 = row.iter().sum();
                (n > 0).then(|| row[i] as f64 / n as f64)
            })
            .collect();
        EvalReport {
            accuracy: if samples > 0 {
                correct as f64 / samples as f64
            } else {
                0.0
            },
            balanced_accuracy: if recalls.is_empty() {
                0.0
            } else {
                recalls.iter().sum::<f64>() / recalls.len() as f64
            },
            confusion: self.counts.clone(),
            samples,
        }
    }
}

/// Evaluation-mode predictions for a batch, by the network's inference form (`Dan::inference`,
/// made once per evaluation).
pub fn predict(model: &crate::dan::DanInference, x: &Tensor) -> anyhow::Result<Vec<u32>> {
    on_compute_pool(|| {
        let out = model.forward(x)?;
        Ok(loss::predictions(&out.logits)?.to_vec1::<u32>()?)
    })
}

/// Evaluate over `(images, labels)` batches in eval mode (running BN statistics).
pub fn evaluate<I>(model: &Dan, batches: I) -> anyhow::Result<EvalReport>
where
    I: IntoIterator<Item = anyhow::Result<(Tensor, Vec<u32>)>>,
{
    let mut confusion = Confusion::new(model.config.classes);
    let folded = model.inference()?;
    for batch in batches {
        let (x, y) = batch?;
        confusion.add(&y, &predict(&folded, &x)?)?;
    }
    Ok(confusion.report())
}

/// Runs `work` on a thread of rayon's global pool and waits for it (inline when already on one).
///
/// `work` must not wait for anything that itself needs the pool (the data loader's channel):
/// with one pool thread that would deadlock. Every kernel splits its work with rayon. Called from a thread outside the pool, each of the
/// thousands of parallel regions in a training step is handed to the pool and the caller sleeps
/// until it is done (a futex wake and wait per op, costly for small tensors); called from a pool
/// thread, the caller works on its share itself and the other threads steal the rest.
pub fn on_compute_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Marks the work finished however it ends (a panic too: the scope waits for its keepers).
    struct Finish<'a>(&'a AtomicBool);
    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    /// Counts this thread's `work` in progress while it runs.
    struct Running;
    impl Running {
        fn enter() -> Running {
            RUNNING_WORK.with(|n| n.set(n.get() + 1));
            Running
        }
    }
    impl Drop for Running {
        fn drop(&mut self) {
            RUNNING_WORK.with(|n| n.set(n.get() - 1));
        }
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let done = &done;
        for _ in 1..rayon::current_num_threads() {
            s.spawn(move |_| keep_awake(done));
        }
        let _finish = Finish(done);
        let _running = Running::enter();
        work()
    })
}

thread_local! {
    /// `on_compute_pool` works in progress on this thread (running, or suspended beneath the
    /// pool work this thread took while waiting inside one).
    static RUNNING_WORK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs the pool's pending work on this thread until `done`, instead of letting the thread go
/// to sleep between parallel regions: waking a sleeping thread (a futex wake, in a VM an
/// inter-processor interrupt) took longer than many of a step's regions.
fn keep_awake(done: &std::sync::atomic::AtomicBool) {
    // Not on a thread with a work of its own beneath (this work's thread, which took this job
    // while waiting inside it, or another caller's): spinning here until `done` would keep that
    // work from finishing, and two such keepers over each other's work would never end.
    if RUNNING_WORK.with(|n| n.get()) > 0 {
        return;
    }
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
}

//! Batches: decode and augment in parallel (rayon) on a producer thread, handed to the training
//! step through a bounded channel so the next batches are ready when a step ends.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::augment::{eval_transform, sample_rng, train_transform, AugmentConfig};
use super::sets::DataSet;

/// One batch on the CPU: images [B,3,S,S] as a flat f32 buffer plus labels.
#[derive(Debug, Clone)]
pub struct Batch {
    pub indices: Vec<usize>,
    pub pixels: Vec<f32>,
    pub size: usize,
    pub labels: Vec<u32>,
    pub clean_labels: Vec<u32>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    pub fn images(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.pixels, (self.len(), 3, self.size, self.size), device)?
            .to_device(device)
    }

    pub fn label_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::new(self.labels.as_slice(), device)
    }
}

/// How samples are ordered in a training epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// A seeded permutation of the training set.
    Shuffle,
    /// DAN's AffectNet sampler (spec 5.3): len(set) draws with replacement, weight 1/count(label).
    ClassBalanced,
}

/// The sample order of one epoch, a function of (seed, epoch) only.
pub fn epoch_order(set: &DataSet, sampling: Sampling, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ 0x0D0E_0F00 ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    match sampling {
        Sampling::Shuffle => {
            use rand::seq::SliceRandom;
            let mut order: Vec<usize> = (0..set.len()).collect();
            order.shuffle(&mut rng);
            order
        }
        Sampling::ClassBalanced => {
            let counts = set.class_counts();
            let weights: Vec<f64> = set
                .samples
                .iter()
                .map(|s| 1.0 / counts[s.label as usize] as f64)
                .collect();
            let dist = rand_distr::weighted::WeightedIndex::new(&weights)
                .expect("non-empty set with positive weights");
            (0..set.len()).map(|_| rng.sample(&dist)).collect()
        }
    }
}

/// Build one batch: every sample augmented with its own (seed, epoch, index) generator.
pub fn make_batch(
    set: &DataSet,
    indices: &[usize],
    aug: Option<&AugmentConfig>,
    size: usize,
    seed: u64,
    epoch: usize,
) -> anyhow::Result<Batch> {
    let images: Vec<Vec<f32>> = indices
        .par_iter()
        .map(|&i| {
            let img = set.image(i)?;
            let out = match aug {
                Some(cfg) => train_transform(&img, cfg, &mut sample_rng(seed, epoch, i)).0,
                None => eval_transform(&img, size),
            };
            Ok(out.data)
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Batch {
        indices: indices.to_vec(),
        pixels: images.concat(),
        size,
        labels: indices.iter().map(|&i| set.samples[i].label).collect(),
        clean_labels: indices
            .iter()
            .map(|&i| set.samples[i].clean_label)
            .collect(),
    })
}

/// How one pass over a data set is cut into batches.
pub struct BatchPlan {
    /// Sample indices in the order they are used.
    pub order: Vec<usize>,
    pub batch: usize,
    /// The training augmentation; None for the eval transform.
    pub augment: Option<AugmentConfig>,
    /// Model input side.
    pub size: usize,
    /// Seed of the augmentation's draws (with the epoch and sample index).
    pub seed: u64,
    pub epoch: usize,
    /// Drop a final short batch (training: BatchNorm1d needs B >= 2).
    pub drop_last: bool,
    /// Batches built ahead of the consumer (at least 1).
    pub prefetch: usize,
}

/// The batches of `plan`, built on a background thread ahead of the consumer.
pub fn batches(set: Arc<DataSet>, plan: BatchPlan) -> Receiver<anyhow::Result<Batch>> {
    let (tx, rx) = sync_channel(plan.prefetch.max(1));
    std::thread::spawn(move || {
        for chunk in plan.order.chunks(plan.batch.max(1)) {
            if plan.drop_last && chunk.len() < plan.batch {
                break;
            }
            let b = make_batch(
                &set,
                chunk,
                plan.augment.as_ref(),
                plan.size,
                plan.seed,
                plan.epoch,
            );
            let failed = b.is_err();
            if tx.send(b).is_err() || failed {
                break; // receiver gone, or the error has been handed over
            }
        }
    });
    rx
}

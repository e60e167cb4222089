//! A tiny procedural image set for smoke runs and learning tests: each class is a pair of
//! mirrored blobs whose height, spacing and size depend on the class, on a noisy background.
//! Labels stay valid under a horizontal flip. (Test-only: the learning tests of `tests/training.rs`.)

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use fer_model::data::augment::{IMAGENET_MEAN, IMAGENET_STD};

/// `n` normalised images [n, 3, size, size] with labels cycling through `classes`,
/// deterministic in `seed`.
pub fn blobs(
    n: usize,
    classes: usize,
    size: usize,
    seed: u64,
    device: &Device,
) -> anyhow::Result<(Tensor, Vec<u32>)> {
    anyhow::ensure!(
        classes >= 1 && size >= 8,
        "blobs: need at least 1 class and 8 px"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pixels = Vec::with_capacity(n * 3 * size * size);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = (i % classes) as u32;
        labels.push(class);
        let t = (class as f32 + 0.5) / classes as f32;
        let cy = size as f32 * (0.2 + 0.6 * t) + rng.random_range(-1.0..1.0);
        let dx = size as f32 * (0.12 + 0.2 * (1.0 - t));
        let radius = size as f32 * (0.06 + 0.06 * ((class % 3) as f32));
        let cx = size as f32 / 2.0 + rng.random_range(-1.0..1.0);
        let tint: [f32; 3] = [
            rng.random_range(0.6..1.0),
            rng.random_range(0.6..1.0),
            rng.random_range(0.6..1.0),
        ];
        let mut img = vec![0f32; 3 * size * size];
        for y in 0..size {
            for x in 0..size {
                let (fy, fx) = (y as f32 + 0.5, x as f32 + 0.5);
                let d1 = ((fy - cy).powi(2) + (fx - (cx - dx)).powi(2)).sqrt();
                let d2 = ((fy - cy).powi(2) + (fx - (cx + dx)).powi(2)).sqrt();
                let blob = (-(d1.min(d2) / radius).powi(2)).exp();
                let noise: f32 = rng.random_range(0.0..0.25);
                for c in 0..3 {
                    let v = (0.15 + noise + 0.8 * blob * tint[c]).min(1.0);
                    img[(c * size + y) * size + x] = (v - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                }
            }
        }
        pixels.extend(img);
    }
    Ok((
        Tensor::from_vec(pixels, (n, 3, size, size), device)?,
        labels,
    ))
}

//! DAN's training pipeline at any input size (spec 5.1) and the evaluation transform.
//! Every random draw comes from a generator seeded by (run seed, epoch, sample index), so a
//! batch is identical whatever the thread count.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::image::Image;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Model input side (square).
    pub size: usize,
    pub flip_p: f64,
    /// Probability of the joint [rotation, padded crop] step.
    pub rotate_crop_p: f64,
    pub max_rotation_deg: f32,
    /// RandomCrop padding; DAN uses 32 at 224 (spec 7 item 16 scales it with the size).
    pub crop_padding: usize,
    pub erase_p: f64,
    pub erase_scale: (f64, f64),
    pub erase_ratio: (f64, f64),
}

impl AugmentConfig {
    /// DAN's RAF-DB pipeline at `size` px.
    pub fn dan(size: usize) -> Self {
        Self {
            size,
            flip_p: 0.5,
            rotate_crop_p: 0.2,
            max_rotation_deg: 20.0,
            crop_padding: (32 * size).div_ceil(224),
            erase_p: 0.5,
            erase_scale: (0.02, 0.25),
            erase_ratio: (0.3, 3.3),
        }
    }
}

/// The random choices made for one sample, recorded so tests can check the geometry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AugmentTrace {
    pub flipped: bool,
    pub rotation_deg: Option<f32>,
    pub crop_top_left: Option<(usize, usize)>,
    /// (top, left, height, width) of the erased rectangle.
    pub erased: Option<(usize, usize, usize, usize)>,
}

/// The generator of one sample's draws: a function of (seed, epoch, index) only.
pub fn sample_rng(seed: u64, epoch: usize, index: usize) -> ChaCha8Rng {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (epoch as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (index as u64).wrapping_mul(0x1656_67B1_9E37_79F9);
    z = (z ^ (z >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 33))
}

/// Normalise with ImageNet statistics, in place.
pub fn normalize(img: &mut Image) {
    let plane = img.width * img.height;
    for c in 0..3 {
        for v in &mut img.data[c * plane..(c + 1) * plane] {
            *v = (*v - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
}

/// Evaluation: resize + normalise.
pub fn eval_transform(img: &Image, size: usize) -> Image {
    let mut out = img.resize_pil(size, size);
    normalize(&mut out);
    out
}

/// Training: resize, flip, RandomApply([rotation, padded crop]), normalise, random erasing.
pub fn train_transform(
    img: &Image,
    cfg: &AugmentConfig,
    rng: &mut ChaCha8Rng,
) -> (Image, AugmentTrace) {
    let mut trace = AugmentTrace::default();
    let mut out = img.resize_pil(cfg.size, cfg.size);
    if rng.random_bool(cfg.flip_p) {
        out = out.flip_horizontal();
        trace.flipped = true;
    }
    if rng.random_bool(cfg.rotate_crop_p) {
        let deg = rng.random_range(-cfg.max_rotation_deg..=cfg.max_rotation_deg);
        out = out.rotate(deg);
        let top = rng.random_range(0..=2 * cfg.crop_padding);
        let left = rng.random_range(0..=2 * cfg.crop_padding);
        out = out.padded_crop(cfg.crop_padding, top, left);
        trace.rotation_deg = Some(deg);
        trace.crop_top_left = Some((top, left));
    }
    normalize(&mut out);
    if rng.random_bool(cfg.erase_p) {
        if let Some(rect) = erase_rect(out.height, out.width, cfg.erase_scale, cfg.erase_ratio, rng)
        {
            erase(&mut out, rect);
            trace.erased = Some(rect);
        }
    }
    (out, trace)
}

/// torchvision RandomErasing's rectangle: up to 10 tries of area ~ U(scale)·HW and
/// aspect = exp(U(log ratio)); accepted when it fits; top-left uniform.
pub fn erase_rect(
    h: usize,
    w: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut ChaCha8Rng,
) -> Option<(usize, usize, usize, usize)> {
    let area = (h * w) as f64;
    let (lo, hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(lo..=hi).exp();
        let eh = (target * aspect).sqrt().round() as usize;
        let ew = (target / aspect).sqrt().round() as usize;
        if eh == 0 || ew == 0 || eh >= h || ew >= w {
            continue;
        }
        let top = rng.random_range(0..=h - eh);
        let left = rng.random_range(0..=w - ew);
        return Some((top, left, eh, ew));
    }
    None
}

/// Fill a rectangle with 0 (the mean colour after normalisation).
pub fn erase(img: &mut Image, (top, left, eh, ew): (usize, usize, usize, usize)) {
    for c in 0..3 {
        for y in top..top + eh {
            for x in left..left + ew {
                img.set(c, y, x, 0.0);
            }
        }
    }
}

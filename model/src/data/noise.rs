//! Label noise (spec 5.4): seeded symmetric noise, and EAC's shipped noise files.

use std::path::Path;

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Symmetric noise at rate `rate`: each label flips with probability `rate` to a uniformly
/// drawn *other* class (EAC#18's generator, seeded). Returns the noisy labels.
pub fn symmetric(clean: &[u32], classes: usize, rate: f64, seed: u64) -> anyhow::Result<Vec<u32>> {
    if !(0.0..=1.0).contains(&rate) {
        bail!("noise rate must be in [0, 1], got {rate}");
    }
    if classes < 2 && rate > 0.0 {
        bail!("label noise needs at least 2 classes");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6E6F_6973_6521);
    clean
        .iter()
        .map(|&y| {
            if y as usize >= classes {
                bail!("label {y} outside 0..{classes}");
            }
            if rng.random_bool(rate) {
                // Uniform over the other classes: draw from classes-1 and skip the true one.
                let k = rng.random_range(0..classes as u32 - 1);
                Ok(if k >= y { k + 1 } else { k })
            } else {
                Ok(y)
            }
        })
        .collect()
}

/// EAC's `noise0X.txt`: RAF-DB's training lines (`name label`, labels 1..7) in the clean file's
/// order. Returns (name, 0-based label) per line; errors name the file and line.
pub fn read_label_file(path: &Path) -> anyhow::Result<Vec<(String, u32)>> {
    let text = super::read_text(path)
        .with_context(|| format!("{}: cannot read noise file", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(label), None) = (parts.next(), parts.next(), parts.next()) else {
            bail!(
                "{}:{}: expected `<image name> <label 1..7>`, got {line:?}",
                path.display(),
                i + 1
            );
        };
        let label: u32 = label
            .parse()
            .ok()
            .filter(|l| (1..=7).contains(l))
            .with_context(|| {
                format!(
                    "{}:{}: label {label:?} is not a class number 1..7",
                    path.display(),
                    i + 1
                )
            })?;
        out.push((name.to_string(), label - 1));
    }
    Ok(out)
}

/// Memorisation under noise: of the samples whose label was flipped, the share predicted as
/// the noisy label and the share predicted as the clean one.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Memorisation {
    pub flipped: usize,
    pub predicted_noisy: f64,
    pub predicted_clean: f64,
}

pub fn memorisation(clean: &[u32], noisy: &[u32], predicted: &[u32]) -> Memorisation {
    let mut flipped = 0;
    let (mut as_noisy, mut as_clean) = (0, 0);
    for ((&c, &n), &p) in clean.iter().zip(noisy).zip(predicted) {
        if c != n {
            flipped += 1;
            as_noisy += (p == n) as usize;
            as_clean += (p == c) as usize;
        }
    }
    let share = |k: usize| {
        if flipped == 0 {
            0.0
        } else {
            k as f64 / flipped as f64
        }
    };
    Memorisation {
        flipped,
        predicted_noisy: share(as_noisy),
        predicted_clean: share(as_clean),
    }
}

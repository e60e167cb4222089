//! Formula initialisation, version 1, of `fixtures/backbones/README.md` §1: every weight and input
//! of the backbone fixtures from (state-dict key, salt, flat index), in integer arithmetic, so
//! the values are bit-exact.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

pub fn fnv1a32(key: &str) -> u32 {
    key.bytes().fold(0x811C_9DC5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

/// The 21-bit integer k(K, i): the top bits of the (i+1)-th SplitMix64 output.
pub fn k(key_hash: u32, salt: u32, i: u64) -> u64 {
    let seed = ((key_hash as u64) << 32) | salt as u64;
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z >> 43
}

/// m * 2^-p, exact in f32 for |m| < 2^24.
fn exact(m: i64, p: i32) -> f32 {
    (m as f64 * 2f64.powi(-p)) as f32
}

/// (c, E) of the centred rule: the largest c * 2^-E <= 2 / sqrt(F) with c in 7..4.
pub fn centred_scale(fan_in: usize) -> (i64, i32) {
    for e in 0.. {
        for c in [7i64, 6, 5, 4] {
            if (c * c) as u128 * fan_in as u128 <= 4u128.pow(e as u32 + 1) {
                return (c, e);
            }
        }
    }
    unreachable!()
}

/// The FI kind of a key (README §1.2), given every key's shape.
pub fn values(
    key: &str,
    shape: &[usize],
    shapes: &HashMap<String, Vec<usize>>,
    salt: u32,
) -> Vec<f32> {
    let h = fnv1a32(key);
    let n: usize = shape.iter().product();
    let kk = |i: usize| k(h, salt, i as u64) as i64;
    let one_d = |k: &str| shapes.get(k).is_some_and(|s| s.len() == 1);
    let two20 = 1i64 << 20;
    let two23 = 1i64 << 23;
    if key.ends_with("running_mean") {
        (0..n).map(|i| exact(kk(i) - two20, 23)).collect()
    } else if key.ends_with("running_var") {
        (0..n).map(|i| exact(two23 + kk(i), 23)).collect()
    } else if key.ends_with("weight") && shape.len() == 1 {
        (0..n).map(|i| exact(two23 - two20 + kk(i), 23)).collect()
    } else if key.ends_with("bias") && one_d(&format!("{}weight", &key[..key.len() - 4])) {
        (0..n).map(|i| exact(kk(i) - two20, 23)).collect()
    } else if key.ends_with("bias") {
        (0..n).map(|i| exact(kk(i) - two20, 24)).collect()
    } else if key.ends_with("weight") && shape.len() >= 2 {
        let f: usize = shape[1..].iter().product();
        let (c, e) = centred_scale(f);
        (0..n)
            .map(|i| {
                let (o, j) = (i / f, i % f);
                let next = o * f + (j + 1) % f;
                exact(c * (kk(i) - kk(next)), e + 20)
            })
            .collect()
    } else {
        (0..n).map(|i| exact(kk(i) - two20, 21)).collect()
    }
}

/// The FI input: 2 * r("input", i).
pub fn input(shape: &[usize], salt: u32) -> Tensor {
    let h = fnv1a32("input");
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| exact(k(h, salt, i as u64) as i64 - (1 << 20), 19))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Every entry of a state (name -> shape) set by FI; counters (`num_batches_tracked`) are 0.
pub fn state(shapes: &[(String, Vec<usize>, DType)], salt: u32) -> HashMap<String, Tensor> {
    let by_name: HashMap<String, Vec<usize>> = shapes
        .iter()
        .map(|(k, s, _)| (k.clone(), s.clone()))
        .collect();
    shapes
        .iter()
        .map(|(key, shape, dtype)| {
            let t = if key.ends_with("num_batches_tracked") {
                Tensor::zeros(shape.as_slice(), DType::I64, &Device::Cpu).unwrap()
            } else {
                Tensor::from_vec(
                    values(key, shape, &by_name, salt),
                    shape.as_slice(),
                    &Device::Cpu,
                )
                .unwrap()
                .to_dtype(*dtype)
                .unwrap()
            };
            (key.clone(), t)
        })
        .collect()
}

//! PIL's bilinear resize of 8-bit images, exact to the last bit: the resize torchvision's
//! `transforms.Resize` applies to a PIL image at the start of DAN's and EAC's pipelines.
//!
//! Why our own: `fast_image_resize` 6.1 (Pillow-SIMD's 16-bit coefficients) differs from Pillow
//! by 1 in 8.9 % of the values of a 37 x 29 -> 224 x 224 upscale (measured against
//! `fixtures/pil/`); Pillow keeps 22-bit coefficients. The algorithm is Pillow's separable
//! convolution (`Resample.c`): a triangle filter whose support grows with the scale factor when
//! shrinking (antialiasing), coefficients normalised to sum 1 and rounded to 22-bit fixed
//! point, a horizontal pass to 8 bits, then a vertical pass to 8 bits.

/// Fixed-point bits of the coefficients (Pillow: 32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// Per output pixel: the first input index, and that many fixed-point weights.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` (bilinear, support 1) + `normalize_coeffs_8bpc`.
fn taps(in_len: usize, out_len: usize) -> Taps {
    let scale = in_len as f64 / out_len as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    let mut start = Vec::with_capacity(out_len);
    let mut weights = Vec::with_capacity(out_len);
    for o in 0..out_len {
        let center = (o as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero; negative values clamp to 0 anyway.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_len as i64) as usize;
        let w: Vec<f64> = (lo..hi)
            .map(|x| triangle((x as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = w.iter().sum();
        let fixed = w
            .iter()
            .map(|&v| {
                let v = if total != 0.0 { v / total } else { v };
                let scaled = v * (1u32 << PRECISION_BITS) as f64;
                // Round half away from zero, as Pillow's (int)(v +- 0.5).
                (if scaled < 0.0 {
                    scaled - 0.5
                } else {
                    scaled + 0.5
                }) as i32
            })
            .collect();
        start.push(lo);
        weights.push(fixed);
    }
    Taps { start, weights }
}

/// Pillow's `clip8`: the fixed-point sum (with its rounding half already added) to 0..=255.
#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One 8-bit plane `w` x `h` (row-major) resized to `out_w` x `out_h`.
pub fn resize_plane(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    assert_eq!(src.len(), w * h, "plane size");
    let half = 1i64 << (PRECISION_BITS - 1);
    let vert = taps(h, out_h);
    // Horizontal pass first (Pillow's order), over the rows the vertical pass reads.
    let (rows, first_row) = if out_w != w {
        let horiz = taps(w, out_w);
        let first = vert.start[0];
        let last = vert.start[out_h - 1] + vert.weights[out_h - 1].len();
        let mut tmp = vec![0u8; (last - first) * out_w];
        for (y, dst) in (first..last).zip(tmp.chunks_exact_mut(out_w)) {
            let row = &src[y * w..(y + 1) * w];
            for (x, d) in dst.iter_mut().enumerate() {
                let s = horiz.start[x];
                let acc = horiz.weights[x]
                    .iter()
                    .zip(&row[s..])
                    .fold(half, |a, (&k, &p)| a + k as i64 * p as i64);
                *d = clip8(acc);
            }
        }
        (std::borrow::Cow::Owned(tmp), first)
    } else {
        (std::borrow::Cow::Borrowed(src), 0)
    };
    if out_h == h {
        return rows.into_owned();
    }
    let mut out = vec![0u8; out_w * out_h];
    for (y, dst) in out.chunks_exact_mut(out_w).enumerate() {
        let s = vert.start[y] - first_row;
        for (x, d) in dst.iter_mut().enumerate() {
            let acc = vert.weights[y].iter().enumerate().fold(half, |a, (i, &k)| {
                a + k as i64 * rows[(s + i) * out_w + x] as i64
            });
            *d = clip8(acc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_identity_and_constants_are_kept() {
        for (i, o) in [(37, 224), (512, 224), (100, 100), (97, 45), (5, 1)] {
            let t = taps(i, o);
            for w in &t.weights {
                let s: i64 = w.iter().map(|&k| k as i64).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
        let flat = vec![77u8; 13 * 7];
        assert!(resize_plane(&flat, 13, 7, 29, 3).iter().all(|&v| v == 77));
        let ramp: Vec<u8> = (0..12).map(|v| v as u8 * 20).collect();
        assert_eq!(resize_plane(&ramp, 12, 1, 12, 1), ramp);
    }
}

//! Batch normalisation (optionally followed by ReLU) over axis 1 as one f32 CPU graph node.
//!
//! Composed from tensor ops, a train-mode BatchNorm2d is ~10 full passes forward and ~20 backward
//! (Candle's backward also zero-fills and adds a buffer per node); here it is two passes each
//! way: per-channel sums, then the element-wise map. Statistics are accumulated in f64.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::f32_contiguous;
use super::timing::{timed, Slot};

/// Which statistics normalise the batch.
#[derive(Debug, Clone)]
pub enum BatchStats {
    /// The batch's own mean and biased variance (train mode).
    Batch,
    /// Given per-channel mean and variance (eval mode: the running statistics).
    Fixed { mean: Vec<f32>, var: Vec<f32> },
}

/// Per-channel mean and biased variance of the last train-mode forward.
#[derive(Debug, Clone, Default)]
pub struct Moments {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

/// Per channel: mean, 1/sqrt(var + eps), and the moments the running statistics use.
type Saved = (Vec<f32>, Vec<f32>, Moments);

struct FusedBatchNorm {
    stats: BatchStats,
    eps: f64,
    relu: bool,
    /// Mean and 1/sqrt(var + eps) per channel, filled by the forward, read by the backward.
    saved: Arc<Mutex<Saved>>,
}

/// (batch, channels, values per channel and sample) of a [B, C, ...] input.
fn dims(shape: &Shape) -> Result<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        candle_core::bail!("batch_norm: input must be [B, C, ...], got {d:?}");
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

/// `sum f(v)` over a slice with 8 independent partial sums, so the loop vectorises.
#[inline]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    lane_sum_idx(v.len(), |i| f(v[i]))
}

/// `sum f(i)` for i in 0..len with 8 partial sums.
#[inline]
fn lane_sum_idx(len: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let full = len / 8 * 8;
    for i in (0..full).step_by(8) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += f(i + k);
        }
    }
    let tail: f32 = (full..len).map(&f).sum();
    acc.iter().sum::<f32>() + tail
}

simd_dispatch!(
/// (sum g, sum g * (x - mean)) over one plane, g masked by y > 0 when `relu`; 8 partial sums so
/// the loop vectorises.
fn grad_sums(x: &[f32], y: &[f32], g: &[f32], mean: f32, relu: bool) -> (f32, f32) = grad_sums_body);

#[inline(always)]
fn grad_sums_body(x: &[f32], y: &[f32], g: &[f32], mean: f32, relu: bool) -> (f32, f32) {
    let (mut s, mut sx) = ([0f32; 8], [0f32; 8]);
    let mut add = |k: usize, x: f32, y: f32, g: f32| {
        let g = if relu && y <= 0.0 { 0.0 } else { g };
        s[k] += g;
        sx[k] += g * (x - mean);
    };
    let full = x.len() / 8 * 8;
    for i in (0..full).step_by(8) {
        let (xc, yc, gc) = (&x[i..i + 8], &y[i..i + 8], &g[i..i + 8]);
        for k in 0..8 {
            add(k, xc[k], yc[k], gc[k]);
        }
    }
    for i in full..x.len() {
        add(0, x[i], y[i], g[i]);
    }
    (s.iter().sum(), sx.iter().sum())
}

// The element loops below are functions of their own, not inlined into rayon's closures: there
// the compiler cannot tell that the slices do not overlap and leaves the loops scalar.

simd_dispatch!(
/// `y = relu?(x * scale + shift)` over one plane.
fn affine_plane(y: &mut [MaybeUninit<f32>], x: &[f32], scale: f32, shift: f32, relu: bool) -> () = affine_plane_body);

#[inline(always)]
fn affine_plane_body(y: &mut [MaybeUninit<f32>], x: &[f32], scale: f32, shift: f32, relu: bool) {
    let x = &x[..y.len()];
    if relu {
        for i in 0..y.len() {
            y[i] = MaybeUninit::new((x[i] * scale + shift).max(0.0));
        }
    } else {
        for i in 0..y.len() {
            y[i] = MaybeUninit::new(x[i] * scale + shift);
        }
    }
}

simd_dispatch!(
/// `dx = k * (g' - mg - (x - mean) * inv_std * mgx)` over one plane, where g' is g masked by
/// y > 0 when `relu`; `c = [k, mg, mean, inv_std, mgx]`.
fn input_grad_plane(dx: &mut [MaybeUninit<f32>], x: &[f32], y: &[f32], g: &[f32], relu: bool, c: [f32; 5]) -> () = input_grad_plane_body);

#[inline(always)]
fn input_grad_plane_body(
    dx: &mut [MaybeUninit<f32>],
    x: &[f32],
    y: &[f32],
    g: &[f32],
    relu: bool,
    c: [f32; 5],
) {
    let [k, mg, m, is, mgx] = c;
    let n = dx.len();
    let (x, y, g) = (&x[..n], &y[..n], &g[..n]);
    if relu {
        for i in 0..n {
            let g = if y[i] <= 0.0 { 0.0 } else { g[i] };
            dx[i] = MaybeUninit::new(k * (g - mg - (x[i] - m) * is * mgx));
        }
    } else {
        for i in 0..n {
            dx[i] = MaybeUninit::new(k * (g[i] - mg - (x[i] - m) * is * mgx));
        }
    }
}

/// Planes smaller than this (the 4x4 and 2x2 maps of layer3-4 and the DAN heads at 64 px) take
/// the per-sample paths below: one call per plane of a few values cost more in calls and
/// horizontal sums than in arithmetic.
const SMALL_PLANE: usize = 32;

simd_dispatch!(
/// `grad_sums`' terms over one sample's [C * HW] values, kept per value: `s += g'`,
/// `sx += g' * (x - mean)` (`mean` per value).
fn grad_terms(s: &mut [f32], sx: &mut [f32], x: &[f32], y: &[f32], g: &[f32], mean: &[f32], relu: bool) -> () = grad_terms_body);

#[inline(always)]
fn grad_terms_body(
    s: &mut [f32],
    sx: &mut [f32],
    x: &[f32],
    y: &[f32],
    g: &[f32],
    mean: &[f32],
    relu: bool,
) {
    let n = s.len();
    let (sx, x, y, g, mean) = (&mut sx[..n], &x[..n], &y[..n], &g[..n], &mean[..n]);
    for i in 0..n {
        let gi = if relu && y[i] <= 0.0 { 0.0 } else { g[i] };
        s[i] += gi;
        sx[i] += gi * (x[i] - mean[i]);
    }
}

/// Sums over the batch for small planes: `accumulate(sums, sample)` adds one sample's [C * HW]
/// terms into K per-value f32 arrays. Each task takes up to 8 whole samples (contiguous, and f32
/// sums of at most 8 terms), then sums its values per channel in f64; the tasks' sums are added.
fn small_plane_sums<const K: usize>(
    (b, c, hw): (usize, usize, usize),
    accumulate: impl Fn(&mut [Vec<f32>; K], usize) + Sync,
) -> [Vec<f64>; K] {
    const SAMPLES: usize = 8;
    (0..b.div_ceil(SAMPLES))
        .into_par_iter()
        .map(|t| {
            let mut sums: [Vec<f32>; K] = std::array::from_fn(|_| vec![0f32; c * hw]);
            for bi in t * SAMPLES..b.min((t + 1) * SAMPLES) {
                accumulate(&mut sums, bi);
            }
            sums.map(|v| {
                v.chunks_exact(hw)
                    .map(|p| p.iter().map(|&v| v as f64).sum())
                    .collect::<Vec<f64>>()
            })
        })
        .reduce(
            || std::array::from_fn(|_| vec![0.0; c]),
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(b) {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
                a
            },
        )
}

/// The backward's per-channel (sum g', sum g' * (x - mean) * inv_std) for small planes.
fn small_plane_grad_sums(
    x: &[f32],
    y: &[f32],
    g: &[f32],
    (b, c, hw): (usize, usize, usize),
    mean: &[f32],
    inv_std: &[f32],
    relu: bool,
) -> (Vec<f64>, Vec<f64>) {
    let e = c * hw;
    let mean_e: Vec<f32> = (0..e).map(|i| mean[i / hw]).collect();
    let [s, sx] = small_plane_sums((b, c, hw), |[s, sx], bi| {
        let r = bi * e..(bi + 1) * e;
        grad_terms(s, sx, &x[r.clone()], &y[r.clone()], &g[r], &mean_e, relu);
    });
    let dw = sx
        .iter()
        .zip(inv_std)
        .map(|(v, &is)| v * is as f64)
        .collect();
    (s, dw)
}

simd_dispatch!(
/// `s += (x - mean)^2` per value when `mean` is given, else `s += x`, over one sample's values.
fn moment_terms(s: &mut [f32], x: &[f32], mean: Option<&[f32]>) -> () = moment_terms_body);

#[inline(always)]
fn moment_terms_body(s: &mut [f32], x: &[f32], mean: Option<&[f32]>) {
    let n = s.len();
    let x = &x[..n];
    match mean {
        Some(m) => {
            let m = &m[..n];
            for i in 0..n {
                s[i] += (x[i] - m[i]) * (x[i] - m[i]);
            }
        }
        None => {
            for i in 0..n {
                s[i] += x[i];
            }
        }
    }
}

/// The forward's per-channel (mean, biased variance) for small planes, two passes as for large
/// ones (mean, then centred squares).
fn small_plane_moments(x: &[f32], (b, c, hw): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
    let e = c * hw;
    let n = (b * hw) as f64;
    let sums = |mean: Option<&[f32]>| {
        let [s] = small_plane_sums((b, c, hw), |[s], bi| {
            moment_terms(s, &x[bi * e..(bi + 1) * e], mean)
        });
        s.into_iter().map(|s| s / n).collect::<Vec<f64>>()
    };
    let mean = sums(None);
    let mean_e: Vec<f32> = (0..e).map(|i| mean[i / hw] as f32).collect();
    let var = sums(Some(&mean_e));
    (mean, var)
}

simd_dispatch!(
/// `affine_plane` over one sample's [C * HW] values, scale and shift given per value: the same
/// operations, so the same results.
fn affine_values(y: &mut [MaybeUninit<f32>], x: &[f32], scale: &[f32], shift: &[f32], relu: bool) -> () = affine_values_body);

#[inline(always)]
fn affine_values_body(
    y: &mut [MaybeUninit<f32>],
    x: &[f32],
    scale: &[f32],
    shift: &[f32],
    relu: bool,
) {
    let n = y.len();
    let (x, scale, shift) = (&x[..n], &scale[..n], &shift[..n]);
    if relu {
        for i in 0..n {
            y[i] = MaybeUninit::new((x[i] * scale[i] + shift[i]).max(0.0));
        }
    } else {
        for i in 0..n {
            y[i] = MaybeUninit::new(x[i] * scale[i] + shift[i]);
        }
    }
}

simd_dispatch!(
/// `input_grad_plane` over one sample's [C * HW] values, its constants given per value
/// (`c[k][i]`): the same operations in the same order, so the same results.
fn input_grad_values(dx: &mut [MaybeUninit<f32>], x: &[f32], y: &[f32], g: &[f32], relu: bool, c: &[Vec<f32>; 5]) -> () = input_grad_values_body);

#[inline(always)]
fn input_grad_values_body(
    dx: &mut [MaybeUninit<f32>],
    x: &[f32],
    y: &[f32],
    g: &[f32],
    relu: bool,
    c: &[Vec<f32>; 5],
) {
    let n = dx.len();
    let (x, y, g) = (&x[..n], &y[..n], &g[..n]);
    let [k, mg, m, is, mgx] = c.each_ref().map(|v| &v[..n]);
    for i in 0..n {
        let gi = if relu && y[i] <= 0.0 { 0.0 } else { g[i] };
        dx[i] = MaybeUninit::new(k[i] * (gi - mg[i] - (x[i] - m[i]) * is[i] * mgx[i]));
    }
}

/// The planes (length `hw`) of channel `c` in a [B, C, HW] buffer.
fn planes(x: &[f32], b: usize, c: usize, ch: usize, hw: usize) -> impl Iterator<Item = &[f32]> {
    (0..b).map(move |bi| &x[(bi * c + ch) * hw..][..hw])
}

impl CustomOp3 for FusedBatchNorm {
    fn name(&self) -> &'static str {
        "batch_norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        timed(Slot::BatchNormForward, || {
            self.forward(xs, xl, ws, wl, bs, bl)
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        timed(Slot::BatchNormBackward, || {
            self.backward(x, w, bias, res, grad)
        })
    }
}

impl FusedBatchNorm {
    fn forward(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, hw) = dims(xl.shape())?;
        let x = f32_contiguous(xs, xl, "batch_norm input")?;
        let (w, bias) = (
            f32_contiguous(ws, wl, "batch_norm weight")?,
            f32_contiguous(bs, bl, "batch_norm bias")?,
        );
        if w.len() != c || bias.len() != c {
            candle_core::bail!(
                "batch_norm: {c} channels but weight {} / bias {}",
                w.len(),
                bias.len()
            );
        }
        let n = (b * hw) as f64;
        let (mean, var): (Vec<f64>, Vec<f64>) = match &self.stats {
            BatchStats::Batch if hw < SMALL_PLANE => small_plane_moments(x, (b, c, hw)),
            BatchStats::Batch => (0..c)
                .into_par_iter()
                .map(|ch| {
                    // Two passes over the channel (it fits in L2): mean, then centred squares.
                    let s: f64 = planes(x, b, c, ch, hw)
                        .map(|p| lane_sum(p, |v| v) as f64)
                        .sum();
                    let m = s / n;
                    let mf = m as f32;
                    let s2: f64 = planes(x, b, c, ch, hw)
                        .map(|p| lane_sum(p, |v| (v - mf) * (v - mf)) as f64)
                        .sum();
                    (m, s2 / n)
                })
                .unzip(),
            BatchStats::Fixed { mean, var } => (
                mean.iter().map(|&v| v as f64).collect(),
                var.iter().map(|&v| v as f64).collect(),
            ),
        };
        let inv_std: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (v + self.eps).sqrt()) as f32)
            .collect();
        let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        // Unfilled: the planes (or samples) below cover every value.
        let mut y = crate::ops::unfilled(x.len());
        let scale = |ch: usize| inv_std[ch] * w[ch];
        let shift = |ch: usize| bias[ch] - mean32[ch] * scale(ch);
        if hw < SMALL_PLANE {
            let scale: Vec<f32> = (0..c * hw).map(|i| scale(i / hw)).collect();
            let shift: Vec<f32> = (0..c * hw).map(|i| shift(i / hw)).collect();
            y.par_chunks_mut(c * hw)
                .zip(x.par_chunks(c * hw))
                .for_each(|(ys, xs)| affine_values(ys, xs, &scale, &shift, self.relu));
        } else {
            y.par_chunks_mut(hw)
                .zip(x.par_chunks(hw))
                .enumerate()
                .for_each(|(i, (yp, xp))| {
                    affine_plane(yp, xp, scale(i % c), shift(i % c), self.relu);
                });
        }
        // SAFETY: the chunks (whole samples or planes) cover y, each value written.
        let y = unsafe { crate::ops::assume_filled(y) };
        *self.saved.lock().expect("batch_norm stats") = (mean32, inv_std, Moments { mean, var });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, hw) = dims(x.shape())?;
        let grad = grad.contiguous()?;
        let (mean, inv_std, _) = self.saved.lock().expect("batch_norm stats").clone();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (ys, yl) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(ys), Storage::Cpu(gs)) =
            (&*xs, &*ws, &*ys, &*gs)
        else {
            candle_core::bail!("batch_norm backward: expected CPU tensors");
        };
        let (xv, wv) = (
            f32_contiguous(xs, xl, "batch_norm input")?,
            f32_contiguous(ws, wl, "batch_norm weight")?,
        );
        let (yv, gv) = (
            f32_contiguous(ys, yl, "batch_norm output")?,
            f32_contiguous(gs, gl, "batch_norm gradient")?,
        );
        if [yv.len(), gv.len()] != [xv.len(); 2] || xv.len() != b * c * hw {
            candle_core::bail!(
                "batch_norm backward: {} inputs, {} outputs, {} gradients",
                xv.len(),
                yv.len(),
                gv.len()
            );
        }
        let relu = self.relu;
        // Per channel: sum of g (bias gradient) and of g * (x - mean) (weight gradient / inv_std),
        // where g is the gradient reaching the affine output (ReLU passes it where y > 0).
        let (db, dw): (Vec<f64>, Vec<f64>) = if hw < SMALL_PLANE {
            small_plane_grad_sums(xv, yv, gv, (b, c, hw), &mean, &inv_std, relu)
        } else {
            (0..c)
                .into_par_iter()
                .map(|ch| {
                    let (mut s, mut sx) = (0f64, 0f64);
                    for bi in 0..b {
                        let start = (bi * c + ch) * hw;
                        let (xp, yp, gp) =
                            (&xv[start..][..hw], &yv[start..][..hw], &gv[start..][..hw]);
                        let (ps, psx) = grad_sums(xp, yp, gp, mean[ch], relu);
                        s += ps as f64;
                        sx += psx as f64;
                    }
                    (s, sx * inv_std[ch] as f64)
                })
                .unzip()
        };
        let n = (b * hw) as f32;
        let batch = matches!(self.stats, BatchStats::Batch);
        // Unfilled: the planes (or samples) below cover every value.
        let mut dx = crate::ops::unfilled(xv.len());
        // Per channel: [k, mg, mean, inv_std, mgx] of `input_grad_plane`.
        let constants = |ch: usize| -> [f32; 5] {
            let k = wv[ch] * inv_std[ch];
            // dx = w * inv_std * (g - mean(g) - xhat * mean(g * xhat)) in train mode; the
            // statistics are constants in eval mode, so there dx = w * inv_std * g.
            let (mg, mgx) = if batch {
                ((db[ch] as f32) / n, (dw[ch] as f32) / n)
            } else {
                (0.0, 0.0)
            };
            [k, mg, mean[ch], inv_std[ch], mgx]
        };
        if hw < SMALL_PLANE {
            let per_value: [Vec<f32>; 5] =
                std::array::from_fn(|q| (0..c * hw).map(|i| constants(i / hw)[q]).collect());
            dx.par_chunks_mut(c * hw)
                .zip(
                    xv.par_chunks(c * hw)
                        .zip(yv.par_chunks(c * hw).zip(gv.par_chunks(c * hw))),
                )
                .for_each(|(dxs, (xs, (ys, gs)))| {
                    input_grad_values(dxs, xs, ys, gs, relu, &per_value)
                });
        } else {
            dx.par_chunks_mut(hw)
                .zip(
                    xv.par_chunks(hw)
                        .zip(yv.par_chunks(hw).zip(gv.par_chunks(hw))),
                )
                .enumerate()
                .for_each(|(p, (dxp, (xp, (yp, gp))))| {
                    input_grad_plane(dxp, xp, yp, gp, relu, constants(p % c));
                });
        }
        // SAFETY: the chunks (whole samples or planes) cover dx, each value written.
        let dx = unsafe { crate::ops::assume_filled(dx) };
        let dev = x.device();
        let to32 = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(to32(dw), c, dev)?),
            Some(Tensor::from_vec(to32(db), c, dev)?),
        ))
    }
}

/// `relu?(batch_norm(x))` for a contiguous f32 CPU input [B, C, ...], differentiable in x,
/// weight and bias. Returns the output and, with `BatchStats::Batch`, the batch's moments (for
/// the running statistics).
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: BatchStats,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Option<Moments>)> {
    let batch = matches!(stats, BatchStats::Batch);
    let saved = Arc::new(Mutex::new(Default::default()));
    let op = FusedBatchNorm {
        stats,
        eps,
        relu,
        saved: saved.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let moments = batch.then(|| saved.lock().expect("batch_norm stats").2.clone());
    Ok((y, moments))
}

//! Max pooling with padding and a correct gradient.
//!
//! Candle's `max_pool2d` backward scales the gradient by 1/k^2 and refuses kernel != stride, and
//! it has no padding. This op follows PyTorch: padded cells never win, ties go to the first
//! maximum in row-major window order, and the backward routes each output gradient to that
//! single winner.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, split_even_odd};

#[derive(Debug, Clone, Copy)]
struct PoolDims {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    k: usize,
    s: usize,
    p: usize,
}

impl PoolDims {
    /// Input positions `lo..hi` of window `o` along an axis of length `len`, clipped to the input
    /// (padding never wins); never empty, because the padding is at most half the kernel.
    #[inline]
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = o * self.s;
        (
            start.max(self.p) - self.p,
            (start + self.k).min(len + self.p) - self.p,
        )
    }
}

struct MaxPool(PoolDims);
struct MaxPoolBackward(PoolDims);

/// The running maximum after `v`, by PyTorch's rule: a strictly greater value replaces it (so
/// the first of equal values stays) and a NaN always does (NaN propagates). Written as a select
/// so that it compiles without branches: the comparisons are data-dependent and mispredict.
#[inline(always)]
fn running_max<T: Copy + PartialOrd>(best: T, v: T) -> T {
    #[allow(clippy::eq_op)]
    let take = v > best || v != v;
    if take {
        v
    } else {
        best
    }
}

/// The forward is separable: the maxima of each input row's windows, then of each column of
/// those. Both keep the earlier value on ties, so the result is the value of the first maximum
/// in row-major window order, as a direct scan of each window gives.
fn pool_fwd<T: Copy + PartialOrd + Default + Send + Sync>(x: &[T], d: &PoolDims) -> Vec<T> {
    let mut out = vec![T::default(); d.planes * d.oh * d.ow];
    out.par_chunks_mut(d.oh * d.ow).enumerate().for_each_init(
        || vec![T::default(); d.h * d.ow],
        |row_max, (p, dst)| {
            let plane = &x[p * d.h * d.w..][..d.h * d.w];
            for (row, maxima) in plane.chunks_exact(d.w).zip(row_max.chunks_exact_mut(d.ow)) {
                for (ox, m) in maxima.iter_mut().enumerate() {
                    let (xs, xe) = d.window(ox, d.w);
                    *m = row[xs + 1..xe]
                        .iter()
                        .fold(row[xs], |b, &v| running_max(b, v));
                }
            }
            for (oy, dst) in dst.chunks_exact_mut(d.ow).enumerate() {
                let (ys, ye) = d.window(oy, d.h);
                dst.copy_from_slice(&row_max[ys * d.ow..][..d.ow]);
                for iy in ys + 1..ye {
                    let below = &row_max[iy * d.ow..][..d.ow];
                    dst.iter_mut()
                        .zip(below)
                        .for_each(|(b, &v)| *b = running_max(*b, v));
                }
            }
        },
    );
    out
}

/// Index (within its plane) of the window cell that produced the forward's output `y`: the
/// first cell equal to it in row-major order (the first maximum), or for a NaN output the last
/// NaN (the rule of `running_max`).
#[inline]
fn winner<T: Copy + PartialOrd>(plane: &[T], d: &PoolDims, oy: usize, ox: usize, y: T) -> usize {
    let ((ys, ye), (xs, xe)) = (d.window(oy, d.h), d.window(ox, d.w));
    #[allow(clippy::eq_op)]
    let nan = y != y;
    let mut last_nan = ys * d.w + xs;
    for iy in ys..ye {
        for ix in xs..xe {
            let v = plane[iy * d.w + ix];
            if nan {
                #[allow(clippy::eq_op)]
                if v != v {
                    last_nan = iy * d.w + ix;
                }
            } else if v == y {
                return iy * d.w + ix;
            }
        }
    }
    last_nan
}

/// One kernel tap along the width as a contiguous run of a row's phases (`deinterleave`): the
/// window of output column `ox` in `lo..hi` reads input column `s * ox + shift`, which is
/// `phases[src + ox - lo]`. Outputs outside `lo..hi` have that tap in the padding.
#[derive(Debug, Clone, Copy)]
struct TapRun {
    src: usize,
    lo: usize,
    hi: usize,
    shift: isize,
}

impl PoolDims {
    /// Length of each phase of a row: ceil(w / s).
    fn phase_len(&self) -> usize {
        self.w.div_ceil(self.s)
    }

    /// The taps along the width as runs over the phases, in tap order (left to right).
    fn tap_runs(&self) -> Vec<TapRun> {
        let (s, plen) = (self.s as isize, self.phase_len() as isize);
        (0..self.k)
            .filter_map(|t| {
                let shift = t as isize - self.p as isize;
                let (q, r) = (shift.div_euclid(s), shift.rem_euclid(s));
                // Phase r holds columns r, r + s, ...: ceil((w - r) / s) of them.
                let len_r = (self.w as isize - r + s - 1).div_euclid(s).max(0);
                let lo = (-q).max(0);
                let hi = (self.ow as isize).min(len_r - q);
                (hi > lo).then(|| TapRun {
                    src: (r * plen + lo + q) as usize,
                    lo: lo as usize,
                    hi: hi as usize,
                    shift,
                })
            })
            .collect()
    }
}

simd_dispatch!(
/// Splits each row of `plane` (rows of `d.w`) into its `d.s` phases, so that a strided tap is a
/// contiguous run: `phases[(row * s + r) * len + j] = plane[row * w + s * j + r]`.
fn deinterleave(plane: &[f32], d: &PoolDims, phases: &mut [f32]) -> () = deinterleave_body);

#[inline(always)]
fn deinterleave_body(plane: &[f32], d: &PoolDims, phases: &mut [f32]) {
    let (s, plen) = (d.s, d.phase_len());
    for (row, ph) in plane
        .chunks_exact(d.w)
        .zip(phases.chunks_exact_mut(s * plen))
    {
        match s {
            1 => ph.copy_from_slice(row),
            2 => {
                let (even, odd) = ph.split_at_mut(plen);
                split_even_odd(row, even, odd);
            }
            _ => {
                for (j, col) in row.chunks(s).enumerate() {
                    for (r, &v) in col.iter().enumerate() {
                        ph[r * plen + j] = v;
                    }
                }
            }
        }
    }
}

simd_dispatch!(
/// The maxima of one input row's windows (`running_max` over the taps in order, from -inf, which
/// any value or NaN replaces as the first cell would).
fn row_maxima(phases: &[f32], runs: &[TapRun], out: &mut [f32]) -> () = row_maxima_body);

#[inline(always)]
fn row_maxima_body(phases: &[f32], runs: &[TapRun], out: &mut [f32]) {
    out.fill(f32::NEG_INFINITY);
    for run in runs {
        let src = &phases[run.src..][..run.hi - run.lo];
        for (m, &v) in out[run.lo..run.hi].iter_mut().zip(src) {
            *m = running_max(*m, v);
        }
    }
}

simd_dispatch!(
/// `dst = running_max(dst, src)` elementwise (the column pass).
fn max_into(dst: &mut [f32], src: &[f32]) -> () = max_into_body);

#[inline(always)]
fn max_into_body(dst: &mut [f32], src: &[f32]) {
    for (b, &v) in dst.iter_mut().zip(src) {
        *b = running_max(*b, v);
    }
}

/// `pool_fwd` for f32, vectorised: each row is split into its stride phases, so every tap of
/// the row pass is one contiguous run. Bit-identical to `pool_fwd`.
fn pool_fwd_f32(x: &[f32], d: &PoolDims) -> Vec<f32> {
    let runs = d.tap_runs();
    let plen = d.phase_len();
    let mut out = crate::ops::zeroed(d.planes * d.oh * d.ow);
    out.par_chunks_mut(d.oh * d.ow).enumerate().for_each_init(
        || (vec![0f32; d.h * d.s * plen], vec![0f32; d.h * d.ow]),
        |(phases, row_max), (p, dst)| {
            let plane = &x[p * d.h * d.w..][..d.h * d.w];
            deinterleave(plane, d, phases);
            for (ph, maxima) in phases
                .chunks_exact(d.s * plen)
                .zip(row_max.chunks_exact_mut(d.ow))
            {
                row_maxima(ph, &runs, maxima);
            }
            for (oy, dst) in dst.chunks_exact_mut(d.ow).enumerate() {
                let (ys, ye) = d.window(oy, d.h);
                dst.copy_from_slice(&row_max[ys * d.ow..][..d.ow]);
                for iy in ys + 1..ye {
                    max_into(dst, &row_max[iy * d.ow..][..d.ow]);
                }
            }
        },
    );
    out
}

simd_dispatch!(
/// One tap of one window row in the winner search, for a run of outputs: `cell` is the input
/// index (in its plane) of the first output's cell, `step` the distance between outputs' cells.
/// A non-NaN output takes the first cell equal to it (`found` marks it taken); a NaN output the
/// last NaN.
fn winner_step(v: &[f32], y: &[f32], idx: &mut [u32], found: &mut [u32], cell: u32, step: u32) -> () = winner_step_body);

#[inline(always)]
fn winner_step_body(
    v: &[f32],
    y: &[f32],
    idx: &mut [u32],
    found: &mut [u32],
    cell: u32,
    step: u32,
) {
    for (i, (((&v, &y), ix), f)) in v
        .iter()
        .zip(y)
        .zip(idx.iter_mut())
        .zip(found.iter_mut())
        .enumerate()
    {
        #[allow(clippy::eq_op)]
        let hit = if y != y { v != v } else { *f == 0 && v == y };
        *ix = if hit { cell + step * i as u32 } else { *ix };
        *f |= hit as u32;
    }
}

/// `pool_bwd` for f32: the winners of a row of windows are found together (`winner_step`, over
/// the taps in row-major window order), then each gradient is added to its winner in the same
/// order as `pool_bwd`, so the sums are bit-identical.
fn pool_bwd_f32(x: &[f32], y: &[f32], grad: &[f32], d: &PoolDims) -> Vec<f32> {
    let runs = d.tap_runs();
    let plen = d.phase_len();
    // The first cell of each window along the width: the winner when no cell is a NaN of a NaN
    // output (as in `winner`).
    let first: Vec<u32> = (0..d.ow).map(|ox| d.window(ox, d.w).0 as u32).collect();
    let mut out = crate::ops::zeroed(d.planes * d.h * d.w);
    out.par_chunks_mut(d.h * d.w).enumerate().for_each_init(
        || {
            (
                vec![0f32; d.h * d.s * plen],
                vec![0u32; d.ow],
                vec![0u32; d.ow],
            )
        },
        |(phases, idx, found), (p, dst)| {
            let plane = &x[p * d.h * d.w..][..d.h * d.w];
            deinterleave(plane, d, phases);
            let g = &grad[p * d.oh * d.ow..][..d.oh * d.ow];
            let y = &y[p * d.oh * d.ow..][..d.oh * d.ow];
            for ((oy, yr), gr) in y.chunks_exact(d.ow).enumerate().zip(g.chunks_exact(d.ow)) {
                let (ys, ye) = d.window(oy, d.h);
                for (ix, &xs) in idx.iter_mut().zip(&first) {
                    *ix = (ys * d.w) as u32 + xs;
                }
                found.fill(0);
                for iy in ys..ye {
                    let ph = &phases[iy * d.s * plen..][..d.s * plen];
                    for run in &runs {
                        let (lo, hi) = (run.lo, run.hi);
                        let cell = (iy * d.w) as isize + (d.s * lo) as isize + run.shift;
                        winner_step(
                            &ph[run.src..][..hi - lo],
                            &yr[lo..hi],
                            &mut idx[lo..hi],
                            &mut found[lo..hi],
                            cell as u32,
                            d.s as u32,
                        );
                    }
                }
                for (&i, &gv) in idx.iter().zip(gr) {
                    dst[i as usize] += gv;
                }
            }
        },
    );
    out
}

/// Routes each output's gradient to its window's winner; `y` is the forward's output.
fn pool_bwd<T>(x: &[T], y: &[T], grad: &[T], d: &PoolDims) -> Vec<T>
where
    T: Copy + PartialOrd + Default + Send + Sync + std::ops::AddAssign,
{
    let mut out = vec![T::default(); d.planes * d.h * d.w];
    out.par_chunks_mut(d.h * d.w)
        .enumerate()
        .for_each(|(p, dst)| {
            let plane = &x[p * d.h * d.w..][..d.h * d.w];
            let g = &grad[p * d.oh * d.ow..][..d.oh * d.ow];
            let y = &y[p * d.oh * d.ow..][..d.oh * d.ow];
            for oy in 0..d.oh {
                for ox in 0..d.ow {
                    let o = oy * d.ow + ox;
                    dst[winner(plane, d, oy, ox, y[o])] += g[o];
                }
            }
        });
    out
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool2d_padded"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let dims = l.dims();
        let shape = Shape::from((dims[0], dims[1], d.oh, d.ow));
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(pool_fwd_f32(contiguous(v, l, "max_pool2d")?, d)),
            CpuStorage::F64(v) => CpuStorage::F64(pool_fwd(contiguous(v, l, "max_pool2d")?, d)),
            other => candle_core::bail!("max_pool2d: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, shape))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad.contiguous()?,
            &MaxPoolBackward(self.0),
        )?))
    }
}

impl CustomOp3 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "max_pool2d_padded_backward"
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(g)) => {
                CpuStorage::F32(pool_bwd_f32(
                    contiguous(x, l1, "max_pool2d")?,
                    contiguous(y, l2, "max_pool2d")?,
                    contiguous(g, l3, "max_pool2d")?,
                    d,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(g)) => {
                CpuStorage::F64(pool_bwd(
                    contiguous(x, l1, "max_pool2d")?,
                    contiguous(y, l2, "max_pool2d")?,
                    contiguous(g, l3, "max_pool2d")?,
                    d,
                ))
            }
            _ => candle_core::bail!("max_pool2d backward: unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// PyTorch's output length of a pooling window along one axis: floor or ceil of
/// `(len + 2p - k) / s` plus one, where in ceil mode the last window must start inside the input
/// or its left padding (so it is never all padding).
pub fn pooled_len(len: usize, kernel: usize, stride: usize, padding: usize, ceil: bool) -> usize {
    let span = len + 2 * padding - kernel;
    let mut out = if ceil {
        span.div_ceil(stride)
    } else {
        span / stride
    } + 1;
    if ceil && (out - 1) * stride >= len + padding {
        out -= 1;
    }
    out
}

/// PyTorch's `max_pool2d(x, kernel, stride, padding)` (floor mode) on [B, C, H, W].
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    pool(x, kernel, stride, padding, false)
}

/// PyTorch's `max_pool2d(..., ceil_mode=True)`: the last window may hang over the input's end
/// (Caffe's pooling; the stem of EAC's ResNet-50).
pub fn max_pool2d_ceil(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    pool(x, kernel, stride, padding, true)
}

fn pool(x: &Tensor, kernel: usize, stride: usize, padding: usize, ceil: bool) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if 2 * padding > kernel {
        candle_core::bail!(
            "max_pool2d: padding {padding} must be at most half the kernel {kernel}"
        );
    }
    if h + 2 * padding < kernel || w + 2 * padding < kernel {
        candle_core::bail!(
            "max_pool2d: input {h}x{w} is smaller than the {kernel}x{kernel} window"
        );
    }
    // A window that hangs over the end is clipped to the input (`PoolDims::window`), which is
    // ceil mode's rule; it is never empty, since it starts inside the input or its padding.
    let d = PoolDims {
        planes: b * c,
        h,
        w,
        oh: pooled_len(h, kernel, stride, padding, ceil),
        ow: pooled_len(w, kernel, stride, padding, ceil),
        k: kernel,
        s: stride,
        p: padding,
    };
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(MaxPool(d))
    } else {
        max_pool2d_native(x, kernel, stride, padding, ceil)
    }
}

/// Max pooling from Candle's own tensor ops, for accelerators (it ran on a CPU copy before: a
/// [64, 64, 112, 112] map to the host and back at every step). The windows' maximum is found
/// on detached values; the output is the sum over the k x k taps of each tap's strided view of
/// the input times a mask of where that tap is its window's first maximum in row-major order
/// (PyTorch's and the CPU op's winner), so the gradient reaches that element alone, as on the
/// CPU. The input is shifted above zero for the comparisons, so zero padding loses to every
/// real value. Unlike the CPU op, a NaN in a window is not passed on (an accelerator run whose
/// activations hold a NaN has diverged; its loss shows it).
pub fn max_pool2d_native(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil: bool,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (k, s, p) = (kernel, stride, padding);
    let (oh, ow) = (pooled_len(h, k, s, p, ceil), pooled_len(w, k, s, p, ceil));
    // Tap (i, j) reads padded rows i, i + s, .. i + (oh - 1) s, taken as oh * s rows from i.
    let pad = |t: Tensor| -> Result<Tensor> {
        let t = t.pad_with_zeros(2, p, (k - 1 + oh * s).saturating_sub(p + h))?;
        t.pad_with_zeros(3, p, (k - 1 + ow * s).saturating_sub(p + w))
    };
    let view = |t: &Tensor, i: usize, j: usize| -> Result<Tensor> {
        let v = t.narrow(2, i, oh * s)?.narrow(3, j, ow * s)?;
        if s == 1 {
            return v.contiguous();
        }
        let (b, c, _, _) = v.dims4()?;
        v.contiguous()?
            .reshape((b, c, oh, s, ow, s))?
            .narrow(3, 0, 1)?
            .narrow(5, 0, 1)?
            .contiguous()?
            .reshape((b, c, oh, ow))
    };
    let detached = x.detach();
    let above = pad(detached.broadcast_sub(&(detached.min_all()? - 1.0)?)?)?;
    let taps: Vec<(usize, usize)> = (0..k).flat_map(|i| (0..k).map(move |j| (i, j))).collect();
    let views = taps
        .iter()
        .map(|&(i, j)| view(&above, i, j))
        .collect::<Result<Vec<_>>>()?;
    let mut most = views[0].clone();
    for v in &views[1..] {
        most = most.maximum(v)?;
    }
    let xp = pad(x.clone())?;
    let mut taken = most.zeros_like()?;
    let mut y: Option<Tensor> = None;
    for (&(i, j), v) in taps.iter().zip(&views) {
        // 1 where this tap holds the maximum and no earlier tap did.
        let first = (v.eq(&most)?.to_dtype(x.dtype())? * (1.0 - &taken)?)?;
        taken = (taken + &first)?;
        let term = (view(&xp, i, j)? * first)?;
        y = Some(match y {
            None => term,
            Some(y) => (y + term)?,
        });
    }
    Ok(y.expect("a window has at least one tap"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: scan each window in row-major order, keeping the first maximum, a NaN
    /// always replacing it.
    fn scan_argmax(plane: &[f32], d: &PoolDims, oy: usize, ox: usize) -> usize {
        let ((ys, ye), (xs, xe)) = (d.window(oy, d.h), d.window(ox, d.w));
        let mut best_idx = ys * d.w + xs;
        for iy in ys..ye {
            for ix in xs..xe {
                let (v, best) = (plane[iy * d.w + ix], plane[best_idx]);
                if v > best || v.is_nan() {
                    best_idx = iy * d.w + ix;
                }
            }
        }
        best_idx
    }

    #[test]
    fn separable_forward_and_winner_search_match_a_direct_window_scan() {
        // Few distinct values (ties everywhere), signed zeros and NaNs; odd and even sizes.
        let value = |i: usize| {
            let r = (i as u32).wrapping_mul(2654435761) >> 24; // 0..256, well mixed
            match r {
                0..=29 => f32::NAN,
                30..=99 => -1.0,
                100..=149 => 0.5,
                150..=199 => 0.0,
                _ => -0.0,
            }
        };
        for &(h, w, k, s, p, ceil) in &[
            (7, 8, 3, 2, 1, false),
            (8, 8, 3, 2, 1, false),
            (5, 3, 3, 2, 1, false),
            (9, 9, 3, 2, 0, false),
            (6, 7, 2, 2, 0, false),
            // Ceil mode: the last window hangs over the end (8 -> 4, 7 -> 3 at p0; 6 -> 4 at p1).
            (8, 7, 3, 2, 0, true),
            (6, 9, 3, 2, 1, true),
            // Stride 1 and 3, and the 112 px stem's 56 -> 28.
            (6, 5, 3, 1, 1, false),
            (10, 11, 3, 3, 1, false),
            (11, 10, 5, 3, 2, true),
            (56, 56, 3, 2, 1, false),
        ] {
            let d = PoolDims {
                planes: 3,
                h,
                w,
                oh: pooled_len(h, k, s, p, ceil),
                ow: pooled_len(w, k, s, p, ceil),
                k,
                s,
                p,
            };
            let x: Vec<f32> = (0..d.planes * h * w).map(value).collect();
            let g: Vec<f32> = (0..d.planes * d.oh * d.ow)
                .map(|i| i as f32 + 1.0)
                .collect();
            let y = pool_fwd(&x, &d);
            let dx = pool_bwd(&x, &y, &g, &d);
            // The vectorised f32 paths (the ones training uses) give the same bits.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&pool_fwd_f32(&x, &d)),
                bits(&y),
                "{h}x{w} k{k} s{s} p{p}: f32 forward"
            );
            assert_eq!(
                bits(&pool_bwd_f32(&x, &y, &g, &d)),
                bits(&dx),
                "{h}x{w} k{k} s{s} p{p}: f32 backward"
            );
            let mut want_dx = vec![0f32; x.len()];
            for pl in 0..d.planes {
                let plane = &x[pl * h * w..][..h * w];
                for oy in 0..d.oh {
                    for ox in 0..d.ow {
                        let o = pl * d.oh * d.ow + oy * d.ow + ox;
                        let idx = scan_argmax(plane, &d, oy, ox);
                        assert_eq!(
                            y[o].to_bits(),
                            plane[idx].to_bits(),
                            "{h}x{w} k{k} s{s} p{p}: output {o}"
                        );
                        want_dx[pl * h * w + idx] += g[o];
                    }
                }
            }
            assert_eq!(dx, want_dx, "{h}x{w} k{k} s{s} p{p}: gradient routing");
        }
    }

    #[test]
    fn output_lengths_follow_pytorch_in_floor_and_ceil_mode() {
        // (len, k, s, p, ceil) -> PyTorch's nn.MaxPool2d output length.
        for &(len, k, s, p, ceil, want) in &[
            (112, 3, 2, 1, false, 56),
            (112, 3, 2, 0, true, 56),
            (112, 3, 2, 0, false, 55),
            (50, 3, 2, 0, true, 25),
            (50, 3, 2, 0, false, 24),
            (8, 3, 2, 0, true, 4),
            (7, 3, 2, 1, true, 4),
            (6, 3, 2, 1, true, 4),
            // The last window would start in the right padding only: dropped.
            (5, 2, 2, 1, true, 3),
        ] {
            assert_eq!(
                pooled_len(len, k, s, p, ceil),
                want,
                "len {len} k{k} s{s} p{p} ceil {ceil}"
            );
        }
    }
}

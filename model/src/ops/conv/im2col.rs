//! The column matrix of a convolution's input (im2col) and its adjoint (col2im): the f64
//! reference path as custom ops, and the scatter of the strided f32 input gradient.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::Dims;
use crate::ops::contiguous;

/// `[B, C, H, W]` -> `[C*kh*kw, B*OH*OW]`, row `(c*kh + i)*kw + j`, column `(b*OH + oy)*OW + ox`.
pub(super) struct Im2Col(pub(super) Dims);
/// The adjoint of `Im2Col`: scatter-add `[C*kh*kw, B*OH*OW]` back into `[B, C, H, W]`.
pub(super) struct Col2Im(pub(super) Dims);

/// Output positions `lo..hi` along an axis whose tap `tap` lands inside the input (not padding).
#[inline]
pub(super) fn valid_range(
    out_len: usize,
    stride: usize,
    tap: usize,
    pad: usize,
    in_len: usize,
) -> (usize, usize) {
    let lo = pad.saturating_sub(tap).div_ceil(stride).min(out_len);
    let hi = if in_len + pad > tap {
        ((in_len + pad - tap - 1) / stride + 1).min(out_len)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// `out = cols[r, n0..n0 + out.len()]` of the column matrix of `x`, written in full (zeros in the
/// padding), so `out` may hold stale values.
pub(super) fn cols_row<T: Copy + Default>(x: &[T], d: &Dims, r: usize, n0: usize, out: &mut [T]) {
    let (kh, kw) = d.g.kernel;
    let (sh, sw) = d.g.stride;
    let (ph, pw) = d.g.padding;
    let (c, i, j) = (r / (kh * kw), (r / kw) % kh, r % kw);
    let (lo, hi) = valid_range(d.ow, sw, j, pw, d.w);
    let zero = |v: &mut [T]| v.iter_mut().for_each(|v| *v = T::default());
    d.for_each_row_run(n0, out.len(), |done, b, oy, ox0, run| {
        let dst = &mut out[done..done + run];
        if let Some(iy) = Dims::src(oy, sh, i, ph, d.h) {
            let src_row = &x[((b * d.c + c) * d.h + iy) * d.w..][..d.w];
            // Columns a..z of this run read the input; the rest are padding.
            let a = lo.clamp(ox0, ox0 + run);
            let z = hi.clamp(a, ox0 + run);
            zero(&mut dst[..a - ox0]);
            zero(&mut dst[z - ox0..]);
            if a < z {
                let first = a * sw + j - pw;
                let dst = &mut dst[a - ox0..z - ox0];
                if sw == 1 {
                    dst.copy_from_slice(&src_row[first..first + (z - a)]);
                } else {
                    for (k, v) in dst.iter_mut().enumerate() {
                        *v = src_row[first + k * sw];
                    }
                }
            }
        } else {
            zero(dst);
        }
    });
}

/// The whole column matrix `[C*kh*kw, B*OH*OW]` into `out` (every element written).
pub(super) fn im2col_into<T: Copy + Default + Send + Sync>(x: &[T], d: &Dims, out: &mut [T]) {
    let n = d.cols();
    out[..d.rows() * n]
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(row, dst)| cols_row(x, d, row, 0, dst));
}

pub(super) fn im2col_slice<T: Copy + Default + Send + Sync>(x: &[T], d: &Dims) -> Vec<T> {
    let mut out = vec![T::default(); d.rows() * d.cols()];
    im2col_into(x, d, &mut out);
    out
}

pub(super) fn col2im_slice<T>(cols: &[T], d: &Dims) -> Vec<T>
where
    T: Copy + Default + Send + Sync + std::ops::AddAssign,
{
    let (kh, kw) = d.g.kernel;
    let (sh, sw) = d.g.stride;
    let (ph, pw) = d.g.padding;
    let n = d.cols();
    let mut out = crate::ops::zeroed(d.b * d.c * d.h * d.w);
    out.par_chunks_mut(d.h * d.w)
        .enumerate()
        .for_each(|(plane_idx, plane)| {
            let (b, c) = (plane_idx / d.c, plane_idx % d.c);
            for i in 0..kh {
                for j in 0..kw {
                    let (lo, hi) = valid_range(d.ow, sw, j, pw, d.w);
                    if lo >= hi {
                        continue;
                    }
                    let first = lo * sw + j - pw;
                    let row = &cols[((c * kh + i) * kw + j) * n..][..n];
                    for oy in 0..d.oh {
                        let Some(iy) = Dims::src(oy, sh, i, ph, d.h) else {
                            continue;
                        };
                        let src = &row[(b * d.oh + oy) * d.ow..][lo..hi];
                        let dst_row = &mut plane[iy * d.w..][..d.w];
                        if sw == 1 {
                            let dst = &mut dst_row[first..first + (hi - lo)];
                            dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v);
                        } else {
                            for (k, &v) in src.iter().enumerate() {
                                dst_row[first + k * sw] += v;
                            }
                        }
                    }
                }
            }
        });
    out
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let shape = Shape::from((d.rows(), d.cols()));
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(im2col_slice(contiguous(v, l, "im2col")?, d)),
            CpuStorage::F64(v) => CpuStorage::F64(im2col_slice(contiguous(v, l, "im2col")?, d)),
            other => candle_core::bail!("im2col: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let shape = Shape::from((d.b, d.c, d.h, d.w));
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(col2im_slice(contiguous(v, l, "col2im")?, d)),
            CpuStorage::F64(v) => CpuStorage::F64(col2im_slice(contiguous(v, l, "col2im")?, d)),
            other => candle_core::bail!("col2im: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

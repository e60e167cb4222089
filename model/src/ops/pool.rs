//! Max pooling with padding and a correct gradient.
//!
//! Candle's `max_pool2d` backward scales the gradient by 1/k^2 and refuses kernel != stride, and
//! it has no padding. This op follows PyTorch: padded cells never win, ties go to the first
//! maximum in row-major window order, and the backward routes each output gradient to that
//! single winner.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous;

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
    /// Index (within its plane) of the first maximum of output cell (oy, ox).
    #[inline]
    fn argmax<T: Copy + PartialOrd>(&self, plane: &[T], oy: usize, ox: usize) -> usize {
        // The window clipped to the input (padding never wins); it holds at least one element
        // because the padding is at most half the kernel.
        let (y0, x0) = (oy * self.s, ox * self.s);
        let (ys, ye) = (
            y0.max(self.p) - self.p,
            (y0 + self.k).min(self.h + self.p) - self.p,
        );
        let (xs, xe) = (
            x0.max(self.p) - self.p,
            (x0 + self.k).min(self.w + self.p) - self.p,
        );
        let mut best_idx = ys * self.w + xs;
        let mut best = plane[best_idx];
        for iy in ys..ye {
            let row = &plane[iy * self.w..][..xe];
            for (ix, &v) in row.iter().enumerate().skip(xs) {
                // The first maximum in scan order; a NaN wins and stays (PyTorch propagates it).
                #[allow(clippy::eq_op)]
                let is_nan = v != v;
                if v > best || is_nan {
                    best = v;
                    best_idx = iy * self.w + ix;
                }
            }
        }
        best_idx
    }
}

struct MaxPool(PoolDims);
struct MaxPoolBackward(PoolDims);

fn pool_fwd<T: Copy + PartialOrd + Default + Send + Sync>(x: &[T], d: &PoolDims) -> Vec<T> {
    let mut out = vec![T::default(); d.planes * d.oh * d.ow];
    out.par_chunks_mut(d.oh * d.ow)
        .enumerate()
        .for_each(|(p, dst)| {
            let plane = &x[p * d.h * d.w..][..d.h * d.w];
            for oy in 0..d.oh {
                for ox in 0..d.ow {
                    dst[oy * d.ow + ox] = plane[d.argmax(plane, oy, ox)];
                }
            }
        });
    out
}

fn pool_bwd<T>(x: &[T], grad: &[T], d: &PoolDims) -> Vec<T>
where
    T: Copy + PartialOrd + Default + Send + Sync + std::ops::AddAssign,
{
    let mut out = vec![T::default(); d.planes * d.h * d.w];
    out.par_chunks_mut(d.h * d.w)
        .enumerate()
        .for_each(|(p, dst)| {
            let plane = &x[p * d.h * d.w..][..d.h * d.w];
            let g = &grad[p * d.oh * d.ow..][..d.oh * d.ow];
            for oy in 0..d.oh {
                for ox in 0..d.ow {
                    dst[d.argmax(plane, oy, ox)] += g[oy * d.ow + ox];
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
            CpuStorage::F32(v) => CpuStorage::F32(pool_fwd(contiguous(v, l, "max_pool2d")?, d)),
            CpuStorage::F64(v) => CpuStorage::F64(pool_fwd(contiguous(v, l, "max_pool2d")?, d)),
            other => candle_core::bail!("max_pool2d: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &MaxPoolBackward(self.0),
        )?))
    }
}

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "max_pool2d_padded_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(pool_bwd(
                contiguous(x, l1, "max_pool2d")?,
                contiguous(g, l2, "max_pool2d")?,
                d,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(pool_bwd(
                contiguous(x, l1, "max_pool2d")?,
                contiguous(g, l2, "max_pool2d")?,
                d,
            )),
            _ => candle_core::bail!("max_pool2d backward: unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// PyTorch's `max_pool2d(x, kernel, stride, padding)` (floor mode) on [B, C, H, W].
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
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
    let d = PoolDims {
        planes: b * c,
        h,
        w,
        oh: (h + 2 * padding - kernel) / stride + 1,
        ow: (w + 2 * padding - kernel) / stride + 1,
        k: kernel,
        s: stride,
        p: padding,
    };
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(MaxPool(d))
    } else {
        // Accelerators: pool on the CPU copy and bring the result back; `to_device` is
        // differentiable, so the gradient is the same exact one.
        let cpu = x.to_device(&candle_core::Device::Cpu)?;
        cpu.contiguous()?
            .apply_op1(MaxPool(d))?
            .to_device(x.device())
    }
}

//! `relu(a + b)` as one f32 CPU graph node: the residual join of a ResNet block (one pass
//! forward, one backward, instead of an add and a ReLU node with their temporaries).

use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::f32_contiguous;
use super::timing::{timed, Slot};

/// `relu(a + b)` as one node: the residual join of a ResNet block.
struct AddRelu;

impl candle_core::CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add_relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        timed(Slot::AddRelu, || add_relu_fwd(s1, l1, s2, l2))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        timed(Slot::AddRelu, || add_relu_bwd(a, b, res, grad))
    }
}

fn add_relu_fwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    {
        let (a, b) = (
            f32_contiguous(s1, l1, "add_relu input")?,
            f32_contiguous(s2, l2, "add_relu input")?,
        );
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "add_relu: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let mut y = crate::ops::unfilled(a.len());
        y.par_chunks_mut(4096)
            .zip(a.par_chunks(4096).zip(b.par_chunks(4096)))
            .for_each(|(y, (a, b))| add_relu_chunk(y, a, b));
        // SAFETY: the chunks cover y (a and b are as long), each value written.
        let y = unsafe { crate::ops::assume_filled(y) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

fn add_relu_bwd(
    _a: &Tensor,
    _b: &Tensor,
    res: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    {
        let grad = grad.contiguous()?;
        let g = {
            let (ys, yl) = res.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (Storage::Cpu(ys), Storage::Cpu(gs)) = (&*ys, &*gs) else {
                candle_core::bail!("add_relu backward: expected CPU tensors");
            };
            let (y, g) = (
                f32_contiguous(ys, yl, "add_relu output")?,
                f32_contiguous(gs, gl, "add_relu gradient")?,
            );
            if y.len() != g.len() {
                candle_core::bail!(
                    "add_relu backward: {} outputs, {} gradients",
                    y.len(),
                    g.len()
                );
            }
            let mut out = crate::ops::unfilled(g.len());
            out.par_chunks_mut(4096)
                .zip(y.par_chunks(4096).zip(g.par_chunks(4096)))
                .for_each(|(o, (y, g))| relu_grad_chunk(o, y, g));
            // SAFETY: the chunks cover out (y is as long), each value written.
            let out = unsafe { crate::ops::assume_filled(out) };
            Tensor::from_vec(out, res.shape(), res.device())?
        };
        Ok((Some(g.clone()), Some(g)))
    }
}

/// `relu(a + b)`: one fused node for f32 on the CPU, Candle's ops otherwise.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == candle_core::DType::F32 && b.dtype() == a.dtype() {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}

/// `y = max(a + b, 0)`.
#[inline(never)]
fn add_relu_chunk(y: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]) {
    let (a, b) = (&a[..y.len()], &b[..y.len()]);
    for i in 0..y.len() {
        y[i] = MaybeUninit::new((a[i] + b[i]).max(0.0));
    }
}

/// `out = g where y > 0, else 0`.
#[inline(never)]
fn relu_grad_chunk(out: &mut [MaybeUninit<f32>], y: &[f32], g: &[f32]) {
    let (y, g) = (&y[..out.len()], &g[..out.len()]);
    for i in 0..out.len() {
        out[i] = MaybeUninit::new(if y[i] > 0.0 { g[i] } else { 0.0 });
    }
}

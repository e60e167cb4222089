//! Adam's and AdamW's update on f32 CPU tensors in one in-place pass over the parameter, its
//! gradient and both moments: the same f32 operations in the same order as the composed tensor
//! ops, so bit-identical to them (`optim.rs` tests), without their temporaries.
//!
//! One pass instead of three (first moment, second moment, parameter) matters because the update
//! is bound by memory traffic: it reads four values and writes three per parameter, against
//! nine reads and three writes over three passes (~20M parameters in a ResNet-18 + DAN step).
//! Candle lends one tensor's storage mutably per in-place op, so the two moments are lent by
//! nesting two in-place ops around the parameter's (`lend_mut`), each locked by its own tensor.

use std::cell::Cell;

use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use super::{f32_contiguous, f32_contiguous_mut};

/// The constants of one Adam / AdamW update, rounded to f32 exactly as Candle's affine ops round
/// them in the composed path.
pub(crate) struct AdamStep {
    /// The moments are absent (first step): m = (1 - b1) g', v = (1 - b2) g'^2.
    pub first: bool,
    pub b1: f32,
    pub keep1: f32,
    pub b2: f32,
    pub keep2: f32,
    /// Adam's L2 term: g' = g + wd * theta (0: none).
    pub wd: f32,
    pub inv_sqrt_bc2: f32,
    pub eps: f32,
    /// lr / (1 - b1^t).
    pub step: f32,
    /// AdamW's theta *= 1 - lr * wd before the update.
    pub decay: Option<f32>,
}

/// Updates `theta`, `m` and `v` in place from `grad` (all f32, contiguous, on the CPU, the same
/// length; the three updated tensors each with storage of their own).
pub(crate) fn adam_in_place(
    theta: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &AdamStep,
) -> Result<()> {
    let (gs, gl) = grad.storage_and_layout();
    let Storage::Cpu(gs) = &*gs else {
        candle_core::bail!("optimizer: expected a CPU gradient");
    };
    let g = f32_contiguous(gs, gl, "optimizer")?;
    lend_mut(m, |m| {
        lend_mut(v, |v| {
            lend_mut(theta, |theta| {
                if [m.len(), v.len(), g.len()] != [theta.len(); 3] {
                    candle_core::bail!(
                        "optimizer: parameter of {} values, gradient {}, moments {} and {}",
                        theta.len(),
                        g.len(),
                        m.len(),
                        v.len()
                    );
                }
                // One loop per case, each without branches, so that it vectorises.
                let pass = match (k.first, k.wd != 0.0, k.decay.is_some()) {
                    (false, false, false) => pass::<false, false, false>,
                    (false, false, true) => pass::<false, false, true>,
                    (false, true, false) => pass::<false, true, false>,
                    (false, true, true) => pass::<false, true, true>,
                    (true, false, false) => pass::<true, false, false>,
                    (true, false, true) => pass::<true, false, true>,
                    (true, true, false) => pass::<true, true, false>,
                    (true, true, true) => pass::<true, true, true>,
                };
                pass(k, theta, m, v, g);
                Ok(())
            })
        })
    })
}

/// Runs `f` on `t`'s f32 storage, lent mutably by a Candle in-place op (which holds `t`'s
/// storage lock meanwhile).
fn lend_mut<F: FnOnce(&mut [f32]) -> Result<()>>(t: &Tensor, f: F) -> Result<()> {
    struct Lend<F>(Cell<Option<F>>);
    impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for Lend<F> {
        fn name(&self) -> &'static str {
            "adam"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let f = self.0.take().expect("an in-place op runs once");
            f(f32_contiguous_mut(s, l, "optimizer")?)
        }
    }
    t.inplace_op1(&Lend(Cell::new(Some(f))))
}

/// The update of every element, in parallel chunks.
fn pass<const FIRST: bool, const L2: bool, const DECOUPLED: bool>(
    k: &AdamStep,
    theta: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
) {
    const CHUNK: usize = 16384;
    let (b1, keep1, b2, keep2, wd) = (k.b1, k.keep1, k.b2, k.keep2, k.wd);
    let (inv_sqrt_bc2, eps, step, f) = (k.inv_sqrt_bc2, k.eps, k.step, k.decay.unwrap_or(1.0));
    // The `+ 0.0`s and `* 1.0` are the composed path's affine ops (x * mul + add), kept so the
    // rounding is the same.
    let update = move |th: &mut f32, m: &mut f32, v: &mut f32, g: f32| {
        let g = if L2 { g + (*th * wd + 0.0) } else { g };
        let gm = g * keep1 + 0.0;
        *m = if FIRST { gm } else { (*m * b1 + 0.0) + gm };
        let gv = (g * g) * keep2 + 0.0;
        *v = if FIRST { gv } else { (*v * b2 + 0.0) + gv };
        let t = if DECOUPLED { *th * f + 0.0 } else { *th };
        let denom = (v.sqrt() * inv_sqrt_bc2 + 0.0) * 1.0 + eps;
        *th = t - ((*m / denom) * step + 0.0);
    };
    theta
        .par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|((th, m), (v, g))| chunk((th, m, v, g), &update));
}

/// One chunk of the parameter, its first and second moments, and its gradient.
type Chunk<'a> = (&'a mut [f32], &'a mut [f32], &'a mut [f32], &'a [f32]);

/// The loop of `pass` over one chunk. Not inlined: as a function of its own, its slice arguments
/// are known not to overlap, which lets LLVM vectorise the body (inlined into rayon's iterator
/// code it stayed scalar, sqrt and division included).
/// Compiled for AVX-512 or AVX2 where the CPU has it (16- or 8-wide square roots and divisions
/// instead of 4-wide; the same operations, so the same results).
#[inline(never)]
fn chunk<F: Fn(&mut f32, &mut f32, &mut f32, f32)>(c: Chunk, f: &F) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::isa::avx512() {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        unsafe fn avx512<F: Fn(&mut f32, &mut f32, &mut f32, f32)>(c: Chunk, f: &F) {
            chunk_body(c, f)
        }
        // SAFETY: the features are present (`isa::avx512` detected them).
        return unsafe { avx512(c, f) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::ops::isa::avx2() {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<F: Fn(&mut f32, &mut f32, &mut f32, f32)>(c: Chunk, f: &F) {
            chunk_body(c, f)
        }
        // SAFETY: AVX2 is present (`isa::avx2` detected it).
        return unsafe { avx2(c, f) };
    }
    chunk_body(c, f)
}

#[inline(always)]
fn chunk_body<F: Fn(&mut f32, &mut f32, &mut f32, f32)>((th, m, v, g): Chunk, f: &F) {
    let n = th.len();
    let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
    for i in 0..n {
        f(&mut th[i], &mut m[i], &mut v[i], g[i]);
    }
}

//! Adam's and AdamW's update on f32 CPU tensors as two in-place passes (moments, then the
//! parameter), each one vectorised loop: the same operations in the same order as the composed
//! tensor ops, so bit-identical to them (`optim.rs` tests), without their temporaries.

use rayon::prelude::*;

use super::{f32_contiguous, f32_contiguous_mut};

/// `f(&mut t1[i], t2[i], t3[i])` for every element, in parallel chunks: the body of both in-place
/// Adam passes.
fn zip3_in_place(
    s1: &mut candle_core::CpuStorage,
    l1: &candle_core::Layout,
    s2: &candle_core::CpuStorage,
    l2: &candle_core::Layout,
    s3: &candle_core::CpuStorage,
    l3: &candle_core::Layout,
    f: impl Fn(&mut f32, f32, f32) + Sync,
) -> candle_core::Result<()> {
    const CHUNK: usize = 16384;
    let (b, c) = (
        f32_contiguous(s2, l2, "optimizer")?,
        f32_contiguous(s3, l3, "optimizer")?,
    );
    let a = f32_contiguous_mut(s1, l1, "optimizer")?;
    if a.len() != b.len() || a.len() != c.len() {
        candle_core::bail!(
            "optimizer: tensors of {}, {} and {} values",
            a.len(),
            b.len(),
            c.len()
        );
    }
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK).zip(c.par_chunks(CHUNK)))
        .for_each(|(a, (b, c))| zip3_chunk(a, b, c, &f));
    Ok(())
}

/// The loop of `zip3_in_place` over one chunk. Not inlined: as a function of its own, its slice
/// arguments are known not to overlap, which lets LLVM vectorise the body (inlined into rayon's
/// iterator code it stayed scalar, sqrt and division included).
/// Compiled for AVX-512 or AVX2 where the CPU has it (16- or 8-wide square roots and divisions
/// instead of 4-wide; the same operations, so the same results).
#[inline(never)]
fn zip3_chunk<F: Fn(&mut f32, f32, f32)>(a: &mut [f32], b: &[f32], c: &[f32], f: &F) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::isa::avx512() {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        unsafe fn avx512<F: Fn(&mut f32, f32, f32)>(a: &mut [f32], b: &[f32], c: &[f32], f: &F) {
            zip3_body(a, b, c, f)
        }
        // SAFETY: the features are present (`isa::avx512` detected them).
        return unsafe { avx512(a, b, c, f) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::ops::isa::avx2() {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<F: Fn(&mut f32, f32, f32)>(a: &mut [f32], b: &[f32], c: &[f32], f: &F) {
            zip3_body(a, b, c, f)
        }
        // SAFETY: AVX2 is present (`isa::avx2` detected it).
        return unsafe { avx2(a, b, c, f) };
    }
    zip3_body(a, b, c, f)
}

#[inline(always)]
fn zip3_body<F: Fn(&mut f32, f32, f32)>(a: &mut [f32], b: &[f32], c: &[f32], f: &F) {
    let (b, c) = (&b[..a.len()], &c[..a.len()]);
    for i in 0..a.len() {
        f(&mut a[i], b[i], c[i]);
    }
}

/// `m = beta * m + (1 - beta) * g'` in place (m = (1 - beta) * g' on the first step), where g' is
/// the gradient plus Adam's L2 term, squared for the second moment.
pub(crate) struct MomentUpdate {
    pub first: bool,
    pub beta: f32,
    pub keep: f32,
    pub square: bool,
    pub wd: f32,
}

impl candle_core::InplaceOp3 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        // One loop per case, each without branches, so that it vectorises.
        let pass = match (self.first, self.square, self.wd != 0.0) {
            (false, false, false) => moment_pass::<false, false, false>,
            (false, false, true) => moment_pass::<false, false, true>,
            (false, true, false) => moment_pass::<false, true, false>,
            (false, true, true) => moment_pass::<false, true, true>,
            (true, false, false) => moment_pass::<true, false, false>,
            (true, false, true) => moment_pass::<true, false, true>,
            (true, true, false) => moment_pass::<true, true, false>,
            (true, true, true) => moment_pass::<true, true, true>,
        };
        pass(self, s1, l1, s2, l2, s3, l3)
    }
}

fn moment_pass<const FIRST: bool, const SQUARE: bool, const DECAY: bool>(
    op: &MomentUpdate,
    s1: &mut candle_core::CpuStorage,
    l1: &candle_core::Layout,
    s2: &candle_core::CpuStorage,
    l2: &candle_core::Layout,
    s3: &candle_core::CpuStorage,
    l3: &candle_core::Layout,
) -> candle_core::Result<()> {
    let (beta, keep, wd) = (op.beta, op.keep, op.wd);
    zip3_in_place(s1, l1, s2, l2, s3, l3, |m, g, th| {
        let g = if DECAY { g + (th * wd + 0.0) } else { g };
        let g = if SQUARE { g * g } else { g };
        let gm = g * keep + 0.0;
        *m = if FIRST { gm } else { (*m * beta + 0.0) + gm };
    })
}

/// `theta -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)` in place, after AdamW's decay.
pub(crate) struct ParamUpdate {
    pub inv_sqrt_bc2: f32,
    pub eps: f32,
    pub step: f32,
    pub decay: Option<f32>,
}

impl candle_core::InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adam-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (inv_sqrt_bc2, eps, step) = (self.inv_sqrt_bc2, self.eps, self.step);
        let update = move |theta: f32, m: f32, v: f32| {
            let denom = (v.sqrt() * inv_sqrt_bc2 + 0.0) * 1.0 + eps;
            theta - ((m / denom) * step + 0.0)
        };
        // One loop per case, each without branches, so that it vectorises.
        match self.decay {
            Some(f) => zip3_in_place(s1, l1, s2, l2, s3, l3, |th, m, v| {
                *th = update(*th * f + 0.0, m, v)
            }),
            None => zip3_in_place(s1, l1, s2, l2, s3, l3, |th, m, v| *th = update(*th, m, v)),
        }
    }
}

//! 2-D convolution as im2col + one GEMM, with a col2im backward.
//!
//! Candle's stock `conv2d` backward fails for stride-2 convs on inputs whose height and width
//! differ in parity (4x5 -> 2x3 in the fixtures), and computes input gradients with a slow direct
//! loop. Here `Im2Col` is a custom op whose backward is `Col2Im` (and vice versa), and the
//! multiply is Candle's matmul, so every gradient (input, weight, bias) comes from ops with a
//! correct backward. Padding is per axis, so 1x3 and 3x1 kernels need no manual padding.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};

use super::gemm::{
    sgemm, sgemm_with, AOperand, APanelSource, BOperand, CLayout, MatRef, PanelSource, KC, MR, NR,
};
use super::timing::{timed, Slot};
use super::{contiguous, f32_contiguous, give_scratch, take_scratch};
use rayon::prelude::*;

/// Geometry of one convolution: kernel, stride and zero padding per axis (height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl ConvGeometry {
    pub fn new(kernel: (usize, usize), stride: (usize, usize), padding: (usize, usize)) -> Self {
        Self {
            kernel,
            stride,
            padding,
        }
    }

    /// Output spatial size, floor((n + 2p - k) / s) + 1, or an error when the kernel does not fit.
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (kh, kw) = self.kernel;
        let (ph, pw) = self.padding;
        if h + 2 * ph < kh || w + 2 * pw < kw {
            candle_core::bail!(
                "conv2d: input {h}x{w} with padding {ph}x{pw} is smaller than the {kh}x{kw} kernel"
            );
        }
        Ok((
            (h + 2 * ph - kh) / self.stride.0 + 1,
            (w + 2 * pw - kw) / self.stride.1 + 1,
        ))
    }
}

/// Shape bookkeeping shared by im2col and col2im.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    g: ConvGeometry,
}

impl Dims {
    /// Rows of the column matrix: one per (channel, kernel tap).
    fn rows(&self) -> usize {
        self.c * self.g.kernel.0 * self.g.kernel.1
    }
    /// Columns of the column matrix: one per (sample, output pixel).
    fn cols(&self) -> usize {
        self.b * self.oh * self.ow
    }
    /// Splits columns `n0..n0 + len` of the column matrix into runs along one output row:
    /// `f(offset, b, oy, ox0, run)` for the run of `run` columns starting at column `ox0` of row
    /// `oy` of sample `b`, `offset` columns after n0.
    #[inline(always)]
    fn for_each_row_run(
        &self,
        n0: usize,
        len: usize,
        mut f: impl FnMut(usize, usize, usize, usize, usize),
    ) {
        let per_sample = self.oh * self.ow;
        let (mut b, rem) = (n0 / per_sample, n0 % per_sample);
        let (mut oy, mut ox0) = (rem / self.ow, rem % self.ow);
        let mut done = 0;
        while done < len {
            let run = (self.ow - ox0).min(len - done);
            f(done, b, oy, ox0, run);
            done += run;
            ox0 = 0;
            oy += 1;
            if oy == self.oh {
                oy = 0;
                b += 1;
            }
        }
    }
    /// Input index of output row `o` at tap `i` along an axis, or None when it falls in the padding.
    #[inline]
    fn src(o: usize, stride: usize, tap: usize, pad: usize, len: usize) -> Option<usize> {
        let pos = (o * stride + tap) as isize - pad as isize;
        (pos >= 0 && (pos as usize) < len).then_some(pos as usize)
    }
}

/// `[B, C, H, W]` -> `[C*kh*kw, B*OH*OW]`, row `(c*kh + i)*kw + j`, column `(b*OH + oy)*OW + ox`.
struct Im2Col(Dims);
/// The adjoint of `Im2Col`: scatter-add `[C*kh*kw, B*OH*OW]` back into `[B, C, H, W]`.
struct Col2Im(Dims);

/// Output positions `lo..hi` along an axis whose tap `tap` lands inside the input (not padding).
#[inline]
fn valid_range(
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
fn cols_row<T: Copy + Default>(x: &[T], d: &Dims, r: usize, n0: usize, out: &mut [T]) {
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
fn im2col_into<T: Copy + Default + Send + Sync>(x: &[T], d: &Dims, out: &mut [T]) {
    let n = d.cols();
    out[..d.rows() * n]
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(row, dst)| cols_row(x, d, row, 0, dst));
}

/// The column matrix of an f32 input, packed on demand straight into the GEMM's panel layout
/// (as B in the forward and the stride-1 input gradient, as B^T in the weight gradient).
///
/// The input is first copied into a zero-padded buffer, so every element of the column matrix is
/// `xp[pixel_base + tap_offset]` with no bounds or padding test: along a row of the column matrix
/// the pixels of one output row are consecutive (stride 1) or evenly spaced input positions. The
/// padded copy costs one pass over the input; the gathers it simplifies read it kh x kw times.
struct ColsOf {
    xp: Vec<f32>,
    d: Dims,
    /// Padded height and width.
    hp: usize,
    wp: usize,
    /// Offset of tap row r = (c, i, j) from a pixel's base: c*Hp*Wp + i*Wp + j.
    tap_offset: Vec<usize>,
}

/// Up to NR consecutive columns of the column matrix that read evenly spaced input positions,
/// up to the next segment's `col`: column `col + t` (counted from the first packed column) reads
/// `xp[base + t * sw + tap]`.
#[derive(Clone, Copy)]
struct Segment {
    col: usize,
    base: usize,
}

/// Each thread's scratch for the transposed packing: NR rows of up to KC + NR values.
const ROWS_T_STRIDE: usize = KC + NR;
thread_local! {
    static ROWS_T: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl ColsOf {
    fn new(x: &[f32], d: &Dims) -> Self {
        let (ph, pw) = d.g.padding;
        let (kh, kw) = d.g.kernel;
        let (hp, wp) = (d.h + 2 * ph, d.w + 2 * pw);
        let xp_len = d.b * d.c * hp * wp;
        // Packing copies whole NR-wide groups, which may read up to NR * sw values past a
        // segment's end: the slack keeps those reads inside the buffer (their values are
        // overwritten or unused).
        let mut xp = take_scratch(xp_len + NR * d.g.stride.1);
        timed(Slot::ConvLayoutCopies, || {
            xp[..xp_len]
                .par_chunks_mut(hp * wp)
                .zip(x.par_chunks(d.h * d.w))
                .for_each(|(dst, src)| {
                    dst[..ph * wp].fill(0.0);
                    dst[(ph + d.h) * wp..].fill(0.0);
                    for (y, src_row) in src.chunks_exact(d.w).enumerate() {
                        let row = &mut dst[(ph + y) * wp..][..wp];
                        row[..pw].fill(0.0);
                        row[pw..pw + d.w].copy_from_slice(src_row);
                        row[pw + d.w..].fill(0.0);
                    }
                })
        });
        let tap_offset = (0..d.rows())
            .map(|r| {
                let (c, i, j) = (r / (kh * kw), (r / kw) % kh, r % kw);
                (c * hp + i) * wp + j
            })
            .collect();
        ColsOf {
            xp,
            d: *d,
            hp,
            wp,
            tap_offset,
        }
    }

    /// Columns `n0..n0 + len` of the column matrix as segments that neither cross an output row
    /// nor (counting from n0) a multiple of NR.
    fn segments(&self, n0: usize, len: usize) -> Vec<Segment> {
        let d = &self.d;
        let (sh, sw) = d.g.stride;
        let plane = d.c * self.hp * self.wp;
        let mut segs = Vec::with_capacity(len / NR + len / d.ow.max(1) + 2);
        d.for_each_row_run(n0, len, |done, b, oy, ox0, run| {
            let (mut col, mut base, end) =
                (done, b * plane + oy * sh * self.wp + ox0 * sw, done + run);
            while col < end {
                let len = (NR - col % NR).min(end - col);
                segs.push(Segment { col, base });
                col += len;
                base += len * sw;
            }
        });
        segs
    }

    /// `dst[0..NR] = xp[base + tap + t * sw]` for t in 0..NR: a whole group even where the
    /// segment is shorter (the caller overwrites or ignores the excess).
    #[inline(always)]
    fn group(&self, at: usize, dst: &mut [f32]) {
        let sw = self.d.g.stride.1;
        let dst: &mut [f32; NR] = (&mut dst[..NR]).try_into().expect("NR values");
        if sw == 1 {
            *dst = self.xp[at..at + NR].try_into().expect("NR values");
        } else {
            let src = &self.xp[at..at + (NR - 1) * sw + 1];
            *dst = std::array::from_fn(|t| src[t * sw]);
        }
    }
}

impl Drop for ColsOf {
    fn drop(&mut self) {
        give_scratch(std::mem::take(&mut self.xp));
    }
}

impl PanelSource for ColsOf {
    fn pack(&self, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]) {
        pack_cols(self, j0, j1, pc, kc, strip)
    }
}

avx2_dispatch!(
/// B = the column matrix [K, N]: panel rows are taps, lanes are pixels. Each segment of a panel
/// is one NR-wide copy per tap; segments go in lane order, so the excess of one copy is
/// overwritten by the next (or by the next row, or lands in the strip's slack).
fn pack_cols(cols: &ColsOf, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]) -> () = pack_cols_body);

#[inline(always)]
fn pack_cols_body(cols: &ColsOf, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]) {
    let width = j1 - j0;
    let segs = cols.segments(j0, width);
    let mut first = 0;
    for (q, lanes) in (0..width)
        .step_by(NR)
        .map(|c| (c / NR, (width - c).min(NR)))
    {
        let count = segs[first..].iter().take_while(|s| s.col / NR == q).count();
        let panel_segs = &segs[first..first + count];
        first += count;
        let panel = &mut strip[q * NR * kc..][..NR * kc + NR];
        for (p, &tap) in cols.tap_offset[pc..pc + kc].iter().enumerate() {
            let row = &mut panel[p * NR..][..2 * NR];
            for s in panel_segs {
                cols.group(s.base + tap, &mut row[s.col % NR..]);
            }
            row[lanes..NR].fill(0.0);
        }
    }
}

/// The column matrix's transpose [N, K] as B: panel rows are pixels, lanes are taps.
struct ColsOfT<'a>(&'a ColsOf);

impl PanelSource for ColsOfT<'_> {
    fn pack(&self, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]) {
        ROWS_T.with(|block| {
            let mut block = block.borrow_mut();
            block.resize(NR * ROWS_T_STRIDE, 0.0);
            pack_cols_t(self.0, j0, j1, pc, kc, strip, &mut block)
        })
    }
}

avx2_dispatch!(
/// Each lane (tap) is gathered as a row over the depth's pixels into a scratch block of NR rows,
/// with one NR-wide copy per segment (in order, so each copy's excess is overwritten by the
/// next); the block is then transposed into the panel.
fn pack_cols_t(cols: &ColsOf, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32], block: &mut [f32]) -> () = pack_cols_t_body);

#[inline(always)]
fn pack_cols_t_body(
    cols: &ColsOf,
    j0: usize,
    j1: usize,
    pc: usize,
    kc: usize,
    strip: &mut [f32],
    block: &mut [f32],
) {
    let segs = cols.segments(pc, kc);
    for (q, panel) in strip[..(j1 - j0).div_ceil(NR) * NR * kc]
        .chunks_exact_mut(NR * kc)
        .enumerate()
    {
        for (lane, row) in block.chunks_exact_mut(ROWS_T_STRIDE).enumerate() {
            let r = j0 + q * NR + lane;
            if r < j1 {
                let tap = cols.tap_offset[r];
                for s in &segs {
                    cols.group(s.base + tap, &mut row[s.col..]);
                }
            } else {
                row[..kc].fill(0.0);
            }
        }
        transpose_block(block, kc, panel);
    }
}

/// `panel[p * NR + lane] = block[lane * ROWS_T_STRIDE + p]` for p < kc.
#[inline(always)]
fn transpose_block(block: &[f32], kc: usize, panel: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::isa::avx() {
        done = kc / 8 * 8;
        let (block, panel) = (&block[..NR * ROWS_T_STRIDE], &mut panel[..NR * kc]);
        for p0 in (0..done).step_by(8) {
            for l0 in [0, 8] {
                // SAFETY: AVX is present; rows l0..l0 + 8 of the block hold values p0..p0 + 8
                // (p0 + 8 <= kc <= ROWS_T_STRIDE), and panel rows p0..p0 + 8 hold lanes
                // l0..l0 + 8 (lane + 8 <= NR, row < kc).
                unsafe {
                    transpose8x8(
                        block.as_ptr().add(l0 * ROWS_T_STRIDE + p0),
                        ROWS_T_STRIDE,
                        panel.as_mut_ptr().add(p0 * NR + l0),
                        NR,
                    )
                };
            }
        }
    }
    let rows: [&[f32]; NR] = std::array::from_fn(|l| &block[l * ROWS_T_STRIDE..][..kc]);
    for (p, dst) in panel.chunks_exact_mut(NR).take(kc).enumerate().skip(done) {
        let dst: &mut [f32; NR] = dst.try_into().expect("NR values");
        *dst = std::array::from_fn(|l| rows[l][p]);
    }
}

/// `dst[p * dst_stride + l] = src[l * src_stride + p]` for an 8 x 8 block: unpacks, shuffles and
/// lane swaps instead of 64 scalar moves.
///
/// # Safety
/// AVX must be present; `src` must hold 8 rows of 8 values at `src_stride`, `dst` 8 rows of 8
/// at `dst_stride`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8x8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|l| _mm256_loadu_ps(src.add(l * src_stride)));
    // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves exchanged.
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    for (p, v) in out.into_iter().enumerate() {
        _mm256_storeu_ps(dst.add(p * dst_stride), v);
    }
}

fn im2col_slice<T: Copy + Default + Send + Sync>(x: &[T], d: &Dims) -> Vec<T> {
    let mut out = vec![T::default(); d.rows() * d.cols()];
    im2col_into(x, d, &mut out);
    out
}

fn col2im_slice<T>(cols: &[T], d: &Dims) -> Vec<T>
where
    T: Copy + Default + Send + Sync + std::ops::AddAssign,
{
    let (kh, kw) = d.g.kernel;
    let (sh, sw) = d.g.stride;
    let (ph, pw) = d.g.padding;
    let n = d.cols();
    let mut out = vec![T::default(); d.b * d.c * d.h * d.w];
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

/// The whole f32 CPU convolution as one graph node: the column matrix packed by the GEMM, which
/// writes NCHW directly, in the forward; the column matrix is rebuilt in the backward instead of being kept alive, and
/// both gradients are computed directly. One node instead of five saves Candle's backward a
/// zero-filled buffer and an add per node, and the big column matrix is never held between the
/// passes.
struct FusedConv(Dims);

/// `[B, O, P]` -> `[O, B*P]` (column `b*P + q`): the output gradient as the GEMMs' operand.
fn channel_major(src: &[f32], o: usize, b: usize, p: usize, out: &mut [f32]) {
    out[..src.len()]
        .par_chunks_mut(p)
        .enumerate()
        .for_each(|(row, dst)| {
            let (oi, bi) = (row / b, row % b); // out row = o*B + b
            dst.copy_from_slice(&src[(bi * o + oi) * p..][..p]);
        });
}

/// A matrix [R, G * blocks] stored as consecutive [R, G] blocks, packed as A in place: element
/// (i, p) is `data[((p / g) * rows + i) * g + p % g]`. The output gradient [B, O, P] is the matrix
/// [O, B*P] (column `b*P + q`) this way, and the weights [O, C, kh, kw] the matrix [C, O*kh*kw]
/// (column (o, tap)).
struct BlockRows<'a> {
    data: &'a [f32],
    rows: usize,
    g: usize,
}

impl APanelSource for BlockRows<'_> {
    fn pack(&self, i0: usize, m: usize, pc: usize, kc: usize, dst: &mut [f32]) {
        let rows = MR.min(m - i0);
        let dst = &mut dst[..kc * MR];
        // Depth pc + t is column q of block b; walk it one block's run at a time.
        let mut t = 0;
        while t < kc {
            let (b, q) = ((pc + t) / self.g, (pc + t) % self.g);
            let run = (self.g - q).min(kc - t);
            let dst = &mut dst[t * MR..(t + run) * MR];
            let at = |r: usize| (b * self.rows + i0 + r) * self.g + q;
            if rows == MR {
                let src: [&[f32]; MR] = std::array::from_fn(|r| &self.data[at(r)..][..run]);
                for (u, d) in dst.chunks_exact_mut(MR).enumerate() {
                    let d: &mut [f32; MR] = d.try_into().expect("MR values");
                    *d = std::array::from_fn(|r| src[r][u]);
                }
            } else {
                for (u, d) in dst.chunks_exact_mut(MR).enumerate() {
                    for (r, v) in d.iter_mut().enumerate() {
                        *v = if r < rows { self.data[at(r) + u] } else { 0.0 };
                    }
                }
            }
            t += run;
        }
    }
}

impl CustomOp2 for FusedConv {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        timed(Slot::ConvForward, || self.forward(xs, xl, ws, wl, None))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        timed(Slot::ConvBackward, || self.backward(x, w, res, grad))
    }
}

/// The input behind `cols` (geometry `d`) correlated with `w` as the matrix [O, C*kh*kw], plus
/// `bias` [O]: [B, O, OH, OW] values.
fn conv_forward(
    cols: ColsOf,
    w: AOperand,
    bias: Option<&[f32]>,
    o: usize,
    d: &Dims,
    slot: Slot,
) -> Vec<f32> {
    let (k, n, p) = (d.rows(), d.cols(), d.oh * d.ow);
    // The GEMM writes [B, O, P] directly (column b*P + q of the [O, B*P] product is pixel q of
    // sample b), adding to the bias when there is one.
    let mut y = match bias {
        Some(bias) => {
            let mut y = Vec::with_capacity(o * n);
            for _ in 0..d.b {
                for &v in bias {
                    y.extend(std::iter::repeat_n(v, p));
                }
            }
            y
        }
        None => vec![0f32; o * n],
    };
    let layout = CLayout {
        ldc: p,
        group: p,
        group_stride: o * p,
    };
    timed(slot, || {
        sgemm_with(
            o,
            n,
            k,
            w,
            BOperand::Packed(&cols),
            &mut y,
            layout,
            bias.is_some(),
        )
    });
    y
}

/// The input gradient of a stride-1 convolution is itself a convolution: the output gradient
/// correlated with the weights flipped in space and transposed in channels ([C, O, kh, kw]), with
/// padding k - 1 - p. Computed that way, the GEMM gathers its columns from the gradient and no
/// column matrix or col2im scatter is needed. The flip is never materialised: the depth index
/// (o, s) pairs the weights' tap s with the gradient's tap kh*kw - 1 - s.
fn stride1_input_gradient(dy: &[f32], w: &[f32], o: usize, d: &Dims) -> Vec<f32> {
    let (kh, kw) = d.g.kernel;
    let (ph, pw) = d.g.padding;
    let back = Dims {
        b: d.b,
        c: o,
        h: d.oh,
        w: d.ow,
        oh: d.h,
        ow: d.w,
        g: ConvGeometry::new(d.g.kernel, (1, 1), (kh - 1 - ph, kw - 1 - pw)),
    };
    let mut cols = ColsOf::new(dy, &back);
    let taps = kh * kw;
    for group in cols.tap_offset.chunks_exact_mut(taps) {
        group.reverse();
    }
    // The transposed (not flipped) weights: (c, (o, s)) is w[o, c, tap s].
    let wt = BlockRows {
        data: w,
        rows: d.c,
        g: taps,
    };
    conv_forward(
        cols,
        AOperand::Packed(&wt),
        None,
        d.c,
        &back,
        Slot::ConvGemmInputGradient,
    )
}

/// `FusedConv` plus a bias [O], which the forward's GEMM adds to; its gradient is the output
/// gradient summed per channel. One node instead of a convolution and a broadcast add, whose
/// backward Candle computes with a slow strided reduction.
struct FusedConvBias(Dims);

impl CustomOp3 for FusedConvBias {
    fn name(&self) -> &'static str {
        "conv2d-bias"
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        timed(Slot::ConvForward, || {
            FusedConv(self.0).forward(xs, xl, ws, wl, Some((bs, bl)))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        timed(Slot::ConvBackward, || {
            let (dx, dw) = FusedConv(self.0).backward(x, w, res, grad)?;
            let grad = grad.contiguous()?;
            let (gs, gl) = grad.storage_and_layout();
            let Storage::Cpu(gs) = &*gs else {
                candle_core::bail!("conv2d backward: expected a CPU gradient");
            };
            let g = f32_contiguous(gs, gl, "conv2d gradient")?;
            let (o, p) = (b.elem_count(), self.0.oh * self.0.ow);
            let db: Vec<f32> = (0..o)
                .into_par_iter()
                .map(|oi| {
                    let sum: f64 = (0..self.0.b)
                        .map(|bi| g[(bi * o + oi) * p..][..p].iter().sum::<f32>() as f64)
                        .sum();
                    sum as f32
                })
                .collect();
            Ok((dx, dw, Some(Tensor::from_vec(db, b.shape(), b.device())?)))
        })
    }
}

impl FusedConv {
    fn forward(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let x = f32_contiguous(xs, xl, "conv2d")?;
        let w = f32_contiguous(ws, wl, "conv2d")?;
        let o = wl.shape().dims()[0];
        let bias = bias
            .map(|(bs, bl)| f32_contiguous(bs, bl, "conv2d bias"))
            .transpose()?;
        let k = d.rows();
        let w = AOperand::Mat(MatRef {
            data: w,
            rs: k,
            cs: 1,
        });
        let y = conv_forward(ColsOf::new(x, d), w, bias, o, d, Slot::ConvGemmForward);
        Ok((CpuStorage::F32(y), Shape::from((d.b, o, d.oh, d.ow))))
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = &self.0;
        let (k, n, p) = (d.rows(), d.cols(), d.oh * d.ow);
        let o = w.dim(0)?;
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (
            Storage::Cpu(CpuStorage::F32(gv)),
            Storage::Cpu(CpuStorage::F32(xv)),
            Storage::Cpu(CpuStorage::F32(wv)),
        ) = (&*gs, &*xs, &*ws)
        else {
            candle_core::bail!("conv2d backward: expected f32 CPU tensors");
        };
        let g = contiguous(gv, gl, "conv2d")?;
        let xv = contiguous(xv, xl, "conv2d")?;
        let wv = contiguous(wv, wl, "conv2d")?;
        // dW [O, K] = dY [O, N] x cols^T [N, K], dY read in its NCHW layout and the columns
        // gathered from x, both while packing.
        let mut dw = vec![0f32; o * k];
        let cols = ColsOf::new(xv, d);
        timed(Slot::ConvGemmWeightGradient, || {
            sgemm_with(
                o,
                k,
                n,
                AOperand::Packed(&BlockRows {
                    data: g,
                    rows: o,
                    g: p,
                }),
                BOperand::Packed(&ColsOfT(&cols)),
                &mut dw,
                CLayout::rows(k),
                false,
            )
        });
        // The network's input needs no gradient.
        let stride1 =
            d.g.stride == (1, 1) && d.g.padding.0 < d.g.kernel.0 && d.g.padding.1 < d.g.kernel.1;
        let dx = if !x.track_op() {
            None
        } else if stride1 {
            let dx = stride1_input_gradient(g, wv, o, d);
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            // dcols [K, N] = W^T [K, O] x dY [O, N], scattered back by col2im.
            let mut dy = take_scratch(o * n);
            timed(Slot::ConvLayoutCopies, || {
                channel_major(g, o, d.b, p, &mut dy)
            });
            let mut dcols = take_scratch(k * n);
            timed(Slot::ConvGemmInputGradient, || {
                sgemm(
                    k,
                    n,
                    o,
                    MatRef {
                        data: wv,
                        rs: 1,
                        cs: k,
                    },
                    MatRef {
                        data: &dy[..o * n],
                        rs: n,
                        cs: 1,
                    },
                    &mut dcols,
                    n,
                    false,
                )
            });
            let dx = timed(Slot::ConvCol2Im, || col2im_slice(&dcols[..k * n], d));
            give_scratch(dcols);
            give_scratch(dy);
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        };
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((dx, Some(dw)))
    }
}

/// Cross-correlation of `x` [B, C, H, W] with `weight` [O, C, kh, kw] (PyTorch's Conv2d),
/// plus an optional `bias` [O]. Differentiable in all three.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    g: ConvGeometry,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c || (kh, kw) != g.kernel {
        candle_core::bail!(
            "conv2d: weight {:?} does not fit input channels {c} and kernel {:?}",
            weight.dims(),
            g.kernel
        );
    }
    let (oh, ow) = g.output_size(h, w)?;
    let y = if x.device().is_cpu() {
        let d = Dims {
            b,
            c,
            h,
            w,
            oh,
            ow,
            g,
        };
        let f32_bias = bias.is_none_or(|b| b.dtype() == x.dtype() && b.dims() == [o]);
        if x.dtype() == candle_core::DType::F32 && weight.dtype() == x.dtype() && f32_bias {
            let (x, weight) = (x.contiguous()?, weight.contiguous()?);
            return match bias {
                Some(b) => x.apply_op3(&weight, &b.contiguous()?, FusedConvBias(d)),
                None => x.apply_op2(&weight, FusedConv(d)),
            };
        } else {
            // f64 (the finite-difference tests): the same computation from differentiable pieces.
            let cols = x.contiguous()?.apply_op1(Im2Col(d))?; // [C*kh*kw, B*OH*OW]
            let y = weight.reshape((o, c * kh * kw))?.matmul(&cols)?; // [O, B*OH*OW]
            y.reshape((o, b, oh, ow))?.transpose(0, 1)?.contiguous()?
        }
    } else {
        // Accelerators use Candle's native convolution (cuDNN where enabled). Its backward
        // shares the stock parity limitation, documented in ARCHITECTURE.md.
        let x = x.pad_with_zeros(2, g.padding.0, g.padding.0)?;
        let x = x.pad_with_zeros(3, g.padding.1, g.padding.1)?;
        if g.stride.0 != g.stride.1 {
            candle_core::bail!("conv2d: unequal strides are only supported on the CPU");
        }
        x.conv2d(weight, 0, g.stride.0, 1, 1)?
    };
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1))?),
        None => Ok(y),
    }
}

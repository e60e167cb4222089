//! The convolution's operands packed by the GEMM itself: the column matrix (and its transpose)
//! gathered from a zero-padded input copy into the GEMM's panels, and block-stored matrices
//! (output gradients, weights) read in place as A.

use super::Dims;
#[cfg(target_arch = "x86_64")]
use crate::ops::gemm::transpose8x8;
use crate::ops::gemm::{APanelSource, PanelSource, KC, MR, NR};
use crate::ops::timing::{timed, Slot};
use crate::ops::{give_scratch, take_scratch};
use rayon::prelude::*;

/// The column matrix of an f32 input, packed on demand straight into the GEMM's panel layout
/// (as B in the forward and the stride-1 input gradient, as B^T in the weight gradient).
///
/// The input is first copied into a zero-padded buffer, so every element of the column matrix is
/// `xp[pixel_base + tap_offset]` with no bounds or padding test: along a row of the column matrix
/// the pixels of one output row are consecutive (stride 1) or evenly spaced input positions. The
/// padded copy costs one pass over the input; the gathers it simplifies read it kh x kw times.
pub(super) struct ColsOf {
    xp: Vec<f32>,
    d: Dims,
    /// Padded height and width.
    hp: usize,
    wp: usize,
    /// Offset of tap row r = (c, i, j) from a pixel's base: c*Hp*Wp + i*Wp + j.
    pub(super) tap_offset: Vec<usize>,
}

/// Up to NR consecutive columns of the column matrix that read evenly spaced input positions,
/// up to the next segment's `col`: column `col + t` (counted from the first packed column) reads
/// `xp[base + t * sw + tap]`.
#[derive(Clone, Copy)]
pub(super) struct Segment {
    col: usize,
    base: usize,
}

/// Each thread's scratch for the transposed packing: NR rows of up to KC + NR values.
const ROWS_T_STRIDE: usize = KC + NR;
thread_local! {
    static ROWS_T: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl ColsOf {
    pub(super) fn new(x: &[f32], d: &Dims) -> Self {
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
                    // One fill of the plane, then the rows: per row, two pad fills and a
                    // `copy_from_slice` were three library calls for 4 to 28 values.
                    dst.fill(0.0);
                    for (y, src_row) in src.chunks_exact(d.w).enumerate() {
                        copy_row(&mut dst[(ph + y) * wp + pw..][..d.w], src_row);
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

    /// The geometry the column matrix is read in (the input's, or the last `retarget`'s).
    pub(super) fn dims(&self) -> &Dims {
        &self.d
    }

    /// The same padded input read as the column matrix of another stride-1 correlation over it:
    /// `oh x ow` outputs per sample, a `kernel` of taps, row r of the column matrix reading
    /// `tap_offset[r]` past each output's base (its pixel in the padded copy). Every read must
    /// stay inside the padded copy: base + offset < the padded sample's size for every output.
    pub(super) fn retarget(
        &mut self,
        (oh, ow): (usize, usize),
        kernel: (usize, usize),
        tap_offset: Vec<usize>,
    ) {
        self.d.oh = oh;
        self.d.ow = ow;
        self.d.g = super::ConvGeometry::new(kernel, (1, 1), self.d.g.padding);
        assert_eq!(tap_offset.len(), self.d.rows(), "one offset per row");
        let sample = self.d.c * self.hp * self.wp;
        let last_base = (oh.max(1) - 1) * self.wp + ow.max(1) - 1;
        assert!(
            tap_offset.iter().all(|&t| last_base + t < sample),
            "a tap reads past the padded input"
        );
        self.tap_offset = tap_offset;
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
        } else if sw == 2 {
            // Constant indices into a fixed-size block: LLVM turns this into two vector loads
            // and a shuffle (a lane permute on AVX-512) instead of sixteen scalar loads. The
            // block's last value is one past the group's: inside the padded copy's slack.
            let src: &[f32; 2 * NR] = self.xp[at..at + 2 * NR].try_into().expect("2 NR values");
            *dst = std::array::from_fn(|t| src[2 * t]);
        } else {
            let src = &self.xp[at..at + (NR - 1) * sw + 1];
            *dst = std::array::from_fn(|t| src[t * sw]);
        }
    }
}

/// `dst.copy_from_slice(src)` (equal lengths) in fixed-size pieces, which compile to a few
/// vector moves: on a feature map's short rows a `memcpy` call costs more than the copy.
#[inline(always)]
fn copy_row(dst: &mut [f32], src: &[f32]) {
    let mut src = &src[..dst.len()];
    let mut dst = dst;
    while dst.len() >= 8 {
        let (d, rest) = dst.split_first_chunk_mut::<8>().expect("8 values");
        let (s, src_rest) = src.split_first_chunk::<8>().expect("8 values");
        *d = *s;
        (dst, src) = (rest, src_rest);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
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

simd_dispatch!(
/// B = the column matrix [K, N]: panel rows are taps, lanes are pixels. Each segment of a panel
/// is one NR-wide copy per tap; segments go in lane order, so the excess of one copy is
/// overwritten by the next (or by the next row, or lands in the strip's slack).
pub(super) fn pack_cols(cols: &ColsOf, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]) -> () = pack_cols_body);

#[inline(always)]
pub(super) fn pack_cols_body(
    cols: &ColsOf,
    j0: usize,
    j1: usize,
    pc: usize,
    kc: usize,
    strip: &mut [f32],
) {
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
pub(super) struct ColsOfT<'a>(pub(super) &'a ColsOf);

impl PanelSource for ColsOfT<'_> {
    fn pack(&self, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]) {
        ROWS_T.with(|block| {
            let mut block = block.borrow_mut();
            block.resize(NR * ROWS_T_STRIDE, 0.0);
            pack_cols_t(self.0, j0, j1, pc, kc, strip, &mut block)
        })
    }
}

simd_dispatch!(
/// Each lane (tap) is gathered as a row over the depth's pixels into a scratch block of NR rows,
/// with one NR-wide copy per segment (in order, so each copy's excess is overwritten by the
/// next); the block is then transposed into the panel.
pub(super) fn pack_cols_t(cols: &ColsOf, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32], block: &mut [f32]) -> () = pack_cols_t_body);

#[inline(always)]
pub(super) fn pack_cols_t_body(
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
pub(super) fn transpose_block(block: &[f32], kc: usize, panel: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::ops::isa::avx2() {
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

/// `[B, O, P]` -> `[O, B*P]` (column `b*P + q`): the output gradient as the GEMMs' operand.
pub(super) fn channel_major(src: &[f32], o: usize, b: usize, p: usize, out: &mut [f32]) {
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
pub(super) struct BlockRows<'a> {
    pub(super) data: &'a [f32],
    pub(super) rows: usize,
    pub(super) g: usize,
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

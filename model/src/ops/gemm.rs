//! Single-precision matrix multiply for the CPU: packed panels and an AVX2 + FMA 6x16 microkernel
//! (up to 12x32 over two A and two B panels, edges masked, where the CPU has AVX-512).
//!
//! Candle's GEMM (the `gemm` crate) and `matrixmultiply` both reach ~25-35 GFLOP/s per core on the
//! 2-core AVX2 development machine, whose FMA peak is ~90 GFLOP/s; the convolutions of a ResNet
//! step are almost all GEMM, so that gap is most of the gap to PyTorch (ARCHITECTURE.md, "Own
//! GEMM"). This is the classic Goto / BLIS blocking: B is packed in `KC x NR` panels, A in
//! `MR x KC` panels, and the microkernel keeps a 6x16 block of C in twelve registers. Operands take
//! arbitrary row and column strides, so transposed views need no copy. Without AVX2 + FMA (or off
//! x86-64) a portable kernel of the same shape computes the same sums (rounded after each
//! multiply, so not to the same bits); the AVX2 and AVX-512 kernels do the same fused
//! multiply-adds in the same order and agree exactly.

use super::{give_scratch, take_scratch};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Height of a packed A panel.
pub(crate) const MR: usize = 6;
/// Width of a packed B panel.
pub(crate) const NR: usize = 16;
/// Depth of one packed block: an A panel (6 KB) and a B panel (16 KB) stay in L1 together.
pub(crate) const KC: usize = 256;
/// Rows of A per task: the packed A block (96 KB) stays in L2.
const MC: usize = 96;
/// Columns of B per task: its packed part (256 KB) stays in L2 while the A panels stream past.
const NC_TASK: usize = 256;

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl MatRef<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// A right-hand operand that packs itself. A convolution's column matrix is one: it is gathered
/// from the input straight into the panel layout instead of being materialised (~10x the input)
/// and then packed.
pub trait PanelSource: Sync {
    /// Columns `j0..j1` of B's depth block `pc..pc + kc` as consecutive NR-wide panels, each `kc`
    /// groups of NR values, zero past j1. `strip` has NR values of slack past the last panel,
    /// which may be overwritten.
    fn pack(&self, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]);
}

/// A left-hand operand that packs itself (see `PanelSource`).
pub trait APanelSource: Sync {
    /// Rows `i0..i0 + MR` of A's depth block `pc..pc + kc` as `kc` groups of MR values, zero
    /// past row m (the layout `pack_a` produces).
    fn pack(&self, i0: usize, m: usize, pc: usize, kc: usize, dst: &mut [f32]);
}

/// The left-hand operand of `sgemm_with`.
#[derive(Clone, Copy)]
pub enum AOperand<'a> {
    Mat(MatRef<'a>),
    Packed(&'a dyn APanelSource),
    /// Already in the packed layout (`PackedA`): nothing to pack, for an A used by many products.
    Prepacked(PackedA<'a>),
}

/// A matrix A [m, k] packed once, in the layout the GEMM packs it into (depth block after depth
/// block, each `m.div_ceil(MR)` panels of MR x kc), for several products with the same A.
#[derive(Clone, Copy)]
pub struct PackedA<'a> {
    data: &'a [f32],
    m: usize,
    k: usize,
}

impl<'a> PackedA<'a> {
    /// Values the packed form of an m x k matrix takes.
    pub fn len(m: usize, k: usize) -> usize {
        m.div_ceil(MR) * MR * k
    }

    /// Where element (i, j) of an m x k matrix lies in its packed form (a writer fills rows m..
    /// of the last panel with zeros).
    #[inline(always)]
    pub fn index(m: usize, k: usize, i: usize, j: usize) -> usize {
        let (panels, pc) = (m.div_ceil(MR), j - j % KC);
        let kc = KC.min(k - pc);
        panels * MR * pc + (i / MR) * MR * kc + (j - pc) * MR + i % MR
    }

    /// `a` [m, k] in the packed layout (for `from_packed`): weights packed once for many products.
    pub fn pack(a: MatRef, m: usize, k: usize) -> Vec<f32> {
        let panels = m.div_ceil(MR);
        let mut buf = vec![0f32; Self::len(m, k)];
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let block = &mut buf[panels * MR * pc..][..panels * MR * kc];
            for (p, panel) in block.chunks_exact_mut(MR * kc).enumerate() {
                pack_a(a, p * MR, m, pc, kc, panel);
            }
        }
        buf
    }

    /// `data` read as an m x k matrix packed by `index`.
    pub fn from_packed(data: &'a [f32], m: usize, k: usize) -> Self {
        assert!(
            data.len() >= Self::len(m, k),
            "PackedA: {} values for {m}x{k}",
            data.len()
        );
        PackedA { data, m, k }
    }

    /// The packed depth range k0..k1 (a super-block: it starts on a depth block).
    fn depth(&self, k0: usize, k1: usize) -> &'a [f32] {
        let panels = self.m.div_ceil(MR);
        &self.data[panels * MR * k0..panels * MR * k1]
    }
}

/// A matrix B [k, n] packed once, in the layout the GEMM packs its column strips into (depth
/// block after depth block, each `n.div_ceil(NR)` panels of kc x NR, zeros past column n): the
/// products then read it in place, for a B used by many products (an inference form's weights).
/// Owned, its first value on a 64-byte boundary like the GEMM's own strips.
pub struct PackedB {
    buf: Vec<f32>,
    start: usize,
    k: usize,
    n: usize,
}

impl PackedB {
    /// B as `src` packs it: every depth block of all n columns, in order.
    pub fn pack(src: &dyn PanelSource, k: usize, n: usize) -> PackedB {
        let panels = n.div_ceil(NR);
        let len = panels * NR * k;
        // NR values of slack for the last block (a PanelSource may write them); ALIGN to align.
        let mut buf = vec![0f32; len + NR + ALIGN];
        let start = buf.as_ptr().align_offset(64).min(ALIGN);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            // In order: a block's slack is overwritten by the next block's first values.
            src.pack(0, n, pc, kc, &mut buf[start + panels * NR * pc..]);
        }
        PackedB { buf, start, k, n }
    }

    /// Panels j0 / NR.. of columns j0..j1 (j0 a multiple of NR) of depth block pc..pc + kc.
    fn strip(&self, j0: usize, j1: usize, pc: usize, kc: usize) -> &[f32] {
        let panels = self.n.div_ceil(NR);
        let at = self.start + panels * NR * pc + (j0 / NR) * NR * kc;
        &self.buf[at..][..(j1 - j0).div_ceil(NR) * NR * kc]
    }
}

/// The right-hand operand of `sgemm_with`.
#[derive(Clone, Copy)]
pub enum BOperand<'a> {
    Mat(MatRef<'a>),
    Packed(&'a dyn PanelSource),
    /// Already in the packed layout: nothing to pack.
    Prepacked(&'a PackedB),
}

/// Where element (i, j) of C lives: `c[(j / group) * group_stride + i * ldc + j % group]`. A
/// row-major C is a single group. A convolution's NCHW output [B, O, P] is one group of P
/// columns per sample (ldc = P, group_stride = O * P), so the GEMM writes it directly instead of
/// a [O, B*P] result being permuted in another pass.
#[derive(Clone, Copy, Debug)]
pub struct CLayout {
    pub ldc: usize,
    pub group: usize,
    pub group_stride: usize,
}

impl CLayout {
    /// Row-major with leading dimension `ldc`.
    pub fn rows(ldc: usize) -> Self {
        CLayout {
            ldc,
            group: usize::MAX,
            group_stride: 0,
        }
    }

    #[inline]
    fn at(&self, i: usize, j: usize) -> usize {
        (j / self.group) * self.group_stride + i * self.ldc + j % self.group
    }

    /// Checks that m x n elements land at distinct offsets inside `len` values: rows of a group
    /// do not overlap, nor do groups, and the last element is the furthest.
    fn check(&self, m: usize, n: usize, len: usize) {
        let width = self.group.min(n);
        assert!(
            self.ldc >= width || m == 1,
            "sgemm: rows of C overlap ({self:?})"
        );
        assert!(
            n <= self.group || self.group_stride >= (m - 1) * self.ldc + width,
            "sgemm: groups of C overlap ({self:?})"
        );
        assert!(
            self.at(m - 1, n - 1) < len,
            "sgemm: output buffer too small"
        );
    }
}

/// `c[m x n] (=|+=) a[m x k] * b[k x n]`, c row-major with leading dimension `ldc`.
/// `accumulate` adds to c instead of overwriting it.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    sgemm_with(
        m,
        n,
        k,
        AOperand::Mat(a),
        BOperand::Mat(b),
        c,
        CLayout::rows(ldc),
        accumulate,
    )
}

/// `sgemm` with operands given as views or packing themselves, and C in any `CLayout`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with(
    m: usize,
    n: usize,
    k: usize,
    a: AOperand,
    b: BOperand,
    c: &mut [f32],
    cl: CLayout,
    accumulate: bool,
) {
    sgemm_on(m, n, k, a, b, c.as_mut_ptr(), c.len(), cl, accumulate, true)
}

/// `sgemm_with` into an unfilled C, every element of which it writes (no accumulation): an op's
/// output then needs no zero fill first (`ops::unfilled`).
pub(crate) fn sgemm_into(
    m: usize,
    n: usize,
    k: usize,
    a: AOperand,
    b: BOperand,
    c: &mut [std::mem::MaybeUninit<f32>],
    cl: CLayout,
) {
    sgemm_on(
        m,
        n,
        k,
        a,
        b,
        c.as_mut_ptr().cast(),
        c.len(),
        cl,
        false,
        true,
    )
}

/// `c[m x n] (=|+=) a[m x k] * b[k x n]` (c row-major, leading dimension `ldc`) on this thread
/// only: for callers that already run one task per thread, each with its own small product.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_serial(
    m: usize,
    n: usize,
    k: usize,
    a: AOperand,
    b: MatRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (b, cl) = (BOperand::Mat(b), CLayout::rows(ldc));
    sgemm_on(
        m,
        n,
        k,
        a,
        b,
        c.as_mut_ptr(),
        c.len(),
        cl,
        accumulate,
        false,
    )
}

/// `sgemm_with` on the rayon pool when `parallel`, else on this thread, into the `c_len` values
/// at `c`: a writable buffer that nothing else touches during the call. Every (i, j) of `cl` is
/// written; without `accumulate` none is read first, so those values may be uninitialised.
#[allow(clippy::too_many_arguments)]
fn sgemm_on(
    m: usize,
    n: usize,
    k: usize,
    a: AOperand,
    b: BOperand,
    c: *mut f32,
    c_len: usize,
    cl: CLayout,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    cl.check(m, n, c_len);
    if let BOperand::Prepacked(pb) = b {
        assert!(
            pb.k == k && pb.n == n,
            "sgemm: prepacked B is {}x{}",
            pb.k,
            pb.n
        );
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: `check` keeps every (i, j) inside the c_len values at c.
                    unsafe { c.add(cl.at(i, j)).write(0.0) };
                }
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    if parallel && threads > 1 && k >= 8 * KC && m * n <= SPLIT_K_MAX_OUTPUT {
        // A deep product with a small result (a weight gradient: k = batch x pixels): split the
        // depth between the threads, each running the serial GEMM into its own copy of C, then
        // sum. Parallelising inside every 256-deep block instead pays two thread hand-offs per
        // block for little work each.
        // Whole depth blocks, shared as evenly as they divide (k = 6272 on 2 threads: 12 and
        // 12.5 blocks; rounding the share up to whole blocks gave 13 and 11.5).
        let chunks = threads.min(k.div_ceil(KC));
        let bound = |t: usize| share_bound(t, chunks, KC, k);
        // The first depth chunk goes straight into c; the others into pooled buffers (each
        // fully overwritten), added to c at the end.
        let mut partials: Vec<Vec<f32>> = (1..chunks).map(|_| take_scratch(m * n)).collect();
        let c_ptr = SendPtr(c);
        let parts: Vec<SendPtr> = partials
            .iter_mut()
            .map(|p| SendPtr(p.as_mut_ptr()))
            .collect();
        (0..chunks).into_par_iter().for_each(|t| {
            let (k0, k1) = (bound(t), bound(t + 1));
            if t == 0 {
                gemm_blocks(m, n, k0, k1, a, b, c_ptr, cl, accumulate, false);
            } else {
                let plain = CLayout::rows(n);
                gemm_blocks(m, n, k0, k1, a, b, parts[t - 1], plain, false, false);
            }
        });
        (0..m).into_par_iter().for_each(|i| {
            // Row i of C as runs that are contiguous in c (one per group).
            let mut j = 0;
            while j < n {
                let len = (cl.group - j % cl.group).min(n - j);
                // SAFETY: `check` guarantees that (i, j..j + len) are distinct in-bounds offsets
                // of c, and no other task writes row i.
                let row =
                    unsafe { std::slice::from_raw_parts_mut(c_ptr.get().add(cl.at(i, j)), len) };
                for p in &partials {
                    let src = &p[i * n + j..][..len];
                    row.iter_mut().zip(src).for_each(|(o, s)| *o += s);
                }
                j += len;
            }
        });
        partials.into_iter().for_each(give_scratch);
        return;
    }
    gemm_blocks(m, n, 0, k, a, b, SendPtr(c), cl, accumulate, parallel);
}

/// Where part t of `parts` starts when `len` values are cut into parts of whole `unit`s (the
/// last unit may be short) whose sizes differ by at most one unit: part t takes units
/// t * units / parts.. (t = parts gives `len`).
fn share_bound(t: usize, parts: usize, unit: usize, len: usize) -> usize {
    (unit * (t * len.div_ceil(unit) / parts)).min(len)
}

/// Largest m x n (values) for which a deep product is split by depth between threads.
const SPLIT_K_MAX_OUTPUT: usize = 1 << 20;

/// The depth range `k0..k1` of the product into c (at `c_ptr`, laid out by `cl`), on the rayon
/// pool when `parallel`, else on this thread.
///
/// The caller guarantees that c holds every (i, j) of `cl` (`CLayout::check`) and that nothing
/// else writes them meanwhile.
#[allow(clippy::too_many_arguments)]
fn gemm_blocks(
    m: usize,
    n: usize,
    k0: usize,
    k1: usize,
    a: AOperand,
    b: BOperand,
    c_ptr: SendPtr,
    cl: CLayout,
    accumulate: bool,
    parallel: bool,
) {
    // Depth is taken in super-blocks of up to KC_SUPER, each computed in full before the next.
    for s0 in (k0..k1).step_by(KC_SUPER) {
        let s1 = (s0 + KC_SUPER).min(k1);
        let add = accumulate || s0 > k0;
        super_block(m, n, s0, s1, a, b, c_ptr, cl, add, parallel);
    }
}

/// Depth per super-block: its packed A (at most 2 MB for m = 512) and the C strip it updates
/// stay in cache while the depth blocks inside it go by.
const KC_SUPER: usize = 4 * KC;

/// `gemm_blocks` over one super-block of depth `k0..k1` (<= KC_SUPER).
#[allow(clippy::too_many_arguments)]
fn super_block(
    m: usize,
    n: usize,
    k0: usize,
    k1: usize,
    a: AOperand,
    b: BOperand,
    c_ptr: SendPtr,
    cl: CLayout,
    accumulate: bool,
    parallel: bool,
) {
    let m_panels = m.div_ceil(MR);
    // A is packed once for the super-block (depth block after depth block, each m_panels panels
    // of MR x kc) and shared by every task.
    let a_len = m_panels * MR * (k1 - k0);
    let mut a_buf = Vec::new();
    let a_pack: &[f32] = match a {
        AOperand::Prepacked(pa) => {
            assert!(
                pa.m == m && pa.k >= k1,
                "sgemm: prepacked A is {}x{}",
                pa.m,
                pa.k
            );
            pa.depth(k0, k1)
        }
        _ => {
            a_buf = take_scratch(a_len + ALIGN);
            let a_pack = aligned(&mut a_buf, a_len);
            let pack_panel = |pc: usize, kc: usize, p: usize, panel: &mut [f32]| match a {
                AOperand::Mat(a) => pack_a(a, p * MR, m, pc, kc, panel),
                AOperand::Packed(src) => src.pack(p * MR, m, pc, kc, panel),
                AOperand::Prepacked(_) => unreachable!("handled above"),
            };
            let pack_block = |(bi, dst): (usize, &mut [f32])| {
                let pc = k0 + bi * KC;
                let kc = KC.min(k1 - pc);
                for (p, panel) in dst.chunks_mut(MR * kc).take(m_panels).enumerate() {
                    pack_panel(pc, kc, p, panel);
                }
            };
            if parallel {
                // Panel by panel: one task per depth block left a thread idle while the other
                // packed (a 768-deep A is three blocks, a 256-deep one a single block).
                a_pack
                    .par_chunks_mut(m_panels * MR * KC)
                    .enumerate()
                    .for_each(|(bi, dst)| {
                        let pc = k0 + bi * KC;
                        let kc = KC.min(k1 - pc);
                        dst.par_chunks_mut(MR * kc)
                            .take(m_panels)
                            .enumerate()
                            .for_each(|(p, panel)| pack_panel(pc, kc, p, panel));
                    });
            } else {
                a_pack
                    .chunks_mut(m_panels * MR * KC)
                    .enumerate()
                    .for_each(pack_block);
            }
            a_pack
        }
    };
    // One task per column strip of C, which it computes over the whole super-block: the strip
    // stays in L2 from one depth block to the next instead of going out to memory and back.
    // Each depth block of the strip's B is packed once per task (gathering B can cost more than
    // copying it) and used for every row of A, MC rows at a time so the A block and the strip
    // share L2. In parallel, the strips are as wide as NC_TASK allows while their number is a
    // multiple of the thread count (equal shares; few, wide strips reuse each A panel more).
    let tiles = if parallel {
        let threads = rayon::current_num_threads();
        threads * n.div_ceil(threads * NC_TASK)
    } else {
        n.div_ceil(NC_TASK)
    };
    // Strips of whole panels whose widths differ by at most one panel, so each thread's share
    // is even (at n = 6272, 25 strips of 16 panels gave one thread 13 and the other 12).
    let tiles_n = tiles.min(n.div_ceil(NR));
    let bound = |t: usize| share_bound(t, tiles_n, NR, n);
    let wide = super::isa::avx512();
    let strip_task = |t: usize| {
        let (j0, j1) = (bound(t), bound(t + 1));
        B_STRIP.with(|strip| {
            let mut strip = strip.borrow_mut();
            for pc in (k0..k1).step_by(KC) {
                let kc = KC.min(k1 - pc);
                let a_block = &a_pack[m_panels * MR * (pc - k0)..][..m_panels * MR * kc];
                let add = accumulate || pc > k0;
                let panels = (j1 - j0).div_ceil(NR);
                let strip: &[f32] = match b {
                    BOperand::Prepacked(pb) => pb.strip(j0, j1, pc, kc),
                    BOperand::Mat(_) | BOperand::Packed(_) => {
                        // NR values of slack for a PanelSource.
                        if strip.len() < panels * NR * kc + NR + ALIGN {
                            strip.resize(panels * NR * kc + NR + ALIGN, 0.0);
                        }
                        let strip = aligned(&mut strip[..], panels * NR * kc + NR);
                        match b {
                            BOperand::Mat(b) => pack_b_strip(b, j0, j1, pc, kc, strip),
                            BOperand::Packed(src) => src.pack(j0, j1, pc, kc, strip),
                            BOperand::Prepacked(_) => unreachable!("handled above"),
                        }
                        strip
                    }
                };
                for i0 in (0..m).step_by(MC) {
                    let i1 = (i0 + MC).min(m);
                    let mut j = j0;
                    while j < j1 {
                        // With AVX-512, tiles are two panels wide where two are left.
                        let panels = if wide && j + NR < j1 { 2 } else { 1 };
                        let bp = &strip[((j - j0) / NR) * NR * kc..][..panels * NR * kc];
                        let mut i = i0;
                        while i < i1 {
                            // And two A panels high (12 x 32: 24 accumulators, each B value
                            // loaded once per 12 FMAs instead of 6) where two are left.
                            let high = if wide && i + MR < i1 { 2 } else { 1 };
                            let ap = &a_block[(i / MR) * MR * kc..][..high * MR * kc];
                            let (rows, cols) = ((high * MR).min(m - i), (panels * NR).min(n - j));
                            // SAFETY: strips are disjoint, so no two tasks write the same element
                            // of c, and the caller guarantees c's extent.
                            unsafe { c_tile(kc, ap, bp, c_ptr, cl, i, j, rows, cols, add) };
                            i += high * MR;
                        }
                        j += panels * NR;
                    }
                }
            }
        });
    };
    if parallel {
        (0..tiles_n).into_par_iter().for_each(strip_task);
    } else {
        (0..tiles_n).for_each(strip_task);
    }
    if !a_buf.is_empty() {
        give_scratch(a_buf);
    }
}

/// Values of slack for `aligned`.
const ALIGN: usize = 16;

/// `len` values of `buf` starting on a 64-byte boundary (`buf` holds `len + ALIGN`): a packed
/// panel's rows of 16 values then fill whole cache lines instead of straddling two, which would
/// split the microkernel's vector loads.
fn aligned(buf: &mut [f32], len: usize) -> &mut [f32] {
    let skip = buf.as_ptr().align_offset(64).min(ALIGN);
    &mut buf[skip..][..len]
}

thread_local! {
    /// Each thread's packed strip of B (at most KC x NC_TASK values), reused across calls.
    static B_STRIP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// C's base pointer handed to the rayon tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only dereferenced inside the GEMM's parallel loops, where every task
// writes its own column strip (or its own split-K partial buffer) of a buffer that outlives the
// loop: no two threads touch the same element, and nothing reads C until the loop has joined.
unsafe impl Send for SendPtr {}
// SAFETY: as for Send: shared references only copy the pointer; the writes through it are disjoint.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

simd_dispatch!(
/// Rows `i0..i0+MR` of A's depth block `pc..pc+kc`, as `kc` groups of MR values (zero past m).
fn pack_a(a: MatRef, i0: usize, m: usize, pc: usize, kc: usize, dst: &mut [f32]) -> () = pack_a_body);

#[inline(always)]
fn pack_a_body(a: MatRef, i0: usize, m: usize, pc: usize, kc: usize, dst: &mut [f32]) {
    let rows = MR.min(m - i0);
    let dst = &mut dst[..kc * MR];
    if rows == MR && a.cs == 1 {
        // Row-major A: six contiguous row pieces, interleaved.
        let r: [&[f32]; MR] = std::array::from_fn(|r| &a.data[(i0 + r) * a.rs + pc..][..kc]);
        for (p, d) in dst.chunks_exact_mut(MR).enumerate() {
            let d: &mut [f32; MR] = d.try_into().expect("MR values");
            *d = std::array::from_fn(|q| r[q][p]);
        }
        return;
    }
    if rows == MR && a.rs == 1 {
        // Column-major A (a transposed view): each group is a contiguous run.
        for (p, d) in dst.chunks_exact_mut(MR).enumerate() {
            d.copy_from_slice(&a.data[(pc + p) * a.cs + i0..][..MR]);
        }
        return;
    }
    for p in 0..kc {
        let d = &mut dst[p * MR..][..MR];
        for (r, v) in d.iter_mut().enumerate() {
            *v = if r < rows { a.at(i0 + r, pc + p) } else { 0.0 };
        }
    }
}

simd_dispatch!(
/// Columns `j0..j1` of B's depth block `pc..pc+kc` as consecutive NR-wide panels, each `kc`
/// groups of NR values (zero past j1).
fn pack_b_strip(b: MatRef, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]) -> () = pack_b_strip_body);

#[inline(always)]
fn pack_b_strip_body(b: MatRef, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]) {
    let width = j1 - j0;
    let full = width / NR;
    if b.cs == 1 {
        // Row-major B: read each row of the strip as one contiguous run (reading panel by panel
        // instead walks kc rows at a large, often power-of-two stride, which thrashes the cache).
        for p in 0..kc {
            let row = &b.data[(pc + p) * b.rs + j0..][..width];
            for q in 0..full {
                strip[q * NR * kc + p * NR..][..NR].copy_from_slice(&row[q * NR..][..NR]);
            }
        }
    } else if b.rs == 1 {
        // Column-major B (a transposed view): each column is a contiguous run, turned into the
        // panel's rows by 8x8 transposes (with AVX), else value by value.
        for q in 0..full {
            let panel = &mut strip[q * NR * kc..][..NR * kc];
            let cols: [&[f32]; NR] =
                std::array::from_fn(|r| &b.data[(j0 + q * NR + r) * b.cs + pc..][..kc]);
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if super::isa::avx2() {
                done = kc / 8 * 8;
                for p0 in (0..done).step_by(8) {
                    for r0 in [0, 8] {
                        // SAFETY: AVX is present; the source pointer comes from the rest of
                        // b.data, where columns r0..r0 + 8 lie b.cs apart and each holds values
                        // p0..p0 + 8 (`cols` checked every column's kc values, p0 + 8 <= kc);
                        // panel rows p0..p0 + 8 hold lanes r0..r0 + 8 (r0 + 8 <= NR).
                        let src = &b.data[(j0 + q * NR + r0) * b.cs + pc + p0..];
                        unsafe {
                            transpose8x8(src.as_ptr(), b.cs, panel[p0 * NR + r0..].as_mut_ptr(), NR)
                        };
                    }
                }
            }
            for (r, col) in cols.iter().enumerate() {
                for p in done..kc {
                    panel[p * NR + r] = col[p];
                }
            }
        }
    } else {
        for q in 0..full {
            let panel = &mut strip[q * NR * kc..][..NR * kc];
            for p in 0..kc {
                for r in 0..NR {
                    panel[p * NR + r] = b.at(pc + p, j0 + q * NR + r);
                }
            }
        }
    }
    if full * NR < width {
        // The last, partial panel, zero-padded.
        let cols = width - full * NR;
        let panel = &mut strip[full * NR * kc..][..NR * kc];
        for p in 0..kc {
            for r in 0..NR {
                panel[p * NR + r] = if r < cols {
                    b.at(pc + p, j0 + full * NR + r)
                } else {
                    0.0
                };
            }
        }
    }
}

/// `dst[c * rows + r] = src[r * cols + c]`: the row-major [rows, cols] matrix `src` transposed
/// into `dst`, by 8 x 8 blocks (`transpose8x8`, where AVX is present) and split between threads
/// by blocks of 8 output rows (each one contiguous piece of `dst`).
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    let n = rows * cols;
    assert!(
        src.len() >= n && dst.len() >= n,
        "transpose: buffers below {rows} x {cols}"
    );
    if n == 0 {
        return;
    }
    dst[..n]
        .par_chunks_mut(8 * rows)
        .enumerate()
        .for_each(|(cb, block)| {
            let c0 = cb * 8;
            let width = (cols - c0).min(8);
            let mut r = 0;
            #[cfg(target_arch = "x86_64")]
            if width == 8 && crate::ops::isa::avx2() {
                while r + 8 <= rows {
                    // SAFETY: AVX is present (`isa::avx2` implies it); rows r..r + 8 of src hold
                    // columns c0..c0 + 8 (c0 + 8 <= cols) at stride cols, within src's n values;
                    // block's rows 0..8 (8 x rows values) hold columns r..r + 8 at stride rows.
                    unsafe {
                        transpose8x8(
                            src.as_ptr().add(r * cols + c0),
                            cols,
                            block.as_mut_ptr().add(r),
                            rows,
                        )
                    };
                    r += 8;
                }
            }
            for rr in r..rows {
                for cc in 0..width {
                    block[cc * rows + rr] = src[rr * cols + c0 + cc];
                }
            }
        });
}

/// `dst[p * dst_stride + l] = src[l * src_stride + p]` for an 8 x 8 block: unpacks, shuffles and
/// lane swaps instead of 64 scalar moves.
///
/// # Safety
/// AVX must be present; `src` must hold 8 rows of 8 values at `src_stride`, `dst` 8 rows of 8
/// at `dst_stride`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(crate) unsafe fn transpose8x8(
    src: *const f32,
    src_stride: usize,
    dst: *mut f32,
    dst_stride: usize,
) {
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

/// The block of C at (i, j), `rows` x `cols` (at most MR x NR, or up to 2MR x 2NR when `a` and
/// `b` hold two panels each, which only the AVX-512 kernel is given), from packed panels. A block
/// whose columns straddle groups of the layout (a tile that spans two samples of a convolution's
/// output) is written panel by panel when each B panel lies inside one group (AVX-512), else
/// computed into a buffer and stored in runs that each stay inside one group.
///
/// # Safety
/// c must hold (i..i + rows, j..j + cols) in layout `cl`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn c_tile(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: SendPtr,
    cl: CLayout,
    i: usize,
    j: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    if j % cl.group + cols <= cl.group {
        return micro_tile(kc, a, b, c.get().add(cl.at(i, j)), cl.ldc, rows, cols, add);
    }
    #[cfg(target_arch = "x86_64")]
    if super::isa::avx512() {
        let panels = b.len() / (NR * kc);
        let j1 = j + NR;
        // A two-panel tile whose panels each lie inside one group, as on a 4x4 map (one sample
        // per panel: the DAN heads and layer4 at 112 px), is still one kernel call, each panel
        // stored at its own place; panel by panel it ran 6x16 blocks at about half the rate.
        if panels == 2 && j % cl.group + NR <= cl.group && j1 % cl.group + (cols - NR) <= cl.group {
            let to = [c.get().add(cl.at(i, j)), c.get().add(cl.at(i, j1))];
            // SAFETY: AVX-512 is present; panel q's rows x its columns lie inside one group of
            // c, which the caller guarantees.
            return avx512_tile(kc, a, b, to, cl.ldc, rows, cols, add);
        }
        // Otherwise (a group boundary inside a panel: 7x7 and 14x14 maps) the whole tile goes
        // through a buffer, computed by the same kernel.
        let mut acc = [0f32; 4 * MR * NR];
        let width = panels * NR;
        let to = [acc.as_mut_ptr(), acc.as_mut_ptr().add(NR)];
        // SAFETY: AVX-512 is present; acc holds rows <= 2 MR rows of width values.
        avx512_tile(kc, a, b, to, width, rows, cols, false);
        return store_runs(&acc, width, c, cl, i, j, rows, cols, add);
    }
    // Without AVX-512 a tile is one A and one B panel: the MR x NR kernel into a buffer.
    debug_assert!(a.len() == MR * kc && b.len() == NR * kc);
    let mut acc = [0f32; MR * NR];
    kernel(kc, a, b, acc.as_mut_ptr(), NR, false);
    store_runs(&acc, NR, c, cl, i, j, rows, cols, add);
}

/// Stores a tile computed into `acc` (rows `width` apart) at (i, j) of c in runs that each stay
/// inside one group of the layout.
///
/// # Safety
/// As `c_tile`'s.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn store_runs(
    acc: &[f32],
    width: usize,
    c: SendPtr,
    cl: CLayout,
    i: usize,
    j: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    let mut t = 0;
    while t < cols {
        let run = (cl.group - (j + t) % cl.group).min(cols - t);
        for r in 0..rows {
            let dst = c.get().add(cl.at(i + r, j + t));
            store(
                std::slice::from_raw_parts_mut(dst, run),
                &acc[r * width + t..][..run],
                add,
            );
        }
        t += run;
    }
}

/// A block of C inside one group (rows `ldc` apart) from packed panels: the AVX-512 kernel where
/// present (one or two panels, edges masked), else the MR x NR kernel (one panel), a partial
/// block at the edges going through a buffer.
///
/// # Safety
/// `c` must be valid for `rows` rows of `cols` values at stride `ldc`.
#[allow(clippy::too_many_arguments)] // the microkernel's operands, passed in registers
#[inline(always)]
unsafe fn micro_tile(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if super::isa::avx512() {
        // SAFETY: AVX-512 is present; the caller guarantees c for rows x cols (the second
        // pointer, c + NR, is only written through when b holds two panels).
        return avx512_tile(kc, a, b, [c, c.wrapping_add(NR)], ldc, rows, cols, add);
    }
    if rows == MR && cols == NR {
        return kernel(kc, a, b, c, ldc, add);
    }
    let mut acc = [0f32; MR * NR];
    kernel(kc, a, b, acc.as_mut_ptr(), NR, false);
    for r in 0..rows {
        store(
            std::slice::from_raw_parts_mut(c.add(r * ldc), cols),
            &acc[r * NR..][..cols],
            add,
        );
    }
}

/// The AVX-512 kernel for one or two A panels (`a`) and one or two B panels (`b`), B panel q's
/// columns stored at `c[q]` (`c[1]` unused for one panel).
///
/// # Safety
/// AVX-512 is present; a.len() = kc * MR * (A panels) and b.len() = kc * NR * (B panels); each
/// `c[q]` is valid for `rows` rows of panel q's columns at stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn avx512_tile(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: [*mut f32; 2],
    ldc: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    match (a.len() == 2 * MR * kc, b.len() == 2 * NR * kc) {
        (true, true) => avx512::kernel::<2, 2>(kc, ap, bp, c, ldc, rows, cols, add),
        (true, false) => avx512::kernel::<2, 1>(kc, ap, bp, [c[0]], ldc, rows, cols, add),
        (false, true) => avx512::kernel::<1, 2>(kc, ap, bp, c, ldc, rows, cols, add),
        (false, false) => avx512::kernel::<1, 1>(kc, ap, bp, [c[0]], ldc, rows, cols, add),
    }
}

/// `dst (=|+=) src`.
#[inline(always)]
fn store(dst: &mut [f32], src: &[f32], add: bool) {
    if add {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
    } else {
        dst.copy_from_slice(src);
    }
}

/// `C[MR x NR] (=|+=) sum_p a[p][0..MR] (outer) b[p][0..NR]`, C at `c` with row stride `ldc`.
///
/// # Safety
/// `c` must be valid for MR rows of NR values at stride `ldc`.
unsafe fn kernel(kc: usize, a: &[f32], b: &[f32], c: *mut f32, ldc: usize, add: bool) {
    #[cfg(target_arch = "x86_64")]
    if super::isa::avx2() {
        // SAFETY: the features are present (detected once by `isa`); the panels hold kc * MR
        // and kc * NR values, and the caller guarantees `c`.
        return avx2::kernel(kc, a.as_ptr(), b.as_ptr(), c, ldc, add);
    }
    let mut acc = [0f32; MR * NR];
    for p in 0..kc {
        let (ap, bp) = (&a[p * MR..][..MR], &b[p * NR..][..NR]);
        for (r, &av) in ap.iter().enumerate() {
            for (q, &bv) in bp.iter().enumerate() {
                acc[r * NR + q] += av * bv;
            }
        }
    }
    for r in 0..MR {
        let dst = std::slice::from_raw_parts_mut(c.add(r * ldc), NR);
        let src = &acc[r * NR..][..NR];
        if add {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        } else {
            dst.copy_from_slice(src);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// The 6x16 AVX2 + FMA microkernel: twelve 8-lane accumulators over the kc-deep panels.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `a` holds kc * MR and `b` kc * NR readable values; `c` is valid
    /// for MR rows of NR values at stride `ldc`, written by no one else during the call.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel(
        kc: usize,
        mut a: *const f32,
        mut b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        // C's rows are far apart (a row is a whole feature map): start fetching them now so the
        // misses overlap the kc-deep loop instead of stalling the stores at its end.
        for r in 0..MR {
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + NR - 1) as *const i8);
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for (r, cr) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r));
                cr[0] = _mm256_fmadd_ps(av, b0, cr[0]);
                cr[1] = _mm256_fmadd_ps(av, b1, cr[1]);
            }
            a = a.add(MR);
            b = b.add(NR);
        }
        for (r, cr) in acc.iter().enumerate() {
            let p = c.add(r * ldc);
            if add {
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), cr[0]));
                _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), cr[1]));
            } else {
                _mm256_storeu_ps(p, cr[0]);
                _mm256_storeu_ps(p.add(8), cr[1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// The AVX-512 microkernel: an (H * MR) x (P * NR) block of C from H = 1 or 2 adjacent
    /// MR-high A panels and P = 1 or 2 adjacent 16-wide B panels (up to 24 16-lane accumulators)
    /// over the kc-deep panels. Only `rows` x `cols` of it are stored, a partial last panel's
    /// columns under a mask, so edge blocks need no buffer. Panel q's columns go to `c[q]` (for a
    /// plain block `c[1] = c[0] + NR`).
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `a` holds H * kc * MR readable values (panel h at `a + h * kc *
    /// MR`) and `b` P * kc * NR (panel q at `b + q * kc * NR`); each `c[q]` is valid for `rows`
    /// rows of panel q's columns (NR, fewer in the last panel: cols - q * NR) at stride `ldc`,
    /// written by no one else during the call; 0 < rows <= H * MR, (P - 1) * NR < cols <= P * NR.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub unsafe fn kernel<const H: usize, const P: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: [*mut f32; P],
        ldc: usize,
        rows: usize,
        cols: usize,
        add: bool,
    ) {
        for r in 0..rows {
            for (q, c) in c.iter().enumerate() {
                let last = (cols - q * NR).min(NR) - 1;
                _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + last) as *const i8);
            }
        }
        let mut acc = [[[_mm512_setzero_ps(); P]; MR]; H];
        for p in 0..kc {
            let bv: [__m512; P] =
                std::array::from_fn(|q| _mm512_loadu_ps(b.add((q * kc + p) * NR)));
            for (h, acc) in acc.iter_mut().enumerate() {
                let a = a.add((h * kc + p) * MR);
                for (r, cr) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r));
                    for q in 0..P {
                        cr[q] = _mm512_fmadd_ps(av, bv[q], cr[q]);
                    }
                }
            }
        }
        if rows == H * MR && cols == P * NR {
            // A whole tile: every store at a constant index, so the accumulators go straight
            // from their registers (the general loop below spills them to the stack first, a
            // cost that shows on shallow products such as Winograd's 64-deep ones).
            for (h, acc) in acc.iter().enumerate() {
                for (r, cr) in acc.iter().enumerate() {
                    for (q, &v) in cr.iter().enumerate() {
                        let p = c[q].add((h * MR + r) * ldc);
                        let v = if add {
                            _mm512_add_ps(_mm512_loadu_ps(p), v)
                        } else {
                            v
                        };
                        _mm512_storeu_ps(p, v);
                    }
                }
            }
            return;
        }
        store_part(acc, c, ldc, rows, cols, add);
    }

    /// The `rows` x `cols` part of an edge tile stored from `acc`. A function of its own, taking
    /// the accumulators by value: indexed by row at run time, they must live in memory, and
    /// inside `kernel` that made the whole array a stack array zero-filled by a `memset` call at
    /// every call (whole tiles too).
    ///
    /// # Safety
    /// As for `kernel`.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    unsafe fn store_part<const H: usize, const P: usize>(
        acc: [[[__m512; P]; MR]; H],
        c: [*mut f32; P],
        ldc: usize,
        rows: usize,
        cols: usize,
        add: bool,
    ) {
        // Columns of each panel to store: all 16 but in the last one.
        let masks: [__mmask16; P] = std::array::from_fn(|q| {
            let n = cols.saturating_sub(q * NR).min(NR);
            ((1u32 << n) - 1) as __mmask16
        });
        let full = cols == P * NR;
        for (r, cr) in acc.iter().flatten().enumerate().take(rows) {
            for q in 0..P {
                let p = c[q].add(r * ldc);
                if full {
                    // Unmasked: masked stores are slow on some CPUs (AMD Zen 4).
                    let v = if add {
                        _mm512_add_ps(_mm512_loadu_ps(p), cr[q])
                    } else {
                        cr[q]
                    };
                    _mm512_storeu_ps(p, v);
                } else {
                    let v = if add {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(masks[q], p), cr[q])
                    } else {
                        cr[q]
                    };
                    _mm512_mask_storeu_ps(p, masks[q], v);
                }
            }
        }
    }
}

/// A 2-D f32 view of a Candle tensor's storage: (rows, cols, MatRef).
fn view<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<(usize, usize, MatRef<'a>)> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: expected f32, got {:?}", s.dtype());
    };
    let (rows, cols) = l.shape().dims2()?;
    let st = l.stride();
    let start = l.start_offset();
    let end = if rows == 0 || cols == 0 {
        start
    } else {
        start + (rows - 1) * st[0] + (cols - 1) * st[1] + 1
    };
    Ok((
        rows,
        cols,
        MatRef {
            data: &data[start..end],
            rs: st[0],
            cs: st[1],
        },
    ))
}

/// `a [m, k] x b [k, n]` with our kernel; its backward is two more products of (transposed) views.
struct MatMul;

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "sgemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, a) = view(s1, l1, "matmul")?;
        let (k2, n, b) = view(s2, l2, "matmul")?;
        if k != k2 {
            candle_core::bail!("matmul: [{m}, {k}] x [{k2}, {n}] do not fit");
        }
        let mut c = vec![0f32; m * n];
        sgemm(m, n, k, a, b, &mut c, n, false);
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(matmul(grad, &b.t()?)?), Some(matmul(&a.t()?, grad)?)))
    }
}

/// Matrix product of two 2-D tensors, differentiable in both: our kernel for f32 on the CPU,
/// Candle's `matmul` otherwise.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == candle_core::DType::F32 && b.dtype() == a.dtype() {
        a.apply_op2(b, MatMul)
    } else {
        a.matmul(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_the_definition() {
        // Multiples of 8 and not, one row, one column (the 8 x 8 blocks and the scalar edges).
        for (rows, cols) in [(16, 24), (13, 29), (8, 8), (1, 9), (9, 1), (512, 72)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at ({r}, {c})"
                    );
                }
            }
        }
    }

    fn naive(m: usize, n: usize, k: usize, a: MatRef, b: MatRef) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_a_naive_product_for_edge_sizes_strides_and_accumulation() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 3),
            (13, 33, 300),
            (96, 256, 256),
            (7, 33, 2600), // split by depth between threads
            (20, 40, 5000),
            (100, 300, 520),
            (6, 16, 0),
        ] {
            let a = values(m * k, 1);
            let bt = values(k * n, 2); // stored transposed: b(p, j) = bt[j * k + p]
            let (av, bv) = (
                MatRef {
                    data: &a,
                    rs: k,
                    cs: 1,
                },
                MatRef {
                    data: &bt,
                    rs: 1,
                    cs: k,
                },
            );
            let expected = naive(m, n, k, av, bv);
            let ldc = n + 3;
            let mut c = vec![0.5f32; m * ldc];
            sgemm(m, n, k, av, bv, &mut c, ldc, true);
            for i in 0..m {
                for j in 0..n {
                    let got = c[i * ldc + j] as f64;
                    let want = expected[i * n + j] + 0.5;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{m}x{n}x{k} ({i},{j}): {got} vs {want}"
                    );
                }
                assert!(
                    c[i * ldc + n..i * ldc + ldc].iter().all(|&v| v == 0.5),
                    "wrote past column n"
                );
            }
            // Overwriting: the zero-padded edge columns must not be stored either (when
            // accumulating they add zero, so only this pass shows a store past column n).
            sgemm(m, n, k, av, bv, &mut c, ldc, false);
            for i in 0..m {
                for j in 0..n {
                    let (got, want) = (c[i * ldc + j] as f64, expected[i * n + j]);
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{m}x{n}x{k} ({i},{j}), overwriting: {got} vs {want}"
                    );
                }
                assert!(
                    c[i * ldc + n..i * ldc + ldc].iter().all(|&v| v == 0.5),
                    "{m}x{n}x{k}: overwriting wrote past column n"
                );
            }
        }
    }

    #[test]
    fn a_prepacked_b_gives_the_same_product() {
        /// B packed from a plain matrix, as the GEMM packs its strips.
        struct FromMat<'a>(MatRef<'a>);
        impl PanelSource for FromMat<'_> {
            fn pack(&self, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]) {
                pack_b_strip(self.0, j0, j1, pc, kc, strip)
            }
        }
        // Columns past a panel, several depth blocks, the depth split between threads.
        for &(m, n, k) in &[(7, 17, 3), (13, 33, 300), (7, 33, 2600), (100, 300, 520)] {
            let (a, b) = (values(m * k, 3), values(k * n, 4));
            let av = MatRef {
                data: &a,
                rs: k,
                cs: 1,
            };
            let bv = MatRef {
                data: &b,
                rs: n,
                cs: 1,
            };
            let mut want = vec![0f32; m * n];
            sgemm(m, n, k, av, bv, &mut want, n, false);
            let packed = PackedB::pack(&FromMat(bv), k, n);
            let mut got = vec![1f32; m * n];
            let (a_op, b_op) = (AOperand::Mat(av), BOperand::Prepacked(&packed));
            sgemm_with(m, n, k, a_op, b_op, &mut got, CLayout::rows(n), false);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "{m}x{n}x{k}: the prepacked product differs"
            );
        }
    }

    #[test]
    fn writes_a_grouped_layout_including_straddling_tiles_and_split_depth() {
        // C [m, groups * group] stored as groups of `group` columns, each an m x group block at
        // stride ldc, blocks `group_stride` apart with a gap that must stay untouched.
        // Groups wider than a tile, one tile wide, and several per tile (a 2x2 feature map).
        for (m, group, groups, k) in [
            (7, 37, 3, 300),
            (7, 37, 3, 2600),
            (13, 16, 5, 40),
            (25, 16, 7, 300), // one sample per panel (AVX-512: both panels in one call)
            (13, 4, 21, 300),
        ] {
            let n = group * groups;
            let a = values(m * k, 3);
            let b = values(k * n, 4);
            let (av, bv) = (
                MatRef {
                    data: &a,
                    rs: k,
                    cs: 1,
                },
                MatRef {
                    data: &b,
                    rs: n,
                    cs: 1,
                },
            );
            let expected = naive(m, n, k, av, bv);
            let cl = CLayout {
                ldc: group,
                group,
                group_stride: m * group + 5,
            };
            for accumulate in [false, true] {
                let mut c = vec![0.5f32; groups * cl.group_stride];
                sgemm_with(
                    m,
                    n,
                    k,
                    AOperand::Mat(av),
                    BOperand::Mat(bv),
                    &mut c,
                    cl,
                    accumulate,
                );
                let base = if accumulate { 0.5 } else { 0.0 };
                for g in 0..groups {
                    let block = &c[g * cl.group_stride..][..cl.group_stride];
                    for i in 0..m {
                        for q in 0..group {
                            let got = block[i * group + q] as f64;
                            let want = expected[i * n + g * group + q] + base;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "k {k} group {g} ({i},{q}): {got} vs {want}"
                            );
                        }
                    }
                    assert!(
                        block[m * group..].iter().all(|&v| v == 0.5),
                        "k {k}: wrote into the gap after group {g}"
                    );
                }
            }
        }
    }
}

//! Winograd F(2x2, 3x3) for the 3x3 stride-1 padding-1 convolutions, which are ~80% of a
//! ResNet-18 + DAN step's multiply-adds (every trunk 3x3 but the three stride-2 ones, and the
//! heads' 3x3). Each 2x2 block of outputs ("tile") is computed from the 4x4 input patch around it
//! with 16 multiplies per (input, output) channel pair instead of 36: the input patch is
//! transformed (V = Bᵀ d B), the weights too (U = G g Gᵀ), the 16 products U·V summed over input
//! channels by 16 GEMMs, and the result transformed back (Y = Aᵀ M A). Same sums, rounded
//! differently (the transforms add and subtract a few values first); the fixtures still pass at
//! float32 tolerance. PyTorch's CPU backend (oneDNN) computes these convolutions directly.
//! `FER_CONV` picks where it is used (ARCHITECTURE.md, "Winograd and small-map convolutions").
//!
//! Work is done in chunks of tiles, one thread each: the chunk's transformed input, its 16
//! products and their transform back stay in the thread's L2 instead of streaming ~4x the input
//! and ~4x the output through memory between passes. With few tiles the 16 products are split
//! between the threads instead, so each transformed weight matrix is read once.

use rayon::prelude::*;

use super::algorithm::{algorithm, Algorithm};
use super::Dims;
use crate::ops::gemm::{sgemm, sgemm_serial, AOperand, MatRef, PackedA, KC, MR};
use crate::ops::{give_scratch, split_even_odd, take_scratch};

/// Fewest tiles (2x2 output blocks over the batch) for which `Auto` picks Winograd when the
/// weights are transformed at every call. Measured on the 2-core Zen 4 machine (`conv_probe`,
/// docs/cpu-kernels.md): 64 tiles win 1.1-1.3x (a 512-channel layer4 at 112 px, batch 16) or
/// break even (at 224 px, batch 4); 32 tiles lose at 512 channels.
const MIN_TILES: usize = 64;

/// The same for an input gradient (the weights flipped and transposed, their transform read with
/// a stride). On the 2-core Xeon (`FER_OP_TIMES=1`, 112 px batch 16, four alternating rounds)
/// the direct GEMM for the 64-tile layers (layer4 and the heads' 3x3) took the step's input
/// gradient from 0.108-0.117 to 0.103-0.113 s, while their forward stays faster by Winograd;
/// 256 tiles and more (every other layer measured) keep Winograd. Any value in 65..=256 fits
/// these measurements.
const MIN_TILES_INPUT_GRADIENT: usize = 128;

/// The same when the transformed weights are kept (`PreparedWeights`, the inference form): then
/// even 8 tiles win (`conv_probe -- 128 2 "" prepared`: layer4 3x3 1.19 / 1.42 -> 0.98 / 1.16 ms).
const MIN_TILES_PREPARED: usize = 8;

/// Whether the weight gradient of geometry `d` with `o` output channels is computed here. With
/// `auto` (AVX2 and up, as the forward): at least 128 input and output channels and side x
/// channels of at least 3584 (224 px layer2, 28x28 x 128, and layer3, 14x14 x 256), where
/// `weight_gradient` beat the direct GEMM on the 2-core Zen 4 machine (2 threads, best of 5, three
/// alternating runs, ms: 19.6 -> 16.0 and 20.9 -> 13.4). It lost or tied on every smaller shape
/// measured (docs/cpu-kernels.md, "Winograd F(2x2, 3x3)"): there the transposed operand's packing
/// and the 16 deep products eat the 2.25x fewer multiplies.
pub(super) fn applies_to_weight_gradient(d: &Dims, o: usize) -> bool {
    chosen(d, || d.c.min(o) >= 128 && d.h.min(d.w) * d.c >= 3584)
}

/// Whether Winograd computes a convolution of geometry `d`: never unless the geometry fits, then
/// as `FER_CONV` says, and under `auto` where `auto_picks` (the measured rule) on machines with
/// AVX2 + FMA or AVX-512, where the multiplies it saves outweigh its transforms (measured at
/// both levels: docs/cpu-kernels.md, "A fifth session"); the portable kernels keep the direct
/// GEMM (not measured).
fn chosen(d: &Dims, auto_picks: impl FnOnce() -> bool) -> bool {
    if !geometry_fits(d) {
        return false;
    }
    match algorithm() {
        Algorithm::Direct => false,
        Algorithm::Winograd => true,
        Algorithm::Auto => crate::ops::isa::avx2() && auto_picks(),
    }
}

/// 3x3 kernel, stride 1, padding 1: the geometry Winograd F(2x2, 3x3) computes here.
fn geometry_fits(d: &Dims) -> bool {
    d.g.kernel == (3, 3) && d.g.stride == (1, 1) && d.g.padding == (1, 1)
}

/// Whether the convolution of geometry `d` (forward, or the input gradient's) is computed here;
/// `prepared`: its transformed weights are kept from call to call.
pub(super) fn applies(d: &Dims, prepared: bool) -> bool {
    applies_with(
        d,
        if prepared {
            MIN_TILES_PREPARED
        } else {
            MIN_TILES
        },
    )
}

/// `applies` for the input gradient of a convolution, `d` its geometry as a forward convolution
/// of the output gradient.
pub(super) fn applies_to_input_gradient(d: &Dims) -> bool {
    applies_with(d, MIN_TILES_INPUT_GRADIENT)
}

/// `applies` with `Auto`'s threshold given.
fn applies_with(d: &Dims, min_tiles: usize) -> bool {
    chosen(d, || d.b * d.h.div_ceil(2) * d.w.div_ceil(2) >= min_tiles)
}

/// How the [O, C, 3, 3] weights are read.
#[derive(Clone, Copy)]
pub(super) enum Weights<'a> {
    /// As they are: y = x ⋆ w.
    Forward(&'a [f32]),
    /// Flipped in space and transposed in channels: the input gradient of a 3x3 stride-1
    /// padding-1 convolution is the output gradient correlated with them, again 3x3 padding 1.
    InputGradient(&'a [f32]),
}

/// Tiles per chunk: the chunk's transformed input (16 x C x TILES floats: 1 MB at C = 128) and
/// products stay in L2-ish caches, and the 16 GEMMs of a chunk are each at least TILES wide.
const TILES: usize = 128;

/// Tiles per chunk for `tiles` tiles on `threads` threads: a multiple of 16 up to TILES, the
/// largest that makes the number of chunks a multiple of the thread count, at least two per
/// thread (so each thread gets the same share: 13 chunks of 128 at 1568 tiles left one thread
/// idle for one chunk's time, 14 of 112 do not); where none does, the largest that gives two
/// chunks per thread.
fn chunk_tiles(tiles: usize, threads: usize) -> usize {
    let units = tiles.div_ceil(16);
    let chunks = |per: usize| units.div_ceil(per);
    let most = (TILES / 16).min(units.div_ceil(2 * threads)).max(1);
    let even = (1..=most)
        .rev()
        .find(|&per| chunks(per).is_multiple_of(threads) && chunks(per) >= 2 * threads);
    16 * even.unwrap_or(most)
}

/// Tiles transformed per call, at most: the row buffers stay small (and cheap to zero).
const GROUP: usize = 16;

/// `x` [B, C, H, W] correlated with the 3x3 weights, plus `bias` [O]: [B, O, H, W]. `o` is the
/// number of output channels, `d.c` of input channels (both after any transposition).
pub(super) fn conv3x3(x: &[f32], w: Weights, bias: Option<&[f32]>, o: usize, d: &Dims) -> Vec<f32> {
    let mut packed = take_scratch(16 * PackedA::len(o, d.c));
    transform_weights(w, o, d.c, &mut packed[..16 * PackedA::len(o, d.c)]);
    let y = conv3x3_prepared(x, &packed, bias, o, d);
    give_scratch(packed);
    y
}

/// The forward weights [O, C, 3, 3] transformed for `conv3x3_prepared`: 16 packed matrices.
pub(super) fn prepare(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * PackedA::len(o, c)];
    transform_weights(Weights::Forward(w), o, c, &mut u);
    u
}

/// `conv3x3` with the weights already transformed (`prepare`, or `transform_weights`).
pub(super) fn conv3x3_prepared(
    x: &[f32],
    packed: &[f32],
    bias: Option<&[f32]>,
    o: usize,
    d: &Dims,
) -> Vec<f32> {
    let geom = Geometry::of(d.c, d);
    let (b, c) = (d.b, d.c);
    let tiles = geom.tiles(b);
    if tiles < FEW_TILES {
        return conv3x3_few_tiles(x, packed, bias, o, d);
    }
    // The 16 transformed weight matrices U_k [O, C], each in the GEMM's packed layout.
    let len = PackedA::len(o, c);
    let u_k: Vec<PackedA> = packed[..16 * len]
        .chunks_exact(len)
        .map(|u| PackedA::from_packed(u, o, c))
        .collect();
    // Unfilled: the output transform writes every value (the tiles cover each map).
    let mut y = crate::ops::unfilled(b * o * d.h * d.w);
    let per_chunk = chunk_tiles(tiles, rayon::current_num_threads());
    let chunks = tiles.div_ceil(per_chunk);
    let y_ptr = SendPtr(y.as_mut_ptr().cast());
    let padded = pad_input(x, b, &geom);
    let xp = &padded[..b * geom.padded_sample()];
    (0..chunks).into_par_iter().for_each(|ci| {
        let (t0, t1) = (ci * per_chunk, ((ci + 1) * per_chunk).min(tiles));
        let n = t1 - t0;
        // V [C][16][n], then M [O][16][n].
        let mut v = take_scratch(c * 16 * n);
        input_transform(xp, &geom, t0, t1, &mut v[..c * 16 * n]);
        let mut m = take_scratch(o * 16 * n);
        for k in 0..16 {
            sgemm_serial(
                o,
                n,
                c,
                AOperand::Prepacked(u_k[k]),
                MatRef {
                    data: &v[k * n..],
                    rs: 16 * n,
                    cs: 1,
                },
                &mut m[k * n..],
                16 * n,
                false,
            );
        }
        give_scratch(v);
        for (oc, mo) in m[..o * 16 * n].chunks_exact(16 * n).enumerate() {
            let bias = bias.map_or(0.0, |bs| bs[oc]);
            // SAFETY: chunks hold disjoint tile ranges, and a tile's outputs (the 2x2 block of
            // every output channel) belong to that tile alone, so no two tasks write one value of
            // y, whose length is b * o * h * wd.
            unsafe { output_transform_channel(mo, n, bias, oc, o, &geom, (t0, t1), &y_ptr) };
        }
        give_scratch(m);
    });
    give_scratch(padded);
    // SAFETY: every chunk's tiles went through the output transform, and the tiles' 2x2 blocks
    // (clipped to the map) cover every value of every output plane.
    unsafe { crate::ops::assume_filled(y) }
}

/// The weight gradient [O, C, 3, 3] of y = x ⋆ w (3x3, stride 1, padding 1) from x [B, C, H, W]
/// and the output gradient dy [B, O, H, W]. The forward is Y = Aᵀ (Σ_c U ⊙ V) A per tile, so
/// dU[o, c] = Σ over tiles of (A dY Aᵀ)[o] ⊙ V[c] (16 GEMMs [O, tiles] x [tiles, C], 16 multiplies
/// per tile and channel pair instead of 36) and dw = Gᵀ dU G.
pub(super) fn weight_gradient(x: &[f32], dy: &[f32], o: usize, d: &Dims) -> Vec<f32> {
    let (b, c) = (d.b, d.c);
    let (gx, gy) = (Geometry::of(c, d), Geometry::of(o, d));
    let tiles = gx.tiles(b);
    let (xp, yp) = (pad_input(x, b, &gx), pad_input(dy, b, &gy));
    let (xp_s, yp_s) = (&xp[..b * gx.padded_sample()], &yp[..b * gy.padded_sample()]);
    // All tiles at once (V [C][16][T], dM [O][16][T]): each of the 16 products is then one deep
    // GEMM, which splits its depth (the tiles) between the threads and keeps its small result
    // in cache, instead of re-reading 16 partial results per chunk of tiles.
    let t = tiles;
    let mut v = take_scratch(c * 16 * t);
    v[..c * 16 * t]
        .par_chunks_mut(16 * t)
        .enumerate()
        .for_each(|(ci, vc)| input_transform_channel(xp_s, &gx, ci, 0, t, vc));
    let mut dm = take_scratch(o * 16 * t);
    dm[..o * 16 * t]
        .par_chunks_mut(16 * t)
        .enumerate()
        .for_each(|(oc, mo)| gradient_transform_channel(yp_s, &gy, oc, t, mo));
    give_scratch(xp);
    give_scratch(yp);
    let du_len = 16 * o * c;
    let mut du = take_scratch(du_len);
    for k in 0..16 {
        // dU_k [O, C] = dM_k [O, T] x V_kᵀ [T, C].
        let a = MatRef {
            data: &dm[k * t..],
            rs: 16 * t,
            cs: 1,
        };
        let vt = MatRef {
            data: &v[k * t..],
            rs: 1,
            cs: 16 * t,
        };
        sgemm(o, c, t, a, vt, &mut du[k * o * c..][..o * c], c, false);
    }
    give_scratch(v);
    give_scratch(dm);
    let mut dw = vec![0f32; o * c * 9];
    dw.par_chunks_mut(c * 9).enumerate().for_each(|(oc, row)| {
        for (ci, g) in row.chunks_exact_mut(9).enumerate() {
            let u: [f32; 16] = std::array::from_fn(|k| du[(k * o + oc) * c + ci]);
            g.copy_from_slice(&untransform_weights(&u));
        }
    });
    give_scratch(du);
    dw
}

/// Gᵀ dU G: the gradient of the 3x3 taps from the gradient of their 16 transformed values.
fn untransform_weights(u: &[f32; 16]) -> [f32; 9] {
    // Gᵀ = [[1, ½, ½, 0], [0, ½, -½, 0], [0, ½, ½, 1]] applied to a 4-vector.
    let gt = |a: f32, b: f32, c: f32, d: f32| [a + 0.5 * (b + c), 0.5 * (b - c), 0.5 * (b + c) + d];
    // Down the columns, then along the rows.
    let cols: [[f32; 3]; 4] = std::array::from_fn(|j| gt(u[j], u[4 + j], u[8 + j], u[12 + j]));
    let mut g = [0f32; 9];
    for r in 0..3 {
        g[r * 3..][..3].copy_from_slice(&gt(cols[0][r], cols[1][r], cols[2][r], cols[3][r]));
    }
    g
}

/// dM = A dY Aᵀ for every tile of output-gradient channel oc into its 16 rows `mo` (each `tiles`
/// long), dY the tile's 2x2 gradient read from the padded `yp` (zero past the map's edge):
/// A = [[1, 0], [1, 1], [1, -1], [0, -1]].
fn gradient_transform_channel(yp: &[f32], g: &Geometry, oc: usize, tiles: usize, mo: &mut [f32]) {
    let (n, plane) = (tiles, g.padded_plane());
    let (_, wp) = g.padded();
    let half = wp / 2;
    g.for_each_run(0, tiles, |at, bi, ty, tx0, run| {
        let yc = &yp[(bi * g.c + oc) * plane..][..plane];
        // Tile column 0 is padded column 2 tx + 1 (odd: odd[tx]), column 1 is 2 tx + 2
        // (even[tx + 1]); rows are padded rows 2 ty + 1 and 2 ty + 2.
        for tx in tx0..tx0 + run {
            let row = |r: usize| (2 * ty + 1 + r) * wp;
            let d = [
                [yc[row(0) + half + tx], yc[row(0) + tx + 1]],
                [yc[row(1) + half + tx], yc[row(1) + tx + 1]],
            ];
            // A down the columns, then Aᵀ along the rows.
            let a = |v0: f32, v1: f32| [v0, v0 + v1, v0 - v1, -v1];
            let cols = [a(d[0][0], d[1][0]), a(d[0][1], d[1][1])];
            for i in 0..4 {
                for (j, v) in a(cols[0][i], cols[1][i]).into_iter().enumerate() {
                    mo[(4 * i + j) * n + at + tx - tx0] = v;
                }
            }
        }
    });
}

/// Below this many tiles `conv3x3_prepared` splits the 16 products between the threads instead of
/// the tiles: chunks of a few tiles would each stream all 16 transformed weight matrices. 512
/// (not 256) puts the 256-tile layers here, which made 112 px inference faster on the Xeon
/// (docs/cpu-kernels.md, "A fourth session").
const FEW_TILES: usize = 512;

/// `conv3x3_prepared` for few tiles: the input transform of every tile first, then one thread per
/// product M_k = U_k V_k (each U_k read once), then the output transform per output channel.
fn conv3x3_few_tiles(
    x: &[f32],
    packed: &[f32],
    bias: Option<&[f32]>,
    o: usize,
    d: &Dims,
) -> Vec<f32> {
    let (b, c) = (d.b, d.c);
    let geom = Geometry::of(c, d);
    let t = geom.tiles(b);
    let padded = pad_input(x, b, &geom);
    let xp = &padded[..b * geom.padded_sample()];
    // V [C][16][T].
    let mut v = take_scratch(c * 16 * t);
    v[..c * 16 * t]
        .par_chunks_mut(16 * t)
        .enumerate()
        .for_each(|(ci, vc)| input_transform_channel(xp, &geom, ci, 0, t, vc));
    // M [16][O][T]: product k is one task's contiguous block.
    let len = PackedA::len(o, c);
    let mut m = take_scratch(16 * o * t);
    m[..16 * o * t]
        .par_chunks_mut(o * t)
        .enumerate()
        .for_each(|(k, mk)| {
            let u = PackedA::from_packed(&packed[k * len..][..len], o, c);
            let vk = MatRef {
                data: &v[k * t..],
                rs: 16 * t,
                cs: 1,
            };
            sgemm_serial(o, t, c, AOperand::Prepacked(u), vk, mk, t, false);
        });
    give_scratch(v);
    give_scratch(padded);
    // Unfilled: the output transform writes every value (the tiles cover each map).
    let mut y = crate::ops::unfilled(b * o * d.h * d.w);
    let y_ptr = SendPtr(y.as_mut_ptr().cast());
    let m_all = &m[..16 * o * t];
    (0..o).into_par_iter().for_each(|oc| {
        // Channel oc's 16 rows lie o * T apart.
        let bias = bias.map_or(0.0, |bs| bs[oc]);
        // SAFETY: one task per output channel, and y holds b * o * h * wd values.
        unsafe {
            output_transform_channel(&m_all[oc * t..], o * t, bias, oc, o, &geom, (0, t), &y_ptr)
        };
    });
    give_scratch(m);
    // SAFETY: every output channel's tiles went through the output transform, and the tiles'
    // 2x2 blocks (clipped to the map) cover every value of its planes.
    unsafe { crate::ops::assume_filled(y) }
}

/// Channels, map size and tiles per column and row of one convolution.
#[derive(Clone, Copy)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Geometry {
    /// The tiling of `d`'s maps, for a tensor of `c` channels.
    fn of(c: usize, d: &Dims) -> Geometry {
        let (h, w) = (d.h, d.w);
        Geometry {
            c,
            h,
            w,
            th: h.div_ceil(2),
            tw: w.div_ceil(2),
        }
    }

    /// Tiles over the batch.
    fn tiles(&self, batch: usize) -> usize {
        batch * self.th * self.tw
    }

    /// Rows and row length of a padded input plane: one zero row or column before the map, and
    /// after it as many as the last tile's 4x4 patch needs (one, or two for an odd side). Each row
    /// is stored split, its even columns then its odd ones, so that the patches of a run of tiles
    /// read contiguous values.
    fn padded(&self) -> (usize, usize) {
        (2 * self.th + 2, 2 * self.tw + 2)
    }

    fn padded_plane(&self) -> usize {
        let (hp, wp) = self.padded();
        hp * wp
    }

    /// The padded planes of one sample.
    fn padded_sample(&self) -> usize {
        self.c * self.padded_plane()
    }

    /// Sample, tile row and tile column of tile t.
    #[inline(always)]
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let per_sample = self.th * self.tw;
        let (b, rem) = (t / per_sample, t % per_sample);
        (b, rem / self.tw, rem % self.tw)
    }

    /// Splits tiles t0..t1 into runs along one tile row, at most GROUP long:
    /// `f(offset from t0, sample, tile row, first tile column, run)`.
    #[inline(always)]
    fn for_each_run(
        &self,
        t0: usize,
        t1: usize,
        mut f: impl FnMut(usize, usize, usize, usize, usize),
    ) {
        let (mut b, mut ty, mut tx) = self.tile(t0);
        let mut t = t0;
        while t < t1 {
            let run = (self.tw - tx).min(t1 - t).min(GROUP);
            f(t - t0, b, ty, tx, run);
            t += run;
            tx += run;
            if tx == self.tw {
                tx = 0;
                ty += 1;
                if ty == self.th {
                    ty = 0;
                    b += 1;
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint parts of one buffer from rayon tasks (see `conv3x3`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the Sync wrapper and not the raw field).
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// U = G g Gᵀ per (output, input) channel pair into `u`: 16 matrices [O, C], each in the
/// GEMM's packed layout (`PackedA::index`, zeros past row O), one after the other.
/// G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]].
///
/// One task per (row panel, depth block): in the packed layout its MR rows x kc columns are one
/// contiguous run in each of the 16 matrices, written in order, 16 pairs at a time
/// (`transform_run`). Written pair by pair into the 16 scattered places instead, the transform
/// took ~6 ms for a 512 x 512 layer, more than the Winograd product it feeds.
fn transform_weights(w: Weights, o: usize, c: usize, u: &mut [f32]) {
    let len = PackedA::len(o, c);
    assert_eq!(u.len(), 16 * len);
    let panels = o.div_ceil(MR);
    let u_ptr = SendPtr(u.as_mut_ptr());
    (0..panels * c.div_ceil(KC))
        .into_par_iter()
        .for_each(|task| {
            let (panel, pc) = (task % panels, task / panels * KC);
            let kc = KC.min(c - pc);
            let start = PackedA::index(o, c, panel * MR, pc);
            // SAFETY: `PackedA::index` is one-to-one over (row, column) pairs, and panel `panel`'s
            // depth block at `pc` is the run start..start + MR * kc of each packed matrix (rows
            // past O included), inside `len`; tasks have distinct (panel, block) pairs, so the 16
            // runs of one task are disjoint from each other and from every other task's.
            let mut runs: [&mut [f32]; 16] = std::array::from_fn(|k| unsafe {
                std::slice::from_raw_parts_mut(u_ptr.get().add(k * len + start), MR * kc)
            });
            #[cfg(target_arch = "x86_64")]
            if crate::ops::isa::avx512() {
                if let Some((base, strides)) = w.tap_layout(o, c, panel * MR, pc) {
                    // SAFETY: AVX-512 is present; `tap_layout` checked that every tap of rows
                    // panel * MR.. < o and columns pc..pc + kc lies inside the weights at an
                    // offset below 2^31 from `base`.
                    unsafe {
                        let rows = o - panel * MR;
                        avx512::transform_run(base, strides, rows.min(MR), &mut runs)
                    };
                    return;
                }
            }
            transform_run(w, o, c, panel * MR, pc, &mut runs);
        });
}

simd_dispatch!(
    /// The 16 packed runs of row panel i0.. and depth block pc.. (`transform_weights`): value f
    /// of each run is row i0 + f % MR, column pc + f / MR. Sixteen pairs at a time, so the sums
    /// are 16-lane vector operations and each run is written in 16-value stores.
    fn transform_run(w: Weights, o: usize, c: usize, i0: usize, pc: usize, runs: &mut [&mut [f32]; 16]) -> () = transform_run_body
);

#[inline(always)]
fn transform_run_body(
    w: Weights,
    o: usize,
    c: usize,
    i0: usize,
    pc: usize,
    runs: &mut [&mut [f32]; 16],
) {
    let run = runs[0].len();
    let (mut r, mut j) = (0, pc);
    for f0 in (0..run).step_by(16) {
        let n = 16.min(run - f0);
        // g[tap][lane]: the 9 taps of 16 consecutive (row, column) pairs; zeros past row O.
        let mut g = [[0f32; 16]; 9];
        for l in 0..n {
            if i0 + r < o {
                let taps = weight_taps(w, o, c, i0 + r, j);
                for t in 0..9 {
                    g[t][l] = taps[t];
                }
            }
            r += 1;
            if r == MR {
                (r, j) = (0, j + 1);
            }
        }
        // The operations of `transform`, lane by lane: columns first (G g), then rows.
        let mut cols = [[[0f32; 16]; 4]; 3];
        for kx in 0..3 {
            gv16(&g[kx], &g[3 + kx], &g[6 + kx], &mut cols[kx]);
        }
        let mut vals = [[0f32; 16]; 4];
        for row in 0..4 {
            gv16(&cols[0][row], &cols[1][row], &cols[2][row], &mut vals);
            for (col, v) in vals.iter().enumerate() {
                runs[row * 4 + col][f0..f0 + n].copy_from_slice(&v[..n]);
            }
        }
    }
}

/// G applied to 16 triples (a, b, c) at once: (a, ½(a + b + c), ½(a - b + c), c).
#[inline(always)]
fn gv16(a: &[f32; 16], b: &[f32; 16], c: &[f32; 16], out: &mut [[f32; 16]; 4]) {
    for l in 0..16 {
        out[0][l] = a[l];
        out[1][l] = 0.5 * (a[l] + b[l] + c[l]);
        out[2][l] = 0.5 * (a[l] - b[l] + c[l]);
        out[3][l] = c[l];
    }
}

impl Weights<'_> {
    /// Where the taps of (row i0 + r, column j0 + jl) of the transformed matrix [o, c] lie: at
    /// `base + r * si + jl * sj + t` for tap t (8 - t when `reversed`), as (base, (si, sj,
    /// reversed)). None when some offset of the matrix would not fit a 32-bit gather index.
    fn tap_layout(
        &self,
        o: usize,
        c: usize,
        i0: usize,
        j0: usize,
    ) -> Option<(*const f32, (usize, usize, bool))> {
        let (w, start, strides) = match *self {
            Weights::Forward(w) => (w, (i0 * c + j0) * 9, (c * 9, 9, false)),
            Weights::InputGradient(w) => (w, (j0 * o + i0) * 9, (9, o * 9, true)),
        };
        assert!(
            w.len() >= o * c * 9,
            "3x3 weights: {} values for {o}x{c}",
            w.len()
        );
        (w.len() < i32::MAX as usize).then(|| (w[start..].as_ptr(), strides))
    }
}

/// The 3x3 taps g of output channel i and input channel j, as `w` is read.
#[inline(always)]
fn weight_taps(w: Weights, o: usize, c: usize, i: usize, j: usize) -> [f32; 9] {
    match w {
        Weights::Forward(w) => w[(i * c + j) * 9..][..9].try_into().expect("9 taps"),
        // Output channel i of the gradient convolution is input channel i of the weights, its
        // input channel j their output channel j; taps reversed.
        Weights::InputGradient(w) => {
            let mut g: [f32; 9] = w[(j * o + i) * 9..][..9].try_into().expect("9 taps");
            g.reverse();
            g
        }
    }
}

/// G g Gᵀ of the 3x3 weights of output channel i and input channel j, as 16 values (row-major):
/// the definition `transform_run` vectorises (tests compare the two).
#[cfg(test)]
fn transform(w: Weights, o: usize, c: usize, i: usize, j: usize) -> [f32; 16] {
    let g = weight_taps(w, o, c, i, j);
    let gv = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    // Columns first (G g), then rows ((G g) Gᵀ).
    let cols: [[f32; 4]; 3] = [0, 1, 2].map(|kx| gv(g[kx], g[3 + kx], g[6 + kx]));
    let mut out = [0f32; 16];
    for r in 0..4 {
        out[r * 4..][..4].copy_from_slice(&gv(cols[0][r], cols[1][r], cols[2][r]));
    }
    out
}

/// `x` [B, C, H, W] copied into a scratch buffer [B, C, Hp, Wp] (its first `b` x
/// `padded_sample` values) with the zero border and split rows of `Geometry::padded`: padded
/// column s (input column s - 1) is at s / 2, or at Wp / 2 + s / 2 when s is odd.
fn pad_input(x: &[f32], b: usize, g: &Geometry) -> Vec<f32> {
    let mut xp = take_scratch(b * g.padded_sample());
    xp[..b * g.padded_sample()]
        .par_chunks_mut(g.padded_plane())
        .zip(x.par_chunks(g.h * g.w))
        .for_each(|(dst, src)| pad_plane(dst, src, g));
    xp
}

simd_dispatch!(
/// One plane of `pad_input`: a zero border, and each row's columns split into even and odd.
fn pad_plane(dst: &mut [f32], src: &[f32], g: &Geometry) -> () = pad_plane_body);

#[inline(always)]
fn pad_plane_body(dst: &mut [f32], src: &[f32], g: &Geometry) {
    let (_, wp) = g.padded();
    let half = wp / 2;
    // One fill of the plane (a fill per row was a `memset` call per 16 to 60 values).
    dst.fill(0.0);
    for (r, row) in dst.chunks_exact_mut(wp).enumerate() {
        if !(1..=g.h).contains(&r) {
            continue;
        }
        let src = &src[(r - 1) * g.w..][..g.w];
        let (even, odd) = row.split_at_mut(half);
        // Input column x is padded column x + 1: odd x goes to even[(x + 1) / 2], even x
        // to odd[x / 2].
        split_even_odd(src, odd, &mut even[1..]);
    }
}

/// V = Bᵀ d B for tiles t0..t1 of every input channel into `v` [C][16][t1 - t0], d the 4x4 patch
/// of the padded input whose inner 2x2 is the tile:
/// Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
fn input_transform(xp: &[f32], g: &Geometry, t0: usize, t1: usize, v: &mut [f32]) {
    for (ci, vc) in v.chunks_exact_mut(16 * (t1 - t0)).enumerate() {
        input_transform_channel(xp, g, ci, t0, t1, vc);
    }
}

/// `input_transform` of channel ci alone, into its 16 rows `vc`.
fn input_transform_channel(
    xp: &[f32],
    g: &Geometry,
    ci: usize,
    t0: usize,
    t1: usize,
    vc: &mut [f32],
) {
    let (n, plane) = (t1 - t0, g.padded_plane());
    g.for_each_run(t0, t1, |at, bi, ty, tx0, run| {
        let xc = &xp[(bi * g.c + ci) * plane..][..plane];
        tile_row(xc, g, ty, tx0, run, vc, at, n);
    });
}

/// Input transform of tiles tx0..tx0 + run (at most GROUP) of tile row ty of one padded channel
/// plane `xc`, into columns at..at + run of the channel's 16 rows `vc` (each n long).
#[allow(clippy::too_many_arguments)]
fn tile_row(
    xc: &[f32],
    g: &Geometry,
    ty: usize,
    tx0: usize,
    run: usize,
    vc: &mut [f32],
    at: usize,
    n: usize,
) {
    let (_, wp) = g.padded();
    let half = wp / 2;
    // Patch row r's even and odd columns start at these offsets; the values for tile tx are at
    // + tx (its columns 0 and 1) and + tx + 1 (its columns 2 and 3).
    let start = |r: usize, odd: bool| (2 * ty + r) * wp + if odd { half } else { 0 } + tx0;
    assert!(run <= GROUP && start(3, true) + run < xc.len() && 15 * n + at + run <= vc.len());
    #[cfg(target_arch = "x86_64")]
    if crate::ops::isa::avx512() {
        let offsets: [usize; 8] = std::array::from_fn(|i| start(i / 2, i % 2 == 1));
        // SAFETY: AVX-512 is present; the assert keeps every read (offset + tx + 1, tx < run)
        // inside xc and every write inside vc.
        unsafe { avx512::tile_row(xc.as_ptr(), offsets, run, vc.as_mut_ptr().add(at), n) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::ops::isa::avx2() {
        let offsets: [usize; 8] = std::array::from_fn(|i| start(i / 2, i % 2 == 1));
        // SAFETY: AVX2 is present; reads and writes as for the AVX-512 version.
        unsafe { avx2::tile_row(xc.as_ptr(), offsets, run, vc.as_mut_ptr().add(at), n) };
        return;
    }
    for tx in 0..run {
        // d[r][c]: column c of patch row r.
        let d: [[f32; 4]; 4] = std::array::from_fn(|r| {
            let (e, o) = (start(r, false) + tx, start(r, true) + tx);
            [xc[e], xc[o], xc[e + 1], xc[o + 1]]
        });
        // Bᵀ down the columns, then B along the rows.
        let e: [[f32; 4]; 4] = [
            std::array::from_fn(|c| d[0][c] - d[2][c]),
            std::array::from_fn(|c| d[1][c] + d[2][c]),
            std::array::from_fn(|c| d[2][c] - d[1][c]),
            std::array::from_fn(|c| d[1][c] - d[3][c]),
        ];
        for (i, ei) in e.iter().enumerate() {
            let vals = [ei[0] - ei[2], ei[1] + ei[2], ei[2] - ei[1], ei[1] - ei[3]];
            for (q, v) in vals.into_iter().enumerate() {
                vc[(4 * i + q) * n + at + tx] = v;
            }
        }
    }
}

/// Y = Aᵀ M A (+ bias) for tiles t0..t1 of output channel oc (of o) from its 16 rows `mo`, row k
/// at `mo[k * stride..]`, into y [B, O, H, W] at `y`, dropping the outputs of edge tiles that
/// fall outside the map: Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]].
///
/// # Safety
/// `y` points to b * o * h * w values, and no other thread writes channel oc's outputs of these
/// tiles.
#[allow(clippy::too_many_arguments)]
unsafe fn output_transform_channel(
    mo: &[f32],
    stride: usize,
    bias: f32,
    oc: usize,
    o: usize,
    g: &Geometry,
    (t0, t1): (usize, usize),
    y: &SendPtr,
) {
    g.for_each_run(t0, t1, |at, bi, ty, tx0, run| {
        // Output rows 2 ty and 2 ty + 1 from column 2 tx0, inside the map.
        let (y0, x0) = (2 * ty, 2 * tx0);
        let width = (2 * run).min(g.w - x0);
        let rows = 2.min(g.h - y0);
        let at_y = (bi * o + oc) * g.h * g.w + y0 * g.w + x0;
        // SAFETY: (caller) rows y0..y0 + rows, columns x0..x0 + width of this plane are inside y
        // and this task's to write.
        unsafe {
            untile(
                mo,
                stride,
                at,
                run,
                bias,
                y.get().add(at_y),
                g.w,
                rows,
                width,
            )
        };
    });
}

/// The 2x2 outputs (+ bias) of tiles at..at + run (at most GROUP) of one output channel's 16
/// rows `mo` (each n long), written to `rows` rows of `width` values at `dst` (stride `ldy`):
/// output (r, c) of tile q is dst[r * ldy + 2 q + c].
///
/// # Safety
/// Those rows and columns of dst are valid and written by no one else; width <= 2 run.
#[allow(clippy::too_many_arguments)]
unsafe fn untile(
    mo: &[f32],
    n: usize,
    at: usize,
    run: usize,
    bias: f32,
    dst: *mut f32,
    ldy: usize,
    rows: usize,
    width: usize,
) {
    assert!(run <= GROUP && 15 * n + at + run <= mo.len() && width <= 2 * run && rows <= 2);
    #[cfg(target_arch = "x86_64")]
    if crate::ops::isa::avx512() {
        // SAFETY: AVX-512 is present; reads stay inside mo (assert), writes inside dst (caller).
        unsafe { avx512::untile(mo.as_ptr().add(at), n, run, bias, dst, ldy, rows, width) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::ops::isa::avx2() {
        // SAFETY: AVX2 is present; reads and writes as for the AVX-512 version.
        unsafe { avx2::untile(mo.as_ptr().add(at), n, run, bias, dst, ldy, rows, width) };
        return;
    }
    for q in 0..run {
        let m: [f32; 16] = std::array::from_fn(|k| mo[k * n + at + q]);
        // Aᵀ down the columns of the 4x4 products, then A along the two resulting rows.
        let s: [[f32; 4]; 2] = [
            std::array::from_fn(|j| m[j] + m[4 + j] + m[8 + j]),
            std::array::from_fn(|j| m[4 + j] - m[8 + j] - m[12 + j]),
        ];
        for (r, sr) in s.iter().enumerate().take(rows) {
            let vals = [sr[0] + sr[1] + sr[2] + bias, sr[1] - sr[2] - sr[3] + bias];
            for (c, v) in vals.into_iter().enumerate() {
                if 2 * q + c < width {
                    // SAFETY: (caller) inside dst.
                    unsafe { *dst.add(r * ldy + 2 * q + c) = v };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `super::transform_run` for one run with 16-lane gathers: lane l of vector f0 / 16 is pair
    /// f0 + l of the run (row r = f % MR, column jl = f / MR), whose tap t lies at
    /// `w + r * si + jl * sj + tap(t)` (tap(t) = 8 - t when `reversed`). The (r, jl) pattern
    /// repeats every 48 pairs (8 columns), so three index vectors serve the whole run. Rows at or
    /// past `rows` are gathered as zeros (the zero rows of the last panel). Same operations in
    /// the same order as the portable loop, so the same results.
    ///
    /// # Safety
    /// AVX-512 F is present; for r < rows, jl < runs[k].len() / MR and t < 9 the value at
    /// `w + r * si + jl * sj + t` is readable, and every such offset is below 2^31.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub unsafe fn transform_run(
        w: *const f32,
        (si, sj, reversed): (usize, usize, bool),
        rows: usize,
        runs: &mut [&mut [f32]; 16],
    ) {
        use super::MR;
        let run = runs[0].len();
        let mut idx = [_mm512_setzero_si512(); 3];
        let mut row_mask = [0 as __mmask16; 3];
        for s in 0..3 {
            let mut lanes = [0i32; 16];
            for (l, lane) in lanes.iter_mut().enumerate() {
                let f = 16 * s + l;
                *lane = ((f / MR) * sj + (f % MR) * si) as i32;
                if f % MR < rows {
                    row_mask[s] |= 1 << l;
                }
            }
            idx[s] = unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
        }
        let half = _mm512_set1_ps(0.5);
        let gv = |a: __m512, b: __m512, c: __m512| {
            [
                a,
                _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(a, b), c)),
                _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(a, b), c)),
                c,
            ]
        };
        for f0 in (0..run).step_by(16) {
            let n = 16.min(run - f0);
            let tail = ((1u32 << n) - 1) as __mmask16;
            let s = f0 / 16 % 3;
            // Columns 8 (f0 / 48) on from the run's first.
            let base = unsafe { w.add(f0 / 48 * 8 * sj) };
            if s == 0 && reversed {
                // The input-gradient form: a column's taps are one short run, columns lie o x 9
                // values apart, a stride the hardware prefetcher does not follow; fetch the 8
                // columns 16 ahead (a hint: no access, so any address is allowed).
                for jl in 16..24 {
                    let col = base.wrapping_add(jl * sj);
                    for line in (0..rows * 9).step_by(16) {
                        _mm_prefetch::<_MM_HINT_T0>(col.wrapping_add(line).cast());
                    }
                }
            }
            let g: [__m512; 9] = std::array::from_fn(|t| {
                let tap = if reversed { 8 - t } else { t };
                unsafe {
                    _mm512_mask_i32gather_ps::<4>(
                        _mm512_setzero_ps(),
                        row_mask[s] & tail,
                        idx[s],
                        base.add(tap),
                    )
                }
            });
            let cols: [[__m512; 4]; 3] = std::array::from_fn(|kx| gv(g[kx], g[3 + kx], g[6 + kx]));
            for row in 0..4 {
                let vals = gv(cols[0][row], cols[1][row], cols[2][row]);
                for (col, v) in vals.into_iter().enumerate() {
                    let dst = &mut runs[row * 4 + col][f0..f0 + n];
                    unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), tail, v) };
                }
            }
        }
    }

    /// `tile_row` for up to 16 tiles as 16-lane vectors: `offsets[2 r + p]` is where patch row
    /// r's even (p = 0) or odd (p = 1) columns start in `xc`; the 16 results go to `vc + k * n`.
    /// Same operations in the same order as the portable loop, so the same results.
    ///
    /// # Safety
    /// AVX-512 F is present; `xc + offset + tx + 1` is readable for tx < run <= 16, and
    /// `vc + k * n + tx` writable for k < 16, tx < run.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub unsafe fn tile_row(
        xc: *const f32,
        offsets: [usize; 8],
        run: usize,
        vc: *mut f32,
        n: usize,
    ) {
        let mask: __mmask16 = ((1u32 << run) - 1) as __mmask16;
        // d[s][p][r]: patch row r, parity p, shifted by s tiles (columns 0, 1 then 2, 3).
        let load = |s: usize, p: usize, r: usize| unsafe {
            _mm512_maskz_loadu_ps(mask, xc.add(offsets[2 * r + p] + s))
        };
        let mut cols = [[_mm512_setzero_ps(); 4]; 4]; // cols[c][i]: column c of row i of Bᵀ d
        for (c, col) in cols.iter_mut().enumerate() {
            let (s, p) = (c / 2, c % 2);
            let d = [load(s, p, 0), load(s, p, 1), load(s, p, 2), load(s, p, 3)];
            *col = [
                _mm512_sub_ps(d[0], d[2]),
                _mm512_add_ps(d[1], d[2]),
                _mm512_sub_ps(d[2], d[1]),
                _mm512_sub_ps(d[1], d[3]),
            ];
        }
        for i in 0..4 {
            let e = [cols[0][i], cols[1][i], cols[2][i], cols[3][i]];
            let vals = [
                _mm512_sub_ps(e[0], e[2]),
                _mm512_add_ps(e[1], e[2]),
                _mm512_sub_ps(e[2], e[1]),
                _mm512_sub_ps(e[1], e[3]),
            ];
            for (q, v) in vals.into_iter().enumerate() {
                unsafe { _mm512_mask_storeu_ps(vc.add((4 * i + q) * n), mask, v) };
            }
        }
    }

    /// `untile` for up to 16 tiles as 16-lane vectors, the two columns of each tile interleaved
    /// by a permute. Same operations in the same order as the portable loop.
    ///
    /// # Safety
    /// AVX-512 F is present; `mo + k * n + q` is readable for k < 16, q < run <= 16; `dst` as in
    /// `super::untile`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub unsafe fn untile(
        mo: *const f32,
        n: usize,
        run: usize,
        bias: f32,
        dst: *mut f32,
        ldy: usize,
        rows: usize,
        width: usize,
    ) {
        let mask: __mmask16 = ((1u32 << run) - 1) as __mmask16;
        let m: [__m512; 16] =
            std::array::from_fn(|k| unsafe { _mm512_maskz_loadu_ps(mask, mo.add(k * n)) });
        let b = _mm512_set1_ps(bias);
        // Lanes 0..15 of (a, b) interleaved: a0 b0 a1 b1 ... (low) and a8 b8 ... (high).
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let (w_lo, w_hi) = (width.min(16), width.saturating_sub(16));
        let mask_lo = ((1u32 << w_lo) - 1) as __mmask16;
        let mask_hi = ((1u32 << w_hi) - 1) as __mmask16;
        for r in 0..rows {
            let s: [__m512; 4] = std::array::from_fn(|j| {
                if r == 0 {
                    _mm512_add_ps(_mm512_add_ps(m[j], m[4 + j]), m[8 + j])
                } else {
                    _mm512_sub_ps(_mm512_sub_ps(m[4 + j], m[8 + j]), m[12 + j])
                }
            });
            let c0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]), b);
            let c1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]), b);
            let row = unsafe { dst.add(r * ldy) };
            unsafe {
                _mm512_mask_storeu_ps(row, mask_lo, _mm512_permutex2var_ps(c0, lo, c1));
                _mm512_mask_storeu_ps(row.add(16), mask_hi, _mm512_permutex2var_ps(c0, hi, c1));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Lanes i < count set (all bits), the others clear: a mask for `_mm256_mask*`.
    #[target_feature(enable = "avx2")]
    fn lanes(count: usize) -> __m256i {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(count.min(8) as i32), idx)
    }

    /// `super::avx512::tile_row` in two 8-lane halves (tiles 0..8 and 8..16).
    ///
    /// # Safety
    /// AVX2 is present; as for the AVX-512 version.
    #[target_feature(enable = "avx2")]
    pub unsafe fn tile_row(
        xc: *const f32,
        offsets: [usize; 8],
        run: usize,
        vc: *mut f32,
        n: usize,
    ) {
        for h in (0..run).step_by(8) {
            let mask = lanes(run - h);
            let load = |s: usize, p: usize, r: usize| unsafe {
                _mm256_maskload_ps(xc.add(offsets[2 * r + p] + s + h), mask)
            };
            let mut cols = [[_mm256_setzero_ps(); 4]; 4];
            for (c, col) in cols.iter_mut().enumerate() {
                let (s, p) = (c / 2, c % 2);
                let d = [load(s, p, 0), load(s, p, 1), load(s, p, 2), load(s, p, 3)];
                *col = [
                    _mm256_sub_ps(d[0], d[2]),
                    _mm256_add_ps(d[1], d[2]),
                    _mm256_sub_ps(d[2], d[1]),
                    _mm256_sub_ps(d[1], d[3]),
                ];
            }
            for i in 0..4 {
                let e = [cols[0][i], cols[1][i], cols[2][i], cols[3][i]];
                let vals = [
                    _mm256_sub_ps(e[0], e[2]),
                    _mm256_add_ps(e[1], e[2]),
                    _mm256_sub_ps(e[2], e[1]),
                    _mm256_sub_ps(e[1], e[3]),
                ];
                for (q, v) in vals.into_iter().enumerate() {
                    unsafe { _mm256_maskstore_ps(vc.add((4 * i + q) * n + h), mask, v) };
                }
            }
        }
    }

    /// `super::avx512::untile` in two 8-lane halves, interleaved by unpack + lane permute.
    ///
    /// # Safety
    /// AVX2 is present; as for the AVX-512 version.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub unsafe fn untile(
        mo: *const f32,
        n: usize,
        run: usize,
        bias: f32,
        dst: *mut f32,
        ldy: usize,
        rows: usize,
        width: usize,
    ) {
        let b = _mm256_set1_ps(bias);
        for h in (0..run).step_by(8) {
            let mask = lanes(run - h);
            let m: [__m256; 16] =
                std::array::from_fn(|k| unsafe { _mm256_maskload_ps(mo.add(k * n + h), mask) });
            // Output columns 2 h .. 2 h + 16 of each row, the first 8 and the next 8.
            let w = width.saturating_sub(2 * h);
            let (mask_lo, mask_hi) = (lanes(w), lanes(w.saturating_sub(8)));
            for r in 0..rows {
                let s: [__m256; 4] = std::array::from_fn(|j| {
                    if r == 0 {
                        _mm256_add_ps(_mm256_add_ps(m[j], m[4 + j]), m[8 + j])
                    } else {
                        _mm256_sub_ps(_mm256_sub_ps(m[4 + j], m[8 + j]), m[12 + j])
                    }
                });
                let c0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), s[2]), b);
                let c1 = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s[1], s[2]), s[3]), b);
                // unpacklo: c0[0] c1[0] c0[1] c1[1] | c0[4] c1[4] c0[5] c1[5]; unpackhi likewise
                // with 2, 3 | 6, 7; the lane permutes put tiles 0..4 and 4..8 in order.
                let (lo, hi) = (_mm256_unpacklo_ps(c0, c1), _mm256_unpackhi_ps(c0, c1));
                let first = _mm256_permute2f128_ps::<0x20>(lo, hi);
                let second = _mm256_permute2f128_ps::<0x31>(lo, hi);
                let row = unsafe { dst.add(r * ldy + 2 * h) };
                unsafe {
                    _mm256_maskstore_ps(row, mask_lo, first);
                    _mm256_maskstore_ps(row.add(8), mask_hi, second);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::test_values::{values, worst};
    use crate::ops::conv::ConvGeometry;

    fn dims(b: usize, c: usize, h: usize, w: usize) -> Dims {
        let g = ConvGeometry::new((3, 3), (1, 1), (1, 1));
        Dims {
            b,
            c,
            h,
            w,
            oh: h,
            ow: w,
            g,
        }
    }

    /// The 3x3 padding-1 correlation in f64, straight from its definition: y[b, o, p, q] =
    /// bias[o] + sum over c, ky, kx of x[b, c, p + ky - 1, q + kx - 1] * tap(o, c, ky, kx).
    fn reference(
        x: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        o: usize,
        tap: impl Fn(usize, usize, usize, usize) -> f32,
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut y = vec![0f64; b * o * h * w];
        for bi in 0..b {
            for oc in 0..o {
                for p in 0..h {
                    for q in 0..w {
                        let mut sum = bias.map_or(0.0, |bs| bs[oc] as f64);
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (yy, xx) = (p + ky, q + kx);
                                    if yy == 0 || xx == 0 || yy > h || xx > w {
                                        continue;
                                    }
                                    let v = x[((bi * c + ci) * h + yy - 1) * w + xx - 1];
                                    sum += v as f64 * tap(oc, ci, ky, kx) as f64;
                                }
                            }
                        }
                        y[((bi * o + oc) * h + p) * w + q] = sum;
                    }
                }
            }
        }
        y
    }

    /// (batch, input channels, output channels, height, width): odd and even sides, a 1x1 map,
    /// a tile row longer than GROUP, several chunks split mid-row, more than one 256-deep block.
    const CASES: [(usize, usize, usize, usize, usize); 6] = [
        (2, 5, 7, 9, 6),
        (3, 70, 13, 7, 5),
        (2, 3, 4, 40, 37),
        (1, 1, 1, 1, 1),
        (1, 2, 3, 2, 2),
        (4, 300, 9, 5, 4),
    ];

    #[test]
    fn chunks_share_the_tiles_equally_between_threads() {
        for (tiles, threads, want) in [(1568, 2, 112), (6272, 2, 112), (512, 2, 128), (256, 2, 64)]
        {
            assert_eq!(chunk_tiles(tiles, threads), want, "{tiles} tiles");
        }
        for tiles in [256, 300, 1000, 1568, 6272, 25088] {
            for threads in [1, 2, 3, 4, 16] {
                let per = chunk_tiles(tiles, threads);
                assert!(per.is_multiple_of(16) && (16..=TILES).contains(&per));
            }
        }
    }

    #[test]
    fn packed_weight_transform_is_the_pairwise_one() {
        // Rows not a multiple of MR (zero rows in the last panel), a depth past one block.
        for (o, c) in [(13, 300), (6, 1), (1, 17), (64, 64)] {
            let wt = values(o * c * 9, (o * 1000 + c) as u64);
            for form in [Weights::Forward(&wt), Weights::InputGradient(&wt)] {
                // The input gradient's channels are the weights' transposed.
                let (rows, cols) = match form {
                    Weights::Forward(_) => (o, c),
                    Weights::InputGradient(_) => (c, o),
                };
                let len = PackedA::len(rows, cols);
                let mut u = vec![f32::NAN; 16 * len];
                transform_weights(form, rows, cols, &mut u);
                for i in 0..rows.next_multiple_of(MR) {
                    for j in 0..cols {
                        let want = if i < rows {
                            transform(form, rows, cols, i, j)
                        } else {
                            [0.0; 16]
                        };
                        for (k, want) in want.into_iter().enumerate() {
                            let got = u[k * len + PackedA::index(rows, cols, i, j)];
                            assert_eq!(got.to_bits(), want.to_bits(), "{o}x{c} ({i}, {j}) k {k}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn forward_matches_the_definition() {
        for (i, &(b, c, o, h, w)) in CASES.iter().enumerate() {
            let x = values(b * c * h * w, 1 + i as u64);
            let wt = values(o * c * 9, 100 + i as u64);
            let bias = values(o, 200 + i as u64);
            let got = conv3x3(&x, Weights::Forward(&wt), Some(&bias), o, &dims(b, c, h, w));
            let tap =
                |oc: usize, ci: usize, ky: usize, kx: usize| wt[(oc * c + ci) * 9 + ky * 3 + kx];
            let want = reference(&x, (b, c, h, w), o, tap, Some(&bias));
            let err = worst(&got, &want);
            assert!(
                err < 2e-6,
                "case {i} {:?}: relative error {err:e}",
                CASES[i]
            );
        }
    }

    #[test]
    fn input_gradient_matches_the_transposed_correlation() {
        for (i, &(b, c, o, h, w)) in CASES.iter().enumerate() {
            // The forward maps c -> o channels; its input gradient maps the output gradient's o
            // channels back to c, with the weights flipped in space and transposed.
            let dy = values(b * o * h * w, 300 + i as u64);
            let wt = values(o * c * 9, 400 + i as u64);
            let got = conv3x3(&dy, Weights::InputGradient(&wt), None, c, &dims(b, o, h, w));
            let tap = |ci: usize, oc: usize, ky: usize, kx: usize| {
                wt[(oc * c + ci) * 9 + (2 - ky) * 3 + (2 - kx)]
            };
            let want = reference(&dy, (b, o, h, w), c, tap, None);
            let err = worst(&got, &want);
            assert!(
                err < 2e-6,
                "case {i} {:?}: relative error {err:e}",
                CASES[i]
            );
        }
    }

    #[test]
    fn weight_gradient_matches_the_definition() {
        for (i, &(b, c, o, h, w)) in CASES.iter().enumerate() {
            let x = values(b * c * h * w, 500 + i as u64);
            let dy = values(b * o * h * w, 600 + i as u64);
            let got = weight_gradient(&x, &dy, o, &dims(b, c, h, w));
            // dw[o, c, ky, kx] = sum over b, p, q of dy[b, o, p, q] x[b, c, p + ky - 1, q + kx - 1].
            let mut want = vec![0f64; o * c * 9];
            for (idx, dst) in want.iter_mut().enumerate() {
                let (oc, ci, ky, kx) = (idx / (c * 9), idx / 9 % c, idx / 3 % 3, idx % 3);
                for bi in 0..b {
                    for p in 0..h {
                        for q in 0..w {
                            let (yy, xx) = (p + ky, q + kx);
                            if yy == 0 || xx == 0 || yy > h || xx > w {
                                continue;
                            }
                            let xv = x[((bi * c + ci) * h + yy - 1) * w + xx - 1] as f64;
                            *dst += dy[((bi * o + oc) * h + p) * w + q] as f64 * xv;
                        }
                    }
                }
            }
            let err = worst(&got, &want);
            assert!(
                err < 5e-6,
                "case {i} {:?}: relative error {err:e}",
                CASES[i]
            );
        }
    }
}

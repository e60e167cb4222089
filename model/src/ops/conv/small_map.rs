//! Stride-1 "same" convolutions on maps of at most 2 pixels along each axis the kernel spans
//! (the 2x2 maps of layer4 and the DAN heads at 64 px): there every output pixel reaches every
//! input pixel through exactly one tap, and the taps that fall into the zero padding (5 of 9 for
//! a 3x3 kernel on 2x2) are never multiplied. The convolution is then one dense product over
//! pixels: y[(p, o), (b, e)] = sum over (q, c) of w[o, c, tap(p, q)] x[(q, c), (b, e)], with p, q
//! the pixels along the kernel's axes and e those along a 1-wide axis (a 1x3 kernel's rows),
//! which act as more samples. A 3x3 kernel on a 2x2 map takes 16 multiplies per channel pair
//! and sample instead of the direct GEMM's 36; a 1x3 on two columns 8 instead of 12. Same terms
//! as the direct sums (zeros dropped), in another order. The input gradient is the same product
//! transposed; the weight gradient is left to the direct GEMM (faster there, see fused.rs).

use rayon::prelude::*;

use super::algorithm::{algorithm, Algorithm};
use super::Dims;
use crate::ops::gemm::{
    sgemm_with, transpose, AOperand, BOperand, CLayout, MatRef, PackedB, PanelSource, NR,
};
use crate::ops::{give_scratch, take_scratch};

/// The pixels of a map split into those along the kernel's axes (`p`, `q`) and along its 1-wide
/// axes (`e`), and the tap joining each pair.
#[derive(Debug, Clone)]
struct Plan {
    /// Pixels along the kernel's axes, and along the others.
    pixels: usize,
    rest: usize,
    /// Map offset (y * W + x) of pixel p combined with rest position e: at[p * rest + e].
    at: Vec<usize>,
    /// Tap index (ky * kw + kx) joining output pixel p to input pixel q: tap[p * pixels + q].
    tap: Vec<usize>,
}

/// Whether `d` is a convolution this module computes: stride 1, each axis either 1-wide
/// (kernel 1, padding 0) or 3-wide with padding 1 on a side of at most 2, and some axis 3-wide;
/// unless `FER_CONV=direct` asks for the direct GEMM everywhere.
pub(super) fn applies(d: &Dims) -> bool {
    fits(d) && algorithm() != Algorithm::Direct
}

/// The geometry test of `applies`.
fn fits(d: &Dims) -> bool {
    let axis =
        |k: usize, p: usize, side: usize| (k == 1 && p == 0) || (k == 3 && p == 1 && side <= 2);
    let ((kh, kw), (ph, pw)) = (d.g.kernel, d.g.padding);
    d.g.stride == (1, 1) && axis(kh, ph, d.h) && axis(kw, pw, d.w) && (kh == 3 || kw == 3)
}

impl Plan {
    fn new(d: &Dims) -> Plan {
        let (kh, kw) = d.g.kernel;
        // Per axis: (positions along the kernel, positions as samples).
        let (ny, ey) = if kh == 3 { (d.h, 1) } else { (1, d.h) };
        let (nx, ex) = if kw == 3 { (d.w, 1) } else { (1, d.w) };
        let (pixels, rest) = (ny * nx, ey * ex);
        let mut at = Vec::with_capacity(pixels * rest);
        for p in 0..pixels {
            let (py, px) = (p / nx, p % nx);
            for e in 0..rest {
                let (ry, rx) = (e / ex, e % ex);
                // One of py, ry is 0 (the axis is either the kernel's or a sample axis).
                at.push((py + ry) * d.w + px + rx);
            }
        }
        let mut tap = Vec::with_capacity(pixels * pixels);
        for p in 0..pixels {
            for q in 0..pixels {
                let (ty, tx) = (q / nx + 1 - p / nx, q % nx + 1 - p % nx);
                // A 1-wide axis has one tap (index 0); a 3-wide one the offset + 1.
                let (ty, tx) = (if kh == 3 { ty } else { 0 }, if kw == 3 { tx } else { 0 });
                tap.push(ty * kw + tx);
            }
        }
        Plan {
            pixels,
            rest,
            at,
            tap,
        }
    }
}

/// x [B, C, H, W] as the matrix [(b, e), (q, c)] (row-major, pixels * C columns).
fn gather(x: &[f32], c: usize, d: &Dims, plan: &Plan) -> Vec<f32> {
    let (cols, hw) = (plan.pixels * c, d.h * d.w);
    let mut out = take_scratch(d.b * plan.rest * cols);
    out.truncate(d.b * plan.rest * cols);
    out.par_chunks_mut(cols).enumerate().for_each(|(row, dst)| {
        let (b, e) = (row / plan.rest, row % plan.rest);
        for (q, dq) in dst.chunks_exact_mut(c).enumerate() {
            let at = plan.at[q * plan.rest + e];
            for (ci, v) in dq.iter_mut().enumerate() {
                *v = x[(b * c + ci) * hw + at];
            }
        }
    });
    out
}

/// The matrix [(b, e), (p, o)] back to [B, O, H, W] (+ bias).
fn scatter(m: &[f32], o: usize, bias: Option<&[f32]>, d: &Dims, plan: &Plan) -> Vec<f32> {
    let (cols, hw) = (plan.pixels * o, d.h * d.w);
    let mut y = crate::ops::zeroed(d.b * o * hw);
    y.par_chunks_mut(o * hw).enumerate().for_each(|(b, yb)| {
        for e in 0..plan.rest {
            let src = &m[(b * plan.rest + e) * cols..][..cols];
            for (p, sp) in src.chunks_exact(o).enumerate() {
                let at = plan.at[p * plan.rest + e];
                for (oc, v) in sp.iter().enumerate() {
                    yb[oc * hw + at] = v + bias.map_or(0.0, |bs| bs[oc]);
                }
            }
        }
    });
    y
}

/// The weights laid out so that a row of either dense product's right operand is a run of
/// contiguous pieces, each by one matrix transpose of w [O, C, kh, kw]: for the forward's product
/// (depth C, columns O) w as [O, C x taps] transposed, i.e. [C][taps][O]; for the input gradient's
/// (depth O, columns C) w as [O x C, taps] transposed, i.e. [taps][O][C]. `DenseWeights::of` knows
/// both. Written value by value in output order instead, the forward's layout read w one cache line
/// per value (2.2 ms per 512 x 512 layer, 0.43 ms transposed; the input gradient's 0.88 → 0.47 ms:
/// 2 threads, best of 10, a temporary timing test).
fn tap_major(w: &[f32], o: usize, c: usize, taps: usize, forward: bool) -> Vec<f32> {
    let mut wt = take_scratch(taps * o * c);
    wt.truncate(taps * o * c);
    if forward {
        transpose(w, o, c * taps, &mut wt);
    } else {
        transpose(w, o * c, taps, &mut wt);
    }
    wt
}

/// The dense weight matrix as the right operand, packed from the tap-major `wt`: depth (q, k),
/// columns (p, j), element wt[tap][k][j]. Forward: depth is the input pixel and channel, columns
/// the output's, tap joining output pixel p to input pixel q; input gradient: depth is the output
/// pixel and channel, columns the input's.
struct DenseWeights<'a> {
    wt: &'a [f32],
    depth: usize,
    cols: usize,
    /// Element (tap, k, j) of `wt` is at tap * tap_stride + k * depth_stride + j (`tap_major`).
    tap_stride: usize,
    depth_stride: usize,
    plan: &'a Plan,
    forward: bool,
}

impl<'a> DenseWeights<'a> {
    /// The operand of direction `forward` (else the input gradient's) for weights [O, C, ...]
    /// laid out by `tap_major` in that direction.
    fn of(wt: &'a [f32], plan: &'a Plan, (o, c): (usize, usize), forward: bool) -> Self {
        let (depth, cols) = if forward { (c, o) } else { (o, c) };
        let taps = wt.len() / (o * c);
        let (tap_stride, depth_stride) = if forward {
            (cols, taps * cols)
        } else {
            (depth * cols, cols)
        };
        DenseWeights {
            wt,
            depth,
            cols,
            tap_stride,
            depth_stride,
            plan,
            forward,
        }
    }

    /// Offset in `wt` of the weight joining depth index k and column j through `tap`.
    #[inline(always)]
    fn at(&self, tap: usize, k: usize, j: usize) -> usize {
        tap * self.tap_stride + k * self.depth_stride + j
    }

    /// The tap joining depth pixel q and column pixel p.
    #[inline(always)]
    fn tap(&self, q: usize, p: usize) -> usize {
        let px = self.plan.pixels;
        if self.forward {
            self.plan.tap[p * px + q]
        } else {
            self.plan.tap[q * px + p]
        }
    }
}

impl PanelSource for DenseWeights<'_> {
    fn pack(&self, j0: usize, j1: usize, pc: usize, kc: usize, strip: &mut [f32]) {
        for (panel, jp) in (j0..j1).step_by(NR).enumerate() {
            let dst = &mut strip[panel * NR * kc..][..NR * kc];
            let width = NR.min(j1 - jp);
            let (p, r0) = (jp / self.cols, jp % self.cols);
            // The panel's columns are one pixel's consecutive channels: one run per depth row.
            let run = width == NR && r0 + NR <= self.cols;
            for (u, row) in dst.chunks_exact_mut(NR).enumerate() {
                let (q, k) = ((pc + u) / self.depth, (pc + u) % self.depth);
                if run {
                    let at = self.at(self.tap(q, p), k, r0);
                    row.copy_from_slice(&self.wt[at..][..NR]);
                } else {
                    for (t, v) in row.iter_mut().enumerate() {
                        let j = jp + t;
                        *v = if j < j1 {
                            let (p, r) = (j / self.cols, j % self.cols);
                            self.wt[self.at(self.tap(q, p), k, r)]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// `input` [B, depth, H, W] through the dense product with the weights: [B, cols, H, W] (+ bias).
/// `weights`: the dense weight matrix as the right operand (`DenseWeights`, packed at this call,
/// or a `PackedB` packed once).
fn dense_product(
    input: &[f32],
    weights: BOperand,
    (depth, cols): (usize, usize),
    bias: Option<&[f32]>,
    d: &Dims,
    plan: &Plan,
) -> Vec<f32> {
    let a = gather(input, depth, d, plan);
    let (m, n, k) = (d.b * plan.rest, plan.pixels * cols, plan.pixels * depth);
    let mut out = take_scratch(m * n);
    let a_op = AOperand::Mat(MatRef {
        data: &a,
        rs: k,
        cs: 1,
    });
    sgemm_with(m, n, k, a_op, weights, &mut out, CLayout::rows(n), false);
    give_scratch(a);
    let y = scatter(&out[..m * n], cols, bias, d, plan);
    give_scratch(out);
    y
}

/// The dense product in direction `forward` (else the input gradient's) with the weights laid
/// out tap by tap at this call.
fn dense(
    input: &[f32],
    w: &[f32],
    o: usize,
    forward: bool,
    bias: Option<&[f32]>,
    d: &Dims,
) -> Vec<f32> {
    let plan = Plan::new(d);
    let wt = tap_major(w, o, d.c, d.g.kernel.0 * d.g.kernel.1, forward);
    let b = DenseWeights::of(&wt, &plan, (o, d.c), forward);
    let y = dense_product(
        input,
        BOperand::Packed(&b),
        (b.depth, b.cols),
        bias,
        d,
        &plan,
    );
    give_scratch(wt);
    y
}

/// y = x ⋆ w (+ bias): [B, O, H, W].
pub(super) fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, o: usize, d: &Dims) -> Vec<f32> {
    dense(x, w, o, true, bias, d)
}

/// The forward's dense weight matrix packed once, for maps of one size (the inference form:
/// its weights never change, so each call only gathers the input and multiplies).
pub(super) struct Prepared {
    map: (usize, usize),
    packed: PackedB,
}

/// The forward weights [O, C, kh, kw] as `forward_prepared` reads them on maps of `d`'s size.
pub(super) fn prepare(w: &[f32], o: usize, d: &Dims) -> Prepared {
    let plan = Plan::new(d);
    let wt = tap_major(w, o, d.c, d.g.kernel.0 * d.g.kernel.1, true);
    let b = DenseWeights::of(&wt, &plan, (o, d.c), true);
    let packed = PackedB::pack(&b, plan.pixels * d.c, plan.pixels * o);
    give_scratch(wt);
    Prepared {
        map: (d.h, d.w),
        packed,
    }
}

/// `forward` with the weights `prepare`d; on a map of another size than they were prepared for,
/// laid out again at this call.
pub(super) fn forward_prepared(
    x: &[f32],
    w: &[f32],
    prepared: &Prepared,
    bias: Option<&[f32]>,
    o: usize,
    d: &Dims,
) -> Vec<f32> {
    if prepared.map != (d.h, d.w) {
        return forward(x, w, bias, o, d);
    }
    let b = BOperand::Prepacked(&prepared.packed);
    dense_product(x, b, (d.c, o), bias, d, &Plan::new(d))
}

/// dx [B, C, H, W] from dy [B, O, H, W]: the dense product transposed.
pub(super) fn input_gradient(dy: &[f32], w: &[f32], o: usize, d: &Dims) -> Vec<f32> {
    dense(dy, w, o, false, None, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::test_values::{values, worst};
    use crate::ops::conv::ConvGeometry;

    /// Batch, input and output channels, height, width, kernel, padding.
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        (usize, usize),
        (usize, usize),
    );

    /// 3x3 on 2x2, 2x1, 1x2 and 1x1 maps, 1x3 and 3x1
    /// on 2x2 and on wider sample axes, channels past a packed panel and a depth block.
    const CASES: [Case; 7] = [
        (3, 5, 7, 2, 2, (3, 3), (1, 1)),
        (2, 70, 13, 2, 1, (3, 3), (1, 1)),
        (2, 3, 4, 1, 2, (3, 3), (1, 1)),
        (4, 9, 8, 1, 1, (3, 3), (1, 1)),
        (3, 6, 5, 2, 2, (1, 3), (0, 1)),
        (2, 4, 7, 2, 5, (3, 1), (1, 0)),
        (2, 300, 11, 2, 2, (3, 3), (1, 1)),
    ];

    /// y[b, o, p, q] = sum x[b, c, p + ky - ph, q + kx - pw] w[o, c, ky, kx], in f64; and the
    /// input gradient of sum(y * dy).
    fn reference(
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        (b, c, o, h, wd, (kh, kw), (ph, pw)): Case,
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut dx) = (vec![0f64; b * o * h * wd], vec![0f64; b * c * h * wd]);
        for bi in 0..b {
            for oc in 0..o {
                for p in 0..h {
                    for q in 0..wd {
                        let yi = ((bi * o + oc) * h + p) * wd + q;
                        for ci in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let (yy, xx) = (
                                        (p + ky) as isize - ph as isize,
                                        (q + kx) as isize - pw as isize,
                                    );
                                    if yy < 0 || xx < 0 || yy >= h as isize || xx >= wd as isize {
                                        continue;
                                    }
                                    let xi = ((bi * c + ci) * h + yy as usize) * wd + xx as usize;
                                    let wi = ((oc * c + ci) * kh + ky) * kw + kx;
                                    y[yi] += x[xi] as f64 * w[wi] as f64;
                                    dx[xi] += dy[yi] as f64 * w[wi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx)
    }

    #[test]
    fn forward_and_input_gradient_match_the_definition() {
        for (i, &case) in CASES.iter().enumerate() {
            let (b, c, o, h, w, k, p) = case;
            let d = Dims {
                b,
                c,
                h,
                w,
                oh: h,
                ow: w,
                g: ConvGeometry::new(k, (1, 1), p),
            };
            assert!(fits(&d), "case {i} {case:?} should be a small map");
            let x = values(b * c * h * w, 1 + i as u64);
            let wt = values(o * c * k.0 * k.1, 100 + i as u64);
            let dy = values(b * o * h * w, 200 + i as u64);
            let (y, dx) = reference(&x, &wt, &dy, case);
            // Prepared for this map, and for another size (then laid out again per call).
            let prepared = prepare(&wt, o, &d);
            let other = prepare(&wt, o, &Dims { h: 1, w: 1, ..d });
            let checks = [
                ("forward", worst(&forward(&x, &wt, None, o, &d), &y)),
                (
                    "prepared forward",
                    worst(&forward_prepared(&x, &wt, &prepared, None, o, &d), &y),
                ),
                (
                    "forward prepared for another map",
                    worst(&forward_prepared(&x, &wt, &other, None, o, &d), &y),
                ),
                (
                    "input gradient",
                    worst(&input_gradient(&dy, &wt, o, &d), &dx),
                ),
            ];
            for (what, err) in checks {
                assert!(
                    err < 2e-6,
                    "case {i} {case:?}: {what} relative error {err:e}"
                );
            }
        }
    }

    #[test]
    fn larger_maps_and_strides_are_left_to_the_gemm() {
        let d = |h: usize, w: usize, k, s, p| Dims {
            b: 1,
            c: 1,
            h,
            w,
            oh: h,
            ow: w,
            g: ConvGeometry::new(k, s, p),
        };
        assert!(!fits(&d(3, 2, (3, 3), (1, 1), (1, 1))), "3 rows");
        assert!(!fits(&d(2, 2, (3, 3), (2, 2), (1, 1))), "stride 2");
        assert!(
            !fits(&d(2, 2, (1, 1), (1, 1), (0, 0))),
            "1x1: nothing to skip"
        );
        assert!(!fits(&d(2, 2, (3, 3), (1, 1), (0, 0))), "no padding");
        assert!(fits(&d(4, 2, (1, 3), (1, 1), (0, 1))), "1x3 on rows of 2");
    }
}

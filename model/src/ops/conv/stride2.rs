//! The input gradient of a stride-2 convolution as four stride-1 correlations, one per parity
//! phase of the input: the input pixels (2i + a, 2j + b) receive gradient only through the taps
//! (kh, kw) with kh ≡ a + ph and kw ≡ b + pw (mod 2), each from output pixel (i + di, j + dj) for
//! a fixed offset. So phase (a, b) is the output gradient correlated with those taps' weights
//! (transposed in channels), a GEMM whose columns are gathered from one padded copy of the
//! output gradient, and the four results are interleaved into the input gradient.
//!
//! The general path (the column-matrix gradient [C·kh·kw, B·OH·OW] by one GEMM, then col2im)
//! writes and reads back a buffer ~2.25x the input for a 3x3 kernel, after a channel-major copy
//! of the output gradient, and its GEMM is only O deep. Here the GEMMs are O·taps deep and write
//! the input gradient's values once.

use rayon::prelude::*;

use super::fused::conv_forward;
use super::packing::ColsOf;
use super::{ConvGeometry, Dims};
use crate::ops::gemm::{AOperand, APanelSource, MR};
use crate::ops::timing::Slot;

/// One parity phase (a, b) of the input gradient: its size (PH, PW) and its values [B, C, PH, PW],
/// None where no tap reaches it (a 1x1 stride-2 kernel's odd positions: zero).
struct Phase {
    at: (usize, usize),
    size: (usize, usize),
    grad: Option<Vec<f32>>,
}

/// Input channels from which the phases are used: their GEMMs are C rows high, and the 3-channel
/// stem's gradient took 42 ms by phases against 15 ms by col2im (`conv_probe 112 32 / backward`;
/// the stem's input gradient is not needed in training). ResNet's 64- to 256-channel stride-2
/// layers gain (layer2 3x3/2 6.2 -> 4.0 ms, layer4 5.3 -> 3.5, the 1x1/2 0.95 -> 0.52).
const MIN_CHANNELS: usize = 16;

/// Whether the input gradient of geometry `d` is computed here.
pub(super) fn applies(d: &Dims) -> bool {
    d.g.stride == (2, 2) && d.c >= MIN_CHANNELS
}

/// The weights of one phase as the GEMM's A [C, O * taps]: element (ci, (oc, s)) is w[oc, ci,
/// tap s], packed straight from w.
struct PhaseWeights<'a> {
    w: &'a [f32],
    c: usize,
    /// kh * kw: the stride of w between input channels.
    kernel_taps: usize,
    /// The phase's taps as indices into a channel's kh * kw.
    taps: &'a [usize],
}

impl APanelSource for PhaseWeights<'_> {
    fn pack(&self, i0: usize, m: usize, pc: usize, kc: usize, dst: &mut [f32]) {
        let rows = MR.min(m - i0);
        for (t, d) in dst[..kc * MR].chunks_exact_mut(MR).enumerate() {
            let (oc, s) = ((pc + t) / self.taps.len(), (pc + t) % self.taps.len());
            let at = (oc * self.c + i0) * self.kernel_taps + self.taps[s];
            for (r, v) in d.iter_mut().enumerate() {
                *v = if r < rows {
                    self.w[at + r * self.kernel_taps]
                } else {
                    0.0
                };
            }
        }
    }
}

/// Along one axis, for input positions ≡ `a` (mod 2): the kernel taps that reach them and, per
/// tap, the offset d of the output position read (input position 2i + a reads output i + d).
fn phase_taps(a: usize, kernel: usize, pad: usize) -> Vec<(usize, isize)> {
    (0..kernel)
        .filter(|&k| (a + pad + 2 - k % 2).is_multiple_of(2))
        .map(|k| (k, (a as isize + pad as isize - k as isize) / 2))
        .collect()
}

/// dx [B, C, H, W] of y = x ⋆ w with geometry `d` (stride 2) from dy [B, O, OH, OW] and w
/// [O, C, kh, kw].
pub(super) fn input_gradient(dy: &[f32], w: &[f32], o: usize, d: &Dims) -> Vec<f32> {
    debug_assert_eq!(d.g.stride, (2, 2));
    let (kh, kw) = d.g.kernel;
    let (ph, pw) = d.g.padding;
    let (c, h, wd) = (d.c, d.h, d.w);
    // Phase a along an axis of n inputs has (n - a).div_ceil(2) positions.
    let rows: [Vec<(usize, isize)>; 2] = [0, 1].map(|a| phase_taps(a, kh, ph));
    let cols: [Vec<(usize, isize)>; 2] = [0, 1].map(|b| phase_taps(b, kw, pw));
    let len = |n: usize, a: usize| (n.saturating_sub(a)).div_ceil(2);
    // One padded copy of dy serves every phase: its padding covers the offsets that fall before
    // the first output row or past the last.
    let need = |taps: &[Vec<(usize, isize)>; 2], n: usize, on: usize| -> usize {
        (0..2)
            .flat_map(|a| {
                let last = len(n, a) as isize - 1;
                taps[a]
                    .iter()
                    .map(move |&(_, dd)| (-dd).max(last + dd - (on as isize - 1)).max(0))
            })
            .max()
            .unwrap_or(0) as usize
    };
    let pad = (need(&rows, h, d.oh), need(&cols, wd, d.ow));
    let back = Dims {
        b: d.b,
        c: o,
        h: d.oh,
        w: d.ow,
        oh: d.oh,
        ow: d.ow,
        g: ConvGeometry::new((1, 1), (1, 1), pad),
    };
    let mut padded = ColsOf::new(dy, &back);
    let (hp, wp) = (d.oh + 2 * pad.0, d.ow + 2 * pad.1);
    let mut phases: Vec<Phase> = Vec::new();
    for a in 0..2 {
        for b in 0..2 {
            let (pha, pwb) = (len(h, a), len(wd, b));
            if pha == 0 || pwb == 0 {
                continue;
            }
            let (tr, tc) = (&rows[a], &cols[b]);
            let taps = tr.len() * tc.len();
            if taps == 0 {
                phases.push(Phase {
                    at: (a, b),
                    size: (pha, pwb),
                    grad: None,
                });
                continue;
            }
            // Row (oc, s) of the columns reads dy[oc] at tap s's offset.
            let mut offsets = Vec::with_capacity(o * taps);
            let mut tap_index = Vec::with_capacity(taps);
            for oc in 0..o {
                for &(ki, di) in tr {
                    for &(kj, dj) in tc {
                        let (y, x) = (di + pad.0 as isize, dj + pad.1 as isize);
                        offsets.push((oc * hp + y as usize) * wp + x as usize);
                        if oc == 0 {
                            tap_index.push(ki * kw + kj);
                        }
                    }
                }
            }
            padded.retarget((pha, pwb), (tr.len(), tc.len()), offsets);
            let weights = PhaseWeights {
                w,
                c,
                kernel_taps: kh * kw,
                taps: &tap_index,
            };
            let grad = conv_forward(
                &padded,
                AOperand::Packed(&weights),
                None,
                c,
                Slot::ConvGemmInputGradient,
            );
            phases.push(Phase {
                at: (a, b),
                size: (pha, pwb),
                grad: Some(grad),
            });
        }
    }
    // Interleave: row i of phases (a, 0) and (a, 1) of plane (n, ci) alternate along row 2i + a
    // of that plane of dx. The phases cover every position, so dx starts unfilled.
    let zeros = vec![0f32; wd.div_ceil(2)];
    let phase = |a: usize, b: usize| phases.iter().find(|p| p.at == (a, b));
    let mut dx = crate::ops::unfilled(d.b * c * h * wd);
    dx.par_chunks_mut(h * wd)
        .enumerate()
        .for_each(|(plane, dst)| {
            // Row i of phase (a, b) of this plane (zeros where no tap reaches the phase).
            let row_of = |a: usize, b: usize, i: usize| -> &[f32] {
                match phase(a, b) {
                    Some(Phase {
                        size: (pha, pwb),
                        grad: Some(g),
                        ..
                    }) => &g[(plane * pha + i) * pwb..][..*pwb],
                    _ => &zeros[..len(wd, b)],
                }
            };
            for (y, row) in dst.chunks_exact_mut(wd).enumerate() {
                let (a, i) = (y % 2, y / 2);
                let (even, odd) = (row_of(a, 0, i), row_of(a, 1, i));
                for ((pair, &e), &o) in row.chunks_exact_mut(2).zip(even).zip(odd) {
                    pair[0] = std::mem::MaybeUninit::new(e);
                    pair[1] = std::mem::MaybeUninit::new(o);
                }
                if wd % 2 == 1 {
                    row[wd - 1] = std::mem::MaybeUninit::new(even[wd / 2]);
                }
            }
        });
    // SAFETY: every row of every plane was written: its first 2 * (W / 2) values in pairs (the
    // even phase has at least W / 2 values, the odd exactly W / 2), and with W odd its last from
    // the even phase, which has (W + 1) / 2.
    unsafe { crate::ops::assume_filled(dx) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_taps_pair_each_tap_with_the_output_it_reads() {
        // 3x3, padding 1: even inputs (2i) get tap 1 from output i; odd ones (2i + 1) tap 0 from
        // output i + 1 and tap 2 from output i (2o - 1 + k = 2i + a).
        assert_eq!(phase_taps(0, 3, 1), vec![(1, 0)]);
        assert_eq!(phase_taps(1, 3, 1), vec![(0, 1), (2, 0)]);
        // 1x1, no padding: odd inputs get nothing.
        assert_eq!(phase_taps(0, 1, 0), vec![(0, 0)]);
        assert!(phase_taps(1, 1, 0).is_empty());
        // 7x7, padding 3 (the stem).
        assert_eq!(phase_taps(0, 7, 3), vec![(1, 1), (3, 0), (5, -1)]);
        for a in 0..2 {
            for (k, dd) in phase_taps(a, 7, 3) {
                assert_eq!(2 * dd + k as isize, a as isize + 3);
            }
        }
    }
}

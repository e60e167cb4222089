//! The f32 CPU convolution as one graph node (with or without its bias): forward by one GEMM
//! over the packed column matrix, backward by GEMMs for the weight gradient and for the input
//! gradient (stride 1: a convolution with the flipped weights; strided: GEMM + col2im).

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::im2col::col2im_slice;
use super::packing::{channel_major, BlockRows, ColsOf, ColsOfT};
use super::small_map;
use super::stride2;
use super::winograd::{self, Weights};
use super::{ConvGeometry, Dims};
use crate::ops::gemm::{
    sgemm, sgemm_into, sgemm_with, AOperand, BOperand, CLayout, MatRef, PackedA, NR,
};
use crate::ops::timing::{timed, Slot};
use crate::ops::{contiguous, f32_contiguous, give_scratch, take_scratch};

/// The whole f32 CPU convolution as one graph node: the column matrix packed by the GEMM, which
/// writes NCHW directly, in the forward; the column matrix is rebuilt in the backward instead of being kept alive, and
/// both gradients are computed directly. One node instead of five saves Candle's backward a
/// zero-filled buffer and an add per node, and the big column matrix is never held between the
/// passes.
pub(super) struct FusedConv(pub(super) Dims);

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
        timed(Slot::ConvForward, || {
            self.forward(xs, xl, ws, wl, None, None)
        })
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

/// The input behind `cols` (in its geometry) correlated with `w` as the matrix [O, C*kh*kw],
/// plus `bias` [O]: [B, O, OH, OW] values.
pub(super) fn conv_forward(
    cols: &ColsOf,
    w: AOperand,
    bias: Option<&[f32]>,
    o: usize,
    slot: Slot,
) -> Vec<f32> {
    let d = cols.dims();
    let (k, n, p) = (d.rows(), d.cols(), d.oh * d.ow);
    // The GEMM writes [B, O, P] directly (column b*P + q of the [O, B*P] product is pixel q of
    // sample b), adding to the bias when there is one.
    let layout = CLayout {
        ldc: p,
        group: p,
        group_stride: o * p,
    };
    let b_cols = BOperand::Packed(cols);
    if bias.is_none() && p >= NR {
        // Every value written by the GEMM: no zero fill first.
        let mut y = crate::ops::unfilled(o * n);
        timed(slot, || sgemm_into(o, n, k, w, b_cols, &mut y, layout));
        // SAFETY: without accumulation the GEMM writes every (i, j) of `layout`, which covers
        // all o * n values ([B, O, P] with P = ldc = group).
        return unsafe { crate::ops::assume_filled(y) };
    }
    let mut y = match bias {
        Some(bias) => {
            // Each sample's [O, P] block is the bias broadcast over pixels.
            let mut y = crate::ops::unfilled(o * n);
            y.par_chunks_mut(o * p).for_each(|yb| {
                for (plane, &v) in yb.chunks_exact_mut(p).zip(bias) {
                    plane.fill(std::mem::MaybeUninit::new(v));
                }
            });
            // SAFETY: the chunks cover all o * n values, each plane filled.
            unsafe { crate::ops::assume_filled(y) }
        }
        None => crate::ops::zeroed(o * n),
    };
    if p < NR {
        // Maps smaller than a tile (2x2, 3x3): every 16-column tile would span several samples
        // and be stored piecewise. The GEMM writes the row-major [O, B*P] product instead, added
        // into [B, O, P] in one pass (o * n values, small at these sizes).
        let mut t = take_scratch(o * n);
        timed(slot, || {
            let t = &mut t[..o * n];
            sgemm_with(o, n, k, w, b_cols, t, CLayout::rows(n), false);
            y.par_chunks_mut(o * p).enumerate().for_each(|(b, yb)| {
                for (oc, dst) in yb.chunks_exact_mut(p).enumerate() {
                    let src = &t[oc * n + b * p..][..p];
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                }
            });
        });
        give_scratch(t);
        return y;
    }
    timed(slot, || {
        sgemm_with(o, n, k, w, b_cols, &mut y, layout, true)
    });
    y
}

/// The input gradient of a stride-1 convolution is itself a convolution: the output gradient
/// correlated with the weights flipped in space and transposed in channels ([C, O, kh, kw]), with
/// padding k - 1 - p. Computed that way, the GEMM gathers its columns from the gradient and no
/// column matrix or col2im scatter is needed. The flip is never materialised: the depth index
/// (o, s) pairs the weights' tap s with the gradient's tap kh*kw - 1 - s.
pub(super) fn stride1_input_gradient(dy: &[f32], w: &[f32], o: usize, d: &Dims) -> Vec<f32> {
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
    if winograd::applies_to_input_gradient(&back) {
        let wt = winograd::Weights::InputGradient(w);
        return timed(Slot::ConvGemmInputGradient, || {
            winograd::conv3x3(dy, wt, None, d.c, &back)
        });
    }
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
        &cols,
        AOperand::Packed(&wt),
        None,
        d.c,
        Slot::ConvGemmInputGradient,
    )
}

/// `FusedConv` plus a bias [O], which the forward's GEMM adds to; its gradient is the output
/// gradient summed per channel. One node instead of a convolution and a broadcast add, whose
/// backward Candle computes with a slow strided reduction.
pub(super) struct FusedConvBias(pub(super) Dims);

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
            FusedConv(self.0).forward(xs, xl, ws, wl, Some((bs, bl)), None)
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

/// What the forward makes from a fixed weight tensor before multiplying (Winograd's transformed
/// weights, the small-map product's packed dense matrix), made on first use and kept for the next
/// calls. Only for weights that never change: the inference form's folded convolutions, whose
/// tensors are detached and never updated (`conv2d_inference`).
#[derive(Default)]
pub struct PreparedWeights {
    /// The weights [O, C*KH*KW] packed for the direct GEMM (`PackedA`), not packed again per call.
    direct: OnceLock<Vec<f32>>,
    winograd: OnceLock<Vec<f32>>,
    small_map: OnceLock<small_map::Prepared>,
}

impl std::fmt::Debug for PreparedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedWeights")
            .field("direct", &self.direct.get().map(Vec::len))
            .field("winograd", &self.winograd.get().map(Vec::len))
            .field("small_map", &self.small_map.get().is_some())
            .finish()
    }
}

/// `FusedConvBias`'s forward with the weights' prepared forms kept in `prepared`; no backward
/// (applied with `apply_op3_no_bwd`).
pub(super) struct FusedConvPrepared<'a> {
    pub(super) d: Dims,
    pub(super) prepared: &'a PreparedWeights,
}

impl CustomOp3 for FusedConvPrepared<'_> {
    fn name(&self) -> &'static str {
        "conv2d-prepared"
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
            FusedConv(self.d).forward(xs, xl, ws, wl, Some((bs, bl)), Some(self.prepared))
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
        prepared: Option<&PreparedWeights>,
    ) -> Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let x = f32_contiguous(xs, xl, "conv2d")?;
        let w = f32_contiguous(ws, wl, "conv2d")?;
        let o = wl.shape().dims()[0];
        let bias = bias
            .map(|(bs, bl)| f32_contiguous(bs, bl, "conv2d bias"))
            .transpose()?;
        let shape = Shape::from((d.b, o, d.oh, d.ow));
        if small_map::applies(d) {
            let y = timed(Slot::ConvGemmForward, || match prepared {
                Some(p) => {
                    let wt = p.small_map.get_or_init(|| small_map::prepare(w, o, d));
                    small_map::forward_prepared(x, w, wt, bias, o, d)
                }
                None => small_map::forward(x, w, bias, o, d),
            });
            return Ok((CpuStorage::F32(y), shape));
        }
        if winograd::applies(d, prepared.is_some()) {
            let y = timed(Slot::ConvWinogradForward, || match prepared {
                Some(p) => {
                    let u = p.winograd.get_or_init(|| winograd::prepare(w, o, d.c));
                    winograd::conv3x3_prepared(x, u, bias, o, d)
                }
                None => winograd::conv3x3(x, Weights::Forward(w), bias, o, d),
            });
            return Ok((CpuStorage::F32(y), shape));
        }
        let k = d.rows();
        let w = MatRef {
            data: w,
            rs: k,
            cs: 1,
        };
        let w = match prepared {
            Some(p) => {
                let packed = p.direct.get_or_init(|| PackedA::pack(w, o, k));
                AOperand::Prepacked(PackedA::from_packed(packed, o, k))
            }
            None => AOperand::Mat(w),
        };
        let y = conv_forward(&ColsOf::new(x, d), w, bias, o, Slot::ConvGemmForward);
        Ok((CpuStorage::F32(y), shape))
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
        let dw = if winograd::applies_to_weight_gradient(d, o) {
            timed(Slot::ConvGemmWeightGradient, || {
                winograd::weight_gradient(xv, g, o, d)
            })
        } else {
            // dW [O, K] = dY [O, N] x cols^T [N, K], dY read in its NCHW layout and the columns
            // gathered from x, both while packing.
            let mut dw = crate::ops::unfilled(o * k);
            let cols = ColsOf::new(xv, d);
            timed(Slot::ConvGemmWeightGradient, || {
                sgemm_into(
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
                )
            });
            // SAFETY: the GEMM wrote all o x k values (row-major, no accumulation).
            unsafe { crate::ops::assume_filled(dw) }
        };
        // The network's input needs no gradient.
        let stride1 =
            d.g.stride == (1, 1) && d.g.padding.0 < d.g.kernel.0 && d.g.padding.1 < d.g.kernel.1;
        // The small-map product computes the input gradient but not the weight gradient (above):
        // as the dense [pixels x O, pixels x C] product from a batch-deep sum, that was slower than
        // the direct GEMM (docs/cpu-kernels.md, "Small maps").
        let dx = if !x.track_op() {
            None
        } else if small_map::applies(d) {
            let dx = timed(Slot::ConvGemmInputGradient, || {
                small_map::input_gradient(g, wv, o, d)
            });
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else if stride1 {
            let dx = stride1_input_gradient(g, wv, o, d);
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else if stride2::applies(d) {
            let dx = stride2::input_gradient(g, wv, o, d);
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

//! 2-D convolution with per-axis padding, differentiable in input, weight and bias.
//!
//! Candle's stock `conv2d` backward fails for stride-2 convs on inputs whose height and width
//! differ in parity (4x5 -> 2x3 in the fixtures) and computes input gradients with a slow direct
//! loop, so the CPU paths are our own:
//! * f32 (training, inference): one graph node per convolution (`fused`), whose GEMM packs the
//!   column matrix straight from a zero-padded copy of the input (`packing`) and writes NCHW;
//!   3x3 stride-1 padding-1 convolutions (forward and input gradient) by Winograd F(2x2, 3x3)
//!   (`winograd`) unless `FER_CONV=direct`; the input gradient of stride-2 convolutions as four
//!   stride-1 correlations, one per parity phase of the input (`stride2`).
//! * f64 (the finite-difference tests): the reference composition im2col (`im2col`, whose
//!   backward is col2im) + Candle's matmul, every gradient from ops with a correct backward.
//! * GPU: Candle's native convolution (cuDNN where enabled).
//!
//! Padding is per axis, so 1x3 and 3x1 kernels need no manual padding.

mod algorithm;
mod fused;
mod im2col;
mod packing;
mod small_map;
mod stride2;
mod winograd;

pub use algorithm::{requested as conv_algorithm_requested, Algorithm as ConvAlgorithm};

use candle_core::{Result, Tensor};

pub use fused::PreparedWeights;
use fused::{FusedConv, FusedConvBias, FusedConvPrepared};
use im2col::Im2Col;

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
    /// The shapes of `x` [B, C, H, W] correlated with `weight` [O, C, kh, kw] by geometry `g`, or
    /// an error when the weight does not fit the input or the kernel the input.
    fn of(x: &Tensor, weight: &Tensor, g: ConvGeometry) -> Result<Dims> {
        let (b, c, h, w) = x.dims4()?;
        let (_, wc, kh, kw) = weight.dims4()?;
        if wc != c || (kh, kw) != g.kernel {
            candle_core::bail!(
                "conv2d: weight {:?} does not fit input channels {c} and kernel {:?}",
                weight.dims(),
                g.kernel
            );
        }
        let (oh, ow) = g.output_size(h, w)?;
        Ok(Dims {
            b,
            c,
            h,
            w,
            oh,
            ow,
            g,
        })
    }

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

/// `conv2d` with a bias for weights that never change (the inference form's folded layers): on
/// the f32 CPU path the weights' prepared forms are made once and kept in `prepared`, and no
/// autograd graph is recorded. Elsewhere it is `conv2d`.
pub fn conv2d_inference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: ConvGeometry,
    prepared: &PreparedWeights,
) -> Result<Tensor> {
    let d = Dims::of(x, weight, g)?;
    let f32_cpu = x.device().is_cpu()
        && [x.dtype(), weight.dtype(), bias.dtype()] == [candle_core::DType::F32; 3];
    if !f32_cpu || bias.dims() != [weight.dim(0)?] {
        return conv2d(x, weight, Some(bias), g);
    }
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    x.apply_op3_no_bwd(&weight, &bias, &FusedConvPrepared { d, prepared })
}

/// Cross-correlation of `x` [B, C, H, W] with `weight` [O, C, kh, kw] (PyTorch's Conv2d),
/// plus an optional `bias` [O]. Differentiable in all three.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    g: ConvGeometry,
) -> Result<Tensor> {
    let d = Dims::of(x, weight, g)?;
    let Dims { b, c, oh, ow, .. } = d;
    let (o, _, kh, kw) = weight.dims4()?;
    let y = if x.device().is_cpu() {
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
        conv2d_native(x, weight, g)?
    };
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1))?),
        None => Ok(y),
    }
}

/// `x` correlated with `weight` by Candle's own convolution (cuDNN on CUDA with the `cudnn`
/// feature), no bias: what accelerators run. The padding is added first (Candle's takes one
/// value for both sides and both dims). Its input gradient is the vendored backward's
/// `conv2d_input_grad` (vendor/README.md), also a Candle convolution.
pub fn conv2d_native(x: &Tensor, weight: &Tensor, g: ConvGeometry) -> Result<Tensor> {
    if g.stride.0 != g.stride.1 {
        candle_core::bail!("conv2d: unequal strides are only supported on the CPU");
    }
    let x = x.pad_with_zeros(2, g.padding.0, g.padding.0)?;
    let x = x.pad_with_zeros(3, g.padding.1, g.padding.1)?;
    x.conv2d(weight, 0, g.stride.0, 1, 1)
}

/// Helpers of the convolution modules' unit tests.
#[cfg(test)]
pub(crate) mod test_values {
    /// Deterministic values in [-1, 1) (xorshift).
    pub(crate) fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Largest |got - want| relative to the largest |want|.
    pub(crate) fn worst(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
        diff / scale
    }
}

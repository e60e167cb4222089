//! The layers the network is built from: Conv2d, BatchNorm (1d and 2d) and Linear, each
//! registering its tensors in a `ParamStore` under PyTorch's names.

use candle_core::{DType, Result, Tensor, Var, D};

use crate::ops::batch_norm::{batch_norm, BatchStats};
use crate::ops::{conv2d, conv2d_inference, ConvGeometry, PreparedWeights};
use crate::store::{Init, ParamStore};

pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// `name.suffix`, or `suffix` alone for the root.
pub fn join(prefix: &str, suffix: &str) -> String {
    if prefix.is_empty() {
        suffix.to_string()
    } else {
        format!("{prefix}.{suffix}")
    }
}

pub struct Conv2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub geometry: ConvGeometry,
}

impl Conv2d {
    /// `nn.Conv2d(cin, cout, kernel, stride, padding, bias)` with `weight` drawn by `init`
    /// (bias, when present, starts at 0 as in DAN's and torchvision's init).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &mut ParamStore,
        name: &str,
        cin: usize,
        cout: usize,
        geometry: ConvGeometry,
        bias: bool,
        init: Init,
    ) -> anyhow::Result<Self> {
        let (kh, kw) = geometry.kernel;
        let weight = store.param(join(name, "weight"), &[cout, cin, kh, kw], init)?;
        let bias = if bias {
            Some(store.param(join(name, "bias"), &[cout], Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            geometry,
        })
    }

    /// kaiming_normal_(mode='fan_out') for a conv of this shape.
    pub fn kaiming(cout: usize, kernel: (usize, usize)) -> Init {
        Init::KaimingFanOut {
            fan_out: cout * kernel.0 * kernel.1,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(
            x,
            self.weight.as_tensor(),
            self.bias.as_ref().map(|b| b.as_tensor()),
            self.geometry,
        )
    }
}

/// A convolution and the eval-mode batch norm after it as one convolution with a bias
/// (`weight * scale[o]`, `bias * scale + shift`; see `BatchNorm::eval_affine`), its tensors
/// detached: the inference forward's layer (`Dan::inference`).
pub struct FoldedConv {
    pub weight: Tensor,
    pub bias: Tensor,
    pub geometry: ConvGeometry,
    /// The weights' transformed forms, made on first use (the weights never change).
    prepared: PreparedWeights,
}

/// Rows of `weight` (axis 0) scaled by `scale`, `bias` (zeros when None) mapped to
/// `bias * scale + shift`: in f64, stored in the weight's dtype, detached.
fn fold_rows(
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: &[f64],
    shift: &[f64],
) -> Result<(Tensor, Tensor)> {
    let rows = weight.dim(0)?;
    let mut w = weight
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let per_row = w.len() / rows.max(1);
    for (row, &s) in w.chunks_mut(per_row).zip(scale) {
        row.iter_mut().for_each(|v| *v *= s);
    }
    let b0 = match bias {
        Some(b) => b.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        None => vec![0.0; rows],
    };
    let b: Vec<f64> = (0..rows).map(|o| b0[o] * scale[o] + shift[o]).collect();
    let (dev, dt) = (weight.device(), weight.dtype());
    Ok((
        Tensor::from_vec(w, weight.shape(), dev)?.to_dtype(dt)?,
        Tensor::from_vec(b, rows, dev)?.to_dtype(dt)?,
    ))
}

impl FoldedConv {
    pub fn new(conv: &Conv2d, bn: &BatchNorm) -> Result<Self> {
        let (scale, shift) = bn.eval_affine()?;
        let (weight, bias) = fold_rows(
            conv.weight.as_tensor(),
            conv.bias.as_ref().map(|b| b.as_tensor()),
            &scale,
            &shift,
        )?;
        Ok(Self {
            weight,
            bias,
            geometry: conv.geometry,
            prepared: PreparedWeights::default(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d_inference(x, &self.weight, &self.bias, self.geometry, &self.prepared)
    }
}

/// A linear layer, with the eval-mode BatchNorm1d after it folded in when given, detached.
pub struct FoldedLinear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl FoldedLinear {
    pub fn new(linear: &Linear, bn: Option<&BatchNorm>) -> Result<Self> {
        let n = linear.weight.dim(0)?;
        let (scale, shift) = match bn {
            Some(bn) => bn.eval_affine()?,
            None => (vec![1.0; n], vec![0.0; n]),
        };
        let (weight, bias) = fold_rows(
            linear.weight.as_tensor(),
            Some(linear.bias.as_tensor()),
            &scale,
            &shift,
        )?;
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// BatchNorm over channel axis 1, for [B, C] (BatchNorm1d) and [B, C, H, W] (BatchNorm2d).
/// Train mode normalises with the biased batch variance and updates the running statistics
/// with the unbiased one (momentum 0.1), exactly as PyTorch; eval mode uses the running stats.
pub struct BatchNorm {
    pub weight: Var,
    pub bias: Var,
    pub running_mean: Var,
    pub running_var: Var,
    pub num_batches_tracked: Var,
    pub eps: f64,
}

impl BatchNorm {
    pub fn new(store: &mut ParamStore, name: &str, channels: usize) -> anyhow::Result<Self> {
        Self::with_eps(store, name, channels, BN_EPS)
    }

    /// Inception's `BatchNorm2d(eps=0.001)`.
    pub fn with_eps(
        store: &mut ParamStore,
        name: &str,
        channels: usize,
        eps: f64,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            eps,
            weight: store.param(join(name, "weight"), &[channels], Init::Const(1.0))?,
            bias: store.param(join(name, "bias"), &[channels], Init::Const(0.0))?,
            running_mean: store.buffer(join(name, "running_mean"), &[channels], 0.0)?,
            running_var: store.buffer(join(name, "running_var"), &[channels], 1.0)?,
            num_batches_tracked: store.counter(join(name, "num_batches_tracked"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, train, false)
    }

    /// Eval mode as a per-channel affine map `x * scale + shift` (running statistics), in f64.
    pub fn eval_affine(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        let v = |t: &Var| t.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>();
        let (gamma, beta) = (v(&self.weight)?, v(&self.bias)?);
        let (mean, var) = (v(&self.running_mean)?, v(&self.running_var)?);
        let scale: Vec<f64> = gamma
            .iter()
            .zip(&var)
            .map(|(g, v)| g / (v + self.eps).sqrt())
            .collect();
        let shift = beta
            .iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        Ok((scale, shift))
    }

    /// `relu(bn(x))`, fused into one node where the fast path applies.
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, train, true)
    }

    fn forward_with(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            return self.forward_fused(x, train, relu);
        }
        let y = self.forward_composed(x, train)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// The f32 CPU path: one fused op (see `ops::batch_norm`), same semantics as the composed one.
    fn forward_fused(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let stats = if train {
            let per_channel = x.elem_count() / x.dim(1)?.max(1);
            if per_channel < 2 {
                candle_core::bail!(
                    "BatchNorm in train mode needs more than 1 value per channel, got input {:?}",
                    x.dims()
                );
            }
            BatchStats::Batch
        } else {
            BatchStats::Fixed {
                mean: self
                    .running_mean
                    .as_tensor()
                    .to_dtype(DType::F32)?
                    .to_vec1()?,
                var: self
                    .running_var
                    .as_tensor()
                    .to_dtype(DType::F32)?
                    .to_vec1()?,
            }
        };
        let (y, moments) = batch_norm(
            x,
            self.weight.as_tensor(),
            self.bias.as_tensor(),
            stats,
            self.eps,
            relu,
        )?;
        if let Some(m) = moments {
            let dev = x.device();
            let n = x.elem_count() / x.dim(1)?;
            let dt = self.running_mean.dtype();
            self.update_running(
                &Tensor::new(m.mean.as_slice(), dev)?.to_dtype(dt)?,
                &Tensor::new(m.var.as_slice(), dev)?.to_dtype(dt)?,
                n,
            )?;
        }
        Ok(y)
    }

    fn forward_composed(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        // Shape that broadcasts a per-channel vector against x.
        let mut bshape = vec![1usize; x.rank()];
        bshape[1] = c;
        let (mean, var) = if train {
            // Reduce over every axis but the channel one: move C first, flatten the rest.
            let xt = x.transpose(0, 1)?.contiguous()?.reshape((c, ()))?;
            let n = xt.dim(1)?;
            if n < 2 {
                candle_core::bail!(
                    "BatchNorm in train mode needs more than 1 value per channel, got input {:?}",
                    x.dims()
                );
            }
            let mean = xt.mean(D::Minus1)?;
            let centered = xt.broadcast_sub(&mean.unsqueeze(1)?)?;
            let var = centered.sqr()?.mean(D::Minus1)?; // biased, used to normalise
            self.update_running(&mean, &var, n)?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().clone(),
                self.running_var.as_tensor().clone(),
            )
        };
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let scale = (inv_std * self.weight.as_tensor())?;
        x.broadcast_sub(&mean.reshape(bshape.as_slice())?)?
            .broadcast_mul(&scale.reshape(bshape.as_slice())?)?
            .broadcast_add(&self.bias.as_tensor().reshape(bshape.as_slice())?)
    }

    fn update_running(&self, mean: &Tensor, biased_var: &Tensor, n: usize) -> Result<()> {
        let m = BN_MOMENTUM;
        let mean = mean.detach();
        let unbiased = (biased_var.detach() * (n as f64 / (n as f64 - 1.0)))?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean
            .set(&rm.to_dtype(self.running_mean.dtype())?)?;
        self.running_var
            .set(&rv.to_dtype(self.running_var.dtype())?)?;
        let count = self
            .num_batches_tracked
            .as_tensor()
            .to_dtype(DType::I64)?
            .to_scalar::<i64>()?;
        self.num_batches_tracked
            .set(&Tensor::new(count + 1, self.num_batches_tracked.device())?)?;
        Ok(())
    }
}

pub struct Linear {
    pub weight: Var,
    pub bias: Var,
}

impl Linear {
    /// PyTorch's default Linear init: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)).
    pub fn default_init(
        store: &mut ParamStore,
        name: &str,
        fan_in: usize,
        fan_out: usize,
    ) -> anyhow::Result<Self> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        Self::new(
            store,
            name,
            fan_in,
            fan_out,
            Init::Uniform { bound },
            Init::Uniform { bound },
        )
    }

    pub fn new(
        store: &mut ParamStore,
        name: &str,
        fan_in: usize,
        fan_out: usize,
        weight: Init,
        bias: Init,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            weight: store.param(join(name, "weight"), &[fan_out, fan_in], weight)?,
            bias: store.param(join(name, "bias"), &[fan_out], bias)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())
    }
}

/// LayerNorm over the last axis from plain tensor ops (Candle's `LayerNorm` op has no
/// gradient): biased variance, then `(x - mean) / sqrt(var + eps) * weight + bias`.
pub struct LayerNorm {
    pub weight: Var,
    pub bias: Var,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(store: &mut ParamStore, name: &str, dim: usize, eps: f64) -> anyhow::Result<Self> {
        Ok(Self {
            weight: store.param(join(name, "weight"), &[dim], Init::Const(1.0))?,
            bias: store.param(join(name, "bias"), &[dim], Init::Const(0.0))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, self.weight.as_tensor(), self.bias.as_tensor(), self.eps)
    }
}

/// LayerNorm over the last axis (biased variance), as a function of its parameters.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Softmax over the last axis from plain tensor ops (`softmax_last_dim` has no gradient). The
/// subtracted maximum is a detached constant: softmax does not depend on it.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `avg_pool2d(kernel 3, stride 1, padding 1, count_include_pad=True)`: zero padding, then the
/// mean of the 9 shifted windows (every border window divides by 9, as PyTorch's).
pub fn avg_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    let (h, w) = (x.dim(2)?, x.dim(3)?);
    let p = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut sum: Option<Tensor> = None;
    for dy in 0..3 {
        let rows = p.narrow(2, dy, h)?;
        for dx in 0..3 {
            let win = rows.narrow(3, dx, w)?;
            sum = Some(match sum {
                Some(s) => (s + win)?,
                None => win,
            });
        }
    }
    sum.expect("9 windows") / 9.0
}

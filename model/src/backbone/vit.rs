//! Vision Transformer with torchvision's names (`conv_proj`, `class_token`, `encoder.pos_embedding`,
//! `encoder.layers.encoder_layer_{i}.…`, `encoder.ln`, `heads.head`). Pre-norm blocks, LayerNorm
//! eps 1e-6, exact (erf) GELU, `nn.MultiheadAttention` semantics. Every op is built from tensor
//! ops with a gradient (Candle's LayerNorm and softmax ops have none). The feature map is the
//! final patch tokens after `encoder.ln`, class token dropped, laid back on the patch grid.

use anyhow::ensure;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::BackboneOutput;
use crate::layers::{join, softmax_last, Conv2d, LayerNorm, Linear};
use crate::ops::ConvGeometry;
use crate::store::{Init, ParamStore};

const LN_EPS: f64 = 1e-6;

/// torchvision's `VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_dim: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub mlp_dim: usize,
}

impl VitConfig {
    pub fn vit_b_32() -> Self {
        Self {
            image_size: 224,
            patch_size: 32,
            hidden_dim: 768,
            num_layers: 12,
            num_heads: 12,
            mlp_dim: 3072,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.patch_size > 0
                && self.image_size >= self.patch_size
                && self.image_size.is_multiple_of(self.patch_size),
            "vit: image_size ({}) must be a positive multiple of patch_size ({})",
            self.image_size,
            self.patch_size
        );
        ensure!(
            self.num_heads > 0 && self.hidden_dim.is_multiple_of(self.num_heads),
            "vit: hidden_dim ({}) must be a multiple of num_heads ({})",
            self.hidden_dim,
            self.num_heads
        );
        ensure!(
            self.num_layers > 0 && self.mlp_dim > 0,
            "vit: num_layers and mlp_dim must be positive"
        );
        Ok(())
    }

    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// `x @ w.T + b` for x of any rank (flattened to 2-D for one GEMM).
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = *dims.last().expect("rank >= 1");
    let y = x.reshape(((), d))?.matmul(&w.t()?)?.broadcast_add(b)?;
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out)
}

struct EncoderLayer {
    ln_1: LayerNorm,
    in_proj_weight: Var,
    in_proj_bias: Var,
    out_proj: Linear,
    ln_2: LayerNorm,
    mlp_0: Linear,
    mlp_3: Linear,
    heads: usize,
}

impl EncoderLayer {
    fn new(store: &mut ParamStore, name: &str, c: &VitConfig) -> anyhow::Result<Self> {
        let d = c.hidden_dim;
        let xavier = |fan_in: usize, fan_out: usize| Init::Uniform {
            bound: (6.0 / (fan_in + fan_out) as f64).sqrt(),
        };
        let ln_1 = LayerNorm::new(store, &join(name, "ln_1"), d, LN_EPS)?;
        let attn = join(name, "self_attention");
        let in_proj_weight =
            store.param(join(&attn, "in_proj_weight"), &[3 * d, d], xavier(d, 3 * d))?;
        let in_proj_bias = store.param(join(&attn, "in_proj_bias"), &[3 * d], Init::Const(0.0))?;
        let bound = 1.0 / (d as f64).sqrt();
        let out_proj = Linear::new(
            store,
            &join(&attn, "out_proj"),
            d,
            d,
            Init::Uniform { bound },
            Init::Const(0.0),
        )?;
        let ln_2 = LayerNorm::new(store, &join(name, "ln_2"), d, LN_EPS)?;
        let mlp_0 = Linear::new(
            store,
            &join(name, "mlp.0"),
            d,
            c.mlp_dim,
            xavier(d, c.mlp_dim),
            Init::Normal { std: 1e-6 },
        )?;
        let mlp_3 = Linear::new(
            store,
            &join(name, "mlp.3"),
            c.mlp_dim,
            d,
            xavier(c.mlp_dim, d),
            Init::Normal { std: 1e-6 },
        )?;
        Ok(Self {
            ln_1,
            in_proj_weight,
            in_proj_bias,
            out_proj,
            ln_2,
            mlp_0,
            mlp_3,
            heads: c.num_heads,
        })
    }

    /// `nn.MultiheadAttention(x, x, x)`: stacked q/k/v projection, per-head scaled dot-product
    /// softmax attention, heads concatenated in order, then out_proj.
    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = linear(
            x,
            self.in_proj_weight.as_tensor(),
            self.in_proj_bias.as_tensor(),
        )?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * d, d)?
                .reshape((b, l, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (hd as f64).sqrt())?;
        let ctx = softmax_last(&scores)?.matmul(&v)?; // [B, H, L, hd]
        let ctx = ctx.transpose(1, 2)?.contiguous()?.reshape((b, l, d))?;
        linear(
            &ctx,
            self.out_proj.weight.as_tensor(),
            self.out_proj.bias.as_tensor(),
        )
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention(&self.ln_1.forward(x)?)?)?;
        let h = linear(
            &self.ln_2.forward(&x)?,
            self.mlp_0.weight.as_tensor(),
            self.mlp_0.bias.as_tensor(),
        )?
        .gelu_erf()?;
        let h = linear(
            &h,
            self.mlp_3.weight.as_tensor(),
            self.mlp_3.bias.as_tensor(),
        )?;
        x + h
    }
}

pub struct Vit {
    class_token: Var,
    conv_proj: Conv2d,
    pos_embedding: Var,
    layers: Vec<EncoderLayer>,
    ln: LayerNorm,
    head: Option<Linear>,
    pub config: VitConfig,
}

impl Vit {
    /// Registers in torchvision's state-dict order. Initialisation follows torchvision's:
    /// conv_proj N(0, 1/fan_in), zero class token, position embedding N(0, 0.02), xavier-uniform
    /// attention and MLP weights (MLP biases N(0, 1e-6)), zero head.
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        c: &VitConfig,
        classifier: Option<usize>,
    ) -> anyhow::Result<Self> {
        c.validate()?;
        let at = |m: &str| join(prefix, m);
        let d = c.hidden_dim;
        let class_token = store.param(at("class_token"), &[1, 1, d], Init::Const(0.0))?;
        let p = c.patch_size;
        let fan_in = 3 * p * p;
        let conv_proj = Conv2d::new(
            store,
            &at("conv_proj"),
            3,
            d,
            ConvGeometry::new((p, p), (p, p), (0, 0)),
            true,
            Init::Normal {
                std: (1.0 / fan_in as f64).sqrt(),
            },
        )?;
        let tokens = 1 + c.grid() * c.grid();
        let pos_embedding = store.param(
            at("encoder.pos_embedding"),
            &[1, tokens, d],
            Init::Normal { std: 0.02 },
        )?;
        let layers = (0..c.num_layers)
            .map(|i| EncoderLayer::new(store, &at(&format!("encoder.layers.encoder_layer_{i}")), c))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ln = LayerNorm::new(store, &at("encoder.ln"), d, LN_EPS)?;
        let head = match classifier {
            Some(n) => Some(Linear::new(
                store,
                &at("heads.head"),
                d,
                n,
                Init::Const(0.0),
                Init::Const(0.0),
            )?),
            None => None,
        };
        Ok(Self {
            class_token,
            conv_proj,
            pos_embedding,
            layers,
            ln,
            head,
            config: c.clone(),
        })
    }

    /// The encoder output after `encoder.ln`: [B, 1 + N, D].
    fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let s = self.config.image_size;
        if h != s || w != s {
            candle_core::bail!(
                "vit: input is {h}x{w}, the model takes {s}x{s} (model.backbone.image_size)"
            );
        }
        let d = self.config.hidden_dim;
        let patches = self.conv_proj.forward(x)?; // [B, D, g, g]
        let n = patches.dim(2)? * patches.dim(3)?;
        // Row-major patch order: token 1 + r * g + c.
        let tokens = patches.reshape((b, d, n))?.transpose(1, 2)?;
        let cls = self.class_token.as_tensor().broadcast_as((b, 1, d))?;
        let mut y =
            Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(self.pos_embedding.as_tensor())?;
        for layer in &self.layers {
            y = layer.forward(&y)?;
        }
        self.ln.forward(&y)
    }

    /// The patch tokens on the patch grid: [B, D, g, g].
    fn to_map(&self, encoded: &Tensor) -> Result<Tensor> {
        let (b, l, d) = encoded.dims3()?;
        let g = self.config.grid();
        encoded
            .narrow(1, 1, l - 1)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, d, g, g))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.to_map(&self.encode(x)?)
    }

    pub fn forward_all(&self, x: &Tensor) -> Result<BackboneOutput> {
        let e = self.encode(x)?;
        let logits = match &self.head {
            Some(h) => Some(h.forward(&e.narrow(1, 0, 1)?.squeeze(1)?)?),
            None => None,
        };
        Ok(BackboneOutput {
            features: self.to_map(&e)?,
            logits,
            aux_logits: None,
        })
    }
}

//! DAN: backbone feature map F, K cross-attention heads, attention fusion (log-softmax over the
//! head axis, then sum), FC and BatchNorm1d on the logits; plus the EAC class activation map.
//! Spec sections 1.2-1.4; parameter names are the official DAN state-dict keys.

use anyhow::ensure;
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, BackboneConfig, TrunkNames};
use crate::layers::{join, BatchNorm, Conv2d, FoldedConv, FoldedLinear, Linear};
use crate::ops::{in_place, second_axis, ConvGeometry};
use crate::store::{Init, ParamStore};

/// The architecture of one model: everything needed to rebuild it from a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DanConfig {
    pub backbone: BackboneConfig,
    pub heads: usize,
    pub classes: usize,
}

impl DanConfig {
    /// The thesis model: ResNet-18 trunk, 4 heads, 7 classes.
    pub fn thesis() -> Self {
        Self {
            backbone: BackboneConfig::resnet18(),
            heads: 4,
            classes: 7,
        }
    }

    /// Feature channels C of the backbone map; the heads follow it.
    pub fn feat_channels(&self) -> usize {
        self.backbone.out_channels()
    }
}

/// Spatial attention unit: 1x1 C->C/2 (+BN); 3x3, 1x3, 3x1 C/2->C (+BN each) summed, one
/// ReLU; channel sum to a [B,1,h,w] map multiplied into F.
struct SpatialAttention {
    conv1x1: (Conv2d, BatchNorm),
    branches: [(Conv2d, BatchNorm); 3],
}

/// Channel attention unit: GAP -> Linear(C->C/16) -> BN1d -> ReLU -> Linear(C/16->C) -> sigmoid,
/// output GAP * gate.
struct ChannelAttention {
    fc1: Linear,
    bn: BatchNorm,
    fc2: Linear,
}

struct CrossAttentionHead {
    sa: SpatialAttention,
    ca: ChannelAttention,
}

fn conv_bn(
    store: &mut ParamStore,
    name: &str,
    cin: usize,
    cout: usize,
    kernel: (usize, usize),
    padding: (usize, usize),
) -> anyhow::Result<(Conv2d, BatchNorm)> {
    let g = ConvGeometry::new(kernel, (1, 1), padding);
    let conv = Conv2d::new(
        store,
        &join(name, "0"),
        cin,
        cout,
        g,
        true,
        Conv2d::kaiming(cout, kernel),
    )?;
    let bn = BatchNorm::new(store, &join(name, "1"), cout)?;
    Ok((conv, bn))
}

impl CrossAttentionHead {
    fn new(store: &mut ParamStore, name: &str, c: usize) -> anyhow::Result<Self> {
        let (r, b) = (c / 2, c / 16);
        let sa_name = join(name, "sa");
        let sa = SpatialAttention {
            conv1x1: conv_bn(store, &join(&sa_name, "conv1x1"), c, r, (1, 1), (0, 0))?,
            branches: [
                conv_bn(store, &join(&sa_name, "conv_3x3"), r, c, (3, 3), (1, 1))?,
                conv_bn(store, &join(&sa_name, "conv_1x3"), r, c, (1, 3), (0, 1))?,
                conv_bn(store, &join(&sa_name, "conv_3x1"), r, c, (3, 1), (1, 0))?,
            ],
        };
        let ca_name = join(name, "ca.attention");
        let small = Init::Normal { std: 0.001 };
        let ca = ChannelAttention {
            fc1: Linear::new(store, &join(&ca_name, "0"), c, b, small, Init::Const(0.0))?,
            bn: BatchNorm::new(store, &join(&ca_name, "1"), b)?,
            fc2: Linear::new(store, &join(&ca_name, "3"), b, c, small, Init::Const(0.0))?,
        };
        Ok(Self { sa, ca })
    }

    /// Spatial attention map `a` [B,1,h,w] (before it is multiplied into F).
    fn spatial_map(&self, feat: &Tensor, train: bool) -> Result<Tensor> {
        let (conv, bn) = &self.sa.conv1x1;
        let y = bn.forward(&conv.forward(feat)?, train)?;
        let mut sum: Option<Tensor> = None;
        for (conv, bn) in &self.sa.branches {
            let z = bn.forward(&conv.forward(&y)?, train)?;
            sum = Some(match sum {
                None => z,
                Some(s) => (s + z)?,
            });
        }
        second_axis::sum_axis1(&sum.expect("three branches").relu()?, true)
    }

    /// Head output [B, C] and its spatial map [B, h, w].
    fn forward(&self, feat: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let amap = self.spatial_map(feat, train)?;
        attend(feat, amap, |g| {
            let z = self
                .ca
                .bn
                .forward(&self.ca.fc1.forward(g)?, train)?
                .relu()?;
            self.ca.fc2.forward(&z)
        })
    }
}

/// A head's output from its spatial map `amap` [B,1,h,w]: F weighted by the map, pooled to g
/// [B, C], gated by `sigmoid(channel(g))`; with the map as [B, h, w].
fn attend(
    feat: &Tensor,
    amap: Tensor,
    channel: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    // g = the mean over pixels of F ⊙ a, as one batched product [B, C, P] x [B, P, 1]: Candle's
    // reduction over the two small trailing axes took ~2.5x as long, forward and backward (at
    // [64, 512, 2, 2]: 4.6 against 1.8 ms per head).
    let (b, c, h, w) = feat.dims4()?;
    let p = h * w;
    let g = (feat
        .reshape((b, c, p))?
        .matmul(&amap.reshape((b, p, 1))?)?
        .squeeze(2)?
        / p as f64)?;
    let gate = candle_nn::ops::sigmoid(&channel(&g)?)?;
    Ok(((g * gate)?, amap.squeeze(1)?))
}

/// The network's output from the feature map and each head's (output, spatial map): heads
/// stacked [B, K, C], log-softmax over the head axis when K > 1, `classify` of their sum.
fn combine_heads(
    feat: Tensor,
    heads: impl ExactSizeIterator<Item = Result<(Tensor, Tensor)>>,
    classify: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<DanOutput> {
    let k = heads.len();
    let (mut outs, mut maps) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for head in heads {
        let (out, map) = head?;
        outs.push(out);
        maps.push(map);
    }
    let mut heads = Tensor::stack(&outs, 1)?; // [B, K, C]
    if k > 1 {
        heads = second_axis::log_softmax_axis1(&heads)?; // over the head axis
    }
    Ok(DanOutput {
        logits: classify(&second_axis::sum_axis1(&heads, false)?)?,
        feat,
        heads,
        spatial_maps: Tensor::stack(&maps, 1)?,
    })
}

/// A head with its batch norms folded (see `Dan::inference`).
struct FoldedHead {
    conv1x1: FoldedConv,
    branches: [FoldedConv; 3],
    fc1: FoldedLinear,
    fc2: FoldedLinear,
}

impl FoldedHead {
    fn new(h: &CrossAttentionHead) -> Result<Self> {
        let fold = |(c, b): &(Conv2d, BatchNorm)| FoldedConv::new(c, b);
        let [a, b, c] = &h.sa.branches;
        Ok(Self {
            conv1x1: fold(&h.sa.conv1x1)?,
            branches: [fold(a)?, fold(b)?, fold(c)?],
            fc1: FoldedLinear::new(&h.ca.fc1, Some(&h.ca.bn))?,
            fc2: FoldedLinear::new(&h.ca.fc2, None)?,
        })
    }

    /// `CrossAttentionHead::forward(feat, false)`.
    fn forward(&self, feat: &Tensor) -> Result<(Tensor, Tensor)> {
        let y = self.conv1x1.forward(feat)?;
        let [a, b, c] = &self.branches;
        let z = ((a.forward(&y)? + b.forward(&y)?)? + c.forward(&y)?)?;
        let amap = second_axis::sum_axis1(&in_place::relu(z)?, true)?;
        attend(feat, amap, |g| {
            self.fc2.forward(&in_place::relu(self.fc1.forward(g)?)?)
        })
    }
}

/// `Dan::inference`: the eval-mode network with every batch norm folded into the layer before
/// it, detached (no autograd graph, so each activation is freed once the next layer has read
/// it), ReLUs and residual joins in place. A snapshot: rebuild it after the weights change.
pub struct DanInference<'a> {
    dan: &'a Dan,
    /// None: a backbone without a folded form runs its own eval forward.
    backbone: Option<crate::backbone::resnet::FoldedResNet>,
    heads: Vec<FoldedHead>,
    fc: FoldedLinear,
}

impl DanInference<'_> {
    /// `Dan::forward(x, false)` up to float32 rounding (tested against it).
    pub fn forward(&self, x: &Tensor) -> Result<DanOutput> {
        let feat = match &self.backbone {
            Some(b) => b.forward(x)?,
            None => self.dan.backbone.forward(x, false)?.detach(),
        };
        let heads = self.heads.iter().map(|h| h.forward(&feat));
        combine_heads(feat.clone(), heads, |s| self.fc.forward(s))
    }
}

/// What one forward pass returns.
pub struct DanOutput {
    /// BN'd logits [B, classes].
    pub logits: Tensor,
    /// Backbone map F [B, C, h, w].
    pub feat: Tensor,
    /// Head outputs [B, K, C], after log-softmax over K when K > 1.
    pub heads: Tensor,
    /// Each head's spatial attention map [B, K, h, w] (for visualisation).
    pub spatial_maps: Tensor,
}

pub struct Dan {
    pub config: DanConfig,
    backbone: Backbone,
    heads: Vec<CrossAttentionHead>,
    pub fc: Linear,
    bn: BatchNorm,
}

impl Dan {
    /// Registers, in DAN's order: features, cat_head0..K-1, fc, bn.
    pub fn new(store: &mut ParamStore, config: &DanConfig) -> anyhow::Result<Self> {
        ensure!(
            config.heads >= 1,
            "model.heads must be at least 1, got {}",
            config.heads
        );
        ensure!(
            config.classes >= 2,
            "model.classes must be at least 2, got {}",
            config.classes
        );
        let c = config.feat_channels();
        ensure!(
            c >= 16 && c.is_multiple_of(16),
            "backbone feature channels must be a multiple of 16 (heads use C/2 and C/16), got {c}"
        );
        // DAN's names: a ResNet trunk is its `features` Sequential (`features.0` = conv1, …);
        // other backbones keep torchvision's module names under `features.`.
        let backbone = match &config.backbone {
            BackboneConfig::ResNet(_) => {
                Backbone::new(store, "", TrunkNames::DanFeatures, &config.backbone, None)?
            }
            _ => Backbone::new(
                store,
                "features",
                TrunkNames::Torchvision,
                &config.backbone,
                None,
            )?,
        };
        let heads = (0..config.heads)
            .map(|i| CrossAttentionHead::new(store, &format!("cat_head{i}"), c))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let fc = Linear::default_init(store, "fc", c, config.classes)?;
        let bn = BatchNorm::new(store, "bn", config.classes)?;
        Ok(Self {
            config: config.clone(),
            backbone,
            heads,
            fc,
            bn,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<DanOutput> {
        let feat = self.backbone.forward(x, train)?;
        let heads = self.heads.iter().map(|h| h.forward(&feat, train));
        combine_heads(feat.clone(), heads, |s| {
            self.bn.forward(&self.fc.forward(s)?, train)
        })
    }

    /// The inference form of this network (see `DanInference`): what evaluation, `predict` and
    /// the inference benchmark run.
    pub fn inference(&self) -> Result<DanInference<'_>> {
        Ok(DanInference {
            dan: self,
            backbone: self.backbone.fold()?,
            heads: self
                .heads
                .iter()
                .map(FoldedHead::new)
                .collect::<Result<_>>()?,
            fc: FoldedLinear::new(&self.fc, Some(&self.bn))?,
        })
    }

    /// Class activation map M[b,k,y,x] = sum_c W_fc[k,c] F[b,c,y,x], with W detached and no
    /// bias (spec 1.4): the consistency loss never updates the classifier.
    pub fn cam(&self, feat: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = feat.dims4()?;
        let weight = self.fc.weight.as_tensor().detach(); // [K, C]
        let k = weight.dim(0)?;
        let f = feat.transpose(0, 1)?.reshape((c, b * h * w))?; // [C, B*h*w]
        weight
            .matmul(&f)?
            .reshape((k, b, h, w))?
            .transpose(0, 1)?
            .contiguous()
    }
}

//! ResNet trunk (conv1, bn1, relu, maxpool, layer1..layer4) with torchvision's module layout and
//! state-dict names: BasicBlock (ResNet-18/34) or Bottleneck (ResNet-50, "v1.5": the stride on
//! the 3x3), configurable stage widths and block counts, and optionally torchvision's `fc`. The
//! `caffe` switch gives the Caffe-ported layout of EAC's VGGFace2 weights (same names, different
//! network): the stride on each bottleneck's first 1x1, and a ceil-mode stem pool without padding.

use anyhow::ensure;
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::{join, BatchNorm, Conv2d, FoldedConv, Linear};
use crate::ops::{add_relu, in_place, max_pool2d, max_pool2d_ceil, ConvGeometry};
use crate::store::ParamStore;

/// How the trunk's modules are named in the state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrunkNames {
    /// torchvision's `conv1`, `bn1`, `layer1`..`layer4`.
    Torchvision,
    /// DAN's `features` Sequential: `features.0` (conv1), `.1` (bn1), `.4`..`.7` (layer1..4).
    DanFeatures,
}

/// torchvision's trunk modules and their index in DAN's `features` Sequential (relu and maxpool,
/// 2 and 3, hold no tensors).
const DAN_FEATURE_INDEX: [(&str, usize); 6] = [
    ("conv1", 0),
    ("bn1", 1),
    ("layer1", 4),
    ("layer2", 5),
    ("layer3", 6),
    ("layer4", 7),
];

fn dan_index(torchvision_module: &str) -> Option<usize> {
    DAN_FEATURE_INDEX
        .iter()
        .find(|(m, _)| *m == torchvision_module)
        .map(|&(_, i)| i)
}

impl TrunkNames {
    fn module(self, torchvision_name: &str) -> String {
        match self {
            TrunkNames::Torchvision => torchvision_name.to_string(),
            TrunkNames::DanFeatures => dan_module(torchvision_name).unwrap_or_else(|| {
                unreachable!("no DAN index for trunk module {torchvision_name}")
            }),
        }
    }
}

/// DAN's name of a trunk module: `features.N` for torchvision's `conv1`, `bn1`, `layer1`..`layer4`.
pub fn dan_module(torchvision_module: &str) -> Option<String> {
    Some(format!("features.{}", dan_index(torchvision_module)?))
}

/// DAN's `features.N` name of a torchvision trunk key (`layer2.0.conv1.weight` ->
/// `features.5.0.conv1.weight`); None for keys outside the trunk.
pub fn dan_name(key: &str) -> Option<String> {
    let (module, rest) = key.split_once('.')?;
    Some(format!("{}.{rest}", dan_module(module)?))
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_true(b: &bool) -> bool {
    *b
}

fn yes() -> bool {
    true
}

/// torchvision's stage strides: layer1 keeps the stem's resolution, layer2..4 halve it.
pub const TORCHVISION_STRIDES: [usize; 4] = [1, 2, 2, 2];

fn torchvision_strides() -> [usize; 4] {
    TORCHVISION_STRIDES
}

fn is_torchvision_strides(s: &[usize; 4]) -> bool {
    *s == TORCHVISION_STRIDES
}

/// Stage widths and block counts. ResNet-18 is `[64,128,256,512]` x `[2,2,2,2]`; ResNet-50 is
/// the same widths x `[3,4,6,3]` with bottleneck blocks (4x expansion: 2048 output channels).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    pub widths: [usize; 4],
    pub blocks: [usize; 4],
    /// Bottleneck blocks (1x1, 3x3, 1x1 x4) instead of basic ones. Left out of the serialised
    /// config when false, so older configs keep their trial keys.
    #[serde(default, skip_serializing_if = "is_false")]
    pub bottleneck: bool,
    /// Stride of each stage's first block (torchvision: `[1, 2, 2, 2]`, total stride 32). A
    /// CPU-sized input keeps a useful feature map with a smaller total stride, e.g. `[1, 1, 2, 1]`
    /// (total 8: 56 px -> 7 x 7, the thesis's grid at 224 px). Parameter names and shapes do not
    /// depend on it. Left out of the serialised config when torchvision's.
    #[serde(
        default = "torchvision_strides",
        skip_serializing_if = "is_torchvision_strides"
    )]
    pub strides: [usize; 4],
    /// The stem's 3x3 stride-2 max pool (torchvision: on). Left out when on.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub stem_pool: bool,
    /// torchvision's `zero_init_residual`: the last BN of every residual branch starts with
    /// weight 0, so each block starts as its shortcut (Goyal et al. 2017). Off in torchvision and
    /// the papers; a deep trunk trained from scratch at a small width needs it. Left out when off.
    #[serde(default, skip_serializing_if = "is_false")]
    pub zero_init_residual: bool,
    /// The Caffe-ported ResNet ("v1") of EAC's `resnet50_ft_weight.pkl`: a bottleneck's stride on
    /// its first 1x1 convolution (torchvision "v1.5": on the 3x3) and a stem max pool k3 s2 **p0
    /// ceil mode** (torchvision: p1, floor). Parameter names and shapes are torchvision's, so only
    /// this switch tells the two apart. Left out when off.
    #[serde(default, skip_serializing_if = "is_false")]
    pub caffe: bool,
}

impl ResNetConfig {
    pub fn resnet18() -> Self {
        Self {
            widths: [64, 128, 256, 512],
            blocks: [2, 2, 2, 2],
            bottleneck: false,
            strides: TORCHVISION_STRIDES,
            stem_pool: true,
            zero_init_residual: false,
            caffe: false,
        }
    }

    pub fn resnet50() -> Self {
        Self {
            widths: [64, 128, 256, 512],
            blocks: [3, 4, 6, 3],
            bottleneck: true,
            strides: TORCHVISION_STRIDES,
            stem_pool: true,
            zero_init_residual: false,
            caffe: false,
        }
    }

    /// Basic blocks with these widths and counts.
    pub fn basic(widths: [usize; 4], blocks: [usize; 4]) -> Self {
        Self {
            widths,
            blocks,
            bottleneck: false,
            strides: TORCHVISION_STRIDES,
            stem_pool: true,
            zero_init_residual: false,
            caffe: false,
        }
    }

    fn expansion(&self) -> usize {
        if self.bottleneck {
            4
        } else {
            1
        }
    }

    /// Channels of the last feature map.
    pub fn out_channels(&self) -> usize {
        self.widths[3] * self.expansion()
    }

    /// The checks serde cannot express (the message names the field).
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.widths.iter().all(|&w| w > 0),
            "resnet: every stage width must be positive, got {:?}",
            self.widths
        );
        ensure!(
            self.blocks.iter().all(|&b| b > 0),
            "resnet: every stage needs at least one block, got {:?}",
            self.blocks
        );
        ensure!(
            self.strides.iter().all(|&s| (1..=2).contains(&s)),
            "resnet: strides: every stage stride must be 1 or 2, got {:?}",
            self.strides
        );
        Ok(())
    }

    /// The torchvision layout (stage strides `[1, 2, 2, 2]`, stem pool on)?
    pub fn is_torchvision_layout(&self) -> bool {
        self.strides == TORCHVISION_STRIDES && self.stem_pool
    }

    /// Side of the feature map for a square input of `size` px.
    pub fn feature_side(&self, size: usize) -> usize {
        let out = |s: usize, k: usize, st: usize, p: usize| (s + 2 * p - k) / st + 1;
        let mut s = out(size, 7, 2, 3);
        if self.stem_pool {
            s = if self.caffe {
                crate::ops::pool::pooled_len(s, 3, 2, 0, true)
            } else {
                out(s, 3, 2, 1)
            };
        }
        for &st in &self.strides {
            s = out(s, 3, st, 1);
        }
        s
    }
}

/// The shortcut projection `downsample` (1x1 conv with the block's stride, then BN) when the
/// block changes resolution or width; None for an identity shortcut.
fn downsample(
    store: &mut ParamStore,
    name: &str,
    cin: usize,
    cout: usize,
    stride: usize,
) -> anyhow::Result<Option<(Conv2d, BatchNorm)>> {
    if stride == 1 && cin == cout {
        return Ok(None);
    }
    let g = ConvGeometry::new((1, 1), (stride, stride), (0, 0));
    let conv = Conv2d::new(
        store,
        &join(name, "downsample.0"),
        cin,
        cout,
        g,
        false,
        Conv2d::kaiming(cout, (1, 1)),
    )?;
    Ok(Some((
        conv,
        BatchNorm::new(store, &join(name, "downsample.1"), cout)?,
    )))
}

/// torchvision's BasicBlock: 3x3 -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU.
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl BasicBlock {
    fn new(
        store: &mut ParamStore,
        name: &str,
        cin: usize,
        cout: usize,
        stride: usize,
    ) -> anyhow::Result<Self> {
        let k3 = ConvGeometry::new((3, 3), (stride, stride), (1, 1));
        let k3s1 = ConvGeometry::new((3, 3), (1, 1), (1, 1));
        let conv1 = Conv2d::new(
            store,
            &join(name, "conv1"),
            cin,
            cout,
            k3,
            false,
            Conv2d::kaiming(cout, (3, 3)),
        )?;
        let bn1 = BatchNorm::new(store, &join(name, "bn1"), cout)?;
        let conv2 = Conv2d::new(
            store,
            &join(name, "conv2"),
            cout,
            cout,
            k3s1,
            false,
            Conv2d::kaiming(cout, (3, 3)),
        )?;
        let bn2 = BatchNorm::new(store, &join(name, "bn2"), cout)?;
        let downsample = downsample(store, name, cin, cout, stride)?;
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            downsample,
        })
    }

    /// The BN whose output joins the shortcut.
    fn last_bn(&self) -> &BatchNorm {
        &self.bn2
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        let y = self.bn1.forward_relu(&self.conv1.forward(x)?, train)?;
        let y = self.bn2.forward(&self.conv2.forward(&y)?, train)?;
        add_relu(&y, &shortcut)
    }
}

/// torchvision's Bottleneck (v1.5): 1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (x4)
/// -> BN, + shortcut, ReLU; in the Caffe layout the stride is on the first 1x1.
struct Bottleneck {
    convs: [Conv2d; 3],
    bns: [BatchNorm; 3],
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl Bottleneck {
    /// `stride_on_1x1`: the Caffe layout (stride on conv1) instead of torchvision's (on conv2).
    fn new(
        store: &mut ParamStore,
        name: &str,
        cin: usize,
        width: usize,
        stride: usize,
        stride_on_1x1: bool,
    ) -> anyhow::Result<Self> {
        let cout = width * 4;
        let (s1, s2) = if stride_on_1x1 {
            (stride, 1)
        } else {
            (1, stride)
        };
        let geos = [
            ConvGeometry::new((1, 1), (s1, s1), (0, 0)),
            ConvGeometry::new((3, 3), (s2, s2), (1, 1)),
            ConvGeometry::new((1, 1), (1, 1), (0, 0)),
        ];
        let chans = [(cin, width), (width, width), (width, cout)];
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        for i in 0..3 {
            let (a, b) = chans[i];
            let k = geos[i].kernel;
            convs.push(Conv2d::new(
                store,
                &join(name, &format!("conv{}", i + 1)),
                a,
                b,
                geos[i],
                false,
                Conv2d::kaiming(b, k),
            )?);
            bns.push(BatchNorm::new(
                store,
                &join(name, &format!("bn{}", i + 1)),
                b,
            )?);
        }
        let downsample = downsample(store, name, cin, cout, stride)?;
        let [c1, c2, c3]: [Conv2d; 3] = convs.try_into().map_err(|_| anyhow::anyhow!("3 convs"))?;
        let [b1, b2, b3]: [BatchNorm; 3] = bns.try_into().map_err(|_| anyhow::anyhow!("3 BNs"))?;
        Ok(Self {
            convs: [c1, c2, c3],
            bns: [b1, b2, b3],
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        let y = self.bns[0].forward_relu(&self.convs[0].forward(x)?, train)?;
        let y = self.bns[1].forward_relu(&self.convs[1].forward(&y)?, train)?;
        let y = self.bns[2].forward(&self.convs[2].forward(&y)?, train)?;
        add_relu(&y, &shortcut)
    }
}

enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    fn last_bn(&self) -> &BatchNorm {
        match self {
            Block::Basic(b) => b.last_bn(),
            Block::Bottleneck(b) => &b.bns[2],
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Block::Basic(b) => b.forward(x, train),
            Block::Bottleneck(b) => b.forward(x, train),
        }
    }
}

pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    layers: Vec<Vec<Block>>,
    fc: Option<Linear>,
    pub config: ResNetConfig,
}

impl ResNet {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        names: TrunkNames,
        config: &ResNetConfig,
        classifier: Option<usize>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let at = |m: &str| join(prefix, &names.module(m));
        let w0 = config.widths[0];
        let stem = ConvGeometry::new((7, 7), (2, 2), (3, 3));
        let conv1 = Conv2d::new(
            store,
            &at("conv1"),
            3,
            w0,
            stem,
            false,
            Conv2d::kaiming(w0, (7, 7)),
        )?;
        let bn1 = BatchNorm::new(store, &at("bn1"), w0)?;
        let mut layers = Vec::new();
        let mut cin = w0;
        for (stage, (&width, &count)) in config.widths.iter().zip(&config.blocks).enumerate() {
            let layer_name = at(&format!("layer{}", stage + 1));
            let mut blocks = Vec::new();
            for j in 0..count {
                let stride = if j == 0 { config.strides[stage] } else { 1 };
                let name = join(&layer_name, &j.to_string());
                if config.bottleneck {
                    blocks.push(Block::Bottleneck(Bottleneck::new(
                        store,
                        &name,
                        cin,
                        width,
                        stride,
                        config.caffe,
                    )?));
                    cin = width * 4;
                } else {
                    blocks.push(Block::Basic(BasicBlock::new(
                        store, &name, cin, width, stride,
                    )?));
                    cin = width;
                }
            }
            layers.push(blocks);
        }
        if config.zero_init_residual {
            // Set after creation: a constant init draws nothing from the store's generator, so
            // every other initial weight is the same as without the switch.
            for block in layers.iter().flatten() {
                let w = &block.last_bn().weight;
                w.set(&w.as_tensor().zeros_like()?)?;
            }
        }
        let fc = match classifier {
            Some(n) => Some(Linear::default_init(store, &join(prefix, "fc"), cin, n)?),
            None => None,
        };
        Ok(Self {
            conv1,
            bn1,
            layers,
            fc,
            config: config.clone(),
        })
    }

    /// torchvision's head: global average pool, then `fc` (None without a classifier).
    pub fn classify(&self, features: &Tensor) -> Result<Option<Tensor>> {
        match &self.fc {
            Some(fc) => Ok(Some(fc.forward(&features.mean((2, 3))?)?)),
            None => Ok(None),
        }
    }

    /// This network in eval mode with every batch norm folded into its convolution (the
    /// inference forward, `Dan::inference`).
    pub fn fold(&self) -> Result<FoldedResNet> {
        let down = |d: &Option<(Conv2d, BatchNorm)>| {
            d.as_ref().map(|(c, b)| FoldedConv::new(c, b)).transpose()
        };
        let blocks = self
            .layers
            .iter()
            .flatten()
            .map(|block| {
                Ok(match block {
                    Block::Basic(b) => FoldedBlock {
                        convs: vec![
                            FoldedConv::new(&b.conv1, &b.bn1)?,
                            FoldedConv::new(&b.conv2, &b.bn2)?,
                        ],
                        downsample: down(&b.downsample)?,
                    },
                    Block::Bottleneck(b) => FoldedBlock {
                        convs: b
                            .convs
                            .iter()
                            .zip(&b.bns)
                            .map(|(c, n)| FoldedConv::new(c, n))
                            .collect::<Result<_>>()?,
                        downsample: down(&b.downsample)?,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(FoldedResNet {
            stem: FoldedConv::new(&self.conv1, &self.bn1)?,
            stem_pool: self.config.stem_pool,
            caffe: self.config.caffe,
            blocks,
        })
    }

    /// The last feature map F: [B, widths[3], h, w].
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.bn1.forward_relu(&self.conv1.forward(x)?, train)?;
        if self.config.stem_pool {
            y = if self.config.caffe {
                max_pool2d_ceil(&y, 3, 2, 0)?
            } else {
                max_pool2d(&y, 3, 2, 1)?
            };
        }
        for layer in &self.layers {
            for block in layer {
                y = block.forward(&y, train)?;
            }
        }
        Ok(y)
    }
}

/// A residual block with its batch norms folded: ReLU after every convolution but the last,
/// then `relu(last + shortcut)`.
struct FoldedBlock {
    convs: Vec<FoldedConv>,
    downsample: Option<FoldedConv>,
}

/// `ResNet::fold`: the eval-mode trunk with folded batch norms, ReLUs and residual joins in
/// place, and no autograd graph.
pub struct FoldedResNet {
    stem: FoldedConv,
    stem_pool: bool,
    caffe: bool,
    blocks: Vec<FoldedBlock>,
}

impl FoldedResNet {
    /// `ResNet::forward(x, false)`, up to float32 rounding.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = in_place::relu(self.stem.forward(x)?)?;
        if self.stem_pool {
            y = if self.caffe {
                max_pool2d_ceil(&y, 3, 2, 0)?
            } else {
                max_pool2d(&y, 3, 2, 1)?
            };
        }
        for block in &self.blocks {
            let shortcut = match &block.downsample {
                Some(conv) => conv.forward(&y)?,
                None => y.clone(),
            };
            let last = block.convs.len() - 1;
            let mut z = y;
            for (i, conv) in block.convs.iter().enumerate() {
                z = conv.forward(&z)?;
                if i < last {
                    z = in_place::relu(z)?;
                }
            }
            // `z` is the last convolution's fresh output: written in place.
            y = in_place::add_relu(z, &shortcut)?;
        }
        Ok(y)
    }
}

//! Inception-v3 with torchvision's module names (`Conv2d_1a_3x3` … `Mixed_7c`, `AuxLogits`, `fc`),
//! its BasicConv2d (conv without bias, BatchNorm eps 1e-3, ReLU), floor-mode max pools and
//! `count_include_pad` average pools, and a width multiplier for CPU-sized variants. The feature
//! map is Mixed_7c's output (2048 channels at width 1).

use anyhow::bail;
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::{scaled, BackboneOutput};
use crate::layers::{avg_pool_3x3_same, join, BatchNorm, Conv2d, Linear};
use crate::ops::{max_pool2d, ConvGeometry};
use crate::store::ParamStore;

const BN_EPS: f64 = 1e-3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InceptionConfig {
    /// Channel multiplier of every conv (1 = torchvision's Inception-v3).
    pub width: f64,
    /// torchvision's `transform_input`: re-normalise an ImageNet-normalised input to the
    /// [-1, 1] scaling Google's weights were trained with. torchvision turns it on when it loads
    /// those weights; here unset means the same (on exactly when `model.pretrained` is given,
    /// resolved by `ModelSection::dan_config`), and a backbone built without a config says off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform_input: Option<bool>,
}

/// torchvision's `Inception3._transform_input`: per channel, x * (std / 0.5) + (mean - 0.5) / 0.5.
fn transform_input(x: &Tensor) -> Result<Tensor> {
    const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
    const STD: [f64; 3] = [0.229, 0.224, 0.225];
    let channels = (0..3)
        .map(|c| {
            x.narrow(1, c, 1)?
                .affine(STD[c] / 0.5, (MEAN[c] - 0.5) / 0.5)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&channels, 1)
}

impl InceptionConfig {
    pub fn new(width: f64) -> Self {
        Self {
            width,
            transform_input: None,
        }
    }

    pub fn out_channels(&self) -> usize {
        let s = |c| scaled(c, self.width);
        s(320) + 2 * s(384) + 2 * s(384) + s(192)
    }
}

/// Mixed_7c's side for a square input, or why the input is too small (torchvision: 75 px).
pub fn feature_size(size: usize) -> anyhow::Result<usize> {
    fn chain(s: usize) -> Option<usize> {
        let valid3 = |s: usize| s.checked_sub(3).map(|d| d + 1);
        let down = |s: usize| s.checked_sub(3).map(|d| d / 2 + 1);
        let s = down(s)?; // Conv2d_1a_3x3, stride 2
        let s = valid3(s)?; // Conv2d_2a_3x3
        let s = down(s)?; // maxpool1
        let s = valid3(s)?; // Conv2d_4a_3x3
        let s = down(s)?; // maxpool2
        let s = down(s)?; // Mixed_6a
        down(s) // Mixed_7a
    }
    match chain(size) {
        Some(s) if s >= 1 => Ok(s),
        _ => {
            let min = (1..1000)
                .find(|&s| chain(s).is_some_and(|f| f >= 1))
                .unwrap_or(75);
            bail!("inception_v3: input of {size} px is too small (it needs at least {min} px)")
        }
    }
}

/// torchvision's BasicConv2d: conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU.
struct BasicConv2d {
    conv: Conv2d,
    bn: BatchNorm,
}

impl BasicConv2d {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?, train)?.relu()
    }
}

/// Builds convs under one module name, scaling their widths.
struct Builder<'a> {
    store: &'a mut ParamStore,
    width: f64,
}

impl Builder<'_> {
    /// `name`: cin -> scaled(cout) with kernel, stride and (per-axis) padding; returns the conv
    /// and its output channels.
    fn conv(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        k: (usize, usize),
        s: usize,
        p: (usize, usize),
    ) -> anyhow::Result<(BasicConv2d, usize)> {
        let cout = scaled(cout, self.width);
        let conv = Conv2d::new(
            self.store,
            &join(name, "conv"),
            cin,
            cout,
            ConvGeometry::new(k, (s, s), p),
            false,
            Conv2d::kaiming(cout, k),
        )?;
        let bn = BatchNorm::with_eps(self.store, &join(name, "bn"), cout, BN_EPS)?;
        Ok((BasicConv2d { conv, bn }, cout))
    }

    fn c1(&mut self, name: &str, cin: usize, cout: usize) -> anyhow::Result<(BasicConv2d, usize)> {
        self.conv(name, cin, cout, (1, 1), 1, (0, 0))
    }
}

/// One Inception block: branches (each a chain of convs, optionally after a pool), concatenated
/// on the channel axis in torchvision's order.
enum Branch {
    /// Convs in sequence.
    Chain(Vec<BasicConv2d>),
    /// A stem conv, then two parallel convs whose outputs are concatenated (InceptionE).
    Split(Vec<BasicConv2d>, BasicConv2d, BasicConv2d),
    /// 3x3 average pool (stride 1, pad 1, count_include_pad) then a 1x1 conv.
    AvgPool(BasicConv2d),
    /// 3x3 max pool, stride 2.
    MaxPool,
}

struct Block {
    branches: Vec<Branch>,
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut outs = Vec::new();
        for b in &self.branches {
            match b {
                Branch::Chain(convs) => {
                    let mut y = x.clone();
                    for c in convs {
                        y = c.forward(&y, train)?;
                    }
                    outs.push(y);
                }
                Branch::Split(stem, a, b) => {
                    let mut y = x.clone();
                    for c in stem {
                        y = c.forward(&y, train)?;
                    }
                    outs.push(a.forward(&y, train)?);
                    outs.push(b.forward(&y, train)?);
                }
                Branch::AvgPool(c) => outs.push(c.forward(&avg_pool_3x3_same(x)?, train)?),
                Branch::MaxPool => outs.push(max_pool2d(x, 3, 2, 0)?),
            }
        }
        Tensor::cat(&outs, 1)
    }
}

fn inception_a(
    b: &mut Builder,
    name: &str,
    cin: usize,
    pool: usize,
) -> anyhow::Result<(Block, usize)> {
    let n = |s: &str| join(name, s);
    let (b1, o1) = b.c1(&n("branch1x1"), cin, 64)?;
    let (b5a, m) = b.c1(&n("branch5x5_1"), cin, 48)?;
    let (b5b, o2) = b.conv(&n("branch5x5_2"), m, 64, (5, 5), 1, (2, 2))?;
    let (d1, m1) = b.c1(&n("branch3x3dbl_1"), cin, 64)?;
    let (d2, m2) = b.conv(&n("branch3x3dbl_2"), m1, 96, (3, 3), 1, (1, 1))?;
    let (d3, o3) = b.conv(&n("branch3x3dbl_3"), m2, 96, (3, 3), 1, (1, 1))?;
    let (p, o4) = b.c1(&n("branch_pool"), cin, pool)?;
    let branches = vec![
        Branch::Chain(vec![b1]),
        Branch::Chain(vec![b5a, b5b]),
        Branch::Chain(vec![d1, d2, d3]),
        Branch::AvgPool(p),
    ];
    Ok((Block { branches }, o1 + o2 + o3 + o4))
}

fn inception_b(b: &mut Builder, name: &str, cin: usize) -> anyhow::Result<(Block, usize)> {
    let n = |s: &str| join(name, s);
    let (b3, o1) = b.conv(&n("branch3x3"), cin, 384, (3, 3), 2, (0, 0))?;
    let (d1, m1) = b.c1(&n("branch3x3dbl_1"), cin, 64)?;
    let (d2, m2) = b.conv(&n("branch3x3dbl_2"), m1, 96, (3, 3), 1, (1, 1))?;
    let (d3, o2) = b.conv(&n("branch3x3dbl_3"), m2, 96, (3, 3), 2, (0, 0))?;
    let branches = vec![
        Branch::Chain(vec![b3]),
        Branch::Chain(vec![d1, d2, d3]),
        Branch::MaxPool,
    ];
    Ok((Block { branches }, o1 + o2 + cin))
}

fn inception_c(
    b: &mut Builder,
    name: &str,
    cin: usize,
    c7: usize,
) -> anyhow::Result<(Block, usize)> {
    let n = |s: &str| join(name, s);
    let (k17, k71) = (((1, 7), (0, 3)), ((7, 1), (3, 0)));
    let (b1, o1) = b.c1(&n("branch1x1"), cin, 192)?;
    let (s1, m) = b.c1(&n("branch7x7_1"), cin, c7)?;
    let (s2, m) = b.conv(&n("branch7x7_2"), m, c7, k17.0, 1, k17.1)?;
    let (s3, o2) = b.conv(&n("branch7x7_3"), m, 192, k71.0, 1, k71.1)?;
    let (d1, m) = b.c1(&n("branch7x7dbl_1"), cin, c7)?;
    let (d2, m) = b.conv(&n("branch7x7dbl_2"), m, c7, k71.0, 1, k71.1)?;
    let (d3, m) = b.conv(&n("branch7x7dbl_3"), m, c7, k17.0, 1, k17.1)?;
    let (d4, m) = b.conv(&n("branch7x7dbl_4"), m, c7, k71.0, 1, k71.1)?;
    let (d5, o3) = b.conv(&n("branch7x7dbl_5"), m, 192, k17.0, 1, k17.1)?;
    let (p, o4) = b.c1(&n("branch_pool"), cin, 192)?;
    let branches = vec![
        Branch::Chain(vec![b1]),
        Branch::Chain(vec![s1, s2, s3]),
        Branch::Chain(vec![d1, d2, d3, d4, d5]),
        Branch::AvgPool(p),
    ];
    Ok((Block { branches }, o1 + o2 + o3 + o4))
}

fn inception_d(b: &mut Builder, name: &str, cin: usize) -> anyhow::Result<(Block, usize)> {
    let n = |s: &str| join(name, s);
    let (a1, m) = b.c1(&n("branch3x3_1"), cin, 192)?;
    let (a2, o1) = b.conv(&n("branch3x3_2"), m, 320, (3, 3), 2, (0, 0))?;
    let (s1, m) = b.c1(&n("branch7x7x3_1"), cin, 192)?;
    let (s2, m) = b.conv(&n("branch7x7x3_2"), m, 192, (1, 7), 1, (0, 3))?;
    let (s3, m) = b.conv(&n("branch7x7x3_3"), m, 192, (7, 1), 1, (3, 0))?;
    let (s4, o2) = b.conv(&n("branch7x7x3_4"), m, 192, (3, 3), 2, (0, 0))?;
    let branches = vec![
        Branch::Chain(vec![a1, a2]),
        Branch::Chain(vec![s1, s2, s3, s4]),
        Branch::MaxPool,
    ];
    Ok((Block { branches }, o1 + o2 + cin))
}

fn inception_e(b: &mut Builder, name: &str, cin: usize) -> anyhow::Result<(Block, usize)> {
    let n = |s: &str| join(name, s);
    let (b1, o1) = b.c1(&n("branch1x1"), cin, 320)?;
    let (t1, m) = b.c1(&n("branch3x3_1"), cin, 384)?;
    let (t2a, oa) = b.conv(&n("branch3x3_2a"), m, 384, (1, 3), 1, (0, 1))?;
    let (t2b, ob) = b.conv(&n("branch3x3_2b"), m, 384, (3, 1), 1, (1, 0))?;
    let (d1, m) = b.c1(&n("branch3x3dbl_1"), cin, 448)?;
    let (d2, m) = b.conv(&n("branch3x3dbl_2"), m, 384, (3, 3), 1, (1, 1))?;
    let (d3a, da) = b.conv(&n("branch3x3dbl_3a"), m, 384, (1, 3), 1, (0, 1))?;
    let (d3b, db) = b.conv(&n("branch3x3dbl_3b"), m, 384, (3, 1), 1, (1, 0))?;
    let (p, o4) = b.c1(&n("branch_pool"), cin, 192)?;
    let branches = vec![
        Branch::Chain(vec![b1]),
        Branch::Split(vec![t1], t2a, t2b),
        Branch::Split(vec![d1, d2], d3a, d3b),
        Branch::AvgPool(p),
    ];
    Ok((Block { branches }, o1 + oa + ob + da + db + o4))
}

/// torchvision's InceptionAux: avg_pool2d(5, stride 3) -> conv0 1x1 -> conv1 5x5 -> mean -> fc.
struct Aux {
    conv0: BasicConv2d,
    conv1: BasicConv2d,
    fc: Linear,
}

pub struct InceptionV3 {
    stem: Vec<(BasicConv2d, bool)>, // (conv, max pool after it)
    mixed: Vec<Block>,              // Mixed_5b .. Mixed_7c
    aux: Option<Aux>,
    fc: Option<Linear>,
    pub config: InceptionConfig,
}

/// Index of Mixed_6e in `mixed` (the auxiliary head's input).
const MIXED_6E: usize = 7;

impl InceptionV3 {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        config: &InceptionConfig,
        classifier: Option<usize>,
    ) -> anyhow::Result<Self> {
        let mut b = Builder {
            store,
            width: config.width,
        };
        let at = |m: &str| join(prefix, m);
        let (c1a, c) = b.conv(&at("Conv2d_1a_3x3"), 3, 32, (3, 3), 2, (0, 0))?;
        let (c2a, c) = b.conv(&at("Conv2d_2a_3x3"), c, 32, (3, 3), 1, (0, 0))?;
        let (c2b, c) = b.conv(&at("Conv2d_2b_3x3"), c, 64, (3, 3), 1, (1, 1))?;
        let (c3b, c) = b.c1(&at("Conv2d_3b_1x1"), c, 80)?;
        let (c4a, c) = b.conv(&at("Conv2d_4a_3x3"), c, 192, (3, 3), 1, (0, 0))?;
        let stem = vec![
            (c1a, false),
            (c2a, false),
            (c2b, true),
            (c3b, false),
            (c4a, true),
        ];
        let mut mixed = Vec::new();
        let mut cin = c;
        for (name, pool) in [("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)] {
            let (m, c) = inception_a(&mut b, &at(name), cin, pool)?;
            mixed.push(m);
            cin = c;
        }
        let (m, c) = inception_b(&mut b, &at("Mixed_6a"), cin)?;
        mixed.push(m);
        cin = c;
        for (name, c7) in [
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ] {
            let (m, c) = inception_c(&mut b, &at(name), cin, c7)?;
            mixed.push(m);
            cin = c;
        }
        // torchvision registers AuxLogits between Mixed_6e and Mixed_7a.
        let aux = match classifier {
            Some(n) => {
                let (conv0, m) = b.c1(&at("AuxLogits.conv0"), cin, 128)?;
                let (conv1, m) = b.conv(&at("AuxLogits.conv1"), m, 768, (5, 5), 1, (0, 0))?;
                let fc = Linear::default_init(b.store, &at("AuxLogits.fc"), m, n)?;
                Some(Aux { conv0, conv1, fc })
            }
            None => None,
        };
        let (m, c) = inception_d(&mut b, &at("Mixed_7a"), cin)?;
        mixed.push(m);
        cin = c;
        for name in ["Mixed_7b", "Mixed_7c"] {
            let (m, c) = inception_e(&mut b, &at(name), cin)?;
            mixed.push(m);
            cin = c;
        }
        let fc = match classifier {
            Some(n) => Some(Linear::default_init(b.store, &at("fc"), cin, n)?),
            None => None,
        };
        Ok(Self {
            stem,
            mixed,
            aux,
            fc,
            config: config.clone(),
        })
    }

    /// Mixed_7c's map, and with a classifier the logits; `with_aux` also runs AuxLogits on
    /// Mixed_6e (eval only, as a check: torchvision uses it only as a training loss).
    pub fn forward_all(&self, x: &Tensor, train: bool, with_aux: bool) -> Result<BackboneOutput> {
        let size = x.dim(2)?.min(x.dim(3)?);
        if let Err(e) = feature_size(size) {
            candle_core::bail!("{e}");
        }
        let mut y = if self.config.transform_input == Some(true) {
            transform_input(x)?
        } else {
            x.clone()
        };
        for (conv, pool) in &self.stem {
            y = conv.forward(&y, train)?;
            if *pool {
                y = max_pool2d(&y, 3, 2, 0)?;
            }
        }
        let mut aux_logits = None;
        for (i, block) in self.mixed.iter().enumerate() {
            y = block.forward(&y, train)?;
            if i == MIXED_6E && with_aux && !train {
                if let Some(aux) = &self.aux {
                    let (h, w) = (y.dim(2)?, y.dim(3)?);
                    // avg_pool(5, 3) then a 5x5 conv: Mixed_6e must be at least 17 x 17.
                    if h >= 17 && w >= 17 {
                        let a = y.avg_pool2d_with_stride((5, 5), (3, 3))?;
                        let a = aux.conv1.forward(&aux.conv0.forward(&a, train)?, train)?;
                        aux_logits = Some(aux.fc.forward(&a.mean((2, 3))?)?);
                    }
                }
            }
        }
        let logits = match &self.fc {
            Some(fc) => Some(fc.forward(&y.mean((2, 3))?)?),
            None => None,
        };
        Ok(BackboneOutput {
            features: y,
            logits,
            aux_logits,
        })
    }
}

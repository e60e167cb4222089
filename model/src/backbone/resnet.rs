//! ResNet trunk (conv1, bn1, relu, maxpool, layer1..layer4; no avgpool / fc) with torchvision's
//! module layout and state-dict names, configurable stage widths and block counts.

use anyhow::ensure;
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::{join, BatchNorm, Conv2d};
use crate::ops::{max_pool2d, ConvGeometry};
use crate::store::ParamStore;

/// How the trunk's modules are named in the state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrunkNames {
    /// torchvision's `conv1`, `bn1`, `layer1`..`layer4`.
    Torchvision,
    /// DAN's `features` Sequential: `features.0` (conv1), `.1` (bn1), `.4`..`.7` (layer1..4).
    DanFeatures,
}

impl TrunkNames {
    fn module(self, torchvision_name: &str) -> String {
        match self {
            TrunkNames::Torchvision => torchvision_name.to_string(),
            TrunkNames::DanFeatures => {
                let idx = match torchvision_name {
                    "conv1" => "0",
                    "bn1" => "1",
                    "layer1" => "4",
                    "layer2" => "5",
                    "layer3" => "6",
                    "layer4" => "7",
                    other => unreachable!("no DAN index for trunk module {other}"),
                };
                format!("features.{idx}")
            }
        }
    }
}

/// Stage widths and block counts. ResNet-18 is `[64,128,256,512]` x `[2,2,2,2]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub widths: [usize; 4],
    pub blocks: [usize; 4],
}

impl ResNetConfig {
    pub fn resnet18() -> Self {
        Self {
            widths: [64, 128, 256, 512],
            blocks: [2, 2, 2, 2],
        }
    }

    /// Channels of the last feature map.
    pub fn out_channels(&self) -> usize {
        self.widths[3]
    }
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
        let downsample = if stride != 1 || cin != cout {
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
            Some((
                conv,
                BatchNorm::new(store, &join(name, "downsample.1"), cout)?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        let y = self.bn1.forward(&self.conv1.forward(x)?, train)?.relu()?;
        let y = self.bn2.forward(&self.conv2.forward(&y)?, train)?;
        (y + shortcut)?.relu()
    }
}

pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    layers: Vec<Vec<BasicBlock>>,
    pub config: ResNetConfig,
}

impl ResNet {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        names: TrunkNames,
        config: &ResNetConfig,
    ) -> anyhow::Result<Self> {
        ensure!(
            config.widths.iter().all(|&w| w > 0),
            "resnet: every stage width must be positive, got {:?}",
            config.widths
        );
        ensure!(
            config.blocks.iter().all(|&b| b > 0),
            "resnet: every stage needs at least one block, got {:?}",
            config.blocks
        );
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
                let stride = if stage > 0 && j == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(
                    store,
                    &join(&layer_name, &j.to_string()),
                    cin,
                    width,
                    stride,
                )?);
                cin = width;
            }
            layers.push(blocks);
        }
        Ok(Self {
            conv1,
            bn1,
            layers,
            config: config.clone(),
        })
    }

    /// The last feature map F: [B, widths[3], h, w].
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.bn1.forward(&self.conv1.forward(x)?, train)?.relu()?;
        y = max_pool2d(&y, 3, 2, 1)?;
        for layer in &self.layers {
            for block in layer {
                y = block.forward(&y, train)?;
            }
        }
        Ok(y)
    }
}

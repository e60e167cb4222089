//! Backbones: networks that turn an image batch into the spatial feature map F [B, C, h, w]
//! that DAN's heads attend over. ResNet (BasicBlock or Bottleneck), Inception-v3 and ViT, each
//! with torchvision's module layout and state-dict names.

pub mod inception;
pub mod resnet;
pub mod vit;

use std::collections::BTreeMap;

use anyhow::{bail, ensure};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Value};

pub use inception::{InceptionConfig, InceptionV3};
pub use resnet::{ResNet, ResNetConfig, TrunkNames};
pub use vit::{Vit, VitConfig};

use crate::store::ParamStore;

/// Which backbone, and its size. In a config file: `{widths, blocks[, bottleneck]}` (a ResNet,
/// the historical form), or `{arch: NAME, ...}` with NAME one of `resnet18`, `resnet50`,
/// `resnet50_caffe` (EAC's Caffe-ported layout; each takes an optional `width` multiplier,
/// `strides`, `stem_pool`, `zero_init_residual`, `caffe`), `inception_v3` (optional `width`,
/// `transform_input`), `vit_b_32` (optional overrides of
/// `image_size`, `patch_size`, `hidden_dim`, `num_layers`, `num_heads`, `mlp_dim`), or `vit`
/// (all of those given). Presets are expanded, so equal networks have equal configs.
#[derive(Debug, Clone, PartialEq)]
pub enum BackboneConfig {
    ResNet(ResNetConfig),
    InceptionV3(InceptionConfig),
    Vit(VitConfig),
}

/// Scale a channel count by a width multiplier (at least 1 channel).
pub fn scaled(channels: usize, width: f64) -> usize {
    ((channels as f64 * width).round() as usize).max(1)
}

impl BackboneConfig {
    pub fn resnet18() -> Self {
        BackboneConfig::ResNet(ResNetConfig::resnet18())
    }

    /// Channels C of the feature map.
    pub fn out_channels(&self) -> usize {
        match self {
            BackboneConfig::ResNet(c) => c.out_channels(),
            BackboneConfig::InceptionV3(c) => c.out_channels(),
            BackboneConfig::Vit(c) => c.hidden_dim,
        }
    }

    /// A short name for tables (e.g. "resnet50 x0.125").
    pub fn describe(&self) -> String {
        match self {
            BackboneConfig::ResNet(c) => format!(
                "resnet widths {:?} blocks {:?}{}{}{}",
                c.widths,
                c.blocks,
                if c.bottleneck { " bottleneck" } else { "" },
                if c.caffe { " caffe" } else { "" },
                if c.is_torchvision_layout() {
                    String::new()
                } else {
                    format!(
                        " strides {:?}{}",
                        c.strides,
                        if c.stem_pool { "" } else { " no stem pool" }
                    )
                }
            ),
            BackboneConfig::InceptionV3(c) => format!("inception_v3 x{}", c.width),
            BackboneConfig::Vit(c) => format!(
                "vit {}px/{} D{} L{} H{} mlp{}",
                c.image_size, c.patch_size, c.hidden_dim, c.num_layers, c.num_heads, c.mlp_dim
            ),
        }
    }

    /// The feature map's (h, w) for a square input of `size` px, or an error saying why this
    /// backbone cannot take it.
    pub fn feature_size(&self, size: usize) -> anyhow::Result<(usize, usize)> {
        match self {
            BackboneConfig::ResNet(c) => {
                ensure!(
                    size >= 16,
                    "resnet: input of {size} px is too small (at least 16)"
                );
                let s = c.feature_side(size);
                Ok((s, s))
            }
            BackboneConfig::InceptionV3(_) => inception::feature_size(size).map(|s| (s, s)),
            BackboneConfig::Vit(c) => {
                ensure!(
                    size == c.image_size,
                    "vit: input of {size} px, but model.backbone.image_size is {} (the position embedding is sized for it); set input_size to {} or image_size to {size}",
                    c.image_size,
                    c.image_size
                );
                Ok((size / c.patch_size, size / c.patch_size))
            }
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            BackboneConfig::ResNet(c) => c.validate()?,
            BackboneConfig::InceptionV3(c) => {
                ensure!(
                    c.width > 0.0 && c.width <= 4.0,
                    "inception_v3: width must be in (0, 4], got {}",
                    c.width
                )
            }
            BackboneConfig::Vit(c) => c.validate()?,
        }
        Ok(())
    }

    fn to_value(&self) -> Value {
        match self {
            BackboneConfig::ResNet(c) => serde_json::to_value(c).expect("plain struct"),
            BackboneConfig::InceptionV3(c) => match c.transform_input {
                None => json!({"arch": "inception_v3", "width": c.width}),
                Some(t) => {
                    json!({"arch": "inception_v3", "width": c.width, "transform_input": t})
                }
            },
            BackboneConfig::Vit(c) => {
                let mut v = serde_json::to_value(c).expect("plain struct");
                v["arch"] = json!("vit");
                v
            }
        }
    }

    fn from_value(v: Value) -> anyhow::Result<Self> {
        let Value::Object(mut map) = v else {
            bail!("expected a map (widths/blocks, or arch: resnet18 | resnet50 | resnet50_caffe | inception_v3 | vit_b_32 | vit)");
        };
        let arch = match map.remove("arch") {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => bail!("arch: expected a name, got {other}"),
        };
        let width = |map: &mut serde_json::Map<String, Value>| -> anyhow::Result<f64> {
            let w = match map.remove("width") {
                None => 1.0,
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| anyhow::anyhow!("width: expected a number, got {v}"))?,
            };
            ensure!(w > 0.0, "width: must be positive, got {w}");
            Ok(w)
        };
        let no_more = |map: &serde_json::Map<String, Value>,
                       arch: &str,
                       allowed: &str|
         -> anyhow::Result<()> {
            if let Some(k) = map.keys().next() {
                bail!("unknown field `{k}` for arch {arch} (allowed: {allowed})");
            }
            Ok(())
        };
        // A ResNet preset takes a width multiplier and the layout switches (strides, stem pool).
        let resnet_preset = |map: &mut serde_json::Map<String, Value>,
                             base: ResNetConfig,
                             arch: &str|
         -> anyhow::Result<ResNetConfig> {
            let w = width(map)?;
            let strides = match map.remove("strides") {
                None => base.strides,
                Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                    anyhow::anyhow!(
                        "strides: expected four stage strides like [1, 2, 2, 1], got {v}"
                    )
                })?,
            };
            let mut flag = |key: &str, default: bool| match map.remove(key) {
                None => Ok(default),
                Some(Value::Bool(b)) => Ok(b),
                Some(v) => Err(anyhow::anyhow!("{key}: expected true or false, got {v}")),
            };
            let stem_pool = flag("stem_pool", base.stem_pool)?;
            let zero_init_residual = flag("zero_init_residual", base.zero_init_residual)?;
            let caffe = flag("caffe", base.caffe)?;
            no_more(
                map,
                arch,
                "width, strides, stem_pool, zero_init_residual, caffe",
            )?;
            Ok(ResNetConfig {
                widths: base.widths.map(|c| scaled(c, w)),
                strides,
                stem_pool,
                zero_init_residual,
                caffe,
                ..base
            })
        };
        Ok(match arch.as_deref() {
            None | Some("resnet") => BackboneConfig::ResNet(serde_json::from_value(Value::Object(map))?),
            Some("resnet18") => BackboneConfig::ResNet(resnet_preset(
                &mut map,
                ResNetConfig::resnet18(),
                "resnet18",
            )?),
            Some("resnet50") => BackboneConfig::ResNet(resnet_preset(
                &mut map,
                ResNetConfig::resnet50(),
                "resnet50",
            )?),
            Some("resnet50_caffe") => BackboneConfig::ResNet(resnet_preset(
                &mut map,
                ResNetConfig {
                    caffe: true,
                    ..ResNetConfig::resnet50()
                },
                "resnet50_caffe",
            )?),
            Some("inception_v3") => {
                let w = width(&mut map)?;
                let transform_input = match map.remove("transform_input") {
                    None => None,
                    Some(Value::Bool(b)) => Some(b),
                    Some(v) => bail!("transform_input: expected true or false, got {v}"),
                };
                no_more(&map, "inception_v3", "width, transform_input")?;
                BackboneConfig::InceptionV3(InceptionConfig {
                    width: w,
                    transform_input,
                })
            }
            Some("vit_b_32") => {
                let mut v = serde_json::to_value(VitConfig::vit_b_32())?;
                for (k, x) in map {
                    ensure!(v.get(&k).is_some(), "unknown field `{k}` for arch vit_b_32 (allowed: image_size, patch_size, hidden_dim, num_layers, num_heads, mlp_dim)");
                    v[&k] = x;
                }
                BackboneConfig::Vit(serde_json::from_value(v)?)
            }
            Some("vit") => BackboneConfig::Vit(serde_json::from_value(Value::Object(map))?),
            Some(other) => bail!("unknown arch {other:?} (expected resnet18, resnet50, resnet50_caffe, inception_v3, vit_b_32, resnet or vit)"),
        })
    }
}

impl Serialize for BackboneConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for BackboneConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        BackboneConfig::from_value(v)
            .map_err(|e| serde::de::Error::custom(format!("model.backbone: {e:#}")))
    }
}

/// A built backbone.
pub enum Backbone {
    ResNet(ResNet),
    InceptionV3(InceptionV3),
    Vit(Vit),
}

/// Everything a backbone computes: the feature map, and with a classifier its logits (and
/// Inception's auxiliary logits in eval, for parity checks).
pub struct BackboneOutput {
    pub features: Tensor,
    pub logits: Option<Tensor>,
    pub aux_logits: Option<Tensor>,
}

impl Backbone {
    /// Register the backbone's tensors under `prefix` (torchvision names; ResNets can use DAN's
    /// `features.N` names). `classifier`: also build torchvision's classifier with that many
    /// classes (fc / heads.head, and Inception's AuxLogits), as in a torchvision checkpoint.
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        names: TrunkNames,
        config: &BackboneConfig,
        classifier: Option<usize>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        Ok(match config {
            BackboneConfig::ResNet(c) => {
                Backbone::ResNet(ResNet::new(store, prefix, names, c, classifier)?)
            }
            BackboneConfig::InceptionV3(c) => {
                Backbone::InceptionV3(InceptionV3::new(store, prefix, c, classifier)?)
            }
            BackboneConfig::Vit(c) => Backbone::Vit(Vit::new(store, prefix, c, classifier)?),
        })
    }

    /// The eval-mode trunk with folded batch norms, where there is one (ResNets; the other
    /// backbones' inference runs their eval forward).
    pub fn fold(&self) -> Result<Option<resnet::FoldedResNet>> {
        match self {
            Backbone::ResNet(m) => m.fold().map(Some),
            _ => Ok(None),
        }
    }

    /// The feature map F [B, C, h, w].
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Backbone::ResNet(m) => m.forward(x, train),
            Backbone::InceptionV3(m) => Ok(m.forward_all(x, train, false)?.features),
            Backbone::Vit(m) => m.forward(x),
        }
    }

    /// Features, and logits when built with a classifier.
    pub fn forward_all(&self, x: &Tensor, train: bool) -> Result<BackboneOutput> {
        match self {
            Backbone::ResNet(m) => {
                let features = m.forward(x, train)?;
                let logits = m.classify(&features)?;
                Ok(BackboneOutput {
                    features,
                    logits,
                    aux_logits: None,
                })
            }
            Backbone::InceptionV3(m) => m.forward_all(x, train, true),
            Backbone::Vit(m) => m.forward_all(x),
        }
    }
}

/// Keys of torchvision's classifiers, which a DAN backbone does not have: ignored when a
/// pretrained checkpoint holds them, fine when it does not.
pub fn is_classifier_key(key: &str) -> bool {
    key.starts_with("fc.") || key.starts_with("AuxLogits.") || key.starts_with("heads.")
}

/// Rename a torchvision state dict to the names the backbone has inside DAN (`features.…`),
/// dropping classifier keys.
pub fn torchvision_to_dan(
    config: &BackboneConfig,
    state: BTreeMap<String, Tensor>,
) -> BTreeMap<String, Tensor> {
    state
        .into_iter()
        .filter(|(k, _)| !is_classifier_key(k))
        .map(|(k, t)| {
            let name = match config {
                BackboneConfig::ResNet(_) => {
                    resnet::dan_name(&k).unwrap_or_else(|| format!("features.{k}"))
                }
                _ => format!("features.{k}"),
            };
            (name, t)
        })
        .collect()
}

//! Inference on photos: load any checkpoint of this model family (ours or an official DAN
//! `.pth`) with its architecture read from the file, classify face crops with the evaluation
//! transform, and return each head's attention map and the predicted class's CAM (drawn by
//! `fer predict`).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, D};

use crate::backbone::{BackboneConfig, ResNetConfig};
use crate::checkpoint;
use crate::dan::DanConfig;
use crate::data::augment::eval_transform;
use crate::data::image::Image;
use crate::data::sets::{AFFECTNET_CLASSES, RAFDB_CLASSES};
use crate::network::DanEac;

/// A network ready for inference, with what it expects and what its outputs mean.
pub struct Predictor {
    pub net: DanEac,
    pub input_size: usize,
    pub class_names: Vec<String>,
    /// Where the class names came from (the checkpoint, or the order assumed for its class count).
    pub class_source: String,
}

/// The DAN architecture of a state dict, from its tensor shapes (a ResNet trunk under DAN's
/// `features.N` names): widths, block counts, bottleneck or basic blocks, heads, classes, centers.
pub fn dan_config_from_state(
    state: &HashMap<String, Tensor>,
) -> anyhow::Result<(DanConfig, usize)> {
    use crate::backbone::resnet::dan_module;
    let dims = |k: &str| state.get(k).map(|t| t.dims().to_vec());
    let stem = dan_module("conv1").expect("conv1 is a trunk module");
    if dims(&format!("{stem}.weight")).is_none() {
        bail!("not a DAN checkpoint with a ResNet trunk: no {stem}.weight");
    }
    let stage = |s: usize| dan_module(&format!("layer{}", s + 1)).expect("layer1..4");
    let bottleneck = state.contains_key(&format!("{}.0.conv3.weight", stage(0)));
    let mut widths = [0usize; 4];
    let mut blocks = [0usize; 4];
    for s in 0..4 {
        let m = stage(s);
        widths[s] = dims(&format!("{m}.0.conv1.weight"))
            .with_context(|| format!("no {m}.0.conv1.weight (stage {})", s + 1))?[0];
        let prefix = format!("{m}.");
        let ids: BTreeSet<usize> = state
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix)?.split('.').next()?.parse().ok())
            .collect();
        blocks[s] = ids.len();
    }
    let heads = state
        .keys()
        .filter_map(|k| {
            k.strip_prefix("cat_head")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .collect::<BTreeSet<_>>()
        .len();
    if heads == 0 {
        bail!("not a DAN checkpoint: no cat_head* tensors");
    }
    let classes = dims("fc.weight").context("no fc.weight")?[0];
    let centers = dims("affinity.centers").map(|d| d[0]).unwrap_or(classes);
    let backbone = BackboneConfig::ResNet(ResNetConfig {
        widths,
        blocks,
        bottleneck,
        ..ResNetConfig::resnet18()
    });
    Ok((
        DanConfig {
            backbone,
            heads,
            classes,
        },
        centers,
    ))
}

/// Class names for a class count when the checkpoint does not record them: RAF-DB's order for
/// 7 classes, AffectNet's for 8 (`order` = "raf_db" / "affectnet" forces one).
pub fn default_class_names(
    classes: usize,
    order: Option<&str>,
) -> anyhow::Result<(Vec<String>, String)> {
    let names: Vec<String> = match (order, classes) {
        (Some("raf_db"), 7) | (None, 7) => RAFDB_CLASSES.iter().map(|s| s.to_string()).collect(),
        (Some("affectnet"), 7 | 8) | (None, 8) => AFFECTNET_CLASSES[..classes]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        (Some(o), n) => {
            bail!("--classes {o}: not a known order for {n} classes (raf_db: 7, affectnet: 7 or 8)")
        }
        (None, n) => (0..n).map(|i| format!("class {i}")).collect(),
    };
    let source = match (order, classes) {
        (Some(o), _) => format!("{o} order (--classes)"),
        (None, 7) => {
            "RAF-DB order (assumed for 7 classes; --classes affectnet for AffectNet-7)".into()
        }
        (None, 8) => "AffectNet order (assumed for 8 classes)".into(),
        (None, _) => "unnamed".into(),
    };
    Ok((names, source))
}

impl Predictor {
    /// Load our safetensors checkpoint or an official DAN `.pth` (architecture from the file).
    /// `classes_order` and `input_size` override what the checkpoint records (a `.pth` records
    /// neither: RAF-DB / AffectNet order by class count, 224 px).
    pub fn load(
        path: &Path,
        classes_order: Option<&str>,
        input_size: Option<usize>,
    ) -> anyhow::Result<Self> {
        if let Some(size) = input_size {
            let max = crate::config::MAX_INPUT_SIZE;
            // Small sizes are checked against the backbone below; a huge one must fail before
            // any buffer is sized from it.
            anyhow::ensure!(
                size <= max,
                "input size {size}: too large (at most {max} px)"
            );
        }
        let p = Self::load_unchecked(path, classes_order, input_size)?;
        // The same size rule as training (e.g. a ResNet needs at least 16 px).
        p.net
            .dan
            .config
            .backbone
            .feature_size(p.input_size)
            .map_err(|e| anyhow::anyhow!("input size {}: {e:#}", p.input_size))?;
        Ok(p)
    }

    fn load_unchecked(
        path: &Path,
        classes_order: Option<&str>,
        input_size: Option<usize>,
    ) -> anyhow::Result<Self> {
        if !path.is_file() {
            bail!("{}: no such checkpoint file", path.display());
        }
        let is_pth = path.extension().is_some_and(|e| e == "pth" || e == "pt");
        let meta = if is_pth {
            None
        } else {
            checkpoint::read_meta(path).ok()
        };
        let Some(meta) = meta else {
            // An official `.pth`, or a bare DAN state dict in safetensors: the shapes say it all.
            let state = if is_pth {
                checkpoint::read_pth_state_dict(path)?
            } else {
                checkpoint::read_safetensors(path)?
            };
            return Self::from_state(state, path, classes_order, input_size);
        };
        let net = DanEac::new(&meta.model, meta.num_centers, &Device::Cpu, DType::F32, 0)?;
        checkpoint::restore(path, &net, None)?;
        let recorded: Option<Vec<String>> =
            serde_json::from_value(meta.extra["class_names"].clone()).ok();
        let (class_names, class_source) = match (classes_order, recorded) {
            (None, Some(names)) if names.len() == meta.model.classes => {
                let data = meta.extra["data"]
                    .as_str()
                    .unwrap_or("its data set")
                    .to_string();
                (names, format!("recorded in the checkpoint ({data})"))
            }
            (order, _) => default_class_names(meta.model.classes, order)?,
        };
        let input_size = input_size
            .or(meta.extra["input_size"].as_u64().map(|v| v as usize))
            .unwrap_or(224);
        Ok(Self {
            net,
            input_size,
            class_names,
            class_source,
        })
    }

    fn from_state(
        mut state: HashMap<String, Tensor>,
        path: &Path,
        classes_order: Option<&str>,
        input_size: Option<usize>,
    ) -> anyhow::Result<Self> {
        let (config, centers) =
            dan_config_from_state(&state).with_context(|| format!("{}", path.display()))?;
        let net = DanEac::new(&config, centers, &Device::Cpu, DType::F32, 0)?;
        // Official releases hold no affinity centers (DAN#15); inference does not use them.
        if !state.contains_key("affinity.centers") {
            state.insert(
                "affinity.centers".into(),
                net.centers.centers.as_tensor().copy()?,
            );
        }
        net.store
            .load_state(&state, &path.display().to_string(), &|_| false)?;
        let (class_names, class_source) = default_class_names(config.classes, classes_order)?;
        Ok(Self {
            net,
            input_size: input_size.unwrap_or(224),
            class_names,
            class_source,
        })
    }

    /// The evaluation transform of a face crop, as a [1, 3, S, S] tensor.
    pub fn preprocess(&self, crop: &Image) -> anyhow::Result<Tensor> {
        let x = eval_transform(crop, self.input_size);
        Ok(Tensor::from_vec(
            x.data,
            (1, 3, self.input_size, self.input_size),
            &Device::Cpu,
        )?)
    }

    /// Class probabilities (softmax of the logits), each head's spatial map and the CAM of the
    /// predicted class, for one crop.
    pub fn predict(&self, crop: &Image) -> anyhow::Result<Prediction> {
        let x = self.preprocess(crop)?;
        let out = self.net.dan.forward(&x, false)?;
        let probs = candle_nn::ops::softmax(&out.logits, D::Minus1)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let best = probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let maps = out.spatial_maps.squeeze(0)?; // [K, h, w]
        let head_maps = (0..maps.dim(0)?)
            .map(|k| maps.get(k)?.to_vec2::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let cam = self
            .net
            .dan
            .cam(&out.feat)?
            .squeeze(0)?
            .get(best)?
            .to_vec2::<f32>()?;
        Ok(Prediction {
            probabilities: probs,
            best,
            head_maps,
            cam,
        })
    }
}

pub struct Prediction {
    pub probabilities: Vec<f32>,
    pub best: usize,
    /// Each head's spatial attention map [h][w].
    pub head_maps: Vec<Vec<Vec<f32>>>,
    /// The predicted class's activation map [h][w].
    pub cam: Vec<Vec<f32>>,
}

//! Checkpoints: the project's own safetensors file (model, centers, optimizer state, epoch,
//! config: enough to resume exactly) and the official DAN release `.pth` (PyTorch zip pickle
//! holding `model_state_dict`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::network::DanEac;
use crate::optim::Optimizer;

pub const FORMAT: &str = "fer-checkpoint/1";

/// What the checkpoint's safetensors metadata records besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub model: crate::dan::DanConfig,
    pub num_centers: usize,
    /// Completed epochs.
    pub epoch: usize,
    /// Free-form context (data set, class names, run config), as JSON.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// Write model state, centers, optimizer state and metadata atomically (temp file + rename), so
/// a crash mid-write never leaves a truncated checkpoint behind.
pub fn save(
    path: &Path,
    net: &DanEac,
    optimizer: Option<&Optimizer>,
    epoch: usize,
    extra: serde_json::Value,
) -> anyhow::Result<()> {
    let mut tensors: Vec<(String, Tensor)> = net
        .store
        .state()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
        .collect::<anyhow::Result<_>>()?;
    if let Some(opt) = optimizer {
        for (k, t) in opt.state_tensors()? {
            tensors.push((k, t.to_device(&Device::Cpu)?));
        }
    }
    let meta = CheckpointMeta {
        format: FORMAT.into(),
        model: net.dan.config.clone(),
        num_centers: net.num_centers(),
        epoch,
        extra,
    };
    let metadata: HashMap<String, String> =
        [("fer".to_string(), serde_json::to_string(&meta)?)].into();
    let tmp = path.with_extension("safetensors.tmp");
    let views: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.contiguous()?)))
        .collect::<anyhow::Result<_>>()?;
    safetensors::serialize_to_file(
        views.iter().map(|(k, t)| (k.as_str(), t)),
        Some(metadata),
        &tmp,
    )
    .with_context(|| format!("writing checkpoint {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("moving checkpoint into place at {}", path.display()))?;
    Ok(())
}

/// Read the metadata of one of our checkpoints without loading its tensors.
pub fn read_meta(path: &Path) -> anyhow::Result<CheckpointMeta> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("fer"))
        .with_context(|| {
            format!(
                "{} has no fer metadata: not a checkpoint written by this project",
                path.display()
            )
        })?;
    let meta: CheckpointMeta = serde_json::from_str(json)
        .with_context(|| format!("{}: bad checkpoint metadata", path.display()))?;
    if meta.format != FORMAT {
        bail!(
            "{}: checkpoint format {} (this build reads {FORMAT})",
            path.display(),
            meta.format
        );
    }
    Ok(meta)
}

/// Every tensor of a safetensors file, on the CPU.
pub fn read_safetensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading safetensors {}", path.display()))?;
    Ok(map.into_iter().collect())
}

/// Restore a network (and optionally its optimizer) from our checkpoint; returns the epoch.
pub fn restore(
    path: &Path,
    net: &DanEac,
    optimizer: Option<&mut Optimizer>,
) -> anyhow::Result<CheckpointMeta> {
    let meta = read_meta(path)?;
    if meta.model != net.dan.config || meta.num_centers != net.num_centers() {
        bail!(
            "{}: checkpoint is for {:?} with {} centers, the run builds {:?} with {}",
            path.display(),
            meta.model,
            meta.num_centers,
            net.dan.config,
            net.num_centers()
        );
    }
    let tensors = read_safetensors(path)?;
    let source = path.display().to_string();
    net.store
        .load_state(&tensors, &source, &|k| k.starts_with("optim."))?;
    if let Some(opt) = optimizer {
        opt.load_state_tensors(&tensors)
            .with_context(|| format!("{source}: optimizer state"))?;
    }
    Ok(meta)
}

/// The state dict of an official DAN release `.pth` (its `model_state_dict`), or of any other
/// weights file [`crate::weights`] reads, on the CPU.
pub fn read_pth_state_dict(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let state = crate::weights::read_state_dict(path)?;
    if state.tensors.is_empty() {
        bail!("{}: the state dict holds no tensors", path.display());
    }
    Ok(state.tensors)
}

/// Load official DAN weights into a network. The release holds no affinity centers (DAN#15),
/// so they keep their values; every model key must match in name and shape.
pub fn load_dan_pth(path: &Path, net: &DanEac) -> anyhow::Result<()> {
    let mut state = read_pth_state_dict(path)?;
    if !state.contains_key("affinity.centers") {
        state.insert(
            "affinity.centers".into(),
            net.centers
                .centers
                .as_tensor()
                .to_device(&Device::Cpu)?
                .copy()?,
        );
    }
    net.store
        .load_state(&state, &path.display().to_string(), &|_| false)
}

/// Load a pretrained backbone (any format [`crate::weights`] reads, torchvision's key names)
/// into a network's backbone. Classifier keys (fc, AuxLogits, heads) may be present or not;
/// every other backbone key must be there with its shape, and nothing else may be. A missing
/// BN `num_batches_tracked` is fine (files from before PyTorch 0.4.1, and EAC's pickle, have
/// none; PyTorch's own loader fills it the same way): the counter starts at 0.
pub fn load_pretrained_backbone(
    path: &Path,
    backbone: &crate::backbone::BackboneConfig,
    net: &DanEac,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        path.is_file(),
        "{}",
        crate::weights::known::missing_message(path)
    );
    load_backbone_state(crate::weights::read_state_dict(path)?, path, backbone, net)
}

/// [`load_pretrained_backbone`] for a file already read (`path` names it in errors).
pub fn load_backbone_state(
    file: crate::weights::StateDict,
    path: &Path,
    backbone: &crate::backbone::BackboneConfig,
    net: &DanEac,
) -> anyhow::Result<()> {
    if file.container == crate::weights::Container::NumpyPickle {
        if let crate::backbone::BackboneConfig::ResNet(c) = backbone {
            anyhow::ensure!(
                c.caffe,
                "model.pretrained {}: a pickle of numpy arrays is EAC's VGGFace2 format, trained in the Caffe-ported ResNet layout (stride on the first 1x1 of each bottleneck, ceil-mode stem pool); use model.backbone.arch: resnet50_caffe (or caffe: true)",
                path.display()
            );
        }
    }
    let mut mapped: HashMap<String, Tensor> =
        crate::backbone::torchvision_to_dan(backbone, file.tensors.into_iter().collect())
            .into_iter()
            .collect();
    for e in net.store.entries() {
        if e.name.starts_with("features.")
            && e.name.ends_with("num_batches_tracked")
            && !mapped.contains_key(&e.name)
        {
            mapped.insert(e.name.clone(), Tensor::new(0i64, &Device::Cpu)?);
        }
    }
    net.store.load_subset(
        &mapped,
        &format!("model.pretrained {}", path.display()),
        &|name| name.starts_with("features."),
    )
}

//! The resolved configuration of one training run: everything that decides its result.
//! Unknown keys are errors (serde `deny_unknown_fields`) so a typo never silently falls back to
//! a default.

use serde::{Deserialize, Serialize};

use crate::backbone::{BackboneConfig, ResNetConfig};
use crate::dan::DanConfig;
use crate::data::augment::AugmentConfig;
use crate::data::loader::Sampling;
use crate::data::synth::{ClassBalance, SynthConfig};
use crate::data::{DataSpec, NoiseSpec};
use crate::optim::{OptimizerConfig, Schedule};
use crate::train::LossWeights;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub backbone: BackboneConfig,
    /// A torchvision-format checkpoint (`.pth` or `.safetensors`) for the backbone: classifier
    /// keys may be missing or present (ignored); any other missing, unexpected or mis-shaped key
    /// is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<std::path::PathBuf>,
    pub heads: usize,
    pub classes: usize,
    /// Affinity centers; defaults to `classes` (the official RAF-DB script used 8, DAN#31).
    #[serde(default)]
    pub num_centers: Option<usize>,
}

impl ModelSection {
    pub fn dan_config(&self) -> DanConfig {
        DanConfig {
            backbone: self.backbone.clone(),
            heads: self.heads,
            classes: self.classes,
        }
    }

    pub fn centers(&self) -> usize {
        self.num_centers.unwrap_or(self.classes)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub losses: LossWeights,
    pub data: DataSpec,
    /// Label noise on the training split (the test split is never touched).
    #[serde(default)]
    pub noise: Option<NoiseSpec>,
    /// Model input side in pixels; images are resized to it.
    pub input_size: usize,
    /// Augmentation; defaults to DAN's pipeline at `input_size`.
    #[serde(default)]
    pub augment: Option<AugmentConfig>,
    #[serde(default = "default_sampling")]
    pub sampling: Sampling,
    pub optimizer: OptimizerConfig,
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    pub epochs: usize,
    pub batch: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_sampling() -> Sampling {
    Sampling::Shuffle
}
fn default_schedule() -> Schedule {
    Schedule::Constant
}
fn default_device() -> String {
    "cpu".into()
}

impl RunConfig {
    /// The embedded default: synthetic faces and CPU-sized settings.
    pub fn embedded_default() -> Self {
        Self {
            model: ModelSection {
                backbone: BackboneConfig::ResNet(ResNetConfig::basic(
                    [8, 16, 32, 64],
                    [1, 1, 1, 1],
                )),
                pretrained: None,
                heads: 4,
                classes: 7,
                num_centers: None,
            },
            losses: LossWeights::default(),
            data: DataSpec::Synthetic(SynthConfig {
                difficulty: 0.2,
                image_size: 48,
                train: 1400,
                test: 700,
                seed: 0,
                balance: ClassBalance::Balanced,
            }),
            noise: None,
            input_size: 48,
            augment: None,
            sampling: Sampling::Shuffle,
            optimizer: OptimizerConfig::adam(2e-3),
            schedule: Schedule::Exponential { gamma: 0.9 },
            epochs: 5,
            batch: 32,
            seed: 0,
            device: "cpu".into(),
        }
    }

    pub fn augment(&self) -> AugmentConfig {
        self.augment
            .clone()
            .unwrap_or_else(|| AugmentConfig::dan(self.input_size))
    }

    /// Checks that serde cannot express; the message names the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        ensure!(
            self.batch >= 2,
            "batch: must be at least 2 (BatchNorm1d cannot train on one sample), got {}",
            self.batch
        );
        ensure!(self.epochs >= 1, "epochs: must be at least 1");
        ensure!(
            self.input_size >= 16,
            "input_size: must be at least 16 px, got {}",
            self.input_size
        );
        ensure!(self.model.heads >= 1, "model.heads: must be at least 1");
        ensure!(
            self.model.centers() >= 2,
            "model.num_centers: must be at least 2"
        );
        self.model
            .backbone
            .validate()
            .map_err(|e| anyhow::anyhow!("model.backbone: {e:#}"))?;
        let c = self.model.backbone.out_channels();
        ensure!(c >= 16 && c.is_multiple_of(16), "model.backbone.widths: the feature channels must be a multiple of 16 (heads use C/2 and C/16), got {c}");
        self.model
            .backbone
            .feature_size(self.input_size)
            .map_err(|e| anyhow::anyhow!("input_size: {e:#}"))?;
        if let Some(p) = &self.model.pretrained {
            ensure!(
                p.is_file(),
                "model.pretrained: {} does not exist",
                p.display()
            );
        }
        if let Some(aug) = &self.augment {
            ensure!(
                aug.size == self.input_size,
                "augment.size ({}) must equal input_size ({})",
                aug.size,
                self.input_size
            );
        }
        for (name, w) in [
            ("affinity", self.losses.affinity),
            ("partition", self.losses.partition),
            ("consistency", self.losses.consistency),
        ] {
            ensure!(
                w.is_finite() && w >= 0.0,
                "losses.{name}: must be a non-negative number, got {w}"
            );
        }
        ensure!(
            self.optimizer.base_lr() > 0.0,
            "optimizer.lr: must be positive"
        );
        Ok(())
    }
}

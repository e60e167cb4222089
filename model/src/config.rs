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

/// The largest model input side accepted anywhere (config, `fer predict --input-size`): 4.5x the
/// largest the papers use (Inception-v3's 299 px); a batch of 64 such images is already 800 MB.
pub const MAX_INPUT_SIZE: usize = 1344;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub backbone: BackboneConfig,
    /// Pretrained backbone weights with torchvision's key names, in any format `fer_model::weights`
    /// reads (torch.save zip or legacy, the state dict bare or under `state_dict` /
    /// `model_state_dict`, EAC's pickle of numpy arrays, safetensors): classifier keys may be
    /// missing or present (ignored); any other missing, unexpected or mis-shaped key is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<std::path::PathBuf>,
    pub heads: usize,
    pub classes: usize,
    /// Affinity centers; defaults to `classes` (the official RAF-DB script used 8, DAN#31).
    #[serde(default)]
    pub num_centers: Option<usize>,
}

impl ModelSection {
    /// The network this section builds, with what the pretrained file decides resolved: EAC's
    /// pickle of numpy arrays holds weights of the Caffe-ported ResNet, so a ResNet loading one
    /// is built in that layout; Inception-v3's unset `transform_input` is on exactly when
    /// pretrained weights are loaded (torchvision's rule). The resolved config is what the
    /// checkpoint records.
    pub fn dan_config(&self) -> DanConfig {
        let mut backbone = self.backbone.clone();
        match &mut backbone {
            BackboneConfig::ResNet(c) => {
                let numpy = self
                    .pretrained
                    .as_deref()
                    .and_then(|p| crate::weights::sniff(p).ok())
                    == Some(crate::weights::Container::NumpyPickle);
                c.caffe |= numpy;
            }
            BackboneConfig::InceptionV3(c) => {
                c.transform_input = Some(c.transform_input.unwrap_or(self.pretrained.is_some()));
            }
            BackboneConfig::Vit(_) => {}
        }
        DanConfig {
            backbone,
            heads: self.heads,
            classes: self.classes,
        }
    }

    pub fn centers(&self) -> usize {
        self.num_centers.unwrap_or(self.classes)
    }
}

/// A validation split carved from the training split (seeded by `streams.split`), for choosing
/// an epoch without looking at the test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validation {
    /// Share of each class's training samples moved to validation.
    pub fraction: f64,
}

/// The random streams of a run. Each defaults to the run's `seed`; set one to hold that stream
/// fixed while `seed` varies (e.g. the same validation split for every seed). Label noise has
/// its own `noise.seed` and the synthetic images their own `data.seed`: neither follows `seed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedStreams {
    /// Initial weights (backbone, heads, classifier, affinity centers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<u64>,
    /// The order of samples in each epoch (shuffle or class-balanced draws).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u64>,
    /// The random augmentation of each (epoch, sample).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<u64>,
    /// Which training samples go to the validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<u64>,
}

impl SeedStreams {
    pub fn is_default(&self) -> bool {
        *self == SeedStreams::default()
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
    /// Per-stream seeds overriding `seed` (left out of the config when none is set, so older
    /// trial keys do not change).
    #[serde(default, skip_serializing_if = "SeedStreams::is_default")]
    pub streams: SeedStreams,
    /// A validation split carved from the training split (none when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
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
                backbone: BackboneConfig::ResNet(ResNetConfig {
                    strides: [1, 2, 2, 1],
                    ..ResNetConfig::basic([8, 16, 32, 64], [1, 1, 1, 1])
                }),
                pretrained: None,
                heads: 4,
                classes: 7,
                num_centers: None,
            },
            losses: LossWeights {
                consistency_rampup_epochs: 5.0,
                ..LossWeights::default()
            },
            data: DataSpec::Synthetic(SynthConfig {
                difficulty: 0.2,
                image_size: 64,
                train: 1600,
                test: 1400,
                seed: 0,
                balance: ClassBalance::Balanced,
            }),
            noise: None,
            input_size: 64,
            augment: None,
            sampling: Sampling::Shuffle,
            optimizer: OptimizerConfig::adam(4e-3),
            schedule: Schedule::Cosine {
                warmup_epochs: 1.0,
                min_lr: 0.0,
            },
            epochs: 20,
            batch: 16,
            seed: 0,
            streams: SeedStreams::default(),
            validation: Some(Validation { fraction: 0.125 }),
            device: "cpu".into(),
        }
    }

    pub fn init_seed(&self) -> u64 {
        self.streams.init.unwrap_or(self.seed)
    }
    pub fn order_seed(&self) -> u64 {
        self.streams.order.unwrap_or(self.seed)
    }
    pub fn augment_seed(&self) -> u64 {
        self.streams.augment.unwrap_or(self.seed)
    }
    pub fn split_seed(&self) -> u64 {
        self.streams.split.unwrap_or(self.seed)
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
            (16..=MAX_INPUT_SIZE).contains(&self.input_size),
            "input_size: must be between 16 and {MAX_INPUT_SIZE} px, got {}",
            self.input_size
        );
        if let DataSpec::Synthetic(s) = &self.data {
            ensure!(
                (16..=MAX_INPUT_SIZE).contains(&s.image_size),
                "data.image_size: must be between 16 and {MAX_INPUT_SIZE} px, got {}",
                s.image_size
            );
        }
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
            (
                "consistency_rampup_epochs",
                self.losses.consistency_rampup_epochs,
            ),
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
        if let Schedule::Cosine {
            warmup_epochs,
            min_lr,
        } = self.schedule
        {
            ensure!(
                warmup_epochs.is_finite() && warmup_epochs >= 0.0 && warmup_epochs < self.epochs as f64,
                "schedule.warmup_epochs: must be at least 0 and less than epochs ({}), got {warmup_epochs}",
                self.epochs
            );
            ensure!(
                min_lr.is_finite() && min_lr >= 0.0 && min_lr <= self.optimizer.base_lr(),
                "schedule.min_lr: must be between 0 and optimizer.lr ({}), got {min_lr}",
                self.optimizer.base_lr()
            );
        }
        if let Some(v) = &self.validation {
            ensure!(
                v.fraction > 0.0 && v.fraction < 1.0,
                "validation.fraction: must be in (0, 1), got {}",
                v.fraction
            );
        }
        Ok(())
    }
}

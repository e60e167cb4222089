//! The pretrained files the papers start from, by file name: what each is and where it comes
//! from, so a missing one is reported with what to fetch and where to put it.

use std::path::Path;

pub struct KnownWeights {
    pub file: &'static str,
    pub what: &'static str,
    pub source: &'static str,
}

pub const KNOWN: &[KnownWeights] = &[
    KnownWeights {
        file: "resnet18_msceleb.pth",
        what: "ResNet-18 trained for face recognition on MS-Celeb-1M, the start of DAN (networks/dan.py loads it from ./models/ as {'state_dict': ...}); SCN, RUL and DACL use the same file",
        source: "the link in DAN's README (github.com/yaoing/DAN; the first link died, DAN#28) or in RUL's README, as EAC's README points to",
    },
    KnownWeights {
        file: "resnet50_ft_weight.pkl",
        what: "VGGFace2 ResNet-50 (MS-Celeb-1M pretraining, fine-tuned on VGGFace2) in the Caffe-ported layout, the start of EAC; a Python 2 pickle of numpy arrays (arch resnet50_caffe)",
        source: "the VGGFace2-pytorch release (github.com/cydonia999/VGGFace2-pytorch, 'resnet50_ft' weights), linked from EAC's README (EAC#1, #10, #24)",
    },
    KnownWeights {
        file: "inception_v3_google-0cc3c7bd.pth",
        what: "torchvision's ImageNet Inception-v3 (Inception_V3_Weights.IMAGENET1K_V1; loading it turns transform_input on)",
        source: "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth (torchvision.models.inception_v3(weights='IMAGENET1K_V1') caches it in ~/.cache/torch/hub/checkpoints/)",
    },
    KnownWeights {
        file: "vit_b_32-d86f8d99.pth",
        what: "torchvision's ImageNet ViT-B/32 (ViT_B_32_Weights.IMAGENET1K_V1)",
        source: "https://download.pytorch.org/models/vit_b_32-d86f8d99.pth (torchvision.models.vit_b_32(weights='IMAGENET1K_V1') caches it in ~/.cache/torch/hub/checkpoints/)",
    },
    KnownWeights {
        file: "resnet18-f37072fd.pth",
        what: "torchvision's ImageNet ResNet-18 (ResNet18_Weights.IMAGENET1K_V1)",
        source: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    },
    KnownWeights {
        file: "resnet50-0676ba61.pth",
        what: "torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1, torchvision layout)",
        source: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    },
];

pub fn lookup(path: &Path) -> Option<&'static KnownWeights> {
    let name = path.file_name()?.to_str()?;
    KNOWN.iter().find(|k| k.file == name)
}

/// The message for a `model.pretrained` file that is not there: what it is, where the papers
/// got it, and where this run looks for it.
pub fn missing_message(path: &Path) -> String {
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "the current directory".into());
    let place = if path.is_relative() {
        format!("{} (relative to {cwd}, where fer runs)", path.display())
    } else {
        path.display().to_string()
    };
    match lookup(path) {
        Some(k) => format!(
            "model.pretrained: {} does not exist. It is {}. Get it from {}, and put it at {place}; or set model.pretrained to where it is (null trains from scratch, several points below the papers)",
            path.display(),
            k.what,
            k.source
        ),
        None => format!(
            "model.pretrained: {} does not exist (looked for {place})",
            path.display()
        ),
    }
}

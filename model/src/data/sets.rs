//! Data sets: the synthetic faces and the real FER sets (RAF-DB, AffectNet, FER2013 / FERPlus
//! CSV, a generic ImageFolder). A set is a list of samples with their clean and (possibly noisy)
//! training labels; images are decoded by the loader, or held in memory for generated sets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::image::Image;
use super::noise;
use super::synth::{self, SynthConfig};

/// Which split of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Test,
}

/// A data set as named in a run config: kind and root path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSpec {
    Synthetic(SynthConfig),
    /// RAF-DB basic: `EmoLabel/list_patition_label.txt`, `Image/aligned/*_aligned.jpg`.
    RafDb {
        root: PathBuf,
        #[serde(default)]
        skip_bad: bool,
    },
    /// DAN's converted AffectNet: `train/0..7`, `val/0..7`. `classes: 7` drops contempt.
    AffectNet {
        root: PathBuf,
        classes: usize,
        #[serde(default)]
        skip_bad: bool,
    },
    /// FER2013 `fer2013.csv` (emotion,pixels,Usage); with `ferplus` the labels come from
    /// FERPlus's `fer2013new.csv` majority vote (7 basic classes).
    Fer2013 {
        csv: PathBuf,
        #[serde(default)]
        ferplus: Option<PathBuf>,
    },
    /// `root/{train,test}/<class>/*` with classes in alphabetical order.
    ImageFolder {
        root: PathBuf,
        #[serde(default)]
        skip_bad: bool,
    },
}

/// Label noise applied to the training split only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum NoiseSpec {
    /// Symmetric noise at `rate`, seeded.
    Symmetric { rate: f64, seed: u64 },
    /// EAC's noise file (RAF-DB `noise0X.txt`), matched by image name.
    File { file: PathBuf },
}

#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Memory(usize),
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub source: Source,
    /// The label training sees (noisy when noise is applied).
    pub label: u32,
    pub clean_label: u32,
}

pub struct DataSet {
    pub name: String,
    pub class_names: Vec<String>,
    pub samples: Vec<Sample>,
    memory: Arc<Vec<Image>>,
    /// Samples left out because the user asked to skip bad input: (path, reason).
    pub skipped: Vec<(String, String)>,
}

impl DataSet {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn classes(&self) -> usize {
        self.class_names.len()
    }

    pub fn labels(&self) -> Vec<u32> {
        self.samples.iter().map(|s| s.label).collect()
    }

    pub fn clean_labels(&self) -> Vec<u32> {
        self.samples.iter().map(|s| s.clean_label).collect()
    }

    /// Decode sample `i` (errors name the file).
    pub fn image(&self, i: usize) -> anyhow::Result<Image> {
        match &self.samples[i].source {
            Source::File(p) => Image::open(p),
            Source::Memory(k) => Ok(self.memory[*k].clone()),
        }
    }

    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes()];
        for s in &self.samples {
            c[s.label as usize] += 1;
        }
        c
    }

    /// Move a seeded, class-stratified `fraction` of the samples (at least one per class that
    /// has two or more) into a validation set sharing this set's images. Strata are the labels
    /// training sees (noisy ones when noise was applied first), as a researcher would split.
    pub fn split_off_validation(&mut self, fraction: f64, seed: u64) -> anyhow::Result<DataSet> {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        anyhow::ensure!(
            fraction > 0.0 && fraction < 1.0,
            "validation.fraction: must be in (0, 1), got {fraction}"
        );
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); self.classes()];
        for (i, s) in self.samples.iter().enumerate() {
            by_class[s.label as usize].push(i);
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5A11_D0A7_10F0_0001);
        let mut to_val = vec![false; self.samples.len()];
        for members in &mut by_class {
            members.shuffle(&mut rng);
            let k = (members.len() as f64 * fraction).round() as usize;
            let k = if members.len() >= 2 {
                k.clamp(1, members.len() - 1)
            } else {
                0
            };
            for &i in &members[..k] {
                to_val[i] = true;
            }
        }
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (s, v) in std::mem::take(&mut self.samples).into_iter().zip(to_val) {
            if v {
                val.push(s)
            } else {
                train.push(s)
            }
        }
        self.samples = train;
        anyhow::ensure!(
            !val.is_empty() && !self.samples.is_empty(),
            "validation.fraction {fraction}: the training split of {} samples cannot be split",
            val.len() + self.samples.len()
        );
        Ok(DataSet {
            name: format!("{} (validation)", self.name),
            class_names: self.class_names.clone(),
            samples: val,
            memory: self.memory.clone(),
            skipped: Vec::new(),
        })
    }

    /// Apply label noise (train split only; the caller never passes the test split).
    pub fn apply_noise(&mut self, spec: &NoiseSpec) -> anyhow::Result<()> {
        match spec {
            NoiseSpec::Symmetric { rate, seed } => {
                let noisy = noise::symmetric(&self.clean_labels(), self.classes(), *rate, *seed)?;
                for (s, y) in self.samples.iter_mut().zip(noisy) {
                    s.label = y;
                }
            }
            NoiseSpec::File { file } => {
                let lines = noise::read_label_file(file)?;
                let by_name: BTreeMap<&str, u32> =
                    lines.iter().map(|(n, l)| (n.as_str(), *l)).collect();
                for s in &mut self.samples {
                    let Source::File(p) = &s.source else {
                        bail!("{}: a noise file only applies to RAF-DB", file.display());
                    };
                    let name = raf_name(p);
                    let y = by_name
                        .get(name.as_str())
                        .with_context(|| format!("{}: no line for image {name}", file.display()))?;
                    s.label = *y;
                }
            }
        }
        Ok(())
    }
}

/// RAF-DB image name as the label files write it (`train_00001.jpg`).
fn raf_name(p: &Path) -> String {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    format!("{}.jpg", stem.trim_end_matches("_aligned"))
}

pub const RAFDB_CLASSES: [&str; 7] = synth::CLASS_NAMES;
pub const AFFECTNET_CLASSES: [&str; 8] = [
    "neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt",
];
pub const FER2013_CLASSES: [&str; 7] = [
    "angry", "disgust", "fear", "happy", "sad", "surprise", "neutral",
];
/// FERPlus vote columns, in file order (after Usage and Image name).
const FERPLUS_COLUMNS: [&str; 10] = [
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
];

/// Load one split of a data set.
pub fn load(spec: &DataSpec, split: Split) -> anyhow::Result<DataSet> {
    match spec {
        DataSpec::Synthetic(cfg) => synthetic(cfg, split),
        DataSpec::RafDb { root, skip_bad } => finish(rafdb(root, split)?, *skip_bad),
        DataSpec::AffectNet {
            root,
            classes,
            skip_bad,
        } => finish(affectnet(root, *classes, split)?, *skip_bad),
        DataSpec::Fer2013 { csv, ferplus } => fer2013(csv, ferplus.as_deref(), split),
        DataSpec::ImageFolder { root, skip_bad } => finish(image_folder(root, split)?, *skip_bad),
    }
}

fn split_dir(split: Split, train: &'static str, test: &'static str) -> &'static str {
    match split {
        Split::Train => train,
        Split::Test => test,
    }
}

fn synthetic(cfg: &SynthConfig, split: Split) -> anyhow::Result<DataSet> {
    anyhow::ensure!(
        cfg.image_size >= 16,
        "synthetic.image_size must be at least 16, got {}",
        cfg.image_size
    );
    let s = match split {
        Split::Train => synth::Split::Train,
        Split::Test => synth::Split::Test,
    };
    let labels = synth::labels(cfg, s);
    let images: Vec<Image> = labels
        .par_iter()
        .enumerate()
        .map(|(i, &y)| synth::render_face(cfg, s, i, y))
        .collect();
    let samples = labels
        .iter()
        .enumerate()
        .map(|(i, &y)| Sample {
            source: Source::Memory(i),
            label: y,
            clean_label: y,
        })
        .collect();
    Ok(DataSet {
        name: format!("synthetic(d={})", cfg.difficulty),
        class_names: synth::CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        samples,
        memory: Arc::new(images),
        skipped: Vec::new(),
    })
}

/// A file-based set before the existence / decodability check.
struct FileSet {
    name: String,
    class_names: Vec<String>,
    /// (path, label, where it came from: "file:line" or the folder)
    entries: Vec<(PathBuf, u32, String)>,
}

/// Check every file: a missing or undecodable image is an error naming it and where it was
/// listed, or (with `skip_bad`) a skipped sample that is counted and reported.
fn finish(set: FileSet, skip_bad: bool) -> anyhow::Result<DataSet> {
    let checks: Vec<Option<String>> = set
        .entries
        .par_iter()
        .map(|(p, _, _)| {
            if !p.is_file() {
                Some("missing image".to_string())
            } else if skip_bad {
                image::image_dimensions(p)
                    .err()
                    .map(|e| format!("undecodable image: {e}"))
            } else {
                None
            }
        })
        .collect();
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for ((path, label, origin), problem) in set.entries.into_iter().zip(checks) {
        match problem {
            None => samples.push(Sample {
                source: Source::File(path),
                label,
                clean_label: label,
            }),
            Some(why) if skip_bad => skipped.push((path.display().to_string(), why)),
            Some(why) => bail!(
                "{origin}: {why} {} (set skip_bad: true to skip such samples)",
                path.display()
            ),
        }
    }
    if samples.is_empty() {
        bail!("{}: no usable samples", set.name);
    }
    Ok(DataSet {
        name: set.name,
        class_names: set.class_names,
        samples,
        memory: Arc::new(Vec::new()),
        skipped,
    })
}

fn rafdb(root: &Path, split: Split) -> anyhow::Result<FileSet> {
    if !root.is_dir() {
        bail!("RAF-DB root {} does not exist", root.display());
    }
    let list = root.join("EmoLabel/list_patition_label.txt");
    let text = super::read_text(&list)
        .with_context(|| format!("RAF-DB label file {} cannot be read", list.display()))?;
    let prefix = split_dir(split, "train_", "test_");
    let mut entries = Vec::new();
    // Each image once: an identical repeated line is dropped (and counted), a second line with
    // another label for the same image is an error.
    let mut seen: BTreeMap<String, (u32, usize)> = BTreeMap::new();
    let mut repeated = 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let origin = format!("{}:{}", list.display(), i + 1);
        let mut parts = line.split_whitespace();
        let (Some(name), Some(label), None) = (parts.next(), parts.next(), parts.next()) else {
            bail!("{origin}: expected `<image name> <label 1..7>`, got {line:?}");
        };
        let label: u32 = label
            .parse()
            .ok()
            .filter(|l| (1..=7).contains(l))
            .with_context(|| format!("{origin}: unknown label {label:?} (expected 1..7)"))?;
        if let Some(&(first_label, first_line)) = seen.get(name) {
            if first_label != label {
                bail!(
                    "{origin}: {name} is labelled {label} here but {first_label} on line {first_line}: conflicting labels for one image",
                );
            }
            repeated += 1;
            continue;
        }
        seen.insert(name.to_string(), (label, i + 1));
        if !name.starts_with(prefix) {
            continue;
        }
        let stem = name.strip_suffix(".jpg").unwrap_or(name);
        entries.push((
            root.join("Image/aligned")
                .join(format!("{stem}_aligned.jpg")),
            label - 1,
            origin,
        ));
    }
    if repeated > 0 && split == Split::Train {
        eprintln!(
            "warning: {}: {repeated} repeated line(s) with the same image and label ignored",
            list.display()
        );
    }
    Ok(FileSet {
        name: "rafdb".into(),
        class_names: RAFDB_CLASSES.iter().map(|s| s.to_string()).collect(),
        entries,
    })
}

fn affectnet(root: &Path, classes: usize, split: Split) -> anyhow::Result<FileSet> {
    if classes != 7 && classes != 8 {
        bail!("affect_net.classes must be 7 or 8, got {classes}");
    }
    let dir = root.join(split_dir(split, "train", "val"));
    if !dir.is_dir() {
        bail!("AffectNet split folder {} does not exist (expected DAN's converted layout train/0..7, val/0..7)", dir.display());
    }
    let mut entries = Vec::new();
    for label in 0..classes as u32 {
        let class_dir = dir.join(label.to_string());
        if !class_dir.is_dir() {
            bail!(
                "AffectNet class folder {} does not exist",
                class_dir.display()
            );
        }
        for path in sorted_files(&class_dir)? {
            entries.push((path, label, class_dir.display().to_string()));
        }
    }
    Ok(FileSet {
        name: format!("affectnet{classes}"),
        class_names: AFFECTNET_CLASSES[..classes]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        entries,
    })
}

fn sorted_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// The class folders of one ImageFolder split, sorted.
fn class_folders(dir: &Path, root: &Path) -> anyhow::Result<Vec<String>> {
    if !dir.is_dir() {
        bail!(
            "ImageFolder split {} does not exist (expected {}/train/<class>/ and {}/test/<class>/)",
            dir.display(),
            root.display(),
            root.display()
        );
    }
    let mut classes: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string()
        })
        .collect();
    classes.sort();
    if classes.is_empty() {
        bail!("{}: no class folders", dir.display());
    }
    Ok(classes)
}

/// `root/{train,test}/<class>/*`. Class indices come from one list that both splits must share:
/// a class folder missing from one split would shift every later label of the other.
fn image_folder(root: &Path, split: Split) -> anyhow::Result<FileSet> {
    let train = class_folders(&root.join("train"), root)?;
    let test = class_folders(&root.join("test"), root)?;
    if train != test {
        let missing = |a: &[String], b: &[String]| -> String {
            let m: Vec<&str> = a
                .iter()
                .filter(|c| !b.contains(c))
                .map(|c| c.as_str())
                .collect();
            if m.is_empty() {
                "none".into()
            } else {
                m.join(", ")
            }
        };
        bail!(
            "ImageFolder {}: train/ and test/ must have the same class folders (class indices are their sorted names); missing in test/: {}; missing in train/: {}",
            root.display(),
            missing(&train, &test),
            missing(&test, &train)
        );
    }
    let dir = root.join(split_dir(split, "train", "test"));
    let mut entries = Vec::new();
    for (label, class) in train.iter().enumerate() {
        let class_dir = dir.join(class);
        for path in sorted_files(&class_dir)? {
            entries.push((path, label as u32, class_dir.display().to_string()));
        }
    }
    Ok(FileSet {
        name: format!("image_folder({})", root.display()),
        class_names: train,
        entries,
    })
}

fn fer2013(csv: &Path, ferplus: Option<&Path>, split: Split) -> anyhow::Result<DataSet> {
    let text = super::read_text(csv)
        .with_context(|| format!("FER2013 csv {} cannot be read", csv.display()))?;
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, h)| h.trim()).unwrap_or("");
    if header != "emotion,pixels,Usage" {
        bail!(
            "{}:1: expected the header `emotion,pixels,Usage`, got {header:?}",
            csv.display()
        );
    }
    let votes = ferplus.map(read_ferplus).transpose()?;
    let wanted: &[&str] = match split {
        Split::Train => &["Training"],
        Split::Test => &["PrivateTest"],
    };
    let mut images = Vec::new();
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for (row, (i, line)) in lines.enumerate() {
        let origin = format!("{}:{}", csv.display(), i + 1);
        let fields: Vec<&str> = line.trim().split(',').collect();
        let [emotion, pixels, usage] = fields[..] else {
            bail!("{origin}: expected 3 fields emotion,pixels,Usage");
        };
        let label = match &votes {
            Some(v) => match v.get(row).with_context(|| {
                format!("{origin}: FERPlus file has fewer rows than the FER2013 csv")
            })? {
                Some(l) => *l,
                None => {
                    skipped.push((
                        origin,
                        "FERPlus majority is contempt, unknown or not a face".to_string(),
                    ));
                    continue;
                }
            },
            None => emotion
                .parse::<u32>()
                .ok()
                .filter(|&l| l < 7)
                .with_context(|| {
                    format!("{origin}: unknown emotion {emotion:?} (expected 0..6)")
                })?,
        };
        if !wanted.contains(&usage) {
            continue;
        }
        let px: Vec<u8> = pixels
            .split(' ')
            .map(|p| p.parse::<u8>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{origin}: pixels must be integers 0..255"))?;
        if px.len() != 48 * 48 {
            bail!("{origin}: expected 2304 pixels (48x48), got {}", px.len());
        }
        let mut img = Image::new(48, 48);
        for c in 0..3 {
            for (k, &v) in px.iter().enumerate() {
                img.set(c, k / 48, k % 48, v as f32 / 255.0);
            }
        }
        samples.push(Sample {
            source: Source::Memory(images.len()),
            label,
            clean_label: label,
        });
        images.push(img);
    }
    let class_names = if votes.is_some() {
        FERPLUS_COLUMNS[..7].to_vec()
    } else {
        FER2013_CLASSES.to_vec()
    };
    Ok(DataSet {
        name: if votes.is_some() {
            "ferplus".into()
        } else {
            "fer2013".into()
        },
        class_names: class_names.iter().map(|s| s.to_string()).collect(),
        samples,
        memory: Arc::new(images),
        skipped,
    })
}

/// FERPlus majority labels per FER2013 row (None when the majority is contempt / unknown / NF).
fn read_ferplus(path: &Path) -> anyhow::Result<Vec<Option<u32>>> {
    let text = super::read_text(path)
        .with_context(|| format!("FERPlus file {} cannot be read", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() != 12 {
            bail!(
                "{}:{}: expected 12 fields (Usage, Image name, 10 vote counts), got {}",
                path.display(),
                i + 1,
                fields.len()
            );
        }
        let votes: Vec<u32> = fields[2..]
            .iter()
            .map(|v| v.parse::<u32>())
            .collect::<Result<_, _>>()
            .with_context(|| {
                format!("{}:{}: vote counts must be integers", path.display(), i + 1)
            })?;
        let (best, _) = votes
            .iter()
            .enumerate()
            .max_by_key(|(k, v)| (**v, std::cmp::Reverse(*k)))
            .unwrap();
        out.push((best < 7).then_some(best as u32));
    }
    Ok(out)
}

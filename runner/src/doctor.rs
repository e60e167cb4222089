//! `fer doctor SWEEP [--profile P]`: checks that a sweep's setup can reproduce the papers, end to
//! end and without training: each data set's layout and label files with its class counts
//! against the published ones, each pretrained file present, readable and fitting its backbone,
//! each device present, each input size valid for its backbone. One line per check; the exit
//! status is 2 (setup error) when any check fails.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args;
use fer_model::config::RunConfig;
use fer_model::data::{self, DataSpec, Split};
use fer_model::weights;

#[derive(Args)]
pub struct DoctorArgs {
    /// Sweep file whose trials to check, e.g. experiments/heads.yaml.
    pub file: PathBuf,
    /// Check the trials of this profile (e.g. `thesis`).
    #[arg(long)]
    pub profile: Option<String>,
}

/// Per-class counts of the published splits (spec §5.1; AffectNet's paper, Table 3).
fn published(spec: &DataSpec, split: Split) -> Option<Vec<usize>> {
    match (spec, split) {
        (DataSpec::RafDb { .. }, Split::Train) => Some(vec![1290, 281, 717, 4772, 1982, 705, 2524]),
        (DataSpec::RafDb { .. }, Split::Test) => Some(vec![329, 74, 160, 1185, 478, 162, 680]),
        (DataSpec::AffectNet { classes, .. }, Split::Train) => {
            let all = [74874, 134415, 25459, 14090, 6378, 3803, 24882, 3750];
            Some(all[..*classes].to_vec())
        }
        (DataSpec::AffectNet { classes, .. }, Split::Test) => {
            let all = [500, 500, 500, 500, 500, 500, 500, 499];
            Some(all[..*classes].to_vec())
        }
        _ => None,
    }
}

struct Report {
    problems: usize,
}

impl Report {
    fn line(&mut self, ok: bool, what: &str, detail: impl AsRef<str>) {
        if !ok {
            self.problems += 1;
        }
        println!(
            "  {} {what}: {}",
            if ok { "ok  " } else { "FAIL" },
            detail.as_ref()
        );
    }
}

/// Where a data set comes from and the layout `fer` reads, for a data set that fails to load.
fn where_to_get(spec: &DataSpec) -> &'static str {
    match spec {
        DataSpec::RafDb { .. } => " (RAF-DB is given by its authors on request, www.whdeng.cn/raf; the layout is ROOT/EmoLabel/list_patition_label.txt and ROOT/Image/aligned/*_aligned.jpg)",
        DataSpec::AffectNet { .. } => " (AffectNet is given by its authors on request, mohammadmahoor.com/affectnet; the layout is DAN's converted one, ROOT/train/0..7 and ROOT/val/0..7)",
        _ => "",
    }
}

fn check_data(r: &mut Report, spec: &DataSpec) {
    let what = format!("data {}", serde_json::to_string(spec).unwrap_or_default());
    for split in [Split::Train, Split::Test] {
        let set = match data::load(spec, split) {
            Ok(s) => s,
            Err(e) => {
                r.line(
                    false,
                    &what,
                    format!("{split:?} split: {e:#}{}", where_to_get(spec)),
                );
                // A missing root fails both splits the same way: say it once.
                break;
            }
        };
        let mut counts = vec![0usize; set.class_names.len()];
        for s in &set.samples {
            counts[s.label as usize] += 1;
        }
        match published(spec, split) {
            Some(want) if want != counts => r.line(
                false,
                &what,
                format!(
                    "{split:?} split has {} images per class {counts:?}; the published split has {} {want:?} (the papers' numbers are for the full split)",
                    set.len(),
                    want.iter().sum::<usize>()
                ),
            ),
            Some(_) => r.line(
                true,
                &what,
                format!("{split:?} split: {} images, per class as published {counts:?}", set.len()),
            ),
            None => r.line(
                true,
                &what,
                format!("{split:?} split: {} images, per class {counts:?} (no published counts to compare)", set.len()),
            ),
        }
    }
}

fn check_pretrained(r: &mut Report, config: &RunConfig) {
    let Some(path) = &config.model.pretrained else {
        return;
    };
    let what = format!("pretrained {}", path.display());
    if !path.is_file() {
        r.line(false, &what, weights::known::missing_message(path));
        return;
    }
    let file = match weights::read_state_dict(path) {
        Ok(f) => f,
        Err(e) => return r.line(false, &what, format!("{e:#}")),
    };
    let (origin, count) = (file.origin(), file.tensors.len());
    let dan = config.model.dan_config();
    let loaded = fer_model::DanEac::new(
        &dan,
        config.model.centers(),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
        0,
    )
    .and_then(|net| fer_model::checkpoint::load_backbone_state(file, path, &dan.backbone, &net));
    match loaded {
        Ok(()) => r.line(
            true,
            &what,
            format!(
                "{origin}, {count} tensors; fits {}",
                dan.backbone.describe()
            ),
        ),
        Err(e) => r.line(false, &what, format!("{e:#}")),
    }
}

pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let sweep = crate::sweep::load(&args.file, args.profile.as_deref(), None)
        .map_err(|e| fer_model::trainer::classified(fer_model::trainer::FailureClass::Setup, e))?;
    println!(
        "fer doctor: {}{} ({} trials)",
        args.file.display(),
        args.profile
            .as_deref()
            .map(|p| format!(" --profile {p}"))
            .unwrap_or_default(),
        sweep.trials.len()
    );
    let mut r = Report { problems: 0 };
    let mut seen = BTreeSet::new();
    for t in &sweep.trials {
        let c = &t.config;
        let data_key = serde_json::to_string(&c.data)?;
        if seen.insert(format!("data:{data_key}")) {
            if matches!(c.data, DataSpec::Synthetic(_)) {
                r.line(
                    true,
                    "data synthetic",
                    "rendered by each trial (nothing to check on disk)",
                );
            } else {
                check_data(&mut r, &c.data);
            }
        }
        let model_key =
            serde_json::to_string(&(&c.model.backbone, &c.model.pretrained, c.input_size))?;
        if seen.insert(format!("model:{model_key}")) {
            let what = format!(
                "model {} at {} px",
                c.model.backbone.describe(),
                c.input_size
            );
            // A missing pretrained file is validate()'s error too; it gets its own line below.
            let missing_weights = c.model.pretrained.as_ref().is_some_and(|p| !p.is_file());
            match (c.validate(), c.model.backbone.feature_size(c.input_size)) {
                (Err(e), _) if !missing_weights => r.line(false, &what, format!("{e:#}")),
                (_, Ok((h, w))) => r.line(true, &what, format!("{h} x {w} feature map")),
                (_, Err(e)) => r.line(false, &what, format!("{e:#}")),
            }
            if c.model.pretrained.is_none() {
                r.line(
                    !matches!(c.data, DataSpec::RafDb { .. } | DataSpec::AffectNet { .. }),
                    "pretrained",
                    "none: training from scratch (the papers start from face-recognition or ImageNet weights)",
                );
            }
            check_pretrained(&mut r, c);
        }
        if seen.insert(format!("device:{}", c.device)) {
            match fer_model::device::select(&c.device) {
                Ok(d) => r.line(true, &format!("device {}", c.device), format!("{d:?}")),
                Err(e) => r.line(false, &format!("device {}", c.device), format!("{e:#}")),
            }
        }
    }
    if r.problems == 0 {
        println!("all checks passed");
        Ok(())
    } else {
        Err(fer_model::trainer::classified(
            fer_model::trainer::FailureClass::Setup,
            anyhow::anyhow!(
                "{} check(s) failed: this setup cannot reproduce the papers as it stands",
                r.problems
            ),
        ))
    }
}

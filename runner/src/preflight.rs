//! What the trials of a sweep share, checked once before any of them starts: their data sets
//! (root, label files, every listed image present), label-noise files and pretrained weights.
//! A failure here is a setup error of the sweep, reported once; no trial is started, and no
//! attempt is recorded against any trial.

use std::collections::BTreeSet;

use anyhow::Context;
use fer_model::data::{self, DataSpec, NoiseSpec, Split};

use crate::sweep::Trial;

/// Check every distinct data set, noise file and pretrained file of `trials`.
pub fn check(trials: &[&Trial]) -> anyhow::Result<()> {
    let mut seen = BTreeSet::new();
    for t in trials {
        let c = &t.config;
        // Synthetic faces are rendered by the trial itself: nothing outside it to check.
        if !matches!(c.data, DataSpec::Synthetic(_)) {
            let key = serde_json::to_string(&c.data)?;
            if seen.insert(key) {
                for split in [Split::Train, Split::Test] {
                    data::load(&c.data, split).with_context(|| {
                        format!(
                            "data ({}), {split:?} split",
                            serde_json::to_string(&c.data).unwrap_or_default()
                        )
                    })?;
                }
            }
        }
        if let Some(NoiseSpec::File { file }) = &c.noise {
            if seen.insert(format!("noise:{}", file.display())) {
                data::noise::read_label_file(file).context("noise.file")?;
            }
        }
        if let Some(p) = &c.model.pretrained {
            anyhow::ensure!(
                p.is_file(),
                "{}",
                fer_model::weights::known::missing_message(p)
            );
        }
    }
    Ok(())
}

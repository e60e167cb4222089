//! What a training run reports, and the one wire format it travels in: `fer train` prints each
//! event as a JSON line (`EventLine`: the event plus the format version `v`), the sweep runner
//! and `fer sync` parse the same type back. Which metric of an epoch is stored under which
//! (split, name) is written once, in `EpochMetrics::scalars`.

use serde::{Deserialize, Serialize};

use crate::data::noise::Memorisation;

/// The version of the event lines. Bump it when a field changes meaning or is removed (adding
/// an optional field does not need it); a reader refuses lines of another version instead of
/// misreading them.
pub const EVENT_VERSION: u32 = 1;

/// One line of a run's event stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventLine {
    pub v: u32,
    #[serde(flatten)]
    pub event: Event,
}

impl EventLine {
    pub fn new(event: Event) -> Self {
        Self {
            v: EVENT_VERSION,
            event,
        }
    }

    /// `event` as one line of the stream (no newline).
    pub fn line(event: &Event) -> String {
        #[derive(Serialize)]
        struct Borrowed<'a> {
            v: u32,
            #[serde(flatten)]
            event: &'a Event,
        }
        let line = Borrowed {
            v: EVENT_VERSION,
            event,
        };
        serde_json::to_string(&line).expect("events are plain data")
    }

    /// Parse one line: `Ok(None)` when it is not an event at all (a stray print), an error
    /// when it is an event of another format version.
    pub fn parse(line: &str) -> anyhow::Result<Option<Event>> {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            return Ok(None);
        };
        if value.get("event").is_none() {
            return Ok(None);
        }
        let v = value.get("v").and_then(|v| v.as_u64());
        anyhow::ensure!(
            v == Some(EVENT_VERSION as u64),
            "an event line of format version {} (this fer reads version {EVENT_VERSION}): {line}",
            v.map_or("none".to_string(), |v| v.to_string())
        );
        let line: EventLine = serde_json::from_value(value)
            .map_err(|e| anyhow::anyhow!("a malformed event line ({e}): {line}"))?;
        Ok(Some(line.event))
    }
}

/// Progress reported while a run trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Started {
        epochs: usize,
        start_epoch: usize,
        steps_per_epoch: usize,
        train_samples: usize,
        test_samples: usize,
        skipped_samples: usize,
        /// Class names in label order (the confusion matrix's rows and columns).
        class_names: Vec<String>,
    },
    Step {
        epoch: usize,
        step: usize,
        steps: usize,
        loss: f64,
    },
    Epoch(EpochMetrics),
    Finished {
        epochs: usize,
    },
}

impl Event {
    /// The `event` tag: what the store records an event under.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::Step { .. } => "step",
            Event::Epoch(_) => "epoch",
            Event::Finished { .. } => "finished",
        }
    }
}

/// The mean of each loss term over an epoch's steps, by name. On the wire (and in
/// `metrics.jsonl`) the terms sit at the epoch's top level as `loss_total`, `loss_ce`, ...
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LossMeans {
    #[serde(rename = "loss_total")]
    pub total: f64,
    #[serde(rename = "loss_ce")]
    pub ce: f64,
    #[serde(rename = "loss_affinity")]
    pub affinity: f64,
    #[serde(rename = "loss_partition")]
    pub partition: f64,
    /// None when λ3 = 0 (the term is not in the graph).
    #[serde(rename = "loss_consistency", default)]
    pub consistency: Option<f64>,
}

impl LossMeans {
    /// Add one step's losses (a running sum).
    pub fn add(&mut self, step: &crate::train::StepLosses) {
        self.total += step.total;
        self.ce += step.ce;
        self.affinity += step.affinity;
        self.partition += step.partition;
        if let Some(c) = step.consistency {
            *self.consistency.get_or_insert(0.0) += c;
        }
    }

    /// Every term times `factor` (a sum over n steps into a mean: 1/n).
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            total: self.total * factor,
            ce: self.ce * factor,
            affinity: self.affinity * factor,
            partition: self.partition * factor,
            consistency: self.consistency.map(|c| c * factor),
        }
    }
}

/// Everything measured in one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f64,
    #[serde(flatten)]
    pub loss: LossMeans,
    /// Train-mode accuracy against the (possibly noisy) training labels.
    pub train_accuracy: f64,
    pub test_accuracy: f64,
    pub test_balanced_accuracy: f64,
    /// Eval-mode accuracy on the validation split against its (possibly noisy) labels; only
    /// with `validation`.
    #[serde(default)]
    pub val_accuracy: Option<f64>,
    /// Only with label noise: after the epoch, in eval mode on the un-augmented training set,
    /// of the flipped training samples the share predicted as the noisy label (memorised) and
    /// as the clean one.
    pub memorisation: Option<Memorisation>,
    /// The same shares from the train-mode predictions made during the epoch (a moving model
    /// on augmented inputs, the dropped last batch excluded): a running figure only.
    #[serde(default)]
    pub memorisation_running: Option<Memorisation>,
    pub train_seconds: f64,
    pub eval_seconds: f64,
    pub train_img_per_s: f64,
    /// Test-set confusion matrix, rows = true class (stored as its own record, not a scalar).
    pub confusion: Vec<Vec<u64>>,
    /// True when re-reported on resume from the checkpoint's history (not trained again).
    #[serde(default)]
    pub replayed: bool,
}

/// One stored number of an epoch: `metrics(split, name, epoch, value)` in the store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scalar {
    pub split: &'static str,
    pub name: &'static str,
    pub value: f64,
}

impl EpochMetrics {
    /// Every number of the epoch under its stored (split, name); absent optional values are
    /// left out. The names are the store's and the reports' vocabulary: renaming one orphans
    /// the metrics recorded before.
    pub fn scalars(&self) -> Vec<Scalar> {
        let s = |split, name, value| Scalar { split, name, value };
        let mut out = vec![
            s("train", "loss_total", self.loss.total),
            s("train", "loss_ce", self.loss.ce),
            s("train", "loss_affinity", self.loss.affinity),
            s("train", "loss_partition", self.loss.partition),
            s("train", "accuracy", self.train_accuracy),
            s("train", "lr", self.lr),
            s("train", "seconds", self.train_seconds),
            s("train", "img_per_s", self.train_img_per_s),
            s("test", "accuracy", self.test_accuracy),
            s("test", "balanced_accuracy", self.test_balanced_accuracy),
            s("test", "seconds", self.eval_seconds),
        ];
        if let Some(c) = self.loss.consistency {
            out.push(s("train", "loss_consistency", c));
        }
        if let Some(v) = self.val_accuracy {
            out.push(s("val", "accuracy", v));
        }
        // Eval-mode memorisation after the epoch, and the running figure of the epoch's
        // train-mode predictions under its own names.
        if let Some(m) = &self.memorisation {
            out.push(s("train", "memorised_noisy", m.predicted_noisy));
            out.push(s("train", "memorised_clean", m.predicted_clean));
            out.push(s("train", "flipped", m.flipped as f64));
        }
        if let Some(m) = &self.memorisation_running {
            out.push(s("train", "memorised_noisy_running", m.predicted_noisy));
            out.push(s("train", "memorised_clean_running", m.predicted_clean));
            out.push(s("train", "flipped_running", m.flipped as f64));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An epoch with every optional value present and every number distinct.
    fn full_epoch() -> EpochMetrics {
        let m = |a: f64, b: f64, n: usize| Memorisation {
            flipped: n,
            predicted_noisy: a,
            predicted_clean: b,
        };
        EpochMetrics {
            epoch: 3,
            lr: 0.1,
            loss: LossMeans {
                total: 1.1,
                ce: 1.2,
                affinity: 1.3,
                partition: 1.4,
                consistency: Some(1.5),
            },
            train_accuracy: 0.21,
            test_accuracy: 0.22,
            test_balanced_accuracy: 0.23,
            val_accuracy: Some(0.24),
            memorisation: Some(m(0.31, 0.32, 33)),
            memorisation_running: Some(m(0.34, 0.35, 36)),
            train_seconds: 4.1,
            eval_seconds: 4.2,
            train_img_per_s: 4.3,
            confusion: vec![vec![1, 2], vec![3, 4]],
            replayed: false,
        }
    }

    /// The numbers of a JSON value's leaves, except under the named fields.
    fn leaves(v: &serde_json::Value, skip: &[&str], out: &mut Vec<f64>) {
        match v {
            serde_json::Value::Number(n) => out.push(n.as_f64().unwrap()),
            serde_json::Value::Object(map) => {
                for (k, x) in map {
                    if !skip.contains(&k.as_str()) {
                        leaves(x, skip, out);
                    }
                }
            }
            serde_json::Value::Array(xs) => xs.iter().for_each(|x| leaves(x, skip, out)),
            _ => {}
        }
    }

    /// Every number an epoch event carries reaches `scalars` (and so the store), except the
    /// epoch itself (the row's key) and the confusion matrix (its own record): a field added
    /// to `EpochMetrics` without a stored name fails here.
    #[test]
    fn every_epoch_number_is_a_scalar() {
        let epoch = full_epoch();
        let mut carried = Vec::new();
        leaves(
            &serde_json::to_value(&epoch).unwrap(),
            &["epoch", "confusion"],
            &mut carried,
        );
        let mut stored: Vec<f64> = epoch.scalars().iter().map(|s| s.value).collect();
        carried.sort_by(f64::total_cmp);
        stored.sort_by(f64::total_cmp);
        assert_eq!(carried, stored);
        // (split, name) pairs are unique.
        let mut names: Vec<_> = epoch.scalars().iter().map(|s| (s.split, s.name)).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), stored.len());
    }

    #[test]
    fn lines_round_trip_and_other_versions_are_refused() {
        let event = Event::Epoch(full_epoch());
        let line = EventLine::line(&event);
        assert_eq!(
            line,
            serde_json::to_string(&EventLine::new(event.clone())).unwrap()
        );
        assert!(line.contains("\"v\":1"), "{line}");
        assert_eq!(EventLine::parse(&line).unwrap(), Some(event));
        assert_eq!(EventLine::parse("loading weights...").unwrap(), None);
        assert_eq!(EventLine::parse("{\"x\": 1}").unwrap(), None);
        let old = line.replace("\"v\":1", "\"v\":0");
        let err = EventLine::parse(&old).unwrap_err().to_string();
        assert!(err.contains("version 0"), "{err}");
        let bad = "{\"v\":1,\"event\":\"epoch\",\"epoch\":\"x\"}";
        assert!(EventLine::parse(bad).is_err());
    }

    /// The losses are named fields in the code and flat `loss_*` keys on the wire, as in the
    /// `metrics.jsonl` files and checkpoint histories written before they were grouped.
    #[test]
    fn losses_keep_their_flat_wire_names() {
        let json = serde_json::to_value(full_epoch()).unwrap();
        for key in [
            "loss_total",
            "loss_ce",
            "loss_affinity",
            "loss_partition",
            "loss_consistency",
        ] {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
        assert!(json.get("loss").is_none());
        let mut without = json.clone();
        without.as_object_mut().unwrap().remove("loss_consistency");
        let back: EpochMetrics = serde_json::from_value(without).unwrap();
        assert_eq!(back.loss.consistency, None);
        assert_eq!(back.loss.ce, 1.2);
    }
}

//! The training loop of one run: data, model, optimizer and schedule from a `RunConfig`; a
//! checkpoint after every epoch; exact resumption from the last one.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::DType;

use crate::config::RunConfig;
use crate::data::loader::{batches, epoch_order, BatchPlan};
use crate::data::noise::memorisation;
use crate::data::{self, DataSet, Split};
use crate::network::DanEac;
use crate::train::{self, Confusion, EvalReport};
use crate::{checkpoint, device};

pub use crate::events::{EpochMetrics, Event, LossMeans};

/// The failures the runner must tell apart, because it treats them differently (retry or not,
/// stop the sweep or not). Anything unclassified is a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Found before training started (config, data set): retrying cannot fix it.
    Setup,
    /// A training input that cannot be used (an image that does not decode, a non-image file
    /// in the data): fixing the data fixes it, retrying the trial as it is cannot.
    Data,
    /// The training loss became NaN or infinite: the same seed diverges again; the sweep's
    /// retry policy decides whether it is tried again.
    Divergence,
    /// The disk (or quota) of the run directory is full: no trial on it can save a checkpoint
    /// until space is freed, so the runner stops the sweep instead of spending retries.
    Resource,
}

/// An error with its class; `anyhow::Error::downcast_ref::<Classified>()` finds it under any
/// context added later.
#[derive(Debug)]
pub struct Classified {
    pub class: FailureClass,
    pub error: anyhow::Error,
}

impl std::fmt::Display for Classified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Classified {}

/// `error` marked as a failure of `class`.
pub fn classified(class: FailureClass, error: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Classified { class, error })
}

/// The class of `error`, if it was classified.
pub fn failure_class(error: &anyhow::Error) -> Option<FailureClass> {
    error.downcast_ref::<Classified>().map(|c| c.class)
}

/// `e` classed as `Resource` when an I/O error in its chain says the disk or quota is full.
pub fn classify_io(e: anyhow::Error) -> anyhow::Error {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) || matches!(io.raw_os_error(), Some(ENOSPC | EDQUOT))
        })
    });
    if full {
        classified(FailureClass::Resource, e)
    } else {
        e
    }
}

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// The splits of one run, loaded and checked against the config.
struct Splits {
    train: Arc<DataSet>,
    /// Carved from the training split (after noise) when `validation` is set.
    val: Option<Arc<DataSet>>,
    test: Arc<DataSet>,
    /// Samples of either split that could not be used (`skip_bad`).
    skipped: usize,
}

impl Splits {
    fn load(config: &RunConfig) -> anyhow::Result<Self> {
        let mut train = data::load(&config.data, Split::Train)?;
        // Noise first, over the whole training split, so a sample's noisy label does not
        // depend on the validation fraction; validation then holds the labels a researcher
        // would have.
        if let Some(noise) = &config.noise {
            train.apply_noise(noise)?;
        }
        let val = match &config.validation {
            Some(v) => Some(Arc::new(
                train.split_off_validation(v.fraction, config.split_seed())?,
            )),
            None => None,
        };
        let test = data::load(&config.data, Split::Test)?;
        anyhow::ensure!(
            train.classes() == config.model.classes,
            "model.classes is {} but the data set {} has {} classes",
            config.model.classes,
            train.name,
            train.classes()
        );
        // Labels index one class list: both splits must name the same classes in the same order.
        anyhow::ensure!(
            train.class_names == test.class_names,
            "the data set {}: its training classes {:?} differ from its test classes {:?}",
            train.name,
            train.class_names,
            test.class_names
        );
        anyhow::ensure!(
            train.len() >= config.batch,
            "the training split has {} samples, fewer than one batch of {}",
            train.len(),
            config.batch
        );
        Ok(Self {
            skipped: train.skipped.len() + test.skipped.len(),
            train: Arc::new(train),
            val,
            test: Arc::new(test),
        })
    }
}

/// Train (or resume) the run in `dir`, calling `on_event` as it goes.
pub fn run(
    config: &RunConfig,
    dir: &Path,
    on_event: &mut dyn FnMut(&Event) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    config.validate()?;
    // Files outside the config are checked before any data is read (the sweep's preflight and
    // `fer doctor` check the same).
    if let Some(p) = &config.model.pretrained {
        anyhow::ensure!(p.is_file(), "{}", crate::weights::known::missing_message(p));
    }
    let dev = device::select(&config.device)?;
    let splits = Splits::load(config)?;
    let net = DanEac::new(
        &config.model.dan_config(),
        config.model.centers(),
        &dev,
        DType::F32,
        config.init_seed(),
    )?;
    if let Some(path) = &config.model.pretrained {
        checkpoint::load_pretrained_backbone(path, &net.dan.config.backbone, &net)?;
    }
    let mut opt = net.optimizer(config.optimizer.clone());
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating run directory {}", dir.display()))?;
    let ckpt = dir.join(CHECKPOINT_FILE);
    // The checkpoint carries the metrics of every epoch it contains, so a resumed run can
    // re-report epochs whose report was lost with the previous process.
    let mut history: Vec<EpochMetrics> = Vec::new();
    let start_epoch = if ckpt.is_file() {
        let meta = checkpoint::restore(&ckpt, &net, Some(&mut opt))?;
        history = serde_json::from_value(meta.extra["history"].clone()).with_context(|| {
            format!(
                "{}: the metrics history in its metadata does not parse",
                ckpt.display()
            )
        })?;
        meta.epoch
    } else {
        0
    };
    let steps = splits.train.len() / config.batch;
    on_event(&Event::Started {
        epochs: config.epochs,
        start_epoch,
        steps_per_epoch: steps,
        train_samples: splits.train.len(),
        test_samples: splits.test.len(),
        skipped_samples: splits.skipped,
        class_names: splits.test.class_names.clone(),
    })?;
    for past in &history {
        on_event(&Event::Epoch(EpochMetrics {
            replayed: true,
            ..past.clone()
        }))?;
    }
    for epoch in start_epoch..config.epochs {
        let trained = train_epoch(config, &net, &mut opt, &splits.train, epoch, on_event)?;
        let metrics = evaluate_epoch(config, &net, &splits, epoch, opt.lr, steps, trained)?;
        // Checkpoint before reporting: a reported epoch always has its weights on disk, and
        // the checkpoint holds its metrics.
        history.push(metrics.clone());
        let extra = serde_json::json!({
            "class_names": splits.train.class_names,
            "data": splits.train.name,
            "input_size": config.input_size,
            "history": history,
        });
        checkpoint::save(&ckpt, &net, Some(&opt), epoch + 1, extra).map_err(classify_io)?;
        on_event(&Event::Epoch(metrics))?;
    }
    on_event(&Event::Finished {
        epochs: config.epochs,
    })?;
    Ok(())
}

/// What one epoch of training steps measured.
struct TrainedEpoch {
    /// Summed over the steps.
    loss_sums: LossMeans,
    correct: usize,
    seen: usize,
    /// Clean labels, training (possibly noisy) labels and train-mode predictions of every
    /// sample trained on, for the running memorisation figure.
    clean: Vec<u32>,
    noisy: Vec<u32>,
    predicted: Vec<u32>,
    seconds: f64,
}

/// One epoch of training steps (the last short batch dropped), reporting each step.
fn train_epoch(
    config: &RunConfig,
    net: &DanEac,
    opt: &mut crate::Optimizer,
    train_set: &Arc<DataSet>,
    epoch: usize,
    on_event: &mut dyn FnMut(&Event) -> anyhow::Result<()>,
) -> anyhow::Result<TrainedEpoch> {
    let started = Instant::now();
    let dev = net.store.device().clone();
    let steps = train_set.len() / config.batch;
    let order = epoch_order(train_set, config.sampling, config.order_seed(), epoch);
    let rx = batches(
        train_set.clone(),
        BatchPlan {
            order,
            batch: config.batch,
            augment: Some(config.augment()),
            size: config.input_size,
            seed: config.augment_seed(),
            epoch,
            drop_last: true,
            prefetch: 2,
        },
    );
    let mut out = TrainedEpoch {
        loss_sums: LossMeans::default(),
        correct: 0,
        seen: 0,
        clean: Vec::new(),
        noisy: Vec::new(),
        predicted: Vec::new(),
        seconds: 0.0,
    };
    for (step, batch) in rx.into_iter().enumerate() {
        let batch = batch.map_err(|e| classified(FailureClass::Data, e))?;
        opt.lr = config.schedule.lr_at_step(
            config.optimizer.base_lr(),
            config.epochs,
            epoch,
            step,
            steps,
        );
        let x = batch.images(&dev)?;
        let y = batch.label_tensor(&dev)?;
        let weights = config.losses.at_step(epoch, step, steps);
        let l = train::train_step(&net.dan, &net.centers, opt, &x, &y, weights)
            .with_context(|| format!("epoch {} step {}", epoch + 1, step + 1))?;
        out.loss_sums.add(&l);
        out.correct += l.correct;
        out.seen += l.batch;
        out.clean.extend_from_slice(&batch.clean_labels);
        out.noisy.extend_from_slice(&batch.labels);
        out.predicted.extend_from_slice(&l.predictions);
        on_event(&Event::Step {
            epoch: epoch + 1,
            step: step + 1,
            steps,
            loss: l.total,
        })?;
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// The epoch's metrics: its training figures and the evaluation after it (test, validation,
/// memorisation under label noise).
fn evaluate_epoch(
    config: &RunConfig,
    net: &DanEac,
    splits: &Splits,
    epoch: usize,
    lr: f64,
    steps: usize,
    trained: TrainedEpoch,
) -> anyhow::Result<EpochMetrics> {
    let started = Instant::now();
    let eval = evaluate_set(net, &splits.test, config)?;
    let val_accuracy = match &splits.val {
        Some(v) => Some(accuracy(&predict_set(net, v, config)?, &v.labels())),
        None => None,
    };
    let (memorisation_eval, memorisation_running) = match &config.noise {
        Some(_) => (
            Some(memorisation(
                &splits.train.clean_labels(),
                &splits.train.labels(),
                &predict_set(net, &splits.train, config)?,
            )),
            Some(memorisation(
                &trained.clean,
                &trained.noisy,
                &trained.predicted,
            )),
        ),
        None => (None, None),
    };
    Ok(EpochMetrics {
        epoch: epoch + 1,
        lr,
        loss: trained.loss_sums.scaled(1.0 / steps.max(1) as f64),
        train_accuracy: trained.correct as f64 / trained.seen.max(1) as f64,
        test_accuracy: eval.accuracy,
        test_balanced_accuracy: eval.balanced_accuracy,
        val_accuracy,
        memorisation: memorisation_eval,
        memorisation_running,
        train_seconds: trained.seconds,
        eval_seconds: started.elapsed().as_secs_f64(),
        train_img_per_s: trained.seen as f64 / trained.seconds,
        confusion: eval.confusion,
        replayed: false,
    })
}

/// Evaluation-mode accuracy on a whole split, against its clean labels.
pub fn evaluate_set(
    net: &DanEac,
    set: &Arc<DataSet>,
    config: &RunConfig,
) -> anyhow::Result<EvalReport> {
    let pred = predict_set(net, set, config)?;
    let mut confusion = Confusion::new(config.model.classes);
    confusion.add(&set.clean_labels(), &pred)?;
    Ok(confusion.report())
}

/// Evaluation-mode predictions (eval transform, no augmentation) for every sample, in order.
pub fn predict_set(
    net: &DanEac,
    set: &Arc<DataSet>,
    config: &RunConfig,
) -> anyhow::Result<Vec<u32>> {
    let dev = net.store.device().clone();
    let order: Vec<usize> = (0..set.len()).collect();
    let rx = batches(
        set.clone(),
        BatchPlan {
            order,
            batch: config.batch.max(1),
            augment: None,
            size: config.input_size,
            seed: config.seed,
            epoch: 0,
            drop_last: false,
            prefetch: 2,
        },
    );
    let mut out = Vec::with_capacity(set.len());
    let folded = net.dan.inference()?;
    for batch in rx {
        let batch = batch.map_err(|e| classified(FailureClass::Data, e))?;
        out.extend(train::predict(&folded, &batch.images(&dev)?)?);
    }
    Ok(out)
}

/// Share of predictions equal to the labels.
fn accuracy(predicted: &[u32], labels: &[u32]) -> f64 {
    let hits = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f64 / labels.len().max(1) as f64
}

//! The training loop: per-epoch metrics (memorisation under noise), checkpoints, and a resumed
//! run that is bit-identical to an uninterrupted one.

use fer_model::backbone::{BackboneConfig, ResNetConfig};
use fer_model::config::{ModelSection, RunConfig};
use fer_model::data::synth::{ClassBalance, SynthConfig};
use fer_model::data::{DataSpec, NoiseSpec};
use fer_model::trainer::{self, EpochMetrics, Event};

fn tiny() -> RunConfig {
    let mut c = RunConfig::embedded_default();
    c.model = ModelSection {
        backbone: BackboneConfig::ResNet(ResNetConfig::basic([8, 8, 16, 16], [1, 1, 1, 1])),
        pretrained: None,
        heads: 2,
        classes: 7,
        num_centers: None,
    };
    c.data = DataSpec::Synthetic(SynthConfig {
        difficulty: 0.2,
        image_size: 32,
        train: 42,
        test: 14,
        seed: 3,
        balance: ClassBalance::Balanced,
    });
    c.noise = Some(NoiseSpec::Symmetric { rate: 0.3, seed: 1 });
    c.input_size = 32;
    c.batch = 8;
    c.epochs = 2;
    c
}

fn run(config: &RunConfig, dir: &std::path::Path) -> (Vec<EpochMetrics>, usize) {
    let mut epochs = Vec::new();
    let mut start = usize::MAX;
    trainer::run(config, dir, &mut |e| {
        match e {
            Event::Epoch(m) => epochs.push(m.clone()),
            Event::Started { start_epoch, .. } => start = *start_epoch,
            _ => {}
        }
        Ok(())
    })
    .unwrap();
    (epochs, start)
}

fn dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fer-trainer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn resumed_run_is_identical_to_an_uninterrupted_one() {
    let config = tiny();
    let (straight, start) = run(&config, &dir("straight"));
    assert_eq!(start, 0);
    assert_eq!(straight.len(), 2);
    let m = straight[1]
        .memorisation
        .expect("memorisation is reported under label noise");
    assert!(m.flipped > 0);
    assert!(straight
        .iter()
        .all(|e| e.loss_total.is_finite() && e.loss_consistency.is_some()));
    assert_eq!(straight[1].confusion.iter().flatten().sum::<u64>(), 14);

    let d = dir("resumed");
    let mut first = config.clone();
    first.epochs = 1;
    let (a, _) = run(&first, &d);
    assert_eq!(a.len(), 1);
    let (b, start) = run(&config, &d);
    assert_eq!(start, 1, "the second invocation resumes after epoch 1");
    // Epoch 1 is re-reported from the checkpoint's history (marked replayed), then epoch 2 trains.
    assert_eq!(b.len(), 2);
    assert!(b[0].replayed && !b[1].replayed);
    assert_eq!(b[0].loss_total, a[0].loss_total);
    let (x, y) = (&straight[1], &b[1]);
    assert_eq!(
        (x.loss_total, x.test_accuracy, x.train_accuracy),
        (y.loss_total, y.test_accuracy, y.train_accuracy)
    );
    // A finished run started again trains nothing.
    let (c, start) = run(&config, &d);
    assert_eq!(start, 2);
    assert!(
        c.iter().all(|e| e.replayed),
        "a finished run only re-reports its history"
    );
}

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    let mut c = tiny();
    c.batch = 1;
    assert!(c.validate().unwrap_err().to_string().starts_with("batch:"));
    let mut c = tiny();
    c.model.classes = 8;
    let err = trainer::run(&c, &dir("classes"), &mut |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.classes is 8") && err.contains("7 classes"),
        "{err}"
    );
    let mut c = tiny();
    c.model.backbone = BackboneConfig::ResNet(ResNetConfig::basic([8, 8, 16, 24], [1, 1, 1, 1]));
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("model.backbone.widths"));
}

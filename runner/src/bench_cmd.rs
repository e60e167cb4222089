//! `fer bench`: throughput measurements (a benchmark, never a test). Prints one JSON line per
//! setting.

use std::time::Instant;

use clap::{Args, ValueEnum};
use fer_model::data::augment::AugmentConfig;
use fer_model::data::loader::{epoch_order, make_batch, Sampling};
use fer_model::data::synth::{self, ClassBalance, SynthConfig};
use fer_model::data::{self, DataSpec, Split};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum What {
    /// Data loader: JPEG decode + DAN train augmentation, images/s at 224 and 112 px.
    Loader,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(value_enum, default_value = "loader")]
    pub what: What,
    /// Images per measured pass.
    #[arg(long, default_value_t = 512)]
    pub images: usize,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        What::Loader => loader(args.images),
    }
}

/// RAF-DB-like input: 100x100 aligned face JPEGs in an ImageFolder, decoded and augmented to
/// the model size, batches of 64, on the rayon pool (RAYON_NUM_THREADS, default: all cores).
fn loader(n: usize) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("fer-bench-loader-{}", std::process::id()));
    let cfg = SynthConfig {
        difficulty: 0.5,
        image_size: 100,
        train: n,
        test: 0,
        seed: 0,
        balance: ClassBalance::Balanced,
    };
    let labels = synth::labels(&cfg, synth::Split::Train);
    for (i, &y) in labels.iter().enumerate() {
        let dir = root.join("train").join(y.to_string());
        std::fs::create_dir_all(&dir)?;
        synth::render_face(&cfg, synth::Split::Train, i, y)
            .to_rgb8()
            .save(dir.join(format!("{i:05}.jpg")))?;
    }
    let set = data::load(
        &DataSpec::ImageFolder {
            root: root.clone(),
            skip_bad: false,
        },
        Split::Train,
    )?;
    let threads = rayon::current_num_threads();
    for size in [224usize, 112] {
        let aug = AugmentConfig::dan(size);
        let mut best = 0f64;
        for epoch in 0..3 {
            let order = epoch_order(&set, Sampling::Shuffle, 0, epoch);
            let t = Instant::now();
            for chunk in order.chunks(64) {
                std::hint::black_box(make_batch(&set, chunk, Some(&aug), size, 0, epoch)?);
            }
            best = best.max(set.len() as f64 / t.elapsed().as_secs_f64());
        }
        println!(
            "{}",
            serde_json::json!({"bench": "loader", "setting": format!("jpeg100_to_{size}"), "img_per_s": (best * 10.0).round() / 10.0, "threads": threads})
        );
    }
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

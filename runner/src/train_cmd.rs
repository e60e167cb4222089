//! `fer train`: one end-to-end training run on the built-in blob images, with a checkpoint per
//! epoch and exact resumption. (The runner issue replaces the flags with a resolved config file.)

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::Args;
use fer_model::backbone::ResNetConfig;
use fer_model::{
    checkpoint, data, device, train, DanConfig, DanEac, LossWeights, OptimizerConfig, Schedule,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run directory: checkpoint.safetensors and metrics.jsonl go here.
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 6)]
    pub epochs: usize,
    /// Training images (blob set).
    #[arg(long, default_value_t = 448)]
    pub train_size: usize,
    /// Test images (blob set, drawn from another seed).
    #[arg(long, default_value_t = 224)]
    pub test_size: usize,
    #[arg(long, default_value_t = 48)]
    pub image_size: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 7)]
    pub classes: usize,
    /// Backbone stage widths (ResNet-18: 64,128,256,512).
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128")]
    pub widths: Vec<usize>,
    /// Blocks per stage (ResNet-18: 2,2,2,2).
    #[arg(long, value_delimiter = ',', default_value = "1,1,1,1")]
    pub blocks: Vec<usize>,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// ExponentialLR gamma, stepped once per epoch.
    #[arg(long, default_value_t = 0.9)]
    pub gamma: f64,
    #[arg(long, default_value_t = 1.0)]
    pub lambda_affinity: f64,
    #[arg(long, default_value_t = 1.0)]
    pub lambda_partition: f64,
    #[arg(long, default_value_t = 4.0)]
    pub lambda_consistency: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Start from scratch even if the run directory holds a checkpoint.
    #[arg(long)]
    pub fresh: bool,
}

#[derive(Serialize)]
struct EpochRecord {
    epoch: usize,
    lr: f64,
    loss_total: f64,
    loss_ce: f64,
    loss_affinity: f64,
    loss_partition: f64,
    loss_consistency: Option<f64>,
    train_accuracy: f64,
    test_accuracy: f64,
    test_balanced_accuracy: f64,
    epoch_seconds: f64,
    train_img_per_s: f64,
}

fn arr4(v: &[usize], what: &str) -> anyhow::Result<[usize; 4]> {
    v.try_into()
        .map_err(|_| anyhow::anyhow!("--{what} needs exactly 4 comma-separated values, got {v:?}"))
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch >= 2,
        "--batch must be at least 2 (BatchNorm1d cannot train on 1 sample)"
    );
    anyhow::ensure!(
        args.train_size >= args.batch,
        "--train-size {} is smaller than one batch of {}",
        args.train_size,
        args.batch
    );
    let dev = device::select(&args.device)?;
    let config = DanConfig {
        backbone: ResNetConfig {
            widths: arr4(&args.widths, "widths")?,
            blocks: arr4(&args.blocks, "blocks")?,
        },
        heads: args.heads,
        classes: args.classes,
    };
    let weights = LossWeights {
        affinity: args.lambda_affinity,
        partition: args.lambda_partition,
        consistency: args.lambda_consistency,
    };
    let net = DanEac::new(&config, args.classes, &dev, DType::F32, args.seed)?;
    let mut opt = net.optimizer(OptimizerConfig::Adam {
        lr: args.lr,
        weight_decay: 0.0,
        betas: (0.9, 0.999),
        eps: 1e-8,
    });
    let schedule = Schedule::Exponential { gamma: args.gamma };

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating run directory {}", args.out.display()))?;
    let ckpt = args.out.join("checkpoint.safetensors");
    let mut start_epoch = 0;
    if ckpt.is_file() && !args.fresh {
        start_epoch = checkpoint::restore(&ckpt, &net, Some(&mut opt))?.epoch;
        eprintln!("resumed from {} at epoch {start_epoch}", ckpt.display());
    }

    let (train_x, train_y) = data::blobs(
        args.train_size,
        args.classes,
        args.image_size,
        args.seed.wrapping_mul(2) + 1,
        &dev,
    )?;
    let (test_x, test_y) = data::blobs(
        args.test_size,
        args.classes,
        args.image_size,
        args.seed.wrapping_mul(2) + 2,
        &dev,
    )?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.out.join("metrics.jsonl"))?;

    for epoch in start_epoch..args.epochs {
        opt.lr = schedule.lr_at(args.lr, epoch);
        let started = std::time::Instant::now();
        let mut order: Vec<usize> = (0..args.train_size).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
            args.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9),
        ));
        let mut sums = fer_model::StepLosses::default();
        let mut steps = 0usize;
        // The last short batch is dropped (BatchNorm1d cannot train on a batch of 1).
        for chunk in order.chunks_exact(args.batch) {
            let idx = Tensor::new(chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(), &dev)?;
            let x = train_x.index_select(&idx, 0)?;
            let y = Tensor::new(chunk.iter().map(|&i| train_y[i]).collect::<Vec<_>>(), &dev)?;
            let l = train::train_step(&net.dan, &net.centers, &mut opt, &x, &y, weights)?;
            sums.total += l.total;
            sums.ce += l.ce;
            sums.affinity += l.affinity;
            sums.partition += l.partition;
            sums.consistency = l.consistency.map(|c| c + sums.consistency.unwrap_or(0.0));
            sums.correct += l.correct;
            sums.batch += l.batch;
            steps += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        let test_batches = (0..args.test_size).step_by(args.batch).map(|s| {
            let n = args.batch.min(args.test_size - s);
            Ok((test_x.narrow(0, s, n)?, test_y[s..s + n].to_vec()))
        });
        let eval = train::evaluate(&net.dan, test_batches)?;
        let n = steps as f64;
        let rec = EpochRecord {
            epoch: epoch + 1,
            lr: opt.lr,
            loss_total: sums.total / n,
            loss_ce: sums.ce / n,
            loss_affinity: sums.affinity / n,
            loss_partition: sums.partition / n,
            loss_consistency: sums.consistency.map(|c| c / n),
            train_accuracy: sums.correct as f64 / sums.batch as f64,
            test_accuracy: eval.accuracy,
            test_balanced_accuracy: eval.balanced_accuracy,
            epoch_seconds: seconds,
            train_img_per_s: sums.batch as f64 / seconds,
        };
        let line = serde_json::to_string(&rec)?;
        println!("{line}");
        // The checkpoint first, then the metric line: a crash in between re-runs the epoch
        // rather than recording an epoch whose weights were lost.
        checkpoint::save(
            &ckpt,
            &net,
            Some(&opt),
            epoch + 1,
            serde_json::json!({"dataset": "blobs", "classes": args.classes}),
        )?;
        writeln!(metrics, "{line}")?;
        std::io::stdout().flush()?;
    }
    Ok(())
}

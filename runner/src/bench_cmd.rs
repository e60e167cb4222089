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
    /// The full DAN + EAC training step (both forwards, all losses, backward, Adam) and inference,
    /// images/s, with the reference PyTorch benchmark's setting names and JSON keys.
    Train,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(value_enum, default_value = "loader")]
    pub what: What,
    /// Images per measured pass (loader).
    #[arg(long, default_value_t = 512)]
    pub images: usize,
    /// Timed steps per setting (train); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Only these settings (comma-separated), e.g. r18_112_b16,embedded.
    #[arg(long, value_delimiter = ',')]
    pub settings: Vec<String>,
    /// Run the settings in this process (default: one child process per setting, so each
    /// reports its own peak memory).
    #[arg(long)]
    pub in_process: bool,
    /// PyTorch's numbers for the same settings (JSON lines of the reference `bench_torch.py`);
    /// each result then also gives our throughput as a ratio of PyTorch's. Skipped when the
    /// file does not exist.
    #[arg(long, default_value = "bench/pytorch_reference.jsonl")]
    pub reference: std::path::PathBuf,
    /// Device of the train benchmark: cpu, cuda or cuda:N (a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        What::Loader => loader(args.images),
        What::Train => train(&args),
    }
}

/// (name, widths, blocks, input side, batch), as in the reference `bench_torch.py`, plus the
/// embedded default and the thesis's GPU setting (224 px, batch 64; not run by default).
/// A benchmark setting: name, ResNet widths, blocks, input side, batch.
type Setting = (&'static str, [usize; 4], [usize; 4], usize, usize);

const SETTINGS: [Setting; 5] = [
    ("r18_112_b16", [64, 128, 256, 512], [2, 2, 2, 2], 112, 16),
    ("r18_224_b16", [64, 128, 256, 512], [2, 2, 2, 2], 224, 16),
    ("r18_64_b64", [64, 128, 256, 512], [2, 2, 2, 2], 64, 64),
    ("embedded", [8, 16, 32, 64], [1, 1, 1, 1], 48, 32),
    ("r18_224_b64", [64, 128, 256, 512], [2, 2, 2, 2], 224, 64),
];

/// The settings run when none is named: the CPU ones of the reference script.
const DEFAULT_SETTINGS: usize = 4;

fn train(args: &BenchArgs) -> anyhow::Result<()> {
    let wanted: Vec<&str> = if args.settings.is_empty() {
        SETTINGS[..DEFAULT_SETTINGS].iter().map(|s| s.0).collect()
    } else {
        args.settings.iter().map(|s| s.as_str()).collect()
    };
    let machine = Machine::this();
    let mut lines = Vec::new();
    for name in wanted {
        let Some(&(_, widths, blocks, size, batch)) = SETTINGS.iter().find(|s| s.0 == name) else {
            anyhow::bail!(
                "unknown setting {name:?} (have: {:?})",
                SETTINGS.iter().map(|s| s.0).collect::<Vec<_>>()
            );
        };
        if args.in_process || args.settings.len() == 1 {
            let reference = reference_for(&args.reference, name, &machine)?;
            let device = fer_model::device::select(&args.device)?;
            let shape = (widths, blocks, size, batch);
            lines.push(train_setting(
                name, shape, args.steps, reference, &machine, &device,
            )?);
        } else {
            let out = std::process::Command::new(std::env::current_exe()?)
                .args([
                    "bench",
                    "train",
                    "--steps",
                    &args.steps.to_string(),
                    "--settings",
                    name,
                    "--device",
                    &args.device,
                    "--reference",
                ])
                .arg(&args.reference)
                .stderr(std::process::Stdio::inherit())
                .output()?;
            anyhow::ensure!(out.status.success(), "benchmark setting {name} failed");
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                println!("{line}");
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    lines.push(v);
                }
            }
        }
    }
    if lines.len() > 1 {
        eprintln!("{}", summary_table(&lines, &args.reference, &machine));
    }
    Ok(())
}

/// The settings side by side with PyTorch's reference numbers (stderr; stdout stays JSON).
fn summary_table(
    lines: &[serde_json::Value],
    reference: &std::path::Path,
    machine: &Machine,
) -> String {
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64();
    let cell =
        |ours: Option<f64>, torch: Option<f64>, ratio: Option<f64>| match (ours, torch, ratio) {
            (Some(o), Some(t), Some(r)) => format!("{o:.1} ({t:.1}) {r:.2}x"),
            (Some(o), _, _) => format!("{o:.1} (none for this machine)"),
            _ => "-".into(),
        };
    let mut out = String::from(
        "\nsetting      | train img/s (PyTorch) ratio | inference img/s (PyTorch) ratio | peak MB (PyTorch) | isa\n",
    );
    for v in lines {
        out.push_str(&format!(
            "{:<12} | {:<27} | {:<31} | {} ({}) | {}\n",
            v["setting"].as_str().unwrap_or("?"),
            cell(
                num(v, "train_img_per_s"),
                num(v, "pytorch_train_img_per_s"),
                num(v, "train_vs_pytorch")
            ),
            cell(
                num(v, "infer_img_per_s"),
                num(v, "pytorch_infer_img_per_s"),
                num(v, "infer_vs_pytorch")
            ),
            num(v, "peak_rss_mb").map_or("-".into(), |m| format!("{m:.0}")),
            num(v, "pytorch_peak_rss_mb").map_or("-".into(), |m| format!("{m:.0}")),
            v["isa"].as_str().unwrap_or("?"),
        ));
    }
    out.push_str(&format!(
        "PyTorch's numbers: {}, its lines for this machine ({}); refresh them with bench/compare_torch.py --write (bench/README.md)",
        reference.display(),
        machine
    ));
    out
}

/// The machine a benchmark ran on, as the reference file tags PyTorch's lines: the CPU model
/// and the instruction-set level the kernels run at (`FER_ISA`'s cap where set). A capped run is
/// compared with PyTorch capped the same way (`bench/compare_torch.py --isa`), which stands in
/// for a machine without the higher level; never with PyTorch at the machine's full level.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub cpu: String,
    pub isa: &'static str,
}

impl Machine {
    pub fn this() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpu,
            isa: fer_model::ops::isa::active().name(),
        }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}, {}", self.cpu, self.isa)
    }
}

/// PyTorch's numbers for `setting` measured on `machine`, from a JSON-lines reference file, or
/// None when the file does not exist or has no such line. Each line names its machine
/// (`"machine": {"cpu": ..., "isa": ...}`, written by `bench/compare_torch.py --write`): PyTorch's
/// rate differs 2-3x between machines, so another machine's line is never used.
fn reference_for(
    path: &std::path::Path,
    setting: &str,
    machine: &Machine,
) -> anyhow::Result<Option<Reference>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}: not a JSON line: {e}", at()))?;
        let (Some(cpu), Some(isa)) = (v["machine"]["cpu"].as_str(), v["machine"]["isa"].as_str())
        else {
            anyhow::bail!(
                "{}: `machine` must be {{\"cpu\": <model name>, \"isa\": <level>}} naming where PyTorch was measured (bench/compare_torch.py --write tags it)",
                at()
            );
        };
        if v["setting"] != setting || cpu != machine.cpu || isa != machine.isa {
            continue;
        }
        let rate = |key: &str| {
            v[key]
                .as_f64()
                .ok_or_else(|| anyhow::anyhow!("{}: `{key}` must be a number", at()))
        };
        return Ok(Some(Reference {
            train: rate("train_img_per_s")?,
            infer: rate("infer_img_per_s")?,
            peak_mb: v["peak_rss_mb"].as_f64(),
        }));
    }
    Ok(None)
}

/// PyTorch's images/s (train, inference) and peak memory at one setting.
struct Reference {
    train: f64,
    infer: f64,
    peak_mb: Option<f64>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// One setting: (widths, blocks, input side, batch) on `device`. The losses are read back every
/// step and the logits after every forward, so on a GPU each timing covers finished work.
fn train_setting(
    name: &str,
    (widths, blocks, size, batch): ([usize; 4], [usize; 4], usize, usize),
    steps: usize,
    reference: Option<Reference>,
    machine: &Machine,
    device: &candle_core::Device,
) -> anyhow::Result<serde_json::Value> {
    use candle_core::{DType, Tensor};
    use fer_model::backbone::ResNetConfig;
    use fer_model::{train, DanConfig, DanEac, LossWeights, OptimizerConfig};
    use rand::{Rng, SeedableRng};

    let config = DanConfig {
        backbone: fer_model::backbone::BackboneConfig::ResNet(ResNetConfig::basic(widths, blocks)),
        heads: 4,
        classes: 7,
    };
    let net = DanEac::new(&config, 7, device, DType::F32, 0)?;
    let mut opt = net.optimizer(OptimizerConfig::adam(1e-3));
    // Normalised uniform noise with one zero (erased) rectangle per image, made once.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut px: Vec<f32> = (0..batch * 3 * size * size)
        .map(|_| (rng.random::<f32>() - 0.45) / 0.225)
        .collect();
    for b in 0..batch {
        let (h, w) = (size / 4, size / 3);
        let (top, left) = (rng.random_range(0..size - h), rng.random_range(0..size - w));
        for c in 0..3 {
            for y in top..top + h {
                for x in left..left + w {
                    px[((b * 3 + c) * size + y) * size + x] = 0.0;
                }
            }
        }
    }
    let x = Tensor::from_vec(px, (batch, 3, size, size), device)?;
    let y = Tensor::new(
        (0..batch).map(|i| (i % 7) as u32).collect::<Vec<_>>(),
        device,
    )?;
    let mut times = Vec::new();
    for i in 0..=steps {
        let t = Instant::now();
        train::train_step(
            &net.dan,
            &net.centers,
            &mut opt,
            &x,
            &y,
            LossWeights::default(),
        )?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        } else {
            // The first step is warm-up (first-touch page faults, lazily made state): neither
            // timed nor counted in the per-kernel times.
            fer_model::ops::timing::take();
        }
    }
    let train_rate = batch as f64 / median(times);
    let op_times = fer_model::ops::timing::take();
    let mut times = Vec::new();
    // The inference form (batch norms folded, no autograd graph), made once as a deployed
    // model or an evaluation pass makes it.
    let folded = net.dan.inference()?;
    for i in 0..=steps {
        let t = Instant::now();
        // On a pool thread, as `train_step` and `predict` run (`on_compute_pool`).
        train::on_compute_pool(|| -> anyhow::Result<()> {
            std::hint::black_box(folded.forward(&x)?.logits.to_vec2::<f32>()?);
            Ok(())
        })?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        } else {
            fer_model::ops::timing::take();
        }
    }
    let infer_rate = batch as f64 / median(times);
    let infer_op_times = fer_model::ops::timing::take();
    let round2 = |v: f64| (v * 100.0).round() / 100.0;
    let mut line = serde_json::json!({
        "impl": "candle-fer",
        "setting": name,
        "train_img_per_s": round2(train_rate),
        "infer_img_per_s": round2(infer_rate),
        "peak_rss_mb": peak_rss_mb(),
        "threads": rayon::current_num_threads(),
        "device": format!("{device:?}"),
        "isa": fer_model::ops::isa::active().name(),
        // `fer` refused a misspelt FER_CONV at start, so this is the algorithm in force.
        "conv": fer_model::ops::conv::conv_algorithm_requested().map_or("?", |a| a.name()),
        "cpu": machine.cpu,
    });
    if let Some(r) = reference {
        line["pytorch_train_img_per_s"] = r.train.into();
        line["pytorch_infer_img_per_s"] = r.infer.into();
        line["train_vs_pytorch"] = round2(train_rate / r.train).into();
        line["infer_vs_pytorch"] = round2(infer_rate / r.infer).into();
        if let Some(peak) = r.peak_mb {
            line["pytorch_peak_rss_mb"] = peak.into();
        }
    }
    println!("{line}");
    if std::env::var_os("FER_OP_TIMES").is_some() {
        // Mean seconds per timed step by kernel (warm-up excluded), to stderr so the JSON stays clean.
        for (name, secs) in op_times {
            eprintln!("  {name:<26} {:>8.3} s/step", secs / steps as f64);
        }
        eprintln!("  inference:");
        for (name, secs) in infer_op_times {
            eprintln!("  {name:<26} {:>8.3} s/batch", secs / steps as f64);
        }
    }
    Ok(line)
}

/// Peak resident memory of this process (VmHWM), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
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
        // An ImageFolder's test split must name the same classes (one image each is enough).
        let test = root.join("test").join(y.to_string());
        if !test.is_dir() {
            std::fs::create_dir_all(&test)?;
            std::fs::copy(dir.join(format!("{i:05}.jpg")), test.join("0.jpg"))?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_is_taken_from_this_machines_lines_only() {
        let dir = std::env::temp_dir().join(format!("fer-bench-ref-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ref.jsonl");
        let line = |cpu: &str, isa: &str, train: f64| {
            format!(
                r#"{{"setting": "r18_112_b16", "train_img_per_s": {train}, "infer_img_per_s": 50.0, "machine": {{"cpu": "{cpu}", "isa": "{isa}"}}}}"#
            )
        };
        std::fs::write(
            &path,
            [
                line("AMD EPYC", "avx2", 9.0),
                line("Intel Xeon", "avx512", 30.0),
                line("AMD EPYC", "avx512", 22.0),
            ]
            .join("\n"),
        )
        .unwrap();
        let here = |cpu: &str, isa: &'static str| Machine {
            cpu: cpu.into(),
            isa,
        };
        let got = |m: Machine| {
            reference_for(&path, "r18_112_b16", &m)
                .unwrap()
                .map(|r| r.train)
        };
        assert_eq!(got(here("AMD EPYC", "avx512")), Some(22.0));
        assert_eq!(got(here("AMD EPYC", "avx2")), Some(9.0));
        assert_eq!(got(here("Intel Xeon", "avx2")), None);
        assert!(reference_for(&path, "embedded", &here("AMD EPYC", "avx2"))
            .unwrap()
            .is_none());

        // A line that does not say where it was measured is an error naming the file and line.
        std::fs::write(
            &path,
            format!(
                "{}\n{{\"setting\": \"r18_112_b16\", \"train_img_per_s\": 9.0, \"infer_img_per_s\": 50.0}}\n",
                line("AMD EPYC", "avx2", 9.0)
            ),
        )
        .unwrap();
        let err = reference_for(&path, "r18_112_b16", &here("x", "avx2"))
            .err()
            .expect("a line without a machine is refused")
            .to_string();
        assert!(
            err.contains("ref.jsonl:2") && err.contains("machine"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

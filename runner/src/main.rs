//! `fer`: the command-line front end of the workspace.

mod bench_cmd;
mod data_cmd;
mod doctor;
#[cfg(test)]
mod fuzz_tests;
mod predict_cmd;
mod preflight;
mod report;
mod scheduler;
mod stats;
mod store;
mod sweep;
mod sweep_cmd;
mod train_cmd;
mod yaml;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fer_model::trainer::FailureClass;

// Training allocates and frees large tensors every op; mimalloc reuses them instead of
// returning pages to the OS (measured: much less system time than glibc malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fer",
    version,
    about = "DAN + EAC facial-expression ablations in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train one model from a run config (default: the embedded synthetic setup).
    Train(train_cmd::TrainArgs),
    /// Data sets: render the synthetic faces to disk.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Expand a sweep file into trials and run the missing ones, recording everything in SQLite.
    Sweep(sweep_cmd::SweepArgs),
    /// List the trials in the results database.
    Runs(sweep_cmd::RunsArgs),
    /// Classify the expression of faces in photos with a checkpoint (ours or an official DAN .pth).
    Predict(predict_cmd::PredictArgs),
    /// Regenerate a table / figure of the thesis from the database (reports/NAME.md, .csv, .png, .svg).
    Report(report::ReportArgs),
    /// Check a sweep's setup without training: data layout and class counts against the
    /// published ones, pretrained files present and fitting, devices, input sizes.
    Doctor(doctor::DoctorArgs),
    /// Run the PyTorch parity fixtures (every case folder in DIR) on a device and check them with
    /// the reference's tolerance rules: eval outputs, losses, gradients, one Adam step.
    Parity {
        /// Folder of case folders.
        #[arg(default_value = "fixtures")]
        dir: PathBuf,
        /// cpu, cuda or cuda:N (a `--features cuda` build).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Throughput benchmarks (JSON lines).
    Bench(bench_cmd::BenchArgs),
    /// Print what a checkpoint or weights file holds: ours, an official DAN `.pth`, or any
    /// pretrained format `model.pretrained` reads.
    Inspect {
        /// Checkpoint file.
        path: PathBuf,
    },
}

/// Candle's element-wise CPU ops (gradient sums, the heads' and losses' arithmetic) run on a
/// pool of its own whose idle thread spins for ~25k rounds after every op, taking a core from
/// the rayon threads that run our kernels: on 2 cores the training step was ~20% slower with it
/// (docs/cpu-kernels.md, "Threads"). One Candle thread makes those ops run inline on the
/// calling rayon thread instead. A user's own CANDLE_NUM_THREADS is kept.
fn single_threaded_candle_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: at start-up, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// mimalloc's `purge_delay` option: -1 keeps freed pages instead of returning them to the OS,
/// which otherwise re-zeroes them on every step (measured: ~5% faster training steps).
const MI_OPTION_PURGE_DELAY: i32 = 15;

fn main() {
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY as _, -1) };
    single_threaded_candle_elementwise();
    // Like other Unix tools, end quietly when the reader of our output goes away (`fer runs |
    // head`), instead of panicking in println!. A trial whose runner died ends the same way.
    // SAFETY: restoring the default disposition of one signal at start-up.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train_cmd::run(args),
        Command::Inspect { path } => inspect(&path),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Parity { dir, device } => parity(&dir, &device),
        Command::Sweep(args) => runtime().and_then(|rt| rt.block_on(sweep_cmd::sweep(args))),
        Command::Predict(args) => predict_cmd::run(args),
        Command::Report(args) => runtime().and_then(|rt| rt.block_on(report::run(args))),
        Command::Runs(args) => runtime().and_then(|rt| rt.block_on(sweep_cmd::runs(args))),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        // The exit status tells the runner the failure's class (see scheduler::EXIT_*).
        let code = match fer_model::trainer::failure_class(&err) {
            Some(FailureClass::Setup) => scheduler::EXIT_CONFIG_ERROR,
            Some(FailureClass::Data) => scheduler::EXIT_DATA_ERROR,
            Some(FailureClass::Divergence) => scheduler::EXIT_DIVERGED,
            Some(FailureClass::Resource) => scheduler::EXIT_RESOURCE,
            None => 1,
        };
        std::process::exit(code);
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn parity(dir: &std::path::Path, device: &str) -> anyhow::Result<()> {
    let dev = fer_model::device::select(device)?;
    let cases = fer_model::parity::cases_in(dir)?;
    anyhow::ensure!(
        !cases.is_empty(),
        "{}: no parity case folders",
        dir.display()
    );
    let mut failed = 0;
    for case in &cases {
        let (total, fails) = fer_model::parity::check_case(case, &dev)?;
        println!(
            "{} on {device}: {}/{total} tensors within tolerance",
            case.display(),
            total - fails.len()
        );
        for (k, m) in &fails {
            println!("  FAIL {k}: {m}");
        }
        failed += fails.len();
    }
    anyhow::ensure!(failed == 0, "{failed} tensor(s) out of tolerance");
    Ok(())
}

fn inspect(path: &std::path::Path) -> anyhow::Result<()> {
    use fer_model::checkpoint;
    // Our checkpoint carries its metadata; anything else is a weights file of some format.
    let ours = match path.extension().is_some_and(|e| e == "safetensors") {
        true => checkpoint::read_meta(path).ok(),
        false => None,
    };
    let tensors = if let Some(meta) = ours {
        println!("{}", serde_json::to_string_pretty(&meta)?);
        checkpoint::read_safetensors(path)?
    } else {
        let file = fer_model::weights::read_state_dict(path)?;
        println!("{}: {}", path.display(), file.origin());
        file.tensors
    };
    let mut names: Vec<_> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec(), t.dtype()))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let params: usize = tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("optim."))
        .map(|(_, t)| t.elem_count())
        .sum();
    for (k, dims, dtype) in &names {
        println!("{k}\t{dims:?}\t{dtype:?}");
    }
    println!(
        "{} tensors, {params} values (optimizer state excluded)",
        names.len()
    );
    Ok(())
}

//! `fer`: the command-line front end of the workspace, as a library so its logic is testable
//! without spawning processes; `main.rs` only sets up the process and calls `run`.

pub mod bench_cmd;
pub mod data_cmd;
pub mod doctor;
pub mod export;
pub mod face_detect;
#[cfg(test)]
mod fuzz_tests;
pub mod inspect_cmd;
pub mod journal;
pub mod predict_cmd;
pub mod preflight;
pub mod report;
pub mod scheduler;
pub mod serve;
pub mod slurm;
pub mod stats;
pub mod store;
pub mod sweep;
pub mod sweep_cmd;
pub mod threads;
pub mod train_cmd;
pub mod worker;
pub mod yaml;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fer_model::trainer::FailureClass;

#[derive(Parser)]
#[command(
    name = "fer",
    version,
    about = "DAN + EAC facial-expression ablations in Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train one model from a run config (default: the embedded synthetic setup).
    Train(train_cmd::TrainArgs),
    /// Data sets: render the synthetic faces to disk.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Expand a sweep file into trials and run the missing ones, recording everything in SQLite.
    Sweep(sweep_cmd::SweepArgs),
    /// Claim and run a sweep's missing trials against a shared store until none is left (one
    /// task of a `fer sweep --launcher slurm` job array).
    Worker(worker::WorkerArgs),
    /// Ingest the journals a sweep's Slurm workers wrote to the runs folder (clusters without
    /// a database server) into the SQLite store; idempotent.
    Sync(sweep_cmd::SyncArgs),
    /// Export a sweep's results for other tools: TensorBoard runs, or a CSV of every per-epoch
    /// metric.
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// A read-only web dashboard of the results database: sweeps, trial tables, curves,
    /// comparisons and reports, updated live while a sweep runs.
    Serve(serve::ServeArgs),
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

/// Run one command.
pub fn run(command: Command) -> anyhow::Result<()> {
    // Checked before any kernel runs (the kernels would stop the process on it).
    fer_model::ops::isa::requested().map_err(anyhow::Error::msg)?;
    fer_model::ops::conv::conv_algorithm_requested().map_err(anyhow::Error::msg)?;
    match command {
        Command::Train(args) => train_cmd::run(args),
        Command::Inspect { path } => inspect_cmd::inspect(&path),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Parity { dir, device } => inspect_cmd::parity(&dir, &device),
        Command::Sweep(args) => runtime().and_then(|rt| rt.block_on(sweep_cmd::sweep(args))),
        Command::Predict(args) => predict_cmd::run(args),
        Command::Report(args) => runtime().and_then(|rt| rt.block_on(report::run(args))),
        Command::Runs(args) => runtime().and_then(|rt| rt.block_on(sweep_cmd::runs(args))),
        Command::Worker(args) => runtime().and_then(|rt| rt.block_on(worker::run(args))),
        Command::Export(cmd) => runtime().and_then(|rt| rt.block_on(export::run(cmd))),
        Command::Serve(args) => runtime().and_then(|rt| rt.block_on(serve::run(args))),
        Command::Sync(args) => runtime().and_then(|rt| rt.block_on(sweep_cmd::sync(args))),
    }
}

/// The exit status of a failed command: its failure class tells the sweep runner whether to
/// retry (see `scheduler::EXIT_*`); anything unclassified is 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    match fer_model::trainer::failure_class(err) {
        Some(FailureClass::Setup) => scheduler::EXIT_CONFIG_ERROR,
        Some(FailureClass::Data) => scheduler::EXIT_DATA_ERROR,
        Some(FailureClass::Divergence) => scheduler::EXIT_DIVERGED,
        Some(FailureClass::Resource) => scheduler::EXIT_RESOURCE,
        None => 1,
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn exit_codes_follow_the_failure_class() {
        use fer_model::trainer::classified;
        let plain = anyhow::anyhow!("boom");
        assert_eq!(exit_code(&plain), 1);
        for (class, code) in [
            (FailureClass::Setup, 2),
            (FailureClass::Divergence, 4),
            (FailureClass::Data, 5),
            (FailureClass::Resource, 6),
        ] {
            let e = classified(class, anyhow::anyhow!("x")).context("outer context");
            assert_eq!(exit_code(&e), code, "{class:?}");
        }
    }

    #[test]
    fn the_command_line_parses() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["fer", "runs", "--sweep", "heads"]).unwrap();
        assert!(matches!(cli.command, Command::Runs(_)));
        assert!(Cli::try_parse_from(["fer", "sweep"]).is_err());
    }
}

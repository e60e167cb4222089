//! Helpers shared by the CLI tests.

pub mod browser;
pub mod http;
pub mod postgres;
pub mod slurm;

use std::path::PathBuf;
use std::process::Command;

pub fn fer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fer"))
}

/// A fresh, empty scratch folder for one test: its tag, this process and a per-process count
/// make it unique (all integration tests share one process).
pub fn tmp(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("fer-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A run config small enough to train in well under a second.
pub const TINY_CONFIG: &str = "\
model:
  backbone: {widths: [8, 8, 16, 16], blocks: [1, 1, 1, 1]}
  heads: 2
  classes: 7
data: {kind: synthetic, difficulty: 0.2, image_size: 32, train: 28, test: 14, seed: 0, balance: balanced}
input_size: 32
optimizer: {kind: adam, lr: 0.001}
epochs: 1
batch: 8
";

/// How an attempt ended, with nothing else to say (no exit code, signal, class or error).
pub fn ended(status: &str) -> fer_runner::store::AttemptEnd<'_> {
    fer_runner::store::AttemptEnd {
        status,
        exit_code: None,
        signal: None,
        failure_class: None,
        error: None,
        stderr_tail: None,
    }
}

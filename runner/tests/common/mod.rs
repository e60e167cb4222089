//! Helpers shared by the CLI tests.

use std::path::PathBuf;
use std::process::Command;

pub fn fer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fer"))
}

/// A fresh scratch directory for one test.
pub fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fer-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

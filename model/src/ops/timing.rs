//! Opt-in wall-time counters per kernel (`FER_OP_TIMES=1`), read by `fer bench train` to show
//! where a training step goes. Off by default: one relaxed atomic load per kernel call.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// What a counter measures. Nested slots (indented names) are parts of the slot above them.
#[derive(Debug, Clone, Copy)]
pub enum Slot {
    ConvForward,
    ConvBackward,
    BatchNormForward,
    BatchNormBackward,
    AddRelu,
    StepForward,
    StepBackward,
    StepOptimizer,
    ConvGemmForward,
    ConvLayoutCopies,
    ConvCol2Im,
    ConvGemmWeightGradient,
    ConvGemmInputGradient,
    ConvWinogradForward,
}

const SLOTS: usize = 14;

pub const NAMES: [&str; SLOTS] = [
    "conv forward",
    "conv backward",
    "batch norm forward",
    "batch norm backward",
    "add+relu",
    "train: forward + losses",
    "train: backward",
    "train: optimizer",
    "  conv: gemm, forward",
    "  conv: layout copies",
    "  conv: col2im",
    "  conv: gemm, weight gradient",
    "  conv: gemm, input gradient",
    "  conv: winograd, forward",
];
static TOTALS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

fn enabled() -> bool {
    static ON: OnceLock<AtomicBool> = OnceLock::new();
    ON.get_or_init(|| AtomicBool::new(std::env::var_os("FER_OP_TIMES").is_some()))
        .load(Ordering::Relaxed)
}

/// Adds the time `f` takes to counter `slot` (when enabled).
pub fn timed<R>(slot: Slot, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let r = f();
    TOTALS[slot as usize].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// (name, seconds) per counter, and resets them.
pub fn take() -> Vec<(&'static str, f64)> {
    NAMES
        .iter()
        .zip(&TOTALS)
        .map(|(n, t)| (*n, t.swap(0, Ordering::Relaxed) as f64 / 1e9))
        .collect()
}

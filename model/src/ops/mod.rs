//! Differentiable ops that Candle lacks or gets wrong (see ARCHITECTURE.md, "Candle defects").

pub mod batch_norm;
pub mod conv;
pub mod gemm;
pub mod pool;
pub mod timing;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// The elements of a contiguous layout (custom ops get storage + layout, possibly offset).
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The elements of contiguous f32 CPU storage.
pub(crate) fn f32_contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(v, l, op),
        other => candle_core::bail!("{op}: expected f32, got {:?}", other.dtype()),
    }
}

/// `f32_contiguous` for an in-place op's output.
pub(crate) fn f32_contiguous_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("{op}: expected a contiguous f32 CPU tensor"),
    }
}

pub use batch_norm::add_relu;
pub use conv::{conv2d, ConvGeometry};
pub use gemm::matmul;
pub use pool::max_pool2d;

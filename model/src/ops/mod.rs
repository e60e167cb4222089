//! Differentiable ops that Candle lacks or gets wrong (see ARCHITECTURE.md, "Candle defects").

pub mod batch_norm;
pub mod conv;
pub mod gemm;
pub mod pool;
pub mod timing;

pub use batch_norm::add_relu;
pub use conv::{conv2d, ConvGeometry};
pub use gemm::matmul;
pub use pool::max_pool2d;

//! Differentiable ops that Candle lacks or gets wrong (see ARCHITECTURE.md, "Candle defects").

pub mod conv;
pub mod pool;

pub use conv::{conv2d, ConvGeometry};
pub use pool::max_pool2d;

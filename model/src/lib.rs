//! DAN (multi-head cross attention) + EAC (flip attention consistency) in Candle.
//!
//! Normative description: the team's model spec (`spec/model.md` in the shared reference
//! material, outside this repository); its executable form is the PyTorch parity fixtures under
//! `fixtures/` (`parity`). Parameter names equal the official DAN state-dict keys, so PyTorch
//! weights load one to one.

pub mod backbone;
pub mod checkpoint;
pub mod config;
pub mod dan;
pub mod data;
pub mod device;
pub mod events;
pub mod layers;
pub mod loss;
pub mod network;
pub mod ops;
pub mod optim;
pub mod parity;
pub mod predict;
pub mod store;
pub mod train;
pub mod trainer;
pub mod weights;

pub use dan::{Dan, DanConfig, DanOutput};
pub use network::DanEac;
pub use optim::{Optimizer, OptimizerConfig, Schedule};
pub use train::{evaluate, train_step, EvalReport, LossWeights, StepLosses};
